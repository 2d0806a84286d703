"""The synthetic multilingual world (synthetic/world.py) and its UC2-style pretraining (synthetic/pretrain.py)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from formats import tokenizer_check
import eval_zeroshot
from formats import iglue, iglue_layout
import scoring.evaluate
from formats.features import FEATURE_DIM, open_features
from checks import preflight
import train_cclm
import train_uc2
from _configs import CCLM_TINY, UC2_TINY
from comparisons.xvlmaml import xvlmaml
from synthetic import pairs as sp
from synthetic import analysis
from synthetic import pretrain as synth_pretrain
from synthetic import study as synth_study
from synthetic import world as sw
from synthetic import xvlmaml_study as sx
from formats import feature_sets, volta

TINY = sw.WorldConfig(train_scenes=24, valid_scenes=6, test_scenes=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    sw.build_world(out, TINY)
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith("lock.mdb")
    }


def test_generator_writes_identical_files_from_the_same_config(world, tmp_path):
    again = tmp_path / "w"
    sw.build_world(again, TINY)
    assert _digest(again) == _digest(world)
    other = tmp_path / "other"
    sw.build_world(other, sw.WorldConfig(**{**TINY.to_dict(), "seed": 1}))
    train = "datasets/gqa/annotations/train.json"
    assert _digest(other)[train] != _digest(world)[train]


# Record digests of the TINY world as synth_world wrote it before the auxiliary data existed (commit 26bc9c8),
# computed from file bytes (annotations, lexicon, config, world record) and decoded region records (LMDBs: the
# container's bytes depend on the lmdb library, the records do not). The tokenizer file is left out: its bytes
# are the tokenizers library's serialisation, and add_auxiliary does not touch it.
TINY_DIGESTS_BEFORE_AUX = {
    "datasets/gqa/annotations/train.json": "b2aa2775a096cfbcc1d263ca64d5b5beedfccb0d",
    "datasets/gqa/annotations/trainval_ans2label.json": "cfef601cc930ebcafa620a4f5440c366b46e7480",
    "datasets/gqa/annotations/trainval_label2ans.json": "e5c28e083052585962cfbda593a18e497e654048",
    "datasets/gqa/annotations/valid.json": "d33ed875fc99224bc32de9c95cb9452e0c2dac1d",
    "datasets/xGQA/annotations/few_shot/cr/test.json": "fd23a71aab94ddcb8ae669b8c6a438cfa3b527d0",
    "datasets/xGQA/annotations/few_shot/en/test.json": "21fa730ab8605047138743552321dacedbc3f62d",
    "datasets/xGQA/annotations/few_shot/lo/test.json": "2ec7b2b8327d7f30fe2a0621a4506df8b5386fd0",
    "datasets/xGQA/annotations/few_shot/rl/test.json": "a47d23b821e556254e429d5eaa43d79adb2cc8df",
    "datasets/xGQA/annotations/few_shot/sw/test.json": "9bf1ef9d4bbb92d1c9b3e2d9d731ac0a54f7b278",
    "lexicon.json": "54524824e6fc0067e7ad759e344097aa4c95e17c",
    "model_config.json": "25e0d76c4a79a52592bebf41389b2e26e71945c1",
    "world.json": "b019f6839562d0d4cd6bdb717583e075cee99568",
    "features.lmdb": "8a8dbc629f755f904900a46598aa2d109140e730",
    "features_blind.lmdb": "c7e310926504e0fb24ee4ca93ae45ffc74605c26",
}


def _record_digests(folder: Path) -> dict[str, str]:
    out = {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix != ".mdb" and p.parent.name != "tokenizer"
    }
    for db in sorted(folder.glob("*.lmdb")):
        reader, h = open_features(db), hashlib.sha1()
        for key in sorted(reader.keys()):
            feats, boxes, w, hgt = reader.get(key)
            h.update(key.encode() + np.ascontiguousarray(feats).tobytes() + np.ascontiguousarray(boxes).tobytes())
            h.update(f"{w} {hgt}".encode())
        out[db.name] = h.hexdigest()
    return out


def test_auxiliary_data_leaves_every_existing_record_of_the_world_as_it_was(tmp_path):
    """build_world writes what it wrote before the auxiliary data existed; add_auxiliary only adds files (the
    five dev.json and features_aux.lmdb), so the study's runs and the shipped fixtures stay valid."""
    w = tmp_path / "w"
    sw.build_world(w, TINY)
    assert _record_digests(w) == TINY_DIGESTS_BEFORE_AUX
    sw.add_auxiliary(w)
    after = _record_digests(w)
    added = {f"datasets/xGQA/annotations/few_shot/{lang}/dev.json" for lang in sw.LANGS} | {sw.AUX_FEATURES}
    assert set(after) - set(TINY_DIGESTS_BEFORE_AUX) == added
    assert {k: after[k] for k in TINY_DIGESTS_BEFORE_AUX} == TINY_DIGESTS_BEFORE_AUX
    sw.add_auxiliary(w)  # a second call is a no-op
    assert _record_digests(w) == after


def test_auxiliary_dev_splits_are_translations_on_new_scenes(tmp_path):
    """dev.json in every language: the same ids, images, answers and question types, each text the English one in
    that language's words; its images are in features_aux.lmdb only, none a task or pretraining scene."""
    w = tmp_path / "w"
    sw.build_world(w, TINY)
    sw.add_auxiliary(w)
    lex = json.loads((w / "lexicon.json").read_text())
    back = {lang: {v: k for k, v in table.items()} for lang, table in lex.items()}
    en = data.load_split(w, "xgqa", "dev", "en")
    assert len(en) == sw.AUX_SCENES * sw.AUX_QUESTIONS_PER_SCENE
    assert iglue_layout.available_langs(w, "xgqa", "dev") == sorted(sw.LANGS)
    for lang in sw.LANGS:
        got = data.load_split(w, "xgqa", "dev", lang)
        assert [(e.id, e.image, e.gold, e.qtype) for e in got] == [(e.id, e.image, e.gold, e.qtype) for e in en]
        for e_en, e in zip(en, got):
            words = [x if x in sw.SHARED else back[lang][x] for x in e.text.split()]
            assert Counter(words) == Counter(e_en.text.split())
    aux = open_features(w / sw.AUX_FEATURES)
    task = open_features(w / "features.lmdb")
    images = {e.image for e in en}
    assert aux.keys() == images and not images & task.keys()
    test_images = {e.image for e in data.load_split(w, "xgqa", "test", "en")}
    assert not images & test_images
    # pretraining draws scenes from its own streams ([world seed, pretraining seed, stream, step]); none of its
    # scene ids is an image id, and the auxiliary regions are drawn from the "aux" stream's own generators
    scenes = {k: s for k, s, _ in sw.task_scenes(TINY, ((sw.AUX_STREAM, sw.AUX_SCENES),))}
    f, _, _, _ = aux.get("aux00000")
    assert f.shape == (len(scenes["aux00000"]), FEATURE_DIM)
    feature_sets.FeatureSet([str(w / "features.lmdb"), str(w / sw.AUX_FEATURES)])  # the pair xvlmaml reads


def test_add_auxiliary_refuses_a_folder_without_a_world(tmp_path):
    with pytest.raises(SystemExit, match="no world.json"):
        sw.add_auxiliary(tmp_path)


def test_build_world_refuses_an_existing_world(world):
    with pytest.raises(SystemExit, match="already holds a world"):
        sw.build_world(world, TINY)


def test_test_sets_are_exact_translations_in_every_language(world):
    lex = json.loads((world / "lexicon.json").read_text())
    back = {lang: {v: k for k, v in table.items()} for lang, table in lex.items()}
    en = data.load_split(world, "xgqa", "test", "en")
    for lang in sw.LANGS:
        got = data.load_split(world, "xgqa", "test", lang)
        assert [(e.id, e.image, e.gold, e.qtype) for e in got] == [(e.id, e.image, e.gold, e.qtype) for e in en]
        for e_en, e in zip(en, got):
            words = [w if w in sw.SHARED else back[lang][w] for w in e.text.split()]
            assert Counter(words) == Counter(e_en.text.split())  # the same words, in that language's order
            if lang in ("rl", "lo"):
                assert words == e_en.text.split()


def test_languages_share_only_specials_digits_and_punctuation(world):
    lex = json.loads((world / "lexicon.json").read_text())
    vocab = {lang: set(table.values()) for lang, table in lex.items()}
    for a in sw.LANGS:
        for b in sw.LANGS:
            if a < b:
                assert not vocab[a] & vocab[b], (a, b)
    tok = tokenizer_check.load_tokenizer(world / "tokenizer")
    for lang in sw.LANGS:  # every word of every language is one token, none unknown
        text = " ".join(sorted(vocab[lang]))
        ids = tok(text)["input_ids"][1:-1]
        assert len(ids) == len(vocab[lang]) and data.UNK_ID not in ids


