"""XVL-MAML (comparisons/xvlmaml/maml.py, xvlmaml.py): the meta-gradient against closed forms and torch.func
references in float64, the contrastive loss by hand, frozen parameters untouched, bitwise-exact resume, two gloo
processes equal to one, and a tiny end-to-end run on the shipped fixtures.

Data: the IGLUE sample in tests/fixtures/iglue (XVNLI: English and French train_48 / test), a tiny
tokenizer trained on it and synthetic region features (fixtures.write_synthetic_features).
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.func import grad, hessian

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _configs import UC2_TINY  # noqa: E402
from _make import run_make  # noqa: E402
import _faults  # noqa: E402
import _guard  # noqa: E402
import data  # noqa: E402
from synthetic import fixtures  # noqa: E402
from formats import run_folder, torch_files  # noqa: E402
import eval_zeroshot as Z  # noqa: E402
import report.tables  # noqa: E402
import train_uc2 as U  # noqa: E402
from comparisons.xvlmaml import maml as M  # noqa: E402
from comparisons.xvlmaml import xvlmaml as X  # noqa: E402
from training import devices  # noqa: E402

IGLUE = ROOT / "tests" / "fixtures" / "iglue"
REGIONS = 6


# ---------------------------------------------------------------- meta-gradient, float64


class ScalarLinear(nn.Module):
    """y_hat = w x, loss 1/2 (w x - y)^2."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, batch):
        x, y = batch
        return 0.5 * (self.w * x - y) ** 2


def scalar_meta_grad(w, xs, ys, xq, yq, alpha, first_order):
    m = ScalarLinear(w)
    f = M.module_objective(m)
    cfg = M.MamlConfig(variant="unsupervised", inner_lr=alpha, first_order=first_order)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    g, _ = M.meta_gradient(f, f, dict(m.named_parameters()), [((t(xs), t(ys)), (t(xq), t(yq)))], ["w"], cfg)
    return g["w"].item()


CASES = [(0.7, 1.3, -0.4, 0.9, 2.1, 0.05), (-1.2, 2.0, 0.5, -0.3, 1.0, 0.2), (0.0, 0.5, 3.0, 4.0, -2.0, 1.5)]


@pytest.mark.parametrize("w,xs,ys,xq,yq,a", CASES)
def test_second_order_meta_gradient_of_scalar_linear_model_is_closed_form(w, xs, ys, xq, yq, a):
    w1 = w - a * xs * (w * xs - ys)
    expected = (1 - a * xs**2) * xq * (w1 * xq - yq)
    assert scalar_meta_grad(w, xs, ys, xq, yq, a, first_order=False) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("w,xs,ys,xq,yq,a", CASES)
def test_first_order_meta_gradient_of_scalar_linear_model_is_closed_form(w, xs, ys, xq, yq, a):
    w1 = w - a * xs * (w * xs - ys)
    expected = xq * (w1 * xq - yq)
    assert scalar_meta_grad(w, xs, ys, xq, yq, a, first_order=True) == pytest.approx(expected, rel=1e-12, abs=1e-12)


class FlatMLP(nn.Module):
    """A 3-4-1 tanh MLP whose weights are ONE flat parameter, so torch.func.hessian gives the full Hessian."""

    SHAPES = ((4, 3), (4,), (1, 4), (1,))

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = sum(math.prod(s) for s in self.SHAPES)
        self.theta = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64) * 0.7)

    @classmethod
    def loss(cls, theta, batch):
        x, y = batch
        parts, i = [], 0
        for s in cls.SHAPES:
            k = math.prod(s)
            parts.append(theta[i : i + k].view(s))
            i += k
        w1, b1, w2, b2 = parts
        return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2).squeeze(-1) - y).pow(2).mean()

    def forward(self, batch):
        return self.loss(self.theta, batch)


def mlp_data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)


