"""Training-step parity: our optimizer, LR schedule, gradient accumulation, clipping and step order reproduce the
references' own training loops step for step (tests/fixtures/{uc2,cclm}/train_steps/, README sections there).

UC2: VOLTA's train_task.main() ran 4 optimizer steps (accumulation 2, clip 1.0, warm-up 2 of a 20-step schedule,
IGLUE's no-decay rule) on parity_a's XVNLI model. We drive the trainer's own pieces on the same micro-batches:
engine.parse_args with train_uc2's --recipe iglue defaults, freeze.param_groups via engine.build_optimizer with
train_uc2's no-decay rule, engine's LR schedule, engine.forward_backward / optimizer_step, the model's loss.
Compared within tests/parity.py's tolerance: every micro-batch loss, every step's LR and gradient norm (before
clipping), every weight after the last step. Two reference runs each: with the AdamW the reference ran (our default
--adamw reference) and with torch's AdamW swapped in (our --adamw torch).

CCLM: X2-VLM's XVNLI.train() ran 4 steps with its create_optimizer (weight-decay and lr_mult groups, ViT LR) and
create_scheduler on CCLM parity_a's XVNLI model; we drive train_cclm's rules (x2vlm_no_decay, lr_mult_rule,
module_lr) through the same engine pieces, each reference batch as 2 accumulated micro-batches. With X2-VLM's dropout
on (0.1: text and cross hidden and attention dropout, the ViT's drop path) under its seed, each batch as one
micro-batch: the same masks drawn in the same order (the same generator state after every forward).

CCLM retrieval's ITM hard negatives: X2-VLM's get_hard_negatives under torch.manual_seed draws the same indices as our
matching_loss, with the same loss and generator state after. CCLM's training images: X2-VLM's train transform's
logged draws replayed into ours (the streams differ): crops and ops compared on the reference's own parameters.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import engine  # noqa: E402
import freeze  # noqa: E402
import train_cclm as C  # noqa: E402
import train_uc2 as U  # noqa: E402
from formats import volta, x2vlm, x2vlm_drop_path, x2vlm_randaugment  # noqa: E402
from parity import assert_matches_reference, parity_error  # noqa: E402
from test_parity_cclm import config_from_fixture  # noqa: E402
from training import devices  # noqa: E402

HERE = Path(__file__).resolve().parent
UC2_SET = HERE / "fixtures" / "uc2" / "parity_a"
UC2_STEPS = HERE / "fixtures" / "uc2" / "train_steps"
UC2_KEYS = ("input_ids", "attention_mask", "features", "spatials", "image_mask", "target")


class _LossRecorder(torch.nn.Module):
    """What engine.forward_backward calls (the trainer's LossOf), recording each micro-batch's loss."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.losses, self.rng_after = net, [], []

    def forward(self, batch):
        loss = self.net(batch)
        self.losses.append(loss.detach().double())
        self.rng_after.append(_state_sha256())  # torch's generator after the forward: what dropout drew
        return loss


def _run_steps(model, layout, args, batches, n_micro, no_decay=None, lr_mult=None, module_lr=None):
    """The loop body of engine.train, on a fixed batch list: returns (micro losses, LRs, grad norms)."""
    dist = devices.DistInfo()
    _, accum = engine.micro_and_accum(args, dist)
    total = args.schedule_epochs * (n_micro // accum)  # engine.train: schedule epochs x steps per epoch
    schedule = freeze.schedule_from_args(args, layout.num_layers)
    freeze.apply_schedule(model, layout, schedule, 0, 0)
    optimizer, lr_sched = engine.build_optimizer(
        model, layout, schedule, args, module_lr, total_steps=total, no_decay=no_decay, lr_mult=lr_mult
    )
    net = _LossRecorder(devices.wrap_for_training(model, dist, args.ddp_find_unused))
    model.train()
    it, lrs, norms = iter(batches), [], []
    for _ in range(n_micro // accum):
        _, n_bad = engine.forward_backward(net, it, accum, None, None, dist.device)
        ok, _, lr, grad_norm = engine.optimizer_step(model, optimizer, lr_sched, None, args.clip_grad, n_bad, dist)
        assert ok
        lrs.append(lr)
        norms.append(grad_norm)
    _run_steps.rng_after = net.rng_after
    return torch.stack(net.losses), torch.tensor(lrs, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64)


# ---------------------------------------------------------------- UC2 (VOLTA / IGLUE)


def _uc2_args(hp: dict, variant: str, extra: list[str]) -> object:
    argv = [
        "--task", "xvnli", "--recipe", "iglue", "--model-config", str(UC2_SET / "volta_config.json"),
        "--adamw", variant,
        "--lr", str(hp["lr"]), "--weight-decay", str(hp["weight_decay"]),
        "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "1",
        "--schedule-epochs", str(hp["optim_train_epochs"]), "--dropout", str(hp["dropout"]),
        "--output-dir", "unused",
    ]  # fmt: skip
    return engine.parse_args(U.build_parser(), argv + extra, U.DEFAULTS, "uc2")


def _uc2_model(config: dict, weights: Path) -> torch.nn.Module:
    model = U.build_model("xvnli", config)
    plan = volta.load_into(model, str(weights))
    assert plan.ok and not plan.initialised, plan.report()
    return model


def run_uc2(run: str, variant: str = "reference", extra: list[str] = (), attn: str = "sdpa") -> dict:
    """Our trainer on the fixture's micro-batches with --adamw `variant`. extra: more train_uc2
    arguments (the mutation checks use it)."""
    meta = json.loads((UC2_STEPS / f"{run}_meta.json").read_text())
    hp = meta["hyperparameters"]
    args = _uc2_args(hp, variant, list(extra))
    # what --recipe iglue must give (train_uc2.IGLUE_OPTIM): the reference run's optimizer settings
    assert (args.adam_eps, args.adam_betas, args.warmup_ratio) == (hp["adam_epsilon"], hp["adam_betas"], 0.1) or extra
    assert (args.clip_grad, engine.micro_and_accum(args, devices.DistInfo())[1]) == (1.0, 2) or extra
    config = {**U.model_config_from_args(args), "attn_implementation": attn}
    model = _uc2_model(config, UC2_SET / "xvnli" / "pytorch_model.bin")
    inp = torch.load(UC2_SET / "xvnli" / "inputs.pt", weights_only=True)
    batches = [{k: inp[k][torch.tensor(ix)] for k in UC2_KEYS} for ix in meta["micro_batches"]]
    layout = U.layer_layout("xvnli", config)
    losses, lrs, norms = _run_steps(model, layout, args, batches, len(batches), U.NO_DECAY_RULES[args.recipe])
    return {"micro_losses": losses, "lrs": lrs, "grad_norms": norms, "model": model, "config": config}


def _weights_error(ours: torch.nn.Module, config: dict, ref_file: Path) -> tuple[float, str]:
    ref = _uc2_model(config, ref_file).state_dict()
    return max((parity_error(v, ref[k]), k) for k, v in ours.state_dict().items())


def _check_all(got: dict, ref: dict, ref_weights: Path) -> None:
    for key in ("micro_losses", "lrs", "grad_norms"):
        assert_matches_reference(key, got[key], ref[key])
    err, name = _weights_error(got["model"], got["config"], ref_weights)
    assert err <= 1.0, f"weights after step 4: {name} at {err:.2f}x the parity tolerance"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_uc2_training_steps_match_volta_train_task_as_iglue_ran_it(attn: str) -> None:
    """4 steps of VOLTA's loop with the AdamW IGLUE ran (pytorch-transformers': eps before the bias correction,
    weight decay after the update) and ours with the default --adamw reference: losses, LRs, norms, weights."""
    ref = torch.load(UC2_STEPS / "iglue_adamw_steps.pt", weights_only=True)
    _check_all(run_uc2("iglue_adamw", attn=attn), ref, UC2_STEPS / "iglue_adamw_weights_after_step4.bin")


def test_uc2_torch_adamw_matches_volta_train_task_with_torch_adamw() -> None:
    """The same loop with torch's AdamW swapped in (the fixture README) and ours with --adamw torch: losses, LRs,
    norms, weights. Against IGLUE's own AdamW, torch's ends measurably elsewhere in 4 steps (docs/choices.md)."""
    ref = torch.load(UC2_STEPS / "torch_adamw_steps.pt", weights_only=True)
    got = run_uc2("torch_adamw", "torch")
    _check_all(got, ref, UC2_STEPS / "torch_adamw_weights_after_step4.bin")
    err, _ = _weights_error(got["model"], got["config"], UC2_STEPS / "iglue_adamw_weights_after_step4.bin")
    assert err > 50, f"the AdamW difference was expected to show against IGLUE's; weights within {err:.2f}x"


# ---------------------------------------------------------------- CCLM (X2-VLM)

CCLM_SET = HERE / "fixtures" / "cclm" / "parity_a" / "xvnli"
CCLM_STEPS = HERE / "fixtures" / "cclm" / "train_steps"


def run_cclm(run: str, variant: str = "reference", extra: list[str] = (), micro: int = 2) -> dict:
    """Our CCLM trainer's pieces (--adamw `variant`, --dropout as the run's) on the fixture's batches, each
    reference batch of 4 as micro-batches of `micro` (X2-VLM has no accumulation: its mean cross-entropy over 4 is
    the mean of two halves' means; with dropout only 1 x 4 draws X2-VLM's masks), torch seeded as X2-VLM's loader."""
    meta = json.loads((CCLM_STEPS / f"{run}_meta.json").read_text())
    hp = meta["hyperparameters"]
    mc = json.loads((CCLM_SET / "model_config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:  # set A's sizes as a --model-config file
        (Path(tmp) / "set_a.json").write_text(json.dumps(config_from_fixture(mc)))
        argv = [
            "--task", "xvnli", "--lr", str(hp["lr"]), "--vision-lr", str(hp["vision_lr"]),
            "--lr-mult", str(hp["lr_mult"]), "--weight-decay", str(hp["weight_decay"]),
            "--batch-size", "4", "--micro-batch-size", str(micro), "--epochs", "1",
            "--schedule-epochs", str(hp["epochs"]), "--dropout", str(hp["dropout"]), "--output-dir", "unused",
            "--adamw", variant, "--model-config", str(Path(tmp) / "set_a.json"),
        ]  # fmt: skip
        args = engine.parse_args(C.build_parser(), argv + list(extra), C.DEFAULTS, "cclm")
        config = C.model_config_from_args(args)  # --dropout: text/cross dropouts and the ViT's drop path
    assert (args.adam_eps, args.adam_betas, args.clip_grad) == (hp["adam_eps"], hp["adam_betas"], 0.0) or extra
    assert hp["dropout"] == hp.get("drop_path", hp["dropout"]) == config["vision_drop_path"] or extra
    model = C.build_model("xvnli", config)
    x2vlm.load_checkpoint(model, str(CCLM_SET / "checkpoint.th"))
    x = torch.load(CCLM_SET / "inputs.pt", weights_only=True)
    batches = []
    for b in meta["batches"]:
        for half in (b[i : i + micro] for i in range(0, len(b), micro)):
            ix = torch.tensor(half)
            atts = x["text_atts"][ix]
            n = int(atts.sum(1).max())  # padded to the longest, as data.py's collate and X2-VLM's tokenizer call
            batches.append(
                {"images": x["images"][ix], "text_ids": x["text_ids"][ix][:, :n], "text_atts": atts[:, :n],
                 "label": x["targets"][ix]}
            )  # fmt: skip
    large_lr = C.lr_mult_prefixes("xvnli", True, config)
    layout = C.layer_layout("xvnli", config)
    torch.manual_seed(hp["seed"])  # X2-VLM's run: its loader's __iter__, after the optimizer is built
    losses, lrs, _ = _run_steps(
        model, layout, args, batches, len(batches), C.x2vlm_no_decay, C.lr_mult_rule(large_lr, args.lr_mult),
        {"vision_encoder": args.vision_lr},
    )  # fmt: skip
    # per-parameter LR of each step, from the groups as built (the schedule multiplies every group alike)
    schedule = freeze.schedule_from_args(args, layout.num_layers)
    groups = freeze.param_groups(
        model, layout, schedule, args.lr, args.weight_decay, {"vision_encoder": args.vision_lr},
        C.x2vlm_no_decay, C.lr_mult_rule(large_lr, args.lr_mult),
    )  # fmt: skip
    peak = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = {n: peak[id(p)] for n, p in model.named_parameters()}
    return {
        "losses": losses.view(-1, 4 // micro).mean(1), "lrs": lrs, "model": model, "per_param": named,
        "config": config, "rng_after": _run_steps.rng_after,
    }  # fmt: skip


# An attention key bias adds q.b to every score of a query: softmax ignores it, so its exact gradient is 0 and the
# computed one is rounding noise, which AdamW with eps 1e-8 turns into LR-sized steps of arbitrary sign (X2-VLM's own
# runs random-walk them too; the outputs do not depend on them, which the per-step losses check). With UC2's eps 1e-6
# the noise stays far below the tolerance, so UC2 compares them.
def _is_key_bias(name: str) -> bool:
    return name.endswith("attention.self.key.bias")


def _cclm_weights_error(model, ref_file: Path) -> tuple[float, str]:
    """Every weight; a file with a `stride` holds every stride-th element of each flattened tensor."""
    ref = torch.load(ref_file, weights_only=True)
    stride, ref = ref.get("stride", 1), ref["model"]
    ours = {k: v.flatten()[::stride] if stride > 1 else v for k, v in model.state_dict().items()}
    assert set(ref) == set(ours), sorted(set(ref) ^ set(ours))
    return max((parity_error(ours[k], v), k) for k, v in ref.items() if not _is_key_bias(k))


def _check_cclm(got: dict, run: str, weights: str = "weights_after_step4.th") -> None:
    """Losses, every parameter's LR and weight decay at every step, every weight after the last step."""
    meta = json.loads((CCLM_STEPS / f"{run}_meta.json").read_text())
    ref = torch.load(CCLM_STEPS / f"{run}_steps.pt", weights_only=True)
    assert_matches_reference("losses", got["losses"], ref["losses"])
    factor = got["lrs"] / got["lrs"].max()  # the schedule's factor per step (optimizer_step reports the largest LR)
    for name, (group, wd) in meta["param_group_and_weight_decay"].items():
        lr, our_wd = got["per_param"][name]
        assert our_wd == wd, f"{name}: weight decay {our_wd}, X2-VLM {wd}"
        assert_matches_reference(f"{name} LR per step", lr * factor, ref["group_lrs"][:, group])
    err, name = _cclm_weights_error(got["model"], CCLM_STEPS / f"{run}_{weights}")
    assert err <= 1.0, f"weights after step 4: {name} at {err:.2f}x the parity tolerance"


def test_cclm_training_steps_match_x2vlm_xvnli_train_as_x2vlm_ran_it() -> None:
    """4 steps of X2-VLM's XVNLI.train with the AdamW it ran (transformers': eps before the bias correction, weight
    decay after the update) and ours with the default --adamw reference."""
    _check_cclm(run_cclm("x2vlm_adamw"), "x2vlm_adamw")


def test_cclm_torch_adamw_matches_x2vlm_xvnli_train_with_torch_adamw() -> None:
    """The same loop with torch's AdamW swapped in and ours with --adamw torch."""
    _check_cclm(run_cclm("torch_adamw", "torch"), "torch_adamw")


DROPOUT_WEIGHTS = "weights_after_step4_every4th.th"


def test_cclm_training_steps_with_dropout_match_x2vlm_draw_for_draw() -> None:
    """X2-VLM's XVNLI.train with its dropout on (0.1: text and cross hidden/attention dropout, the ViT's drop path),
    torch seeded by its loader: ours with --dropout 0.1 under the same seed draws the same masks (the generator
    in the same state after every forward: vision, text, cross in X2-VLM's order and shapes; eager attention) and
    gives the same losses, LRs and weights (every 4th element of each tensor stored)."""
    got = run_cclm("x2vlm_dropout", micro=4)
    meta = json.loads((CCLM_STEPS / "x2vlm_dropout_meta.json").read_text())
    for step, (ours, ref) in enumerate(zip(got["rng_after"], meta["rng_after_forward_sha256"], strict=True)):
        assert ours == ref, f"step {step + 1}: torch's generator after the forward differs from X2-VLM's"
    _check_cclm(got, "x2vlm_dropout", DROPOUT_WEIGHTS)


@pytest.mark.parametrize("mutation", ["timm_drop_path", "dropout_0.2"])
def test_cclm_dropout_steps_leave_x2vlm_with_other_draws(mutation: str, monkeypatch) -> None:
    """What the dropout comparison catches: timm's own DropPath (same distribution, drawn with bernoulli_: other
    masks from the first ViT block with a rate on, and other text/cross masks after it) or another rate."""
    extra = []
    if mutation == "timm_drop_path":
        monkeypatch.setattr(x2vlm_drop_path, "use_reference_draws", lambda vit: None)
    else:
        extra = ["--dropout", "0.2"]
    got = run_cclm("x2vlm_dropout", extra=extra, micro=4)
    meta = json.loads((CCLM_STEPS / "x2vlm_dropout_meta.json").read_text())
    assert got["rng_after"][0] != meta["rng_after_forward_sha256"][0] or mutation == "dropout_0.2"
    ref = torch.load(CCLM_STEPS / "x2vlm_dropout_steps.pt", weights_only=True)
    assert parity_error(got["losses"], ref["losses"]) > 100, "the other draws were expected to change the losses"


# ---------------------------------------------------------------- CCLM retrieval: ITM hard negatives (X2-VLM)

FLICKR_SET = HERE / "fixtures" / "cclm" / "parity_a" / "xflickrco"
NEGATIVES = CCLM_STEPS / "x2vlm_hard_negatives.pt"


def _state_sha256() -> str:
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()


class _Draws:
    """Records what each torch.multinomial call returns (arithmetic unchanged): ours draws the negative images
    for every row in one call, then the negative texts in a second."""

    def __init__(self, monkeypatch):
        self.calls, real = [], torch.multinomial

        def recording(*a, **k):
            out = real(*a, **k)
            self.calls.append(out.squeeze(-1).clone())
            return out

        monkeypatch.setattr(torch, "multinomial", recording)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        (image_neg, text_neg), self.calls = self.calls, []
        return image_neg, text_neg


def _retrieval_model() -> torch.nn.Module:
    mc = json.loads((FLICKR_SET / "model_config.json").read_text())
    config = {**config_from_fixture(mc), "dropout": 0.0, "attn_dropout": 0.0, "vision_drop_path": 0.0}
    model = C.build_model("xflickrco", config)
    x2vlm.load_checkpoint(model, str(FLICKR_SET / "checkpoint.th"))
    return model.train()


def _direct_inputs(meta: dict, model) -> dict:
    """The reference driver's seeded random inputs to get_matching_loss, rebuilt here (their sha256 is stored;
    numpy, whose values do not depend on the CPU kernel set as torch.randn's do): bs 16 with repeated image ids,
    two of them the same image twice (equal features: tied similarity rows), rows 0-7 aligned (text feature = its
    image's, as after training) so the 1e-5 floor decides their draws."""
    rng = np.random.default_rng(meta["input_seed"])
    idx = torch.tensor(meta["direct_idx"])
    bs, nv, nt, e = len(idx), 5, 6, model.vision_proj.out_features

    def unit_rows(n: int, d: int) -> torch.Tensor:
        x = rng.standard_normal((n, d))
        return torch.from_numpy((x / np.sqrt((x * x).sum(1, keepdims=True))).astype(np.float32))

    x = {"image_embeds": torch.from_numpy(rng.standard_normal((bs, nv, model.vision_proj.in_features)).astype("f4"))}
    x["text_embeds"] = torch.from_numpy(rng.standard_normal((bs, nt, model.text_proj.in_features)).astype("f4"))
    lengths = torch.from_numpy(rng.integers(2, nt + 1, bs))
    x["text_atts"] = (torch.arange(nt)[None] < lengths[:, None]).long()
    x["image_feat"], x["text_feat"] = unit_rows(bs, e), unit_rows(bs, e)
    for a, b in ((1, 2), (6, 7)):
        x["image_embeds"][b], x["image_feat"][b] = x["image_embeds"][a], x["image_feat"][a]
    x["text_feat"][:8] = x["image_feat"][:8]
    for k, t in x.items():
        assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == meta["direct_inputs_sha256"][k], k
    return {**x, "idx": idx}


def test_cclm_hard_negatives_match_x2vlm_draw_for_draw_in_the_training_forward(monkeypatch) -> None:
    """X2-VLM's XVLMPlusForRetrieval.forward on set A's training batch (image 0 twice, ids [0,1,2,0]) under
    torch.manual_seed(s), 8 seeds: our model's training loss draws the same negative image and text per row
    (never one sharing the row's image id), gives the same ITC and ITM losses, and leaves torch's generator in the
    same state (sha256 of its state)."""
    ref = torch.load(NEGATIVES, weights_only=True)["forward"]
    meta = json.loads((CCLM_STEPS / "x2vlm_hard_negatives_meta.json").read_text())
    model, x = _retrieval_model(), torch.load(FLICKR_SET / "inputs.pt", weights_only=True)
    batch = {"images": x["images"][x["train_image_index"]], "text_ids": x["train_text_ids"],
             "text_atts": x["train_text_atts"], "idx": x["train_idx"]}  # fmt: skip
    draws, itm = _Draws(monkeypatch), []
    matching = model.matching_loss
    monkeypatch.setattr(model, "matching_loss", lambda *a: itm.append(matching(*a)) or itm[-1])
    for i, seed in enumerate(ref["seeds"].tolist()):
        torch.manual_seed(seed)
        with torch.no_grad():
            total = model.loss(batch)
        assert _state_sha256() == meta["forward_rng_after_sha256"][i], f"seed {seed}: generator state after differs"
        image_neg, text_neg = draws.take()
        assert_matches_reference(f"seed {seed} negative images", image_neg, ref["image_neg"][i])
        assert_matches_reference(f"seed {seed} negative texts", text_neg, ref["text_neg"][i])
        assert_matches_reference(f"seed {seed} ITM loss", itm[-1], ref["loss_itm"][i])
        assert_matches_reference(f"seed {seed} ITC + ITM", total, ref["loss_itc"][i] + ref["loss_itm"][i])


def test_cclm_hard_negatives_match_x2vlm_get_matching_loss_on_a_larger_batch(monkeypatch) -> None:
    """X2-VLM's get_matching_loss on 16 rows with repeated image ids (and the same image twice under one id,
    tied similarities), 4 seeds: the same draws, ITM loss and generator state after."""
    ref = torch.load(NEGATIVES, weights_only=True)
    meta = json.loads((CCLM_STEPS / "x2vlm_hard_negatives_meta.json").read_text())
    model = _retrieval_model()
    assert_matches_reference("temp", model.temp.detach(), ref["temp"])
    x, ref = _direct_inputs(meta, model), ref["direct"]
    draws = _Draws(monkeypatch)
    args = (x["image_embeds"], x["image_feat"], x["text_embeds"], x["text_atts"], x["text_feat"], x["idx"])
    for i, seed in enumerate(ref["seeds"].tolist()):
        torch.manual_seed(seed)
        with torch.no_grad():
            loss = model.matching_loss(*args)
        assert _state_sha256() == meta["direct_rng_after_sha256"][i], f"seed {seed}: generator state after differs"
        image_neg, text_neg = draws.take()
        assert_matches_reference(f"seed {seed} negative images", image_neg, ref["image_neg"][i])
        assert_matches_reference(f"seed {seed} negative texts", text_neg, ref["text_neg"][i])
        assert not (x["idx"][image_neg] == x["idx"]).any() and not (x["idx"][text_neg] == x["idx"]).any()
        assert_matches_reference(f"seed {seed} ITM loss", loss, ref["loss_itm"][i])


# ---------------------------------------------------------------- CCLM training images: X2-VLM's train transform
# X2-VLM draws from torch (crop box, flip) and numpy's global generator (RandomAugment); ours from one numpy
# Generator per item, so the streams cannot match. The reference driver logged every draw in order; _Replay hands
# them to our code in the order it asks (a kind or count out of order fails), so each step's arithmetic is compared
# on the reference's own parameters.

AUG = CCLM_STEPS / "x2vlm_randaugment"
EXACT_OPS = {"Identity", "Equalize", "Brightness", "Sharpness", "TranslateX", "TranslateY"}
WARP_OPS = {"ShearX", "ShearY", "Rotate"}


class _Replay:
    """A numpy-Generator stand-in returning the reference's logged draws in order."""

    def __init__(self, draws):
        self.queue = [tuple(d) for d in draws]

    def _next(self, kind: str, *bounds):
        assert self.queue, f"our code asks for one more draw ({kind}) than the reference made"
        got, value, *ref_bounds = self.queue.pop(0)
        assert got == kind, f"our code asks for {kind} where the reference drew {got}"
        # the range the reference drew from (its log ratio in float32)
        assert np.allclose(bounds, ref_bounds, rtol=0, atol=1e-6), f"{kind} in {bounds}, X2-VLM {ref_bounds}"
        return value

    def uniform(self, low, high):
        return self._next("uniform", low, high)

    def integers(self, low, high):
        return self._next("integers", low, high)

    def random(self):
        return self._next("random")

    def choice(self, options, n):
        names = self._next("choice")
        assert len(names) == n and set(names) <= set(options)
        return np.array(names)


def _aug_fixture():
    return np.load(f"{AUG}.npz"), json.loads(Path(f"{AUG}_meta.json").read_text())


def _crop_flip_draws(draws: list) -> list:
    """The crop's draws and the flip's (the first `random`): what comes before RandomAugment."""
    flip = next(i for i, d in enumerate(draws) if d[0] == "random")
    return draws[: flip + 1]


# the warps' fill (128, 128, 128), and what Brightness (factor 1.36) makes of it when it runs after a warp
FILLS = (128, 174)


def _away_from_fill(ours: np.ndarray, ref: np.ndarray, margin: int = 2) -> np.ndarray:
    """Pixels more than `margin` pixels from any pixel equal to a fill grey in either output."""
    fill = np.zeros(ours.shape[:2], dtype=bool)
    for v in FILLS:
        fill |= (ours == v).all(-1) | (ref == v).all(-1)
    near = np.pad(fill, margin)
    h, w = fill.shape
    grown = np.zeros_like(fill)
    for dy in range(2 * margin + 1):
        for dx in range(2 * margin + 1):
            grown |= near[dy : dy + h, dx : dx + w]
    return ~grown


def test_x2vlm_train_transform_replayed_draws_give_its_crops_and_images() -> None:
    """X2-VLM's train_transform on 3 images x 8 seeds, every draw replayed into ours in the reference's order:
    the same crop box, the same crop + bicubic resize + flip bytes, the same draw sequence through RandomAugment;
    the same output bytes where only Identity / Equalize / Brightness / Sharpness / Translate ran; within 2 levels
    away from the fill border where one shear or rotation ran (cv2's fixed-point bilinear vs PIL's, docs/choices.md);
    runs with AutoContrast or two warps (whose fill borders blur into each other) only for their draws and crops:
    their ops are compared one by one below. ToTensor + Normalize of the reference's bytes: its tensor."""
    arrays, meta = _aug_fixture()
    res, seen = meta["res"], set()
    for run in meta["runs"]:
        name = f"img{run['image']}_seed{run['seed']}"
        img = Image.fromarray(arrays[f"raw{run['image']}"])
        pre = _crop_flip_draws(run["draws"])
        box = x2vlm_randaugment.random_resized_crop_box(_Replay(pre[:-1]), img.width, img.height)
        assert list(box) == run["crop_box"], f"{name}: crop box {box}, X2-VLM {run['crop_box']}"
        # the crop and flip alone: RandomAugment given two Identity ops
        crop = _Replay(pre + [("choice", ["Identity", "Identity"]), ("random", 1.0), ("random", 1.0)])
        got = data.train_pixels(img, res, crop, flip=True).numpy()
        np.testing.assert_array_equal(got, arrays[f"{name}_after_flip"], err_msg=f"{name}: crop/resize/flip")
        replay = _Replay(run["draws"])
        got = data.train_pixels(img, res, replay, flip=True).numpy()
        assert not replay.queue, f"{name}: the reference drew {replay.queue} more"
        ops = {o["op"] for o in run["applied_ops"]}
        seen |= ops
        ref = arrays[f"{name}_after_augment"] if ops else arrays[f"{name}_after_flip"]
        if ops <= EXACT_OPS:
            np.testing.assert_array_equal(got, ref, err_msg=f"{name}: {sorted(ops)}")
        elif ops <= EXACT_OPS | WARP_OPS and sum(o["op"] in WARP_OPS for o in run["applied_ops"]) == 1:
            diff = np.abs(got.astype(int) - ref.astype(int)).max(-1)[_away_from_fill(got, ref)]
            bound = 3 if "Brightness" in ops else 2  # Brightness (x1.36) after a warp scales its +-2 to +-3
            assert diff.max() <= bound, f"{name}: {sorted(ops)} differ by {diff.max()} away from the fill border"
        if f"{name}_tensor" in arrays:
            want = torch.from_numpy(arrays[f"{name}_tensor"])
            assert_matches_reference(f"{name} tensor", data.normalize_images(torch.from_numpy(ref)), want)
    assert seen >= EXACT_OPS - {"TranslateX"} | WARP_OPS | {"AutoContrast"}, seen


def test_x2vlm_randaugment_each_op_on_the_references_parameters() -> None:
    """Each of the 10 ops (shears, translations, rotation with both signs) on the reference's drawn arguments, on
    2 crops: the same bytes for Identity, Equalize, Brightness, Sharpness, TranslateX/Y; within 2 levels away from
    the fill border for ShearX/Y and Rotate; AutoContrast the same where a channel's minimum is 0, and where it is
    above 0 ours is the intended stretch (minimum -> 0, maximum -> 254 or 255) where X2-VLM's uint8 negation wraps
    (docs/reference_facts.md#F-cclm-randaugment)."""
    arrays, meta = _aug_fixture()
    wrapped = 0
    for row in meta["op_table"]:
        base = arrays[f"img{row['image']}_seed{meta['seeds'][row['image']][0]}_after_flip"]
        draws = [("choice", [row["op"], "Identity"]), ("random", 0.0), *row["sign_draws"], ("random", 0.0)]
        replay = _Replay(draws)
        got = np.asarray(x2vlm_randaugment.random_augment(Image.fromarray(base), replay))
        assert not replay.queue, f"{row['array']}: the reference drew {replay.queue} more"
        ref, label = arrays[row["array"]], f"{row['array']} {row['args']}"
        if row["op"] in EXACT_OPS:
            np.testing.assert_array_equal(got, ref, err_msg=label)
        elif row["op"] in WARP_OPS:
            diff = np.abs(got.astype(int) - ref.astype(int)).max(-1)[_away_from_fill(got, ref)]
            assert diff.max() <= 2, f"{label}: differs by {diff.max()} away from the fill border"
        else:  # AutoContrast
            for c in range(3):
                lo, hi = int(base[..., c].min()), int(base[..., c].max())
                if lo == 0:
                    np.testing.assert_array_equal(got[..., c], ref[..., c], err_msg=f"{label} channel {c}")
                else:
                    # x * scale + offset truncated to uint8, as the reference's table: the maximum may land on 254
                    assert int(got[..., c].min()) == 0 and int(got[..., c].max()) >= 254 and hi > lo
                    assert not np.array_equal(got[..., c], ref[..., c])
                    wrapped += 1
    assert wrapped, "no AutoContrast case with a channel minimum above 0"
