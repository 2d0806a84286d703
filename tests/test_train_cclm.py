"""train_cclm.py on CPU with the tiny config, the shipped IGLUE sample and synthetic images:
every task under every policy learns a fixed batch, the real pipeline runs per task, 2-process
gloo == 1 process through a schedule change, stop + --resume is bitwise exact, and
--print-schedule pins CCLM's 18-layer schedules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _configs import CCLM_TINY  # noqa: E402
import data  # noqa: E402
from formats import tokenizer_check  # noqa: E402
from synthetic import fixtures  # noqa: E402
import engine  # noqa: E402
from training import progress  # noqa: E402
from formats import run_folder, torch_files  # noqa: E402
import freeze  # noqa: E402
import train_cclm  # noqa: E402
from formats import x2vlm  # noqa: E402
import _faults  # noqa: E402
import _guard  # noqa: E402
from _marvl_batches import cclm_batch, cclm_swapped  # noqa: E402

IGLUE = ROOT / "tests" / "fixtures" / "iglue"
# marvl: the sample has no NLVR2 train.jsonl (IGLUE stores it as a large-file pointer); its 60 dev lines train here
TRAIN = {"xgqa": "train_5", "xvnli": "train_48", "xflickrco": "valid", "marvl": "dev"}
EVAL = {
    "xgqa": ("dev", ["en"]),
    "xvnli": ("test", ["en", "ar"]),
    "xflickrco": ("test", ["en"]),
    "marvl": ("test", ["en", "id"]),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Synthetic images for every example used here and a tiny XLM-R-id tokenizer."""
    root = tmp_path_factory.mktemp("cclm")
    examples = []
    for task, split in TRAIN.items():
        examples += data.load_split(IGLUE, task, split, "en")
        eval_split, langs = EVAL[task]
        for lang in langs:
            examples += data.load_split(IGLUE, task, eval_split, lang)
    files = {ex.image_file for ex in examples} | {ex.image2_file for ex in examples if ex.image2_file}  # marvl: pairs
    fixtures.write_synthetic_images(root / "images", sorted(files), size=(48, 40))
    _, answers = data.load_answer_vocab(IGLUE)
    fixtures.make_tiny_tokenizer([ex.text for ex in examples] + answers, root / "tok", vocab_size=1000)
    return root


def cli(env: Path, task: str, out: Path, *extra: str) -> list[str]:
    return [
        "--task",
        task,
        "--data-root",
        str(IGLUE),
        "--images",
        str(env / "images"),
        "--tokenizer",
        str(env / "tok"),
        "--model-config",
        CCLM_TINY,
        "--train-split",
        TRAIN[task],
        "--num-workers",
        "0",
        "--seed",
        "0",
        "--output-dir",
        str(out),
        *extra,
    ]


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / run_folder.FINAL, map_location="cpu", weights_only=True)["model"]


def records(run: Path, kind: str) -> list[dict]:
    """metrics.jsonl records of a kind, without the wall-clock measurements (no two runs share those)."""
    return [
        {k: v for k, v in r.items() if k not in progress.DataWait.KEYS}
        for r in map(json.loads, (run / run_folder.METRICS).read_text().splitlines())
        if r["type"] == kind
    ]


# ---------------------------------------------------------------- schedules


def schedule_rows(capsys, task: str, *extra: str) -> list[dict]:
    train_cclm.main(["--task", task, "--print-schedule", "--json", *extra])  # base on the meta device
    return json.loads(capsys.readouterr().out)


def test_print_schedule_pins_cclm_schedules(capsys) -> None:
    rows = schedule_rows(capsys, "xvnli", "--policy", "suf")
    assert len(rows) == 10
    assert rows[0]["trainable_layers"] == [15, 16, 17]
    assert [len(r["trainable_layers"]) for r in rows] == [3, 6, 9, 12, 15, 18, 18, 18, 18, 18]  # all 18 from epoch 6
    assert rows[0]["always_trainable"] == ["embeddings", "head", "vision_encoder"]
    assert rows[5]["frozen_params"] == 0
    gqa = schedule_rows(capsys, "xgqa", "--policy", "suf")
    assert len(gqa) == 5 and gqa[-1]["trainable_layers"] == list(range(3, 18))  # 5 epochs: layers 0-2 never train
    assert "answer_decoder" in gqa[0]["always_trainable"]
    top = schedule_rows(capsys, "xgqa", "--policy", "top")
    assert all(r["trainable_layers"] == list(range(12, 18)) for r in top)  # m=6: the cross-modal layers
    assert top[0]["frozen_modules"] == ["embeddings", "vision_encoder"] and top[0]["always_trainable"] == [
        "answer_decoder"
    ]
    vnli_top = schedule_rows(capsys, "xvnli", "--policy", "top")
    assert vnli_top[0]["always_trainable"] == vnli_top[0]["task_head_modules"] == ["head"]
    llrd = schedule_rows(capsys, "xflickrco", "--policy", "llrd")
    assert llrd[0]["layer_lr_scale"][-1] == 1.0 and llrd[0]["layer_lr_scale"][0] == pytest.approx(0.88**17)


