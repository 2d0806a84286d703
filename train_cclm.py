"""CCLM (CCLM-X2VLM base, X2-VLM code base) fine-tuning on IGLUE with scheduled unfreezing.

Model, heads, losses and checkpoint mapping reproduce the reference (zengyan-97/X2-VLM; what it does is in
docs/reference_facts.md, F-cclm-*, cited below; checkpoint layouts and parity fixtures:
tests/fixtures/cclm/README.md; data and weights: README.md, "Data and checkpoints"): a BEiT-2 ViT (timm)
encodes the image,
12 XLM-R layers (transformers) the text, 6 BERT layers with cross-attention fuse both.
SUF covers the 18 text + cross layers (text 0-11, cross 12-17); the ViT, the text embeddings,
the heads and the xGQA answer decoder always train (under --policy top only the heads and the answer
decoder do: Table 2's "CM only").

    python train_cclm.py --task xgqa --policy suf --data-root DATA --images IMAGES \
        --checkpoint cclm_x2vlm_base.th --tokenizer xlm-roberta-base --output-dir runs/cclm-xgqa-suf
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.beit import Beit
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertLayer,
    BertLMPredictionHead,
    eager_attention_forward,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaEmbeddings

import data
from checks import preflight
import engine
from console import cli, what_trains
from formats import load_plan, model_config, run_folder, tokenizer_check, torch_files
import freeze
from formats import x2vlm, x2vlm_drop_path
from scoring import answer_ranking, retrieval_protocols
import scoring.evaluate
import scoring.metrics
from training import devices

TASKS = data.TASKS
UNSCORED = -100.0  # X2-VLM: retrieval matrix entries outside the k_test prefilter

CONFIGS: dict[str, dict] = {
    "base": {  # CCLM-X2VLM base fine-tuned at 384 (docs/reference_facts.md#F-cclm-config)
        "image_res": 384,
        "patch_size": 16,
        "vision_width": 768,
        "vision_depth": 12,
        "vision_heads": 12,
        "vision_mlp_ratio": 4.0,
        "vision_init_values": 0.1,
        "vision_drop_path": 0.1,
        "vocab_size": 250002,
        "hidden_size": 768,
        "pad_token_id": 1,
        "text_layers": 12,
        "text_heads": 12,
        "text_intermediate": 3072,
        "text_max_positions": 514,
        "text_type_vocab": 1,
        "text_ln_eps": 1e-5,
        "cross_layers": 6,
        "cross_heads": 12,
        "cross_intermediate": 3072,
        "cross_ln_eps": 1e-12,
        "dec_layers": 6,
        "dec_max_positions": 512,
        "dec_type_vocab": 2,
        "dropout": 0.1,
        "attn_dropout": 0.1,
        "embed_dim": 256,
        "temp": 0.07,
        "k_test": 128,
        "num_labels": 3,
    },
}


# ---------------------------------------------------------------- encoders


class VisionEncoder(Beit):
    """BEiT-2 ViT as X2-VLM uses it: relative position bias per block, layer scale, q/v biases, no
    absolute position embedding; output [mean(fc_norm(patches)), fc_norm(patches)] (CLS dropped)."""

    def __init__(self, cfg: dict):
        super().__init__(
            img_size=cfg["image_res"],
            patch_size=cfg["patch_size"],
            num_classes=0,
            global_pool="avg",
            embed_dim=cfg["vision_width"],
            depth=cfg["vision_depth"],
            num_heads=cfg["vision_heads"],
            qkv_bias=True,
            mlp_ratio=cfg["vision_mlp_ratio"],
            drop_path_rate=cfg["vision_drop_path"],
            init_values=cfg["vision_init_values"],
            use_abs_pos_emb=False,
            use_rel_pos_bias=True,
        )
        for blk in self.blocks:  # the reference state_dict holds the index buffers: keep them persistent
            blk.attn.register_buffer("relative_position_index", blk.attn.relative_position_index, persistent=True)
        x2vlm_drop_path.use_reference_draws(self)  # drop path masks drawn as X2-VLM's ViT draws them

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: a batch's uint8 pixels [B, H, W, 3] (normalised here, on their device) or normalised float
        [B, 3, H, W] (data.eval_transform, the parity fixtures)."""
        x = self.patch_embed(data.normalize_images(images))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        patches = self.fc_norm(x[:, 1:])
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


def _bert_config(
    cfg: dict, layers: int, heads: int, intermediate: int, eps: float, max_pos: int, type_vocab: int, cross: bool
) -> BertConfig:
    c = BertConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_act="gelu",
        hidden_dropout_prob=cfg["dropout"],
        attention_probs_dropout_prob=cfg["attn_dropout"],
        max_position_embeddings=max_pos,
        type_vocab_size=type_vocab,
        layer_norm_eps=eps,
        pad_token_id=cfg["pad_token_id"],
        is_decoder=cross,
        add_cross_attention=cross,
    )
    # eager: masks are built here with the reference's additive constants; causality comes only from
    # the masks we pass (BertLayer's is_causal flag is unused by the eager path)
    c._attn_implementation = "eager"
    return c


