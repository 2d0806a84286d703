"""The synthetic M-CLIP study (synthetic/mclip_study.py; docs/synthetic/protocol.md, Study 2) on a tiny world and
tiny towers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from formats import tokenizer_check
from comparisons.mclip import xtd_data
from comparisons.mclip import train_mclip
from synthetic import analysis
from synthetic import mclip_study as sm
from synthetic import world as sw
from formats import run_folder, torch_files

TINY = {
    "retrieval_scenes": 30,
    "premise_scenes": 20,
    "pretrain_scenes": 40,
    "n_shot": 5,
    "image_dim": 8,
    "text": {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 66,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
    },
    "pretrain_steps": 4,
    "pretrain_batch": 8,
    "pretrain_eval_every": 4,
    "epochs": 2,
    "eval_steps": 1,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mclip") / "study"
    cfg = out.parent / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    argv = [
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--pretrain-seeds",
        "0",
        "--finetune-seeds",
        "1",
    ]
    record = sm.main(argv + ["--langs", "en", "rl", "--arms", "zeroshot", "lora", "full", "suf", "--jobs", "1"])
    return out, record


def test_tiny_study_runs_every_arm_and_writes_the_report_with_its_comparison_rows(study):
    out, record = study
    text = (out / "RESULTS.md").read_text()
    for name in ("lora - suf", "full - suf", "zeroshot - suf", "suf - full", "lora - full"):
        a, b = name.split(" - ")
        diff = record["intervals"]["comparisons"][name]["target_avg"]["pairs"]["0"]["1"]
        runs = record["per_run"]
        assert diff == pytest.approx(runs[a][0][1]["rl"] - runs[b][0][1]["rl"])  # rl: the only target language here
        row = f"| {a} − {b} | p0f1 {diff:+.2f} | p0 {diff:+.2f} | 1 | {diff:+.1f} (n = 1: no interval) |"
        assert row in text
    assert "bootstrap" not in text and "no interval (one pretraining seed)" in text
    assert set(record["table"]) == {"zeroshot", "lora", "full", "suf"}
    assert set(record["intervals"]["comparisons"]["lora - suf"]) >= {"target_avg", "range", "std", "rl", "en"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["intervals"] == json.loads(json.dumps(record["intervals"])) and "comparisons" not in saved
    suf_args = json.loads((out / "runs" / "suf-rl-p0f1" / run_folder.ARGS).read_text())
    assert (suf_args["policy"], suf_args["pet"], suf_args["routine"]) == ("suf", "full", "method1")


def test_analysis_spec_of_every_language_is_the_protocols(study):
    """With every language the study's spec is synthetic.analysis.MCLIP_SPEC (protocol 2.1), which the re-analysis
    of docs/synthetic/mclip_results.json used; with fewer, its metrics read only the languages that ran."""
    assert sm.analysis_spec(sm.LANG_ORDER) == analysis.MCLIP_SPEC
    small = sm.analysis_spec(["en", "rl"])
    assert small["metrics"]["target_avg"]["of"] == ["rl"] and small["metrics"]["range"]["of"] == ["en", "rl"]


def test_report_re_made_from_the_record_equals_the_studys_own(study, tmp_path):
    """--from-record (no training) gives the record and the intervals the study wrote from its run folders."""
    out, record = study
    again = sm.main(["--from-record", str(out / "results.json"), "--out", str(tmp_path / "again")])
    assert json.loads(json.dumps(again)) == json.loads((out / "results.json").read_text())
    section = [(d / "RESULTS.md").read_text().split("## Paired differences")[1] for d in (tmp_path / "again", out)]
    assert section[0] == section[1]
    with pytest.raises(SystemExit, match=r"nothing\.json: no such record"):
        sm.main(["--from-record", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "x")])


def test_written_xtd_files_are_read_by_the_xtd_loader_with_the_same_captions(study):
    out, _ = study
    cfg, lex = sw.WorldConfig(), sw.lexicons(sw.WorldConfig())
    scenes = sm.draw_scenes(cfg, "mclip_retrieval", TINY["retrieval_scenes"], set())
    sents = [sm.partial_caption(s, sm.caption_rng(cfg, "mclip_retrieval", i)) for i, (s, _) in enumerate(scenes)]
    got = xtd_data.load_xtd(out / "data" / "XTD10", list(sw.LANGS))
    assert got.images == [xtd_data.xtd_image_path(sm.image_name(i)) for i in range(len(scenes))]
    english = [sw.render(s, "en", lex) for s in sents]
    for lang in sw.LANGS:
        native = [sw.render(s, lang, lex) for s in sents]
        assert got.texts["native"][lang] == native
        assert got.texts["from_en"][lang] == native  # exact translations of the English caption
        assert got.texts["to_en"][lang] == english  # so method3's inputs are the same for every language
    assert len(set(english)) > 1


def test_retrieval_premise_and_pretraining_scenes_never_share_a_scene():
    cfg, seen = sw.WorldConfig(), set()
    sets = [sm.draw_scenes(cfg, stream, 200, seen) for stream in ("mclip_retrieval", "mclip_premise", "mclip_pretrain")]
    keys = [[sm.scene_key(s) for s, _ in scenes] for scenes in sets]
    assert sum(map(len, keys)) == len({k for ks in keys for k in ks}) == 600


def test_image_tower_is_a_deterministic_function_of_the_region_features(study, tmp_path):
    out, _ = study
    cfg = sw.WorldConfig()
    weights = sm.image_tower_weights(cfg, 8)
    np.testing.assert_array_equal(weights, sm.image_tower_weights(cfg, 8))
    (scene, regions), (other, other_regions) = sm.draw_scenes(cfg, "mclip_retrieval", 2, set())
    a = sm.image_tower(scene, regions, weights)
    assert torch.equal(a, sm.image_tower(scene, regions.copy(), weights))
    assert not torch.equal(a, sm.image_tower(other, other_regions, weights))
    again = tmp_path / "again"
    sm.prepare(cfg, replace(sm.StudyConfig(), **TINY), again)
    first = torch_files.load_checkpoint(out / "data" / "image_features.pt")
    second = torch_files.load_checkpoint(again / "data" / "image_features.pt")
    assert first["names"] == second["names"] and torch.equal(first["features"], second["features"])
    table = train_mclip.read_image_features(out / "data" / "image_features.pt")
    assert torch.equal(table[xtd_data.xtd_image_path(sm.image_name(0))], a)


def test_pretrained_text_checkpoint_loads_into_train_mclips_model_with_no_missing_or_unexpected_keys(study):
    out, _ = study
    folder = out / "text_seed0"
    from safetensors.torch import load_file

    saved = load_file(str(folder / "model.safetensors"))
    model = train_mclip.build_text_model(train_mclip.resolve_text_config(str(folder / "text_config.json")))
    assert set(saved) == set(model.state_dict())
    assert all(k.startswith(("transformer.", "LinearTransformation.")) for k in saved)
    train_mclip.load_text_weights(model, train_mclip.read_state_dict(folder), str(folder))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert tokenizer_check.load_tokenizer(folder).convert_tokens_to_ids("<pad>") == data.PAD_ID


def test_train_mclip_accepts_a_non_xtd_language_only_where_its_caption_file_exists(study, tmp_path):
    out, _ = study
    root = out / "data" / "XTD10"
    base = ["--dataset", "xtd", "--data-root", str(root), "--tokenizer", "x", "--output-dir", str(tmp_path / "r")]
    train_mclip.check_args(train_mclip.build_parser().parse_args(base + ["--lang", "lo", "--pet", "none"]))
    with pytest.raises(SystemExit, match="--lang xx: xtd has en, de"):
        train_mclip.check_args(train_mclip.build_parser().parse_args(base + ["--lang", "xx", "--pet", "none"]))
