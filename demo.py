"""Embedded demo: scheduled unfreezing vs standard fine-tuning of a tiny, randomly initialised UC2.

Runs on 2 CPU cores in a few minutes with only what the project ships: real IGLUE annotation
excerpts (tests/fixtures/iglue) and synthetic region features written here. It trains on the 300
English GQA testdev questions of the sample (the real `train.json` has 943K), evaluates after every
epoch on the xGQA dev split in all 8 languages (the sample has no test split), then prints the
comparison table and writes the per-epoch, per-language plot.

A tiny random model on random features learns answer priors at best: its numbers mean NOTHING
about the method. The real experiments are `make xgqa-suf MODEL=uc2 DATA=... FEATURES=... CKPT=...`
and friends (README, "Reproducing the paper").
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import data
import eval_zeroshot
import train_uc2

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "tests" / "fixtures" / "iglue"
TRAIN_SPLIT, EVAL_SPLIT = "testdev", "dev"


def prepare_inputs(out: Path) -> tuple[Path, Path]:
    """A tiny tokenizer over the sample's text and synthetic 36-box features for every image it names."""
    train = data.load_split(SAMPLE, "xgqa", TRAIN_SPLIT, "en")
    texts, images = [e.text for e in train], {e.image for e in train}
    for lang in data.available_langs(SAMPLE, "xgqa", EVAL_SPLIT):
        dev = data.load_split(SAMPLE, "xgqa", EVAL_SPLIT, lang)
        texts += [e.text for e in dev]
        images |= {e.image for e in dev}
    tokenizer = out / "tokenizer"
    data.make_tiny_tokenizer(texts, tokenizer, vocab_size=train_uc2.CONFIGS["tiny"]["vocab_size"])
    features = data.write_synthetic_features(out / "features.lmdb", sorted(images), num_boxes=36, seed=0)
    return tokenizer, features


def train(policy: str, out: Path, tokenizer: Path, features: Path, epochs: int) -> Path:
    run = out / f"uc2-xgqa-{policy}"
    train_uc2.main(["--task", "xgqa", "--policy", policy, "--model-config", "tiny",
                    "--data-root", str(SAMPLE), "--features", str(features), "--tokenizer", str(tokenizer),
                    "--train-split", TRAIN_SPLIT, "--eval-split", EVAL_SPLIT, "--epochs", str(epochs),
                    "--batch-size", "32", "--lr", "3e-3", "--num-workers", "0", "--eval-every", "1",
                    "--output-dir", str(run)])
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="demo folder (replaced on every run: it is scratch)")
    p.add_argument("--epochs", type=int, default=5, help="xGQA's paper epoch count")
    args = p.parse_args()
    start, out = time.time(), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(__doc__)
    tokenizer, features = prepare_inputs(out)
    runs = [train(policy, out, tokenizer, features, args.epochs) for policy in ("full", "suf")]
    for run in runs:
        eval_zeroshot.main(["evaluate", "--run", str(run), "--split", EVAL_SPLIT, "--num-workers", "0"])
    eval_zeroshot.main(["table", "--split", EVAL_SPLIT, *map(str, runs)])
    plots = eval_zeroshot.plot_curves(runs, out / "figures")
    print("\nper-epoch plots:", ", ".join(map(str, plots)))
    print(f"demo finished in {time.time() - start:.0f} s. Tiny random model: these numbers mean nothing; "
          "see README for the real commands.")


if __name__ == "__main__":
    main()