def ours(model, support, query, alpha, steps, first_order):
    f = M.module_objective(model)
    cfg = M.MamlConfig(variant="unsupervised", inner_lr=alpha, inner_steps=steps, first_order=first_order)
    g, _ = M.meta_gradient(f, f, dict(model.named_parameters()), [(support, query)], ["theta"], cfg)
    return g["theta"]


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_of_mlp_equals_hessian_chain_rule(steps):
    """grad of grad against an independent torch.func reference: d L_q(theta_k)/d theta =
    (I - a H_s(theta_0)) ... (I - a H_s(theta_{k-1})) grad L_q(theta_k), Hessians by torch.func.hessian."""
    model, alpha = FlatMLP(), 0.3
    support, query = mlp_data(1), mlp_data(2)
    theta = model.theta.detach()
    ls = lambda t: FlatMLP.loss(t, support)  # noqa: E731
    thetas = [theta]
    for _ in range(steps):
        thetas.append(thetas[-1] - alpha * grad(ls)(thetas[-1]))
    v = grad(lambda t: FlatMLP.loss(t, query))(thetas[-1])
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    for t in reversed(thetas[:-1]):
        v = (eye - alpha * hessian(ls)(t)) @ v
    torch.testing.assert_close(ours(model, support, query, alpha, steps, False), v, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("first_order", [False, True])
def test_zero_inner_lr_gives_the_plain_gradient_of_the_outer_loss(first_order):
    model = FlatMLP(seed=3)
    support, query = mlp_data(4), mlp_data(5)
    plain = grad(lambda t: FlatMLP.loss(t, query))(model.theta.detach())
    assert torch.equal(ours(model, support, query, 0.0, 1, first_order), plain)


def test_first_and_second_order_differ_when_the_support_loss_is_curved():
    """Guards against a first-order path that silently ran second order (or the reverse)."""
    model = FlatMLP(seed=6)
    support, query = mlp_data(7), mlp_data(8)
    assert not torch.allclose(ours(model, support, query, 0.3, 1, True), ours(model, support, query, 0.3, 1, False))


def test_parameters_outside_adapt_names_get_only_their_outer_gradient():
    """A parameter the inner loop does not adapt enters theta' unchanged: its meta-gradient is the plain
    outer gradient at theta' (here: w2 of a two-parameter linear model, inner adapts w1 only)."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
            self.w2 = nn.Parameter(torch.tensor(-0.8, dtype=torch.float64))

        def forward(self, b):
            x, y = b
            return 0.5 * (self.w1 * x + self.w2 - y) ** 2

    m = Two()
    f = M.module_objective(m)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    (xs, ys), (xq, yq), a = (t(1.5), t(0.2)), (t(-0.7), t(1.1)), 0.1
    g, _ = M.meta_gradient(
        f,
        f,
        dict(m.named_parameters()),
        [((xs, ys), (xq, yq))],
        ["w1"],
        M.MamlConfig(variant="unsupervised", inner_lr=a),
    )
    w1p = 0.5 - a * xs * (0.5 * xs - 0.8 - ys)
    rq = w1p * xq - 0.8 - yq
    assert g["w1"].item() == pytest.approx(((1 - a * xs**2) * xq * rq).item(), rel=1e-12)
    assert g["w2"].item() == pytest.approx((rq - a * xs * xq * rq).item(), rel=1e-12)  # d w1'/d w2 = -a xs


# ---------------------------------------------------------------- contrastive loss


def test_contrastive_loss_on_a_hand_computed_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[2.0, 0.0], [3.0, 0.0]], dtype=torch.float64)  # both texts along image 0
    # cosine logits (temperature 1): [[1, 1], [0, 0]]
    i2t = math.log(2)  # rows: ties, then ties
    t2i = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2  # columns [1, 0] and [1, 0], targets 0 and 1
    assert M.contrastive_loss(image, text, 1.0, symmetric=False).item() == pytest.approx(i2t, rel=1e-12)
    assert M.contrastive_loss(image, text, 1.0).item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)
    # temperature 0.5 doubles the logits
    i2t_half = (math.log(2) + math.log(2)) / 2
    t2i_half = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    assert M.contrastive_loss(image, text, 0.5).item() == pytest.approx((i2t_half + t2i_half) / 2, rel=1e-12)
    # the two pairs share an image: neither is the other's negative, nothing left to contrast
    assert M.contrastive_loss(image, text, 1.0, groups=torch.tensor([7, 7])).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_contrastive_loss_of_identical_embeddings_is_log_n(n):
    v = torch.randn(1, 8, dtype=torch.float64).expand(n, 8)
    head = M.ContrastiveHead(8, 4).double()
    assert M.contrastive_loss(v, v * 3.0, 0.07).item() == pytest.approx(math.log(n), rel=1e-12)
    assert head(v, v).item() == pytest.approx(math.log(n), rel=1e-12)  # projections of identical rows: identical


# ---------------------------------------------------------------- UC2 wiring (xvlmaml.py), no data files


def synthetic_pairs(n=4, tokens=5, regions=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, 100, (n, tokens), generator=g),
        "attention_mask": torch.ones(n, tokens),
        "features": torch.randn(n, regions, 2048, generator=g),
        "spatials": torch.rand(n, regions, 7, generator=g),
        "image_mask": torch.ones(n, regions),
    }


def tiny_uc2():
    torch.manual_seed(0)
    config = {**U.resolve_config(UC2_TINY), "hidden_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.0}
    return U.build_model("xflickrco", config).eval()


def test_separate_text_embedding_never_sees_the_image_and_joint_does():
    model, pairs = tiny_uc2(), synthetic_pairs()
    other = {**pairs, "features": pairs["features"] + 1.0}
    img_s, txt_s = X.pair_embeddings(model, pairs, "separate")
    img_s2, txt_s2 = X.pair_embeddings(model, other, "separate")
    assert torch.equal(txt_s, txt_s2) and not torch.allclose(img_s, img_s2)
    _, txt_j = X.pair_embeddings(model, pairs, "joint")
    _, txt_j2 = X.pair_embeddings(model, other, "joint")
    assert not torch.allclose(txt_j, txt_j2)


def test_contrastive_loss_of_a_grouped_retrieval_batch_uses_its_positive_pairs():
    """xFlickrCo training batches are [B, 4, ...] (positive first, then 3 negatives): the contrastive loss
    must pair each caption with its own image, slot 0, and ignore the negatives."""
    net = X.XVLModel(tiny_uc2(), M.ContrastiveHead(32, 8), "separate")
    pos = synthetic_pairs(seed=1)
    neg = synthetic_pairs(n=12, seed=2)
    grouped = {k: torch.cat([pos[k][:, None], neg[k].view(4, 3, *neg[k].shape[1:])], 1) for k in pos}
    assert torch.equal(net(({"aux": grouped}), ("cl",)), net({"aux": pos}, ("cl",)))


def marvl_batch(n=3, tokens=5, regions=3, seed=3) -> dict:
    """A batch in the contract's marvl layout (VOLTA's process: nlvr): the caption twice [B,2,L], the left and
    right images [B,2,R,...], target [B,2] one-hot, label [B]."""
    left, right = synthetic_pairs(n, tokens, regions, seed), synthetic_pairs(n, tokens, regions, seed + 1)
    label = torch.arange(n) % 2
    return {
        **{k: torch.stack([left[k], left[k]], 1) for k in ("input_ids", "attention_mask")},
        **{k: torch.stack([left[k], right[k]], 1) for k in ("features", "spatials", "image_mask")},
        "target": torch.nn.functional.one_hot(label, 2).float(),
        "label": label,
    }


@pytest.mark.parametrize("mode", X.CL_EMBEDS)
def test_marvl_batch_contrasts_its_caption_with_the_mean_of_its_two_images(mode):
    """A marvl pair's image embedding is the mean of its left and right images' embeddings (each pooled as one
    image is), its text embedding the caption's (joint: the mean of the caption's two passes)."""
    model, batch = tiny_uc2(), marvl_batch()
    pairs = X.positive_pairs(batch, "marvl")
    assert pairs["input_ids"].shape == (3, 5) and pairs["features"].shape == (3, 2, 3, 2048)
    img, txt = X.pair_embeddings(model, pairs, mode)
    one = {k: pairs[k] for k in ("input_ids", "attention_mask")}
    per_image = [
        X.pair_embeddings(model, {**one, **{k: pairs[k][:, i] for k in ("features", "spatials", "image_mask")}}, mode)
        for i in (0, 1)
    ]
    assert img.shape == txt.shape == (3, 32)
    torch.testing.assert_close(img, (per_image[0][0] + per_image[1][0]) / 2)
    torch.testing.assert_close(txt, (per_image[0][1] + per_image[1][1]) / 2)
    if mode == "separate":
        torch.testing.assert_close(txt, per_image[0][1])  # the caption alone: the same whatever the images


def test_pairs_sharing_a_statement_are_not_each_others_negatives():
    """NLVR2 / MaRVL judge one statement on several image pairs: text_groups masks pairs with the same text, as
    groups masks pairs with the same image; either mask alone, and both, leave nothing to contrast here."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[2.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    same = torch.tensor([4, 4])
    assert M.contrastive_loss(image, text, 1.0, text_groups=same).item() == pytest.approx(0.0, abs=1e-12)
    assert M.contrastive_loss(image, text, 1.0, torch.tensor([0, 1]), True, same).item() == pytest.approx(0.0)
    three = torch.eye(3, dtype=torch.float64)
    apart = M.contrastive_loss(three, three, 1.0, text_groups=torch.tensor([0, 1, 2]))
    assert apart.item() == pytest.approx(M.contrastive_loss(three, three, 1.0).item(), rel=1e-12)
    masked = M.contrastive_loss(three, three, 1.0, text_groups=torch.tensor([0, 0, 2]))
    assert masked.item() < apart.item()  # rows 0 and 1 lose their negative 1 / 0


