"""The prepared GPU check: what must hold before GPU hours are spent, in one run (< 5 minutes on one GPU).

    .venv/bin/python -m bench.gpu_check [--out bench/results/gpu_check.json] [--cpu]      (make gpu-check)

Sections (each one row per model / width / precision; the report's format: docs/benchmarks.md, "The GPU check"):
  steps        UC2 and CCLM, tiny and base width, training steps in float32, bf16 and fp16 (with the GradScaler)
               through the trainers' own pieces: train_*.build_model, engine.build_optimizer, engine.setup_amp,
               engine.forward_backward, engine.optimizer_step (one process).
  agreement    the same weights and batch (dropout off, eval mode): the loss on the CPU in float32 against the
               device in float32 (TF32 off) and under bf16 autocast, within the tolerances stated in TOLERANCE.
  suf_vs_full  step time and peak memory (torch.cuda.max_memory_allocated) of full fine-tuning and every SUF
               stage (bench/suf_step.schedules: with and without --freeze-embeddings; the CPU self-test: the first
               stage only), base width in bf16, each with a fresh AdamW (its state is what the stage trains),
               beside the counted-FLOP ratio (bench/suf_step.count_work).
  loader       the training loader (engine.build_train_loader, the real datasets and collates, synthetic features
               and images) in samples/s against what the GPU consumes (batch / full bf16 step time above).
  torchrun     a tiny train_uc2.py run (xGQA, SUF through a stage change) launched with
               `python -m torch.distributed.run --nproc_per_node <GPUs>` on the IGLUE sample in tests/fixtures/iglue
               (read as data) with synthetic features, in bf16 and fp16.
With no GPU (or --cpu) every section runs on the CPU at tiny size and says "device": "cpu"; what only a GPU can
do (base widths, peak memory, the GPU side of the agreement, NCCL) is recorded as skipped, with the reason. The
report is written whatever fails; exit status 1 when a section failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import data
from formats import tokenizer_check
import engine
import freeze
from bench import _common, suf_step
from synthetic import fixtures
from training import after_epoch, devices

ROOT = Path(__file__).resolve().parents[1]
IGLUE = ROOT / "tests" / "fixtures" / "iglue"  # the shipped IGLUE annotation sample, read as data
MODELS = ("uc2", "cclm")
PRECISIONS = ("off", "bf16", "fp16")  # engine.setup_amp's modes: float32, bf16 autocast, fp16 autocast + GradScaler

# Relative loss tolerances of the agreement section, |loss_device - loss_cpu| / max(1, |loss_cpu|):
#   float32: both sides round to float32 (unit roundoff 6e-8) but sum in different orders (MKL vs cuBLAS, math vs
#     fused attention); over ~30 layers that moves a loss by ~1e-6 relative. 1e-4 leaves 100x room and still catches
#     every real mismatch (dropout left on, a mask or dtype error moves a loss by > 1e-2). TF32 is off for it.
#   bf16: autocast rounds matmul inputs to 8 significant bits (unit roundoff 2^-9 = 2e-3), accumulating in float32;
#     softmax, layer norm and the loss stay float32. Independent roundings over a deep network average out to a few
#     1e-3 on the loss; 2e-2 is 10x bf16's roundoff: a loss further off means a layer outside autocast's rules.
FIRST_FROZEN = "suf stage 0 (epoch 1) +frozen emb"
TOLERANCE = {"float32": 1e-4, "bf16": 2e-2}
GPU_ONLY = {
    "base": "base width runs on a GPU only (the CPU self-test runs the tiny configs)",
    "memory": "peak memory is torch.cuda.max_memory_allocated: needs a GPU",
    "nccl": "NCCL needs >= 2 GPUs (torchrun on one GPU runs one process; on the CPU ranks talk over gloo)",
}


# ---------------------------------------------------------------- models and batches


def setup(name: str, width: str, batch: int, image_res: int):
    """(model on the CPU, layout, batch on the CPU) of the real trainer at `width` (tiny: tests/fixtures/configs,
    base: the trainer's base config with the full 250k vocabulary), via bench/suf_step.py's setups."""
    tiny, budget = width == "tiny", 1 << 60  # no memory cap: the configured vocabulary
    if name == "uc2":
        model, layout, b, _, info = suf_step.uc2_setup(tiny, batch, None, budget)
    else:
        model, layout, b, _, info = suf_step.cclm_setup(tiny, batch, None, budget, image_res)
    return model, layout, b, info


def optim_args(lr: float = 1e-5) -> argparse.Namespace:
    return argparse.Namespace(
        lr=lr, weight_decay=0.01, adam_eps=1e-8, adam_betas=[0.9, 0.999], warmup_ratio=0.0, adamw="reference"
    )  # the trainers' default --adamw


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def take_steps(model, layout, schedule, batch, device, precision: str, steps: int, max_tries: int) -> dict:
    """Real training steps (engine.forward_backward + engine.optimizer_step) with a fresh AdamW: `steps` applied
    updates, trying at most `max_tries` (fp16: the GradScaler skips steps until its scale fits the gradients)."""
    dist = devices.DistInfo(device=device)
    opt, lr_sched = engine.build_optimizer(model, layout, schedule, optim_args())
    amp_dtype, scaler = engine.setup_amp(precision, device)
    net = devices.wrap_for_training(model, dist, False)
    losses, times, applied, scaler_skipped, norms = [], [], 0, 0, []
    peak_reset(device)
    for _ in range(max_tries):
        sync(device)
        t0 = time.perf_counter()
        loss, n_bad = engine.forward_backward(net, iter([batch]), 1, amp_dtype, scaler, device)
        ok, amp_skipped, _, grad_norm = engine.optimizer_step(model, opt, lr_sched, scaler, 0.0, n_bad, dist)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item() if n_bad.item() == 0 else float("nan"))
        norms.append(grad_norm)
        scaler_skipped += amp_skipped
        applied += ok and not amp_skipped
        if applied >= steps:
            break
    out = {
        "losses": [round(x, 6) for x in losses],
        "finite": all(math.isfinite(x) for x in losses),
        "updates_applied": applied,
        "skipped_by_scaler": scaler_skipped,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),  # the first step allocates the state
        "peak_memory_bytes": peak(device),
    }
    del opt, net
    model.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------- sections


def section_steps(ctx: dict) -> dict:
    rows = []
    for name in MODELS:
        for width in ("tiny", "base"):
            if width == "base" and not ctx["gpu"]:
                rows += [skipped(name, width, p, GPU_ONLY["base"]) for p in PRECISIONS]
                continue
            batch_size = ctx["batch"][(name, width)]
            model, layout, batch, info = setup(name, width, batch_size, ctx["image_res"])
            init = {k: v.clone() for k, v in model.state_dict().items()}
            model.to(ctx["device"]).train()
            full = freeze.Schedule("full", layout.num_layers)
            freeze.apply_schedule(model, layout, full, 0)
            for precision in PRECISIONS:
                model.load_state_dict(init)
                try:
                    r = take_steps(model, layout, full, batch, ctx["device"], precision, 3, 30)
                except torch.cuda.OutOfMemoryError as e:
                    rows.append({**skipped(name, width, precision, f"out of memory: {e}"), "status": "failed"})
                    free(ctx["device"])
                    continue
                good = r["finite"] and r["updates_applied"] == 3
                rows.append(
                    {
                        "model": name,
                        "width": width,
                        "precision": precision,
                        "batch": batch_size,
                        "setup": info,
                        **r,
                        "samples_per_s": batch_size / r["step_s"],
                        "status": "ok" if good else "failed",
                    }
                )
            del model, init
            free(ctx["device"])
    return {"rows": rows}


def skipped(name: str, width: str, precision: str | None, reason: str) -> dict:
    row = {"model": name, "width": width, "status": "skipped", "reason": reason}
    return row if precision is None else {**row, "precision": precision}


def eval_loss(model, batch, device, dtype) -> float:
    with torch.no_grad(), after_epoch.tf32_matmuls(device, False), devices.autocast(device, dtype):
        return model.loss(devices.to_device(batch, device)).float().item()


def section_agreement(ctx: dict) -> dict:
    rows, device = [], ctx["device"]
    for name in MODELS:
        for width in ("tiny", "base"):
            if width == "base" and not ctx["gpu"]:
                rows.append(skipped(name, width, None, GPU_ONLY["base"]))
                continue
            torch.manual_seed(0)
            model, _, batch, _ = setup(name, width, 2, ctx["image_res"])
            model.eval()  # dropout and drop-path off: both sides compute the same function
            ref = eval_loss(model, batch, torch.device("cpu"), None)
            model.to(device)
            for label, dtype in (("float32", None), ("bf16", torch.bfloat16)):
                loss = eval_loss(model, batch, device, dtype)
                rel = abs(loss - ref) / max(1.0, abs(ref))
                rows.append(
                    {
                        "model": name,
                        "width": width,
                        "precision": label,
                        "loss_cpu_float32": ref,
                        "loss_device": loss,
                        "relative_difference": rel,
                        "tolerance": TOLERANCE[label],
                        "status": "ok" if rel <= TOLERANCE[label] else "failed",
                    }
                )
            del model
            free(device)
    note = None if ctx["gpu"] else "CPU self-test: the device side is the CPU too (float32 equal, bf16 CPU autocast)"
    return {"rows": rows, "tolerance": TOLERANCE, "note": note}


def section_suf_vs_full(ctx: dict) -> dict:
    rows, device = [], ctx["device"]
    width = "base" if ctx["gpu"] else "tiny"
    precision = "bf16" if ctx["gpu"] else "off"
    for name in MODELS:
        batch_size = ctx["batch"][(name, width)]
        model, layout, batch, info = setup(name, width, batch_size, ctx["image_res"])
        model.to(device).train()
        dev_batch = devices.to_device(batch, device)
        base = None
        configs = suf_step.schedules(layout.num_layers, 3)
        if not ctx["gpu"]:  # the self-test: full, SUF's first stage, and that stage with frozen embeddings
            configs = [c for c in configs if c[0] in ("full", "suf stage 0 (epoch 1)", FIRST_FROZEN)]
        steps = 4 if ctx["gpu"] else 2
        for label, sched, epoch in configs:
            freeze.apply_schedule(model, layout, sched, epoch)
            work = suf_step.count_work(model, lambda m, b: m.loss(b), dev_batch)
            model.zero_grad(set_to_none=True)
            free(device)
            r = take_steps(model, layout, sched, dev_batch, device, precision, steps, 30)
            flops = work["fwd_flops"] + work["input_grad_flops"] + work["weight_grad_flops"]
            base = base or {"step_s": r["step_s"], "flops": flops, "mem": r["peak_memory_bytes"]}
            rows.append(
                {
                    "model": name,
                    "width": width,
                    "precision": precision,
                    "batch": batch_size,
                    "config": label,
                    "trainable_params": work["trainable_params"],
                    "step_s": r["step_s"],
                    "time_ratio": r["step_s"] / base["step_s"],
                    "flop_ratio": flops / base["flops"],
                    "peak_memory_bytes": r["peak_memory_bytes"],
                    "memory_ratio": r["peak_memory_bytes"] / base["mem"] if base["mem"] else None,
                    "finite": r["finite"],
                    "status": "ok" if r["finite"] and r["updates_applied"] == steps else "failed",
                }
            )
        ctx["consumption"][name] = {"samples_per_s": batch_size / base["step_s"], "width": width, "setup": info}
        del model, dev_batch
        free(device)
    skipped_items = [] if ctx["gpu"] else [f"peak memory: {GPU_ONLY['memory']}"]
    return {"rows": rows, "setups": "batch and width as in the rows", "skipped": skipped_items}


def loader_data(folder: Path, gpu: bool) -> dict:
    """Synthetic inputs for the IGLUE sample's training splits: region features (UC2, xGQA testdev) and images
    (CCLM, XVNLI train_48), and a tiny tokenizer trained on their texts (the loader's speed, not its vocabulary)."""
    uc2 = data.load_split(IGLUE, "xgqa", "testdev", "en")
    cclm = data.load_split(IGLUE, "xvnli", "train_48", "en")
    fixtures.make_tiny_tokenizer([e.text for e in uc2 + cclm], folder / "tok", vocab_size=1000)
    fixtures.write_synthetic_features(folder / "feats", {e.image for e in uc2}, num_boxes=36 if gpu else 10)
    size = (640, 480) if gpu else (96, 72)  # COCO / Flickr30k photos are ~500-640 px wide
    fixtures.write_synthetic_images(folder / "images", sorted({e.image_file for e in cclm}), size=size)
    return {"uc2": uc2, "cclm": cclm}


def section_loader(ctx: dict) -> dict:
    rows, gpu = [], ctx["gpu"]
    exs = loader_data(ctx["tmp"], gpu)
    tok = tokenizer_check.load_tokenizer(ctx["tmp"] / "tok")
    workers = engine.default_num_workers() if gpu else min(1, engine.default_num_workers())
    dist = devices.DistInfo(device=ctx["device"])
    for name in MODELS:
        consumer = ctx["consumption"].get(name)
        batch = ctx["batch"][(name, "base" if gpu else "tiny")]
        batches = max(8, 4 * workers) if gpu else 3  # enough batches that every worker delivers several
        examples = exs[name] * (batch * batches // len(exs[name]) + 1)
        if name == "uc2":
            ds = data.make_dataset(
                "uc2", "xgqa", examples, features=str(ctx["tmp"] / "feats"), train=True, max_regions=36
            )
            collate = data.UC2Collate("xgqa", tok, train=True)
        else:
            res = ctx["image_res"] if gpu else 32
            ds = data.make_dataset(
                "cclm", "xvnli", examples, images=ctx["tmp"] / "images", train=True, image_res=res, seed=0
            )
            collate = data.CCLMCollate("xvnli", tok, train=True)
        args = argparse.Namespace(batch_size=batch, micro_batch_size=None, grad_accum=None, seed=0, num_workers=workers)
        loader = engine.build_train_loader(ds, args, dist, collate)
        t0 = time.perf_counter()
        it, n, first = iter(loader), 0, None
        for b in it:
            devices.to_device(b, ctx["device"])
            n += len(b["input_ids" if name == "uc2" else "images"])
            first = first or (time.perf_counter(), n)
        end = time.perf_counter()
        del it, loader
        steady = (n - first[1]) / max(end - first[0], 1e-9)
        row = {
            "model": name,
            "what": "region features (LMDB)" if name == "uc2" else f"images, training transform at {res} px",
            "workers": workers,
            "batch": batch,
            "samples": n,
            "samples_per_s": steady,
            "samples_per_s_with_startup": n / (end - t0),
            "consumes_samples_per_s": consumer and consumer["samples_per_s"],
            "status": "ok" if n > 0 else "failed",
        }
        if consumer:
            row["loader_over_consumption"] = steady / consumer["samples_per_s"]
            per_worker = steady / max(workers, 1)
            row["workers_for_1.5x"] = math.ceil(1.5 * consumer["samples_per_s"] / per_worker)
        rows.append(row)
    note = (
        "consumption: batch / the full bf16 step time of suf_vs_full (base width); synthetic files in the page cache"
        if gpu
        else "CPU self-test: consumption is the tiny float32 CPU step (says nothing about a GPU)"
    )
    return {"rows": rows, "note": note}


def section_torchrun(ctx: dict) -> dict:
    gpu, tmp = ctx["gpu"], ctx["tmp"]
    nproc = torch.cuda.device_count() if gpu else 2
    if not (tmp / "feats").exists():
        loader_data(tmp, gpu)
    precisions = ("bf16", "fp16") if gpu else ("off",)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SUF_DIST_TIMEOUT": "120"}
    if not gpu:
        env["SUF_DEVICE"] = "cpu"
    rows = []
    for precision in precisions:
        out = tmp / f"torchrun_{precision}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd += [str(ROOT / "train_uc2.py"), "--task", "xgqa", "--model-config", _common.UC2_TINY]
        cmd += ["--data-root", str(IGLUE), "--features", str(tmp / "feats"), "--tokenizer", str(tmp / "tok")]
        cmd += ["--train-split", "testdev", "--max-regions", "10", "--num-workers", "0", "--output-dir", str(out)]
        cmd += ["--policy", "suf", "--epochs", "2", "--batch-size", str(8 * nproc), "--max-steps-per-epoch", "2"]
        cmd += ["--no-eval", "--amp", precision, "--seed", "0", "--log-every", "1"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ctx["torchrun_timeout"])
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired as e:
            rc, tail = None, f"timed out after {e.timeout:.0f} s"
        records = []
        if (out / "metrics.jsonl").exists():
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("type") == "train"]
        stages = [r["trainable_layers"] for r in train]
        good = (
            rc == 0
            and (out / "model_final.pt").exists()
            and bool(train)
            and all(r["loss"] is not None and math.isfinite(r["loss"]) for r in train)
            and stages[0] != stages[-1]  # the SUF stage changed: DDP re-wrapped over the new trainable set
        )
        rows.append(
            {
                "precision": precision,
                "nproc": nproc,
                "backend": "nccl" if gpu and nproc > 1 else ("none (one process)" if nproc == 1 else "gloo"),
                "returncode": rc,
                "seconds": round(time.perf_counter() - t0, 1),
                "losses": [r["loss"] for r in train],
                "trainable_layers": stages,
                "amp_skipped_steps": train[-1]["amp_skipped_steps"] if train else None,
                "status": "ok" if good else "failed",
                **({} if good else {"output_tail": tail}),
            }
        )
    skipped_items = [] if gpu and nproc > 1 else [f"NCCL: {GPU_ONLY['nccl']}"]
    return {
        "rows": rows,
        "command": "python -m torch.distributed.run --standalone ... train_uc2.py",
        "skipped": skipped_items,
    }


SECTIONS = {
    "steps": section_steps,
    "agreement": section_agreement,
    "suf_vs_full": section_suf_vs_full,  # before loader: it measures what the GPU consumes
    "loader": section_loader,
    "torchrun": section_torchrun,
}


# ---------------------------------------------------------------- the report


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "count": torch.cuda.device_count(),
        "memory_bytes": p.total_memory,
        "capability": f"{p.major}.{p.minor}",
        "bf16": torch.cuda.is_bf16_supported(),
        "cuda": torch.version.cuda,
        "nccl": nccl_version(),
    }


def nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def run_section(name: str, fn, ctx: dict) -> dict:
    t0 = time.perf_counter()
    print(f"gpu_check: {name} ...", flush=True)
    try:
        res = fn(ctx)
        rows = res.get("rows", [])
        bad = [r for r in rows if r.get("status") == "failed"]
        status = "failed" if bad else ("skipped" if rows and all(r["status"] == "skipped" for r in rows) else "ok")
        res = {"status": status, **res}
    except Exception as e:  # one report whatever fails: the section says what and where
        res = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    res["device"] = ctx["device"].type
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"gpu_check: {name} {res['status']} ({res['seconds']} s)", flush=True)
    return res


