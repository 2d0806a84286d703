"""freeze.py: the paper's schedules, LLRD rates, argument errors, and what the optimizer does to
frozen / newly unfrozen parameters. Tiny synthetic models with UC2's and CCLM's layer layouts."""

import argparse
import copy
import json

import pytest
import torch
import torch.nn as nn

from _timeouts import scaled

import freeze
from freeze import Schedule
from bench import table
from console import what_trains

W = 4


def block() -> nn.ModuleDict:
    return nn.ModuleDict({"dense": nn.Linear(W, W), "LayerNorm": nn.LayerNorm(W)})


def run_blocks(blocks, x):
    for b in blocks:
        x = x + torch.tanh(b["dense"](b["LayerNorm"](x)))
    return x


class TinyUC2(nn.Module):
    """VOLTA naming: 24 blocks bert.encoder.layer.0..23 = 12 layers (attention, FFN)."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = nn.ModuleDict({"word_embeddings": nn.Embedding(vocab, W), "LayerNorm": nn.LayerNorm(W)})
        self.bert.v_embeddings = nn.ModuleDict({"image_embeddings": nn.Linear(6, W)})
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(block() for _ in range(24))
        self.bert.t_pooler = nn.Linear(W, W)
        self.clfs = nn.Linear(W, 3)

    def forward(self, ids, feats):
        e = self.bert.embeddings
        x = torch.cat([e["LayerNorm"](e["word_embeddings"](ids)), self.bert.v_embeddings["image_embeddings"](feats)], 1)
        x = run_blocks(self.bert.encoder.layer, x)
        return self.clfs(torch.relu(self.bert.t_pooler(x[:, 0])))


UC2_LAYOUT = freeze.layout_from_rules(
    12,
    [("bert.encoder.layer.", 0, 2)],
    [("bert.embeddings.", "embeddings"), ("bert.v_embeddings.", "image_embeddings"), ("bert.t_pooler.", "pooler")],
    default_module="head",
    embedding_modules=("embeddings", "image_embeddings"),
)


class TinyCCLM(nn.Module):
    """X2-VLM naming: 12 text layers, then 6 cross-modal layers (ids 12..17), ViT, answer decoder."""

    def __init__(self):
        super().__init__()
        self.vision_encoder = nn.ModuleDict(
            {"patch_embed": nn.Linear(6, W), "blocks": nn.ModuleList(block() for _ in range(2))}
        )
        self.text_encoder = nn.Module()
        self.text_encoder.embeddings = nn.ModuleDict(
            {"word_embeddings": nn.Embedding(11, W), "LayerNorm": nn.LayerNorm(W)}
        )
        self.text_encoder.encoder = nn.Module()
        self.text_encoder.encoder.layer = nn.ModuleList(block() for _ in range(12))
        self.cross_encoder = nn.Module()
        self.cross_encoder.encoder = nn.Module()
        self.cross_encoder.encoder.layer = nn.ModuleList(block() for _ in range(6))
        self.text_decoder = nn.ModuleDict(
            {"bert": nn.ModuleDict({"encoder": nn.ModuleDict({"layer": nn.ModuleList([block()])})})}
        )
        self.cls_head = nn.Linear(W, 3)


CCLM_LAYOUT = freeze.layout_from_rules(
    18,
    [("text_encoder.encoder.layer.", 0, 1), ("cross_encoder.encoder.layer.", 12, 1)],
    [
        ("text_encoder.embeddings.", "embeddings"),
        ("vision_encoder.", "vision_encoder"),
        ("text_decoder.", "answer_decoder"),
        ("cls_head.", "head"),
    ],
    task_head_modules=("head", "answer_decoder"),
)


def layers_by_epoch(model, layout, schedule, epochs):
    return [r["trainable_layers"] for r in what_trains.describe_schedule(model, layout, schedule, epochs)]


# ------------------------------------------------------------------ the paper's schedules


def test_layouts_map_names():
    assert UC2_LAYOUT.layer_of("bert.encoder.layer.23.dense.weight") == 11
    assert UC2_LAYOUT.layer_of("bert.encoder.layer.1.dense.weight") == 0
    assert UC2_LAYOUT.layer_of("bert.embeddings.LayerNorm.weight") is None
    assert CCLM_LAYOUT.layer_of("cross_encoder.encoder.layer.0.dense.bias") == 12
    assert CCLM_LAYOUT.layer_of("text_decoder.bert.encoder.layer.0.dense.bias") is None
    assert CCLM_LAYOUT.module_of("text_decoder.bert.encoder.layer.0.dense.bias") == "answer_decoder"


def test_uc2_suf_k3():
    got = layers_by_epoch(TinyUC2(), UC2_LAYOUT, Schedule("suf", 12), 5)
    assert got == [list(range(9, 12)), list(range(6, 12)), list(range(3, 12)), list(range(12)), list(range(12))]


def test_cclm_suf_k3_bottom_layers_never_train_in_5_epochs():
    rows = what_trains.describe_schedule(TinyCCLM(), CCLM_LAYOUT, Schedule("suf", 18), 10)
    assert rows[0]["trainable_layers"] == [15, 16, 17]
    assert [len(r["trainable_layers"]) for r in rows] == [3, 6, 9, 12, 15, 18, 18, 18, 18, 18]
    assert all(i not in r["trainable_layers"] for r in rows[:5] for i in (0, 1, 2))  # xGQA: 5 epochs
    assert rows[0]["always_trainable"] == ["answer_decoder", "embeddings", "head", "vision_encoder"]
    assert all(r["embeddings_trainable"] for r in rows)


def test_top6_cclm_trains_only_the_cross_modal_layers_and_the_task_head():
    """Table 2 "CM only": the 6 cross-modal layers train and the rest is frozen (text layers, text
    embeddings, ViT); only the task head (classifier, xGQA answer decoder) trains besides them."""
    rows = what_trains.describe_schedule(TinyCCLM(), CCLM_LAYOUT, Schedule("top", 18, top_layers=6), 5)
    assert all(r["trainable_layers"] == list(range(12, 18)) for r in rows)
    assert rows[0]["always_trainable"] == rows[0]["task_head_modules"] == ["answer_decoder", "head"]
    assert rows[0]["frozen_modules"] == ["embeddings", "vision_encoder"] and not rows[0]["embeddings_trainable"]
    m = TinyCCLM()
    freeze.apply_schedule(m, CCLM_LAYOUT, Schedule("top", 18, top_layers=6), 0)
    trains = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trains == {
        n for n, _ in m.named_parameters() if n.split(".")[0] in ("cross_encoder", "cls_head", "text_decoder")
    }
    text = what_trains.format_schedule(rows)
    assert "task head (answer_decoder, head)" in text and "frozen: embeddings, vision_encoder" in text


def test_top_policy_freezes_what_suf_keeps_trainable():
    m = TinyUC2()
    freeze.apply_schedule(m, UC2_LAYOUT, Schedule("top", 12, top_layers=2), 0)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad} == {
        "bert.encoder",
        "clfs.weight",
        "clfs.bias",
    }
    assert not any(p.requires_grad for p in m.bert.embeddings.parameters())
    assert not any(p.requires_grad for p in m.bert.t_pooler.parameters())  # "pooler" is not this layout's task head


def test_full_and_llrd_train_everything():
    for policy in ("full", "llrd"):
        rows = what_trains.describe_schedule(TinyUC2(), UC2_LAYOUT, Schedule(policy, 12), 3)
        assert all(r["trainable_layers"] == list(range(12)) and r["frozen_params"] == 0 for r in rows)


def test_unfreeze_every_two_epochs():
    got = layers_by_epoch(TinyUC2(), UC2_LAYOUT, Schedule("suf", 12, unfreeze_every=2), 4)
    assert [len(g) for g in got] == [3, 3, 6, 6]


def test_step_unit_schedule():
    s = Schedule("suf", 12, suf_k=3, unfreeze_every=5, unfreeze_unit="step")
    assert [len(s.trainable_layers(0, step)) for step in (0, 4, 5, 9, 10, 15, 100)] == [3, 3, 6, 6, 9, 12, 12]
    rows = what_trains.describe_schedule(TinyUC2(), UC2_LAYOUT, s, epochs=3, steps_per_epoch=8)
    spans = [(r["epoch"], r["first_step"], r["last_step"], len(r["trainable_layers"])) for r in rows]
    assert spans == [(1, 0, 4, 3), (1, 5, 7, 6), (2, 8, 9, 6), (2, 10, 14, 9), (2, 15, 15, 12), (3, 16, 23, 12)]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        what_trains.describe_schedule(TinyUC2(), UC2_LAYOUT, s, epochs=3)


def test_describe_counts_params_and_embeddings_choice():
    m = TinyUC2()
    total = sum(p.numel() for p in m.parameters())
    rows = what_trains.describe_schedule(m, UC2_LAYOUT, Schedule("suf", 12, freeze_embeddings=True), 4)
    json.dumps(rows)
    assert all(r["trainable_params"] + r["frozen_params"] == total for r in rows)
    assert rows[0]["frozen_modules"] == ["embeddings", "image_embeddings"]
    assert not rows[-1]["embeddings_trainable"]
    emb = sum(p.numel() for p in m.bert.embeddings.parameters()) + sum(
        p.numel() for p in m.bert.v_embeddings.parameters()
    )
    assert rows[-1]["frozen_params"] == emb
    assert "embeddings FROZEN" in what_trains.format_schedule(rows)
    m2 = copy.deepcopy(m)
    assert freeze.apply_schedule(m2, UC2_LAYOUT, Schedule("suf", 12, freeze_embeddings=True), 3)
    assert not any(p.requires_grad for p in m2.bert.embeddings.parameters())


def test_apply_schedule_reports_changes_only():
    m, s = TinyUC2(), Schedule("suf", 12)
    assert freeze.apply_schedule(m, UC2_LAYOUT, s, 0)  # from all-trainable
    assert not freeze.apply_schedule(m, UC2_LAYOUT, s, 0)
    assert freeze.apply_schedule(m, UC2_LAYOUT, s, 1)
    assert freeze.apply_schedule(m, UC2_LAYOUT, s, 3)
    assert not freeze.apply_schedule(m, UC2_LAYOUT, s, 4)
    assert all(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------ LLRD


def test_llrd_exact_rates_cclm():
    lr, d = 3e-5, 0.88
    groups = freeze.param_groups(
        TinyCCLM(), CCLM_LAYOUT, Schedule("llrd", 18, llrd_decay=d), lr, 0.01, module_lr={"vision_encoder": 2e-5}
    )
    by = {g["name"]: g["lr"] for g in groups}
    for j in range(18):
        assert by[f"layer_{j:02d}.decay"] == pytest.approx(lr * d ** (17 - j), rel=1e-12)
        assert by[f"layer_{j:02d}.no_decay"] == by[f"layer_{j:02d}.decay"]
    assert by["layer_17.decay"] == lr
    assert by["layer_00.decay"] == pytest.approx(lr * 0.88**17)
    assert by["embeddings.decay"] == pytest.approx(lr * d**18)
    assert by["vision_encoder.decay"] == 2e-5 and by["answer_decoder.decay"] == lr and by["head.decay"] == lr


def test_lr_mult_composes_with_llrd_and_module_lr():
    """X2-VLM's lr_mult (newly initialised parameters) multiplies whatever LLRD and module_lr give;
    every group holds one lr, so a multiplied parameter gets its own group."""
    lr, d = 3e-5, 0.88
    mult = lambda name: (
        2.0 if name.startswith(("cls_head.", "cross_encoder.encoder.layer.5.", "vision_encoder.patch")) else 1.0
    )  # noqa: E731
    m = TinyCCLM()
    groups = freeze.param_groups(
        m, CCLM_LAYOUT, Schedule("llrd", 18, llrd_decay=d), lr, 0.01, module_lr={"vision_encoder": 2e-5}, lr_mult=mult
    )
    by = {g["name"]: g["lr"] for g in groups}
    assert by["head.lr_x2.decay"] == 2 * lr and "head.decay" not in by
    assert by["layer_17.lr_x2.decay"] == 2 * lr and "layer_17.decay" not in by  # top layer: undecayed
    assert by["layer_16.decay"] == pytest.approx(lr * d)
    assert by["embeddings.decay"] == pytest.approx(lr * d**18)
    assert by["vision_encoder.lr_x2.decay"] == 2 * 2e-5 and by["vision_encoder.decay"] == 2e-5
    names = {id(p): n for n, p in m.named_parameters()}
    for g in groups:
        assert all((mult(names[id(p)]) == 2.0) == (".lr_x2." in g["name"]) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_non_llrd_groups_use_base_lr():
    groups = freeze.param_groups(
        TinyCCLM(), CCLM_LAYOUT, Schedule("suf", 18), 3e-5, 0.01, module_lr={"vision_encoder": 2e-5}
    )
    assert {g["name"]: g["lr"] for g in groups if g["lr"] != 3e-5} == {
        "vision_encoder.decay": 2e-5,
        "vision_encoder.no_decay": 2e-5,
    }


def test_groups_cover_every_parameter_once_and_no_decay_on_1d():
    m = TinyUC2()
    freeze.apply_schedule(m, UC2_LAYOUT, Schedule("suf", 12), 0)  # frozen params must still be grouped
    groups = freeze.param_groups(m, UC2_LAYOUT, Schedule("suf", 12), 1e-3, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    for g in groups:
        assert set(g) == {"params", "lr", "weight_decay", "name"}
        assert all((p.ndim <= 1) == (g["weight_decay"] == 0.0) for p in g["params"])


def test_lambdalr_keeps_group_ratios():
    m = TinyCCLM()
    opt = torch.optim.AdamW(
        freeze.param_groups(m, CCLM_LAYOUT, Schedule("llrd", 18), 1e-3, 0.01, {"vision_encoder": 5e-4})
    )
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 * (s + 1))
    for _ in range(3):
        opt.step()
        sched.step()
    f = opt.param_groups[0]["lr"] / base[0]
    assert f == pytest.approx(0.4)
    assert all(g["lr"] == pytest.approx(b * f) for g, b in zip(opt.param_groups, base))


# ------------------------------------------------------------------ argument errors


def parse(*argv):
    p = argparse.ArgumentParser()
    freeze.add_policy_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, msg",
    [
        (("--policy", "suf", "--suf-k", "0"), "--suf-k"),
        (("--policy", "suf", "--suf-k", "-2"), "--suf-k"),
        (("--policy", "llrd", "--llrd-decay", "0"), "--llrd-decay"),
        (("--policy", "llrd", "--llrd-decay", "1.5"), "--llrd-decay"),
        (("--policy", "top", "--top-layers", "13"), "--top-layers 13 exceeds"),
        (("--policy", "top", "--top-layers", "0"), "--top-layers"),
        (("--policy", "suf", "--unfreeze-every", "0"), "--unfreeze-every"),
    ],
)
def test_bad_arguments_one_line_error(argv, msg):
    with pytest.raises(SystemExit) as e:
        freeze.schedule_from_args(parse(*argv), 12)
    assert msg in str(e.value.code) and "\n" not in str(e.value.code)


def test_unknown_policy_rejected(capsys):
    with pytest.raises(SystemExit):
        parse("--policy", "gradual")
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown policy"):
        Schedule("gradual", 12)


def test_good_arguments_and_d_equal_one():
    s = freeze.schedule_from_args(parse("--policy", "llrd", "--llrd-decay", "1"), 12)
    assert s.layer_lr_scale(0, None) == 1.0
    assert freeze.schedule_from_args(parse("--policy", "suf", "--suf-k", "20"), 12).trainable_layers(0) == list(
        range(12)
    )


def test_layout_errors():
    bad = freeze.LayerLayout(12, lambda n: 12 if n.startswith("clfs") else UC2_LAYOUT.layer_of(n), UC2_LAYOUT.module_of)
    with pytest.raises(ValueError, match="clfs.weight.*layer 12"):
        freeze.param_groups(TinyUC2(), bad, Schedule("full", 12), 1e-3, 0.0)
    with pytest.raises(ValueError, match="13 layers"):
        freeze.apply_schedule(TinyUC2(), UC2_LAYOUT, Schedule("full", 13), 0)
    strict = freeze.layout_from_rules(12, [("bert.encoder.layer.", 0, 2)], [("bert.", "embeddings")])
    with pytest.raises(ValueError, match="clfs.weight"):
        what_trains.describe_schedule(TinyUC2(), strict, Schedule("full", 12), 1)


# ------------------------------------------------------------------ what the optimizer does


def batch(step):
    g = torch.Generator().manual_seed(step)
    return (
        torch.randint(0, 11, (3, 5), generator=g),
        torch.randn(3, 2, 6, generator=g),
        torch.randint(0, 3, (3,), generator=g),
    )


def train_step(model, opt, step):
    ids, feats, y = batch(step)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(ids, feats), y).backward()
    opt.step()


def make(schedule, seed=0):
    torch.manual_seed(seed)
    m = TinyUC2()
    opt = torch.optim.AdamW(freeze.param_groups(m, UC2_LAYOUT, schedule, 1e-2, 0.1), weight_decay=0.1)
    return m, opt


STEP_SUF = Schedule("suf", 12, suf_k=3, unfreeze_every=2, unfreeze_unit="step")


def layer_params(m, layer):
    return [p for n, p in m.named_parameters() if UC2_LAYOUT.layer_of(n) == layer]


def test_frozen_params_untouched_no_state_no_decay():
    m, opt = make(STEP_SUF)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for step in range(2):
        freeze.apply_schedule(m, UC2_LAYOUT, STEP_SUF, 0, step)
        train_step(m, opt, step)
    for n, p in m.named_parameters():
        layer = UC2_LAYOUT.layer_of(n)
        if layer is not None and layer < 9:
            assert torch.equal(p, before[n]), n  # bitwise: no update, no weight decay
            assert p not in opt.state and p.grad is None, n
        else:
            assert p.requires_grad and p in opt.state, n


def test_newly_unfrozen_layer_trains_at_next_step():
    m, opt = make(STEP_SUF)
    for step in range(2):
        freeze.apply_schedule(m, UC2_LAYOUT, STEP_SUF, 0, step)
        train_step(m, opt, step)
    snap = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert freeze.apply_schedule(m, UC2_LAYOUT, STEP_SUF, 0, 2)  # stage 1: layers 6..11
    train_step(m, opt, 2)
    for n, p in m.named_parameters():
        layer = UC2_LAYOUT.layer_of(n)
        if layer in (6, 7, 8):
            assert not torch.equal(p, snap[n]), n
        elif layer is not None and layer < 6:
            assert torch.equal(p, snap[n]), n


def test_weight_decay_only_on_matrices():
    m, opt = make(Schedule("full", 12))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # Adam update is 0, only decoupled weight decay acts
    opt.step()
    for n, p in m.named_parameters():
        if p.ndim <= 1:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.allclose(p, before[n] * (1 - 1e-2 * 0.1)), n


def test_optimizer_state_saved_before_unfreeze_resumes_exactly():
    def run(m, opt, steps):
        for step in steps:
            freeze.apply_schedule(m, UC2_LAYOUT, STEP_SUF, 0, step)
            train_step(m, opt, step)

    m, opt = make(STEP_SUF)
    run(m, opt, range(2))
    saved_model, saved_opt = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    run(m, opt, range(2, 5))

    m2, opt2 = make(STEP_SUF, seed=1)  # built the same way, different init; state comes from the save
    m2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    run(m2, opt2, range(2, 5))
    for (n, a), b in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n


def test_no_decay_rule_hook():
    rule = lambda name, p: name.endswith("bias") or "LayerNorm" in name  # noqa: E731
    m = TinyUC2()
    groups = freeze.param_groups(m, UC2_LAYOUT, Schedule("full", 12), 1e-3, 0.1, no_decay=rule)
    names = {id(p): n for n, p in m.named_parameters()}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert exempt == {n for n, p in m.named_parameters() if rule(n, p)}
    assert all((g["weight_decay"] == 0.0) == g["name"].endswith(".no_decay") for g in groups)


# ------------------------------------------------------------------ bench smoke run (no timing assertions)


@pytest.mark.system
def test_bench_suf_step_quick_smoke(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "suf_step.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.suf_step",
            "--quick",
            "--reps",
            "1",
            "--attempts",
            "2",
            "--out",
            str(out),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "measured" in proc.stdout and "predicted" in proc.stdout
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert {r["model"] for r in rows} == {"uc2", "cclm"}
    assert len(rows) == 1 + 3 + 4 + 1 + 5 + 6  # full + SUF stages (+ frozen embeddings), UC2 then CCLM
    for r in rows:
        assert r["measured_ratio"] > 0 and r["predicted_ratio"] > 0
        assert r["scheduled_params"] == r["trainable_params"] == r["updated_params"]
    frozen = [r for r in rows if not r["embeddings_trainable"]]
    assert all(
        r["optimizer_state_bytes"] < next(f for f in rows if f["model"] == r["model"])["optimizer_state_bytes"]
        for r in frozen
    )
    # every attempt is kept and reported; the gated numbers are their medians (never a retry kept for passing)
    import statistics

    assert res["config"]["attempts"] == 2 and all(len(r["attempts"]) == 2 for r in rows)
    for r in rows:
        for key in ("measured_ratio", "predicted_ratio", "deviation"):
            assert r[key] == statistics.median(a[key] for a in r["attempts"])
    text = table.build(tmp_path)
    stage0 = next(r for r in rows if r["model"] == "uc2" and r["config"].startswith("suf stage 0"))
    assert (
        "median of 2 attempts: "
        + ", ".join(f"{a['measured_ratio']:.2f}x ({a['deviation']:+.0%})" for a in stage0["attempts"])
        in text
    )


def test_bench_table_says_when_old_results_kept_a_retry():
    old = {
        "ok": False,
        "rows": [],
        "config": {"models": {"cclm": {"attempt_1_max_deviation": 0.1035, "attempt_2_max_deviation": 0.1212}}},
    }
    rows = table.suf_step(old)
    assert any("attempt 1 10.3%, attempt 2 12.1%" in r[2] and "attempt 2's only" in r[2] for r in rows)


# ---------------------------------------------------------------- MaRVL: layers that run once per image of a pair

import train_cclm  # noqa: E402
import train_uc2  # noqa: E402
from _configs import CCLM_TINY, UC2_TINY  # noqa: E402
from _marvl_batches import cclm_batch, uc2_batch, uc2_slot  # noqa: E402

NO_DROPOUT = {
    "uc2": dict(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0),
    "cclm": dict(dropout=0.0, attn_dropout=0.0, vision_drop_path=0.0, text_layers=2, cross_layers=2),
}


def marvl(model_name: str):
    """(tiny marvl model, its layout, a synthetic batch); CCLM with 2 text + 2 cross layers."""
    trainer = train_uc2 if model_name == "uc2" else train_cclm
    config = {**trainer.resolve_config(UC2_TINY if model_name == "uc2" else CCLM_TINY), **NO_DROPOUT[model_name]}
    torch.manual_seed(0)
    model = trainer.build_model("marvl", config)
    batch = uc2_batch(config) if model_name == "uc2" else cclm_batch(config)
    return model, trainer.layer_layout("marvl", config), batch


@pytest.mark.parametrize("model_name", ["uc2", "cclm"])
def test_two_image_suf_freezes_a_layer_in_both_passes_and_unfreezes_top_down(model_name):
    """Stage by stage (k = 1): the frozen layers get no gradient from either image's pass, every trainable layer
    and the task head (UC2: pooler + pair classifier; CCLM: cls_head) get one, and the trainable set grows from
    the top layer down."""
    model, layout, batch = marvl(model_name)
    n = layout.num_layers
    schedule = Schedule("suf", n, suf_k=1)
    head = ("pooler.", "head.") if model_name == "uc2" else ("cls_head.",)
    for epoch in range(n):
        freeze.apply_schedule(model, layout, schedule, epoch)
        model.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        assert schedule.trainable_layers(epoch) == list(range(n - 1 - epoch, n))
        for name, p in model.named_parameters():
            layer = layout.layer_of(name)
            if layer is not None and layer < n - 1 - epoch:
                assert not p.requires_grad and p.grad is None, (epoch, name)
            elif layer is not None or name.startswith(head):
                assert p.grad is not None and p.grad.abs().sum() > 0, (epoch, name)


def uc2_two_copy_grads(model, batch) -> tuple[dict, dict]:
    """The loss with the left rows through `model` and the right rows through a copy: each copy's gradient is
    one pass's share."""
    twin = copy.deepcopy(model)
    pooled = torch.cat([model.encode(*uc2_slot(batch, 0)), twin.encode(*uc2_slot(batch, 1))], -1)
    torch.nn.functional.binary_cross_entropy_with_logits(model.head(pooled), batch["target"]).backward()
    return {n: p.grad for n, p in model.named_parameters()}, {n: p.grad for n, p in twin.named_parameters()}