def test_data_reads_the_world_as_iglue(world):
    assert iglue_layout.available_splits(world, "xgqa") == ["train", "valid", "test"]
    assert iglue_layout.available_langs(world, "xgqa", "test") == sorted(sw.LANGS)
    train = data.load_split(world, "xgqa", "train", "en")
    assert len(train) == TINY.train_scenes * TINY.train_questions_per_scene
    assert all(e.label >= 0 and e.scores == {e.label: 1.0} for e in train)  # every answer in the vocabulary
    test = data.load_split(world, "xgqa", "test", "sw")
    assert {e.qtype for e in test} <= {"query", "verify", "choose", "logical", "compare"}
    feats = open_features(world / "features.lmdb")
    assert feats.keys() == {e.image for e in train} | {e.image for e in test} | {
        e.image for e in data.load_split(world, "xgqa", "valid", "en")
    }
    preflight.check_inputs(train, features=feats)
    tok = tokenizer_check.load_tokenizer(world / "tokenizer")
    ds = data.make_dataset("uc2", "xgqa", test, features=feats, max_regions=3)
    batch = data.UC2Collate("xgqa", tok)([ds[i] for i in range(4)])
    assert batch["features"].shape == (4, 3, FEATURE_DIM) and batch["spatials"].shape == (4, 3, 7)
    assert batch["target"].sum(1).tolist() == [1.0] * 4


def test_region_features_encode_the_scene(world):
    """Each region is its object's codebook sum plus noise: the nearest codebook sum is the object itself."""
    cfg, books = TINY, sw.codebooks(TINY)
    feats = open_features(world / "features.lmdb")
    scenes = {key: scene for key, scene, _ in sw.task_scenes(cfg)}
    protos = {
        (s, c, z): books["shape"][s] + books["colour"][c] + books["size"][z]
        for s in range(len(sw.SHAPES))
        for c in range(len(sw.COLOURS))
        for z in range(len(sw.SIZES))
    }
    keys, mat = list(protos), torch.from_numpy(np.stack(list(protos.values())))
    for key in ["test00000", "train00003"]:
        f, boxes, w, h = feats.get(key)
        got = [keys[int(i)] for i in torch.cdist(torch.tensor(f), mat).argmin(1)]
        assert got == [(o.shape, o.colour, o.size) for o in scenes[key]]
        assert (w, h) == (sw.IMG_W, sw.IMG_H) and (boxes[:, 2] > boxes[:, 0]).all()


def test_pretraining_is_deterministic_and_train_uc2_loads_it(world, tmp_path):
    """A few steps twice from one seed: identical checkpoints; train_uc2 reads it as a VOLTA file (fresh task
    head, pre-training heads dropped) and synth_pretrain reads back every tensor."""
    kw = dict(batch_size=8, eval_every=0, log=lambda s: None, probe_n=8)
    a = synth_pretrain.pretrain(world, 0, 5, tmp_path / "a.bin", **kw)
    synth_pretrain.pretrain(world, 0, 5, tmp_path / "b.bin", **kw)
    sd_a, sd_b = torch.load(tmp_path / "a.bin", weights_only=True), torch.load(tmp_path / "b.bin", weights_only=True)
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert set(a["final"]) >= {"itm_acc", "mrm_acc", "attr_en", "attr_lo"}
    config = train_uc2.resolve_config(str(world / "model_config.json"))
    model = train_uc2.build_model("xgqa", config)
    plan = volta.load_into(model, str(tmp_path / "a.bin"))
    assert plan.fmt == "volta" and plan.ok
    assert {k for k, _ in plan.initialised} == {k for k in model.state_dict() if k.startswith("head.")}
    assert len(plan.dropped) == len(volta.VOLTA_PRETRAIN_HEADS)
    back = synth_pretrain.volta_state_dict(synth_pretrain.load_pretrained(tmp_path / "a.bin", config))
    assert back.keys() == sd_a.keys() and all(torch.equal(back[k], sd_a[k]) for k in sd_a)


def test_study_jobs_pin_torch_adamw_as_every_recorded_synthetic_run_used(tmp_path):
    """The trainers' default is the references' AdamW; the studies' records were made with torch's, so their
    jobs (Study 1, Study 3, the demo) name it, and the records stay reproducible from main."""
    cmd, _ = synth_study.finetune_job(tmp_path, None, "suf", 0, 1e-3, tmp_path / "run")
    assert cmd[cmd.index("--adamw") + 1] == "torch"
    assert train_uc2.build_parser().parse_args(["--task", "xgqa"]).adamw == "reference"


def test_tiny_end_to_end_pretrain_finetune_two_policies_evaluate_table(world, tmp_path):
    """pretrain (3 steps) -> the real train_uc2 with full and suf -> per-epoch evaluation in every language ->
    the study's paired comparison and report."""
    ckpt = tmp_path / "p.bin"
    synth_pretrain.pretrain(world, 0, 3, ckpt, batch_size=8, eval_every=0, log=lambda s: None, probe_n=8)
    runs = {}
    for policy in ("full", "suf"):
        cmd, _ = synth_study.finetune_job(world, ckpt, policy, 0, 1e-3, tmp_path / policy, max_steps=2)
        train_uc2.main(cmd[2:] + ["--epochs", "2", "--batch-size", "8"])
        runs[policy] = synth_study.final_accuracy(tmp_path / policy)
        assert set(runs[policy]) == set(sw.LANGS)
        assert sorted(synth_study.evals(tmp_path / policy)) == [1, 2]
    results = {pol: {0: {0: acc}} for pol, acc in runs.items()}
    result = synth_study.compare(results, ["full", "suf"])
    cmp = result["comparisons"]["suf - full"]
    want = synth_study.non_en_avg(runs["suf"]) - synth_study.non_en_avg(runs["full"])
    assert cmp["non_en_avg"]["pairs"] == {"0": {"0": pytest.approx(want)}}
    assert cmp["non_en_avg"]["unit"]["n"] == 1 and cmp["non_en_avg"]["unit"]["lo"] is None  # one seed: no interval
    study = {
        "world": TINY.to_dict(),
        "pretrain_seeds": [0],
        "finetune_seeds": [0],
        "lr": 1e-3,
        "pretrain_steps": 3,
        "summary": synth_study.summary_rows(results),
        "intervals": result,
        "premise": {},
        "floors": synth_study.majority_floor(world),
    }
    report = synth_study.format_report(study)
    assert f"| suf − full | p0f0 {want:+.2f} | p0 {want:+.2f} | 1 | {want:+.1f} (n = 1: no interval) |" in report
    assert "no interval (one pretraining seed)" in report and "| full |" in report and "bootstrap" not in report


