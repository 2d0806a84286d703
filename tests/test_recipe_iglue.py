"""`train_uc2.py --recipe iglue`: IGLUE/VOLTA's name-based no-decay rule and 20-epoch LR schedule reach the
optimizer of a real (tiny) run; the paper recipe keeps the ndim<=1 rule and a schedule as long as training."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _configs import UC2_TINY  # noqa: E402
import data  # noqa: E402
from synthetic import fixtures  # noqa: E402
from formats import torch_files  # noqa: E402
import freeze  # noqa: E402
import train_uc2 as U  # noqa: E402

IGLUE = ROOT / "tests" / "fixtures" / "iglue"
DECAYED_BY_IGLUE_ONLY = {
    "embeddings.image_layer_norm.weight",
    "embeddings.image_location_layer_norm.weight",
    "head.2.weight",
}  # the GQA head's LayerNorm


def train(tmp_path, recipe: str) -> Path:
    if not (tmp_path / "tok").exists():
        exs = data.load_split(IGLUE, "xgqa", "testdev", "en")
        fixtures.make_tiny_tokenizer([e.text for e in exs], tmp_path / "tok", vocab_size=300)
        fixtures.write_synthetic_features(tmp_path / "feats", {e.image for e in exs}, num_boxes=4)
    out = tmp_path / recipe
    U.main(
        [
            "--task",
            "xgqa",
            "--model-config",
            UC2_TINY,
            "--data-root",
            str(IGLUE),
            "--features",
            str(tmp_path / "feats"),
            "--tokenizer",
            str(tmp_path / "tok"),
            "--train-split",
            "testdev",
            "--max-regions",
            "4",
            "--num-workers",
            "0",
            "--recipe",
            recipe,
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--max-steps-per-epoch",
            "2",
            "--log-every",
            "1",
            "--no-eval",
            "--output-dir",
            str(out),
        ]
    )
    return out


def exempt_names(run: Path, rule) -> set[str]:
    """Names of the parameters the run's optimizer does not decay, after checking that its param groups are
    exactly freeze.param_groups(..., no_decay=rule)'s (checkpoints keep group names/sizes, not param names)."""
    model = U.build_model("xgqa", U.resolve_config(UC2_TINY))
    names = {id(p): n for n, p in model.named_parameters()}
    want = freeze.param_groups(
        model, U.layer_layout("xgqa", U.resolve_config(UC2_TINY)), freeze.Schedule("full", 12), 1.0, 1.0, no_decay=rule
    )
    got = torch_files.load_checkpoint(run / "checkpoint_last.pt")["optimizer"]["param_groups"]
    assert [(g["name"], len(g["params"])) for g in got] == [(g["name"], len(g["params"])) for g in want]
    assert all((g["weight_decay"] == 0.0) == g["name"].endswith(".no_decay") for g in got)
    return {names[id(p)] for g in want if g["name"].endswith(".no_decay") for p in g["params"]}


def lrs(run: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def test_recipe_iglue_no_decay_rule_and_20_epoch_schedule(tmp_path):
    iglue, paper = train(tmp_path, "iglue"), train(tmp_path, "paper")
    args = json.loads((iglue / "args.json").read_text())
    assert (args["schedule_epochs"], args["weight_decay"], args["adam_eps"], args["clip_grad"]) == (20, 1e-4, 1e-6, 1.0)
    assert json.loads((paper / "args.json").read_text())["schedule_epochs"] == 1

    model = U.build_model("xgqa", U.resolve_config(UC2_TINY))
    one_d = {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert exempt_names(paper, None) == one_d
    exempt = exempt_names(iglue, U.NO_DECAY_RULES["iglue"])
    assert exempt == one_d - DECAYED_BY_IGLUE_ONLY
    assert {
        "embeddings.LayerNorm.weight",
        "embeddings.v_LayerNorm.weight",
        "encoder.layer.0.attention.output.LayerNorm.weight",
        "head.2.bias",
    } <= exempt

    # 2 optimizer steps of a 1-epoch run: the paper's schedule is 2 steps long (1 warm-up), IGLUE's 40 (4 warm-up)
    assert lrs(paper) == pytest.approx([0.0, 4e-5])
    assert lrs(iglue) == pytest.approx([0.0, 4e-5 / 4])
