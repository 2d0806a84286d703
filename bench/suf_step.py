"""Training-step cost of every SUF stage relative to full fine-tuning, UC2 and CCLM, on CPU.

    .venv/bin/python -m bench.suf_step [--quick] [--models uc2 cclm] [--out bench/results/suf_step.json]

Real models (train_uc2 / train_cclm build_model + layer_layout) at base widths; what is reduced to fit a
shared 2-core machine in a few minutes (batch, text length, CCLM image size, vocabulary only if memory
is short) is printed and written to the JSON. For each configuration (full fine-tuning; SUF stage s =
epoch s+1, k=3; each stage with --freeze-embeddings) ONE model and ONE fused AdamW built over
freeze.param_groups(all parameters) take real training steps, the configurations interleaved step by
step (full twice per round, rotated order) so that machine load hits all alike; per-round ratios to
full fine-tuning, then medians. Steps are timed in process CPU seconds with one torch thread: wall
time on a machine shared with other jobs measures mostly them.

The predicted ratio counts the work a step SHOULD do (freeze.py's promise):
  forward (the same for every configuration),
  input gradients of every matmul operand that depends on a trainable parameter (i.e. through every
    layer above the lowest trainable one, plus e.g. CCLM's cross-attention into the trainable ViT),
  weight gradients and AdamW updates only for trainable parameters,
  the dense gradient of a trainable embedding table.
Matmul FLOPs are counted by a TorchFunctionMode on one forward of that configuration; seconds per
FLOP and per AdamW-updated parameter are calibrated on the full fine-tuning step (its backward and
optimizer phases), per embedding-gradient element and per element of the AdamW update of the largest
(> 32 MiB) tensor on isolated runs. A frozen layer that still cost weight gradients or optimizer work
would make the measured ratio exceed the prediction.

Every model is measured in a fixed number of attempts (--attempts, default 3; each attempt a full
interleaved measurement as above); the table reports, per configuration, the median over the attempts
and every attempt's ratio and deviation, all of them kept: no attempt is repeated or dropped because of
its result. Exit status 1 when a median deviation is off by more than --tolerance (10%), or when the
parameters that got gradients differ from those console.what_trains.describe_schedule says train (checked in --quick
as well).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import freeze
import train_cclm
import train_uc2
from bench import _common
from console import what_trains

# ---------------------------------------------------------------- counting the work


def _needs(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


class WorkCounter(TorchFunctionMode):
    """Counts matmul FLOPs of one forward and of the backward it implies, from requires_grad flags:
    each operand that requires grad costs one more matmul of the forward's size (weight grad when
    the operand is a parameter, i.e. a leaf; input grad otherwise)."""

    def __init__(self):
        super().__init__()
        self.fwd = self.input_grad = self.weight_grad = 0
        self.embedding_grad = 0  # elements of dense embedding-table gradients
        self.uncounted: set[str] = set()

    def _operands(self, flops: int, *operands) -> None:
        self.fwd += flops
        for t in operands:
            if _needs(t):
                if t.grad_fn is None:
                    self.weight_grad += flops
                else:
                    self.input_grad += flops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "linear":
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self._operands(2 * x.numel() * w.shape[0], x, w)
        elif name in ("matmul", "__matmul__", "mm", "bmm"):
            a, b = args[0], args[1]
            self._operands(2 * out.numel() * a.shape[-1], a, b)
        elif name == "__rmatmul__":
            b, a = args[0], args[1]
            self._operands(2 * out.numel() * a.shape[-1], a, b)
        elif name in ("addmm", "baddbmm"):
            a, b = args[1], args[2]
            self._operands(2 * out.numel() * a.shape[-1], a, b)
        elif name == "scaled_dot_product_attention":
            q, k, v = args[:3]
            half = 2 * (q.numel() // q.shape[-1]) * k.shape[-2] * q.shape[-1]  # one of QK^T, PV
            self.fwd += 2 * half
            # backward: dV = P^T dO; dP = dO V^T (for dQ, dK); dQ = dS K; dK = dS^T Q
            self.input_grad += half * (_needs(v) + (_needs(q) or _needs(k)) + _needs(q) + _needs(k))
        elif name in ("conv1d", "conv2d"):
            x, w = args[0], args[1]
            self._operands(2 * out.numel() * w[0].numel(), x, w)
        elif name == "embedding":
            w = args[1] if len(args) > 1 else kwargs["weight"]
            if _needs(w):
                self.embedding_grad += w.numel()
        elif name in ("einsum", "tensordot", "multi_head_attention_forward"):
            self.uncounted.add(name)
        return out


def count_work(model: nn.Module, loss_fn, batch) -> dict:
    wc = WorkCounter()
    with wc:
        loss_fn(model, batch)
    if wc.uncounted:
        print(f"warning: uncounted matmul-like functions {sorted(wc.uncounted)}", file=sys.stderr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "fwd_flops": wc.fwd,
        "input_grad_flops": wc.input_grad,
        "weight_grad_flops": wc.weight_grad,
        "embedding_grad_elems": wc.embedding_grad,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_big_params": sum(p.numel() for p in trainable if p.numel() * p.element_size() > BIG_TENSOR_BYTES),
    }


# ---------------------------------------------------------------- timing


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_step(model, opt, loss_fn, batch) -> tuple[float, float, float, float, int]:
    """(forward, backward, optimizer) CPU seconds of this process, the step's wall seconds and its
    minor page faults (fresh gradient memory)."""
    opt.zero_grad(set_to_none=True)
    f0 = minor_faults()
    w0, t0 = time.perf_counter(), time.process_time()
    loss = loss_fn(model, batch)
    t1 = time.process_time()
    loss.backward()
    t2 = time.process_time()
    opt.step()
    t3 = time.process_time()
    return t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - w0, minor_faults() - f0


def embedding_grad_seconds_per_elem(model: nn.Module, tokens: int, reps: int) -> float:
    """Isolated backward of the largest embedding table: dense zero-filled gradient + scatter."""
    emb = max((m for m in model.modules() if isinstance(m, nn.Embedding)), key=lambda m: m.weight.numel(), default=None)
    if emb is None:
        return 0.0
    w = emb.weight.detach().requires_grad_()
    ids = torch.randint(0, w.shape[0], (tokens,))
    g = torch.randn(tokens, w.shape[1])
    times = []
    for _ in range(reps):
        out = nn.functional.embedding(ids, w)
        t = time.process_time()
        out.backward(g)
        times.append(time.process_time() - t)
        w.grad = None
    return statistics.median(times) / w.numel()


BIG_TENSOR_BYTES = 32 << 20  # above glibc's largest mmap threshold: AdamW temporaries are fresh pages


def adamw(params, lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    # fused: one in-place kernel per tensor. The default CPU AdamW allocates parameter-sized
    # temporaries every step; for the 768 MB word-embedding table they are fresh pages whose
    # page faults cost 1-5 s per step on a shared machine, varying from step to step.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def big_tensor_adamw_seconds_per_elem(
    model: nn.Module, reps: int, lr: float, weight_decay: float, fused: bool
) -> float:
    """Isolated AdamW update of the largest parameter (the word-embedding table) with a fresh dense
    gradient each step, as in training; 0 when no tensor is that big."""
    big = max(model.parameters(), key=lambda p: p.numel())
    if big.numel() * big.element_size() <= BIG_TENSOR_BYTES:
        return 0.0
    w = big.detach().requires_grad_()  # same storage: a tiny-lr update of the real table
    opt = adamw([w], lr, weight_decay, fused)
    times = []
    for r in range(reps + 1):
        w.grad = torch.zeros_like(w)
        t = time.process_time()
        opt.step()
        if r > 0:  # the first step allocates the state
            times.append(time.process_time() - t)
        w.grad = None
    del opt
    return statistics.median(times) / w.numel()


def schedules(n: int, suf_k: int) -> list[tuple[str, freeze.Schedule, int]]:
    """(label, schedule, epoch) of full fine-tuning, every SUF stage, and every stage with --freeze-embeddings."""
    stages = math.ceil(n / suf_k)
    configs = [("full", freeze.Schedule("full", n), 0)]
    for frozen_emb in (False, True):
        # the last SUF stage with trainable embeddings IS full fine-tuning: not timed twice
        for s in range(stages if frozen_emb else stages - 1):
            configs.append(
                (
                    f"suf stage {s} (epoch {s + 1})" + (" +frozen emb" if frozen_emb else ""),
                    freeze.Schedule("suf", n, suf_k=suf_k, freeze_embeddings=frozen_emb),
                    s,
                )
            )
    return configs


def bench_model(
    name: str,
    model: nn.Module,
    layout: freeze.LayerLayout,
    loss_fn,
    batch,
    *,
    tokens: int,
    suf_k: int = 3,
    reps: int = 5,
    lr: float = 1e-6,
    weight_decay: float = 0.01,
    fused: bool = True,
) -> dict:
    configs = schedules(layout.num_layers, suf_k)
    model.train()
    rows = []
    for label, sched, epoch in configs:  # count the work each configuration should do
        freeze.apply_schedule(model, layout, sched, epoch)
        rows.append(
            {
                "model": name,
                "config": label,
                "trainable_layers": sched.trainable_layers(epoch),
                "embeddings_trainable": not sched.freeze_embeddings,
                "scheduled_params": what_trains.describe_schedule(model, layout, sched, epoch + 1)[-1][
                    "trainable_params"
                ],
                **count_work(model, loss_fn, batch),
            }
        )
    c_opt_big = big_tensor_adamw_seconds_per_elem(model, reps, lr, weight_decay, fused)

    # one optimizer over every parameter, built once, as in training (engine.build_optimizer)
    opt = adamw(freeze.param_groups(model, layout, configs[0][1], lr, weight_decay), lr, weight_decay, fused)
    times = [[] for _ in configs]
    full_again = []  # full fine-tuning runs twice per repetition: every ratio's denominator is the mean
    for r in range(reps + 1):  # interleaved: each repetition runs every configuration once, order rotated
        order = list(range(len(configs)))
        order = order[r % len(order) :] + order[: r % len(order)]
        order.insert((order.index(0) + len(order) // 2) % len(order), -1)  # half a cycle from the first
        for i in order:
            label, sched, epoch = configs[max(i, 0)]
            freeze.apply_schedule(model, layout, sched, epoch)
            t = timed_step(model, opt, loss_fn, batch)
            if r > 0:
                (full_again if i < 0 else times[i]).append(t)
            elif i >= 0:  # warm-up repetition (allocates the state); the state this configuration updates:
                updated = [p for p in model.parameters() if p.grad is not None]
                rows[i]["updated_params"] = sum(p.numel() for p in updated)
                rows[i]["optimizer_state_bytes"] = sum(
                    v.numel() * v.element_size() for p in updated for v in opt.state[p].values() if torch.is_tensor(v)
                )
    freeze.apply_schedule(model, layout, configs[0][1], 0)

    c_emb = embedding_grad_seconds_per_elem(model, tokens, reps)
    full_pairs = list(zip(times[0], full_again))
    times[0] = times[0] + full_again
    for row, t in zip(rows, times):
        row["fwd_s"], row["bwd_s"], row["opt_s"], row["wall_s"], row["page_faults"] = (
            statistics.median(x[i] for x in t) for i in range(5)
        )
        row["step_s"] = statistics.median(sum(x[:3]) for x in t)
        # side by side: ratio to the full steps of the same repetition, then the median
        row["measured_ratio"] = statistics.median(
            2 * sum(x[:3]) / (sum(f[:3]) + sum(g[:3])) for x, (f, g) in zip(t, full_pairs)
        )
        row["wall_ratio"] = statistics.median(2 * x[3] / (f[3] + g[3]) for x, (f, g) in zip(t, full_pairs))
    full = rows[0]
    bwd_flops = lambda r: r["input_grad_flops"] + r["weight_grad_flops"]  # noqa: E731
    c_flop = max(full["bwd_s"] - c_emb * full["embedding_grad_elems"], 0.0) / max(bwd_flops(full), 1)
    small = lambda r: r["trainable_params"] - r["trainable_big_params"]  # noqa: E731
    c_opt = max(full["opt_s"] - c_opt_big * full["trainable_big_params"], 0.0) / max(small(full), 1)
    fwd = statistics.median(r["fwd_s"] for r in rows)  # the forward is the same work everywhere
    for row in rows:
        row["predicted_s"] = (
            fwd
            + c_flop * bwd_flops(row)
            + c_emb * row["embedding_grad_elems"]
            + c_opt * small(row)
            + c_opt_big * row["trainable_big_params"]
        )
    for row in rows:
        row["predicted_ratio"] = row["predicted_s"] / full["predicted_s"]
        row["deviation"] = row["measured_ratio"] / row["predicted_ratio"] - 1
    return {
        "rows": rows,
        "calibration": {
            "s_per_gflop_backward": c_flop * 1e9,
            "s_per_mparam_adamw": c_opt * 1e6,
            "s_per_mparam_adamw_big_tensor": c_opt_big * 1e6,
            "s_per_melem_embedding_grad": c_emb * 1e6,
        },
    }


def median_of_attempts(attempts: list[dict]) -> dict:
    """One result per model from every attempt's: each row carries all attempts' measured/predicted
    ratios and deviations ("attempts") and their medians as measured_ratio / predicted_ratio / deviation
    (also step_s, wall_ratio); the per-phase timings (fwd_s, bwd_s, ...) are the first attempt's."""
    rows = []
    for i, first in enumerate(attempts[0]["rows"]):
        per = [a["rows"][i] for a in attempts]
        row = dict(first)
        if len({r["updated_params"] for r in per}) > 1:  # the same schedule must update the same parameters
            row["updated_params"] = None
        row["attempts"] = [{k: r[k] for k in ("measured_ratio", "predicted_ratio", "deviation", "step_s")} for r in per]
        for k in ("measured_ratio", "predicted_ratio", "deviation", "step_s", "wall_ratio"):
            row[k] = statistics.median(r[k] for r in per)
        rows.append(row)
    return {"rows": rows, "calibration": [a["calibration"] for a in attempts]}