def _t95(values: list[float]) -> tuple[float, float]:
    """Student t 95% interval, computed here from scipy's quantile (not through synthetic.analysis)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / len(x) ** 0.5
    return float(x.mean() - half), float(x.mean() + half)


def test_study_compare_is_a_t_interval_over_pretraining_seed_means_not_over_pairs():
    """Three pretraining seeds x two fine-tuning seeds: the interval is over the 3 seed means (df 2), with the
    per-pair table beside it; languages give the non-English average."""
    diffs = {0: {0: 1.0, 1: 3.0}, 1: {0: 5.0, 1: 7.0}, 2: {0: 2.0, 1: 4.0}}
    base = {lang: 50.0 for lang in sw.LANGS}
    results = {
        "full": {ps: {fs: dict(base) for fs in by_f} for ps, by_f in diffs.items()},
        "suf": {
            ps: {fs: {**base, **{l: 50.0 + d for l in sw.LANGS[1:]}} for fs, d in by_f.items()}
            for ps, by_f in diffs.items()
        },
    }
    got = synth_study.compare(results, ["full", "suf"])["comparisons"]["suf - full"]["non_en_avg"]
    assert got["seed_means"] == pytest.approx({"0": 2.0, "1": 6.0, "2": 3.0})
    assert got["unit"]["n"] == 3 and (got["unit"]["lo"], got["unit"]["hi"]) == pytest.approx(_t95([2.0, 6.0, 3.0]))
    assert got["pairs"]["1"] == pytest.approx({"0": 5.0, "1": 7.0})
    assert not hasattr(synth_study, "paired_bootstrap")  # the withdrawn two-level bootstrap is gone


def _seed_mean_diffs(per_run: dict, a: str, b: str, of: list[str]) -> list[float]:
    """Per pretraining seed: the mean over its fine-tuning seeds of a - b on the average of `of` (by hand)."""
    out = []
    for ps, by_f in sorted(per_run[a].items()):
        d = [np.mean([run[x] for x in of]) - np.mean([per_run[b][ps][fs][x] for x in of]) for fs, run in by_f.items()]
        out.append(float(np.mean(d)))
    return out


def test_shipped_records_hold_the_corrected_intervals_of_their_own_per_run_values():
    """docs/synthetic/results.json (Study 1 and its xvlmaml entry) and mclip_results.json (Study 2): every interval
    they hold is the t interval over the pretraining-seed means of the per-run values beside it (re-derived here by
    hand), no withdrawn bootstrap interval is left, and the transcribed study1_record.json gives the same."""
    root = Path(__file__).resolve().parents[1] / "docs" / "synthetic"
    study1 = json.loads((root / "results.json").read_text())
    mclip = json.loads((root / "mclip_results.json").read_text())
    source = json.loads((root / "study1_record.json").read_text())["per_run"]
    cases = [
        (study1, "suf", "full", "non_en_avg", ["rl", "sw", "cr", "lo"]),
        (study1["xvlmaml"], "xvlmaml", "full", "target_avg", ["sw", "cr", "lo"]),
        (study1["xvlmaml"], "control", "full", "target_avg", ["sw", "cr", "lo"]),
        (mclip, "lora", "suf", "target_avg", ["rl", "sw", "cr", "lo"]),
        (mclip, "suf", "full", "target_avg", ["rl", "sw", "cr", "lo"]),
    ]
    for rec, a, b, metric, of in cases:
        means = _seed_mean_diffs(rec["per_run"], a, b, of)
        unit = rec["intervals"]["comparisons"][f"{a} - {b}"][metric]["unit"]
        assert unit["n"] == len(means) == 2 and (unit["lo"], unit["hi"]) == pytest.approx(_t95(means)), (a, b)
    for a in ("full", "suf", "llrd"):
        assert study1["per_run"][a] == source[a]
    for a in ("xvlmaml", "control"):
        assert study1["xvlmaml"]["per_run"][a] == source[a]
    llrd = study1["intervals"]["comparisons"]["llrd - full"]["non_en_avg"]["seed_means"]
    assert llrd == pytest.approx(
        {
            ps: np.mean(
                [
                    run["non_en_avg"] - np.mean([source["full"][ps][fs][x] for x in ("rl", "sw", "cr", "lo")])
                    for fs, run in by_f.items()
                ]
            )
            for ps, by_f in source["llrd"].items()
        }
    )
    assert "top - full" not in study1["intervals"]["comparisons"] and "no interval for top" in study1["per_run_source"]
    for rec in (study1, study1["xvlmaml"], mclip):
        assert "comparisons" not in rec and "n_pairs" not in json.dumps(rec)


def test_from_record_re_derives_the_shipped_intervals_without_training_and_refuses_a_record_without_runs(tmp_path):
    """synthetic.study / xvlmaml_study --from-record: the transcribed per-run values give exactly the intervals the
    shipped record holds; a record without per-run values, or without runs of full, is a one-line error."""
    root = Path(__file__).resolve().parents[1] / "docs" / "synthetic"
    shipped = json.loads((root / "results.json").read_text())
    text = synth_study.from_record(root / "study1_record.json", record=False)
    suf = shipped["intervals"]["comparisons"]["suf - full"]["non_en_avg"]
    assert f"| 2 | {analysis.cell(suf)} |" in text and "no interval for top" in text
    rep = sx.from_record(root / "study1_record.json")
    assert json.loads(json.dumps(rep["intervals"])) == shipped["xvlmaml"]["intervals"]
    assert rep["cpu_seconds"] is None and "## Cost" in sx.format_report(rep)
    bad = tmp_path / "r.json"
    for content, match in (
        ({"source": {}}, r"r\.json: no 'per_run' key"),
        ({"per_run": {"suf": {}}}, r"r\.json: no runs of policy full"),
    ):
        bad.write_text(json.dumps(content))
        with pytest.raises(SystemExit, match=match):
            synth_study.from_record(bad, record=False)
    with pytest.raises(SystemExit, match=r"r\.json: 'per_run' needs the runs of full, suf, xvlmaml"):
        sx.from_record(bad)
    with pytest.raises(SystemExit, match=r"gone\.json: no such record"):
        synth_study.from_record(tmp_path / "gone.json", record=False)


def test_regenerated_reports_print_the_records_intervals():
    """docs/synthetic/results_session3.md and results_xvlmaml.md carry the cells of the corrected analysis of
    results.json's per-run values (n = 2), not the withdrawn bootstrap's."""
    root = Path(__file__).resolve().parents[1] / "docs" / "synthetic"
    rec = json.loads((root / "results.json").read_text())
    for name, entry, comparison, metric in (
        ("results_session3.md", rec, "suf - full", "non_en_avg"),
        ("results_session3.md", rec, "llrd - full", "non_en_avg"),
        ("results_xvlmaml.md", rec["xvlmaml"], "xvlmaml - full", "target_avg"),
        ("results_xvlmaml.md", rec["xvlmaml"], "xvlmaml - control", "target_avg"),
    ):
        c = analysis.analyse({"per_run": entry["per_run"], "analysis": entry["analysis"]})["comparisons"][comparison]
        row = f"| {comparison.replace(' - ', ' − ')} | " + " ".join(
            f"p{ps}f{fs} {v:+.2f}" for ps, by_f in c[metric]["pairs"].items() for fs, v in by_f.items()
        )
        text = (root / name).read_text()
        assert row in text and f"| 2 | {analysis.cell(c[metric])} |" in text, (name, comparison)
    assert "[-2.3, +0.9]" not in (root / "results_xvlmaml.md").read_text()
    assert "[-3.0, +2.3]" not in (root / "results_session3.md").read_text()


@pytest.mark.system
def test_shipped_world_checkpoint_is_what_make_synth_pretrain_writes():
    """tests/fixtures/synth/pretrain_seed0.bin: its record names the default world, seed 0 and the study's step
    count, `make synth-pretrain` writes it with those, and it fits the default world's tokenizer and config."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    ckpt = root / "tests" / "fixtures" / "synth" / "pretrain_seed0.bin"
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["world"] == sw.WorldConfig().to_dict()
    assert (meta["seed"], meta["steps"]) == (0, synth_study.PRETRAIN_STEPS)
    make = subprocess.run(
        ["make", "-n", "--no-print-directory", "synth-pretrain"], cwd=root, capture_output=True, text=True
    ).stdout
    assert f"--seed 0 --steps {synth_study.PRETRAIN_STEPS} " in make and str(ckpt.relative_to(root)) in make
    vocab = len(sw.SPECIALS) + len(sw.all_words(sw.lexicons(sw.WorldConfig())))
    config = {**train_uc2.CONFIGS["base"], **sw.model_config(vocab)}
    model = train_uc2.build_model("xgqa", config)
    assert volta.load_into(model, str(ckpt)).ok


def test_language_id_probe_on_s_state_has_no_token_identity_shortcut(world):
    """Parallel texts: the <s> input is the same token at the same position in every language, so the <s> probe
    is exactly at chance (0.2) at the embeddings and can only rise through attention; the mean-word-state probe
    reads the disjoint vocabularies and is near perfect from the embeddings on, even untrained."""
    torch.manual_seed(0)
    config = train_uc2.resolve_config(str(world / "model_config.json"))
    model = synth_pretrain.PretrainUC2(config).eval()
    corpus = synth_pretrain.Corpus(world, 0)
    cls = synth_study.language_id_probe(model, corpus, n=20, pool="cls")
    words = synth_study.language_id_probe(model, corpus, n=20, pool="words")
    assert len(cls) == len(words) == config["num_layers"] + 1
    assert cls[0] == pytest.approx(0.2, abs=1e-6) and words[0] > 0.9
    assert max(cls[1:]) > 0.2  # a random encoder already mixes word identity into <s>


def test_english_premise_needs_every_full_run_15_points_above_its_blind_floor():
    study = {
        "premise": {0: {"blind": {"en": 40.0}}, 1: {"blind": {"en": 38.0}}},
        "results": {"full": {0: {0: {"en": 80.0}, 1: {"en": 56.0}}, 1: {0: {"en": 70.0}}}},
    }
    assert synth_study.english_premise(study) == {
        0: {"margins": [40.0, 16.0], "holds": True},
        1: {"margins": [32.0], "holds": True},
    }
    assert synth_study.premise_note(study).startswith("English premise HOLDS")
    study["results"]["full"][0][1]["en"] = 54.0
    assert not synth_study.english_premise(study)[0]["holds"]
    assert "FAILS" in synth_study.premise_note(study) and "not evidence" in synth_study.premise_note(study)


