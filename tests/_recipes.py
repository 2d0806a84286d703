"""Tiny training recipes whose per-step losses tests/test_recipe_losses.py pins (torchtune's recipe tests, here
on CPU): each runs the real train_uc2.main / train_cclm.main for 2 epochs x 3 optimizer steps and reads the
loss of every step from the run's metrics.jsonl (--log-every 1).

Inputs: the IGLUE annotation sample (tests/fixtures/iglue), the tiny tokenizer shipped in
tests/fixtures/recipes/tokenizer (shipped, not trained at test time, so a `tokenizers` release that trains
differently cannot move the pins) and synthetic region features / images written by data.py's seeded writers.

Regenerate the pins (only when behaviour changes on purpose; see tests/fixtures/recipes/README.md):
    python tests/_recipes.py --regen
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as tests/conftest.py: the pins are one-thread numbers
    os.environ.setdefault(_var, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import _configs  # noqa: E402
import data  # noqa: E402
from synthetic import fixtures  # noqa: E402
import train_cclm  # noqa: E402
import train_uc2  # noqa: E402

IGLUE = ROOT / "tests" / "fixtures" / "iglue"
FIXTURES = ROOT / "tests" / "fixtures" / "recipes"
TOKENIZER = FIXTURES / "tokenizer"
EXPECTED = FIXTURES / "expected_losses.json"
REGIONS = 4
TRAINERS = {"uc2": train_uc2.main, "cclm": train_cclm.main}
# Each model's tiny config (tests/fixtures/configs), as --model-config.
MODEL_CONFIGS = {"uc2": _configs.UC2_TINY, "cclm": _configs.CCLM_TINY}
# Every run: 2 epochs (SUF's trainable set changes at epoch 2) x 3 steps, a loss record per step, the
# model's own dropout on, no per-epoch evaluation, random initialisation from --seed.
COMMON = [
    "--epochs",
    "2",
    "--max-steps-per-epoch",
    "3",
    "--log-every",
    "1",
    "--seed",
    "0",
    "--no-eval",
    "--num-workers",
    "0",
    "--amp",
    "off",
]
# name -> (model, flags). lr larger than the paper's so that 6 steps move a random tiny model measurably
# (a 1% lr change must leave the tolerance: test_a_one_percent_lr_change_fails_the_pin); UC2 xflickrco's
# triplet loss sits at its margin (0.2) from a random start and needs 3e-2 for that.
RECIPES = {
    "uc2_xgqa_full": (
        "uc2",
        ["--task", "xgqa", "--policy", "full", "--train-split", "testdev", "--batch-size", "8", "--lr", "1e-3"],
    ),
    "uc2_xgqa_suf": (
        "uc2",
        ["--task", "xgqa", "--policy", "suf", "--train-split", "testdev", "--batch-size", "8", "--lr", "1e-3"],
    ),
    "uc2_xflickrco_suf": (
        "uc2",
        ["--task", "xflickrco", "--policy", "suf", "--train-split", "valid", "--batch-size", "4", "--lr", "3e-2"],
    ),
    "cclm_xgqa_suf": (
        "cclm",
        [
            "--task",
            "xgqa",
            "--policy",
            "suf",
            "--train-split",
            "train_5",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--lr",
            "1e-4",
        ],
    ),
    "cclm_xflickrco_suf": (
        "cclm",
        [
            "--task",
            "xflickrco",
            "--policy",
            "suf",
            "--train-split",
            "valid",
            "--batch-size",
            "6",
            "--micro-batch-size",
            "3",
            "--lr",
            "1e-4",
        ],
    ),
}
TRAIN_SPLITS = {("xgqa", "testdev"), ("xgqa", "train_5"), ("xflickrco", "valid")}


def training_examples() -> list:
    return [ex for task, split in sorted(TRAIN_SPLITS) for ex in data.load_split(IGLUE, task, split, "en")]


def make_tokenizer() -> None:
    """The shipped tokenizer: trained once on the recipes' texts and xGQA's answers (CCLM generates them)."""
    _, answers = data.load_answer_vocab(IGLUE)
    fixtures.make_tiny_tokenizer([ex.text for ex in training_examples()] + answers, TOKENIZER, vocab_size=400)


def write_inputs(workdir: Path) -> None:
    """Synthetic region features (UC2) and images (CCLM) for every image of the recipes' training splits."""
    examples = training_examples()
    fixtures.write_synthetic_features(workdir / "features", {ex.image for ex in examples}, num_boxes=REGIONS)
    fixtures.write_synthetic_images(workdir / "images", sorted({ex.image_file for ex in examples}), size=(48, 40))


