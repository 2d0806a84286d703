"""Evaluation that costs what it must (issue 27): CCLM xGQA ranking without the padded LM-head work (scores
bitwise unchanged), UC2 all-pairs retrieval embedding each caption and image once (scores within the parity
tolerance of the model's own per-pair forward), TF32 switched on only inside evaluation where asked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _configs import CCLM_TINY, UC2_TINY  # noqa: E402
import scoring.evaluate  # noqa: E402
import train_cclm  # noqa: E402
import train_uc2  # noqa: E402
from bench.call_counter import CallCounter  # noqa: E402
from parity import assert_matches_reference  # noqa: E402
from scoring import answer_ranking, retrieval_protocols  # noqa: E402
from training import after_epoch  # noqa: E402


def _answers(cfg: dict, n: int, width: int, gen: torch.Generator):
    """n tokenised candidates "<s> ... </s>" of lengths 3..width, padded to width (one of them full)."""
    lengths = torch.randint(3, width + 1, (n,), generator=gen)
    lengths[0] = width
    ids = torch.full((n, width), cfg["pad_token_id"], dtype=torch.long)
    atts = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        ids[i, :length] = torch.randint(5, cfg["vocab_size"], (length,), generator=gen)
        ids[i, 0], ids[i, length - 1] = 0, 2
        atts[i, :length] = 1
    return ids, atts


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_xgqa_answer_ranking_scores_are_bitwise_those_of_the_padded_decoder(amp):
    """answer_ranking.answer_nll (LM head only where a target is scored) = CCLMForXGQA.answer_nll (X2-VLM's
    padded computation: the head at every position, padded targets ignored), bit for bit, and rank_answers
    ranks as before."""
    torch.manual_seed(0)
    cfg = train_cclm.resolve_config(CCLM_TINY)
    model = train_cclm.build_model("xgqa", cfg).eval()
    gen = torch.Generator().manual_seed(0)
    ids, atts = _answers(cfg, 200, 9, gen)
    n, k = 5, 16
    states = torch.randn(n, 11, cfg["hidden_size"], generator=gen)
    state_atts = torch.ones(n, 11, dtype=torch.long)
    state_atts[1, 6:] = 0
    top = torch.randint(0, len(ids), (n * k,), generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        padded = model.answer_nll(
            ids[top], atts[top], states.repeat_interleave(k, 0), state_atts.repeat_interleave(k, 0)
        ).view(n, k)
        packed = answer_ranking.answer_nll(model.text_decoder, ids[top], atts[top], states, state_atts, 1)
        ranked, probs, d = model.rank_answers(states, state_atts, ids, atts, k, details=True)
        again = model.answer_nll(
            ids[d["topk_ids_before_rerank"].reshape(-1)],
            atts[d["topk_ids_before_rerank"].reshape(-1)],
            states.repeat_interleave(k, 0),
            state_atts.repeat_interleave(k, 0),
        ).view(n, k)
    assert torch.equal(packed, padded)
    assert torch.equal(d["answer_loss_topk"], again)


def test_uc2_all_pairs_embeds_each_caption_and_image_once_and_scores_as_per_pair_forwards():
    """Each caption's and image's embeddings once (not once per pair), every pair through the transformer once,
    captions of different lengths batched in length order: every score equals the model's own forward on that
    pair alone within the parity tolerance, in the right cell."""
    import bench.retrieval as br

    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = train_uc2.build_model("xflickrco", train_uc2.resolve_config(UC2_TINY)).eval()
    images, texts = br.uc2_inputs(7, 5, model.config["vocab_size"], gen)
    images = {k: v[:5] for k, v in images.items()}  # 5 images x 7 captions: not square
    counted = CallCounter(model)
    got = retrieval_protocols.score_all_pairs(model, images, texts, pair_batch=4)
    assert counted.embedded == {"captions": 7, "images": 5}
    assert counted.rows["encode_embedded"] == 35 and counted.calls["encode_embedded"] == 9
    want = torch.empty(7, 5)
    with torch.no_grad():
        for t in range(7):
            length = int(texts["attention_mask"][t].sum())
            for i in range(5):
                pair = {k: v[t : t + 1, :length] for k, v in texts.items()}
                pair.update({k: v[i : i + 1] for k, v in images.items()})
                want[t, i] = model.pair_scores(pair).reshape(())
    assert_matches_reference("all-pairs scores", got, want)


class _RecordsTF32(torch.nn.Module):
    """A classifier whose predict records whether TF32 matmuls were on when it ran."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def predict(self, batch):
        self.seen.append(torch.backends.cuda.matmul.allow_tf32)
        return torch.zeros(len(batch["label"]), dtype=torch.long)


def _tiny_set():
    def collate(items):
        return {"id": [str(i) for i in items], "label": torch.tensor([0] * len(items))}

    return {"en": scoring.evaluate.EvalSet("en", "test", False, collate, dataset=list(range(3)))}


@pytest.fixture
def tf32_off():
    """torch.backends.cuda.matmul.allow_tf32 False during the test, its value restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_on_only_inside_evaluation_where_the_device_has_it_and_it_is_asked(monkeypatch, tf32_off, tf32):
    monkeypatch.setattr(after_epoch, "tf32_available", lambda device: True)  # as on an Ampere GPU
    model = _RecordsTF32()
    scoring.evaluate.evaluate_task(model, "xvnli", _tiny_set(), batch_size=2, tf32=tf32)
    assert model.seen == [tf32, tf32]
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored after the evaluation


def test_no_eval_tf32_is_strict_float32_even_where_tf32_was_switched_on(monkeypatch):
    """--no-eval-tf32 on a TF32 GPU: matmuls and cuDNN convolutions (TF32 by cuDNN's default) in float32 during the
    evaluation, whatever the process had set; the settings come back after."""
    monkeypatch.setattr(after_epoch, "tf32_available", lambda device: True)  # as on an Ampere GPU
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # torch's flags: no monkeypatch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with after_epoch.tf32_matmuls("cuda", enabled=False):
            inside = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert inside == (False, False)
    assert after == (True, True)


def test_tf32_does_nothing_on_cpu_and_the_trainers_can_turn_it_off(tf32_off):
    assert not after_epoch.tf32_available("cpu")
    model = _RecordsTF32()
    scoring.evaluate.evaluate_task(model, "xvnli", _tiny_set(), batch_size=3, tf32=True)
    assert model.seen == [False]
    for build in (train_uc2.build_parser, train_cclm.build_parser):
        assert build().parse_args(["--task", "xgqa"]).eval_tf32 is True
        assert build().parse_args(["--task", "xgqa", "--no-eval-tf32"]).eval_tf32 is False