def test_synth_xvlmaml_continues_the_study_runs_and_reports_paired_comparisons(tmp_path):
    """A tiny study folder (world + full and SUF runs of one seed pair) -> synth_xvlmaml: the auxiliary data is
    added, XVL-MAML and the contrastive-weight-0 control run through the real xvlmaml.py (a head of the world's 14
    answers), the report holds the comparison rows and the matrix; differences are the runs' own; a second call
    runs nothing and reports the same."""
    out = tmp_path / "study"
    world = out / "world"
    sw.build_world(world, TINY)
    for policy in sx.BASELINES:  # from random initialisation: what is measured here is the plumbing
        cmd, _ = synth_study.finetune_job(world, None, policy, 0, 1e-3, out / "runs" / f"{policy}-p0-f0", max_steps=1)
        train_uc2.main(cmd[2:] + ["--epochs", "1", "--batch-size", "8", "--eval-every", "1"])
    ran = []

    def in_process(jobs, workers):
        for cmd, _ in jobs:
            ran.append(cmd)
            assert xvlmaml.main(cmd[3:] + ["--support-size", "4", "--query-size", "4", "--en-batch-size", "4"]) == 0

    rep = sx.study(out, [0], [0], matrix_aux=("rl",), iters=1, runner=in_process)
    assert (world / sw.AUX_FEATURES).is_dir() and len(ran) == 2  # xvlmaml, control (the matrix row rl is xvlmaml)
    assert ran[1][ran[1].index("--cl-weight") + 1] == "0.0" and ran[0][ran[0].index("--aux-lang") + 1] == "rl"
    full, xvl = rep["results"]["full"][0][0], rep["results"]["xvlmaml"][0][0]
    assert set(xvl) == set(sw.LANGS)
    want = sx.targets_avg(xvl, "rl") - sx.targets_avg(full, "rl")
    assert sx.targets_avg(xvl, "rl") == pytest.approx(np.mean([xvl[x] for x in ("sw", "cr", "lo")]))
    got = rep["intervals"]["comparisons"]["xvlmaml - full"]["target_avg"]
    assert got["pairs"] == {"0": {"0": pytest.approx(want)}} and got["unit"]["n"] == 1 and got["unit"]["lo"] is None
    assert set(rep["intervals"]["comparisons"]) == {
        "xvlmaml - full",
        "xvlmaml - suf",
        "control - full",
        "xvlmaml - control",
    }
    assert rep["matrix"]["rows"] == {"rl": pytest.approx(xvl)} and rep["matrix"]["baseline"] == pytest.approx(full)
    report = sx.format_report(rep)
    assert f"| xvlmaml − full | p0f0 {want:+.2f} | p0 {want:+.2f} | 1 | {want:+.1f} (n = 1: no interval) |" in report
    for row in ("| xvlmaml − suf | p0f0 ", "| control − full | p0f0 ", "| xvlmaml − control | p0f0 "):
        assert row in report
    assert "no interval (one pretraining seed)" in report and "Auxiliary x target matrix" in report
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"design": "d", "comparisons": {"suf": {}}}))
    sx.record(rep, record)
    rec = json.loads(record.read_text())
    assert rec["comparisons"] == {"suf": {}} and rec["xvlmaml"]["intervals"] == json.loads(json.dumps(rep["intervals"]))
    assert rec["xvlmaml"]["per_run"]["xvlmaml"] == {"0": {"0": pytest.approx(xvl)}}
    assert sx.study(out, [0], [0], matrix_aux=("rl",), iters=1, runner=in_process) == rep and len(ran) == 2


# ---------------------------------------------------------------------------------------------- the two-image task
# synthetic/pairs.py (issue 25 item 5): NLVR2 (English) and MaRVL (the world's other languages) in IGLUE's layouts.

# The keys and value types of IGLUE's real lines are read from the shipped sample of IGLUE's files
# (tests/fixtures/iglue/datasets, see its README): nlvr2/annotations/{dev,test,dev-<lang>_gmt}.jsonl and MaRVL's
# zero_shot/annotations, annotations_machine-translate and few_shot/annotations: one layout per kind in every line.
IGLUE_SAMPLE = Path(__file__).resolve().parent / "fixtures" / "iglue" / "datasets"
TINY_PAIRS = sp.PairsConfig(train_sets=12, dev_sets=4, test_sets=5)


@pytest.fixture(scope="module")
def pair_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "w"
    sw.build_world(out, TINY)
    sp.add_pairs(out, TINY_PAIRS)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _types(line: dict) -> dict:
    return {k: type(v).__name__ for k, v in line.items()}


def _sample_layout(pattern: str, key: str | None = None) -> dict:
    """The one {key: type name} layout of every line of the sample files matching pattern (of line[key] if given)."""
    files = sorted(IGLUE_SAMPLE.glob(pattern))
    layouts = {tuple(sorted(_types(x[key] if key else x).items())) for f in files for x in _jsonl(f)}
    assert files and len(layouts) == 1, (pattern, layouts)
    return dict(next(iter(layouts)))


def test_pair_files_have_the_real_nlvr2_and_marvl_line_layouts(pair_world):
    """Every file holds the keys of IGLUE's real file of its kind (the shipped sample's lines), with the same value
    types: NLVR2 labels the strings "True"/"False", MaRVL labels JSON booleans; identifiers and image names as the
    real ones."""
    real_nlvr2 = _sample_layout("nlvr2/annotations/*.jsonl")
    real_marvl = _sample_layout("marvl/*/annotation*/marvl-*.jsonl")
    real_annotator = _sample_layout("marvl/*/annotation*/marvl-*.jsonl", "annotator_info")
    assert real_nlvr2["label"] == "str" and real_marvl["label"] == "bool" and real_annotator["age"] == "int"
    ds = pair_world / "datasets"
    nl_files = [ds / "nlvr2" / "annotations" / f"{s}.jsonl" for s in ("train", "dev", "test")]
    nl_files += [ds / "nlvr2" / "annotations" / f"dev-{lang}_gmt.jsonl" for lang in sw.LANGS if lang != "en"]
    for f in nl_files:
        for line in _jsonl(f):
            assert _types(line) == real_nlvr2, f
            assert line["label"] in ("True", "False")
            split, s, p, n = line["identifier"].split("-")
            assert split == f.name.split(".")[0].split("-")[0].replace("test", "test1") and n == "0"
    for lang in (x for x in sw.LANGS if x != "en"):
        zs = ds / "marvl" / "zero_shot"
        for f in (
            zs / "annotations" / f"marvl-{lang}.jsonl",
            zs / "annotations_machine-translate" / f"marvl-{lang}_gmt.jsonl",
            *(ds / "marvl" / "few_shot" / "annotations" / f"marvl-{lang}_train{n}.jsonl" for n in (1, 10)),
        ):
            lines = _jsonl(f)
            assert [x["id"] for x in lines] == [f"{lang}-{i}" for i in range(len(lines))]
            for line in lines:
                assert _types(line) == real_marvl and _types(line["annotator_info"]) == real_annotator, f
                assert line["language"] == lang and isinstance(line["label"], bool)
                assert line["concept"].split("-")[0].isdigit()
                assert line["left_img"].endswith(".jpg") and line["left_img"] != line["right_img"]
                if "few_shot" in f.parts:
                    assert line["left_img"].startswith(line["concept"] + "/")
    assert len(_jsonl(ds / "marvl" / "few_shot" / "annotations" / "marvl-rl_train10.jsonl")) == 40  # as IGLUE's