# ---------------------------------------------------------------- every task x policy learns


def fixed_batch(env: Path, task: str, n: int = 6) -> dict:
    tok = tokenizer_check.load_tokenizer(env / "tok")
    examples = data.load_split(IGLUE, task, TRAIN[task], "en")
    # xflickrco: 5 captions per image in the file; take n-1 images and a 2nd caption of the first
    examples = examples[0::5][: n - 1] + examples[1:2] if task == "xflickrco" else examples[:n]
    ds = data.make_dataset("cclm", task, examples, images=env / "images", train=True, image_res=32, seed=0)
    return data.CCLMCollate(task, tok, train=True)([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("policy", freeze.POLICIES)
@pytest.mark.parametrize("task", train_cclm.TASKS)
def test_fixed_batch_loss_falls(env: Path, task: str, policy: str) -> None:
    batch = fixed_batch(env, task)
    lr = 1e-4 if task == "xflickrco" else 2e-3  # ITC at temperature 0.07 overshoots at larger steps
    if task == "xflickrco" and policy == "top":
        lr = 3e-4  # only projections, temp and the cross layers move (encoders frozen): larger steps stay stable
    argv = ["--task", task, "--policy", policy, "--lr", str(lr), "--warmup-ratio", "0"]
    args = engine.parse_args(train_cclm.build_parser(), argv, train_cclm.DEFAULTS, "cclm")
    config = {**train_cclm.resolve_config(CCLM_TINY), "dropout": 0.0, "attn_dropout": 0.0, "vision_drop_path": 0.0}
    torch.manual_seed(0)
    model = train_cclm.build_model(task, config)
    layout = train_cclm.layer_layout(task, config)
    schedule = freeze.schedule_from_args(args, layout.num_layers)
    freeze.apply_schedule(model, layout, schedule, epoch=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt, sched = engine.build_optimizer(model, layout, schedule, args, {"vision_encoder": lr}, total_steps=6)
    losses = []
    for _ in range(6):
        torch.manual_seed(1)  # xflickrco: the same sampled hard negatives every step (a fixed objective)
        loss = model.loss(batch)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0] and min(losses) == losses[-1], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert bool(frozen) == (policy in ("suf", "top"))


# ---------------------------------------------------------------- the real pipeline


def test_xgqa_pipeline_with_eval(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "xgqa"
    train_cclm.main(
        cli(
            env,
            "xgqa",
            out,
            "--policy",
            "suf",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--max-steps-per-epoch",
            "2",
            "--eval-split",
            "dev",
            "--langs",
            "en",
            "--eval-every",
            "1",
        )
    )
    evals = records(out, "eval")
    assert [(r["epoch"], r["lang"]) for r in evals] == [(1, "en"), (2, "en")]
    assert 0.0 <= evals[-1]["accuracy"] <= 100.0
    train = records(out, "train")
    assert [r["trainable_layers"][0] for r in train] == [15, 12]
    meta = torch.load(out / run_folder.FINAL, map_location="cpu", weights_only=True)["meta"]
    assert meta["model"] == "cclm" and meta["task"] == "xgqa" and meta["config"]["image_res"] == 32
    # the final checkpoint rebuilds a model that predicts
    model = train_cclm.build_model("xgqa", meta["config"]).eval()
    x2vlm.load_checkpoint(model, str(out / run_folder.FINAL))
    model.prepare_task(IGLUE, tokenizer_check.load_tokenizer(env / "tok"))
    assert model.answer_ids.shape[0] == data.NUM_ANSWERS
    batch = fixed_batch(env, "xgqa", 2)
    with torch.no_grad():
        assert model.predict(batch).shape == (2,)


def assert_x2vlm_optimizer_groups(run: Path, task: str) -> None:
    """The trainer's optimizer is built with X2-VLM's rules (train_cclm.x2vlm_no_decay, lr_mult 2 for the new
    head; tests/test_ckpt_cclm.py checks those rules on the released layout): group names, sizes, peak lrs."""
    config = {**train_cclm.resolve_config(CCLM_TINY), "image_res": 32}
    model, layout = train_cclm.build_model(task, config), train_cclm.layer_layout(task, config)
    args = json.loads((run / run_folder.ARGS).read_text())
    want = freeze.param_groups(
        model,
        layout,
        freeze.Schedule("suf", layout.num_layers),
        args["lr"],
        args["weight_decay"],
        {"vision_encoder": args["vision_lr"]},
        train_cclm.x2vlm_no_decay,
        train_cclm.lr_mult_rule(("cls_head.",), 2.0),
    )
    got = torch_files.load_checkpoint(run / run_folder.CHECKPOINT)["optimizer"]["param_groups"]
    assert [(g["name"], len(g["params"]), g["initial_lr"], g["weight_decay"]) for g in got] == [
        (g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in want
    ]
    assert {g["name"] for g in got} >= {"head.lr_x2.decay", "head.lr_x2.no_decay"}


@pytest.mark.system
def test_ddp_two_processes_match_one(env: Path, tmp_path: Path) -> None:
    """xvnli (no sampled negatives), dropout 0, SUF: the trainable set changes at epoch 2. The 2-process run
    loads with a worker per rank (batches through BatchLoader slabs), the 1-process run in the main process."""
    common = (
        "--policy",
        "suf",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "4",
        "--max-steps-per-epoch",
        "2",
        "--dropout",
        "0",
    )
    one = tmp_path / "one"
    train_cclm.main(cli(env, "xvnli", one, *common, "--eval-split", "test", "--langs", "en", "ar"))
    assert {r["lang"] for r in records(one, "eval")} == {"en", "ar"}
    assert_x2vlm_optimizer_groups(one, "xvnli")
    two = tmp_path / "two"
    envvars = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "train_cclm.py"),
            *cli(env, "xvnli", two, *common, "--no-eval", "--num-workers", "1"),
        ],
        env=envvars,
        capture_output=True,
        text=True,
        timeout=scaled(240),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = final_state(one), final_state(two)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=2e-5, rtol=0), k
    la = [r["loss"] for r in records(one, "train")]
    lb = [r["loss"] for r in records(two, "train")]
    assert la == pytest.approx(lb, abs=1e-5)
    assert [r["trainable_layers"][0] for r in records(two, "train")] == [15, 12]


@pytest.mark.parametrize("task", ["xflickrco", "marvl"])
def test_stop_and_resume_is_bitwise_exact(task: str, env: Path, tmp_path: Path, monkeypatch) -> None:
    """Dropout on (both tasks), hard negatives drawn from the torch RNG (xflickrco), both images of each pair under
    the seeded training augmentation (marvl): all restored by --resume."""
    common = (
        "--policy",
        "suf",
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--micro-batch-size",
        "3",
        "--max-steps-per-epoch",
        "2",
        "--no-eval",
    )
    full = tmp_path / "full"
    train_cclm.main(cli(env, task, full, *common))
    cut = tmp_path / "cut"
    undo_fault = _faults.install("raise:epoch_end:1", monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="SUF_FAULT"):
        train_cclm.main(cli(env, task, cut, *common))
    assert not (cut / run_folder.FINAL).exists()
    undo_fault()
    train_cclm.main(cli(env, task, cut, *common, "--resume"))
    a, b = final_state(full), final_state(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(full, "train") == records(cut, "train")
    # the optimizer's groups and lrs come from the checkpoint: a changed X2-VLM lr_mult / ViT lr is refused
    for flag in ("--lr-mult", "--vision-lr"):
        with pytest.raises(SystemExit, match=f"{flag} is 1.0 but the run"):
            train_cclm.main(cli(env, task, cut, *common, "--resume", flag, "1"))


def test_cli_errors_are_one_line(env: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--images"):
        train_cclm.main(
            cli(env, "xvnli", tmp_path / "a", "--no-eval")[:4]
            + ["--images", str(tmp_path / "none"), "--output-dir", str(tmp_path / "a")]
        )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 32, "vision_widht": 32}))
    with pytest.raises(SystemExit, match="unknown key 'vision_widht'"):
        train_cclm.main(cli(env, "xvnli", tmp_path / "b", "--no-eval") + ["--model-config", str(bad)])
    with pytest.raises(SystemExit, match="nope.th"):
        train_cclm.main(cli(env, "xvnli", tmp_path / "c", "--no-eval", "--checkpoint", str(tmp_path / "nope.th")))


