"""--adamw (training/optim.py): `reference` takes the references' AdamW step (eps added to sqrt(v) before the bias
correction, weight decay after the update) per parameter, also when parameters of one group are at different update
counts; every group of freeze.param_groups steps at one count under every policy; runs resume bitwise, and a run
saved before the option existed resumes with the torch update it ran. The fixture-level check against IGLUE's and
X2-VLM's own AdamW is tests/test_train_step_parity.py."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import _faults  # noqa: E402
import engine  # noqa: E402
import freeze  # noqa: E402
from formats import run_folder, torch_files  # noqa: E402
from training import optim, progress  # noqa: E402

_spec = importlib.util.spec_from_file_location("_toy_train", ROOT / "tests" / "_toy_train.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.999), 1e-6


def _args(variant: str) -> argparse.Namespace:
    return argparse.Namespace(
        lr=LR, weight_decay=WD, adam_eps=EPS, adam_betas=list(BETAS), warmup_ratio=0.0, adamw=variant
    )


def _reference_adamw(params: dict, grads_per_step: list[dict]) -> dict:
    """The references' update written from its formula (float64): per parameter its own count t, m and v;
    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), then p -= lr * wd * p. A parameter without a
    gradient at a step is not touched."""
    b1, b2 = BETAS
    p = {n: v.double().clone() for n, v in params.items()}
    m = {n: torch.zeros_like(v) for n, v in p.items()}
    v2 = {n: torch.zeros_like(v) for n, v in p.items()}
    t = dict.fromkeys(p, 0)
    for grads in grads_per_step:
        for n, g in grads.items():
            g, wd = g.double(), (0.0 if p[n].ndim <= 1 else WD)
            t[n] += 1
            m[n] = b1 * m[n] + (1 - b1) * g
            v2[n] = b2 * v2[n] + (1 - b2) * g * g
            p[n] -= LR * math.sqrt(1 - b2 ** t[n]) / (1 - b1 ** t[n]) * m[n] / (v2[n].sqrt() + EPS)
            p[n] -= LR * wd * p[n]
    return p


def _train_steps(variant: str, drop: dict[int, set[str]], steps: int = 4):
    """4 engine.optimizer_step's on the toy model (full fine-tuning; tiny gradients, so that eps matters); at step i
    (0-based) the parameters named in drop[i] have their gradient removed (unused that step). Returns the model, its
    initial weights, the gradients each step applied and the stepping counts of each group before every step."""
    torch.manual_seed(0)
    model, lay = toy.ToyModel(2), toy.layout(2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    schedule = freeze.Schedule("full", 2)
    opt, sched = engine.build_optimizer(model, lay, schedule, _args(variant))
    x, y = torch.randn(6, toy.DIM), torch.tensor([0, 1, 2, 0, 1, 2])
    applied, counts = [], []
    for i in range(steps):
        (torch.nn.functional.cross_entropy(model(x), y) * 1e-4).backward()
        for n, p in model.named_parameters():
            if n in drop.get(i, ()):
                p.grad = None
        applied.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        counts.append(optim.step_counts(opt))
        groups = opt.param_groups
        ok, *_ = engine.optimizer_step(model, opt, sched, None, 0.0, torch.zeros(()), engine.DistInfo())
        assert ok and opt.param_groups is groups  # the optimizer's own groups after a split step
    return model, start, applied, counts, opt


def _max_rel_error(model, expected: dict) -> float:
    return max(((p.detach().double() - expected[n]).abs().max() / LR).item() for n, p in model.named_parameters())


def test_reference_variant_takes_the_references_adamw_step_of_every_parameter():
    model, start, applied, counts, opt = _train_steps("reference", {})
    assert all(len(set(c)) == 1 for step in counts for c in step)  # one count per group: no split
    assert _max_rel_error(model, _reference_adamw(start, applied)) < 1e-4
    assert all(g[optim.EPS_KEY] == EPS for g in opt.param_groups)
    # the same steps with torch's AdamW end far from the references' (the test can fail)
    torch_model, *_ = _train_steps("torch", {})
    assert _max_rel_error(torch_model, _reference_adamw(start, applied)) > 1e-2


def test_a_group_whose_parameters_are_at_different_counts_steps_each_at_its_own():
    # layer 0's bias has no gradient at steps 0-1: at steps 2-3 its group (layer_00.no_decay) mixes counts 0/2, 1/3
    model, start, applied, counts, _ = _train_steps("reference", {0: {"layers.0.0.bias"}, 1: {"layers.0.0.bias"}})
    mixed = [sorted(set(c)) for step in counts for c in step if len(set(c)) > 1]
    assert mixed == [[0, 2], [1, 3]], mixed
    assert _max_rel_error(model, _reference_adamw(start, applied)) < 1e-4


def test_torch_variant_is_torch_adamw_unchanged():
    model, start, applied, _, opt = _train_steps("torch", {0: {"layers.0.0.bias"}})
    assert all(optim.EPS_KEY not in g and g["eps"] == EPS for g in opt.param_groups)
    torch.manual_seed(0)
    plain = toy.ToyModel(2)
    groups = freeze.param_groups(plain, toy.layout(2), freeze.Schedule("full", 2), LR, WD)
    ref = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    for grads in applied:
        for n, p in plain.named_parameters():
            p.grad = grads.get(n)
        ref.step()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n


def test_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown AdamW variant 'hf'"):
        optim.set_update(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), "hf")


# ---------------------------------------------------------------- through engine.train (tests/_toy_train.py)

RUN = [
    "--task", "xvnli", "--epochs", "3", "--batch-size", "12", "--micro-batch-size", "4", "--num-workers", "0",
    "--dropout", "0.1", "--n-train", "48", "--suf-k", "1", "--adam-eps", "1e-3",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch):
    monkeypatch.setenv("SUF_DEVICE", "cpu")


def _run(out: Path, *extra: str) -> None:
    toy.main([*RUN, "--output-dir", str(out), *extra])


def _weights(run_dir: Path) -> dict:
    return torch_files.load_checkpoint(run_dir / run_folder.FINAL)["model"]


def _logged(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / run_folder.METRICS).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in progress.DataWait.KEYS} for r in records]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert _logged(a) == _logged(b)


def _interrupted(out: Path, monkeypatch, *extra: str) -> None:
    undo = _faults.install("raise:epoch_end:1", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="SUF_FAULT"):
        _run(out, *extra)
    undo()


@pytest.mark.parametrize("policy", ["full", "suf", "suf-step", "top", "llrd"])
def test_every_group_steps_at_one_count_under_every_policy(policy, tmp_path, monkeypatch):
    """freeze.param_groups: one group per layer or module, each trained or frozen as a whole, so the reference
    update never needs to split a group (also across SUF's stages and a resume)."""
    seen = []  # per step: each stepping group's distinct counts

    def recording(opt):
        counts = real(opt)
        seen.append([sorted(set(c)) for g, c in zip(opt.param_groups, counts) if optim.EPS_KEY in g and c])
        return counts

    real = optim.step_counts
    monkeypatch.setattr(optim, "step_counts", recording)
    name, _, unit = policy.partition("-")
    flags = ["--policy", name, "--unfreeze-unit", unit or "epoch", "--top-layers", "2"]
    _interrupted(tmp_path, monkeypatch, *flags)
    _run(tmp_path, *flags, "--resume")
    assert len(seen) == 12 and all(len(c) == 1 for step in seen for c in step), seen
    if name == "suf":  # the layers that joined later step at lower counts than the head, within one step
        assert max(len({c[0] for c in step}) for step in seen) >= 3, seen


def test_a_reference_run_resumes_bitwise_and_differs_from_a_torch_run(tmp_path, monkeypatch):
    _run(tmp_path / "whole")
    _interrupted(tmp_path / "resumed", monkeypatch)
    _run(tmp_path / "resumed", "--resume")
    _assert_same_run(tmp_path / "whole", tmp_path / "resumed")
    _run(tmp_path / "torch", "--adamw", "torch")
    assert not torch.equal(_weights(tmp_path / "whole")["head.weight"], _weights(tmp_path / "torch")["head.weight"])
    assert json.loads((tmp_path / "whole" / run_folder.ARGS).read_text())["adamw"] == "reference"


def test_a_run_saved_before_the_option_resumes_with_the_torch_adamw_it_ran(tmp_path, monkeypatch):
    _run(tmp_path / "whole", "--adamw", "torch")
    old = tmp_path / "old"
    _interrupted(old, monkeypatch, "--adamw", "torch")
    # what such a run left: no adamw in args.json nor in the checkpoint's arguments
    args = json.loads((old / run_folder.ARGS).read_text())
    del args["adamw"]
    (old / run_folder.ARGS).write_text(json.dumps(args))
    ckpt = torch_files.load_checkpoint(old / run_folder.CHECKPOINT)
    del ckpt["args"]["adamw"]
    assert not any(optim.EPS_KEY in g for g in ckpt["optimizer"]["param_groups"])
    run_folder.save_checkpoint(old / run_folder.CHECKPOINT, ckpt)
    _run(old, "--resume")  # today's default is reference: the run goes on as it ran
    _assert_same_run(tmp_path / "whole", old)
    assert torch_files.load_checkpoint(old / run_folder.CHECKPOINT)["args"]["adamw"] == "torch"


def test_resume_with_the_other_variant_is_refused(tmp_path, monkeypatch):
    _interrupted(tmp_path, monkeypatch)
    with pytest.raises(SystemExit, match="--adamw is 'torch' but the run .* used 'reference'"):
        _run(tmp_path, "--resume", "--adamw", "torch")
