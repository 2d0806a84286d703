"""integrations/: scheduled unfreezing on any model through the REAL transformers Trainer and Lightning Trainer.
Tiny random Hugging Face models built from configs in-process (nothing downloaded), a few epochs on CPU: the
trainable set at every step is what --print-schedule prints (console/what_trains.describe_schedule); a layer not
yet unfrozen is bitwise unchanged and has no optimizer state, and moves once unfrozen; each Trainer gives bitwise
the weights of our own loop (freeze.param_groups + freeze.apply_schedule, AdamW, engine.linear_warmup_decay, the
same batches, dropout 0); a Trainer run resumed from a checkpoint in the middle of a stage ends bitwise where the
uninterrupted run ends."""

import copy
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

from _timeouts import scaled  # noqa: E402

import engine  # noqa: E402
import freeze  # noqa: E402
from console import what_trains  # noqa: E402
from integrations.hf import SUFCallback  # noqa: E402
from integrations.layouts import find_layer_stack, layout_for  # noqa: E402
from integrations.lightning import SUFFinetuning  # noqa: E402
from integrations.optimizer import suf_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
VISION = dict(image_size=8, patch_size=4, **SMALL)
BATCH, N, EPOCHS = 4, 16, 3  # 4 optimizer steps per epoch


def bert():
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(vocab_size=50, num_labels=3, **SMALL, **NO_DROPOUT))


def llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=50, num_key_value_heads=2, **SMALL))


def bert_layout(model):
    return layout_for(model, head=["classifier"], others=["bert.pooler"])


def llama_layout(model):
    return layout_for(model, head=["lm_head"], others=["model.norm"])


def dataset(causal: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (N, 8), generator=g)
    return [{"input_ids": x, "labels": x.clone() if causal else torch.tensor(i % 3)} for i, x in enumerate(ids)]


# ---------------------------------------------------------------- layouts

ARCHITECTURES = {  # model -> (its layer stack in transformers 5.23, its embeddings, the rest)
    "bert": (lambda: T.BertModel(T.BertConfig(vocab_size=50, **SMALL)), "encoder.layer", ("embeddings",), ["pooler"]),
    "xlm-r": (
        lambda: T.XLMRobertaForSequenceClassification(T.XLMRobertaConfig(vocab_size=50, **SMALL)),
        "roberta.encoder.layer",
        ("roberta.embeddings",),
        ["classifier"],
    ),
    "vit": (
        lambda: T.ViTForImageClassification(T.ViTConfig(**VISION)),
        "vit.layers",
        ("vit.embeddings",),
        ["vit.layernorm", "classifier"],
    ),
    "clip-vision": (
        lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**VISION)),
        "encoder.layers",
        ("embeddings",),
        ["pre_layrnorm", "post_layernorm"],
    ),
    "siglip-vision": (
        lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**VISION)),
        "encoder.layers",
        ("embeddings",),
        ["post_layernorm", "head"],
    ),
    "llama": (llama, "model.layers", ("model.embed_tokens",), ["model.norm", "lm_head"]),
    "qwen2": (
        lambda: T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=50, num_key_value_heads=2, **SMALL)),
        "model.layers",
        ("model.embed_tokens",),
        ["model.norm", "lm_head"],
    ),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_find_layer_stack_finds_the_layers_of_common_architectures(arch):
    build, stack, embeddings, rest = ARCHITECTURES[arch]
    model = build()
    assert find_layer_stack(model) == stack
    layout = layout_for(model, others=rest)
    assert layout.num_layers == 4 and layout.embedding_modules == embeddings
    layer = {n: layout.layer_of(n) for n, _ in model.named_parameters()}
    assert {i for i in layer.values() if i is not None} == {0, 1, 2, 3}
    assert all((i is not None) == n.startswith(stack + ".") for n, i in layer.items())


def test_a_model_with_two_stacks_is_refused_naming_both_and_a_named_stack_is_used():
    model = T.CLIPModel(
        T.CLIPConfig(text_config=dict(vocab_size=50, **SMALL), vision_config=dict(image_size=8, patch_size=4, **SMALL))
    )
    with pytest.raises(ValueError, match=r"several stacks.*text_model\.encoder\.layers.*vision_model\.encoder\.layers"):
        layout_for(model)
    layout = layout_for(
        model,
        "vision_model.encoder.layers",
        head=["visual_projection"],
        others=[
            "text_model",
            "text_projection",
            "logit_scale",
            "vision_model.pre_layrnorm",
            "vision_model.post_layernorm",
        ],
    )
    assert layout.layer_of("vision_model.encoder.layers.3.mlp.fc1.weight") == 3
    assert layout.layer_of("text_model.encoder.layers.3.mlp.fc1.weight") is None
    assert layout.module_of("text_model.encoder.layers.3.mlp.fc1.weight") == "text_model"


