"""Evaluation under autocast (the run's --amp) against float32: how much the scores and rankings move.

engine.train evaluates under the run's AMP dtype (bf16 on GPUs that have it). This measures, side by side
in one run on this CPU (bf16 autocast exists on CPU too), the retrieval score matrices of randomly
initialised tiny UC2 and CCLM models (tests/fixtures/configs, bench/retrieval.py's random inputs) in
float32 and under bf16 autocast:
  rel_max_diff   max |score_bf16 - score_fp32| / (max - min of the fp32 scores)
  top1_agree     fraction of captions whose best image is the same in both (image retrieval R@1 view)
  recall deltas  R@1/5/10 (TR and IR) bf16 minus fp32, caption i belonging to image i
Random weights give near-tied scores, the hardest case for agreement; trained models separate their scores
more. Also times both (a CPU's bf16 speed says nothing about a GPU's).

    python -m bench.eval_precision [--quick] [--out bench/results/eval_precision.json]
"""

from __future__ import annotations

import argparse
import sys

import torch

import train_cclm
import train_uc2
from bench import _common
from bench.retrieval import random_captions, uc2_inputs
from scoring import retrieval_protocols
import scoring.metrics


def compare(fp32: tuple[torch.Tensor, torch.Tensor], low: tuple[torch.Tensor, torch.Tensor], unscored=None) -> dict:
    """fp32/low: (score_i2t [n_img, n_txt], score_t2i [n_txt, n_img]); caption i belongs to image i."""
    n = fp32[0].shape[0]
    scored = fp32[1] != train_cclm.UNSCORED if unscored is not None else torch.ones_like(fp32[1], dtype=torch.bool)
    ref = fp32[1][scored]
    diff = (low[1][scored] - ref).abs().max().item()
    a = scoring.metrics.recall_metrics(*fp32, range(n), unscored=unscored)
    b = scoring.metrics.recall_metrics(*low, range(n), unscored=unscored)
    return {
        "rel_max_diff": diff / max((ref.max() - ref.min()).item(), 1e-12),
        "top1_agree": (fp32[1].argmax(1) == low[1].argmax(1)).double().mean().item(),
        "recall_delta": {k: b[k] - a[k] for k in a if k.endswith(("_r1", "_r5", "_r10"))},
    }


def bench_uc2(n: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = train_uc2.build_model("xflickrco", train_uc2.resolve_config(_common.UC2_TINY)).eval()
    images, texts = uc2_inputs(n, 36, model.config["vocab_size"], gen)
    out = {}
    for amp in ("off", "bf16"):
        s, out[f"seconds_{amp}"] = _common.timed(
            lambda: retrieval_protocols.score_all_pairs(model, images, texts, pair_batch=256, amp=amp)
        )
        out[amp] = (s.t(), s)
    return {"images": n, **compare(out.pop("off"), out.pop("bf16")), **out}


def bench_cclm(n: int, k: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    cfg = train_cclm.resolve_config(_common.CCLM_TINY)
    model = train_cclm.build_model("xflickrco", cfg).eval()
    images = torch.randn(n, 3, cfg["image_res"], cfg["image_res"], generator=gen)
    ids, atts = random_captions(n, cfg["vocab_size"], gen)
    img = [{"images": images[s : s + 16]} for s in range(0, n, 16)]
    txt = [{"text_ids": ids[s : s + 16], "text_atts": atts[s : s + 16]} for s in range(0, n, 16)]
    out = {}
    for amp in ("off", "bf16"):
        out[amp], out[f"seconds_{amp}"] = _common.timed(
            lambda: retrieval_protocols.rerank_scores(model, img, txt, 0, n, n, k=k, amp=amp)
        )
    return {"images": n, "k": k, **compare(out.pop("off"), out.pop("bf16"), unscored=train_cclm.UNSCORED), **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--out", default=str(_common.RESULTS / "eval_precision.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 16 if args.quick else 64
    res = {"uc2": bench_uc2(n), "cclm": bench_cclm(n, k=8 if args.quick else 16)}
    for name, r in res.items():
        worst = max(abs(v) for v in r["recall_delta"].values())
        print(
            f"{name} tiny random, {r['images']} images: bf16 autocast vs fp32: max score change "
            f"{r['rel_max_diff']:.2%} of the score range, best image agrees for {r['top1_agree']:.1%} of captions, "
            f"largest recall change {worst:.2f} points; time fp32 {r['seconds_off']:.2f} s, bf16 "
            f"{r['seconds_bf16']:.2f} s"
        )
    out = {
        **_common.run_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        **res,
    }
    _common.write_result(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