def test_inner_params_top_adapts_the_top_layers_and_heads_but_not_the_embeddings():
    net = X.XVLModel(tiny_uc2(), M.ContrastiveHead(32, 8), "separate")
    layout = X.xvl_layout(U.layer_layout("xflickrco", U.resolve_config(UC2_TINY)))
    names = [n for n, _ in net.named_parameters()]
    emb = lambda n: layout.layer_of(n) is None and layout.module_of(n) in layout.embedding_modules  # noqa: E731
    top = M.adapt_names_for(names, layout.layer_of, layout.num_layers, "top", 2, emb)
    expected = [
        n
        for n in names
        if n.startswith(
            ("model.encoder.layer.10.", "model.encoder.layer.11.", "model.pooler.", "model.head.", "cl_head.")
        )
    ]
    assert top == expected and not any(n.startswith("model.embeddings.") for n in top)
    assert M.adapt_names_for(names, layout.layer_of, layout.num_layers, "all", 2, emb) == names


@pytest.mark.parametrize("first_order", [True, False])
def test_meta_step_on_the_marvl_pair_model_is_the_gradient_through_the_adapted_parameters(first_order):
    """One XVL-MAML meta-step (variant full: inner contrastive loss on the auxiliary pairs, outer English task loss +
    contrastive on the query) on train_uc2.build_model("marvl") with batches in the contract's marvl layout, against
    plain autograd: theta' = theta - alpha * grad of the inner loss (one SGD step by hand; second order: kept in the
    graph, create_graph), p.grad = d outer(theta') / d theta. The pair head (head.*, fed both pooled images) and the
    pooler get their outer gradient only: the contrastive loss never reads them, so theta' = theta there."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    config = {**U.resolve_config(UC2_TINY), "hidden_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.0}
    net = X.XVLModel(U.build_model("marvl", config), M.ContrastiveHead(32, 8), "separate").eval()
    support = {"aux": marvl_batch(n=4, seed=11)}
    query = {"aux": marvl_batch(n=4, seed=13), "en": marvl_batch(n=4, seed=17)}
    cfg = M.MamlConfig(variant="full", inner_lr=0.5, first_order=first_order)
    params = dict(net.named_parameters())
    names = list(params)
    losses, bad = X.meta_step(net, cfg, iter([(support, query)]), 1, names, devices.DistInfo(), torch.device("cpu"))
    got = {n: p.grad for n, p in params.items()}
    assert bad == 0 and all(g is not None for g in got.values())
    assert got["model.head.0.weight"].shape[1] == 2 * config["pooler_size"]  # VOLTA's pair classifier
    cl_reads = [n for n in names if net.used_by(n, ("cl",))]
    assert cl_reads and not any(n.startswith(("model.head.", "model.pooler.")) for n in cl_reads)
    outer = M.module_objective(net, terms=cfg.outer)
    with sdpa_kernel(SDPBackend.MATH):  # double backward through attention (second order)
        step = torch.autograd.grad(net(support, ("cl",)), [params[n] for n in cl_reads], create_graph=not first_order)
        fast = dict(params) | {n: params[n] - cfg.inner_lr * g for n, g in zip(cl_reads, step)}
        meta_loss = outer(fast, query)
        want = dict(zip(names, torch.autograd.grad(meta_loss, [params[n] for n in names])))
    assert losses[0] == pytest.approx(meta_loss.item(), rel=1e-5)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    if not first_order:  # the second-order term is there: not the gradient at theta' alone
        q = "model.encoder.layer.0.attention.self.query.weight"
        fo = {n: t.detach().requires_grad_() for n, t in fast.items()}
        fo_grad = torch.autograd.grad(outer(fo, query), fo[q])[0]
        assert not torch.allclose(got[q], fo_grad, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- on UC2 and the IGLUE fixtures

SAMPLE_SPLITS = {
    "xvnli": (("train_48", "en"), ("train_48", "fr"), ("test", "en"), ("test", "fr"), ("test", "ar")),
    "xgqa": (("testdev", "en"), ("dev", "de")),
    "xflickrco": (("valid", "en"), ("train_10", "de"), ("test", "en"), ("test", "de")),
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Tokenizer, synthetic features and a random tiny UC2 (init.pt: xvnli, init-<task>.pt) for the IGLUE
    sample; root/: a copy of it in which German xFlickrCo has a few-shot split (its test captions as
    train_10.jsonl: the sample ships no xFlickrCo few-shot file)."""
    out = tmp_path_factory.mktemp("xvlmaml")
    shutil.copytree(IGLUE / "datasets", out / "root" / "datasets")
    fl = out / "root" / "datasets" / "xFlickrCO" / "annotations" / "de"
    shutil.copy(fl / "test.jsonl", fl / "train_10.jsonl")
    texts, ids = [], set()
    for task, splits in SAMPLE_SPLITS.items():
        for split, lang in splits:
            exs = data.load_split(out / "root", task, split, lang)
            texts += [e.text for e in exs]
            ids |= {e.image for e in exs}
    fixtures.make_tiny_tokenizer(texts, out / "tok", vocab_size=500)
    fixtures.write_synthetic_features(out / "feats", ids, num_boxes=REGIONS)
    for task in SAMPLE_SPLITS:
        torch.manual_seed(0)
        run_folder.save_checkpoint(
            out / f"init-{task}.pt", {"model": U.build_model(task, U.resolve_config(UC2_TINY)).state_dict()}
        )
    shutil.copy(out / "init-xvnli.pt", out / "init.pt")
    return out