def test_unmapped_parameters_are_an_error_naming_the_outermost_modules():
    model = T.SiglipVisionModel(T.SiglipVisionConfig(**VISION))
    with pytest.raises(ValueError, match=r"in no named module: head, post_layernorm; add them to head="):
        layout_for(model)
    layout_for(model, head=["head"], others=["post_layernorm"])


def test_a_layer_regex_gives_the_layout_of_the_module_path():
    model = bert()
    by_path, by_regex = bert_layout(model), layout_for(
        model, layer_regex=r"bert\.encoder\.layer\.(\d+)\.", embeddings=["bert.embeddings"], head=["classifier"],
        others=["bert.pooler"],
    )  # fmt: skip
    names = [n for n, _ in model.named_parameters()]
    assert [by_path.layer_of(n) for n in names] == [by_regex.layer_of(n) for n in names]
    assert by_path.num_layers == by_regex.num_layers == 4
    with pytest.raises(ValueError, match="matches the layer pattern"):
        layout_for(model, layer_regex=r"encoder\.block\.(\d+)\.")


# ---------------------------------------------------------------- the Hugging Face Trainer


class Probe(T.TrainerCallback):
    """Per optimizer step: the trainable set just before the update; after it, per layer, whether its weights
    still equal their initial values and whether the optimizer holds state for it."""

    def __init__(self, model, layout):
        self.layout, self.steps = layout, []
        self.init = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        located = freeze.locate(model, self.layout)
        layers = sorted({i for _, p, i, _ in located if i is not None and p.requires_grad})
        modules = sorted({m for _, p, i, m in located if i is None and p.requires_grad})
        self.steps.append({"step": state.global_step, "layers": layers, "modules": modules})

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        by_layer = {}
        for name, p, i, _ in freeze.locate(model, self.layout):
            if i is not None:
                same, state_ = by_layer.get(i, (True, False))
                by_layer[i] = (same and torch.equal(p, self.init[name]), state_ or p in optimizer.state)
        self.steps[-1]["unchanged"] = sorted(i for i, (same, _) in by_layer.items() if same)
        self.steps[-1]["with_state"] = sorted(i for i, (_, st) in by_layer.items() if st)


def hf_args(out, **kw) -> T.TrainingArguments:
    base = dict(
        per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=1e-2, weight_decay=0.01,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, logging_strategy="no",
    )  # fmt: skip
    return T.TrainingArguments(str(out), **{**base, **kw})


