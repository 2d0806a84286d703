"""What a run costs before you start it: ESTIMATES from counted FLOPs, not measurements.

For the base-size models (train_*.CONFIGS["base"], built on the meta device: nothing is computed) torch's
FlopCounterMode counts the forward + backward FLOPs of one training sample:
  UC2  xGQA batch (36 regions + the global feature, 24 text tokens; the answer head over 1,842 answers),
  CCLM XVNLI batch (384 px, 24 text tokens; xGQA adds the 6-layer answer decoder, xFlickrCo the ITM
       negatives: both cost more per sample than this row),
  and MaRVL's two-image models (one sample = one NLVR2 pair: UC2 [B,2,...] in VOLTA's nlvr layout, the caption
  with each image's 37 regions; CCLM 2B images of 384 px, text and cross encoders once per image).
Time per 100,000 training samples = FLOPs / (assumed 40% of the bf16 dense peak: A100 312, H100 989 TFLOP/s);
multiply by your training-set size (`python -m checks.inventory --data-root DIR` prints it) and the epochs. Evaluation
is extra (see README: per-epoch evaluation is off by default).
Memory: float32 weights + gradients + AdamW's two moments (16 bytes per trainable parameter, 4 per frozen
one) under full fine-tuning and in SUF's first stage (k = 3); activations are NOT included (they grow with
the micro-batch: lower --micro-batch-size if a step does not fit).

Per experiment (the Table 1 and MaRVL make targets, docs/reproducing.md's tables): training = the paper's training-set
size x epochs x the counted FLOPs of one training sample of that task; evaluation = the test sets of IGLUE's
languages x the counted forward FLOPs per test example (UC2 xFlickrCo: every caption-image pair; CCLM xFlickrCo:
every image and caption encoded once, then k = 128 ITM pairs per image and per caption; MaRVL: English NLVR2
test-P and the 5 MaRVL languages, each pair once), once per epoch (--eval-every 1, what the targets pass) or once
at the end. CCLM xGQA counts the XVNLI-style sample (its answer decoder adds more: a lower bound) and CCLM
xFlickrCo the ITC pass plus 3 ITM pairs per sample. Assumed: 40% of the bf16 peak throughout (evaluation included;
float32 evaluation without TF32 is far slower). MaRVL (IGLUE's 4th task, not in the paper) gets its own table
(docs/reproducing.md#marvl), one pair = one training sample.

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


def uc2_model_and_batch(task: str = "xgqa"):
    """The base UC2 model of `task` and a training batch of N samples, 37 regions (36 + the global feature) per
    image: grouped [N,4,...] for xFlickrCo (VOLTA's 1 positive + 3 negatives), [N,2,...] for MaRVL (VOLTA's
    nlvr layout: the caption with the left, then the right image)."""
    cfg = dict(train_uc2.CONFIGS["base"])
    model = train_uc2.build_model(task, cfg)
    group = {"xflickrco": (N, 4), "marvl": (N, 2)}.get(task, (N,))
    batch = {
        "input_ids": torch.ones(*group, L, dtype=torch.long),
        "attention_mask": torch.ones(*group, L, dtype=torch.long),
        "features": torch.empty(*group, 37, cfg["v_feature_size"]),
        "spatials": torch.empty(*group, 37, cfg["num_locs"]),
        "image_mask": torch.ones(*group, 37, dtype=torch.long),
        "target": torch.zeros(N, {"xgqa": cfg["num_answers"], "xvnli": 3, "marvl": 2}.get(task, 1)),
        "label": torch.zeros(N, dtype=torch.long),
    }
    return model, train_uc2.layer_layout(task, cfg), batch


def cclm_model_and_batch(task: str = "xvnli"):
    """The base CCLM model of `task` and a batch of N samples; MaRVL's holds 2N images (all left, then all right:
    X2-VLM's MARVL.py torch.cat([image0, image1]))."""
    cfg = dict(train_cclm.CONFIGS["base"])
    model = train_cclm.build_model(task, cfg)
    images = 2 * N if task == "marvl" else N
    batch = {
        "images": torch.empty(images, 3, cfg["image_res"], cfg["image_res"]),
        "text_ids": torch.ones(N, L, dtype=torch.long),
        "text_atts": torch.ones(N, L, dtype=torch.long),
        "label": torch.zeros(N, dtype=torch.long),
    }
    return model, train_cclm.layer_layout(task, cfg), batch


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
# MaRVL (not in the paper): English training = NLVR2 train, 86,373 pairs (the NLVR2 paper, Suhr et al., ACL 2019,
# its split statistics; IGLUE's stored nlvr2/train.jsonl is a large-file pointer, not counted here); test pairs per
# language, counted on IGLUE's files (the IGLUE sample's README): English = NLVR2 test-P 6,967 (that paper's number
# too), MaRVL id 1,128, sw 1,108, ta 1,242, tr 1,180, zh 1,012. Epochs differ by model: UC2 20 (IGLUE's NLVR2
# config), CCLM 10 (CCLM's MaRVL run), train_*.DEFAULTS[("paper", "marvl")].
MARVL_TEST = {"en": 6_967, "id": 1_128, "sw": 1_108, "ta": 1_242, "tr": 1_180, "zh": 1_012}
TRAIN = {"xgqa": 943_000, "xvnli": 541_000, "xflickrco": 145_000, "marvl": 86_373}
TEST = {"xgqa": 9_666, "xvnli": 1_164, "xflickrco": 2_000, "marvl": MARVL_TEST}  # marvl: per language
LANGS = {"xgqa": 8, "xvnli": 5, "xflickrco": 8, "marvl": len(MARVL_TEST)}  # English + the target languages
EPOCHS = {"xgqa": 5, "xvnli": 10, "xflickrco": 10, "marvl": {"uc2": 20, "cclm": 10}}  # marvl: per model
TABLE1 = ("xgqa", "xvnli", "xflickrco")  # the paper's Table 1; MaRVL's rows are a table of their own
K_TEST = 128  # CCLM's ITM re-rank: candidates per image and per caption


