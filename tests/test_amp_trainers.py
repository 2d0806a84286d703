"""--amp in the two trainers outside engine.train: comparisons/mclip/train_mclip.py (M-CLIP + PET) and
comparisons/xvlmaml/xvlmaml.py (XVL-MAML on UC2).
Both reuse engine's AMP (setup_amp, autocast, optimizer_step's GradScaler handling, autocast_for); these tests pin
that autocast is applied where it should be and nowhere else, and what fp16 / resume do with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from _timeouts import scaled

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _faults  # noqa: E402
from comparisons.mclip import train_mclip as MC  # noqa: E402
from comparisons.xvlmaml import maml  # noqa: E402
from comparisons.xvlmaml import xvlmaml as X  # noqa: E402
from formats import run_folder  # noqa: E402
from test_maml import final_state, sample, train_argv  # noqa: E402,F401  (sample: a module fixture)
from parity import assert_matches_reference  # noqa: E402
from test_mclip import cli, lines, world  # noqa: E402,F401  (world: a module fixture)

BF16_UNIT = 2.0**-8  # bf16's unit roundoff (8 significant bits)
# The first step's loss (same weights, same batch) under bf16 autocast against float32: a handful of bf16
# roundings through a two-layer tower; measured 0.2% (M-CLIP) and 0.1% (XVL-MAML), allowed 4 units = 1.6%.
RTOL_BF16_LOSS = 4 * BF16_UNIT


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """These tests pin the CPU's behaviour (auto = off there; CPU fp16), on a machine with a GPU too."""
    monkeypatch.setenv("SUF_DEVICE", "cpu")