def test_non_finite_run_writes_no_result(env: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The trainers' guard: NaN logits at the final evaluation end the run as one line, exit status 1, with no
    model_final.pt, no results.json and no evaluation record."""
    monkeypatch.setattr(train_cclm.CCLMForXVNLI, "logits", _guard.nan_output(train_cclm.CCLMForXVNLI.logits))
    run = tmp_path / "run"
    argv = cli(env, "xvnli", run, "--epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "1", "--langs", "en")
    code, line = _guard.exit_line(train_cclm.main, argv, capsys)
    assert code == 1 and line.startswith("error: evaluation after epoch 1: non-finite logits (NaN or inf) for "), line
    assert _guard.results_written(run) == [] and '"type": "eval"' not in (run / run_folder.METRICS).read_text()


# ---------------------------------------------------------------- MaRVL: X2-VLM's XVLMPlusForMARVL


def marvl_model(seed: int = 0, **overrides) -> train_cclm.CCLMForMaRVL:
    torch.manual_seed(seed)
    return train_cclm.build_model("marvl", {**train_cclm.resolve_config(CCLM_TINY), **overrides}).eval()


def test_marvl_logits_are_cls_head_on_left_then_right_cross_outputs() -> None:
    """The ViT once over the 2B images, split into halves (left images first); the text and cross encoders once per
    half; cls_head on [position 0 with the left image ; position 0 with the right one]. Swapping the two halves
    of `images` swaps the two halves of the head's input."""
    model = marvl_model()
    batch = cclm_batch(model.config)
    ids, atts = batch["text_ids"], batch["text_atts"]
    with torch.no_grad():
        logits = model.logits(batch)
        v = model.vision_encoder(batch["images"])
        left, right = (model.cross_embeds(h, model.text_encoder(ids, atts), atts)[:, 0] for h in (v[:3], v[3:]))
        torch.testing.assert_close(logits, model.cls_head(torch.cat([left, right], -1)))
        swapped = model.logits(cclm_swapped(batch))
        torch.testing.assert_close(swapped, model.cls_head(torch.cat([right, left], -1)))
        assert logits.shape == (3, 2) and not torch.allclose(swapped, logits)
        assert model.predict(batch).tolist() == logits.argmax(-1).tolist()
        torch.testing.assert_close(model.loss(batch), torch.nn.functional.cross_entropy(logits, batch["label"]))


def test_marvl_runs_the_text_encoder_once_per_image_with_its_own_dropout() -> None:
    """get_cross_embeds(text_ids=...) runs the text encoder inside each of the two calls (X2-VLM): in training
    the two text passes draw separate dropout masks, so their outputs differ; in evaluation they are equal."""
    model = marvl_model()
    outs = []
    hook = model.text_encoder.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    batch = cclm_batch(model.config)
    with torch.no_grad():
        model.logits(batch)
        assert len(outs) == 2 and torch.equal(outs[0], outs[1])
        model.train()
        outs.clear()
        model.logits(batch)
    hook.remove()
    assert len(outs) == 2 and not torch.equal(outs[0], outs[1])


def test_marvl_defaults_and_schedule(capsys) -> None:
    """Paper silent on MaRVL: CCLM's MaRVL command (run.py --task nlvr --bs 128) with NLVR.yaml's lr 3e-5 and
    10 epochs; --print-schedule: 18 layers, each run twice, cls_head the task head."""
    assert train_cclm.DEFAULTS[("paper", "marvl")] == dict(epochs=10, lr=3e-5, batch_size=128)
    rows = schedule_rows(capsys, "marvl", "--policy", "suf")
    assert [len(r["trainable_layers"]) for r in rows] == [3, 6, 9, 12, 15, 18, 18, 18, 18, 18]
    assert all(r["passes_per_layer"] == 2 and r["task_head"] == ["cls_head"] for r in rows)
    assert rows[0]["always_trainable"] == ["embeddings", "head", "vision_encoder"]