def _text_config(cfg: dict) -> BertConfig:
    return _bert_config(
        cfg,
        cfg["text_layers"],
        cfg["text_heads"],
        cfg["text_intermediate"],
        cfg["text_ln_eps"],
        cfg["text_max_positions"],
        cfg["text_type_vocab"],
        cross=False,
    )


def _cross_config(cfg: dict, decoder: bool = False) -> BertConfig:
    return _bert_config(
        cfg,
        cfg["dec_layers"] if decoder else cfg["cross_layers"],
        cfg["cross_heads"],
        cfg["cross_intermediate"],
        cfg["cross_ln_eps"],
        cfg["dec_max_positions"],
        cfg["dec_type_vocab"],
        cross=True,
    )


def _persistent_position_ids(embeddings: nn.Module) -> None:
    embeddings.register_buffer("position_ids", embeddings.position_ids, persistent=True)  # in the reference state_dict


def self_attention_mask(atts: torch.Tensor, dtype: torch.dtype, causal: bool = False) -> torch.Tensor:
    """Additive [B,1,Lq,Lk] mask, -10000 on padded (and, causal, future) keys (transformers 4.12 / xbert)."""
    m = atts[:, None, None, :].to(dtype)
    if causal:
        L = atts.shape[1]
        m = m * torch.tril(torch.ones(L, L, device=atts.device, dtype=dtype))[None, None]
    return (1.0 - m) * -10000.0


