"""What a run costs before you start it: ESTIMATES from counted FLOPs, not measurements.

For the base-size models (train_*.CONFIGS["base"], built on the meta device: nothing is computed) torch's
FlopCounterMode counts the forward + backward FLOPs of one training sample:
  UC2  xGQA batch (36 regions + the global feature, 24 text tokens; the answer head over 1,842 answers),
  CCLM XVNLI batch (384 px, 24 text tokens; xGQA adds the 6-layer answer decoder, xFlickrCo the ITM
       negatives: both cost more per sample than this row).
Time per 100,000 training samples = FLOPs / (assumed 40% of the bf16 dense peak: A100 312, H100 989 TFLOP/s);
multiply by your training-set size (`python -m checks.inventory --data-root DIR` prints it) and the epochs. Evaluation
is extra (see README: per-epoch evaluation is off by default).
Memory: float32 weights + gradients + AdamW's two moments (16 bytes per trainable parameter, 4 per frozen
one) under full fine-tuning and in SUF's first stage (k = 3); activations are NOT included (they grow with
the micro-batch: lower --micro-batch-size if a step does not fit).

    python -m bench.run_cost [--out bench/results/run_cost.json]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import freeze
import train_cclm
import train_uc2
from bench import _common

GPUS = {"A100": 312e12, "H100": 989e12}  # bf16 dense peak FLOP/s
MFU = 0.4  # assumed sustained fraction of the peak
N, L = 2, 24  # samples counted, text tokens


def uc2_model_and_batch():
    cfg = dict(train_uc2.CONFIGS["base"])
    model = train_uc2.build_model("xgqa", cfg)
    batch = {
        "input_ids": torch.ones(N, L, dtype=torch.long),
        "attention_mask": torch.ones(N, L, dtype=torch.long),
        "features": torch.empty(N, 37, cfg["v_feature_size"]),
        "spatials": torch.empty(N, 37, cfg["num_locs"]),
        "image_mask": torch.ones(N, 37, dtype=torch.long),
        "target": torch.zeros(N, cfg["num_answers"]),
        "label": torch.zeros(N, dtype=torch.long),
    }
    return model, train_uc2.layer_layout("xgqa", cfg), batch


def cclm_model_and_batch():
    cfg = dict(train_cclm.CONFIGS["base"])
    model = train_cclm.build_model("xvnli", cfg)
    batch = {
        "images": torch.empty(N, 3, cfg["image_res"], cfg["image_res"]),
        "text_ids": torch.ones(N, L, dtype=torch.long),
        "text_atts": torch.ones(N, L, dtype=torch.long),
        "label": torch.zeros(N, dtype=torch.long),
    }
    return model, train_cclm.layer_layout("xvnli", cfg), batch


def memory_bytes(model: torch.nn.Module, layout: freeze.LayerLayout, policy: str) -> int:
    schedule = freeze.Schedule(policy, layout.num_layers)
    freeze.apply_schedule(model, layout, schedule, epoch=0)
    return sum(p.numel() * (16 if p.requires_grad else 4) for p in model.parameters())


def estimate(name: str, build) -> dict:
    with torch.device("meta"):
        model, layout, batch = build()
    model.train()
    with FlopCounterMode(display=False) as counter:
        model.loss(batch).backward()
    flops = counter.get_total_flops() / N
    return {
        "model": name,
        "train_flops_per_sample": flops,
        "hours_per_100k_samples": {gpu: 1e5 * flops / (peak * MFU) / 3600 for gpu, peak in GPUS.items()},
        "memory_gib_weights_grads_adamw": {p: memory_bytes(model, layout, p) / 2**30 for p in ("full", "suf")},
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(_common.RESULTS / "run_cost.json"))
    args = p.parse_args(argv)
    rows = [estimate("UC2 xGQA", uc2_model_and_batch), estimate("CCLM XVNLI", cclm_model_and_batch)]
    print(f"ESTIMATES (counted FLOPs at {MFU:.0%} of the bf16 peak; memory without activations):")
    for r in rows:
        h, m = r["hours_per_100k_samples"], r["memory_gib_weights_grads_adamw"]
        print(
            f"  {r['model']}: {r['train_flops_per_sample'] / 1e9:.0f} GFLOP per training sample; per 100k samples "
            f"A100 {h['A100'] * 60:.1f} min, H100 {h['H100'] * 60:.1f} min; weights+grads+AdamW "
            f"{m['full']:.1f} GiB full fine-tuning, {m['suf']:.1f} GiB in SUF's first stage "
            f"({r['parameters'] / 1e6:.0f}M parameters)"
        )
    out = {
        **_common.run_info(),
        "torch": torch.__version__,
        "mfu": MFU,
        "peak": GPUS,
        "estimates": rows,
    }
    _common.write_result(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