def train_argv(sample, out, *extra):
    return [
        "train",
        "--checkpoint",
        str(sample / "init.pt"),
        "--task",
        "xvnli",
        "--model-config",
        UC2_TINY,
        "--aux-lang",
        "fr",
        "--en-split",
        "train_48",
        "--data-root",
        str(IGLUE),
        "--features",
        str(sample / "feats"),
        "--tokenizer",
        str(sample / "tok"),
        "--max-regions",
        str(REGIONS),
        "--support-size",
        "3",
        "--query-size",
        "3",
        "--en-batch-size",
        "3",
        "--iters-per-epoch",
        "2",
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--inner-lr",
        "1e-2",
        "--output-dir",
        str(out),
        "--no-eval",
        *extra,
    ]


def final_state(run):
    ck = torch_files.load_checkpoint(Path(run) / run_folder.FINAL)
    return {
        **{f"model.{k}": v for k, v in ck["model"].items()},
        **{f"cl_head.{k}": v for k, v in ck["cl_head"].items()},
    }


def test_frozen_parameters_stay_bitwise_unchanged_and_trainable_ones_move(sample, tmp_path):
    X.main(train_argv(sample, tmp_path / "r", "--policy", "top", "--top-layers", "2"))
    init = torch_files.load_checkpoint(sample / "init.pt")["model"]
    final = torch_files.load_checkpoint(tmp_path / "r" / run_folder.FINAL)["model"]
    top = ("encoder.layer.10.", "encoder.layer.11.", "pooler.", "head.")  # UC2 layout: pooler is "head"
    frozen = [k for k in init if not k.startswith(top)]
    assert frozen and all(torch.equal(init[k], final[k]) for k in frozen)
    assert any(not torch.equal(init[k], final[k]) for k in init if k.startswith(top))


