"""Cost of one XVL-MAML meta-update relative to one plain fine-tuning step (UC2, CPU), side by side in one run.

    .venv/bin/python bench/xvlmaml_step.py [--quick] [--out bench/results/xvlmaml_step.json]

A reduced UC2 (train_uc2's model, 12 layers, --hidden wide, 4,096-token vocabulary; synthetic XVNLI
batches of --batch examples, 20 tokens, 36 regions) so that it fits a shared 2-core machine in minutes.
Configurations (comparisons/xvlmaml/xvlmaml.py's real code path, meta_step + AdamW through engine.optimizer_step):
  plain          one fine-tuning step: task loss on one batch, backward, AdamW (the baseline)
  fo_full        first-order XVL-MAML, variant full (inner: contrastive on the support batch; outer: task loss on
                 an English batch + contrastive on the query batch, at theta')
  so_full        the same, second order (gradient through the inner gradient)
  so_full_top3   second order, the inner loop adapting only the top 3 layers and the heads (--inner-params top)
  so_unsup       second order, variant unsupervised (contrastive only)
  so_full_joint  second order, contrastive embeddings from the joint pass (--cl-embed joint)
Time: process CPU seconds per step with one torch thread (wall time on a shared machine measures the other
jobs), the configurations interleaved round by round, the per-round ratio to plain, the median over rounds.
Memory: the peak of the bytes torch allocates during one step (after a warm-up step, so the AdamW state
already exists) above what was live when the step began, from torch.profiler's memory events, and its
ratio to plain's: activations, the graph second order keeps, theta' and gradients.

What full scale implies is printed and written too: each inner step of second-order MAML keeps a copy of
every adapted parameter (theta') and of its gradient alive in the graph until the outer backward; for UC2
base with every parameter adapted (--inner-params all), that is at least 2 x 4 bytes x (the parameter count,
counted here on the meta device) per inner step, before activations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: E402
import freeze  # noqa: E402
import train_uc2 as U  # noqa: E402
from comparisons.xvlmaml import maml as M  # noqa: E402
from comparisons.xvlmaml import xvlmaml as X  # noqa: E402

CONFIGS = {
    "plain": None,
    "fo_full": dict(variant="full", first_order=True),
    "so_full": dict(variant="full"),
    "so_full_top3": dict(variant="full", inner_params="top"),
    "so_unsup": dict(variant="unsupervised"),
    "so_full_joint": dict(variant="full", cl_embed="joint"),
}


def model_config(hidden: int) -> dict:
    return {
        **U.CONFIGS["tiny"],
        "hidden_size": hidden,
        "num_heads": 4,
        "intermediate_size": 4 * hidden,
        "pooler_size": hidden,
        "clf_hidden_size": hidden,
    }


def synthetic_batch(n: int, seed: int, vocab: int, tokens: int = 20, regions: int = 36) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (n,), generator=g)
    return {
        "input_ids": torch.randint(5, vocab, (n, tokens), generator=g),
        "attention_mask": torch.ones(n, tokens),
        "features": torch.randn(n, regions, 2048, generator=g),
        "spatials": torch.rand(n, regions, 7, generator=g),
        "image_mask": torch.ones(n, regions),
        "target": torch.nn.functional.one_hot(label, 3).float(),
        "label": label,
    }


class Setup:
    """One configuration: model, optimizer and a step function."""

    def __init__(self, name: str, hidden: int, batch: int):
        torch.manual_seed(0)
        c = model_config(hidden)
        spec = CONFIGS[name] or {}
        head = M.ContrastiveHead(hidden, 256)
        self.net = X.XVLModel(U.build_model("xvnli", c), head, spec.get("cl_embed", "separate"))
        self.layout = X.xvl_layout(U.layer_layout("xvnli", c))
        schedule = freeze.Schedule("full", self.layout.num_layers)
        args = argparse.Namespace(lr=1e-5, weight_decay=0.01, adam_eps=1e-8, adam_betas=[0.9, 0.999], warmup_ratio=0.0)
        self.opt, self.sched = engine.build_optimizer(self.net, self.layout, schedule, args, total_steps=10**6)
        self.name, self.spec = name, spec
        self.cfg = M.MamlConfig(variant=spec["variant"], first_order=spec.get("first_order", False)) if spec else None
        v = c["vocab_size"]
        self.en = synthetic_batch(batch, 1, v)
        self.support, self.query = {"aux": synthetic_batch(batch, 2, v)}, {"aux": synthetic_batch(batch, 3, v)}
        if spec and "task_en" in self.cfg.outer:
            self.query["en"] = self.en
        names = [n for n, _ in self.net.named_parameters()]
        self.adapt = M.adapt_names_for(
            names,
            self.layout.layer_of,
            self.layout.num_layers,
            spec.get("inner_params", "all"),
            3,
            lambda n: self.layout.layer_of(n) is None and self.layout.module_of(n) in self.layout.embedding_modules,
        )
        self.dist = engine.DistInfo()

    def step(self) -> None:
        if self.cfg is None:
            self.net.model.loss(self.en).backward()
        else:
            X.meta_step(
                self.net, self.cfg, iter([(self.support, self.query)]), 1, self.adapt, self.dist, torch.device("cpu")
            )
        engine.optimizer_step(self.net, self.opt, self.sched, None, 0.0, torch.zeros(()), self.dist)


def timed(setup: Setup) -> float:
    t = time.process_time()
    setup.step()
    return time.process_time() - t


def measure_time(setups: dict[str, Setup], rounds: int) -> dict:
    ratios: dict[str, list[float]] = {n: [] for n in CONFIGS if n != "plain"}
    seconds: dict[str, list[float]] = {n: [] for n in CONFIGS}
    order = list(CONFIGS)
    for r in range(rounds):
        rot = order[r % len(order) :] + order[: r % len(order)]
        t = {n: timed(setups[n]) for n in rot}
        for n in CONFIGS:
            seconds[n].append(t[n])
        for n in ratios:
            ratios[n].append(t[n] / t["plain"])
    return {
        "median_ratio_to_plain": {n: statistics.median(v) for n, v in ratios.items()},
        "round_ratios": ratios,
        "median_seconds": {n: statistics.median(v) for n, v in seconds.items()},
    }


def step_peak_bytes(setup: Setup) -> int:
    """Peak bytes allocated during one step above what was live when it began (torch.profiler's memory
    events: "Total Allocated" counts from the start of profiling)."""
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            setup.step()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max([e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"], default=0)


def measure_memory(setups: dict[str, Setup]) -> dict:
    peak = {n: step_peak_bytes(s) for n, s in setups.items()}
    params = sum(p.numel() * p.element_size() for p in setups["plain"].net.parameters())
    return {
        "step_peak_mib": {n: v / 2**20 for n, v in peak.items()},
        "param_mib": params / 2**20,
        "step_peak_ratio_to_plain": {n: v / max(peak["plain"], 1) for n, v in peak.items()},
    }


def full_scale() -> dict:
    with torch.device("meta"):
        m = U.build_model("xgqa", U.CONFIGS["base"])
    n = sum(p.numel() for p in m.parameters())
    emb = sum(p.numel() for name, p in m.named_parameters() if name.startswith("embeddings."))
    gib = 4 / 2**30
    return {
        "uc2_base_params": n,
        "embedding_params": emb,
        "second_order_extra_gib_per_inner_step_all_params": round(2 * n * gib, 2),
        "second_order_extra_gib_per_inner_step_without_embeddings": round(2 * (n - emb) * gib, 2),
        "note": "lower bounds (theta' and the inner gradient, fp32), before the activations of the inner "
        "backward that second order also keeps; --inner-params top skips the embeddings",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="support = query = English batch size")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="hidden 32, batch 4, 2 rounds (a smoke run)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.hidden, args.batch, args.rounds = 32, 4, 2
    res = {
        "benchmark": "xvlmaml_step",
        "hidden": args.hidden,
        "batch": args.batch,
        "rounds": args.rounds,
        "layers": 12,
        "vocab": U.CONFIGS["tiny"]["vocab_size"],
        "tokens": 20,
        "regions": 36,
        "full_scale": full_scale(),
    }
    setups = {n: Setup(n, args.hidden, args.batch) for n in CONFIGS}
    for s in setups.values():  # warm-up (allocator, optimizer state)
        s.step()
    res["memory"] = measure_memory(setups)
    res["time"] = measure_time(setups, args.rounds)
    t, mem = res["time"], res["memory"]
    print(f"UC2 12 layers, hidden {args.hidden}, batch {args.batch} (support = query = English), CPU, 1 thread")
    print(f"{'config':15s} {'CPU s/step':>10s} {'time x plain':>12s} {'step memory x plain':>20s}")
    for n in CONFIGS:
        ratio = 1.0 if n == "plain" else t["median_ratio_to_plain"][n]
        print(f"{n:15s} {t['median_seconds'][n]:10.3f} {ratio:12.2f} {mem['step_peak_ratio_to_plain'][n]:20.2f}")
    fs = res["full_scale"]
    print(
        f"full scale (UC2 base, {fs['uc2_base_params']:,} parameters, {fs['embedding_params']:,} in the embeddings): "
        f"second order keeps >= {fs['second_order_extra_gib_per_inner_step_all_params']} GiB per inner step with "
        f"every parameter adapted, >= {fs['second_order_extra_gib_per_inner_step_without_embeddings']} GiB without "
        "the embeddings, before activations"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