def epochs(model: str, task: str) -> int:
    e = EPOCHS[task]
    return e[model] if isinstance(e, dict) else e


def uc2_costs(task: str) -> tuple[float, float]:
    """(training FLOPs per sample, forward FLOPs per test example or caption-image pair) of UC2 on `task`; MaRVL:
    per pair (both images)."""
    with torch.device("meta"):
        model, _, batch = uc2_model_and_batch(task)
        lead = batch["input_ids"].dim() - 1
        flat = {k: v.flatten(0, lead - 1) for k, v in batch.items() if k not in ("target", "label")}
        model.train()
        train = _common.flops(lambda: model.loss(batch).backward()) / N
        model.eval()
        with torch.no_grad():
            test = _common.flops(lambda: model(**flat)) / (flat["input_ids"].shape[0] if task == "xflickrco" else N)
    return train, test


def cclm_marvl_costs() -> tuple[float, float]:
    """(training FLOPs per NLVR2 pair, forward FLOPs per test pair) of CCLM on MaRVL."""
    with torch.device("meta"):
        model, _, batch = cclm_model_and_batch("marvl")
        model.train()
        train = _common.flops(lambda: model.loss(batch).backward()) / N
        model.eval()
        with torch.no_grad():
            test = _common.flops(lambda: model.logits(batch)) / N
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
    """FLOPs of each Table 1 experiment and of MaRVL's: training, one evaluation of every language, and the run's
    total with the evaluation after every epoch (the make targets) or only after the last."""
    c = cclm_costs()
    rows = []
    for model in ("uc2", "cclm"):
        for task in (*TABLE1, "marvl"):
            n, langs, n_epochs = TEST[task], LANGS[task], epochs(model, task)
            if task == "marvl":  # languages of different sizes: each test pair of each language once
                train, test = uc2_costs(task) if model == "uc2" else cclm_marvl_costs()
                one_eval = sum(n.values()) * test
            elif model == "uc2":
                train, test = uc2_costs(task)
                one_eval = langs * n * (n if task == "xflickrco" else 1) * test
            else:
                # xFlickrCo training: the ITC pass (image and caption encoded) and 3 ITM pairs per sample, backward
                # included (x3); the evaluation encodes the test images once for all languages (they share them)
                pair = c["itm_pair"] + c["image_kv"]
                train = c["train"] if task != "xflickrco" else 3 * (c["image"] + c["text"] + 3 * pair)
                per_lang = n * (c["text"] + c["image_kv"]) + 2 * n * K_TEST * c["itm_pair"]
                one_eval = n * c["image"] + langs * per_lang if task == "xflickrco" else langs * n * c["test"]
            training, evals = TRAIN[task] * n_epochs * train, make_target_evaluations(model, task)
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "epochs": n_epochs,
                    "lower_bound": model == "cclm" and task == "xgqa",
                    "train_flops_per_sample": train,
                    "training_flops": training,
                    "one_evaluation_flops": one_eval,
                    "hours": {
                        gpu: {
                            "training": training / (peak * MFU) / 3600,
                            "evaluation_every_epoch": n_epochs * one_eval / (peak * MFU) / 3600,
                            "evaluation_make_target": evals * one_eval / (peak * MFU) / 3600,
                            "evaluation_at_the_end": one_eval / (peak * MFU) / 3600,
                        }
                        for gpu, peak in GPUS.items()
                    },
                }
            )
    return rows