def test_every_pair_image_has_region_features_keyed_as_volta_looks_them_up(pair_world):
    """VOLTA's nlvr2_dataset: NLVR2 images are the identifier minus its last part + -img0/-img1, MaRVL images the
    stem of left_img/right_img; each key's regions are its scene's objects; MaRVL's test images are NLVR2's test
    images under MaRVL's names (the same features), and the blind store keeps boxes with zero features."""
    ds = pair_world / "datasets"
    feats = open_features(pair_world / sp.FEATURES)
    blind = open_features(pair_world / sp.FEATURES_BLIND)
    want = set()
    for f in (ds / "nlvr2" / "annotations").glob("*.jsonl"):
        for line in _jsonl(f):
            base = "-".join(line["identifier"].split("-")[:-1])
            want |= {base + "-img0", base + "-img1"}
    for f in (ds / "marvl").rglob("*.jsonl"):
        for line in _jsonl(f):
            want |= {line[k].split("/")[-1].split(".")[0] for k in ("left_img", "right_img")}
    assert feats.keys() == want == blind.keys()
    scenes = {key: scene for key, scene, _ in sp.images(TINY, TINY_PAIRS)}
    for key in ("test1-0-0-img1", "0-1", "train-3-2-img0", "2-n-5"):
        f, boxes, w, h = feats.get(key)
        assert f.shape == (len(scenes[key]), FEATURE_DIM) and (w, h) == (sw.IMG_W, sw.IMG_H)
        fb, bb, _, _ = blind.get(key)
        assert not fb.any() and np.array_equal(bb, boxes)
    a, b = feats.get("test1-4-3-img1"), feats.get(sp.image_key(sp.marvl_image(4, 3, 1, False)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_pair_labels_are_balanced_and_the_statement_alone_says_nothing(pair_world):
    """Two true and two false pairs per statement (NLVR2's sets): half of every file is true, and the best
    text-only classifier (each statement's majority label) scores exactly 0.5 in every language."""
    record = json.loads((pair_world / sp.RECORD).read_text())
    assert len(record["files"]) == 3 + 2 * (len(sw.LANGS) - 1)
    for rel, r in record["files"].items():
        assert r["true"] * 2 == r["lines"] and r["text_only_floor"] == 0.5, rel
        assert 0.5 <= r["one_image_bound"] <= 0.75
    ds = pair_world / "datasets"
    for lang in sw.LANGS[1:]:
        lines = _jsonl(ds / "marvl" / "zero_shot" / "annotations" / f"marvl-{lang}.jsonl")
        assert sp.text_only_floor(lines, "caption") == 0.5
        assert sp.one_image_bound(lines, "chapter") == record["files"][f"marvl/marvl-{lang}.jsonl"]["one_image_bound"]


def test_a_pair_statement_needs_both_images():
    """The label is the statement's truth on the two scenes; a one-image baseline (a table from what one image
    tells about the statement to the majority label, fit on 3,000 sets, scored on 3,000 others) stays within
    sampling error of the bound ONE_IMAGE_BOUND gives (count 0.75, colour 0.5), far below the two-image 1.0."""
    fit, held = sp.sets_of(TINY, "bound-fit", 3000), sp.sets_of(TINY, "bound-held", 3000)

    def rows(sets):
        for st, pairs in sets:
            for left, right, label in pairs:
                assert sp.holds(st, left, right) == label
                for side, scene in enumerate((left, right)):
                    yield (st, side, sp.one_image_view(st, scene, side)), label

    table: dict = {}
    for key, label in rows(fit):
        table.setdefault(key, []).append(label)
    by_kind: dict[str, list] = {k: [] for k in sp.KINDS}
    for key, label in rows(held):
        votes = table.get(key, [])
        guess = sum(votes) * 2 > len(votes) if votes else True
        by_kind[key[0].kind].append(guess == label)
    for kind, hits in by_kind.items():
        n = len(hits)
        assert n > 5000
        assert sum(hits) / n <= sp.ONE_IMAGE_BOUND[kind] + 3 * (0.25 / n) ** 0.5, kind
        assert sum(hits) / n >= sp.ONE_IMAGE_BOUND[kind] - 5 * (0.25 / n) ** 0.5, kind  # the bound is reached
    assert {st.kind for st, _ in fit} == set(sp.KINDS)


def test_marvl_captions_are_exact_translations_of_the_english_test_statements(pair_world):
    """marvl-<lang>.jsonl: NLVR2 test's pairs and labels, each caption the English statement in that language's
    words; the machine-translated files hold the English statement itself."""
    lex = json.loads((pair_world / "lexicon.json").read_text())
    back = {lang: {v: k for k, v in table.items()} for lang, table in lex.items()}
    ds = pair_world / "datasets"
    en = _jsonl(ds / "nlvr2" / "annotations" / "test.jsonl")
    for lang in sw.LANGS[1:]:
        got = _jsonl(ds / "marvl" / "zero_shot" / "annotations" / f"marvl-{lang}.jsonl")
        mt = _jsonl(ds / "marvl" / "zero_shot" / "annotations_machine-translate" / f"marvl-{lang}_gmt.jsonl")
        assert [str(x["label"]) for x in got] == [x["label"] for x in en]
        for e, m, x in zip(en, got, mt):
            words = [w if w in sw.SHARED else back[lang][w] for w in m["caption"].split()]
            assert Counter(words) == Counter(e["sentence"].split())
            assert x["caption"] == e["sentence"] and {**x, "caption": None} == {**m, "caption": None}
    tok = tokenizer_check.load_tokenizer(pair_world / "tokenizer")  # the world's tokenizer knows every word
    for f in (ds / "marvl" / "zero_shot" / "annotations").glob("*.jsonl"):
        assert data.UNK_ID not in tok(" ".join(x["caption"] for x in _jsonl(f)))["input_ids"]


def test_add_pairs_is_deterministic_per_seed_and_adds_only_its_own_files(pair_world, tmp_path):
    again = tmp_path / "w"
    sw.build_world(again, TINY)
    sp.add_pairs(again, TINY_PAIRS)
    assert _record_digests(again) == _record_digests(pair_world)
    assert {k: v for k, v in _record_digests(again).items() if k in TINY_DIGESTS_BEFORE_AUX} == TINY_DIGESTS_BEFORE_AUX
    sp.add_pairs(again, TINY_PAIRS)  # a second call is a no-op
    assert _record_digests(again) == _record_digests(pair_world)
    other = tmp_path / "o"
    sw.build_world(other, sw.WorldConfig(**{**TINY.to_dict(), "seed": 1}))
    sp.add_pairs(other, TINY_PAIRS)
    for rel in ("datasets/nlvr2/annotations/train.jsonl", sp.FEATURES):
        assert _record_digests(other)[rel] != _record_digests(pair_world)[rel]
    with pytest.raises(SystemExit, match="no world.json"):
        sp.add_pairs(tmp_path / "nothing")


def test_pair_images_are_drawn_where_the_loaders_look_and_show_the_scene(pair_world):
    """add_images writes one file per image of every line (NLVR2 per split, MaRVL per language and few-shot), under
    the paths formats/nlvr2_marvl.py gives; each object's colour is at its slot's centre, the rest is ground."""
    root = sp.add_images(pair_world)
    files = sp.image_files(TINY, TINY_PAIRS)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.*")) == sorted(rel for rel, _ in files)
    assert (root / "nlvr2" / "test1" / "test1-0-0-img0.png").is_file()
    assert (root / "marvl" / "sw" / "images" / "0" / "0-1.jpg").is_file()
    assert (root / "marvl_fewshot" / "cr" / "all" / "0-n-0.jpg").is_file()
    from PIL import Image

    for rel, scene in files[:40]:
        img = np.asarray(Image.open(root / rel).convert("RGB"), dtype=int)
        h, w, _ = img.shape
        for slot in range(len(sw.SLOTS)):
            got = img[h // 2, int((slot + 0.5) * w / 3)]
            obj = [o for o in scene if o.slot == slot]
            want = sp.RGB[sw.COLOURS[obj[0].colour]] if obj else (128, 128, 128)
            assert np.abs(got - np.array(want)).max() <= 24, (rel, slot)
    assert sp.add_images(pair_world) == root  # a second call is a no-op


# ---- the corrected analysis (synthetic/analysis.py): hand-computed values; t quantiles from a printed table
# (t_{0.975,1} = 12.7062, t_{0.975,3} = 3.18245, t_{0.975,4} = 2.77645, t_{0.80,4} = 0.94096)


def test_t_interval_matches_the_hand_computed_student_interval():
    from synthetic import analysis

    got = analysis.t_interval([1.0, 2.0, 3.0, 4.0])  # mean 2.5, s = 1.29099, s/sqrt(4) = 0.645497
    assert (got["n"], got["df"]) == (4, 3)
    assert got["t"] == pytest.approx(3.18245, abs=1e-5)
    assert (got["lo"], got["hi"]) == pytest.approx((2.5 - 3.18245 * 0.645497, 2.5 + 3.18245 * 0.645497), abs=1e-4)
    two = analysis.t_interval([1.0, 3.0])  # s = sqrt(2), s/sqrt(2) = 1: half-width = t_{0.975,1}
    assert (two["lo"], two["hi"]) == pytest.approx((2 - 12.7062, 2 + 12.7062), abs=1e-3)
    one = analysis.t_interval([5.0])
    assert one["mean"] == 5.0 and one["lo"] is None and one["hi"] is None


def test_detectable_effect_is_the_t_power_formula_over_pretraining_seeds():
    from synthetic import analysis

    assert analysis.detectable_effect(2.0, 5) == pytest.approx((2.77645 + 0.94096) * 2.0 / 5**0.5, abs=1e-4)
    assert analysis.detectable_effect(2.0, 1) is None and analysis.detectable_effect(None, 5) is None


def test_analysis_averages_fine_tuning_seeds_within_each_pretraining_seed_before_the_interval():
    """A crossed 2 x 2 design with Study 1's SUF - full pattern (per pair -3.4, +1.8 / -2.6, +2.9): the unit
    means are -0.8 and +0.15, the interval is over those two values (t with 1 df), not over the 4 pairs."""
    from synthetic import analysis

    def run(en, rl):
        return {"en": en, "rl": rl}

    record = {
        "per_run": {
            "full": {"0": {"0": run(80, 60.0), "1": run(80, 60.0)}, "1": {"2": run(80, 60.0), "3": run(80, 60.0)}},
            "suf": {"0": {"0": run(81, 56.6), "1": run(79, 61.8)}, "1": {"2": run(80, 57.4), "3": run(80, 62.9)}},
        },
        "analysis": {
            "metrics": {"non_en_avg": {"op": "mean", "of": ["rl"]}, "spread": {"op": "range", "of": ["en", "rl"]}},
            "comparisons": [["suf", "full"]],
            "report_metrics": ["non_en_avg", "en", "spread"],
            "headline": "non_en_avg",
        },
    }
    res = analysis.analyse(record)["comparisons"]["suf - full"]
    head = res["non_en_avg"]
    assert head["pairs"]["0"] == pytest.approx({"0": -3.4, "1": 1.8})
    assert head["seed_means"] == pytest.approx({"0": -0.8, "1": 0.15})
    u = head["unit"]
    half = 12.7062 * abs(-0.8 - 0.15) / 2**0.5 / 2**0.5  # s = |d| / sqrt(2); s / sqrt(n)
    assert u["n"] == 2 and (u["lo"], u["hi"]) == pytest.approx((-0.325 - half, -0.325 + half), abs=1e-3)
    assert head["pairs_t"]["n"] == 4 and head["pair_range"] == pytest.approx([-3.4, 2.9])
    assert res["en"]["seed_means"] == pytest.approx({"0": 0.0, "1": 0.0})
    assert res["spread"]["pairs"]["0"]["0"] == pytest.approx((81 - 56.6) - 20)  # range of en, rl: computed
    report = analysis.format_report(analysis.analyse(record))
    assert "| suf − full | p0f0 -3.40 p0f1 +1.80" in report and "no detectable difference" in report


def test_analysis_reads_a_recorded_metric_and_skips_one_the_record_cannot_give():
    from synthetic import analysis

    record = {
        "per_run": {
            "full": {
                "0": {"0": {"en": 80.0, "rl": 70.0, "sw": 60.0}},
                "1": {"0": {"en": 82.0, "rl": 72.0, "sw": 64.0}},
            },
            "llrd": {"0": {"0": {"en": 79.0, "non_en_avg": 66.0}}, "1": {"0": {"en": 84.0, "non_en_avg": 70.0}}},
        },
        "analysis": {
            "metrics": {"non_en_avg": {"op": "mean", "of": ["rl", "sw"]}},
            "comparisons": [["llrd", "full"]],
            "report_metrics": ["non_en_avg", "en", "rl"],
            "headline": "non_en_avg",
        },
    }
    res = analysis.analyse(record)["comparisons"]["llrd - full"]
    assert res["non_en_avg"]["seed_means"] == pytest.approx({"0": 66.0 - 65.0, "1": 70.0 - 68.0})
    assert "rl" not in res  # llrd's runs hold no rl value: no comparison, not a zero


def test_analysis_cli_refuses_a_record_without_per_run_values(tmp_path):
    from synthetic import analysis

    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"comparisons": {}}))
    with pytest.raises(SystemExit, match=r"r\.json: no 'per_run' key"):
        analysis.main([str(bad)])
    bad.write_text("{\n oops")
    with pytest.raises(SystemExit, match=r"r\.json:2: malformed JSON"):
        analysis.main([str(bad)])


