"""What evaluation costs after issue 27's changes, each against what it replaced, with its scores checked.

langs  xFlickrCo per-epoch languages (Makefile XFLICKRCO_EPOCH_LANGS=en): test-set evaluations per run, English
       after each epoch and every language after the last, against every language after every epoch (the
       paper recipe's epochs, train_uc2/train_cclm DEFAULTS; each language's test set costs the same).
uc2    UC2 all-pairs retrieval at BASE size (train_uc2.CONFIGS["base"], 37 regions): FLOPs counted with torch's
       FlopCounterMode on the meta device per forward shape and summed over the protocol's batches, for
       1,000 images x 1,000 captions, pair_batch 1024, caption lengths drawn uniformly from 10..40 tokens
       (stated assumptions: no XLM-R tokenizer here). Before: every pair embedded, captions in file order;
       now: each caption and image embedded once, captions in length order. Scores: the new
       score_all_pairs against the previous implementation (kept below) on the tiny model, within the
       parity tolerance (tests/parity.py).
cclm   CCLM xGQA answer ranking at BASE size (train_cclm.CONFIGS["base"] answer decoder, 250,002-word output
       layer): summed NLL of k candidate answers for one question, X2-VLM's padded computation
       (CCLMForXGQA.answer_nll: the LM head at every position) against scoring.answer_ranking.answer_nll (the
       head where a target is scored). Candidate lengths: "<s> answer </s>" with one token per word of the
       1,842 GQA answers (tests/fixtures' trainval_ans2label.json; stated assumption), padded to the list's
       longest; FLOPs counted, both timed, the scores compared BITWISE (exit 1 if they differ).
tf32   --eval-tf32: on a CUDA GPU of compute capability >= 8 the time and the largest score change of a
       base-width float32 matmul chain with TF32 on and off; without one, recorded as not measured.

  python -m bench.eval_cost [--quick] [--out bench/results/eval_cost.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import train_cclm
import train_uc2
from bench import _common
from formats import iglue
from scoring import answer_ranking, retrieval_protocols
from training import after_epoch

REGIONS = 37


# ---------------------------------------------------------------- per-epoch languages


def langs_row() -> dict:
    n_langs = 1 + len(iglue.TARGET_LANGS["xflickrco"])
    out = {}
    for model, defaults in (("uc2", train_uc2.DEFAULTS), ("cclm", train_cclm.DEFAULTS)):
        epochs = defaults[("paper", "xflickrco")]["epochs"]
        before, now = epochs * n_langs, (epochs - 1) + n_langs
        out[model] = {"epochs": epochs, "languages": n_langs, "evaluations_before": before, "evaluations_now": now}
        out[model]["ratio"] = before / now
    return out


# ---------------------------------------------------------------- UC2 all pairs


@torch.no_grad()
def previous_score_all_pairs(model, images: dict, texts: dict, pair_batch: int = 1024) -> torch.Tensor:
    """score_all_pairs as it was before issue 27 (every pair through model.pair_scores, captions in order)."""
    n_img, n_txt = images["features"].shape[0], texts["input_ids"].shape[0]
    total = n_img * n_txt
    out = torch.empty(total)
    for start in range(0, total, pair_batch):
        pair = torch.arange(start, min(start + pair_batch, total))
        t, i = pair // n_img, pair % n_img
        length = int(texts["attention_mask"][t].sum(1).max())
        batch = {"input_ids": texts["input_ids"][t, :length], "attention_mask": texts["attention_mask"][t, :length]}
        batch.update({k: images[k][i] for k in ("features", "spatials", "image_mask")})
        out[start : start + len(pair)] = model.pair_scores(batch).float().reshape(-1)
    return out.view(n_txt, n_img)


def uc2_flops(n: int, pair_batch: int, seed: int = 0) -> dict:
    cfg = dict(train_uc2.CONFIGS["base"])
    with torch.device("meta"):
        model = train_uc2.build_model("xflickrco", cfg).eval()
    h = cfg["hidden_size"]

    def pair_input(p: int, length: int) -> dict:
        return {
            "input_ids": torch.full((p, length), 5, dtype=torch.long, device="meta"),
            "attention_mask": torch.ones(p, length, dtype=torch.long, device="meta"),
            "features": torch.empty(p, REGIONS, cfg["v_feature_size"], device="meta"),
            "spatials": torch.empty(p, REGIONS, cfg["num_locs"], device="meta"),
            "image_mask": torch.ones(p, REGIONS, dtype=torch.long, device="meta"),
        }

    def embedded(p: int, length: int):
        t, m = torch.empty(p, length, h, device="meta"), torch.ones(p, length, dtype=torch.long, device="meta")
        v, vm = torch.empty(p, REGIONS, h, device="meta"), torch.ones(p, REGIONS, dtype=torch.long, device="meta")
        return lambda: model.head(model.dropout(model.encode_embedded(t, m, v, vm)))

    lengths = torch.randint(10, 41, (n,), generator=torch.Generator().manual_seed(seed))
    per_pair_old = {L: _common.flops(lambda L=L: model.pair_scores(pair_input(1, L))) for L in range(10, 41)}
    per_pair_new = {L: _common.flops(embedded(1, L)) for L in range(10, 41)}
    b = pair_input(1, 40)
    embed_img = (
        _common.flops(lambda: model.embeddings(b["input_ids"], b["features"], b["spatials"])) * n
    )  # text: lookups

    def schedule(order: torch.Tensor, per_pair: dict) -> int:
        total = 0
        for start in range(0, n * n, pair_batch):
            t = order[torch.arange(start, min(start + pair_batch, n * n)) // n]
            total += len(t) * per_pair[int(lengths[t].max())]
        return total

    before = schedule(torch.arange(n), per_pair_old)
    now = schedule(torch.argsort(lengths, stable=True), per_pair_new) + embed_img
    return {"images": n, "captions": n, "pair_batch": pair_batch, "flops_before": before, "flops_now": now}


def uc2_scores(n: int, pair_batch: int) -> dict:
    import bench.retrieval as br

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = train_uc2.build_model("xflickrco", train_uc2.resolve_config(_common.UC2_TINY)).eval()
    images, texts = br.uc2_inputs(n, REGIONS, model.config["vocab_size"], gen)
    (old, t_old) = _common.timed(lambda: previous_score_all_pairs(model, images, texts, pair_batch))
    (new, t_new) = _common.timed(lambda: retrieval_protocols.score_all_pairs(model, images, texts, pair_batch))
    err = ((new - old).abs() / (1e-5 + 2e-6 * old.abs())).max().item()  # tests/parity.py's tolerance
    return {"seconds_before": t_old, "seconds_now": t_new, "max_abs_diff": (new - old).abs().max().item(), "tol": err}


# ---------------------------------------------------------------- CCLM xGQA answer ranking


def answer_lengths(k: int, seed: int) -> tuple[torch.Tensor, int]:
    path = _common.TINY_CONFIGS.parent / "iglue" / "datasets" / "gqa" / "annotations" / "trainval_ans2label.json"
    words = torch.tensor([len(a.split()) for a in json.loads(path.read_text())])
    lengths = words + 2  # <s> answer </s>, one token per word (assumption)
    pick = torch.randint(0, len(lengths), (k,), generator=torch.Generator().manual_seed(seed))
    return lengths[pick], int(lengths.max())


@torch.no_grad()
def cclm_ranking(k: int, seed: int = 0) -> dict:
    cfg = dict(train_cclm.CONFIGS["base"])
    torch.manual_seed(seed)
    decoder = train_cclm.AnswerDecoder(cfg).eval()
    pad = cfg["pad_token_id"]
    lengths, width = answer_lengths(k, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((k, width), pad, dtype=torch.long)
    atts = torch.zeros(k, width, dtype=torch.long)
    for j, L in enumerate(lengths.tolist()):
        ids[j, :L] = torch.randint(5, cfg["vocab_size"], (L,), generator=gen)
        ids[j, 0], ids[j, L - 1] = 0, 2
        atts[j, :L] = 1
    states = torch.randn(1, 24, cfg["hidden_size"], generator=gen)  # one question of 24 tokens
    state_atts = torch.ones(1, 24, dtype=torch.long)
    holder = train_cclm.CCLMForXGQA.__new__(train_cclm.CCLMForXGQA)  # answer_nll reads text_decoder and config
    torch.nn.Module.__init__(holder)
    holder.text_decoder, holder.config = decoder, cfg

    def before():
        return holder.answer_nll(ids, atts, states.repeat_interleave(k, 0), state_atts.repeat_interleave(k, 0)).view(
            1, k
        )

    def now():
        return answer_ranking.answer_nll(decoder, ids, atts, states, state_atts, pad)

    f_before, f_now = _common.flops(before), _common.flops(now)
    before(), now()  # warm-up
    (a, t_before), (b, t_now) = _common.timed(before), _common.timed(now)
    return {
        "candidates": k,
        "padded_length": width,
        "mean_length": lengths.float().mean().item(),
        "flops_before": f_before,
        "flops_now": f_now,
        "seconds_before": t_before,
        "seconds_now": t_now,
        "bitwise_equal": bool(torch.equal(a, b)),
    }


# ---------------------------------------------------------------- TF32


def tf32_row() -> dict:
    if not (torch.cuda.is_available() and after_epoch.tf32_available("cuda")):
        return {"measured": False, "why": "no CUDA GPU of compute capability >= 8 on this machine"}
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(4096, 768, device=dev, generator=gen)
    ws = [torch.randn(768, 768, device=dev, generator=gen) / 768**0.5 for _ in range(12)]

    def chain():
        y = x
        for w in ws:
            y = torch.tanh(y @ w)
        torch.cuda.synchronize()
        return y

    out = {"measured": True, "device": torch.cuda.get_device_name(dev)}
    for on in (False, True):
        with after_epoch.tf32_matmuls(dev, on):
            chain()
            t0 = time.perf_counter()
            for _ in range(20):
                y = chain()
            out["seconds_tf32" if on else "seconds_fp32"] = (time.perf_counter() - t0) / 20
            out["y_tf32" if on else "y_fp32"] = y
    out["max_abs_diff"] = (out.pop("y_tf32") - out.pop("y_fp32")).abs().max().item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (seconds)")
    p.add_argument("--out", default=str(_common.RESULTS / "eval_cost.json"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_flops, n_scores, k = (200, 12, 16) if args.quick else (1000, 24, 64)
    langs = langs_row()
    uc2 = {**uc2_flops(n_flops, 1024), **uc2_scores(n_scores, 256)}
    cclm = cclm_ranking(k)
    tf32 = tf32_row()
    out = {**_common.run_info(), "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick}
    out.update(langs=langs, uc2=uc2, cclm=cclm, tf32=tf32)
    for model, r in langs.items():
        print(
            f"{model} xFlickrCo, {r['epochs']} epochs, {r['languages']} languages: {r['evaluations_before']} test-set "
            f"evaluations before, {r['evaluations_now']} now (x{r['ratio']:.2f} fewer)"
        )
    print(
        f"UC2 all pairs, base, {uc2['images']} x {uc2['captions']}: {uc2['flops_before'] / 1e15:.2f} PFLOP before, "
        f"{uc2['flops_now'] / 1e15:.2f} now (x{uc2['flops_before'] / uc2['flops_now']:.3f}); tiny model scores: "
        f"max |diff| {uc2['max_abs_diff']:.1e} ({uc2['tol']:.2f} of the parity tolerance), "
        f"{uc2['seconds_before']:.2f} s before, {uc2['seconds_now']:.2f} s now"
    )
    print(
        f"CCLM xGQA ranking, base size, {cclm['candidates']} candidates (mean {cclm['mean_length']:.1f} tokens, padded "
        f"to {cclm['padded_length']}): {cclm['flops_before'] / 1e9:.0f} GFLOP before, {cclm['flops_now'] / 1e9:.0f} "
        f"now (x{cclm['flops_before'] / cclm['flops_now']:.2f}); {cclm['seconds_before']:.2f} s vs "
        f"{cclm['seconds_now']:.2f} s; scores bitwise equal: {cclm['bitwise_equal']}"
    )
    print(f"TF32: {tf32}")
    _common.write_result(args.out, out)
    ok = cclm["bitwise_equal"] and uc2["tol"] <= 1.0
    if not ok:
        print("FAILED: scores changed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