def make_target_evaluations(model: str, task: str) -> float:
    """Evaluations (in units of one evaluation of every language) the make target runs: every epoch, except that
    xFlickrCo evaluates English (XFLICKRCO_EPOCH_LANGS=en) before its last epoch and every language after it."""
    e = epochs(model, task)
    return e if task != "xflickrco" else (e - 1) / LANGS[task] + 1


def hours(x: float) -> str:
    return "< 0.01" if x < 0.01 else f"{x:.2f}" if x < 10 else f"{x:.0f}"


def experiment_table(runs: list[dict], tasks: tuple[str, ...] = TABLE1) -> str:
    """docs/reproducing.md's tables: GPU hours per experiment of `tasks` (one GPU; n GPUs: about 1/n): Table 1's,
    and MaRVL's (tasks=("marvl",))."""
    out = [
        "| experiment | training A100 / H100 | evaluation as the make target runs it | every language every epoch "
        "| at the end only |",
        "|---|---|---|---|---|",
    ]
    for r in (r for r in runs if r["task"] in tasks):
        a, h, bound = r["hours"]["A100"], r["hours"]["H100"], "≥ " if r["lower_bound"] else ""
        cells = [
            f"{bound}{hours(a[k])} / {hours(h[k])}"
            for k in ("training", "evaluation_make_target", "evaluation_every_epoch", "evaluation_at_the_end")
        ]
        epochs_note = f" ({r['epochs']} epochs)" if r["task"] == "marvl" else ""  # they differ by model
        out.append(f"| `make {r['task']}-{{full,suf}} MODEL={r['model']}`{epochs_note} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(_common.RESULTS / "run_cost.json"))
    args = p.parse_args(argv)
    rows = [
        estimate("UC2 xGQA", uc2_model_and_batch),
        estimate("CCLM XVNLI", cclm_model_and_batch),
        estimate("UC2 MaRVL (a pair of images)", lambda: uc2_model_and_batch("marvl")),
        estimate("CCLM MaRVL (a pair of images)", lambda: cclm_model_and_batch("marvl")),
    ]
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
    print(experiment_table(runs, ("marvl",)))
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