def cclm_two_copy_grads(model, batch) -> tuple[dict, dict]:
    twin = copy.deepcopy(model)
    ids, atts, b = batch["text_ids"], batch["text_atts"], batch["text_ids"].shape[0]
    v = model.vision_encoder(batch["images"])
    left = model.cross_embeds(v[:b], model.text_encoder(ids, atts), atts)[:, 0]
    right = twin.cross_embeds(v[b:], twin.text_encoder(ids, atts), atts)[:, 0]
    torch.nn.functional.cross_entropy(model.cls_head(torch.cat([left, right], -1)), batch["label"]).backward()
    return {n: p.grad for n, p in model.named_parameters()}, {n: p.grad for n, p in twin.named_parameters()}


@pytest.mark.parametrize("model_name", ["uc2", "cclm"])
def test_two_image_layer_gradient_is_the_sum_of_both_passes(model_name):
    """One set of weights per layer: its gradient from the pair model equals the sum of what the left pass and
    the right pass contribute (measured by sending the right pass through a copy of the model)."""
    model, layout, batch = marvl(model_name)
    model.eval()
    left, right = (uc2_two_copy_grads if model_name == "uc2" else cclm_two_copy_grads)(copy.deepcopy(model), batch)
    model.loss(batch).backward()
    checked = 0
    for name, p in model.named_parameters():
        if layout.layer_of(name) is not None:
            assert right[name] is not None and right[name].abs().sum() > 0, name  # the right pass reaches it
            torch.testing.assert_close(p.grad, left[name] + right[name], rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked > 0