def test_comparison_pages_quote_the_corrected_intervals_of_the_records():
    """docs/xvlmaml.md and docs/mclip.md state the intervals synthetic.analysis derives from the shipped records'
    per-run values, and none of the withdrawn bootstrap intervals they used to quote."""
    root = Path(__file__).resolve().parents[1]
    study1 = json.loads((root / "docs" / "synthetic" / "results.json").read_text())["xvlmaml"]
    mclip = json.loads((root / "docs" / "synthetic" / "mclip_results.json").read_text())

    def cell(rec: dict, comparison: str, metric: str) -> str:
        c = analysis.analyse({"per_run": rec["per_run"], "analysis": rec["analysis"]})["comparisons"][comparison]
        return analysis.cell(c[metric]).replace("-", "−")

    pages = {name: " ".join((root / "docs" / name).read_text().split()) for name in ("xvlmaml.md", "mclip.md")}
    for name, rec, comparison, metric in (
        ("xvlmaml.md", study1, "xvlmaml - full", "target_avg"),
        ("xvlmaml.md", study1, "control - full", "target_avg"),
        ("mclip.md", mclip, "suf - full", "target_avg"),
        ("mclip.md", mclip, "lora - suf", "target_avg"),
    ):
        assert cell(rec, comparison, metric) in pages[name], (name, comparison)
    assert "(two-level bootstrap 95% intervals)" not in pages["xvlmaml.md"]
    assert "intervals exclude 0: PET harms less" not in pages["mclip.md"]


def test_study3_report_page_is_what_its_record_renders_and_quotes_its_premise_and_headline():
    """docs/synthetic/study3.md is regenerated from docs/synthetic/study3_record.json alone (no training), and the
    record holds every run of the design with its premise checks and intervals."""
    from synthetic import study3, study3_report

    root = Path(__file__).resolve().parents[1] / "docs" / "synthetic"
    record = json.loads((root / "study3_record.json").read_text())
    assert (root / "study3.md").read_text() == study3_report.render(record)
    assert record["intervals"] == json.loads(json.dumps(analysis.analyse(record)))
    arms = {study3.arm(p, e, s) for p, e, s in study3.arms(study3.POLICIES, list(record["design"]["strengths"]))}
    assert set(record["per_run"]) == arms and not record["missing"]
    for name, by_p in record["per_run"].items():
        assert {ps: set(by_f) for ps, by_f in by_p.items()} == {
            str(ps): {str(fs) for fs in study3.finetune_seeds(ps)} for ps in study3.PRETRAIN_SEEDS
        }, name
    cell = record["premise"]["0"]["base"]["trained"]
    assert len(cell["100"]["alignment"]["pre"]["cr"]) == 13 and cell["verdicts"]["layer_premise"] is False


def test_every_interval_in_the_readme_is_re_derived_from_the_records_in_the_repository():
    """README's synthetic-study intervals come from docs/synthetic/{study1,study3}_record.json and
    mclip_results.json through synthetic.analysis (the pretraining seed as the unit), not from the withdrawn
    bootstrap."""
    from synthetic import analysis

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()

    def cell(name: str, comparison: str, metric: str) -> str:
        rec = json.loads((root / "docs" / "synthetic" / name).read_text())
        return analysis.cell(analysis.analyse(rec)["comparisons"][comparison][metric]).replace("-", "−")

    for name, comparison, metric in (
        ("study1_record.json", "suf - full", "non_en_avg"),
        ("study1_record.json", "xvlmaml - full", "target_avg"),
        ("mclip_results.json", "suf - full", "target_avg"),
        ("study3_record.json", "suf-trained-base - full-trained-base", "non_en_avg"),
        ("study3_record.json", "suf-frozen-base - full-frozen-base", "non_en_avg"),
        ("study3_record.json", "llrd-trained-base - full-trained-base", "non_en_avg"),
        ("study3_record.json", "top-frozen-base - full-trained-base", "non_en_avg"),
        ("study3_record.json", "lpft-trained-base - full-trained-base", "non_en_avg"),
        ("study3_record.json", "suf-trained-mid - full-trained-mid", "non_en_avg"),
    ):
        assert cell(name, comparison, metric) in " ".join(readme.split())
    assert "[−3.0, +2.3]" not in readme and "~3 points" not in readme


# ---- Study 3 (synthetic/study3.py, premise.py, lpft.py; docs/synthetic/protocol_study3.md)


def test_study3_design_nests_fine_tuning_seeds_and_builds_every_arm(tmp_path):
    from synthetic import study3

    seeds = [fs for ps in study3.PRETRAIN_SEEDS for fs in study3.finetune_seeds(ps)]
    assert len(study3.PRETRAIN_SEEDS) >= 5 and len(seeds) == len(set(seeds)) == 2 * len(study3.PRETRAIN_SEEDS)
    d = study3.Design(tmp_path, study3.PRETRAIN_SEEDS, 2, tuple(study3.STRENGTHS), study3.POLICIES, tmp_path / "p0.bin")
    jobs = d.jobs(d.pretrain_seeds, list(d.strengths), d.policies)
    probes = [cmd for cmd, _ in jobs if "synthetic.lpft" in cmd]
    runs = {Path(cmd[cmd.index("--output-dir") + 1]).name: cmd for cmd, _ in jobs if "--output-dir" in cmd}
    assert len(probes) == 10 and jobs[0][0] == probes[0]  # the probes first: LP-FT's second phase reads them
    # 9 arms (4 policies x 2 embeddings + top) x 3 strengths (mid: amendment A2) x 10 pairs, + a blind floor per
    # seed and strength; strength by strength, base (the headline's) first
    assert len(runs) == 9 * 3 * 10 + 5 * 3
    order = [name.split("-")[1 if name.startswith("blind") else 2] for name in runs]
    assert order == sorted(order, key=["base", "mid", "strong"].index)
    mid = runs["llrd-trained-mid-p2-f105"]
    assert mid[mid.index("--lr") + 1] == "0.001" and mid[mid.index("--seed") + 1] == "105"
    frozen, trained = runs["suf-frozen-strong-p3-f106"], runs["suf-trained-strong-p3-f106"]
    assert "--freeze-embeddings" in frozen and "--freeze-embeddings" not in trained
    assert frozen[frozen.index("--lr") + 1] == "0.001" and frozen[frozen.index("--seed") + 1] == "106"
    lp = runs["lpft-trained-base-p3-f107"]
    assert lp[lp.index("--policy") + 1] == "full" and lp[lp.index("--checkpoint") + 1].endswith("lp-p3-f107.pt")
    top = runs["top-frozen-base-p0-f100"]
    assert top[top.index("--policy") + 1] == "top" and "--freeze-embeddings" not in top  # top freezes them itself
    assert "top-trained-base-p0-f100" not in runs
    spec = study3.analysis_spec(list(study3.STRENGTHS), study3.POLICIES)
    assert spec["comparisons"][0] == ["suf-trained-base", "full-trained-base"]  # the headline
    assert ["suf-trained-strong", "full-trained-strong", "suf-trained-base", "full-trained-base"] in spec["comparisons"]
    assert ["suf-frozen-base", "full-frozen-base", "suf-trained-base", "full-trained-base"] in spec["comparisons"]
    assert ["top-frozen-mid", "full-frozen-mid", "top-frozen-base", "full-frozen-base"] in spec["comparisons"]


