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

Per experiment (the Table 1 make targets, docs/reproducing.md's table): training = the paper's training-set
size x epochs x the counted FLOPs of one training sample of that task; evaluation = the test sets of IGLUE's
languages x the counted forward FLOPs per test example (UC2 xFlickrCo: every caption-image pair; CCLM xFlickrCo:
every image and caption encoded once, then k = 128 ITM pairs per image and per caption), once per epoch
(--eval-every 1, what the targets pass) or once at the end. CCLM xGQA counts the XVNLI-style sample (its
answer decoder adds more: a lower bound) and CCLM xFlickrCo the ITC pass plus 3 ITM pairs per sample. Assumed:
40% of the bf16 peak throughout (evaluation included; float32 evaluation without TF32 is far slower).

    python -m bench.run_cost [--out bench/results/run_cost.json]
"""

from __future__ import annotations

import argparse
import sys

import torch

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
    flops = _common.flops(lambda: model.loss(batch).backward()) / N
    return {
        "model": name,
        "train_flops_per_sample": flops,
        "hours_per_100k_samples": {gpu: 1e5 * flops / (peak * MFU) / 3600 for gpu, peak in GPUS.items()},
        "memory_gib_weights_grads_adamw": {p: memory_bytes(model, layout, p) / 2**30 for p in ("full", "suf")},
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# The paper's data (IGLUE's files): English training examples, test examples per language (xFlickrCo: images and
# captions), epochs of the paper's recipe (train_*.DEFAULTS). Check yours: python -m checks.inventory --data-root DIR.
# Sizes as counted on the real files (the IGLUE sample's README): GQA train 943K questions, XVNLI en/train.jsonl 541K
# pairs, Flickr30k train_ann 145K captions; XVNLI test 1,164 pairs and xFlickrCo test 2,000 images per language.
TRAIN = {"xgqa": 943_000, "xvnli": 541_000, "xflickrco": 145_000}
TEST = {"xgqa": 9_666, "xvnli": 1_164, "xflickrco": 2_000}
LANGS = {"xgqa": 8, "xvnli": 5, "xflickrco": 8}  # English + IGLUE's target languages (formats.iglue.TARGET_LANGS)
EPOCHS = {"xgqa": 5, "xvnli": 10, "xflickrco": 10}
K_TEST = 128  # CCLM's ITM re-rank: candidates per image and per caption


def uc2_costs(task: str) -> tuple[float, float]:
    """(training FLOPs per sample, forward FLOPs per test example or caption-image pair) of UC2 on `task`."""
    cfg = dict(train_uc2.CONFIGS["base"])
    with torch.device("meta"):
        model = train_uc2.build_model(task, cfg)
        group = (N, 4) if task == "xflickrco" else (N,)  # VOLTA's retrieval sample: 1 positive + 3 negatives
        batch = {
            "input_ids": torch.ones(*group, L, dtype=torch.long),
            "attention_mask": torch.ones(*group, L, dtype=torch.long),
            "features": torch.empty(*group, 37, cfg["v_feature_size"]),
            "spatials": torch.empty(*group, 37, cfg["num_locs"]),
            "image_mask": torch.ones(*group, 37, dtype=torch.long),
            "target": torch.zeros(N, {"xgqa": cfg["num_answers"], "xvnli": 3}.get(task, 1)),
        }
        flat = {k: v.flatten(0, len(group) - 1) for k, v in batch.items() if k != "target"}
        model.train()
        train = _common.flops(lambda: model.loss(batch).backward()) / N
        model.eval()
        with torch.no_grad():
            test = _common.flops(lambda: model(**flat)) / flat["input_ids"].shape[0]
    return train, test


def cclm_costs() -> dict:
    """Counted FLOPs of CCLM's pieces: a training sample (XVNLI), a test example's forward, one image / one caption
    encoded, and one ITM pair scored with its image's keys/values (per image: those keys/values)."""
    cfg = dict(train_cclm.CONFIGS["base"])
    with torch.device("meta"):
        model, _, batch = cclm_model_and_batch()
        retrieval = train_cclm.build_model("xflickrco", cfg)
        model.train()
        train = _common.flops(lambda: model.loss(batch).backward()) / N
        model.eval()
        retrieval.eval()
        with torch.no_grad():
            test = _common.flops(lambda: model.logits(batch)) / N
            image = _common.flops(lambda: retrieval.encode_images(batch["images"])) / N
            text = _common.flops(lambda: retrieval.encode_texts(batch["text_ids"], batch["text_atts"])) / N
            v, _ = retrieval.encode_images(batch["images"][:1])
            t, _ = retrieval.encode_texts(batch["text_ids"], batch["text_atts"])
            kv_flops = _common.flops(lambda: retrieval.itm_image_kv(v))
            kv = retrieval.itm_image_kv(v)
            pair = _common.flops(lambda: retrieval.itm_scores_with_image_kv(t, batch["text_atts"], kv)) / N
    return {"train": train, "test": test, "image": image, "text": text, "image_kv": kv_flops, "itm_pair": pair}


def experiments() -> list[dict]:
    """FLOPs of each Table 1 experiment: training, one evaluation of every language, and the run's total with the
    evaluation after every epoch (the make targets) or only after the last."""
    c = cclm_costs()
    rows = []
    for model in ("uc2", "cclm"):
        for task in ("xgqa", "xvnli", "xflickrco"):
            n, langs = TEST[task], LANGS[task]
            if model == "uc2":
                train, test = uc2_costs(task)
                one_eval = langs * n * (n if task == "xflickrco" else 1) * test
            else:
                # xFlickrCo training: the ITC pass (image and caption encoded) and 3 ITM pairs per sample, backward
                # included (x3); the evaluation encodes the test images once for all languages (they share them)
                pair = c["itm_pair"] + c["image_kv"]
                train = c["train"] if task != "xflickrco" else 3 * (c["image"] + c["text"] + 3 * pair)
                per_lang = n * (c["text"] + c["image_kv"]) + 2 * n * K_TEST * c["itm_pair"]
                one_eval = n * c["image"] + langs * per_lang if task == "xflickrco" else langs * n * c["test"]
            training = TRAIN[task] * EPOCHS[task] * train
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "lower_bound": model == "cclm" and task == "xgqa",
                    "train_flops_per_sample": train,
                    "training_flops": training,
                    "one_evaluation_flops": one_eval,
                    "hours": {
                        gpu: {
                            "training": training / (peak * MFU) / 3600,
                            "evaluation_every_epoch": EPOCHS[task] * one_eval / (peak * MFU) / 3600,
                            "evaluation_make_target": make_target_evaluations(task) * one_eval / (peak * MFU) / 3600,
                            "evaluation_at_the_end": one_eval / (peak * MFU) / 3600,
                        }
                        for gpu, peak in GPUS.items()
                    },
                }
            )
    return rows


