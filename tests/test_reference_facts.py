"""The code's citations of reference behaviour point into docs/reference_facts.md: every cited fact id exists
there, and no file cites a path a user's clone does not have (the team's ../shared/ notes) or a section of a
README that is not ours."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "docs" / "reference_facts.md"
CITATION = re.compile(r"docs/reference_facts\.md#(F-[A-Za-z0-9-]+)")
UNREACHABLE = re.compile(r"/work/shared|\.\./shared/|shared/reference|README §")


def code_files() -> list[Path]:
    """Every Python file of the repository: the top level and every folder (scoring/, report/, formats/, ...)."""
    skip = {".venv", ".git", "fixtures"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def test_every_cited_fact_exists_in_the_facts_file() -> None:
    anchors = re.findall(r'<a id="(F-[A-Za-z0-9-]+)"></a>', FACTS.read_text())
    assert len(anchors) == len(set(anchors)), "duplicate fact ids"
    cited = {(p.name, m) for p in code_files() for m in CITATION.findall(p.read_text())}
    assert cited, "no file cites docs/reference_facts.md"
    assert {m for _, m in cited} <= set(anchors), sorted((f, m) for f, m in cited if m not in anchors)


def test_no_code_cites_a_path_or_section_users_do_not_have() -> None:
    here = Path(__file__).name
    found = [
        f"{p.name}:{i}: {line.strip()}"
        for p in code_files()
        if p.name != here
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if UNREACHABLE.search(line)
    ]
    assert not found, "\n".join(found)


# ---------------------------------------------------------------- M-CLIP / PET: the reference's hyperparameters
# Each value with the line it comes from (PECTVLM 22b7594 = eric-ai-lab/PECTVLM, OpenDelta 067eed2 =
# thunlp/OpenDelta v0.3.2, which PECTVLM's requirement.txt leaves unpinned); docs/reference_facts.md#F-pectvlm-args,
# #F-opendelta-compacter-act. Each test checks what the code builds or parses, so changing the value fails it.

import math  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
from comparisons.mclip import train_mclip as M  # noqa: E402

BASE_ARGV = ["--dataset", "xtd", "--data-root", "x", "--lang", "de", "--tokenizer", "t", "--output-dir", "o"]
REFERENCE_DEFAULTS = {
    "lora_r": (8, "PECTVLM run_XTD.py:33 --lora_r 8 (the paper's LoRA)"),
    "lora_alpha": (16, "OpenDelta opendelta/delta_models/lora.py:57 LoraConfig lora_alpha=16 (PECTVLM sets none)"),
    "adapter_dim": (24, "PECTVLM run_XTD.py:34 --adapter_bottleneck_dim 24"),
    "compacter_reduction": (16, "PECTVLM run_XTD.py:35 --compacter_reduction_factor 16"),
    "phm_dim": (4, "OpenDelta opendelta/delta_models/compacter.py:151 hypercomplex_division=4"),
    "compacter_act": ("relu", "OpenDelta compacter.py:147 CompacterConfig non_linearity='relu'"),
    "soft_tokens": (4, "PECTVLM run_XTD.py:37 --soft_token_num 4"),
    "epochs": (50, "PECTVLM scripts/de.sh:9 --epoch 50"),
    "batch_size": (5, "PECTVLM scripts/de.sh:10 --train_bs 5"),
    "eval_batch_size": (100, "PECTVLM scripts/de.sh:11 --eval_bs 100"),
    "eval_steps": (5, "PECTVLM scripts/de.sh:12 --eval_steps 5"),
    "lr": (1e-4, "PECTVLM scripts/de.sh:13 --text_lr 1e-4"),
    "seed": (1, "PECTVLM scripts/de.sh:14 --seed 1"),
    "align_loss": ("mse", "PECTVLM scripts/de.sh:16 --text_loss_strategy mse"),
    "align_ratio": (0.5, "PECTVLM scripts/de.sh:17 --text_loss_ratio 0.5"),
    "split_seed": (42, "PECTVLM run_XTD.py:49 --split_seed 42"),
    "head_lr": (3e-6, "PECTVLM run_XTD.py:31 --head_lr 3e-6 (--tuning_head's group)"),
    "tuning_head": ("off", "PECTVLM run_XTD.py:30 --tuning_head store_true (off unless given)"),
}


def test_mclip_command_line_defaults_are_the_references_values():
    args = vars(M.parse_args(BASE_ARGV))
    wrong = {k: (args[k], want, src) for k, (want, src) in REFERENCE_DEFAULTS.items() if args[k] != want}
    assert not wrong, wrong


def _tiny(pet: str, **over):
    args = M.parse_args([*BASE_ARGV, *(f"--{k.replace('_', '-')}={v}" for k, v in over.items())])
    torch.manual_seed(0)
    model = M.build_text_model("tiny")
    M.apply_pet(model, pet, args)
    return model


def test_lora_scaling_is_alpha_over_r_with_openDeltas_alpha_16():
    # OpenDelta lora.py:36 scaling = lora_alpha / r; peft the same: 16 / 8 = 2 at the defaults
    model = _tiny("lora")
    scalings = {v for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) for v in m.scaling.values()}
    assert scalings == {16 / 8}


def test_adapter_weights_start_at_std_0_01_and_zero_biases():
    # OpenDelta opendelta/delta_models/adapter.py:109-111: weight N(0, 0.01), bias 0
    torch.manual_seed(0)
    a = M.BottleneckAdapter(1024, 24)
    for lin in (a.down_proj, a.up_proj):
        assert math.isclose(float(lin.weight.detach().std()), 0.01, rel_tol=0.05) and not lin.bias.any()


def test_compacter_rule_starts_at_std_0_01_and_runs_relu():
    # OpenDelta layers/hypercomplex_linear.py:184 phm_rule N(0, 0.01) (phm_c_init 'normal'); compacter.py:147
    torch.manual_seed(0)
    phm = M.PHMLinear(1024, 64, n=4)
    big = torch.stack([M.PHMLinear(1024, 64, n=4).phm_rule for _ in range(50)])
    assert math.isclose(float(big.std()), 0.01, rel_tol=0.1) and not phm.b.any()
    assert M.Compacter(8, reduction=2, n=4).act == "relu"


def test_soft_prompt_without_prefix_starts_at_std_0_02():
    # PECTVLM run_XTD.py:249 "std": 0.02
    torch.manual_seed(0)
    model = M.build_text_model("tiny")
    M.add_soft_prompt(model, None, None, 2000)
    prompt = [p for n, p in model.named_parameters() if "soft" in n or "prompt" in n]
    assert prompt and math.isclose(float(prompt[0].detach().std()), 0.02, rel_tol=0.05)


# ---------------------------------------------------------------- reporting beside the references' logs
import json  # noqa: E402

from report import tables  # noqa: E402


def _run(tmp_path, name: str, model: str, task: str, langs: dict, args: dict | None = None) -> str:
    run = tmp_path / name
    run.mkdir()
    rec = {"model": model, "task": task, "policy": "full", "split": "test", "langs": langs}
    (run / "results.json").write_text(json.dumps({"test": rec}))
    if args is not None:
        (run / "args.json").write_text(json.dumps(args))
    return str(run)


def _notes(runs) -> list[str]:
    t = tables.build_tables(runs)
    assert all(n in tables.format_tables(t) for n in t["footnotes"])
    return t["footnotes"]


ALL_XVNLI = {l: {"accuracy": 50.0, "n": 4} for l in ("en", "ar", "es", "fr", "ru")}


def test_cclm_xvnli_is_also_given_as_x2vlms_log_prints_it_over_n_plus_1(tmp_path):
    langs = {**ALL_XVNLI, "fr": {"accuracy": 25.0, "n": 4}}
    notes = _notes([_run(tmp_path, "c", "cclm", "xvnli", langs), _run(tmp_path, "u", "uc2", "xvnli", ALL_XVNLI)])
    # 50% of 4 = 2 correct: X2-VLM prints 2 / 5; ZS: (40 + 40 + 20 + 40) / 4
    assert notes == ["CCLM XVNLI as X2-VLM's log prints it (correct / (n + 1); ours / n): EN 40.0, ZS 35.0"]


def test_a_missing_language_is_footnoted_with_iglues_own_average_counting_it_as_minus_1(tmp_path):
    langs = {"en": {"accuracy": 60.0, "n": 4}, "fr": {"accuracy": 41.0, "n": 4}}
    notes = _notes([_run(tmp_path, "u", "uc2", "xvnli", langs)])
    assert notes == [
        "* UC2 xvnli accuracy: our ZS averages the languages evaluated; IGLUE's own averaging counts each missing "
        "language as -1.0: 9.5"  # (41 - 1 - 1 - 1) / 4
    ]
    assert _notes([_run(tmp_path, "all", "uc2", "xvnli", ALL_XVNLI)]) == []


def test_cclm_retrieval_names_the_img_path_dedup_and_a_k_test_below_10(tmp_path):
    langs = {l: {"tr_r1": 10.0, "ir_r1": 10.0, "n": 8} for l in ("en", *tables.iglue.TARGET_LANGS["xflickrco"])}
    plain = _notes([_run(tmp_path, "a", "cclm", "xflickrco", langs, {"k_test": 128})])
    assert len(plain) == 1 and "repeated img_path is scored as one image here" in plain[0]
    small = _notes([_run(tmp_path, "b", "cclm", "xflickrco", langs, {"k_test": 5})])
    assert len(small) == 2 and small[1].startswith("CCLM xFlickrCO with k_test 5 < 10: a gold outside")
    assert _notes([_run(tmp_path, "c", "uc2", "xflickrco", langs, {"k_test": 5})]) == []