def test_study3_restart_applies_the_stored_calibration_and_never_judges_the_moved_runs_again(tmp_path, monkeypatch):
    from synthetic import study3

    d = study3.Design(tmp_path, [0], 2, tuple(study3.STRENGTHS), study3.POLICIES, tmp_path / "p0.bin")
    (tmp_path / "calibration.json").write_text(json.dumps({"fallback": {"reason": "premise", "strong_lr": 0.002}}))
    judged = []
    monkeypatch.setattr(study3, "premise_cells", lambda d, seeds, strengths: judged.append(strengths) or {"0": {}})
    monkeypatch.setattr(study3.ss, "parallel", lambda *a: pytest.fail("a restart must not run calibration again"))
    assert study3.calibrate(d, 1)["fallback"] == {"reason": "premise", "strong_lr": 0.002}
    assert d.strengths == {"base": 3e-4, "mid": 1e-3, "strong": 2e-3} and judged == [["base", "strong"]]


def test_premise_verdicts_apply_the_protocols_thresholds():
    from synthetic import premise

    def checks(drop, swap, shift, en):
        return {
            "alignment": {"mean_drop": [0.5] + [drop] * 12},  # layer 0 (embeddings) does not count
            "swap_back": {"0-2": {"gain_non_en": swap}},
            "embedding_shift": {"gain_non_en": shift},
            "dev": {"en": en},
        }

    v = premise.verdicts([checks(0.12, 1.5, 0.0, 70.0), checks(0.10, 0.5, 2.0, 60.0)], blind_dev_en=49.0)
    assert v["P0_english"] and v["english_margin"] == pytest.approx(16.0)
    assert v["P1_alignment_erodes"] and v["max_mean_drop"] == pytest.approx(0.11)
    assert v["P2_swap_back_helps"] and v["layer_premise"] and v["embedding_channel_open"]
    v = premise.verdicts([checks(0.09, 0.9, 0.9, 70.0)], blind_dev_en=56.0)
    assert not (v["P0_english"] or v["P1_alignment_erodes"] or v["P2_swap_back_helps"] or v["layer_premise"])
    assert not v["embedding_channel_open"]


def test_embedding_shift_gives_each_foreign_word_its_translations_shift_and_swap_back_restores_layers():
    from synthetic import premise

    config = train_uc2.resolve_config(str(Path(__file__).resolve().parent / "fixtures" / "configs" / "uc2_tiny.json"))
    torch.manual_seed(0)
    pre = train_uc2.build_model("xgqa", config)
    torch.manual_seed(1)
    ft = train_uc2.build_model("xgqa", config)
    pairs = {"rl": [(7, 5)], "sw": [(9, 5)]}
    shifted = premise.embedding_shift(ft, pre, pairs)
    e_ft, e_pre, e_new = (m.state_dict()[premise.EMB] for m in (ft, pre, shifted))
    assert torch.allclose(e_new[7], e_ft[7] + e_ft[5] - e_pre[5]) and torch.allclose(
        e_new[9], e_ft[9] + e_ft[5] - e_pre[5]
    )
    assert torch.equal(e_new[5], e_ft[5]) and torch.equal(e_new[8], e_ft[8])
    swapped = premise.swap_layers(ft, pre, (0,))
    for k, v in swapped.state_dict().items():
        assert torch.equal(v, (pre if k.startswith("encoder.layer.0.") else ft).state_dict()[k]), k
    moved = premise.row_movement(ft, pre, pairs)
    assert set(moved) == {"en", "rl", "sw"} and moved["rl"] > 0


def test_study3_resumes_a_run_interrupted_before_its_end_and_starts_the_others_fresh(tmp_path):
    from synthetic import study3

    d = study3.Design(tmp_path, [0], 2, ("base",), study3.POLICIES, tmp_path / "p0.bin")
    stopped = d.run_dir("suf-trained-base", 0, 100)
    stopped.mkdir(parents=True)
    (stopped / "checkpoint_last.pt").write_bytes(b"")
    assert d.finetune("suf", "trained", "base", 0, 100)[0][-1] == "--resume"
    assert "--resume" not in d.finetune("suf", "frozen", "base", 0, 101)[0]
    early = d.run_dir("suf-trained-base", 0, 101)  # stopped before its first checkpoint: --resume starts it afresh
    early.mkdir()
    (early / "args.json").write_text("{}")
    assert d.finetune("suf", "trained", "base", 0, 101)[0][-1] == "--resume"
    assert "--resume" not in d.blind("base", 0)[0]
    (stopped / "model_final.pt").write_bytes(b"")
    assert d.finetune("suf", "trained", "base", 0, 100) is None  # finished: never run again


def _study3_record(premise_holds: dict[tuple[str, str], int]) -> dict:
    """A Study 3-shaped record: 5 pretraining seeds x 2 fine-tuning seeds; the layer premise holds in the first k
    seeds of a cell (premise_holds[(strength, embeddings)] = k)."""
    from synthetic import study3

    rng = np.random.default_rng(0)
    strengths = {"base": 3e-4, "mid": 1e-3, "strong": 2e-3}
    seeds = {str(ps): [str(fs) for fs in study3.finetune_seeds(ps)] for ps in range(5)}
    per_run = {
        study3.arm(pol, emb, s): {
            ps: {fs: {lang: float(rng.uniform(40, 90)) for lang in sw.LANGS} for fs in fss} for ps, fss in seeds.items()
        }
        for pol, emb, s in study3.arms(study3.POLICIES, list(strengths))
    }

    def verdicts(holds: bool) -> dict:
        return {
            "P0_english": True,
            "english_margin": 40.0,
            "P1_alignment_erodes": True,
            "max_mean_drop": 0.4,
            "P2_swap_back_helps": holds,
            "swap_back_gain": 2.0 if holds else -5.0,
            "embedding_channel_open": True,
            "embedding_shift_gain": 7.0,
            "layer_premise": holds,
        }

    premise = {
        ps: {
            s: {e: {"verdicts": verdicts(int(ps) < premise_holds.get((s, e), 0))} for e in study3.EMBEDDINGS}
            for s in strengths
        }
        for ps in seeds
    }
    run = {lang: 30.0 for lang in sw.LANGS}
    return {
        "design": {"strengths": strengths},
        "per_run": per_run,
        "premise": premise,
        "floors": {
            "answer_prior": {"per_template_majority": 30.0},
            "blind": {"0": {"base": run}},
            "random_init": {"base": {**run, "en": 25.0}},
        },
        "analysis": study3.analysis_spec(list(strengths), study3.POLICIES),
    }


def test_study3_report_reads_each_cell_by_the_protocols_rule_and_quotes_the_records_intervals():
    from synthetic import study3_report

    record = _study3_record({("base", "trained"): 4, ("base", "frozen"): 3})
    text = study3_report.render(record)
    result = analysis.analyse(record)
    head = analysis.cell(result["comparisons"]["suf-trained-base - full-trained-base"]["non_en_avg"])
    assert f"SUF − full on the non-English average: **{head.replace('-', '−')}**" in text
    rows = {tuple(r.split(" | ")[:2]): r for r in text.splitlines() if r.startswith("| base (")}
    assert (
        "4/5 |" in rows[("| base (0.0003)", "trained")]
        and "a test of SUF's mechanism" in rows[("| base (0.0003)", "trained")]
    )
    assert (
        "3/5 |" in rows[("| base (0.0003)", "frozen")]
        and "does not hold the premise" in rows[("| base (0.0003)", "frozen")]
    )
    assert "`mid` lr 0.001, exploratory (amendment A2" in text
    dose = analysis.cell(
        result["comparisons"]["(suf-trained-mid - full-trained-mid) - (suf-trained-base - full-trained-base)"][
            "non_en_avg"
        ]
    )
    assert (
        f"| (suf-trained-mid − full-trained-mid) − (suf-trained-base − full-trained-base) | {dose.replace('-', '−')}"
        in text
    )


def test_demo_prints_study3s_headline_and_reading_and_draws_its_floors_from_the_record(tmp_path, monkeypatch, capsys):
    from synthetic import demo

    record = _study3_record({("base", "trained"): 3})
    path = tmp_path / "study3_record.json"
    path.write_text(json.dumps(record))
    monkeypatch.setattr(demo, "STUDY_RECORD", path)
    demo.print_headline()
    out = " ".join(capsys.readouterr().out.split())
    c = analysis.analyse(record)["comparisons"]["suf-trained-base - full-trained-base"]["non_en_avg"]
    u = c["unit"]
    assert f"{u['mean']:+.1f}, t 95% interval over the 5 pretraining-seed means [{u['lo']:+.1f}, {u['hi']:+.1f}]" in out
    assert (
        "holds for 3 of 5 pretraining seeds in this cell; reading (protocol rule): the world does not hold the premise"
        in out
    )
    assert "(" + "31.9" + ")" not in out and "paper" not in out  # synthetic numbers never beside the paper's
    fl = demo.floors()
    assert fl["random init, study budget"]["en"] == 25.0 and fl["blind (question-only), study budget"]["rl"] == 30.0


