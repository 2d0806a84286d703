"""The references' retrieval evaluation protocols, run on a model: VOLTA scores every (caption, image) pair with
UC2's VL logit; X2-VLM encodes each image and caption once, ranks by ITC similarity and re-scores each query's
top k with CCLM's ITM head (every other entry: model.unscored).

Not on the reading path: scoring's evaluation asks the model (model.retrieval_scores, a method of the task model),
and that method is one call here. The model's own forward pieces (pair_scores; encode_images, encode_texts,
itm_image_kv, itm_scores_with_image_kv) do the arithmetic, so the numbers are the model's.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from training import devices
import scoring.evaluate

# ---------------------------------------------------------------- UC2 (VOLTA's eval_retrieval.py)


@torch.no_grad()
def volta_retrieval_scores(
    model, images, captions, batches: Callable, dist, device, opts, encoded: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """VOLTA's protocol on a retrieval test set (data.RetrievalImages / RetrievalCaptions): the VL logit of
    every (caption, image) pair; every rank holds all images and scores its shard of the captions.
    batches(dataset, indices, progress label or None) iterates collated batches; opts: scoring.evaluate.RetrievalOptions
    (pair_batch, amp). Returns (score_i2t [n_img, n_txt], score_t2i [n_txt, n_img]), on every rank."""
    img_batches = list(batches(images, range(len(images)), None))
    feats = {k: torch.cat([b[k] for b in img_batches]) for k in ("features", "spatials", "image_mask")}
    cap_batches = list(batches(captions, devices.shard(len(captions), dist), "captions"))
    texts = {
        "input_ids": scoring.evaluate.pad_cat([b["input_ids"] for b in cap_batches], value=1)
        if cap_batches
        else torch.ones(0, 1, dtype=torch.long),
        "attention_mask": scoring.evaluate.pad_cat([b["attention_mask"] for b in cap_batches])
        if cap_batches
        else torch.zeros(0, 1, dtype=torch.long),
    }
    rows = score_all_pairs(model, feats, texts, opts.pair_batch, device, opts.amp)
    scores = torch.cat(list(devices.gather([rows], dist)))
    return scores.t(), scores


@torch.no_grad()
def score_all_pairs(
    model,
    images: dict[str, torch.Tensor],
    texts: dict[str, torch.Tensor],
    pair_batch: int = 1024,
    device="cpu",
    amp: str = "off",
) -> torch.Tensor:
    """The VL logit of EVERY (caption, image) pair, scored `pair_batch` pairs per forward. images: stacked
    features/spatials/image_mask [n_img, R, ...]; texts: stacked input_ids/attention_mask [n_txt, L].
    Returns [n_txt, n_img] (on CPU, float32).

    UC2 is single-stream (text and regions go through one transformer together), so only its embeddings layer
    is per modality: each caption's text embeddings and each image's region embeddings are computed once here
    (VOLTA recomputes both for every pair) and the pairs stream through model.encode_embedded at full batch,
    captions in length order (stable) so that a batch's captions share their length and little padding is run.
    Padded keys are masked (-10000): the scores equal VOLTA's within the parity tolerance (tests)."""
    images = devices.to_device(images, device)
    texts = devices.to_device(texts, device)
    n_img, n_txt = images["features"].shape[0], texts["input_ids"].shape[0]
    total = n_img * n_txt
    out = torch.empty(total)
    with scoring.evaluate.autocast_for(device, amp):
        text_emb, image_emb = model.embeddings(texts["input_ids"], images["features"], images["spatials"])
    lengths = texts["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)  # captions of similar length share a batch
    for start in scoring.evaluate.progress(
        range(0, total, pair_batch), f"scoring {n_txt} captions x {n_img} images", delay=2
    ):
        pair = torch.arange(start, min(start + pair_batch, total), device=device)
        t, i = order[pair // n_img], pair % n_img
        length = int(lengths[t].max())  # trim padding common to the batch
        with scoring.evaluate.autocast_for(device, amp):
            pooled = model.encode_embedded(
                text_emb[t, :length], texts["attention_mask"][t, :length], image_emb[i], images["image_mask"][i]
            )
            out[(t * n_img + i).cpu()] = model.head(model.dropout(pooled)).float().reshape(-1).cpu()
    return out.view(n_txt, n_img)


# ---------------------------------------------------------------- CCLM (X2-VLM's itm_eval)


@torch.no_grad()
def x2vlm_retrieval_scores(
    model, images, captions, batches: Callable, dist, device, opts, encoded: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """X2-VLM's protocol on a retrieval test set (data.RetrievalImages / RetrievalCaptions): rerank_scores over
    this rank's shard of the images and of the captions. batches(dataset, indices, progress label or None)
    iterates collated batches; opts: scoring.evaluate.RetrievalOptions (k_test, itm_batch, amp). `encoded`: a cache
    kept across the languages of one evaluation (xFlickrCo's languages share their test images: each
    image is encoded once). Returns (score_i2t [n_img, n_txt], score_t2i [n_txt, n_img]), on every rank."""
    n_img, n_txt = len(images), len(captions)
    caption_batches = batches(captions, devices.shard(n_txt, dist), "captions")
    img_shard = devices.shard(n_img, dist)
    key = (tuple(images.items[i].image for i in img_shard), getattr(images, "image_res", None))
    if encoded is not None and key in encoded:
        image_batches = encoded[key]
    else:
        image_batches = _recorded(batches(images, img_shard, "images"), kept := [])
        if encoded is not None:
            encoded.clear()  # one language's images at a time: the memory a single evaluation holds anyway
            encoded[key] = kept
    k = opts.k_test if opts.k_test is not None else int(model.config.get("k_test", 128))
    return rerank_scores(
        model,
        image_batches,
        caption_batches,
        img_shard.start,
        n_img,
        n_txt,
        k=k,
        itm_batch=opts.itm_batch,
        dist=dist,
        device=device,
        amp=opts.amp,
    )


@torch.no_grad()
def rerank_scores(
    model,
    image_batches: Iterable[dict],
    text_batches: Iterable[dict],
    image_offset: int,
    n_images: int,
    n_texts: int,
    k: int = 128,
    itm_batch: int = 128,
    dist=None,
    device="cpu",
    amp: str = "off",
) -> tuple[torch.Tensor, torch.Tensor]:
    """CCLM/X2-VLM protocol: every image and every caption is encoded once (this rank: its shard of
    each); ITC similarity image_feat @ text_feat.T; for every image the top-k captions and for every
    caption the top-k images are re-scored with the ITM head; all other entries are -100.
    Returns score_i2t [n_images, n_texts], score_t2i [n_texts, n_images] (CPU, float32), identical
    on every rank. Only ITC features and text states travel between ranks; a pair is ITM-scored on
    the rank that holds its image's encoder states. k is capped at the candidate count (the
    reference would fail for k > n; the sample has 40 images). Each image's cross-attention keys/values
    are computed once for all its candidates (_itm_by_image; X2-VLM recomputes them per pair)."""
    vis, img_feat = [], []
    for b in image_batches:
        if "encoded" in b:  # encoded for another language's test set of the same images (evaluate_task)
            v, f = b["encoded"]
        else:
            with scoring.evaluate.autocast_for(device, amp):
                v, f = model.encode_images(b["images"].to(device))
            b["encoded"] = (v, f)
        vis.append(v)
        img_feat.append(f.float())
    txt_states, txt_atts, txt_feat = [], [], []
    for b in text_batches:
        ids, atts = b["text_ids"].to(device), b["text_atts"].to(device)
        with scoring.evaluate.autocast_for(device, amp):
            s, f = model.encode_texts(ids, atts)
        txt_states.append(s.cpu())
        txt_atts.append(atts.cpu())
        txt_feat.append(f.float().cpu())
    n_local = sum(v.shape[0] for v in vis)
    vis = torch.cat(vis) if vis else None
    local_feat = torch.cat(img_feat).cpu() if img_feat else torch.empty(0, 0)
    image_feat = torch.cat([t for t in devices.gather([local_feat], dist) if t.numel()]).to(device)
    text_states = scoring.evaluate.pad_cat(
        devices.gather([scoring.evaluate.pad_cat(txt_states)] if txt_states else [], dist)
    ).to(device)
    text_atts = scoring.evaluate.pad_cat(
        devices.gather([scoring.evaluate.pad_cat(txt_atts)] if txt_atts else [], dist)
    ).to(device)
    text_feat = torch.cat(devices.gather([torch.cat(txt_feat)] if txt_feat else [], dist)).to(device)
    if image_feat.shape[0] != n_images or text_feat.shape[0] != n_texts:
        raise ValueError(
            f"encoded {image_feat.shape[0]} images / {text_feat.shape[0]} captions, expected {n_images} / {n_texts}"
        )
    sims = image_feat @ text_feat.t()

    triples = []  # (direction, row, col, score) computed on this rank
    if n_local:
        k_i2t = min(k, n_texts)
        top_t = sims[image_offset : image_offset + n_local].topk(k_i2t, dim=1).indices  # [n_local, k]
        li = torch.arange(n_local, device=device).repeat_interleave(k_i2t)
        t = top_t.reshape(-1)
        k_t2i = min(k, n_images)
        top_i = sims.t().topk(k_t2i, dim=1).indices  # [n_texts, k]
        t_all = torch.arange(n_texts, device=device).repeat_interleave(k_t2i)
        img = top_i.reshape(-1)
        mine = (img >= image_offset) & (img < image_offset + n_local)
        both = _itm_by_image(
            model,
            vis,
            torch.cat([li, img[mine] - image_offset]),
            torch.cat([t, t_all[mine]]),
            text_states,
            text_atts,
            itm_batch,
            device,
            amp,
        )
        s_i2t, s_t2i = both[: len(li)], both[len(li) :]
        triples.append(("i2t", (li + image_offset).cpu(), t.cpu(), s_i2t))
        triples.append(("t2i", t_all[mine].cpu(), img[mine].cpu(), s_t2i))
    score_i2t = torch.full((n_images, n_texts), model.unscored)
    score_t2i = torch.full((n_texts, n_images), model.unscored)
    for direction, rows, cols, vals in devices.gather(triples, dist):
        (score_i2t if direction == "i2t" else score_t2i)[rows, cols] = vals
    return score_i2t, score_t2i


def _itm_by_image(
    model,
    vis: torch.Tensor,
    img: torch.Tensor,
    txt: torch.Tensor,
    text_states: torch.Tensor,
    text_atts: torch.Tensor,
    itm_batch: int,
    device,
    amp: str,
) -> torch.Tensor:
    """ITM scores (CPU, float32) of the pairs (vis[img[j]], text txt[j]), as model.itm_scores gives them, but
    each image's cross-attention keys/values are computed once (model.itm_image_kv) for all its candidate
    captions, and a pair asked for twice (both directions' top-k) is scored once. X2-VLM recomputes the
    keys/values over the image's tokens for every pair: most of the re-rank's work (bench/retrieval.py)."""
    n_txt = text_states.shape[0]
    pairs, where = torch.unique(img * n_txt + txt, return_inverse=True)  # sorted: grouped by image
    p_img, p_txt = pairs // n_txt, pairs % n_txt
    scores = torch.empty(len(pairs))
    images, counts = torch.unique_consecutive(p_img, return_counts=True)
    start = 0
    for i, c in scoring.evaluate.progress(
        zip(images.tolist(), counts.tolist()), "ITM re-rank", total=len(images), delay=2
    ):
        with scoring.evaluate.autocast_for(device, amp):
            kv = model.itm_image_kv(vis[i : i + 1])
        for s in range(start, start + c, itm_batch):
            t = p_txt[s : min(s + itm_batch, start + c)]
            atts = text_atts[t]
            length = int(atts.sum(1).max())
            with scoring.evaluate.autocast_for(device, amp):
                scores[s : s + len(t)] = (
                    model.itm_scores_with_image_kv(text_states[t, :length], atts[:, :length], kv).float().cpu()
                )
        start += c
    return scores[where.cpu()]


def _recorded(batches: Iterable[dict], kept: list):
    """Yield the batches, keeping each (rerank_scores stores its encoding in it; the pixels are dropped after)."""
    for b in batches:
        kept.append(b)
        yield b
        b.pop("images", None)