def test_unsupervised_variant_leaves_the_task_head_bitwise_unchanged(sample, tmp_path):
    """No loss of variant unsupervised reads the pooler and task head: they get no gradient, so AdamW's
    weight decay must not touch them either."""
    X.main(train_argv(sample, tmp_path / "r", "--variant", "unsupervised"))
    init = torch_files.load_checkpoint(sample / "init.pt")["model"]
    final = torch_files.load_checkpoint(tmp_path / "r" / run_folder.FINAL)["model"]
    head = [k for k in init if k.startswith(("pooler.", "head."))]
    assert head and all(torch.equal(init[k], final[k]) for k in head)
    assert not torch.equal(init["encoder.layer.11.output.dense.weight"], final["encoder.layer.11.output.dense.weight"])


def test_resume_after_a_crash_is_bitwise_exact(sample, tmp_path, monkeypatch):
    X.main(train_argv(sample, tmp_path / "whole"))
    undo_fault = _faults.install("raise:epoch_end:1", _faults.XVLMAML, monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError, match="injected failure"):
        X.main(train_argv(sample, tmp_path / "cut"))
    undo_fault()
    assert not (tmp_path / "cut" / run_folder.FINAL).exists()
    X.main(train_argv(sample, tmp_path / "cut", "--resume"))
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / run_folder.METRICS).read_text() == (tmp_path / "cut" / run_folder.METRICS).read_text()