def cross_attention_mask(atts: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive [B,1,1,Lk] mask, -1e9 on padded keys (xbert invert_attention_mask in float32)."""
    return None if atts is None else (1.0 - atts[:, None, None, :].to(dtype)) * -1e9


class _Layers(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)])


class TextEncoder(nn.Module):
    """XLM-R: RoBERTa position ids (pads 1, tokens 2, 3, ...), post-LN layers, no pooler."""

    def __init__(self, cfg: dict):
        super().__init__()
        c = _text_config(cfg)
        self.embeddings = XLMRobertaEmbeddings(c)
        _persistent_position_ids(self.embeddings)
        self.encoder = _Layers(c)

    def forward(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids=ids)
        mask = self_attention_mask(atts, x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, attention_mask=mask)
        return x


def _cross_attention_kv_width(layers: _Layers, width: int) -> None:
    """X2-VLM's xbert builds cross-attention key/value as Linear(config.encoder_width, hidden): the
    attended states may be wider or narrower than the queries (BertLayer's take hidden_size inputs)."""
    for layer in layers.layer:
        att = layer.crossattention.self
        if att.key.in_features != width:
            att.key = nn.Linear(width, att.all_head_size)
            att.value = nn.Linear(width, att.all_head_size)


class CrossEncoder(nn.Module):
    """Fusion layers over the text-encoder states: self-attn, cross-attn to the image (key/value
    projections take vision_width inputs, X2-VLM's encoder_width), FFN."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.encoder = _Layers(_cross_config(cfg))
        _cross_attention_kv_width(self.encoder, cfg["vision_width"])

    def forward(
        self,
        text_embeds: torch.Tensor,
        text_atts: torch.Tensor,
        vision_embeds: torch.Tensor,
        vision_atts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, mask = text_embeds, self_attention_mask(text_atts, text_embeds.dtype)
        vmask = cross_attention_mask(vision_atts, text_embeds.dtype)  # None = all ones (image tokens never pad)
        for layer in self.encoder.layer:
            x = layer(x, attention_mask=mask, encoder_hidden_states=vision_embeds, encoder_attention_mask=vmask)
        return x


def image_keys_values(encoder: "CrossEncoder", vision_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per fusion layer, the cross-attention keys and values [n, heads, tokens, head_dim] over the image
    tokens: they depend on the image only, so retrieval computes them once per image (image_kv_fusion)."""
    out = []
    for layer in encoder.encoder.layer:
        attn = layer.crossattention.self
        shape = (*vision_embeds.shape[:-1], -1, attn.attention_head_size)
        out.append(
            (attn.key(vision_embeds).view(shape).transpose(1, 2), attn.value(vision_embeds).view(shape).transpose(1, 2))
        )
    return out


def image_kv_fusion(
    encoder: "CrossEncoder",
    text_embeds: torch.Tensor,
    text_atts: torch.Tensor,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """CrossEncoder.forward (no image mask) with image_keys_values of ONE image (batch 1) given: the same
    BertLayer modules and attention function per step, the image's keys/values shared by every text."""
    x, mask = text_embeds, self_attention_mask(text_atts, text_embeds.dtype)
    for layer, (k, v) in zip(encoder.encoder.layer, kv):
        h, _ = layer.attention(x, mask)
        attn = layer.crossattention.self
        q = attn.query(h).view(*h.shape[:-1], -1, attn.attention_head_size).transpose(1, 2)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        n = q.shape[0]
        ctx, _ = fn(
            attn,
            q,
            k.expand(n, -1, -1, -1),
            v.expand(n, -1, -1, -1),
            None,
            dropout=0.0 if not attn.training else attn.dropout.p,
            scaling=attn.scaling,
        )
        h = layer.crossattention.output(ctx.reshape(*h.shape[:-1], -1).contiguous(), h)
        x = layer.feed_forward_chunk(h)
    return x


class AnswerDecoder(nn.Module):
    """xGQA answer decoder (xbert BertLMHeadModel): BERT embeddings (positions 0..L-1), causal layers
    with cross-attention to the question states (cross-encoder output, so key/value inputs are
    hidden_size wide whatever vision_width is), LM head tied to its own word embeddings."""

    def __init__(self, cfg: dict):
        super().__init__()
        c = _cross_config(cfg, decoder=True)
        self.bert = nn.Module()
        self.bert.embeddings = BertEmbeddings(c)
        _persistent_position_ids(self.bert.embeddings)
        self.bert.encoder = _Layers(c)
        self.cls = nn.Module()
        self.cls.predictions = BertLMPredictionHead(c)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def forward(self, ids: torch.Tensor, atts: torch.Tensor | None, states, state_atts, rows=None) -> torch.Tensor:
        """Logits [B, L, vocab]; rows (indices into the B*L positions): only theirs, [len(rows), vocab]."""
        x = self.bert.embeddings(input_ids=ids)
        atts = torch.ones_like(ids) if atts is None else atts
        mask = self_attention_mask(atts, x.dtype, causal=True)
        smask = cross_attention_mask(state_atts, x.dtype)
        for layer in self.bert.encoder.layer:
            x = layer(x, attention_mask=mask, encoder_hidden_states=states, encoder_attention_mask=smask)
        return self.cls.predictions(x if rows is None else x.flatten(0, 1)[rows])


def build_mlp(dim: int, out: int) -> nn.Sequential:
    """X2-VLM head MLP: Linear(d, 2d), LayerNorm(2d, eps 1e-5), GELU, Linear(2d, out)."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, out))


def _init_bert(module: nn.Module, std: float = 0.02) -> None:
    """transformers' BERT init (reference's random init of text/cross/decoder parts)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None and m.weight.device.type != "meta":
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("predictions.bias"):
            nn.init.zeros_(p)


# ---------------------------------------------------------------- task models


class CCLM(nn.Module):
    """Shared trunk. State-dict keys equal the reference's (vision_encoder., text_encoder., cross_encoder.)."""

    def __init__(self, task: str, config: dict):
        super().__init__()
        self.task, self.config = task, dict(config)
        self.vision_encoder = VisionEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.cross_encoder = CrossEncoder(config)
        _init_bert(self.text_encoder)
        _init_bert(self.cross_encoder)

    def cross_embeds(
        self, vision_embeds: torch.Tensor, text_embeds: torch.Tensor, text_atts: torch.Tensor
    ) -> torch.Tensor:
        return self.cross_encoder(text_embeds, text_atts, vision_embeds)

    def fuse(self, batch: dict) -> torch.Tensor:
        v = self.vision_encoder(batch["images"])
        return self.cross_embeds(v, self.text_encoder(batch["text_ids"], batch["text_atts"]), batch["text_atts"])

    def cls_features(self, batch: dict) -> torch.Tensor:
        """Cross-encoder output at position 0 (input to the heads; Figure 4 analysis)."""
        return self.fuse(batch)[:, 0]

    def prepare_task(self, data_root, tokenizer) -> None:
        """Task data the model needs before predicting (scoring.evaluate.evaluate_task): none, but see CCLMForXGQA."""


class CCLMForXVNLI(CCLM):
    def __init__(self, task: str, config: dict):
        super().__init__(task, config)
        self.cls_head = build_mlp(config["hidden_size"], config["num_labels"])

    def logits(self, batch: dict) -> torch.Tensor:
        return self.cls_head(self.cls_features(batch))

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["label"])

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        return scoring.metrics.require_finite(self.logits(batch), "logits").argmax(dim=1)


class CCLMForMaRVL(CCLMForXVNLI):
    """X2-VLM's XVLMPlusForMARVL (models/model_classification.py): the ViT once over the 2B images (all left,
    then all right), the cross encoder once per half, each call running the text encoder (get_cross_embeds with
    text_ids: with dropout the two text passes draw different masks); cls_head on [left ; right] position 0."""

    images_per_example = 2  # every text and cross layer runs once per image (console.what_trains)

    def __init__(self, task: str, config: dict):
        CCLM.__init__(self, task, config)
        self.cls_head = build_mlp(2 * config["hidden_size"], 2)

    def cls_features(self, batch: dict) -> torch.Tensor:
        """The head's input [B, 2 * hidden]: position 0 of the cross encoder over (text, left), (text, right)."""
        ids, atts = batch["text_ids"], batch["text_atts"]
        halves = torch.split(self.vision_encoder(batch["images"]), ids.shape[0])
        return torch.cat([self.cross_embeds(v, self.text_encoder(ids, atts), atts)[:, 0] for v in halves], dim=-1)


class CCLMForRetrieval(CCLM):
    def __init__(self, task: str, config: dict):
        super().__init__(task, config)
        self.vision_proj = nn.Linear(config["vision_width"], config["embed_dim"])
        self.text_proj = nn.Linear(config["hidden_size"], config["embed_dim"])
        self.temp = nn.Parameter(torch.ones([]) * config["temp"])
        self.itm_head = build_mlp(config["hidden_size"], 2)

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vision_encoder(images)
        return v, F.normalize(self.vision_proj(v[:, 0]), dim=-1)

    def encode_texts(self, text_ids: torch.Tensor, text_atts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC text features come from the text encoder alone (docs/reference_facts.md#F-cclm-itc-text)."""
        t = self.text_encoder(text_ids, text_atts)
        return t, F.normalize(self.text_proj(t[:, 0]), dim=-1)

    def itm_logits(
        self, vision_embeds: torch.Tensor, text_embeds: torch.Tensor, text_atts: torch.Tensor
    ) -> torch.Tensor:
        return self.itm_head(self.cross_embeds(vision_embeds, text_embeds, text_atts)[:, 0])

    def itm_image_kv(self, vision_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ITM fusion's per-image part (cross-attention keys/values), for itm_scores_with_image_kv."""
        return image_keys_values(self.cross_encoder, vision_embeds)

    def itm_scores_with_image_kv(
        self, text_embeds: torch.Tensor, text_atts: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """itm_scores of one image (its itm_image_kv, batch 1) with every text given: same scores, without
        recomputing the image's 2 x layers projections of its tokens for each pair as X2-VLM does."""
        return self.itm_head(image_kv_fusion(self.cross_encoder, text_embeds, text_atts, kv)[:, 0])[:, 1]

    def itm_scores(
        self, vision_embeds: torch.Tensor, text_embeds: torch.Tensor, text_atts: torch.Tensor
    ) -> torch.Tensor:
        """Raw class-1 ITM logit per (image, text) pair (no softmax, as xFlickrCO.evaluation)."""
        return self.itm_logits(vision_embeds, text_embeds, text_atts)[:, 1]

    def contrastive_loss(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """In-batch (all ranks) ITC; targets spread uniformly over pairs sharing an image id."""
        image_all, text_all = devices.gather_with_grad(image_feat), devices.gather_with_grad(text_feat)
        idx_all = devices.gather_with_grad(idx.view(-1, 1))
        logits = image_all @ text_all.t() / self.temp
        pos = torch.eq(idx_all, idx_all.t()).float()
        targets = pos / pos.sum(dim=1, keepdim=True)
        loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
        return (loss_i2t + loss_t2i) / 2

    def matching_loss(self, vision_embeds, image_feat, text_embeds, text_atts, text_feat, idx) -> torch.Tensor:
        """ITM with the reference's hard negatives (docs/reference_facts.md#F-cclm-hard-negatives): per pair,
        one negative image and one negative text drawn (global torch RNG, this rank's batch only) with
        probability softmax(sim / temp) + 1e-5, zeroed for pairs sharing the image id; CE over
        [pos, (neg img, text), (img, neg text)]."""
        bs = image_feat.shape[0]
        with torch.no_grad():
            sim_i2t = image_feat @ text_feat.t() / self.temp
            sim_t2i = text_feat @ image_feat.t() / self.temp
            same = torch.eq(idx.view(-1, 1), idx.view(1, -1))
            w_i2t = (F.softmax(sim_i2t.float(), dim=1) + 1e-5).masked_fill(same, 0)
            w_t2i = (F.softmax(sim_t2i.float(), dim=1) + 1e-5).masked_fill(same, 0)
            # a row without any allowed negative (whole batch one image) would make multinomial fail;
            # the reference crashes there, we fall back to uniform over the batch (choice)
            w_i2t[w_i2t.sum(1) == 0] = 1.0
            w_t2i[w_t2i.sum(1) == 0] = 1.0
            image_neg = torch.multinomial(w_t2i, 1).squeeze(1)
            text_neg = torch.multinomial(w_i2t, 1).squeeze(1)
        v_all = torch.cat([vision_embeds, vision_embeds[image_neg], vision_embeds])
        t_all = torch.cat([text_embeds, text_embeds, text_embeds[text_neg]])
        a_all = torch.cat([text_atts, text_atts, text_atts[text_neg]])
        logits = self.itm_logits(v_all, t_all, a_all)
        labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(logits.device)
        return F.cross_entropy(logits, labels)

    def loss(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        v, image_feat = self.encode_images(batch["images"])
        t, text_feat = self.encode_texts(batch["text_ids"], batch["text_atts"])
        itc = self.contrastive_loss(image_feat, text_feat, batch["idx"])
        itm = self.matching_loss(v, image_feat, t, batch["text_atts"], text_feat, batch["idx"])
        return itc + itm

    # ---- evaluation protocol (scoring.evaluate.evaluate_task)
    tie_order = "x2vlm"  # X2-VLM's itm_eval ranks in np.argsort(s)[::-1] order (scoring.metrics.reference_order)
    unscored = UNSCORED

    @torch.no_grad()
    def retrieval_scores(
        self, images, captions, batches: Callable, dist, device, opts, encoded: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X2-VLM's protocol: ITC top-k prefilter, ITM re-rank, each image and caption encoded once
        (scoring.retrieval_protocols)."""
        return retrieval_protocols.x2vlm_retrieval_scores(self, images, captions, batches, dist, device, opts, encoded)


class CCLMForXGQA(CCLM):
    """VQA as answer generation, evaluated by ranking a fixed answer list (docs/reference_facts.md#F-cclm-xgqa-rank)."""

    RANK_SEQUENCES = 512  # candidate sequences decoded at once by predict

    def __init__(self, task: str, config: dict):
        super().__init__(task, config)
        self.text_decoder = AnswerDecoder(config)
        _init_bert(self.text_decoder)
        # candidate answers (tokenised "<s> answer </s>", padding longest): set_answer_list before predict
        self.register_buffer("answer_ids", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("answer_atts", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("answer_labels", torch.zeros(0, dtype=torch.long), persistent=False)

    def set_answer_list(
        self, answer_ids: torch.Tensor, answer_atts: torch.Tensor, labels: torch.Tensor | None = None
    ) -> None:
        """Candidates in ranking order (docs/reference_facts.md#F-cclm-answer-list); labels[i]: the label id
        predict() returns for candidate i (default: i)."""
        self.answer_ids = answer_ids.to(self.answer_ids.device)
        self.answer_atts = answer_atts.to(self.answer_atts.device)
        labels = torch.arange(answer_ids.shape[0]) if labels is None else torch.as_tensor(labels)
        if labels.shape != (answer_ids.shape[0],):
            raise ValueError(f"{labels.shape[0]} labels for {answer_ids.shape[0]} candidate answers")
        self.answer_labels = labels.to(self.answer_labels.device, torch.long)

    def prepare_task(self, data_root, tokenizer) -> None:
        """The 1,842 GQA answers predict() ranks, tokenised in X2-VLM's order (tokenizer(answer_list,
        padding='longest'): <s> answer </s>)."""
        # X2-VLM's xgqa_dataset: answer_list = list(json.load(trainval_ans2label.json).keys()), the candidate order
        # that decides first-token ties at the top-k prune; predictions map back to our label ids
        ans2label, _ = data.load_answer_vocab(data_root)
        answers = list(ans2label)
        self.set_answer_list(
            *data.encode_texts(tokenizer, answers, None), labels=torch.tensor([ans2label[a] for a in answers])
        )

    def question_states(self, batch: dict) -> torch.Tensor:
        return self.fuse(batch)

    def answer_nll(
        self, answer_ids: torch.Tensor, answer_atts: torch.Tensor, states: torch.Tensor, state_atts: torch.Tensor
    ) -> torch.Tensor:
        """Per answer: SUM of token NLLs of the shifted targets (answer tokens and </s>; pads ignored)."""
        logits = self.text_decoder(answer_ids, answer_atts, states, state_atts)
        targets = answer_ids.masked_fill(answer_ids == self.config["pad_token_id"], -100)[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
        )
        return nll.view(answer_ids.shape[0], -1).sum(dim=1)

    def per_answer_loss(self, batch: dict) -> torch.Tensor:
        states = self.question_states(batch)
        k = torch.as_tensor(batch["k"], device=states.device)
        return self.answer_nll(
            batch["answer_ids"],
            batch["answer_atts"],
            states.repeat_interleave(k, dim=0),
            batch["text_atts"].repeat_interleave(k, dim=0),
        )

    def loss(self, batch: dict) -> torch.Tensor:
        """sum(weights * per-answer NLL) / number of questions (XVLMPlusForVQA.forward(train=True))."""
        return (batch["weights"] * self.per_answer_loss(batch)).sum() / batch["images"].shape[0]

    @torch.no_grad()
    def rank_answers(
        self,
        states: torch.Tensor,
        state_atts: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_atts: torch.Tensor,
        k: int,
        details: bool = False,
    ):
        """X2-VLM's rank_answer (docs/reference_facts.md#F-cclm-xgqa-rank): prune candidates to the top k by
        first-token probability, then score = log p(first token) - summed NLL of the whole answer (first
        token counted twice)."""
        n = states.shape[0]
        k = min(k, answer_ids.shape[0])
        start = answer_ids[0, 0].repeat(n, 1)  # <s>
        first_logits = self.text_decoder(start, None, states, state_atts)[:, 0].float()
        prob_first = F.softmax(first_logits, dim=1).index_select(1, answer_ids[:, 1])
        top_probs, top_ids = prob_first.topk(k, dim=1)
        ids = answer_ids[top_ids.reshape(-1)]
        atts = answer_atts[top_ids.reshape(-1)]
        nll = answer_ranking.answer_nll(self.text_decoder, ids, atts, states, state_atts, self.config["pad_token_id"])
        seq_logprob = top_probs.log() - nll
        probs, rerank = F.softmax(seq_logprob, dim=-1).topk(k, dim=1)
        ranked = torch.gather(top_ids, 1, rerank)
        if not details:
            return ranked, probs
        return (
            ranked,
            probs,
            {
                "first_token_logits": first_logits,
                "prob_first_token_all": prob_first,
                "topk_ids_before_rerank": top_ids,
                "answer_loss_topk": nll,
                "seq_logprob_topk": seq_logprob,
            },
        )

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        """Label id (set_answer_list's labels) of the first-ranked candidate (XGQA.py;
        docs/reference_facts.md#F-cclm-xgqa-rank)."""
        if self.answer_ids.numel() == 0:
            raise ValueError("xgqa predict: call model.set_answer_list(answer_ids, answer_atts) first")
        states, atts, k = self.question_states(batch), batch["text_atts"], self.config["k_test"]
        preds = []
        # a few questions at a time: k candidates x answer length x vocabulary logits each (choice;
        # the reference evaluates 4 questions per batch); per-question results do not depend on it
        step = max(1, self.RANK_SEQUENCES // k)
        for s in range(0, states.shape[0], step):
            ranked, probs = self.rank_answers(
                states[s : s + step], atts[s : s + step], self.answer_ids, self.answer_atts, k
            )
            scoring.metrics.require_finite(probs, "answer scores")
            preds.append(ranked.gather(1, probs.argmax(dim=1, keepdim=True)).squeeze(1))
        return self.answer_labels[torch.cat(preds)]


MODEL_CLASSES = {"xvnli": CCLMForXVNLI, "xflickrco": CCLMForRetrieval, "xgqa": CCLMForXGQA, "marvl": CCLMForMaRVL}


def build_model(task: str, config: dict) -> CCLM:
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return MODEL_CLASSES[task](task, config)


def layer_layout(task: str, config: dict | None = None) -> freeze.LayerLayout:
    """18 SUF layers: text 0-11 then cross 12-17 (counts from config, default the paper's).
    Task head (what policy top trains besides its layers): the heads and, for xGQA, the whole answer
    decoder (choice: its embeddings and LM head start random, so the task has no output unless they
    train; its 6 layers, copies of the cross encoder, train with them as the task's generation head)."""
    cfg = config or CONFIGS["base"]
    return freeze.layout_from_rules(
        cfg["text_layers"] + cfg["cross_layers"],
        layer_rules=[("text_encoder.encoder.layer.", 0, 1), ("cross_encoder.encoder.layer.", cfg["text_layers"], 1)],
        module_rules=[
            ("text_encoder.embeddings.", "embeddings"),
            ("vision_encoder.", "vision_encoder"),
            ("text_decoder.", "answer_decoder"),
        ],
        default_module="head",  # cls_head / itm_head / vision_proj / text_proj / temp
        task_head_modules=("head", "answer_decoder"),
    )


# ---------------------------------------------------------------- optimizer (X2-VLM's create_optimizer)

# X2-VLM's create_optimizer exempts a parameter from weight decay when one of its no-decay strings occurs
# ANYWHERE in the name ("bias", "LayerNorm.weight", "norm.weight", "norm1.weight", "norm2.weight"; its
# "*.bias" entries add nothing to "bias"). So the ViT's q_bias / v_bias and relative_position_bias_table and
# its fc_norm are exempt, while the layer-scale gammas, `temp`, the cls token and the heads' LayerNorm weights
# (cls_head.1.weight, itm_head.1.weight: no "norm" in the name) are decayed (docs/reference_facts.md#F-cclm-optimizer).
X2VLM_NO_DECAY_SUBSTRINGS = ("bias", "LayerNorm.weight", "norm.weight", "norm1.weight", "norm2.weight")


def x2vlm_no_decay(name: str, param: nn.Parameter | None = None) -> bool:
    return any(s in name for s in X2VLM_NO_DECAY_SUBSTRINGS)


def lr_mult_prefixes(task: str, from_pretraining: bool, config: dict | None = None) -> tuple[str, ...]:
    """Parameters X2-VLM trains at lr * lr_mult (its model.init_params after loading): XVNLI's and MaRVL's cls_head
    always (set when the model is built); xGQA's decoder embeddings and LM head when the loaded checkpoint lacks them,
    i.e. from the pretraining checkpoint (or no checkpoint), not from a fine-tuned one, and then also the
    decoder's cross-attention key/value where vision_width != hidden_size (not copied from the checkpoint, see
    formats.x2vlm.plan_pretrained); retrieval none (its heads come from pretraining). Tied names count once: xGQA has 10
    such parameters at equal widths, XVNLI 6."""
    if task in ("xvnli", "marvl"):  # their cls_head: X2-VLM's init_params, set when the model is built
        return x2vlm.NEW_KEYS[task]
    if not from_pretraining:
        return ()
    cfg = config or CONFIGS["base"]
    fresh_kv = (
        ()
        if task != "xgqa" or cfg["vision_width"] == cfg["hidden_size"]
        else tuple(
            f"text_decoder.bert.encoder.layer.{i}.crossattention.self.{kv}."
            for i in range(cfg["dec_layers"])
            for kv in ("key", "value")
        )
    )
    return x2vlm.NEW_KEYS[task] + fresh_kv


def lr_mult_rule(prefixes: tuple[str, ...], mult: float):
    """name -> LR factor for freeze.param_groups: mult for the given prefixes, 1 elsewhere."""
    return lambda name: mult if any(name == p or name.startswith(p) for p in prefixes) else 1.0


# ---------------------------------------------------------------- training entry point

# The defaults that depend on --task (no --recipe iglue for CCLM; every other default is in its add_argument, here
# or in engine.add_common_args). Paper §4: lr 2e-5 for the ViT (--vision-lr) and 3e-5 for the rest; effective batch
# 256/144/128 (xGQA/XVNLI/xFlickrCo) via gradient accumulation; epochs 5/10/10, AdamW wd 0.01, 10% warm-up.
DEFAULTS = {
    ("paper", "xgqa"): dict(epochs=5, lr=3e-5, batch_size=256),
    ("paper", "xvnli"): dict(epochs=10, lr=3e-5, batch_size=144),
    ("paper", "xflickrco"): dict(epochs=10, lr=3e-5, batch_size=128),
    ("paper", "marvl"): dict(epochs=10, lr=3e-5, batch_size=128),  # paper silent: CCLM's MaRVL run (choices.md)
}


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
    engine.add_common_args(p, DEFAULTS)
    # paper silent: AdamW betas of X2-VLM's create_optimizer (docs/reference_facts.md#F-cclm-optimizer); its no-decay
    # rule (x2vlm_no_decay) and lr_mult 2 (--lr-mult) are wired in main
    p.set_defaults(adam_betas=[0.9, 0.98])
    c = p.add_argument_group("CCLM (train_cclm.py)")
    c.add_argument(
        "--checkpoint",
        default=None,
        help="initial weights: the released cclm_x2vlm_base.th (pretraining layout, mapped as X2-VLM does), "
        "a fine-tuned reference checkpoint of this task, or a model_final.pt of ours",
    )
    c.add_argument("--images", default=None, help="image root (gqa/, flickr30k/, coco/ below it; see data.py)")
    c.add_argument(
        "--model-config",
        default=None,
        help="base | a config json (default: the --checkpoint's own config if it is ours, else base)",
    )
    c.add_argument("--tokenizer", default="xlm-roberta-base", help="XLM-R tokenizer folder or cached hub id")
    c.add_argument("--image-res", type=int, default=None, help="override the config's image resolution (paper: 384)")
    c.add_argument("--vision-lr", type=float, default=2e-5, help="peak lr of the ViT (paper: 2e-5)")
    c.add_argument(
        "--lr-mult",
        type=float,
        default=2.0,
        help="LR factor of the newly initialised parameters (X2-VLM's lr_mult 2: XVNLI cls_head; xGQA decoder "
        "embeddings and LM head when starting from the pretraining checkpoint); 1 = off",
    )
    c.add_argument("--eval-batch-size", type=int, default=32, help="examples per evaluation forward")
    c.add_argument("--no-eval", action="store_true", help="skip every evaluation, per-epoch and final (no curves)")
    return p


def resolve_config(name: str | None, meta: dict | None = None) -> dict:
    """'base' | a config json of ours (its keys over base); None: the checkpoint meta's config, else base."""
    if name is None:
        return dict(meta["config"]) if meta and "config" in meta else dict(CONFIGS["base"])
    return model_config.read_model_config(name, CONFIGS)


def model_config_from_args(args, meta: dict | None = None) -> dict:
    config = resolve_config(args.model_config, meta)
    if args.image_res is not None:
        config["image_res"] = args.image_res
    if args.dropout is not None:  # all three stochastic parts (the reference's ViT uses drop path only)
        config.update(dropout=args.dropout, attn_dropout=args.dropout, vision_drop_path=args.dropout)
    if config["image_res"] % config["patch_size"]:
        raise SystemExit(
            f"error: image resolution {config['image_res']} is not a multiple of the patch size {config['patch_size']}"
        )
    model_config.check_heads(
        config,
        [("hidden_size", "text_heads"), ("hidden_size", "cross_heads"), ("vision_width", "vision_heads")],
        args.model_config or "(the checkpoint's config)",
    )
    return config


def build_train_dataset(args, config: dict):
    """The --train-split of --train-lang (engine's defaults: IGLUE's English train split of each task:
    GQA train, XVNLI train, Flickr30k train); every image file is checked first (ValueError)."""
    examples = data.load_split(args.data_root, args.task, args.train_split, args.train_lang)
    preflight.check_inputs(
        examples, images=args.images, sample=preflight.VERIFY_SAMPLE
    )  # fail before training, not mid-epoch
    return data.IMAGES.dataset(
        args.task, examples, images=args.images, train=True, image_res=config["image_res"], seed=args.seed
    )


def read_checkpoint_arg(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """--checkpoint's (state_dict, our run meta or None); a checkpoint of our other model is refused."""
    with cli.about("--checkpoint", path):
        state, meta = x2vlm.read_checkpoint(path)
        load_plan.check_checkpoint_model(meta, "cclm", path)
    return state, meta


def load_checkpoint_arg(model: CCLM, state: dict[str, torch.Tensor], path: str) -> str:
    """--checkpoint's state into `model` (formats.x2vlm.load_state); returns the report."""
    with cli.about("--checkpoint", path):
        return x2vlm.load_state(model, state, f"checkpoint {path}")


@cli.exits_on_bad_input
def main(
    argv: list[str] | None = None, *, dist: devices.DistInfo | None = None, on_evaluated: Callable | None = None
) -> None:
    """train_cclm.py's command line (argv: its arguments). dist: a process group the caller set up and ends itself
    (eval_zeroshot fewshot runs several trainings and an evaluation in one); on_evaluated: engine.train's hook."""
    args = engine.parse_args(build_parser(), argv, DEFAULTS, "cclm")
    state, meta = None, None
    if args.print_schedule:
        config = model_config_from_args(args)
        layout = layer_layout(args.task, config)
        schedule = freeze.schedule_from_args(args, layout.num_layers)
        count_train = lambda: len(data.load_split(args.data_root, args.task, args.train_split, args.train_lang))  # noqa: E731
        return what_trains.print_schedule_only(build_model, config, layout, schedule, args, count_train)

    owns_group = dist is None
    dist = engine.setup_distributed() if owns_group else dist
    try:
        run_dir = engine.check_run_dir(args, dist)
        resuming = run_folder.resuming(args, run_dir)
        if not args.data_root:
            raise SystemExit("error: --data-root is required (folder holding IGLUE's datasets/)")
        if not args.images or not os.path.isdir(args.images):
            raise SystemExit(
                f"error: --images {args.images!r} is not a folder (image root with gqa/, flickr30k/, coco/)"
            )
        if resuming:  # the run's own config (its checkpoint's meta) unless --model-config says otherwise
            meta = torch_files.read_torch_file(run_dir / run_folder.CHECKPOINT, mmap=True).get("meta")
        elif args.checkpoint:
            state, meta = read_checkpoint_arg(args.checkpoint)
        config = model_config_from_args(args, meta)
        layout = layer_layout(args.task, config)
        schedule = freeze.schedule_from_args(args, layout.num_layers)
        tokenizer = engine.load_tokenizer(args, config["vocab_size"])
        if resuming:  # the optimizer groups of the run itself (its checkpoint holds their state)
            large_lr = tuple((meta or {}).get("lr_mult_prefixes", ()))
        else:
            large_lr = lr_mult_prefixes(args.task, state is None or x2vlm.is_pretraining_state(state), config)

        engine.seed_everything(args.seed)  # identical initial weights on every rank
        model = build_model(args.task, config)
        if state is not None:
            report = load_checkpoint_arg(model, state, args.checkpoint)
            del state
            tokenizer_check.check_tokenizer_vocab(
                tokenizer, config["vocab_size"], args.tokenizer, args.checkpoint, meta
            )
            if dist.is_main:
                print(report, flush=True)
                (run_dir / "load_report.txt").write_text(report + "\n")
        elif not args.checkpoint and dist.is_main:
            print("warning: no --checkpoint: training from random initialisation", file=sys.stderr, flush=True)
        with cli.about("data"):
            model.prepare_task(args.data_root, tokenizer)  # xgqa: the 1,842 candidate answers predict() ranks
            train_ds = build_train_dataset(args, config)
            evaluate_fn = (
                None
                if args.no_eval
                else scoring.evaluate.trainer_evaluate_fn(
                    "cclm", args, tokenizer, dist, images=args.images, image_res=config["image_res"]
                )
            )
        loader = engine.build_train_loader(train_ds, args, dist, data.IMAGES.collate(args.task, tokenizer, train=True))
        meta = {
            **run_folder.base_meta("cclm", args, config, tokenizer),
            "vision_lr": args.vision_lr,
            "lr_mult": args.lr_mult,
            "lr_mult_prefixes": list(large_lr),
        }
        if dist.is_main:
            print(
                f"optimizer (X2-VLM's rules): lr x{args.lr_mult:g} for {', '.join(large_lr) or 'no parameters'}; "
                f"no weight decay on names containing {', '.join(X2VLM_NO_DECAY_SUBSTRINGS)}",
                flush=True,
            )
        engine.train(
            args,
            model,
            layout,
            schedule,
            loader,
            evaluate_fn,
            meta,
            dist,
            module_lr={"vision_encoder": args.vision_lr},
            no_decay=x2vlm_no_decay,
            lr_mult=lr_mult_rule(large_lr, args.lr_mult),
            on_evaluated=on_evaluated,
            run_dir=run_dir,
        )
    finally:
        engine.cleanup_distributed(end_group=owns_group)


if __name__ == "__main__":
    cli.run_main(main)
