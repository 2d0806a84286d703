"""engine.py: exact resume (incl. SIGKILL mid-epoch / mid-save / after an unfreeze), non-finite guard,
run-folder safety, data order, shard/gather, and torchrun (gloo, 2 and 3 processes) through every
schedule change of every policy. The toy trainer tests/_toy_train.py drives the real engine.train.

The subprocess runs (killed runs, torchrun) start together in the `launches` fixture and run while
the in-process tests do, to keep the file fast on 2 cores."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import engine  # noqa: E402
import freeze  # noqa: E402
from console import cli, what_trains  # noqa: E402
from formats import run_folder, torch_files  # noqa: E402
from training import after_epoch, devices, progress  # noqa: E402
import _faults  # noqa: E402

TOY = ROOT / "tests" / "_toy_train.py"
FAULTS = ROOT / "tests" / "_faults.py"  # python FAULTS SPEC script ARGS: script with a fault installed
_spec = importlib.util.spec_from_file_location("_toy_train", TOY)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

# SUF: 4 toy layers, k=1 -> the trainable set changes at every epoch; dropout on so RNG state matters.
RESUME_ARGS = [
    "--task",
    "xvnli",
    "--policy",
    "suf",
    "--suf-k",
    "1",
    "--epochs",
    "3",
    "--batch-size",
    "12",
    "--micro-batch-size",
    "4",
    "--num-workers",
    "0",
    "--dropout",
    "0.1",
    "--n-train",
    "48",
    "--eval-every",
    "1",
]
# torchrun: global batch 12 = 2 x 3 x 2 = 2 x 2 x 3; 11 eval items shard unevenly over 2 and 3 ranks.
DIST_ARGS = [
    "--task",
    "xvnli",
    "--suf-k",
    "1",
    "--top-layers",
    "2",
    "--epochs",
    "2",
    "--batch-size",
    "12",
    "--micro-batch-size",
    "2",
    "--max-steps-per-epoch",
    "3",
    "--num-workers",
    "0",
    "--dropout",
    "0",
    "--n-eval",
    "11",
    "--eval-every",
    "1",
]
VARIANTS = ["full", "suf", "suf-step", "llrd", "top"]
DROPOUT = "dropout"  # variant: full fine-tuning with --dropout 0.1 (masks drawn per rank)
KILLS = {"mid_epoch": "kill:step:6", "mid_save": "kill:save_mid:2", "after_unfreeze": "kill:unfreeze:2"}
FAIL = {2: "hang", 3: "raise"}
DIST_TIMEOUT = 5
ENV = {**os.environ, "SUF_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch):
    monkeypatch.setenv("SUF_DEVICE", "cpu")


def run(out: Path, *extra: str, base=RESUME_ARGS) -> None:
    toy.main([*base, "--output-dir", str(out), *extra])


def weights(run_dir: Path) -> dict:
    return torch_files.load_checkpoint(run_dir / "model_final.pt")["model"]


def assert_bitwise(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # metrics.jsonl too: what the killed run logged after its checkpoint was dropped on resume
    assert logged(a) == logged(b)


def logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock measurements (data wait, step time), which no two runs share."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in progress.DataWait.KEYS} for r in records]


class Launch:
    """A subprocess whose output and end time are collected by a thread (tests may look much later)."""

    def __init__(self, cmd: list[str], env: dict):
        self.env = env
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        self.out = self.proc.stdout.read()
        self.proc.wait()
        self.end = time.time()

    def finish(self, timeout: float = 240) -> tuple[int, str, float]:
        timeout = scaled(timeout)
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.proc.kill()
            pytest.fail(f"{self.proc.args} still running after {timeout}s")
        return self.proc.returncode, self.out, self.end


@pytest.fixture(scope="module")
def launches(tmp_path_factory, system_tests_run):
    """Start every subprocess at once; tests wait for their own."""
    base = tmp_path_factory.mktemp("launch")
    procs = {}
    if not system_tests_run:  # -m "not system": the tests that collect them do not run
        yield base, procs
        return
    dist_timeout = scaled(DIST_TIMEOUT)  # the healthy steps' collectives must not time out on a loaded machine
    for name, fault in KILLS.items():
        procs[name] = Launch(
            [sys.executable, str(FAULTS), fault, str(TOY), *RESUME_ARGS, "--output-dir", str(base / name)], ENV
        )
    for n, fail in FAIL.items():
        procs[n] = Launch(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                str(TOY),
                *DIST_ARGS,
                "--output-dir",
                str(base / f"torchrun{n}"),
                "--variants",
                *VARIANTS,
                DROPOUT,
                "--fail",
                fail,
            ],
            {**ENV, "SUF_DIST_TIMEOUT": str(dist_timeout)},
        )
    yield base, procs
    for launch in procs.values():
        if launch.proc.poll() is None:
            launch.proc.kill()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, launches) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    run(out)
    return out


# ------------------------------------------------------------------------------------------ resume


def test_metrics_jsonl_and_final_checkpoint(reference):
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["epoch"] for r in train] == [1, 2, 3] and [r["step"] for r in train] == [4, 8, 12]
    assert [r["trainable_layers"] for r in train] == [[3], [2, 3], [1, 2, 3]]
    assert train[0]["trainable_params"] < train[1]["trainable_params"] < train[2]["trainable_params"]
    assert all(r["nonfinite_steps"] == 0 and r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 for r in train)
    assert {(r["epoch"], r["lang"]) for r in evals} == {(e, lang) for e in (1, 2, 3) for lang in ("en", "de")}
    assert all(r["split"] == "test" and r["n"] == 10 and 0 <= r["accuracy"] <= 100 for r in evals)
    final = torch_files.load_checkpoint(reference / "model_final.pt")
    assert (
        final["meta"]["policy"] == "suf"
        and final["meta"]["epoch"] == 3
        and final["meta"]["config"] == {"layers": 4, "dim": 8}
    )
    assert json.loads((reference / "args.json").read_text())["lr"] == 1e-2


def test_resume_after_epoch_1_is_bitwise_equal(tmp_path, reference, monkeypatch):
    undo_fault = _faults.install("raise:epoch_end:1", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="SUF_FAULT"):
        run(tmp_path)
    assert torch_files.load_checkpoint(tmp_path / "checkpoint_last.pt")["progress"]["epoch"] == 1
    undo_fault()
    run(tmp_path, "--resume")
    assert_bitwise(reference, tmp_path)


@pytest.mark.system
@pytest.mark.parametrize("case", list(KILLS))
def test_sigkill_then_resume_is_bitwise_equal(case, launches, reference):
    base, procs = launches
    rc, out, _ = procs[case].finish()
    assert rc == -signal.SIGKILL, out
    run_dir = base / case
    assert not (run_dir / "model_final.pt").exists()
    last = torch_files.load_checkpoint(run_dir / "checkpoint_last.pt")  # the last complete one always loads
    assert last["progress"]["epoch"] == 1
    if case == "mid_save":  # died writing epoch 2's checkpoint: only the tmp file is damaged
        with pytest.raises(ValueError, match=r"checkpoint_last\.pt\.tmp is truncated or corrupt"):
            torch_files.load_checkpoint(run_dir / "checkpoint_last.pt.tmp")
    run(run_dir, "--resume")
    assert_bitwise(reference, run_dir)


def test_resume_from_corrupt_checkpoint_is_one_line_error(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpt = run_dir / "checkpoint_last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:
        run(run_dir, "--resume")
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg and "truncated or corrupt" in msg
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize(
    "flag,value,saved", [("--lr", "0.02", "0.01"), ("--dropout", "0.2", "0.1"), ("--amp", "bf16", "'auto'")]
)
def test_resume_with_changed_settings_errors(tmp_path, reference, flag, value, saved):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    with pytest.raises(SystemExit, match=f"{flag} is '?{value}'? but the run .* used {saved}"):
        run(run_dir, "--resume", flag, value)


# ------------------------------------------------------------------------------------------ run folder


def test_existing_run_folder_without_resume_errors(reference):
    before = {p.name: p.read_bytes() for p in reference.iterdir()}
    with pytest.raises(SystemExit, match="already holds a run .*pass --resume"):
        run(reference)
    assert {p.name: p.read_bytes() for p in reference.iterdir()} == before


def test_unwritable_output_folder_errors_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        run(blocker / "run")
    assert str(e.value).startswith("error: cannot write to --output-dir") and "\n" not in str(e.value)
    assert blocker.read_text() == "not a folder"  # nothing written, nothing replaced


def test_resume_without_a_run_errors(tmp_path):
    with pytest.raises(SystemExit, match="holds no run to resume"):
        run(tmp_path / "nothing", "--resume")


# ------------------------------------------------------------------------------------------ non-finite loss


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, capsys):
    run(tmp_path, "--policy", "full", "--epochs", "2", "--nan-index", "5")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["nonfinite_steps"] for r in train] == [1, 2]  # example 5 is in one global batch per epoch
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in train)
    assert all(torch.isfinite(w).all() for w in weights(tmp_path).values())
    assert "non-finite loss or gradient" in capsys.readouterr().err


def test_many_nonfinite_in_a_row_stop_with_checkpoint_intact(tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--nan-from-epoch", "1", "--max-nonfinite", "3")
    msg = str(e.value)
    assert "3 non-finite losses in a row at epoch 2" in msg and "checkpoint_last.pt (after epoch 1)" in msg
    ckpt = torch_files.load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert ckpt["progress"]["epoch"] == 1 and not (tmp_path / "model_final.pt").exists()
    assert all(torch.isfinite(w).all() for w in ckpt["model"].values())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_modes_train(tmp_path, amp):
    run(tmp_path, "--amp", amp, "--epochs", "1", "--clip-grad", "1.0")
    ckpt = torch_files.load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(w).all() for w in weights(tmp_path).values())


# ------------------------------------------------------------------------------------------ distributed


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, launches) -> Path:
    out = tmp_path_factory.mktemp("single")
    run(out, "--variants", *VARIANTS, DROPOUT, base=DIST_ARGS)
    return out


@pytest.mark.system
@pytest.mark.parametrize("world", sorted(FAIL))
def test_torchrun_ranks_agree_match_single_process_and_fail_fast(world, launches, single_process):
    base, procs = launches
    rc, out, end = procs[world].finish()
    runs = base / f"torchrun{world}"
    for variant in VARIANTS:
        rank_hashes = [json.loads((runs / variant / f"hashes.rank{r}.json").read_text()) for r in range(world)]
        assert len(rank_hashes[0]) == 6 and all(h == rank_hashes[0] for h in rank_hashes), variant  # after every step
        one, many = weights(single_process / variant), weights(runs / variant)
        for k in one:
            torch.testing.assert_close(many[k], one[k], rtol=1e-5, atol=1e-6, msg=f"{variant} {k}")
        for epoch in (1, 2):  # uneven shards: every eval item exactly once, in order
            assert json.loads((runs / variant / f"eval_ids.epoch{epoch}.json").read_text()) == list(range(11))
        evals = [line for line in (runs / variant / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
        assert evals == [
            line for line in (single_process / variant / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
        ]

    def trained_layers(variant):
        return [
            r["trainable_layers"]
            for r in map(json.loads, (runs / variant / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"
        ]

    assert trained_layers("suf") == [[3], [2, 3]]  # changed between epochs
    assert trained_layers("suf-step") == [[1, 2, 3], [0, 1, 2, 3]]  # changed at steps 1, 2, 3
    # then rank 1 raised (or hung): the whole run must exit non-zero, within the collective timeout
    assert rc != 0, out
    started = float(out.split("toy: failure phase ")[1].split()[0])
    # the room scales with the load at launch or now, whichever is higher (the 1-minute load falls after a run)
    collective = float(procs[world].env["SUF_DIST_TIMEOUT"])
    assert end - started < collective + max(scaled(30), 30 * collective / DIST_TIMEOUT), out
    assert (
        ("injected failure" in out) if FAIL[world] == "raise" else ("Timed out" in out or "timed out" in out.lower())
    ), out


@pytest.mark.system
@pytest.mark.parametrize("world", sorted(FAIL))
def test_torchrun_with_dropout_ranks_agree_but_differ_from_one_process(world, launches, single_process):
    """What DDP guarantees with --dropout > 0: every rank draws its own dropout masks, so the ranks still hold
    identical weights after every step, but the run is NOT the 1-process run (the README promises equality
    with one process only for --dropout 0; if this ever starts to match, update the README)."""
    base, procs = launches
    procs[world].finish()
    runs = base / f"torchrun{world}" / DROPOUT
    rank_hashes = [json.loads((runs / f"hashes.rank{r}.json").read_text()) for r in range(world)]
    assert len(rank_hashes[0]) == 6 and all(h == rank_hashes[0] for h in rank_hashes)
    one, many = weights(single_process / DROPOUT), weights(runs)
    assert args_of(runs)["dropout"] == args_of(single_process / DROPOUT)["dropout"] == 0.1
    differ = [k for k in one if not torch.allclose(many[k], one[k], rtol=1e-5, atol=1e-6)]
    assert differ, "with dropout the multi-process run matched one process"
    # without dropout the same settings match (test_torchrun_ranks_agree_match_single_process_and_fail_fast: full)
    assert args_of(runs.parent / "full")["dropout"] == 0.0


def args_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "args.json").read_text())


def test_each_rank_seeds_its_own_random_stream(tmp_path):
    """Dropout masks (and any other torch randomness in the step) come from seed + rank on rank `rank`:
    reproducible run to run, different between ranks. (world=1 with rank 1 runs start_fresh without a
    process group; a non-main rank writes nothing.)"""
    args = argparse.Namespace(seed=7)
    for rank in (0, 1, 2):
        engine.start_fresh(
            tmp_path, args, devices.DistInfo(rank=rank, world=1), run_folder.MetricsLog(tmp_path / "m", False)
        )
        assert torch.initial_seed() == 7 + rank


# ------------------------------------------------------------------------------------------ units


def test_shard_covers_every_index_once():
    for world in range(1, 5):
        for n in range(12):
            parts = [devices.shard(n, devices.DistInfo(rank=r, world=world)) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_global_batches_identical_for_any_world_size():
    def global_batches(world: int, micro: int, epoch: int) -> list[list[int]]:
        per_rank = []
        for r in range(world):
            s = engine.GlobalBatchSampler(50, 12, micro, devices.DistInfo(rank=r, world=world), seed=3)
            s.set_epoch(epoch)
            per_rank.append(list(s))
            assert len(per_rank[-1]) == len(s)
        accum = 12 // (micro * world)
        steps = [
            [i for a in range(k * accum, (k + 1) * accum) for r in range(world) for i in per_rank[r][a]]
            for k in range(len(per_rank[0]) // accum)
        ]
        return steps

    ref = global_batches(1, 12, 0)
    assert len(ref) == 4 and len({i for b in ref for i in b}) == 48  # incomplete last batch dropped
    for world, micro in ((1, 3), (2, 2), (3, 4), (3, 1)):
        assert global_batches(world, micro, 0) == ref
    assert global_batches(1, 12, 1) != ref


def test_set_epoch_reaches_sampler_and_dataset():
    data = toy.ToyData(24, 0)
    args = argparse.Namespace(batch_size=12, micro_batch_size=None, grad_accum=None, seed=0, num_workers=0)
    loader = engine.build_train_loader(data, args, devices.DistInfo())
    engine.set_epoch(loader, 2)
    assert data.epoch == 2 and loader.batch_sampler.epoch == 2


def test_micro_and_accum():
    ns = lambda **kw: argparse.Namespace(**{"batch_size": 12, "micro_batch_size": None, "grad_accum": None, **kw})  # noqa: E731
    world2 = devices.DistInfo(rank=0, world=2)
    assert engine.micro_and_accum(ns(), world2) == (6, 1)
    assert engine.micro_and_accum(ns(micro_batch_size=2), world2) == (2, 3)
    assert engine.micro_and_accum(ns(grad_accum=2), world2) == (3, 2)
    with pytest.raises(SystemExit, match="must equal micro-batch 5"):
        engine.micro_and_accum(ns(micro_batch_size=5), world2)


def test_linear_warmup_then_decay():
    f = engine.linear_warmup_decay(2, 10)
    assert [f(s) for s in range(11)] == [0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]


def test_args_defaults_recipe_and_user_values():
    iglue = {"weight_decay": 1e-4, "adam_eps": 1e-6, "clip_grad": 1.0}
    defaults = {
        ("paper", "xgqa"): {"epochs": 5, "lr": 4e-5, "batch_size": 256},
        ("paper", "xvnli"): {"epochs": 10, "lr": 2e-5, "batch_size": 128},
        ("paper", "xflickrco"): {"epochs": 10},  # no lr, no batch size
        ("iglue", "xgqa"): {"epochs": 5, "lr": 4e-5, "batch_size": 256, **iglue},
        ("iglue", "xvnli"): {"epochs": 10, "lr": 2e-5, "batch_size": 128, **iglue},
    }
    parser = cli.ArgumentParser()
    engine.add_common_args(parser, defaults)
    a = engine.parse_args(parser, ["--task", "xgqa", "--langs", "en,de", "id"], defaults, "m")
    assert (a.epochs, a.lr, a.batch_size, a.weight_decay, a.clip_grad, a.warmup_ratio) == (5, 4e-5, 256, 0.01, 0.0, 0.1)
    assert a.langs == ["en", "de", "id"] and a.output_dir == "runs/m_xgqa_full_seed42"
    b = engine.parse_args(
        parser, ["--task", "xvnli", "--recipe", "iglue", "--weight-decay", "0.05", "--epochs", "2"], defaults, "m"
    )
    assert (b.epochs, b.lr, b.weight_decay, b.adam_eps, b.clip_grad) == (2, 2e-5, 0.05, 1e-6, 1.0)
    with pytest.raises(SystemExit, match="--lr has no default for task xflickrco"):
        engine.parse_args(parser, ["--task", "xflickrco"], defaults, "m")


def test_print_schedule_writes_nothing(tmp_path, capsys):
    run(tmp_path / "run", "--print-schedule", "--json")
    rows = json.loads(capsys.readouterr().out)
    assert [r["trainable_layers"] for r in rows] == [[3], [2, 3], [1, 2, 3]]
    assert not (tmp_path / "run").exists()


def test_loader_workers_do_not_change_the_result(tmp_path):
    """Workers copy the dataset after set_epoch: per-epoch randomness and order as with no workers."""
    for workers in ("0", "2"):
        run(tmp_path / workers, "--policy", "full", "--epochs", "2", "--num-workers", workers, "--log-every", "3")
    assert_bitwise(tmp_path / "0", tmp_path / "2")
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "2" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    assert steps == [3, 4, 6, 8]  # every --log-every steps and at each epoch end


# ------------------------------------------------------------------------------------------ recipe hooks


def test_no_decay_rule_hook_reaches_the_optimizer():
    model, lay = toy.ToyModel(), toy.layout(4)
    args = argparse.Namespace(
        lr=1e-2, weight_decay=0.1, adam_eps=1e-8, adam_betas=[0.9, 0.999], warmup_ratio=0.1, adamw="reference"
    )
    names = {id(p): n for n, p in model.named_parameters()}

    def exempt(opt) -> set[str]:
        return {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}

    default, _ = engine.build_optimizer(model, lay, freeze.Schedule("full", 4), args)
    assert exempt(default) == {n for n, p in model.named_parameters() if p.ndim <= 1}  # paper: every 1-d param
    by_name = lambda name, p: name.endswith(".bias")  # noqa: E731  a name rule, like IGLUE/VOLTA's
    hooked, _ = engine.build_optimizer(model, lay, freeze.Schedule("full", 4), args, no_decay=by_name)
    assert exempt(hooked) == {n for n in names.values() if n.endswith(".bias")}
    assert "layers.0.3.weight" not in exempt(hooked)  # a LayerNorm weight, decayed by the name rule
    assert sum(len(g["params"]) for g in hooked.param_groups) == len(names)


def test_schedule_epochs_stretches_the_lr_schedule(tmp_path):
    # 48 examples / batch 12 = 4 steps per epoch; 2 epochs trained, schedule for 5: 20 steps, 2 warm-up
    run(tmp_path / "long", "--policy", "full", "--epochs", "2", "--schedule-epochs", "5", "--log-every", "1")
    lrs = [
        json.loads(line)["lr"]
        for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    factor = engine.linear_warmup_decay(2, 20)
    assert lrs == pytest.approx([1e-2 * factor(s) for s in range(8)]) and lrs[-1] > 0.5e-2
    assert json.loads((tmp_path / "long" / "args.json").read_text())["schedule_epochs"] == 5
    parser = cli.ArgumentParser()
    engine.add_common_args(parser, toy.DEFAULTS)
    assert (
        engine.parse_args(parser, ["--task", "xgqa", "--epochs", "3"], toy.DEFAULTS, "toy").schedule_epochs == 3
    )  # --epochs
    with pytest.raises(SystemExit, match="--schedule-epochs 1 is shorter than --epochs 3"):
        engine.parse_args(parser, ["--task", "xgqa", "--epochs", "3", "--schedule-epochs", "1"], toy.DEFAULTS, "toy")
    with pytest.raises(SystemExit, match="--resume: --schedule-epochs is 6 but the run .* used 5"):
        run(
            tmp_path / "long",
            "--policy",
            "full",
            "--epochs",
            "2",
            "--schedule-epochs",
            "6",
            "--log-every",
            "1",
            "--resume",
        )


# ------------------------------------------------------------------------------------- a run folder is never destroyed


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {f: (run_dir / f).read_bytes() for f in run_folder.RUN_FILES if (run_dir / f).exists()}


def one_line_exit(*argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        run(*argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_crash_in_evaluation_loses_no_training_and_resume_reruns_it(tmp_path, reference, monkeypatch):
    # epoch 2's evaluation fails (a corrupt test image, ...)
    undo_fault = _faults.install("raise:evaluate:2", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="SUF_FAULT"):
        run(tmp_path)
    progress = torch_files.load_checkpoint(tmp_path / "checkpoint_last.pt")["progress"]
    assert progress["epoch"] == 2 and progress["eval_pending"]  # epoch 2's training is kept
    undo_fault()
    run(tmp_path, "--resume")
    assert_bitwise(reference, tmp_path)  # weights and metrics.jsonl (epoch 2's evaluation logged once)


def test_evaluation_error_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    def nan_eval(model, epoch):
        raise FloatingPointError("non-finite logits (NaN or inf) for 2 of 4 examples of a batch")

    monkeypatch.setattr(toy, "make_evaluate", lambda *a: nan_eval)
    msg = one_line_exit(tmp_path, "--epochs", "1")
    assert msg.startswith("error: evaluation after epoch 1: non-finite logits") and "--resume" in msg, msg
    assert torch_files.load_checkpoint(tmp_path / "checkpoint_last.pt")["progress"]["epoch"] == 1
    assert not (tmp_path / "model_final.pt").exists()


def test_failed_checkpoint_write_removes_its_tmp_and_says_so(tmp_path, monkeypatch):
    # the disk fills up writing epoch 2's checkpoint
    _faults.install("enospc:save_mid:2", monkeypatch=monkeypatch)
    msg = one_line_exit(tmp_path)
    ckpt = tmp_path / "checkpoint_last.pt"
    assert msg == (
        f"error: cannot write checkpoint {ckpt}: No space left on device; removed the partial checkpoint_last.pt.tmp"
    ), msg
    assert not (tmp_path / "checkpoint_last.pt.tmp").exists()
    assert torch_files.load_checkpoint(ckpt)["progress"]["epoch"] == 1  # the previous one is intact
    assert not (tmp_path / "model_final.pt").exists()


_FULL_DISK = """
import os, resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk with ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # args.json, metrics.jsonl fit; a checkpoint does not
sys.argv = sys.argv[1:]
if sys.argv[0] == "save":
    sys.path.insert(0, sys.argv[1])
    import torch
    from formats import run_folder
    for write in (
        lambda: run_folder.atomic_write_text(sys.argv[2] + ".json", "x" * 100_000),
        lambda: run_folder.save_checkpoint(sys.argv[2], {"w": torch.zeros(100_000)}),
    ):
        try:
            write()
        except run_folder.CheckpointWriteError as e:
            print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python tests/_toy_train.py` has it
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_full_disk_while_logging_metrics_is_one_line_naming_the_file():
    """metrics.jsonl on a full disk (/dev/full: a real ENOSPC at flush) is the same one-line CheckpointWriteError the
    loop turns into `error: ...`, not an OSError traceback."""
    log = run_folder.MetricsLog(Path("/dev/full"), enabled=True)
    with pytest.raises(run_folder.CheckpointWriteError) as e:
        log.write({"type": "train", "loss": 0.5})
    assert str(e.value) == (
        "cannot write /dev/full: No space left on device; the last checkpoint is intact (--resume drops the partial "
        "line)"
    )


@pytest.mark.parametrize("writer", ["save_checkpoint", "toy_trainer"])
def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_tmp(tmp_path, writer):
    """A real failed write (a file-size limit: torch.save's write gets EFBIG, which torch rewords as a
    RuntimeError 'unexpected pos ...'): one line naming the file and the OS's cause, exit status 1, no .tmp."""
    if writer == "save_checkpoint":
        argv, ckpt = ["save", str(ROOT), str(tmp_path / "x.pt")], tmp_path / "x.pt"
    else:
        argv, ckpt = [str(TOY), *RESUME_ARGS, "--output-dir", str(tmp_path)], tmp_path / "checkpoint_last.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, *argv], capture_output=True, text=True, timeout=scaled(120), env=ENV
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last == (
        f"error: cannot write checkpoint {ckpt}: File too large; removed the partial {ckpt.name}.tmp"
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if writer == "save_checkpoint":  # the one atomic writer of text files (args.json, results.json, ...) too
        text = proc.stderr.strip().splitlines()[-2]
        assert text.startswith(f"error: cannot write {ckpt}.json: File too large; removed the partial .x.pt.json.tmp")
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] and not ckpt.exists()


@pytest.mark.parametrize("case", ["finished", "started"])
def test_resume_without_checkpoint_of_a_run_with_results_is_refused(tmp_path, reference, monkeypatch, case):
    run_dir = tmp_path / "run"
    if case == "finished":  # checkpoint_last.pt deleted to save space
        shutil.copytree(reference, run_dir)
    else:  # killed in epoch 3: two epochs done, then its checkpoint deleted
        undo_fault = _faults.install("raise:step:10", monkeypatch=monkeypatch)
        with pytest.raises(RuntimeError, match="SUF_FAULT"):
            run(run_dir)
        undo_fault()
    (run_dir / "checkpoint_last.pt").unlink()
    before = run_files(run_dir)
    msg = one_line_exit(run_dir, "--resume", "--lr", "0.02")
    if case == "finished":
        assert msg == (
            f"error: --resume: {run_dir} holds a finished run (model_final.pt, metrics.jsonl, args.json) "
            f"but no checkpoint_last.pt to continue from; nothing was changed: its model is "
            f"{run_dir / 'model_final.pt'}; to train again choose another --output-dir"
        )
    else:
        assert msg == (
            f"error: --resume: {run_dir} holds a run that completed 2 epoch(s) (metrics.jsonl, args.json) "
            f"but its checkpoint_last.pt is gone; nothing was changed: restore checkpoint_last.pt to "
            f"continue, or choose another --output-dir"
        )
    assert run_files(run_dir) == before


def test_resume_of_a_finished_run_changes_nothing(tmp_path, reference, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = run_files(run_dir)
    run(run_dir, "--resume")
    assert f"nothing to do: {run_dir} finished its 3 epochs" in capsys.readouterr().out
    assert run_files(run_dir) == before


def test_run_without_a_finite_step_fails_and_writes_no_final_model(tmp_path):
    msg = one_line_exit(tmp_path, "--epochs", "1", "--nan-from-epoch", "0", "--max-nonfinite", "100")
    assert msg == (
        "error: the run made no finite optimizer step (4 steps: 4 non-finite, 0 skipped by the fp16 "
        "scaler); model_final.pt not written (its weights would be the initial ones); check the data, "
        "--lr and --amp"
    )
    assert not (tmp_path / "model_final.pt").exists()


@pytest.mark.system
def test_second_process_on_a_run_folder_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path):
    """A real run holds the folder: a second one (fresh or --resume) is refused with the holder's pid; once the
    holder is SIGKILLed, the kernel has dropped its lock and --resume continues."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, str(FAULTS), "hang:step:6", str(TOY), *RESUME_ARGS, "--output-dir", str(run_dir)],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in holder.stderr:  # epoch 1 checkpointed, hanging in epoch 2
            if "SUF_FAULT: hang" in line:
                break
        before = run_files(run_dir)
        for extra in ((), ("--resume",)):
            msg = one_line_exit(run_dir, *extra)
            assert msg == (
                f"error: {run_dir} is in use by another process (pid {holder.pid}); wait for it to end, "
                "or choose another --output-dir"
            ), msg
        assert run_files(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    run(run_dir, "--resume")
    assert torch_files.load_checkpoint(run_dir / "model_final.pt")["meta"]["epoch"] == 3


def test_bad_training_record_mid_epoch_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A bad record the start-up sample missed, met in epoch 2: one line (the loader's BadInput), and
    epoch 1's checkpoint is the one to resume from."""
    from formats.bad_input import BadInput

    read = toy.ToyData.__getitem__

    def getitem(self, i):
        if self.epoch == 1 and i == 7 and len(self) == 48:
            raise BadInput(
                "feats.lmdb: feature record '7': features is a float32 array of shape [4, 1024]; "
                "expected a float array of shape [N, 2048]"
            )
        return read(self, i)

    monkeypatch.setattr(toy.ToyData, "__getitem__", getitem)
    msg = one_line_exit(tmp_path)
    assert msg == (
        "error: training data: feats.lmdb: feature record '7': features is a float32 array of shape "
        "[4, 1024]; expected a float array of shape [N, 2048]; last good checkpoint: "
        f"{tmp_path / 'checkpoint_last.pt'} (after epoch 1)"
    ), msg
    assert torch_files.load_checkpoint(tmp_path / "checkpoint_last.pt")["progress"]["epoch"] == 1


# ------------------------------------------------------------------------------ schedule once per stage, console


def count_calls(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[3:])  # (epoch, step)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize(
    "unit, stages", [("epoch", [(0, 0), (1, 4), (2, 8)]), ("step", [(0, 0), (0, 1), (0, 2), (0, 3)])]
)
def test_schedule_is_applied_once_per_stage_not_every_step(tmp_path, monkeypatch, unit, stages):
    """12 optimizer steps; SUF k=1 over 4 layers changes the trainable set 3 times per epoch unit, 4 per step unit
    (--unfreeze-every 1 step: layers join at steps 0-3, then everything trains)."""
    calls = count_calls(monkeypatch, freeze, "apply_schedule")
    run(tmp_path, "--unfreeze-unit", unit, "--dropout", "0")
    assert calls == stages


def test_resumed_run_applies_its_stage_on_its_first_step(tmp_path, reference, monkeypatch):
    undo_fault = _faults.install("raise:epoch_end:2", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="SUF_FAULT"):
        run(tmp_path)
    undo_fault()
    calls = count_calls(monkeypatch, freeze, "apply_schedule")
    run(tmp_path, "--resume")
    assert calls == [(2, 8)]
    assert_bitwise(reference, tmp_path)


def test_console_names_each_trainable_set_once_and_one_metric_per_language(tmp_path, capsys):
    run(tmp_path, "--log-every", "1")
    out = capsys.readouterr().out.splitlines()
    changes = [line for line in out if " train; " in line]
    total = sum(p.numel() for p in toy.ToyModel().parameters())
    per_layer = sum(p.numel() for p in toy.ToyModel().layers[0].parameters())
    assert changes == [
        f"epoch {e}: {'layers' if e > 1 else 'layer'} {3 - e + 1}{'–3' if e > 1 else ''} + embeddings, head train; "
        f"{total - (4 - e) * per_layer} trainable of {total}"
        for e in (1, 2, 3)
    ]
    epochs = [line for line in out if line.startswith("epoch ") and " test accuracy: " in line]
    assert len(epochs) == 3 and all(line.split(": ", 1)[1].count(" ") == 3 for line in epochs)  # "en x de y"


def test_console_shows_mid_epoch_stage_changes_with_their_step(tmp_path, capsys):
    run(tmp_path, "--unfreeze-unit", "step", "--unfreeze-every", "2", "--epochs", "2", "--dropout", "0")
    changes = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if " train; " in line]
    assert changes == ["epoch 1", "epoch 1, step 2", "epoch 2", "epoch 2, step 6"]


def test_metrics_log_the_fraction_of_step_time_spent_waiting_for_data(reference):
    train = [r for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 and r["step_s"] > 0 for r in train)


def test_data_wait_counts_only_time_inside_next(monkeypatch):
    now = [100.0]  # a clock the test moves: the machine's load cannot change the numbers
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])

    def batches():
        for b in (1, 2):
            now[0] += 0.002  # waiting for the batch
            yield b

    waits = progress.DataWait(batches())
    start = time.perf_counter()
    assert next(waits) == 1
    now[0] += 0.010  # the "step": not waiting
    waits.end_step(start)
    record = waits.record()
    assert record == {"data_wait_frac": round(0.002 / 0.012, 4), "step_s": 0.012}
    assert waits.wait_time == waits.step_time == 0.0 and waits.steps == 0  # reset for the next record


# ------------------------------------------------------------------------------------------ evaluation cost


def eval_epochs(run_dir: Path) -> list[tuple[int, str]]:
    return [
        (r["epoch"], r["lang"])
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "eval"
    ]


def test_default_evaluates_only_after_the_last_epoch(tmp_path):
    run(tmp_path, "--eval-every", "0")
    assert eval_epochs(tmp_path) == [(3, "en"), (3, "de")]
    parser = cli.ArgumentParser()
    engine.add_common_args(parser, toy.DEFAULTS)
    assert engine.parse_args(parser, ["--task", "xgqa"], toy.DEFAULTS, "toy").eval_every == 0


def test_eval_every_and_eval_langs_the_last_epoch_is_complete(tmp_path):
    run(tmp_path, "--eval-every", "2", "--eval-langs", "de", "--epochs", "5")
    assert eval_epochs(tmp_path) == [(2, "de"), (4, "de"), (5, "en"), (5, "de")]


def test_evaluation_runs_under_the_runs_amp_dtype(tmp_path, monkeypatch):
    seen = []

    def evaluate_fn(model, epoch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled()))
        return {}

    after_epoch.evaluate(evaluate_fn, toy.ToyModel(), 0, amp_dtype=torch.bfloat16)
    after_epoch.evaluate(evaluate_fn, toy.ToyModel(), 0)
    assert seen == [(True, torch.bfloat16, False), (False, torch.get_autocast_dtype("cpu"), False)]
    passed = []
    original = after_epoch.evaluate
    monkeypatch.setattr(
        after_epoch, "evaluate", lambda fn, model, epoch, **kw: passed.append(kw) or original(fn, model, epoch, **kw)
    )
    run(tmp_path / "amp", "--amp", "bf16", "--epochs", "1")
    run(tmp_path / "fp32", "--amp", "bf16", "--epochs", "1", "--eval-fp32")
    assert passed == [{"amp_dtype": torch.bfloat16, "langs": None}, {"amp_dtype": None, "langs": None}]


# ------------------------------------------------------------------------------------------ loader workers, CLI


def test_default_workers_share_the_cpus_among_the_nodes_processes():
    assert engine.default_num_workers(cpus=2, procs_per_node=1) == 1
    assert engine.default_num_workers(cpus=32, procs_per_node=4) == 7
    assert engine.default_num_workers(cpus=96, procs_per_node=1) == 16  # capped
    assert engine.default_num_workers(cpus=4, procs_per_node=8) == 0
    parser = cli.ArgumentParser()
    engine.add_common_args(parser, toy.DEFAULTS)
    assert (
        engine.parse_args(parser, ["--task", "xgqa"], toy.DEFAULTS, "toy").num_workers == engine.default_num_workers()
    )
    assert engine.parse_args(parser, ["--task", "xgqa", "--num-workers", "3"], toy.DEFAULTS, "toy").num_workers == 3


def test_help_shows_defaults_and_argument_errors_are_one_line_on_rank_0_only(capsys, monkeypatch):
    parser = cli.ArgumentParser(prog="t")
    engine.add_common_args(parser, toy.DEFAULTS)
    text = parser.format_help()
    assert "(default: 42)" in text and "(default: full)" in text
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--policy", "suf"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == lines
        assert rank == "1" or err.startswith("t: error: the following arguments are required: --task")


@pytest.mark.system
def test_design_card_command_under_torchrun_prints_one_error_line():
    """`torchrun --nproc_per_node 4 train_cclm.py --policy suf` (2 ranks here): one line naming --task."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "train_cclm.py"),
            "--policy",
            "suf",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=scaled(240),
    )
    mine = [line for line in (proc.stdout + proc.stderr).splitlines() if "train_cclm.py: error" in line]
    assert proc.returncode != 0 and len(mine) == 1 and "--task" in mine[0]
    assert "usage:" not in proc.stdout + proc.stderr


def test_run_main_prints_an_error_exit_once(capsys, monkeypatch):
    def main():
        raise SystemExit("error: --data-root x: no such folder")

    for rank, printed in (("0", "error: --data-root x: no such folder\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            cli.run_main(main)
        assert e.value.code == 1 and capsys.readouterr().err == printed


def test_bad_input_ends_main_as_one_line_naming_the_input_once(capsys, monkeypatch):
    @cli.exits_on_bad_input
    def main(path: str):
        with cli.about("--checkpoint", path):
            raise ValueError(f"{path}: missing key 'head.0.weight'\n  MISSING  head.0.weight")

    @cli.exits_on_bad_input
    def main_unnamed(path: str):
        with cli.about("--checkpoint", path):
            raise ValueError("checkpoint (ours): missing key 'x'")

    for rank, details in (("0", "  MISSING  head.0.weight\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            main("a.pt")
        assert e.value.code == "error: --checkpoint: a.pt: missing key 'head.0.weight'"
        assert capsys.readouterr().err == details  # the report above the error, from rank 0 only
    with pytest.raises(SystemExit) as e:
        main_unnamed("a.pt")
    assert e.value.code == "error: --checkpoint: a.pt: checkpoint (ours): missing key 'x'"


def test_trainable_summary_names_frozen_modules_and_full_training():
    model, lay = toy.ToyModel(), toy.layout(4)
    total = sum(p.numel() for p in model.parameters())
    assert (
        what_trains.trainable_summary(model, lay, freeze.Schedule("full", 4), 0)
        == f"all layers + embeddings, head train; {total} trainable of {total}"
    )
    top = what_trains.trainable_summary(model, lay, freeze.Schedule("top", 4, top_layers=2), 0)
    assert top.startswith("layers 2–3 + head train (embeddings frozen); ")