def linear_output_dtypes(run) -> set[tuple[bool, torch.dtype]]:
    """{(module in training mode, output dtype)} of every nn.Linear forward while run() executes."""
    seen: set[tuple[bool, torch.dtype]] = set()

    def hook(module, args, out):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(out):
            seen.add((module.training, out.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen


def cut_after_first_epoch(monkeypatch, run, loop) -> None:
    with _faults.injected("raise:epoch_end:1", loop):
        with pytest.raises(RuntimeError, match="injected failure"):
            run()


# ---------------------------------------------------------------- the float32 similarities of both losses


def test_loss_similarities_stay_float32_under_bf16_autocast():
    """Autocast would run the similarity matmul in bf16 (100 x cos rounded in steps of up to 0.5): both
    contrastive losses compute it in float32, so under autocast they equal the float32 loss bitwise."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 16), torch.randn(6, 16)
    a_n, b_n = MC.l2_normalise(a), MC.l2_normalise(b)
    want_mclip, want_maml = MC.symmetric_ce(a_n, b_n), maml.contrastive_loss(a, b, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(MC.symmetric_ce(a_n, b_n), want_mclip)
        assert torch.equal(maml.contrastive_loss(a, b, 0.07), want_maml)


# ---------------------------------------------------------------- train_mclip.py


@pytest.mark.parametrize(
    "amp,eval_amp,train_dtype,eval_dtype",
    [
        ("auto", "off", torch.float32, torch.float32),  # auto is off on CPU
        ("bf16", "off", torch.bfloat16, torch.float32),  # validation and test in float32 unless asked
        ("bf16", "bf16", torch.bfloat16, torch.bfloat16),
    ],
)
def test_mclip_amp_runs_the_text_tower_in_its_dtype_and_evaluates_in_float32_unless_asked(
    world, tmp_path, amp, eval_amp, train_dtype, eval_dtype
):
    run = lambda: MC.main(cli(world, tmp_path / "r", "--epochs", "1", "--amp", amp, "--eval-amp", eval_amp))  # noqa
    assert linear_output_dtypes(run) == {(True, train_dtype), (False, eval_dtype)}


def test_mclip_bf16_first_loss_is_the_float32_one_within_bf16_rounding(world, tmp_path):
    for amp in ("off", "bf16"):
        MC.main(cli(world, tmp_path / amp, "--epochs", "1", "--amp", amp))
    f32, bf16 = (lines(tmp_path / amp, "train") for amp in ("off", "bf16"))
    assert bf16[0]["loss"] != f32[0]["loss"]  # bf16 did run
    assert bf16[0]["loss"] == pytest.approx(f32[0]["loss"], rel=RTOL_BF16_LOSS)
    assert all(r["amp_skipped_steps"] == 0 and r["nonfinite_steps"] == 0 for r in bf16)  # no scaler in bf16


def test_mclip_fp16_resume_is_bitwise_exact_with_the_scaler_state(world, tmp_path, monkeypatch):
    """fp16 on the CPU (torch's CPU autocast and GradScaler('cpu')): the tiny tower's scaled gradients overflow
    the first steps of every epoch here, so the GradScaler skips them and lowers its scale; a run resumed
    without the scaler's state would start again from 65536 and take other steps."""
    argv = lambda name, *extra: cli(world, tmp_path / name, "--epochs", "3", "--amp", "fp16", *extra)  # noqa
    MC.main(argv("whole"))
    cut_after_first_epoch(monkeypatch, lambda: MC.main(argv("cut")), _faults.MCLIP)
    saved = torch.load(tmp_path / "cut" / run_folder.CHECKPOINT, weights_only=True)["scaler"]
    assert saved["scale"] < 65536.0  # the state to restore is not the initial one
    MC.main(argv("cut", "--resume"))
    a, b = (torch.load(tmp_path / r / run_folder.FINAL, weights_only=True)["model"] for r in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / run_folder.METRICS).read_text() == (tmp_path / "cut" / run_folder.METRICS).read_text()
    # every skipped step halved the scale (growth needs 2000 good steps in a row): the count is exact
    skipped = lines(tmp_path / "whole", "train")[-1]["amp_skipped_steps"]
    scale = torch.load(tmp_path / "whole" / run_folder.CHECKPOINT, weights_only=True)["scaler"]["scale"]
    assert skipped > 0 and scale == 65536.0 * 0.5**skipped


def test_mclip_resume_with_another_amp_is_refused(world, tmp_path, monkeypatch):
    cut_after_first_epoch(monkeypatch, lambda: MC.main(cli(world, tmp_path / "cut", "--amp", "bf16")), _faults.MCLIP)
    with pytest.raises(
        SystemExit, match=r"^error: --resume: --amp is 'off' but the run in \S+args\.json used 'bf16'; "
    ):
        MC.main(cli(world, tmp_path / "cut", "--resume", "--amp", "off"))


def test_mclip_trains_in_float32_unless_asked_as_the_reference_and_help_lists_amp(capsys):
    assert MC.build_parser().get_default("amp") == "off"  # the published numbers are float32 training
    with pytest.raises(SystemExit):
        MC.main(["--help"])
    out = capsys.readouterr().out
    assert "--amp {auto,bf16,fp16,off}" in out and "--eval-amp {off,bf16,fp16}" in out


# ---------------------------------------------------------------- xvlmaml.py


def one_iteration(sample, out, *extra) -> list[str]:
    return train_argv(sample, out, "--epochs", "1", "--iters-per-epoch", "1", "--log-every", "1", *extra)


@pytest.mark.parametrize("order", [[], ["--first-order"]], ids=["second-order", "first-order"])
def test_xvlmaml_bf16_autocasts_both_loops_and_its_meta_loss_is_the_float32_one_within_bf16_rounding(
    sample, tmp_path, order
):
    dtypes, loss = {}, {}
    for amp in ("auto", "bf16"):  # auto: off on CPU
        dtypes[amp] = linear_output_dtypes(lambda: X.main(one_iteration(sample, tmp_path / amp, "--amp", amp, *order)))
        loss[amp] = json.loads((tmp_path / amp / run_folder.METRICS).read_text().splitlines()[0])["meta_loss"]
    assert dtypes == {"auto": {(True, torch.float32)}, "bf16": {(True, torch.bfloat16)}}
    assert loss["bf16"] != loss["auto"] and loss["bf16"] == pytest.approx(loss["auto"], rel=RTOL_BF16_LOSS)


def test_xvlmaml_fp16_is_refused_in_one_line_before_anything_is_written(sample, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --amp fp16 is not supported by XVL-MAML: [^\n]*; use --amp bf16"):
        X.main(train_argv(sample, tmp_path / "r", "--amp", "fp16"))
    assert not (tmp_path / "r").exists()


def test_xvlmaml_bf16_resume_is_bitwise_exact_and_another_amp_is_refused(sample, tmp_path, monkeypatch):
    argv = lambda name, *extra: train_argv(  # noqa: E731
        sample, tmp_path / name, "--epochs", "2", "--iters-per-epoch", "1", "--first-order", "--amp", "bf16", *extra
    )
    X.main(argv("whole"))
    cut_after_first_epoch(monkeypatch, lambda: X.main(argv("cut")), _faults.XVLMAML)
    with pytest.raises(SystemExit, match=r"^error: --resume: --amp is 'off' but the run in \S+ used 'bf16'"):
        X.main([*argv("cut", "--resume"), "--amp", "off"])
    X.main(argv("cut", "--resume"))
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / run_folder.METRICS).read_text() == (tmp_path / "cut" / run_folder.METRICS).read_text()


def test_xvlmaml_help_lists_amp(capsys):
    with pytest.raises(SystemExit):
        X.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--amp {auto,bf16,fp16,off}" in out and "--eval-amp {off,bf16,fp16}" in out


@pytest.mark.system
def test_mclip_fp16_under_torchrun_takes_the_one_process_scaler_decisions(world, tmp_path):
    """2 gloo ranks, --dropout 0, uneven shards (2 + 1, then 1 + an empty one): every rank holds the loss of the
    whole batch and the summed gradients, so the GradScaler skips the same steps with the same scale as one
    process, the first step's loss is bitwise the one-process one and the weights are the one-process ones within
    tests/parity.py's tolerance (as in float32, test_mclip.py). One epoch only: over 3 epochs this tiny tower
    (lr 1e-2, logits of 100 x cos) grows the fp16 rounding by which a shard's forward differs from the whole
    batch's (other padded lengths) into loss differences of ~1e-3 (measured), beyond any fixed tolerance."""
    import os
    import subprocess

    common = ("--n-shot", "4", "--batch-size", "3", "--eval-steps", "2", "--dropout", "0", "--epochs", "1")
    common += ("--pet", "lora_cross", "--lora-r", "2", "--amp", "fp16")
    MC.main(cli(world, tmp_path / "one", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "SUF_DEVICE": "cpu"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "comparisons.mclip.train_mclip", *cli(world, tmp_path / "two", *common)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(tmp_path / r / run_folder.CHECKPOINT, weights_only=True) for r in ("one", "two"))
    assert one["scaler"] == two["scaler"] and one["scaler"]["scale"] < 65536.0  # a skip happened, on both
    train = [lines(tmp_path / r, "train") for r in ("one", "two")]
    assert [r["amp_skipped_steps"] for r in train[0]] == [r["amp_skipped_steps"] for r in train[1]]
    assert train[0][0]["loss"] == train[1][0]["loss"]
    for k in one["model"]:  # bitwise equal here; held to the float32 comparison's tolerance (tests/parity.py)
        assert_matches_reference(k, two["model"][k], one["model"][k])
