"""Every experiment of the paper is one make target: `make -n` shows the exact command, and a
target whose inputs are missing stops before training, naming them."""

import subprocess
import sys
from pathlib import Path

import pytest

from _make import run_make

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = [f"{t}-{p}" for t in ("xgqa", "xvnli", "xflickrco") for p in ("full", "suf")]
pytestmark = pytest.mark.system  # every test runs make


def make(*args: str) -> subprocess.CompletedProcess:
    return run_make(*args)


@pytest.mark.parametrize("model", ["uc2", "cclm"])
@pytest.mark.parametrize("target", TABLE1)
def test_table1_target_prints_the_training_command(model, target):
    task, policy = target.split("-")
    out = make("-n", target, f"MODEL={model}", "NPROC=4", "DATA=/d", "CKPT=/c")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.strip().splitlines()[-1]
    visual = "--features data/features" if model == "uc2" else "--images data/images"
    per_epoch = " --eval-langs en" if task == "xflickrco" else ""  # all-pairs retrieval: English per epoch
    assert cmd == (
        f".venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 4 train_{model}.py "
        f"--task {task} --policy {policy} --data-root /d {visual} --checkpoint /c "
        f"--tokenizer xlm-roberta-base --eval-every 1{per_epoch} --output-dir runs/{model}-{target}"
    )


@pytest.mark.parametrize("model", ["uc2", "cclm"])
@pytest.mark.parametrize("policy", ["full", "suf"])
def test_marvl_targets_print_training_translate_test_and_fewshot_commands(model, policy):
    """make marvl-{full,suf} trains on NLVR2 like the Table 1 targets; translate-test-marvl-<policy> evaluates that
    run on the _gmt files; fewshot-marvl-<policy> continues it on a MaRVL few-shot split (IGLUE: id, tr, zh; batch
    32), defaults id / 10x2 unless LANG_FS= / SHOTS= are given."""
    visual = "--features data/features" if model == "uc2" else "--images data/images"
    train = make("-n", f"marvl-{policy}", f"MODEL={model}", "DATA=/d", "CKPT=/c").stdout.splitlines()[-1]
    assert train == (
        f".venv/bin/python train_{model}.py --task marvl --policy {policy} --data-root /d {visual} --checkpoint /c "
        f"--tokenizer xlm-roberta-base --eval-every 1 --output-dir runs/{model}-marvl-{policy} "
    )
    mt = make("-n", f"translate-test-marvl-{policy}", f"MODEL={model}").stdout.splitlines()[-1].split()
    assert mt == [".venv/bin/python", "eval_zeroshot.py", "evaluate", "--run-dir", f"runs/{model}-marvl-{policy}"] + [
        "--translate-test"
    ]
    fs = make("-n", f"fewshot-marvl-{policy}", f"MODEL={model}").stdout.splitlines()[-1]
    assert (
        f"eval_zeroshot.py fewshot --checkpoint runs/{model}-marvl-{policy}/model_final.pt --lang id --shots 10x2 "
        f"--fs-batch-size 32 --data-root data/iglue {visual}"
    ) in fs and fs.split("--output-dir ")[1].split()[0] == f"runs/{model}-marvl-{policy}-fewshot10x2-id"
    zh = make("-n", f"fewshot-marvl-{policy}", f"MODEL={model}", "LANG_FS=zh", "SHOTS=4").stdout.splitlines()[-1]
    assert "--lang zh --shots 4 " in zh and "-fewshot4-zh" in zh


def test_xflickrco_evaluates_the_asked_languages_per_epoch_and_every_language_when_emptied():
    """Per-epoch retrieval languages come from XFLICKRCO_EPOCH_LANGS (default en); empty: no --eval-langs, so
    every language after every epoch (the trainer's last epoch evaluates every language either way)."""
    asked = make("-n", "xflickrco-suf", "XFLICKRCO_EPOCH_LANGS=en de").stdout.splitlines()[-1]
    assert "--eval-every 1 --eval-langs en de --output-dir" in asked
    every = make("-n", "xflickrco-suf", "XFLICKRCO_EPOCH_LANGS=").stdout.splitlines()[-1]
    assert "--eval-every 1 --output-dir" in every and "--eval-langs" not in every


def test_llrd_sweep_runs_the_papers_four_decays():
    out = make("-n", "xgqa-llrd-sweep", "MODEL=cclm")
    cmds = [l for l in out.stdout.splitlines() if "train_cclm.py" in l]
    assert [c.split("--llrd-decay ")[1].split()[0] for c in cmds] == ["0.98", "0.95", "0.88", "0.75"]
    assert all("--policy llrd" in c and "--task xgqa" in c for c in cmds)


def test_other_paper_targets_print_their_commands():
    single = make("-n", "xgqa-top6", "MODEL=cclm").stdout.splitlines()[-1].strip()
    assert single.endswith("--output-dir runs/cclm-xgqa-top6") and "--policy top --top-layers 6" in single
    fewshot = make("-n", "fewshot-xgqa-suf", "LANG_FS=bn").stdout.splitlines()[-1]
    assert "eval_zeroshot.py fewshot --checkpoint runs/uc2-xgqa-suf/model_final.pt --lang bn --shots 48" in fewshot
    assert "--translate-test" in make("-n", "translate-test", "RUN=runs/r").stdout
    assert "-m report table --per-language runs/*/" in make("-n", "table1").stdout
    assert "-m report figures runs/*/" in make("-n", "figures").stdout