# ---------------------------------------------------------------- report


def print_table(rows: list[dict], tolerance: float) -> None:
    hdr = (
        f"{'model':5} {'config':38} {'layers':>6} {'emb':>4} {'trainable':>11} {'opt state':>9} "
        f"{'step s':>7} {'measured':>8} {'predicted':>9} {'dev':>6}  dev per attempt"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        flag = "" if abs(r["deviation"]) <= tolerance else "  <-- off by more than tolerance"
        print(
            f"{r['model']:5} {r['config']:38} {len(r['trainable_layers']):>6} "
            f"{'yes' if r['embeddings_trainable'] else 'no':>4} "
            f"{r['trainable_params'] / 1e6:>10.1f}M {r['optimizer_state_bytes'] / 2**20:>7.0f}MB "
            f"{r['step_s']:>7.3f} {r['measured_ratio']:>8.3f} {r['predicted_ratio']:>9.3f} {r['deviation']:>+6.1%}  "
            f"{' '.join(format(a['deviation'], '+.1%') for a in r['attempts'])}{flag}"
        )


# ---------------------------------------------------------------- the real models


def keep_heap_memory() -> None:
    """Ask glibc to keep freed memory and to serve allocations up to 32 MiB (every layer tensor) from
    the heap: otherwise gradients and AdamW temporaries freed each step go back to the OS and are
    page-faulted in again, a cost that depends on the allocator's history, not on the work."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum on 64-bit)
    except (OSError, AttributeError):
        pass


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 8 << 30


def fit_vocab(build, cfg: dict, budget: int) -> int:
    """Largest vocabulary (<= the config's) whose training state fits `budget` bytes: about 20 bytes
    per parameter (weights, gradients, AdamW's two moments, temporaries) + 2 GiB activations."""
    with torch.device("meta"):
        params = sum(p.numel() for p in build(cfg).parameters())
    per_token = cfg["hidden_size"]  # one vocabulary-sized table (the text word embeddings)
    fixed = params - cfg["vocab_size"] * per_token
    fit = int((budget - (2 << 30)) / 20 - fixed) // per_token
    return max(1000, min(cfg["vocab_size"], fit))


def on_device(build, batch: dict, meta: bool):
    """(model, batch) as built, or on the meta device (shapes only: what counting the work needs, in no memory)."""
    if not meta:
        return build(), batch
    with torch.device("meta"):
        model = build()
    return model, {k: v.to("meta") for k, v in batch.items()}


def uc2_setup(quick: bool, batch: int, vocab: int | None, budget: int, meta: bool = False):

    task, L, R = "xgqa", 24, 37  # 36 regions + the global image feature, as IGLUE's UC2 features
    cfg = train_uc2.resolve_config(_common.UC2_TINY if quick else "base")
    cfg["vocab_size"] = vocab or fit_vocab(lambda c: train_uc2.build_model(task, c), cfg, budget)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg["vocab_size"], (batch, L), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    b = {
        "input_ids": ids,
        "attention_mask": torch.ones(batch, L, dtype=torch.long),
        "features": torch.randn(batch, R, cfg["v_feature_size"], generator=g),
        "spatials": torch.rand(batch, R, cfg["num_locs"], generator=g),
        "image_mask": torch.ones(batch, R, dtype=torch.long),
        "target": (torch.rand(batch, cfg["num_answers"], generator=g) > 0.999).float(),
        "label": torch.zeros(batch, dtype=torch.long),
    }
    reduced = {
        "config": "tiny" if quick else "base",
        "task": task,
        "vocab_size": cfg["vocab_size"],
        "batch": f"{batch} (paper 256)",
        "text_tokens": L,
        "regions": R,
    }
    model, b = on_device(lambda: train_uc2.build_model(task, cfg), b, meta)
    return model, train_uc2.layer_layout(task, cfg), b, batch * L, reduced


def cclm_setup(quick: bool, batch: int, vocab: int | None, budget: int, image_res: int, meta: bool = False):

    task, L = "xvnli", 24  # xGQA would add its always-trainable 6-layer answer decoder: ratios only nearer 1
    cfg = train_cclm.resolve_config(_common.CCLM_TINY if quick else "base")
    if not quick:
        cfg["image_res"] = image_res
    cfg["vocab_size"] = vocab or fit_vocab(lambda c: train_cclm.build_model(task, c), cfg, budget)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg["vocab_size"], (batch, L), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    b = {
        "images": torch.randn(batch, 3, cfg["image_res"], cfg["image_res"], generator=g),
        "text_ids": ids,
        "text_atts": torch.ones(batch, L, dtype=torch.long),
        "label": torch.randint(0, 3, (batch,), generator=g),
    }
    reduced = {
        "config": "tiny" if quick else "base",
        "task": task,
        "vocab_size": cfg["vocab_size"],
        "batch": f"{batch} (paper 144)",
        "text_tokens": L,
        "image_res": f"{cfg['image_res']} (paper 384)",
    }
    model, b = on_device(lambda: train_cclm.build_model(task, cfg), b, meta)
    return model, train_cclm.layer_layout(task, cfg), b, batch * L, reduced


# ---------------------------------------------------------------- counted FLOPs only (no timing)


def flop_ratios(model: nn.Module, layout: freeze.LayerLayout, batch, suf_k: int) -> list[dict]:
    """Per configuration of schedules(): the counted matmul FLOPs of a training step (forward, input and weight
    gradients) relative to full fine-tuning: the limit of what SUF can save in compute, before any optimizer or
    per-step cost. Runs on meta tensors as well (shapes are all it needs)."""
    rows = []
    model.train()
    for label, sched, epoch in schedules(layout.num_layers, suf_k):
        freeze.apply_schedule(model, layout, sched, epoch)
        w = count_work(model, lambda m, b: m.loss(b), batch)
        rows.append({"config": label, **w, "flops": w["fwd_flops"] + w["input_grad_flops"] + w["weight_grad_flops"]})
    for r in rows:
        r["flop_ratio"] = r["flops"] / rows[0]["flops"]
    return rows


def table_share(timed: dict, model: str, paper_batch: int) -> dict | None:
    """From a timed result (bench/results/suf_step.json): the per-step cost of the word-embedding table under
    SUF's first stage (its dense gradient and its AdamW update: neither depends on the batch) as a share of the
    step, and the predicted stage-1 ratio at the bench's batch and at the paper's (the FLOP terms scaled by the
    batch, the table's cost not)."""
    rows = {r["config"]: r for r in timed.get("rows", []) if r.get("model") == model}
    cal = timed.get("config", {}).get("calibration", {}).get(model)
    full, first = rows.get("full"), rows.get("suf stage 0 (epoch 1)")
    if not (full and first and cal):
        return None
    cal = cal[0] if isinstance(cal, list) else cal
    setup = timed["config"]["models"][model]
    batch = int(str(setup["batch"]).split()[0])

    def parts(r: dict) -> tuple[float, float]:
        table = (
            cal["s_per_melem_embedding_grad"] * r["embedding_grad_elems"]
            + cal["s_per_mparam_adamw_big_tensor"] * r["trainable_big_params"]
        ) / 1e6
        return r["predicted_s"] - table, table  # (what scales with the batch, the table's per-step cost)

    (fs, ft), (ss, st) = parts(full), parts(first)
    k = paper_batch / batch
    return {
        "batch": batch,
        "paper_batch": paper_batch,
        "table_s_per_step": st,
        "table_share_of_stage1_step": st / (ss + st),
        "predicted_stage1_ratio": (ss + st) / (fs + ft),
        "predicted_stage1_ratio_without_table": ss / fs,
        "predicted_stage1_ratio_at_paper_batch": (k * ss + st) / (k * fs + ft),
    }


def count_only(args) -> int:
    res: dict = {"bench": "suf_step_flops", **_common.run_info(), "suf_k": args.suf_k}
    details = []  # a list: bench/table.py lists only the scalars above it (the first stage's ratios, the check)
    specs = [("uc2", None, 256)] if "uc2" in args.models else []
    specs += [("cclm", r, 144) for r in sorted({128, args.cclm_image_res, 384})] if "cclm" in args.models else []
    timed_path = Path(args.timed)
    timed = json.loads(timed_path.read_text()) if timed_path.exists() else {}
    for name, res_px, paper_batch in specs:
        if name == "uc2":
            model, layout, batch, _, info = uc2_setup(False, args.uc2_batch, 250002, 0, meta=True)
        else:
            model, layout, batch, _, info = cclm_setup(False, args.cclm_batch, 250002, 0, res_px, meta=True)
        key = name if res_px is None else f"{name}_{res_px}px"
        rows = flop_ratios(model, layout, batch, args.suf_k)
        share = table_share(timed, name, paper_batch)
        details.append({"model": key, "setup": info, "rows": rows, "table_cost": share})
        first = next(r for r in rows if r["config"] == "suf stage 0 (epoch 1)")
        res[f"{key}_suf_stage1_flop_ratio"] = round(first["flop_ratio"], 4)
        print(f"{key}: " + ", ".join(f"{r['config']} {r['flop_ratio']:.3f}" for r in rows))
        if share and res_px in (None, 128):
            print(f"  from {timed_path}: {share}")
    res["rowwise_adamw"] = rowwise_adamw_check()
    print(f"row-wise AdamW: {res['rowwise_adamw']}")
    res["models"] = details
    _common.write_result(Path(args.out), res)
    return 0


def lazy_adamw_step(w, m, v, g, rows, step: int, lr: float, betas, eps: float, wd: float) -> None:
    """AdamW on the given rows only (a row-wise / sparse update, as torch.optim.SparseAdam does plus decoupled
    weight decay): the other rows keep their weights and moments. Equals torch's AdamW when every row is given."""
    b1, b2 = betas
    m[rows] = b1 * m[rows] + (1 - b1) * g[rows]
    v[rows] = b2 * v[rows] + (1 - b2) * g[rows] ** 2
    w[rows] *= 1 - lr * wd
    denom = (v[rows] / (1 - b2**step)).sqrt() + eps
    w[rows] -= lr / (1 - b1**step) * m[rows] / denom


def rowwise_adamw_check(n_rows: int = 8, dim: int = 4, steps: int = 4, seed: int = 0) -> dict:
    """Does a row-wise update of an embedding table reproduce AdamW? A tiny table: step 1 gives every row a
    gradient, later steps only rows 0-1 (a batch's tokens). torch's AdamW still moves rows 2.. (their first
    moment keeps decaying into updates, and decoupled weight decay shrinks every row every step); a row-wise
    update does not, so the two part. Control: with every row in every step the row-wise update equals AdamW."""
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.01
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n_rows, dim, generator=gen)
    grads = [torch.randn(n_rows, dim, generator=gen) for _ in range(steps)]
    touched = [torch.arange(n_rows)] + [torch.tensor([0, 1])] * (steps - 1)

    def run(rows_per_step, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        ref = w0.clone().requires_grad_()
        opt = torch.optim.AdamW([ref], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        lazy, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
        for step, (g, rows) in enumerate(zip(grads, rows_per_step), 1):
            dense = torch.zeros_like(g)
            dense[rows] = g[rows]  # nn.Embedding's dense gradient: zero rows where no token was
            ref.grad = dense
            opt.step()
            lazy_adamw_step(lazy, m, v, dense, rows, step, lr, betas, eps, weight_decay)
        return ref.detach(), lazy

    ref, lazy = run(touched, wd)
    ref_nowd, lazy_nowd = run(touched, 0.0)
    ctrl_ref, ctrl_lazy = run([torch.arange(n_rows)] * steps, wd)
    after_first = run(touched[:1], wd)[0]
    idle = slice(2, None)
    return {
        "rows_without_gradient_moved_by_adamw": float((ref[idle] - after_first[idle]).abs().max()),
        "rows_without_gradient_moved_by_adamw_no_decay": float(
            (ref_nowd[idle] - run(touched[:1], 0.0)[0][idle]).abs().max()
        ),
        "rowwise_vs_adamw_max_difference": float((ref - lazy).abs().max()),
        "rowwise_vs_adamw_max_difference_no_decay": float((ref_nowd - lazy_nowd).abs().max()),
        "control_all_rows_max_difference": float((ctrl_ref - ctrl_lazy).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny configs, 2 repetitions, not gated")
    p.add_argument("--models", nargs="+", choices=("uc2", "cclm"), default=["uc2", "cclm"])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per configuration (default 5, quick 2)")
    p.add_argument(
        "--attempts",
        type=int,
        default=None,
        help="independent measurements per model, all kept and reported; medians gated (default 3, quick 1)",
    )
    p.add_argument("--uc2-batch", type=int, default=4)
    p.add_argument("--cclm-batch", type=int, default=2)
    p.add_argument(
        "--cclm-image-res", type=int, default=128, help="CCLM image size (paper 384; ViT cost grows with its square)"
    )
    p.add_argument(
        "--vocab", type=int, default=None, help="vocabulary size (default: the largest <= 250002 that fits memory)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; steps are timed in process CPU seconds, which other jobs on a shared "
        "machine barely disturb when single-threaded",
    )
    p.add_argument(
        "--adamw",
        choices=("fused", "default"),
        default="fused",
        help="AdamW implementation (default = torch's per-tensor CPU loop with temporaries)",
    )
    p.add_argument("--suf-k", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument(
        "--out", default=None, help="default bench/results/suf_step.json (--count-only: suf_step_flops.json)"
    )
    p.add_argument(
        "--count-only",
        action="store_true",
        help="no timing: counted-FLOP ratios of every configuration at base width (meta tensors; CCLM at 128 px and "
        "the paper's 384 px), the word-embedding table's per-step share from --timed, the row-wise AdamW check",
    )
    p.add_argument("--timed", default=str(_common.RESULTS / "suf_step.json"), help="--count-only: a timed result")
    args = p.parse_args(argv)
    if args.count_only:
        args.out = args.out or str(_common.RESULTS / "suf_step_flops.json")
        return count_only(args)
    args.out = args.out or str(_common.RESULTS / "suf_step.json")
    if args.suf_k <= 0 or any(v is not None and v <= 0 for v in (args.reps, args.attempts)) or args.threads <= 0:
        p.error("--suf-k, --reps, --attempts and --threads must be > 0")
    reps = args.reps or (2 if args.quick else 5)
    attempts = args.attempts or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keep_heap_memory()
    budget = int(0.6 * mem_available_bytes())  # the machine is shared: leave the rest to others

    rows, setups, calibration = [], {}, {}
    load_start = list(os.getloadavg())
    for name in args.models:
        t0 = time.perf_counter()
        if name == "uc2":
            model, layout, batch, tokens, reduced = uc2_setup(args.quick, args.uc2_batch, args.vocab, budget)
        else:
            model, layout, batch, tokens, reduced = cclm_setup(
                args.quick, args.cclm_batch, args.vocab, budget, args.cclm_image_res
            )
        print(f"{name}: {reduced}", flush=True)
        # a fixed number of attempts, whatever their results (a shared machine's load varies for minutes)
        res = median_of_attempts(
            [
                bench_model(
                    name,
                    model,
                    layout,
                    lambda m, b: m.loss(b),
                    batch,
                    tokens=tokens,
                    suf_k=args.suf_k,
                    reps=reps,
                    fused=args.adamw == "fused",
                )
                for _ in range(attempts)
            ]
        )
        reduced["attempts"] = attempts
        del model
        reduced["seconds"] = round(time.perf_counter() - t0, 1)
        rows += res["rows"]
        setups[name], calibration[name] = reduced, res["calibration"]

    print()
    print_table(rows, args.tolerance)
    bad = [r for r in rows if abs(r["deviation"]) > args.tolerance]
    # not timing: every scheduled-trainable parameter, and no other, got a gradient and an update
    wrong = [r for r in rows if not r["scheduled_params"] == r["trainable_params"] == r["updated_params"]]
    gated = not args.quick
    ok = not (bad and gated) and not wrong
    print(
        f"\nstep time = process CPU seconds with {args.threads} torch thread(s), median of {reps} interleaved "
        "repetitions; "
        "measured = median of per-repetition ratios to full fine-tuning; predicted = counted work (see "
        "bench/suf_step.py "
        f"docstring); measured, predicted, dev: medians over {attempts} attempt(s), every attempt's dev listed."
    )
    for r in wrong:
        print(
            f"ERROR {r['model']} {r['config']}: schedule says {r['scheduled_params']} trainable parameters, "
            f"{r['trainable_params']} require grad, {r['updated_params']} got a gradient"
        )
    if bad:
        print(
            f"{len(bad)} configuration(s) off the prediction by more than {args.tolerance:.0%} (median of the attempts)"
            + ("" if gated else " (--quick: not gated)")
        )
    result = {
        "bench": "suf_step",
        **_common.run_info(),
        "ok": ok,
        "gated": gated,
        "tolerance": args.tolerance,
        "config": {
            "quick": args.quick,
            "reps": reps,
            "attempts": attempts,
            "torch_threads": args.threads,
            "suf_k": args.suf_k,
            "adamw": args.adamw,
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg()),
            "models": setups,
            "calibration": calibration,
        },
        "columns": [
            "model",
            "config",
            "layers",
            "embeddings",
            "trainable_params",
            "optimizer_state_MB",
            "step_s",
            "measured_ratio",
            "predicted_ratio",
            "deviation",
            "deviation_per_attempt",
        ],
        "table": [
            [
                r["model"],
                r["config"],
                len(r["trainable_layers"]),
                r["embeddings_trainable"],
                r["trainable_params"],
                round(r["optimizer_state_bytes"] / 2**20, 1),
                round(r["step_s"], 4),
                round(r["measured_ratio"], 3),
                round(r["predicted_ratio"], 3),
                round(r["deviation"], 3),
                [round(a["deviation"], 3) for a in r["attempts"]],
            ]
            for r in rows
        ],
        "rows": rows,
    }
    _common.write_result(Path(args.out), result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