def skipped_list(sections: dict) -> list[str]:
    out = []
    for name, sec in sections.items():
        out += [f"{name}: {s}" for s in sec.get("skipped", [])]
        for r in sec.get("rows", []):
            if r.get("status") == "skipped":
                what = " ".join(str(r[k]) for k in ("model", "width", "precision") if k in r)
                out.append(f"{name} {what}: {r['reason']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(_common.RESULTS / "gpu_check.json"))
    p.add_argument("--cpu", action="store_true", help="the CPU self-test even where a GPU is present (make test)")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--uc2-batch", type=int, default=64, help="UC2 base micro-batch on the GPU (paper: 256 global)")
    p.add_argument("--cclm-batch", type=int, default=8, help="CCLM base micro-batch on the GPU (paper: 144 global)")
    p.add_argument("--cclm-image-res", type=int, default=384, help="CCLM image size on the GPU (the paper's 384)")
    p.add_argument("--torchrun-timeout", type=float, default=240.0, help="seconds for each torchrun launch")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu and os.environ.get("SUF_DEVICE", "") != "cpu"
    device = torch.device("cuda:0" if gpu else "cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = {
            "gpu": gpu,
            "device": device,
            "tmp": Path(tmp),
            "image_res": args.cclm_image_res,
            "batch": {("uc2", "tiny"): 4, ("cclm", "tiny"): 4, ("uc2", "base"): args.uc2_batch},
            "consumption": {},
            "torchrun_timeout": args.torchrun_timeout,
        }
        ctx["batch"][("cclm", "base")] = args.cclm_batch
        sections = {name: run_section(name, SECTIONS[name], ctx) for name in args.sections}
    ok = all(s["status"] != "failed" for s in sections.values())
    report = {
        "check": "gpu_check",
        **_common.run_info(),
        "device": device.type,
        "gpu": gpu_info() if gpu else None,
        "torch": torch.__version__,
        "ok": ok,
        "seconds": round(time.perf_counter() - t0, 1),
        "skipped": skipped_list(sections),
        "sections": sections,
    }
    _common.write_result(Path(args.out), report)
    for name, sec in sections.items():
        print(f"{name:12} {sec['status']:8} {sec.get('reason', '')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