def make_target_evaluations(task: str) -> float:
    """Evaluations (in units of one evaluation of every language) the make target runs: every epoch, except that
    xFlickrCo evaluates English (XFLICKRCO_EPOCH_LANGS=en) before its last epoch and every language after it."""
    return EPOCHS[task] if task != "xflickrco" else (EPOCHS[task] - 1) / LANGS[task] + 1


def hours(x: float) -> str:
    return "< 0.01" if x < 0.01 else f"{x:.2f}" if x < 10 else f"{x:.0f}"


def experiment_table(runs: list[dict]) -> str:
    """docs/reproducing.md's table: GPU hours per Table 1 experiment (one GPU; n GPUs: about 1/n)."""
    out = [
        "| experiment | training A100 / H100 | evaluation as the make target runs it | every language every epoch "
        "| at the end only |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        a, h, bound = r["hours"]["A100"], r["hours"]["H100"], "≥ " if r["lower_bound"] else ""
        cells = [
            f"{bound}{hours(a[k])} / {hours(h[k])}"
            for k in ("training", "evaluation_make_target", "evaluation_every_epoch", "evaluation_at_the_end")
        ]
        out.append(f"| `make {r['task']}-{{full,suf}} MODEL={r['model']}` | " + " | ".join(cells) + " |")
    return "\n".join(out)


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
    runs = experiments()
    print(experiment_table(runs))
    out = {
        **_common.run_info(),
        "torch": torch.__version__,
        "mfu": MFU,
        "peak": GPUS,
        "estimates": rows,
        "data": {"train": TRAIN, "test": TEST, "langs": LANGS, "epochs": EPOCHS, "k_test": K_TEST},
        "experiments": runs,
    }
    _common.write_result(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