def argv(name: str, workdir: Path, out: Path, *extra: str) -> list[str]:
    model, flags = RECIPES[name]
    inputs = (
        ["--features", str(workdir / "features"), "--max-regions", str(REGIONS)]
        if model == "uc2"
        else ["--images", str(workdir / "images")]
    )
    return [
        "--model-config",
        MODEL_CONFIGS[model],
        *COMMON,
        *flags,
        "--data-root",
        str(IGLUE),
        "--tokenizer",
        str(TOKENIZER),
        *inputs,
        "--output-dir",
        str(out),
        *extra,
    ]


def step_losses(run: Path) -> list[tuple[int, float]]:
    """(optimizer step, loss) of every train record in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["type"] == "train"]


def run(name: str, workdir: Path, out: Path, *extra: str) -> list[tuple[int, float]]:
    """The recipe on the CPU (the pins are CPU float32 numbers, also on a machine with a GPU)."""
    before = os.environ.get("SUF_DEVICE")
    os.environ["SUF_DEVICE"] = "cpu"
    try:
        TRAINERS[RECIPES[name][0]](argv(name, workdir, out, *extra))
    finally:
        if before is None:
            del os.environ["SUF_DEVICE"]
        else:
            os.environ["SUF_DEVICE"] = before
    return step_losses(out)


def pinned_model_configs() -> dict[str, str]:
    """model -> its --model-config file relative to the repository root, as the pins record it."""
    return {model: Path(path).relative_to(ROOT).as_posix() for model, path in MODEL_CONFIGS.items()}


def regenerate(workdir: Path) -> dict:
    import numpy
    import PIL
    import tokenizers
    import torch

    write_inputs(workdir)
    pins = {name: {"flags": RECIPES[name][1], "steps": run(name, workdir, workdir / name)} for name in RECIPES}
    why = "only when behaviour changes on purpose: tests/fixtures/recipes/README.md"
    return {
        "regenerate": f"python tests/_recipes.py --regen ({why})",
        "produced_with": {
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "Pillow": PIL.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "model_configs": pinned_model_configs(),
        "common_flags": COMMON,
        "recipes": pins,
    }


def dumps(pins: dict) -> str:
    """JSON with one line per recipe, so a regeneration's diff shows which recipes moved."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in pins.items() if k != "recipes"]
    rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in pins["recipes"].items()]
    return "\n".join(["{", *head, ' "recipes": {', ",\n".join(rows), " }", "}"]) + "\n"


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regen", action="store_true", help=f"rewrite {EXPECTED.relative_to(ROOT)} from the current code")
    p.add_argument(
        "--tokenizer",
        action="store_true",
        help=f"also retrain {TOKENIZER.relative_to(ROOT)} (moves every pin: only with a reason)",
    )
    args = p.parse_args()
    if not args.regen:
        p.error("nothing to do without --regen")
    import torch

    torch.set_num_threads(1)  # as the suite runs (tests/conftest.py)
    if args.tokenizer or not TOKENIZER.exists():
        make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        pins = regenerate(Path(tmp))
    EXPECTED.write_text(dumps(pins))
    print(f"wrote {EXPECTED}")


if __name__ == "__main__":
    main()