def test_resume_with_other_maml_settings_is_refused(sample, tmp_path, monkeypatch):
    undo_fault = _faults.install("raise:epoch_end:1", _faults.XVLMAML, monkeypatch=monkeypatch)
    with pytest.raises(RuntimeError):
        X.main(train_argv(sample, tmp_path / "r"))
    undo_fault()
    with pytest.raises(SystemExit, match="--inner-lr"):
        X.main(train_argv(sample, tmp_path / "r", "--resume", "--inner-lr", "0.5"))


@pytest.mark.system
def test_two_gloo_processes_equal_one_process_in_first_and_second_order(sample, tmp_path):
    """Each process runs its share of the episodes whole and the meta-gradients are summed over
    processes: with episodes (and their dropout) seeded by (seed, iteration, episode), 2 processes
    give the weights of 1, in second order too (no collective sits inside the differentiated graph)."""
    orders = {"second": [], "first": ["--first-order"]}
    argvs = {
        o: lambda name, o=o: train_argv(
            sample, tmp_path / f"{name}-{o}", "--meta-batch", "2", "--epochs", "1", *orders[o]
        )
        for o in orders
    }
    for o in orders:
        X.main(argvs[o]("one"))
    runs = [a for o in orders for a in ["::", *argvs[o]("two")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUF_DEVICE": "cpu"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "_xvlmaml_runs.py"),
            *runs,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for o in orders:
        a, b = final_state(tmp_path / f"one-{o}"), final_state(tmp_path / f"two-{o}")
        assert a.keys() == b.keys()
        # bitwise: one process sums (0 + g_0/2) + g_1/2, two processes all-reduce g_0/2 + g_1/2
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert not all(
        torch.equal(final_state(tmp_path / "one-first")[k], v) for k, v in final_state(tmp_path / "one-second").items()
    )


def test_bad_record_of_the_auxiliary_split_stops_the_run_before_training(sample, tmp_path):
    """Every feature record of the auxiliary split is decoded before meta-training (as the trainers' evaluation
    records): a bad one is the start-up check's one line, not an error mid-training."""
    import pickle

    import lmdb

    feats = tmp_path / "feats"
    shutil.copytree(sample / "feats", feats)
    aux = data.load_split(IGLUE, "xvnli", "train_48", "fr")
    key = sorted({e.image for e in aux})[-1]
    env = lmdb.open(str(feats), map_size=1 << 28)
    with env.begin(write=True) as txn:
        rec = pickle.loads(txn.get(key.encode()))
        txn.put(key.encode(), pickle.dumps({**rec, "features": rec["features"][:2].reshape(-1, 1024)}))
    env.close()
    with pytest.raises(SystemExit) as e:
        X.main(train_argv(sample, tmp_path / "r", "--features", str(feats)))
    msg = str(e.value)
    assert msg.startswith(f"error: training data: {feats}: feature record {key!r}: features is a float32 array"), msg
    assert re.search(
        r"\(referenced by XVNLI/annotations/fr/train_48\.jsonl:\d+, example .*\); 1 of \d+ feature records "
        r"checked are bad \(python -m checks\.inventory --verify lists them all\)$",
        msg,
    ), msg
    assert not (tmp_path / "r" / run_folder.METRICS).exists()


def test_test_split_and_english_auxiliary_are_refused(sample, tmp_path):
    with pytest.raises(SystemExit, match="test data is never meta-trained on"):
        X.main(train_argv(sample, tmp_path / "a", "--aux-split", "test"))
    with pytest.raises(SystemExit, match="auxiliary language must differ"):
        X.main(train_argv(sample, tmp_path / "b", "--aux-lang", "en"))
    assert not (tmp_path / "a" / run_folder.METRICS).exists()


def test_matrix_from_an_english_run_folder_trains_evaluates_and_tabulates(sample, tmp_path):
    """The tiny end-to-end run: an English run of train_uc2.py, XVL-MAML with auxiliary French continuing
    it (task, config and data from its folder), the existing zero-shot evaluation in every language,
    the auxiliary x target matrix."""
    en = tmp_path / "en"
    U.main(
        [
            "--task",
            "xvnli",
            "--model-config",
            UC2_TINY,
            "--checkpoint",
            str(sample / "init.pt"),
            "--data-root",
            str(IGLUE),
            "--features",
            str(sample / "feats"),
            "--tokenizer",
            str(sample / "tok"),
            "--train-split",
            "train_48",
            "--max-regions",
            str(REGIONS),
            "--num-workers",
            "0",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--max-steps-per-epoch",
            "1",
            "--no-eval",
            "--output-dir",
            str(en),
        ]
    )
    out = tmp_path / "mx"
    X.main(
        [
            "matrix",
            "--run",
            str(en),
            "--aux-langs",
            "fr",
            "--en-split",
            "train_48",
            "--support-size",
            "3",
            "--query-size",
            "3",
            "--en-batch-size",
            "3",
            "--iters-per-epoch",
            "1",
            "--eval-langs",
            "en",
            "fr",
            "ar",
            "--epoch-eval-split",
            "test",  # the fixture has no dev split
            "--output-dir",
            str(out),
        ]
    )
    run = out / "aux-fr"
    model, meta = Z.load_model(run / run_folder.FINAL)
    assert meta["task"] == "xvnli"
    assert meta["xvlmaml"]["aux_lang"] == "fr" and meta["xvlmaml"]["aux_split"] == "train_48"
    assert meta["xvlmaml"]["init"] == str(en / run_folder.FINAL)
    res = json.loads((run / "results.json").read_text())["test"]
    assert set(res["langs"]) == {"en", "fr", "ar"} and res["langs"]["fr"]["n"] == 90
    table = json.loads((out / "matrix.json").read_text())
    assert table["targets"] == ["en", "ar", "fr"]
    assert table["rows"]["fr"]["ar"] == pytest.approx(res["langs"]["ar"]["accuracy"])
    assert "| fr |" in (out / "matrix.md").read_text()
    lines = [json.loads(line) for line in (run / run_folder.METRICS).read_text().splitlines()]
    assert [r for r in lines if r["type"] == "train"] and all(
        math.isfinite(r["meta_loss"]) for r in lines if r["type"] == "train"
    )
    assert {r["lang"] for r in lines if r["type"] == "eval"} == {"en", "fr", "ar"}  # the per-epoch curves
    # its own setup in the paper's tables, never averaged into plainly fine-tuned UC2 rows
    assert res["policy"] == "xvlmaml-fr"
    assert [row["setup"] for row in report.tables.build_tables([run])["table1"]] == ["UC2+xvlmaml-fr"]


@pytest.mark.parametrize("task,en_split,variant", [("xflickrco", "valid", "supervised"), ("xgqa", "testdev", "full")])
def test_other_tasks_meta_train_from_their_auxiliary_split(sample, tmp_path, task, en_split, variant):
    """xFlickrCo: grouped [B,4] retrieval batches (the contrastive loss on the positives, the supervised
    variant's retrieval loss on all four); xGQA: the auxiliary pool defaults to the language's dev split
    and many questions share an image (masked out of each other's negatives)."""
    out = tmp_path / task
    X.main(
        [
            "train",
            "--checkpoint",
            str(sample / f"init-{task}.pt"),
            "--task",
            task,
            "--model-config",
            UC2_TINY,
            "--aux-lang",
            "de",
            "--en-split",
            en_split,
            "--variant",
            variant,
            "--data-root",
            str(sample / "root"),
            "--features",
            str(sample / "feats"),
            "--tokenizer",
            str(sample / "tok"),
            "--max-regions",
            str(REGIONS),
            "--support-size",
            "4",
            "--query-size",
            "4",
            "--en-batch-size",
            "4",
            "--iters-per-epoch",
            "2",
            "--output-dir",
            str(out),
            "--no-eval",
        ]
    )
    meta = torch_files.load_checkpoint(out / run_folder.FINAL)["meta"]
    assert meta["xvlmaml"]["aux_split"] == {"xflickrco": "train_10", "xgqa": "dev"}[task]
    assert meta["xvlmaml"]["outer_terms"] == (["task_aux", "cl"] if variant == "supervised" else ["task_en", "cl"])
    losses = [json.loads(line)["meta_loss"] for line in (out / run_folder.METRICS).read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.system
def test_make_targets_print_the_xvlmaml_command():
    out = run_make("-n", "xvlmaml-xgqa", "AUX=de")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.strip().splitlines()[-1]
    assert "-m comparisons.xvlmaml.xvlmaml train --run runs/uc2-xgqa-full --aux-lang de" in cmd
    assert cmd.endswith("--output-dir runs/uc2-xgqa-full-xvlmaml-de")


@pytest.mark.parametrize("case", ["nan_lr", "cl_temperature_0", "epochs_0", "negative_inner_lr", "nan_cl_weight"])
def test_every_numeric_flag_is_range_checked_naming_it(sample, tmp_path, case):
    """engine.check_arg_ranges with XVL-MAML's rules, right after parsing (--lr nan and --cl-temperature 0 were
    tracebacks)."""
    flag, value, rule = {
        "nan_lr": ("--lr", "nan", ">= 0"),
        "cl_temperature_0": ("--cl-temperature", "0", "> 0"),
        "epochs_0": ("--epochs", "0", ">= 1"),
        "negative_inner_lr": ("--inner-lr", "-1", ">= 0"),
        "nan_cl_weight": ("--cl-weight", "nan", ">= 0"),
    }[case]
    with pytest.raises(SystemExit) as e:
        X.main(train_argv(sample, tmp_path / "r", flag, value))
    assert str(e.value) == f"error: {flag} {value} is out of range: must be {rule}"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["evaluation", "no_finite_step"])
def test_non_finite_run_writes_no_result(sample, tmp_path, monkeypatch, capsys, case):
    """The trainers' guard: NaN logits at the per-epoch evaluation (a traceback before), or a run none of whose
    meta-steps was finite (model_final.pt and results.json of the initial weights before), end as one line, exit
    status 1, with no model_final.pt and no results.json."""
    when = "evaluating" if case == "evaluation" else "training"
    monkeypatch.setattr(U.UC2, "_run", _guard.nan_output(U.UC2._run, when))
    run = tmp_path / "r"
    argv = [a for a in train_argv(sample, run) if a != "--no-eval"] + ["--eval-langs", "en"]
    argv += ["--epoch-eval-split", "test"]  # the fixture has no dev split
    code, line = _guard.exit_line(X.main, argv, capsys)
    assert code == 1, line
    if case == "evaluation":
        assert line.startswith("error: evaluation after epoch 1: non-finite logits (NaN or inf) for "), line
        assert line.endswith("; last good checkpoint: none (no epoch completed)"), line
    else:
        assert line == (
            "error: the run made no finite optimizer step (4 steps: 4 non-finite, 0 skipped by the fp16 scaler); "
            "model_final.pt not written (its weights would be the initial ones); check the data, --lr and --amp"
        )
    assert _guard.results_written(run) == []


def _root_with_dev(tmp_path: Path) -> Path:
    """The IGLUE fixture plus a dev split for en and fr (the first 6 lines of each test file)."""
    root = tmp_path / "iglue"
    shutil.copytree(IGLUE, root)
    for lang in ("en", "fr"):
        folder = root / "datasets" / "XVNLI" / "annotations" / lang
        (folder / "dev.jsonl").write_text("".join((folder / "test.jsonl").read_text().splitlines(True)[:6]))
    return root


def test_every_epoch_is_evaluated_on_dev_and_test_once_at_the_end(sample, tmp_path):
    run = tmp_path / "r"
    argv = [a for a in train_argv(sample, run, "--data-root", str(_root_with_dev(tmp_path))) if a != "--no-eval"]
    X.main(argv + ["--eval-langs", "en", "fr"])
    lines = [json.loads(line) for line in (run / run_folder.METRICS).read_text().splitlines()]
    evals = [r for r in lines if r["type"] == "eval"]
    assert {(r["epoch"], r["lang"], r["split"], r["n"]) for r in evals} == {
        (e, lang, "dev", 6) for e in (1, 2) for lang in ("en", "fr")
    }
    res = json.loads((run / "results.json").read_text())
    assert set(res) >= {"test"} and res["test"]["langs"]["fr"]["n"] == 90


def test_per_epoch_dev_evaluation_without_dev_files_is_refused_before_meta_training(sample, tmp_path, capsys):
    run = tmp_path / "r"
    argv = [a for a in train_argv(sample, run) if a != "--no-eval"] + ["--eval-langs", "en"]
    code, line = _guard.exit_line(X.main, argv, capsys)
    assert code == 1 and line.startswith("error: evaluation data: xvnli: no 'dev' files under "), line
    assert line.endswith(
        "(the per-epoch evaluation reads --epoch-eval-split dev; --epoch-eval-split none turns it off)"
    )
    assert not (run / run_folder.FINAL).exists()


def test_a_cclm_run_is_refused_saying_what_is_not_wired(sample, tmp_path, capsys):
    run = tmp_path / "cclm-run"
    run.mkdir()
    run_folder.save_checkpoint(run / run_folder.FINAL, {"model": {}, "meta": {"model": "cclm", "task": "xvnli"}})
    argv = ["train", "--run", str(run), "--aux-lang", "fr", "--output-dir", str(tmp_path / "out")]
    code, line = _guard.exit_line(X.main, argv, capsys)
    assert code == 1 and line == f"error: --run {run}: a cclm run; {X.CCLM_NOT_WIRED}", line
    assert "CCLM's structure would allow it" in line and not (tmp_path / "out").exists()
