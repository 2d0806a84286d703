"""Dynamic padding savings: text tokens the encoder processes when each batch is padded to its own longest
sequence (data.encode_texts, what UC2Collate / CCLMCollate do) vs padded to the task's maximum length.

Texts: the evaluation split of every task and language in the IGLUE sample (tests/fixtures/iglue), in file
order, cut into batches of --batch-size, truncated/cleaned exactly as each model's collate does
(data.MAX_TEXT_LEN; CCLM: pre_question/pre_caption first). The fixed-length baseline pads to
MAX_TEXT_LEN, or, where the reference does not truncate (CCLM xGQA/XVNLI evaluation), to the longest
sequence of the split. Tokenizer: --tokenizer (e.g. a local xlm-roberta-base folder) if given, else a
Unigram tokenizer trained on the sample's own texts (no XLM-R files can be fetched here), which segments
more finely than XLM-R's 250k vocabulary: the absolute lengths differ, the ratios are indicative.

    .venv/bin/python bench/padding.py [--tokenizer DIR] [--batch-size 128] [--out bench/results/padding.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from formats import run_folder  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "iglue"
EVAL_SPLIT = {"xgqa": "dev", "xvnli": "test", "xflickrco": "test"}


def model_texts(model: str, task: str, examples: list[data.Example]) -> list[str]:
    """The strings each model's eval collate tokenises."""
    if model == "uc2":
        return [ex.text for ex in examples]
    keep = [ex for ex in examples if not (task == "xvnli" and ex.gold == data.XVNLI_NO_GOLD)]  # CCLMDataset drops them
    clean = data.pre_question if task == "xgqa" else data.pre_caption
    return [clean(ex.text, data.CCLM_MAX_WORDS[(task, False)]) for ex in keep]


def padding_counts(tokenizer, texts: list[str], max_len: int | None, batch_size: int) -> dict:
    """real / dynamically padded tokens from data.encode_texts batch by batch; fixed = examples x fixed length."""
    real = dynamic = longest = 0
    for i in range(0, len(texts), batch_size):
        ids, mask = data.encode_texts(tokenizer, texts[i : i + batch_size], max_len)
        real += int(mask.sum())
        dynamic += ids.numel()
        longest = max(longest, ids.shape[1])
    fixed_len = max_len if max_len is not None else longest
    return {
        "examples": len(texts),
        "fixed_len": fixed_len,
        "real_tokens": real,
        "dynamic_tokens": dynamic,
        "fixed_tokens": len(texts) * fixed_len,
    }


def summarize(tok, model: str, task: str, splits: dict, batch_size: int) -> dict:
    """One (model, task) row over every language of the task's evaluation split."""
    max_len = data.MAX_TEXT_LEN[(model, task, False)]
    per_lang = {
        lang: padding_counts(tok, model_texts(model, task, exs), max_len, batch_size)
        for (t, lang), exs in splits.items()
        if t == task
    }
    total = {
        k: sum(r[k] for r in per_lang.values()) for k in ("examples", "real_tokens", "dynamic_tokens", "fixed_tokens")
    }
    # batches never mix languages: a batch size >= every language's example count is one batch per language
    one_batch = batch_size >= max(r["examples"] for r in per_lang.values())
    return {
        "model": model,
        "task": task,
        "split": EVAL_SPLIT[task],
        "batch_size": batch_size,
        "one_batch_per_lang": one_batch,
        "langs": sorted(per_lang),
        "max_len": max_len,
        **total,
        "saving": 1 - total["dynamic_tokens"] / total["fixed_tokens"],
        "padding_share_dynamic": 1 - total["real_tokens"] / total["dynamic_tokens"],
        "padding_share_fixed": 1 - total["real_tokens"] / total["fixed_tokens"],
        "per_lang": per_lang,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(SAMPLE), help="IGLUE folder (default: the shipped sample)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder / cached hub id (default: one trained on the texts)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[32, 128],
        help="batch sizes (128: train_uc2 --eval-batch-size default; 32: a typical per-GPU micro-batch)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "padding.json"))
    args = p.parse_args(argv)

    splits = {
        (task, lang): data.load_split(args.data_root, task, EVAL_SPLIT[task], lang)
        for task in data.TASKS
        for lang in data.available_langs(args.data_root, task, EVAL_SPLIT[task])
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.tokenizer:
            tok, tok_name = data.load_tokenizer(args.tokenizer), args.tokenizer
        else:
            texts = [t for (task, _), exs in splits.items() for m in ("uc2", "cclm") for t in model_texts(m, task, exs)]
            tok = data.make_tiny_tokenizer(texts, tmp, vocab_size=8000)
            tok_name = f"Unigram trained on the sample's eval texts ({len(tok)} ids; XLM-R not available offline)"
    rows = []
    for batch_size in args.batch_size:
        for model in ("uc2", "cclm"):
            for task in data.TASKS:
                rows.append(summarize(tok, model, task, splits, batch_size))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {
            "tokenizer": tok_name,
            "batch_sizes": args.batch_size,
            "data_root": str(args.data_root),
            "order": "file order (evaluation loaders do not shuffle)",
            "fixed_len": "data.MAX_TEXT_LEN; None (no truncation) -> the split's longest sequence",
        },
        "rows": rows,
    }
    print(f"tokenizer: {tok_name}")
    print(
        f"{'batch':>5} {'model':5} {'task':9} {'max_len':>7} {'examples':>8} {'real':>8} {'dynamic':>8} "
        f"{'fixed':>8} {'saving':>7}"
    )
    for r in rows:
        print(
            f"{r['batch_size']:>5} {r['model']:5} {r['task']:9} {str(r['max_len']):>7} {r['examples']:>8} "
            f"{r['real_tokens']:>8} "
            f"{r['dynamic_tokens']:>8} {r['fixed_tokens']:>8} {r['saving']:>7.1%}"
        )
    out = Path(args.out)
    run_folder.atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