@pytest.mark.system
def test_study3_small_runs_end_to_end_and_its_record_re_derives_every_interval(tmp_path):
    """make synth-small's code path on a tiny world (2 pretraining seeds of 2 steps, 1 step per epoch): LP-FT's
    probe loads into the trainer whole, the premise checks run on the auxiliary dev splits, and the record holds
    per-run, per-epoch and premise numbers from which synthetic.analysis gives the recorded intervals."""
    from synthetic import analysis, lpft, study3

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({k: v for k, v in TINY.to_dict().items() if k != "version"}))
    out = tmp_path / "s3"
    study3.main(
        ["--out", str(out), "--small", "--pretrain-steps", "2", "--max-steps-per-epoch", "1"]
        + ["--checkpoint", str(out / "pretrain" / "seed0.bin"), "--world-config", str(cfg), "--workers", "1"]
    )
    rec = json.loads((out / "record.json").read_text())
    assert set(rec["per_run"]) == {f"{p}-{e}-base" for p in ("full", "suf", "lpft") for e in ("trained", "frozen")}
    assert set(rec["per_run"]["suf-trained-base"]) == {"0", "1"}
    assert set(rec["per_epoch"]["full-frozen-base"]["1"]["102"]) == {str(e) for e in range(1, 6)}
    cell = rec["premise"]["0"]["base"]["frozen"]
    assert len(cell["100"]["alignment"]["pre"]["cr"]) == 13 and "layer_premise" in cell["verdicts"]
    assert analysis.analyse(rec) == json.loads(json.dumps(rec["intervals"]))
    assert "suf-trained-base − full-trained-base" in (out / "RESULTS.md").read_text()
    # --record-only: trains nothing; a run without its final model is left out and listed as missing
    (out / "runs" / "suf-frozen-base-p1-f102" / "model_final.pt").unlink()
    study3.main(
        ["--out", str(out), "--small", "--record-only", "--checkpoint", str(out / "pretrain" / "seed0.bin")]
        + ["--world-config", str(cfg), "--max-steps-per-epoch", "1"]
    )
    partial = json.loads((out / "record.json").read_text())
    assert partial["missing"] == ["suf-frozen-base-p1-f102"] and set(partial["per_run"]["suf-frozen-base"]) == {"0"}
    # LP-FT: the probed head is what the trainer loads (nothing initialised fresh)
    lp = tmp_path / "lp.pt"
    lpft.probe(out / "world", out / "pretrain" / "seed0.bin", 3, lp)
    model = train_uc2.build_model("xgqa", train_uc2.resolve_config(str(out / "world" / "model_config.json")))
    plan, _ = train_uc2.load_checkpoint_arg(model, str(lp))
    assert plan.ok and torch.equal(
        model.state_dict()["head.3.weight"], torch.load(lp, weights_only=True)["model"]["head.3.weight"]
    )


def _marvl_files(world: Path, lang: str, translate_test: bool) -> Path:
    ds = world / "datasets"
    if lang == "en":
        return ds / "nlvr2" / "annotations" / "test.jsonl"
    if translate_test:
        return ds / "marvl" / "zero_shot" / "annotations_machine-translate" / f"marvl-{lang}_gmt.jsonl"
    return ds / "marvl" / "zero_shot" / "annotations" / f"marvl-{lang}.jsonl"


@pytest.mark.system
@pytest.mark.parametrize("model_name", ["uc2", "cclm"])
def test_tiny_marvl_suf_run_end_to_end_zero_shot_and_translate_test_in_every_language(pair_world, model_name, tmp_path):
    """The two-image task through the real scripts: train_uc2.py / train_cclm.py --task marvl --policy suf (tiny
    configs) on the NLVR2-like English pairs (UC2: region features, CCLM: the drawn images), evaluated on dev in
    every language after each epoch, then eval_zeroshot.py in every MaRVL-like language, zero-shot and translate-test:
    per-language accuracy in results.json, MaRVL_0.csv / MaRVL_0.mt.csv in IGLUE's columns, and VOLTA's
    per-example predictions file of each language, whose rows are the annotation file's and give the accuracy."""
    w, out = pair_world, tmp_path / model_name
    tok = tokenizer_check.load_tokenizer(w / "tokenizer")
    argv = ["--task", "marvl", "--policy", "suf", "--data-root", str(w), "--tokenizer", str(w / "tokenizer")]
    argv += ["--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--seed", "0"]
    argv += ["--amp", "off", "--eval-split", "dev", "--eval-every", "1", "--output-dir", str(out)]
    if model_name == "uc2":
        argv += ["--model-config", UC2_TINY, "--features", str(w / sp.FEATURES), "--max-regions", "3"]
        train_uc2.main(argv)
        inputs, first_layers = [], [9, 6]  # SUF over UC2's 12 layers, 3 per stage
    else:
        config = tmp_path / "cclm.json"  # the tiny config with the world's vocabulary
        config.write_text(json.dumps({**json.loads(Path(CCLM_TINY).read_text()), "vocab_size": len(tok)}))
        images = sp.add_images(w)
        train_cclm.main(argv + ["--model-config", str(config), "--images", str(images)])
        inputs, first_layers = ["--images", str(images)], [15, 12]  # SUF over CCLM's 18 layers
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["type"] == "train"]
    assert [r["trainable_layers"][0] for r in train] == first_layers and all(np.isfinite(r["loss"]) for r in train)
    dev = {(r["epoch"], r["lang"]) for r in logged if r["type"] == "eval"}
    assert dev == {(e, lang) for e in (1, 2) for lang in sw.LANGS}  # NLVR2 dev and its dev-<lang>_gmt files
    n_test = TINY_PAIRS.test_sets * sp.PAIRS_PER_SET
    preds = {}
    for mt in (False, True):
        argv = ["evaluate", "--run", str(out), "--split", "test", "--num-workers", "0", *inputs] + [
            "--translate-test"
        ] * mt
        assert eval_zeroshot.main(argv) == 0
        record = json.loads((out / "results.json").read_text())["test.mt" if mt else "test"]
        assert record["task"] == "marvl" and record["translate_test"] == mt and set(record["langs"]) == set(sw.LANGS)
        header, row, n_row = (x.split(",") for x in (out / f"MaRVL_0{'.mt' * mt}.csv").read_text().splitlines())
        extra = sorted(set(sw.LANGS) - {"en", *iglue.TARGET_LANGS["marvl"]})
        assert header == ["model", "en", "id", "sw", "ta", "tr", "zh", *extra, "avg"]  # IGLUE's, then the world's
        assert row[0] == model_name and row[-1] == "-1.0"  # id, ta, tr, zh not evaluated: no IGLUE average
        for lang, value, n in zip(header[1:-1], row[1:-1], n_row[1:-1]):
            got = record["langs"].get(lang)
            assert (float(value), int(n)) == ((got["accuracy"], n_test) if got else (-1.0, -1)), lang
        for lang in sw.LANGS:
            name = f"test_{lang}{'_mt' * (mt and lang != 'en')}_0_result.json"
            rows = json.loads((out / name).read_text())
            lines = _jsonl(_marvl_files(w, lang, mt))
            text = "sentence" if lang == "en" else "caption"
            gold = [int(str(x["label"]) == "True") for x in lines]
            assert [r["id"] for r in rows] == [x["identifier" if lang == "en" else "id"] for x in lines]
            assert [r["sentence"] for r in rows] == [x[text] for x in lines]
            assert [r["label"] for r in rows] == gold and {r["prediction"] for r in rows} <= {0, 1}
            acc = 100 * sum(r["prediction"] == r["label"] for r in rows) / n_test
            assert len(rows) == n_test and record["langs"][lang]["accuracy"] == pytest.approx(acc)
            preds[lang, mt] = [r["prediction"] for r in rows]
    if model_name == "uc2":  # translate-test inputs are English's: the same statement, the same pair of features
        assert all(preds[lang, True] == preds["en", False] for lang in sw.LANGS)
        # the tiny run predicts one class everywhere, so compare what the pair head reads: the pooled rows
        model, _ = eval_zeroshot.load_model(out / "model_final.pt")
        pooled = {}
        for mt in (False, True):
            sets = scoring.evaluate.build_eval_sets("uc2", "marvl", w, tok, None, "test", mt, features=w / sp.FEATURES)
            for lang, s in sets.items():
                with torch.no_grad():
                    pooled[lang, mt] = model.eval().cls_features(s.collate([s.dataset[i] for i in range(n_test)]))
        en = pooled["en", False]
        assert en.shape == (2 * n_test, 32) and not torch.allclose(en[0::2], en[1::2])  # left and right images
        for lang in set(sw.LANGS) - {"en"}:
            assert torch.equal(pooled[lang, True], en) and not torch.allclose(pooled[lang, False], en)
