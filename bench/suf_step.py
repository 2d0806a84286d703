"""Training-step cost of every SUF stage relative to full fine-tuning, UC2 and CCLM, on CPU.

For each configuration (full fine-tuning; each SUF stage; each SUF stage with --freeze-embeddings)
one model and one AdamW over param_groups(all parameters) take real training steps, the
configurations interleaved step by step (ABCABC...) so that machine load hits all alike; medians.

The predicted ratio counts the work a step SHOULD do (freeze.py's promise):
  forward (the same for every configuration),
  input gradients of every matmul operand that depends on a trainable parameter (i.e. through every
    layer above the lowest trainable one, plus e.g. CCLM's cross-attention into the trainable ViT),
  weight gradients and AdamW updates only for trainable parameters,
  the dense gradient of a trainable embedding table.
Matmul FLOPs are counted by a TorchFunctionMode on one forward of that configuration; seconds per
FLOP, per AdamW-updated parameter and per embedding-gradient element are calibrated on the full
fine-tuning step (its backward and optimizer phases) and an isolated embedding backward. A frozen
layer that still cost weight gradients or optimizer work would make the measured ratio exceed the
prediction; the run exits 1 when any measured ratio is off by more than --tolerance (10%).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import freeze  # noqa: E402

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
        self.embedding_grad = 0   # elements of dense embedding-table gradients
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"fwd_flops": wc.fwd, "input_grad_flops": wc.input_grad, "weight_grad_flops": wc.weight_grad,
            "embedding_grad_elems": wc.embedding_grad, "trainable_params": trainable}


# ---------------------------------------------------------------- timing


def timed_step(model, opt, loss_fn, batch) -> tuple[float, float, float]:
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = loss_fn(model, batch)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


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
        t = time.perf_counter()
        out.backward(g)
        times.append(time.perf_counter() - t)
        w.grad = None
    return statistics.median(times) / w.numel()


def bench_model(name: str, model: nn.Module, layout: freeze.LayerLayout, loss_fn, batch, *, tokens: int,
                suf_k: int = 3, reps: int = 5, lr: float = 1e-6, weight_decay: float = 0.01) -> dict:
    n = layout.num_layers
    stages = math.ceil(n / suf_k)
    configs = [("full", freeze.Schedule("full", n), 0)]
    for frozen_emb in (False, True):
        for s in range(stages):
            configs.append((f"suf stage {s}" + (" +frozen emb" if frozen_emb else ""),
                            freeze.Schedule("suf", n, suf_k=suf_k, freeze_embeddings=frozen_emb), s))
    model.train()
    opt = torch.optim.AdamW(freeze.param_groups(model, layout, configs[0][1], lr, weight_decay))

    rows = []
    for label, sched, epoch in configs:  # count work, measure state bytes with a fresh optimizer, warm up
        freeze.apply_schedule(model, layout, sched, epoch)
        work = count_work(model, loss_fn, batch)
        fresh = torch.optim.AdamW(freeze.param_groups(model, layout, sched, lr, weight_decay))
        timed_step(model, fresh, loss_fn, batch)
        rows.append({"model": name, "config": label, "trainable_layers": sched.trainable_layers(epoch),
                     "embeddings_trainable": not sched.freeze_embeddings, "optimizer_state_bytes": state_bytes(fresh),
                     **work, "_times": []})
        del fresh
        timed_step(model, opt, loss_fn, batch)  # warm-up of the shared optimizer's state for this set
    for r in range(reps):  # interleaved: every repetition runs every configuration once, order rotated
        order = list(range(len(configs)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            label, sched, epoch = configs[i]
            freeze.apply_schedule(model, layout, sched, epoch)
            rows[i]["_times"].append(timed_step(model, opt, loss_fn, batch))
    freeze.apply_schedule(model, layout, configs[0][1], 0)

    c_emb = embedding_grad_seconds_per_elem(model, tokens, reps)
    for row in rows:
        t = row.pop("_times")
        row["fwd_s"], row["bwd_s"], row["opt_s"] = (statistics.median(x[i] for x in t) for i in range(3))
        row["step_s"] = statistics.median(sum(x) for x in t)
    full = rows[0]
    bwd_flops = lambda r: r["input_grad_flops"] + r["weight_grad_flops"]  # noqa: E731
    c_flop = max(full["bwd_s"] - c_emb * full["embedding_grad_elems"], 0.0) / max(bwd_flops(full), 1)
    c_opt = full["opt_s"] / full["trainable_params"]
    fwd = statistics.median(r["fwd_s"] for r in rows)  # the forward is the same work everywhere
    for row in rows:
        row["predicted_s"] = fwd + c_flop * bwd_flops(row) + c_emb * row["embedding_grad_elems"] + c_opt * row["trainable_params"]
    for row in rows:
        row["measured_ratio"] = row["step_s"] / full["step_s"]
        row["predicted_ratio"] = row["predicted_s"] / full["predicted_s"]
        row["deviation"] = row["measured_ratio"] / row["predicted_ratio"] - 1
    return {"rows": rows, "calibration": {"s_per_gflop": c_flop * 1e9, "s_per_mparam_adamw": c_opt * 1e6,
                                          "s_per_mem_embedding_grad": c_emb * 1e6}}


# ---------------------------------------------------------------- report


def print_table(rows: list[dict], tolerance: float) -> None:
    hdr = (f"{'model':5} {'config':26} {'layers':>6} {'emb':>4} {'trainable':>11} {'opt state':>9} "
           f"{'step s':>7} {'measured':>8} {'predicted':>9} {'dev':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        flag = "" if abs(r["deviation"]) <= tolerance else "  <-- off by more than tolerance"
        print(f"{r['model']:5} {r['config']:26} {len(r['trainable_layers']):>6} {'yes' if r['embeddings_trainable'] else 'no':>4} "
              f"{r['trainable_params'] / 1e6:>10.1f}M {r['optimizer_state_bytes'] / 2**20:>7.0f}MB "
              f"{r['step_s']:>7.3f} {r['measured_ratio']:>8.3f} {r['predicted_ratio']:>9.3f} {r['deviation']:>+6.1%}{flag}")