def test_target_with_missing_inputs_fails_before_training_naming_them(tmp_path):
    out = make(
        "xgqa-suf",
        f"DATA={tmp_path}/iglue",
        f"FEATURES={tmp_path}/feats",
        f"CKPT={tmp_path}/c.bin",
        f"OUT={tmp_path}/runs",
    )
    assert out.returncode != 0
    assert f"{tmp_path}/iglue/datasets" in out.stderr and f"{tmp_path}/feats" in out.stderr
    assert "train_uc2.py" not in out.stdout and not (tmp_path / "runs").exists()


def test_unknown_model_is_refused():
    out = make("-n", "xgqa-suf", "MODEL=lxmert")
    assert out.returncode != 0 and "MODEL must be uc2 or cclm" in out.stderr


def test_eval_takes_the_runs_own_inputs_unless_given():
    assert make("-n", "eval", "RUN=runs/r").stdout.splitlines()[-1].split() == [
        ".venv/bin/python",
        "eval_zeroshot.py",
        "evaluate",
        "--run-dir",
        "runs/r",
    ]
    given = make("-n", "translate-test", "RUN=runs/r", "DATA=/d", "TOKENIZER=/t", "EXTRA=--amp bf16").stdout
    assert given.splitlines()[-1].split()[-7:] == [
        "--translate-test",
        "--data-root",
        "/d",
        "--tokenizer",
        "/t",
        "--amp",
        "bf16",
    ]
    assert "--features" not in given and "--images" not in given
    out = make("eval")
    assert out.returncode != 0 and "RUN= names the run folder" in out.stderr


def test_targets_run_with_your_own_python_and_pass_extra(tmp_path):
    """PY= uses that interpreter and installs nothing; EXTRA= reaches the command (here: --help)."""
    run = tmp_path / "run"
    run.mkdir()
    out = make("eval", f"RUN={run}", f"PY={sys.executable}", "EXTRA=--help")
    assert out.returncode == 0, out.stderr
    assert "--run-dir" in out.stdout and "(default: 64)" in out.stdout
    assert not make("-n", "test", "PY=python3").stdout.count("venv")
    assert "figures runs/*/ --dpi 10" in make("-n", "figures", "EXTRA=--dpi 10").stdout.replace("  ", " ")


def test_missing_python_is_named_with_the_way_out(tmp_path):
    out = make("eval", f"RUN={tmp_path}", "PY=/nonexistent/python")
    assert out.returncode != 0 and "no Python at /nonexistent/python" in out.stderr and "PY=" in out.stderr


def test_sanity_evaluates_the_released_uc2_xgqa_checkpoint_beside_iglues_row():
    out = make("-n", "sanity", "CKPT_FT=/ft/pytorch_model_best.bin", "DATA=/d", "FEATURES=/f")
    assert out.returncode == 0, out.stderr
    assert (
        "eval_zeroshot.py evaluate --checkpoint /ft/pytorch_model_best.bin --released-task xgqa --data-root /d "
        "--features /f"
    ) in out.stdout
    assert "en 55.19, avg 29.35" in out.stdout


def test_help_opens_with_the_papers_experiments_and_lists_every_target_once():
    out = make("help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("The paper's experiments") and "{xgqa,xvnli,xflickrco}-{full,suf}" in lines[1]
    heads = [i for i, line in enumerate(lines) if not line.startswith("  ")]
    assert [lines[i].split(" (")[0].rstrip(":") for i in heads] == [
        "The paper's experiments",
        "MaRVL, IGLUE's fourth task",
        "The comparison systems",
        "Tests, benchmarks, the synthetic world",
    ]
    section = {line.split()[0]: sum(h <= i for h in heads) for i, line in enumerate(lines) if line.startswith("  ")}
    assert section["xgqa-top6"] == section["figures"] == 1
    assert section["marvl-{full,suf}"] == section["fewshot-marvl-{full,suf}"] == 2
    assert section["xvlmaml-{xgqa,xvnli,xflickrco}"] == section["pet-xtd"] == 3 and section["test"] == 4
    documented = [
        line.split()[1]
        for f in ("Makefile", "comparisons/mclip/mclip.mk")
        for line in (ROOT / f).read_text().splitlines()
        if line.startswith("## ") and "$(" not in line
    ]
    shown = [line.split()[0] for line in lines if line.startswith("  ")]
    marvl = ["marvl-{full,suf}", "translate-test-marvl-{full,suf}", "fewshot-marvl-{full,suf}"]
    assert sorted(shown) == sorted(
        documented + ["{xgqa,xvnli,xflickrco}-{full,suf}", "fewshot-xgqa-{full,suf}"] + marvl
    )


def test_readme_torchrun_example_is_the_command_its_make_target_runs():
    """README's example: the make line, then 'the command it runs' (torchrun = python -m torch.distributed.run)."""
    for page in ("README.md", "docs/reproducing.md"):
        text = (ROOT / page).read_text()
        block = text.split("```bash\nmake xgqa-suf ", 1)[1].split("```", 1)[0]
        make_line, rest = block.split("\n", 1)
        torchrun = " ".join(rest.replace("\\\n", " ").split())
        out = make("-n", "xgqa-suf", *make_line.split())
        assert out.returncode == 0, out.stderr
        ran = out.stdout.strip().splitlines()[-1].replace(".venv/bin/python -m torch.distributed.run", "torchrun")
        assert torchrun == " ".join(ran.split()), page