def hf_run(model, layout, schedule, out, data, resume=None, probe=None, **kw):
    suf = SUFCallback(layout, schedule)
    args = hf_args(out, **kw)
    callbacks = [suf] + ([probe] if probe else [])
    trainer = T.Trainer(
        model, args, train_dataset=data, optimizers=(suf.optimizer(model, args), None), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize(
    "build,layout_of,schedule_kw",
    [
        (bert, bert_layout, dict(suf_k=1)),
        (llama, llama_layout, dict(suf_k=1, unfreeze_every=3, unfreeze_unit="step")),
    ],
    ids=["bert-by-epoch", "llama-by-step"],
)
def test_hf_trainer_trains_what_print_schedule_says_and_frozen_layers_stay_untouched(
    tmp_path, build, layout_of, schedule_kw
):
    model = build()
    layout = layout_of(model)
    schedule = freeze.Schedule("suf", layout.num_layers, **schedule_kw)
    rows = what_trains.describe_schedule(model, layout, schedule, EPOCHS, N // BATCH)
    probe = Probe(model, layout)
    trainer = hf_run(model, layout, schedule, tmp_path, dataset(causal=build is llama), probe=probe)
    assert [s["step"] for s in probe.steps] == list(range(EPOCHS * N // BATCH))
    trained: set[int] = set()
    for s in probe.steps:
        row = next(r for r in rows if r["first_step"] <= s["step"] <= r["last_step"])
        assert (s["layers"], s["modules"]) == (row["trainable_layers"], row["always_trainable"]), s
        trained |= set(s["layers"])
        assert s["unchanged"] == sorted(set(range(4)) - trained), s  # frozen: bitwise unchanged; trained: moved
        assert s["with_state"] == sorted(trained), s  # no optimizer state before a layer first trains
    assert trained == set(rows[-1]["trainable_layers"])  # BERT by epoch: layer 0 never trains, stays unchanged
    stages = [
        r["trainable_layers"]
        for i, r in enumerate(rows)
        if i == 0 or r["trainable_layers"] != rows[i - 1]["trainable_layers"]
    ]
    changes = [e for e in trainer.state.log_history if "trainable" in e]  # logged once per change
    assert [e["trainable_layers"] for e in changes] == stages


def own_loop(model, layout, schedule, data, warmup: int, max_grad_norm: float = 1.0) -> dict:
    """Our loop: freeze.param_groups (via suf_optimizer) + apply_schedule, AdamW, engine.linear_warmup_decay,
    the batches in order (the Trainers' sequential sampler), gradient clipping as the Trainers do it."""
    optimizer = suf_optimizer(model, layout, schedule, 1e-2, 0.01)
    steps = EPOCHS * N // BATCH
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, engine.linear_warmup_decay(warmup, steps))
    for step in range(steps):
        freeze.apply_schedule(model, layout, schedule, step // (N // BATCH), step)
        batch = data[(step % (N // BATCH)) * BATCH :][:BATCH]
        model(**{k: torch.stack([torch.as_tensor(x[k]) for x in batch]) for k in batch[0]}).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        lr.step()
        model.zero_grad()
    return model.state_dict()


def test_hf_linear_schedule_is_engines_linear_warmup_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = T.get_linear_schedule_with_warmup(opt, 3, 12).lr_lambdas[0]
    ours = engine.linear_warmup_decay(3, 12)
    assert [hf(s) for s in range(14)] == [ours(s) for s in range(14)]


@pytest.mark.parametrize("policy", ["suf", "llrd"])
def test_hf_trainer_gives_the_weights_of_our_own_loop(tmp_path, policy):
    model = bert()
    init = copy.deepcopy(model.state_dict())
    layout = bert_layout(model)
    schedule = freeze.Schedule(policy, 4, suf_k=1, llrd_decay=0.5)
    data = dataset()
    hf_run(model, layout, schedule, tmp_path, data, warmup_steps=2, train_sampling_strategy="sequential")
    ours = bert()
    ours.load_state_dict(init)
    expected = own_loop(ours, bert_layout(ours), schedule, data, warmup=2)
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not torch.equal(
        got["bert.encoder.layer.1.output.dense.weight"], init["bert.encoder.layer.1.output.dense.weight"]
    )


@pytest.mark.parametrize(
    "schedule_kw,save_at",
    [(dict(suf_k=1), 6), (dict(suf_k=1, unfreeze_every=4, unfreeze_unit="step"), 6)],
    ids=["by-epoch", "by-step"],
)
def test_hf_resume_from_a_checkpoint_in_the_middle_of_a_stage_is_exact(tmp_path, schedule_kw, save_at):
    data = dataset()
    model = bert()
    init = copy.deepcopy(model.state_dict())
    layout = bert_layout(model)
    schedule = freeze.Schedule("suf", 4, **schedule_kw)
    assert schedule.stage(save_at // 4, save_at) == 1 and schedule.stage(save_at // 4, save_at - 1) == 1  # mid-stage
    kw = dict(save_strategy="steps", save_steps=save_at, warmup_steps=2)
    hf_run(model, layout, schedule, tmp_path / "whole", data, **kw)  # random sampler: resume must restore its order
    resumed = bert()
    resumed.load_state_dict(init)
    ckpt = tmp_path / "whole" / f"checkpoint-{save_at}"
    trainer = hf_run(resumed, bert_layout(resumed), schedule, tmp_path / "resumed", data, resume=str(ckpt), **kw)
    got, expected = resumed.state_dict(), model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    first = next(e for e in trainer.state.log_history if "trainable" in e and e["step"] == save_at)
    assert first["trainable_layers"] == [2, 3]  # the resumed run starts in stage 1, as the whole run was


# ---------------------------------------------------------------- Lightning


class LitBert(pl.LightningModule):
    def __init__(self, model, schedule_kw):
        super().__init__()
        self.model = model
        layout = layout_for(self, head=["model.classifier"], others=["model.bert.pooler"])
        self.suf = SUFFinetuning(layout, freeze.Schedule("suf", 4, **schedule_kw))
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def on_before_optimizer_step(self, optimizer):
        located = freeze.locate(self, self.suf.layout)
        layers = sorted({i for _, p, i, _ in located if i is not None and p.requires_grad})
        frozen = [(n, p) for n, p, i, _ in located if i not in (None, *layers)]
        frozen_same = all(torch.equal(p, self.init[n]) and p not in optimizer.state for n, p in frozen)
        self.seen.append({"step": self.trainer.global_step, "layers": layers, "frozen_untouched": frozen_same})

    def configure_optimizers(self):
        optimizer = self.suf.optimizer(self, lr=1e-2, weight_decay=0.01)
        lr = torch.optim.lr_scheduler.LambdaLR(optimizer, engine.linear_warmup_decay(2, EPOCHS * N // BATCH))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr, "interval": "step"}}


@pytest.mark.parametrize(
    "schedule_kw", [dict(suf_k=1), dict(suf_k=1, unfreeze_every=3, unfreeze_unit="step")], ids=["by-epoch", "by-step"]
)
def test_lightning_trains_what_print_schedule_says_and_gives_the_weights_of_our_own_loop(schedule_kw):
    model = bert()
    init = copy.deepcopy(model.state_dict())
    lit = LitBert(model, schedule_kw)
    lit.init = {n: p.detach().clone() for n, p in lit.named_parameters()}
    data = dataset()
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[lit.suf],
    )  # fmt: skip
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=BATCH))
    rows = what_trains.describe_schedule(lit, lit.suf.layout, lit.suf.schedule, EPOCHS, N // BATCH)
    assert [s["step"] for s in lit.seen] == list(range(EPOCHS * N // BATCH))
    for s in lit.seen:
        row = next(r for r in rows if r["first_step"] <= s["step"] <= r["last_step"])
        assert s["layers"] == row["trainable_layers"] and s["frozen_untouched"], s
    assert [h["trainable_layers"] for h in lit.suf.history] == [[3], [2, 3], [1, 2, 3], [0, 1, 2, 3]][
        : len(lit.suf.history)
    ]
    ours = bert()
    ours.load_state_dict(init)
    expected = own_loop(ours, bert_layout(ours), lit.suf.schedule, data, warmup=2)
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ---------------------------------------------------------------- the example


@pytest.mark.system
def test_the_example_script_runs_the_schedule_it_prints():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "integrations.example_hf", "--epochs", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=scaled(120),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "epoch 1: layers 3 + bert.embeddings, bert.pooler, classifier" in out
    assert "scheduled unfreezing: epoch 3, step 32: layers 1–3 + bert.embeddings" in out
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "training loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it learns the rule


def test_hf_default_optimizer_leaves_out_what_is_frozen_at_the_start_which_suf_optimizer_keeps(tmp_path):
    """The bug the callback's optimizer avoids: Trainer.create_optimizer keeps only requires_grad parameters."""
    model = bert()
    layout = bert_layout(model)
    schedule = freeze.Schedule("suf", 4, suf_k=1)
    freeze.apply_schedule(model, layout, schedule, 0)
    default = T.Trainer(model, hf_args(tmp_path), train_dataset=dataset()).create_optimizer()
    kept = {id(p) for g in default.param_groups for p in g["params"]}
    layer0 = model.bert.encoder.layer[0].output.dense.weight
    assert id(layer0) not in kept
    ours = suf_optimizer(model, layout, schedule, 1e-2)
    assert id(layer0) in {id(p) for g in ours.param_groups for p in g["params"]}


def test_suf_optimizer_exempts_from_weight_decay_what_the_hf_trainer_exempts_in_bert(tmp_path):
    model = bert()
    default = T.Trainer(model, hf_args(tmp_path), train_dataset=dataset()).create_optimizer()
    ours = suf_optimizer(model, bert_layout(model), freeze.Schedule("suf", 4), 1e-2, 0.01)

    def exempt(opt):
        return {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}

    assert exempt(default) == exempt(ours) and len(exempt(ours)) > 0
