"""UC2 fine-tuning on xGQA / XVNLI / xFlickr&CO with scheduled unfreezing (SUF) and friends.

The model is UC2 exactly as IGLUE ran it through VOLTA (config `uc2_base`): a single-stream
XLM-R-base encoder over [text tokens ; projected region features], a ReLU pooler on the first text
token, and VOLTA's task heads and losses. Facts: docs/reference_facts.md (F-uc2-*, F-retrieval-ranks);
checkpoint layouts and parity fixtures: tests/fixtures/uc2/README.md; data and weights: README.md, "Data and
checkpoints"; choices: README.md, "Choices where the paper and the references are silent".

  python train_uc2.py --task xgqa --policy suf --data-root DATA --features FEATS \
      --checkpoint uc2_checkpoint_200000.bin --tokenizer xlm-roberta-base --output-dir runs/uc2-xgqa-suf
  python train_uc2.py --task xgqa --policy suf --model-config base --print-schedule
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.xlm_roberta.configuration_xlm_roberta import XLMRobertaConfig
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer

import data
import engine
import freeze

TASKS = data.TASKS
# VOLTA task keys of IGLUE's task configs (GQA, XVNLI, Flickr30k retrieval).
VOLTA_TASK_KEY = {"xgqa": "TASK15", "xvnli": "TASK19", "xflickrco": "TASK8"}

CONFIGS: dict[str, dict] = {
    # VOLTA's config/uc2_base.json, which IGLUE's UC2 runs use (docs/reference_facts.md#F-uc2-config).
    "base": dict(
        vocab_size=250002,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=2,
        pad_token_id=1,
        layer_norm_eps=1e-5,
        v_feature_size=2048,
        num_locs=7,
        pooler_size=768,
        clf_hidden_size=768,
        num_answers=1842,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        classifier_dropout=0.1,
        initializer_range=0.02,
        attn_implementation="sdpa",
        retrieval_loss="triplet",
    ),
}
# CPU-seconds size for tests/demo. Still 12 layers so every schedule is the paper's; region
# features stay 2048-d so real and synthetic feature files fit unchanged.
CONFIGS["tiny"] = {
    **CONFIGS["base"],
    "vocab_size": 4096,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "pooler_size": 32,
    "clf_hidden_size": 32,
}


# Config keys VOLTA's UC2 config space needs beyond CONFIGS (absent = the uc2_base value): the FFN activation
# (VOLTA hidden_act: gelu | relu | swish), the pooler activation (VOLTA fusion_act: relu, anything else tanh) and
# per-layer attention width / head count / FFN width (VOLTA's sublayer2* overrides), as lists over layers.
OPTIONAL_CONFIG_KEYS = ("hidden_act", "pooler_act", "layer_attn_sizes", "layer_num_heads", "layer_intermediate_sizes")
VOLTA_ACTS = ("gelu", "relu", "swish")


def _check_volta_uc2_layout(volta: dict, n: int) -> None:
    """UC2 = every sublayer shared by text and image with one LayerNorm, attention at 2k and FFN at 2k+1."""
    attn, ffn, every = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2)), list(range(2 * n))
    want = {
        **{k: attn for k in ("tt_attn_sublayers", "tv_attn_sublayers", "vt_attn_sublayers", "vv_attn_sublayers")},
        "t_ff_sublayers": ffn,
        "v_ff_sublayers": ffn,
        "shared_sublayers": every,
        "single_ln_sublayers": every,
    }
    for key, value in want.items():
        if sorted(volta.get(key, value)) != value:
            raise ValueError(f"VOLTA config: {key} = {volta[key]} is not UC2's single-stream layout {value}")
    # VOLTA asserts these text/image sizes equal in shared sublayers (v_hidden_act is unused there: no check)
    for key, subs in (("attn_hidden_size", attn), ("num_attention_heads", attn), ("intermediate_size", ffn)):
        base = "hidden_size" if key == "attn_hidden_size" else key
        text, image = volta.get(f"sublayer2{key}") or {}, volta.get(f"sublayer2v_{key}") or {}
        for s in subs:
            t, v = text.get(str(s), volta.get(base)), image.get(str(s), volta.get(f"v_{base}", volta.get(base)))
            if t != v:
                raise ValueError(
                    f"VOLTA config: sublayer {s}: {key} {t} (text) != {v} (image); "
                    "UC2 shares every weight between text and image"
                )


def _volta_per_layer(volta: dict, key: str, sublayers: list[int], default: int) -> list[int] | None:
    """VOLTA's per-sublayer override dict (keys = sublayer numbers as strings) as a list over our layers."""
    table = volta.get(key) or {}
    values = [int(table.get(str(s), default)) for s in sublayers]
    return None if all(v == default for v in values) else values


def config_from_volta(volta: dict, **overrides) -> dict:
    """Our config dict from a VOLTA BertConfig json (e.g. config/uc2_base.json, parity_a/volta_config.json)."""
    sublayers = volta.get("bert_layer2attn_sublayer") or {str(i): s for i, s in enumerate(volta["tt_attn_sublayers"])}
    if volta.get("fusion_method", "text") != "text" or volta.get("image_embeddings", "uc2") != "uc2":
        raise ValueError("VOLTA config is not a UC2 config (need fusion_method 'text', image_embeddings 'uc2')")
    n = len(sublayers)
    _check_volta_uc2_layout(volta, n)
    if volta.get("hidden_act", "gelu") not in VOLTA_ACTS:
        raise ValueError(f"VOLTA config: hidden_act {volta['hidden_act']!r} is none of VOLTA's {VOLTA_ACTS}")
    cfg = dict(CONFIGS["base"])
    cfg.update(
        vocab_size=volta["vocab_size"],
        hidden_size=volta["hidden_size"],
        num_layers=n,
        num_heads=volta["num_attention_heads"],
        intermediate_size=volta["intermediate_size"],
        max_position_embeddings=volta["max_position_embeddings"],
        type_vocab_size=volta["type_vocab_size"],
        pad_token_id=volta.get("pad_token_id", 1),
        layer_norm_eps=volta["layer_norm_eps"],
        v_feature_size=volta["v_feature_size"],
        num_locs=volta["num_locs"],
        pooler_size=volta["pooler_size"],
        clf_hidden_size=volta["clf_hidden_size"],
        hidden_dropout=volta["hidden_dropout_prob"],
        attention_dropout=volta["attention_probs_dropout_prob"],
        initializer_range=volta.get("initializer_range", 0.02),
    )
    if volta.get("hidden_act", "gelu") != "gelu":
        cfg["hidden_act"] = volta["hidden_act"]
    if volta.get("fusion_act", "relu") != "relu":
        cfg["pooler_act"] = "tanh"  # VOLTA's text pooler: ReLU for "relu", Tanh for any other value
    attn, ffn = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
    for ours, theirs, subs, default in (
        ("layer_attn_sizes", "sublayer2attn_hidden_size", attn, cfg["hidden_size"]),
        ("layer_num_heads", "sublayer2num_attention_heads", attn, cfg["num_heads"]),
        ("layer_intermediate_sizes", "sublayer2intermediate_size", ffn, cfg["intermediate_size"]),
    ):
        per_layer = _volta_per_layer(volta, theirs, subs, default)
        if per_layer is not None:
            cfg[ours] = per_layer
    cfg.update(overrides)
    return cfg


def _volta_config(d: dict) -> dict | None:
    """Our config from a VOLTA UC2 config json; None for a config json of ours."""
    return config_from_volta(d) if "tt_attn_sublayers" in d or "bert_layer2attn_sublayer" in d else None


def resolve_config(name_or_path: str) -> dict:
    """'tiny' | 'base' | path to our config json or to a VOLTA UC2 config json."""
    return engine.read_model_config(name_or_path, CONFIGS, OPTIONAL_CONFIG_KEYS, foreign=_volta_config)


# ============================================================================ model


class UC2Embeddings(nn.Module):
    """Text: LN(word + RoBERTa position + token_type[0]); regions: v_LN(img_LN(W f) + loc_LN(W s) + token_type[1])."""

    def __init__(self, c: dict):
        super().__init__()
        h, eps = c["hidden_size"], c["layer_norm_eps"]
        self.pad_token_id = c["pad_token_id"]
        self.word_embeddings = nn.Embedding(c["vocab_size"], h, padding_idx=self.pad_token_id)
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], h)  # no padding_idx, as VOLTA
        self.token_type_embeddings = nn.Embedding(c["type_vocab_size"], h)  # shared by text (row 0) and regions (row 1)
        self.LayerNorm = nn.LayerNorm(h, eps=eps)
        self.image_embeddings = nn.Linear(c["v_feature_size"], h)
        self.image_location_embeddings = nn.Linear(c["num_locs"], h)
        self.image_layer_norm = nn.LayerNorm(h, eps=eps)
        self.image_location_layer_norm = nn.LayerNorm(h, eps=eps)
        self.v_LayerNorm = nn.LayerNorm(h, eps=eps)
        self.dropout = nn.Dropout(c["hidden_dropout"])
        self.v_dropout = nn.Dropout(c["hidden_dropout"])

    def forward(self, input_ids, features, spatials):
        real = input_ids.ne(self.pad_token_id).long()
        positions = torch.cumsum(real, 1) * real + self.pad_token_id  # pads -> 1, tokens -> 2, 3, ...
        text = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )  # IGLUE's segment ids are all 0
        text = self.dropout(self.LayerNorm(text))
        region_type = self.token_type_embeddings.weight[1]
        image = (
            self.image_layer_norm(self.image_embeddings(features))
            + self.image_location_layer_norm(self.image_location_embeddings(spatials))
            + region_type
        )
        image = self.v_dropout(self.v_LayerNorm(image))
        return text, image


def _layer_value(c: dict, key: str, layer: int, default_key: str) -> int:
    per_layer = c.get(key)
    return per_layer[layer] if per_layer else c[default_key]


def _xlmr_layer_config(c: dict, layer: int = 0) -> XLMRobertaConfig:
    heads = _layer_value(c, "layer_num_heads", layer, "num_heads")
    xc = XLMRobertaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_layers"],
        # HF checks hidden % heads; a width that differs from hidden is set by _set_attention_width
        num_attention_heads=heads if c["hidden_size"] % heads == 0 else 1,
        intermediate_size=_layer_value(c, "layer_intermediate_sizes", layer, "intermediate_size"),
        hidden_act=c.get("hidden_act", "gelu"),
        hidden_dropout_prob=c["hidden_dropout"],
        attention_probs_dropout_prob=c["attention_dropout"],
        layer_norm_eps=c["layer_norm_eps"],
    )
    xc._attn_implementation = c.get("attn_implementation", "sdpa")
    return xc


def _set_attention_width(layer: XLMRobertaLayer, hidden: int, width: int, heads: int) -> None:
    """VOLTA's sublayer2attn_hidden_size: Q/K/V map hidden -> width (heads of width/heads), output width -> hidden."""
    if width % heads:
        raise ValueError(f"config: attention width {width} is not a multiple of its {heads} heads")
    att = layer.attention.self
    att.num_attention_heads, att.attention_head_size, att.all_head_size = heads, width // heads, width
    att.scaling = att.attention_head_size**-0.5
    att.query, att.key, att.value = (nn.Linear(hidden, width) for _ in range(3))
    layer.attention.output.dense = nn.Linear(width, hidden)


class UC2Encoder(nn.Module):
    """VOLTA's UC2 encoder = standard post-LN BERT layers over [text ; regions] (all weights shared
    between modalities), so each of its attention/FFN sublayer pairs is one XLM-R layer."""

    def __init__(self, c: dict):
        super().__init__()
        self.layer = nn.ModuleList()
        for k in range(c["num_layers"]):
            layer = XLMRobertaLayer(_xlmr_layer_config(c, k), layer_idx=k)
            width = _layer_value(c, "layer_attn_sizes", k, "hidden_size")
            heads = _layer_value(c, "layer_num_heads", k, "num_heads")
            if width != c["hidden_size"] or layer.attention.self.num_attention_heads != heads:
                _set_attention_width(layer, c["hidden_size"], width, heads)
            self.layer.append(layer)

    def forward(self, hidden, additive_mask, sublayer_outputs: list | None = None):
        for layer in self.layer:
            # attention then FFN block, called separately so VOLTA's sublayer outputs can be checked
            hidden = layer.attention(hidden, additive_mask)[0]
            if sublayer_outputs is not None:
                sublayer_outputs.append(hidden)
            hidden = layer.feed_forward_chunk(hidden)
            if sublayer_outputs is not None:
                sublayer_outputs.append(hidden)
        return hidden


def _make_head(task: str, c: dict) -> nn.Module:
    p = c["pooler_size"]
    if task == "xgqa":  # VOLTA "VL-classifier-GQA": SimpleClassifier
        return nn.Sequential(
            nn.Linear(p, c["clf_hidden_size"]),
            nn.GELU(),
            nn.LayerNorm(c["clf_hidden_size"], eps=c["layer_norm_eps"]),
            nn.Linear(c["clf_hidden_size"], c["num_answers"]),
        )
    if task == "xvnli":  # "VL-tri-classifier"
        return nn.Linear(p, 3)
    if task == "xflickrco":  # "VL-logit"
        return nn.Linear(p, 1)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def triplet_loss(scores: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """IGLUE's UC2 retrieval loss: hinge on sigmoid scores, positive in column 0, mean over negatives and batch
    (docs/reference_facts.md#F-uc2-losses)."""
    p = torch.sigmoid(scores)
    return torch.clamp(margin + p[:, 1:] - p[:, :1], min=0).mean()


class UC2(nn.Module):
    """UC2 task model (VOLTA's BertForVLTasks with one head). Batches as in the team contract."""

    def __init__(self, task: str, config: dict):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        self.task, self.config = task, dict(config)
        self.embeddings = UC2Embeddings(config)
        self.encoder = UC2Encoder(config)
        self.pooler = nn.Linear(config["hidden_size"], config["pooler_size"])
        self.dropout = nn.Dropout(config["classifier_dropout"])
        self.head = _make_head(task, config)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # VOLTA's BertPreTrainedModel.init_weights, applied to the whole task model (heads included,
        # overriding SimpleClassifier's xavier init exactly as BertForVLTasks does).
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(0.0, self.config["initializer_range"])
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()
        if isinstance(m, nn.LayerNorm):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()

    # ---- core
    def encode(self, input_ids, attention_mask, features, spatials, image_mask, trace: dict | None = None):
        """Pooled output [N, pooler_size]; with `trace` a dict, also fills embedding_t/v and sublayer_outputs_t/v."""
        text, image = self.embeddings(input_ids, features, spatials)
        hidden = torch.cat([text, image], 1)
        keep = torch.cat([attention_mask, image_mask], 1).to(hidden.dtype)
        additive = ((1.0 - keep) * -10000.0)[:, None, None, :]  # VOLTA's mask over keys
        subs = [] if trace is not None else None
        hidden = self.encoder(hidden, additive, subs)
        pooled = self.pooler(hidden[:, 0])  # VOLTA fusion_act relu (uc2_base; original UC2: tanh)
        pooled = torch.tanh(pooled) if self.config.get("pooler_act", "relu") == "tanh" else F.relu(pooled)
        if trace is not None:
            n = text.shape[1]
            trace.update(
                embedding_t=text,
                embedding_v=image,
                pooled_output_t=pooled,
                sublayer_outputs_t=[s[:, :n] for s in subs],
                sublayer_outputs_v=[s[:, n:] for s in subs],
            )
        return pooled

    def forward(self, input_ids, attention_mask, features, spatials, image_mask, trace: dict | None = None):
        """Head output for N pairs: [N,1842] (xgqa), [N,3] (xvnli), [N,1] (xflickrco)."""
        return self.head(self.dropout(self.encode(input_ids, attention_mask, features, spatials, image_mask, trace)))

    @staticmethod
    def _flat(batch: dict) -> list[torch.Tensor]:
        """The 5 input tensors with leading batch dims ([B] or VOLTA's grouped [B,4]) flattened."""
        lead = batch["input_ids"].dim() - 1
        return [
            batch[k].flatten(0, lead - 1) for k in ("input_ids", "attention_mask", "features", "spatials", "image_mask")
        ]

    def _run(self, batch: dict, trace: dict | None = None):
        return self(*self._flat(batch), trace=trace)

    # ---- contract API
    def loss(self, batch: dict) -> torch.Tensor:
        if self.task == "xgqa":  # BCE averaged over batch and labels, times the number of labels
            target = batch["target"]
            return F.binary_cross_entropy_with_logits(self._run(batch).float(), target) * target.shape[1]
        if self.task == "xvnli":  # BCE averaged, NOT scaled (VOLTA's VL-tri-classifier)
            return F.binary_cross_entropy_with_logits(self._run(batch).float(), batch["target"])
        scores = self.pair_scores(batch).float()  # [B,4]: positive first, then 3 negatives
        if scores.dim() != 2:
            raise ValueError(
                f"xflickrco training batch must be grouped [B,4,...], got input_ids {tuple(batch['input_ids'].shape)}"
            )
        return retrieval_loss(scores, self.config.get("retrieval_loss", "triplet"))

    def predict(self, batch: dict) -> torch.Tensor:
        if self.task == "xflickrco":
            raise ValueError("predict() is for xgqa/xvnli; retrieval uses pair_scores()")
        return engine.require_finite(self._run(batch), "logits").argmax(-1)

    def cls_features(self, batch: dict) -> torch.Tensor:
        """Pooled output (VOLTA's pooled_output_t, before dropout): the classifier's input."""
        return self.encode(*self._flat(batch))

    def pair_scores(self, batch: dict) -> torch.Tensor:
        """Raw VL-logit per (caption, image) pair: [N] for flat inputs, [B,4] for grouped ones."""
        if self.task != "xflickrco":
            raise ValueError(f"pair_scores() needs the xflickrco model, this one is {self.task}")
        return self._run(batch).view(batch["input_ids"].shape[:-1])

    # ---- evaluation protocol (engine.evaluate_task)
    tie_order = "volta"  # VOLTA's eval_retrieval.py ranks in np.argsort(-s) order (engine.reference_order)
    unscored = None  # every (caption, image) pair is scored

    def prepare_task(self, data_root, tokenizer) -> None:
        """Task data the model needs before predicting: none (UC2's heads classify over fixed label sets)."""

    @torch.no_grad()
    def retrieval_scores(
        self, images, captions, batches: Callable, dist, device, opts, encoded: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VOLTA's protocol on a retrieval test set (data.RetrievalImages / RetrievalCaptions): the VL logit of
        every (caption, image) pair; every rank holds all images and scores its shard of the captions.
        batches(dataset, indices, progress label or None) iterates collated batches; opts: engine.RetrievalOptions
        (pair_batch, amp). Returns (score_i2t [n_img, n_txt], score_t2i [n_txt, n_img]), on every rank."""
        img_batches = list(batches(images, range(len(images)), None))
        feats = {k: torch.cat([b[k] for b in img_batches]) for k in ("features", "spatials", "image_mask")}
        cap_batches = list(batches(captions, engine.shard(len(captions), dist), "captions"))
        texts = {
            "input_ids": engine.pad_cat([b["input_ids"] for b in cap_batches], value=1)
            if cap_batches
            else torch.ones(0, 1, dtype=torch.long),
            "attention_mask": engine.pad_cat([b["attention_mask"] for b in cap_batches])
            if cap_batches
            else torch.zeros(0, 1, dtype=torch.long),
        }
        rows = self.score_all_pairs(feats, texts, opts.pair_batch, device, opts.amp)
        scores = torch.cat(list(engine.gather([rows], dist)))
        return scores.t(), scores

    @torch.no_grad()
    def score_all_pairs(
        self,
        images: dict[str, torch.Tensor],
        texts: dict[str, torch.Tensor],
        pair_batch: int = 1024,
        device="cpu",
        amp: str = "off",
    ) -> torch.Tensor:
        """The VL logit of EVERY (caption, image) pair, scored `pair_batch` pairs per forward. images: stacked
        features/spatials/image_mask [n_img, R, ...]; texts: stacked input_ids/attention_mask [n_txt, L].
        Returns [n_txt, n_img] (on CPU, float32)."""
        images = engine.to_device(images, device)
        texts = engine.to_device(texts, device)
        n_img, n_txt = images["features"].shape[0], texts["input_ids"].shape[0]
        total = n_img * n_txt
        out = torch.empty(total)
        for start in range(0, total, pair_batch):
            pair = torch.arange(start, min(start + pair_batch, total), device=device)
            t, i = pair // n_img, pair % n_img
            length = int(texts["attention_mask"][t].sum(1).max())  # trim padding common to the batch
            batch = {
                "input_ids": texts["input_ids"][t, :length],
                "attention_mask": texts["attention_mask"][t, :length],
                "features": images["features"][i],
                "spatials": images["spatials"][i],
                "image_mask": images["image_mask"][i],
            }
            with engine.autocast_for(device, amp):
                out[start : start + len(pair)] = self.pair_scores(batch).float().reshape(-1).cpu()
        return out.view(n_txt, n_img)


def retrieval_loss(scores: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "triplet":
        return triplet_loss(scores)
    if kind == "ce":  # the VOLTA task config's CrossEntropyLoss, target = slot 0
        return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))
    raise ValueError(f"unknown retrieval loss {kind!r} (triplet|ce)")


def build_model(task: str, config: dict) -> UC2:
    return UC2(task, config)


def layer_layout(task: str, config: dict | None = None) -> freeze.LayerLayout:
    """12 XLM-R layers; text+image embeddings = "embeddings"; pooler and task head = "head" (always trainable)."""
    n = (config or CONFIGS["base"])["num_layers"]
    return freeze.layout_from_rules(
        n, [("encoder.layer.", 0, 1)], [("embeddings.", "embeddings"), ("pooler.", "head"), ("head.", "head")]
    )


# ============================================================================ checkpoints
#
# Formats read (auto-detected):
#   volta     IGLUE's VOLTA files: pre-trained uc2_checkpoint_200000.bin, fine-tuned pytorch_model_*.bin
#             (plain state dicts, alias keys), pytorch_ckpt_latest.tar (wrapped, with a pickled tbLogger)
#   original  UC2's own model_step_200000.pt (VLXLMRForPretraining, fp16 or fp32), renamed exactly as
#             VOLTA's convert_uc2.py does, collision included (docs/reference_facts.md#F-uc2-convert)
#   xlmr      a Hugging Face xlm-roberta-base folder/file: text side only
#   ours      checkpoints written by this script (engine format, or a plain state dict of our names)

# VOLTA pre-training heads kept in uc2_checkpoint_200000.bin; no part of the task model.
VOLTA_PRETRAIN_HEADS = tuple(
    f"cls.{k}"
    for k in (
        "predictions.bias",
        "predictions.transform.dense.weight",
        "predictions.transform.dense.bias",
        "predictions.transform.LayerNorm.weight",
        "predictions.transform.LayerNorm.bias",
        "predictions.decoder.weight",
        "bi_seq_relationship.weight",
        "bi_seq_relationship.bias",
        "imagePredictions.transform.dense.weight",
        "imagePredictions.transform.dense.bias",
        "imagePredictions.transform.LayerNorm.weight",
        "imagePredictions.transform.LayerNorm.bias",
        "imagePredictions.decoder_dict.0.weight",
        "imagePredictions.decoder_dict.0.bias",
    )
)

_VOLTA_EMB = {
    "word_embeddings": "word_embeddings",
    "position_embeddings": "position_embeddings",
    "new_token_type_embeddings": "token_type_embeddings",
    "LayerNorm": "LayerNorm",
    "image_embeddings": "image_embeddings",
    "image_location_embeddings": "image_location_embeddings",
    "image_layer_norm": "image_layer_norm",
    "image_location_layer_norm": "image_location_layer_norm",
    "v_LayerNorm": "v_LayerNorm",
}
# VOLTA sublayer 2k (attention) / 2k+1 (FFN) -> our layer k; v_* twins are aliases of the text weights.
_VOLTA_ATTN = {
    "attention_self.query": "attention.self.query",
    "attention_self.key": "attention.self.key",
    "attention_self.value": "attention.self.value",
    "attention_output.dense": "attention.output.dense",
    "attention_output.LayerNorm": "attention.output.LayerNorm",
}
_VOLTA_FFN = {
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
    "output.LayerNorm": "output.LayerNorm",
}
_V_TWIN = re.compile(r"^(attention_self|attention_output|intermediate|output)\.v_(\w+)$")


def volta_key(key: str, task: str) -> tuple[str, str]:
    """Classify one VOLTA state-dict key: ("map", our_key) | ("alias", canonical VOLTA key) |
    ("drop", reason) | ("head", our_key) | ("unknown", "")."""
    if key in VOLTA_PRETRAIN_HEADS:
        return (
            "drop",
            "VOLTA pre-training head (MLM/ITM/region class); unused by the task model, as in VOLTA's from_pretrained",
        )
    if key == "bert.embeddings.image_token_type_embeddings.weight":
        return "alias", "bert.embeddings.new_token_type_embeddings.weight"
    m = re.match(r"^bert\.embeddings\.(\w+)\.(weight|bias)$", key)
    if m and m.group(1) in _VOLTA_EMB:
        return "map", f"embeddings.{_VOLTA_EMB[m.group(1)]}.{m.group(2)}"
    m = re.match(r"^bert\.t_pooler\.dense\.(weight|bias)$", key)
    if m:
        return "map", f"pooler.{m.group(1)}"
    m = re.match(r"^bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        sub, module, wb = int(m.group(1)), m.group(2), m.group(3)
        twin = _V_TWIN.match(module)
        if twin:
            return "alias", f"bert.encoder.layer.{sub}.{twin.group(1)}.{twin.group(2)}.{wb}"
        table = _VOLTA_ATTN if sub % 2 == 0 else _VOLTA_FFN
        if module in table:
            return "map", f"encoder.layer.{sub // 2}.{table[module]}.{wb}"
        return "unknown", ""
    m = re.match(r"^clfs_dict\.(\w+)\.(.+)$", key)
    if m:
        rest = m.group(2)
        if task == "xgqa":
            g = re.match(r"^logit_fc\.(\d)\.(weight|bias)$", rest)
            return ("head", f"head.{g.group(1)}.{g.group(2)}") if g else ("unknown", "")
        return ("head", f"head.{rest}") if rest in ("weight", "bias") else ("unknown", "")
    return "unknown", ""


def _original_to_volta(key: str) -> str:
    """UC2 original key -> the name VOLTA's convert_uc2.py gives it (its rename rules, in its order:
    docs/reference_facts.md#F-uc2-convert)."""
    for a, b in (
        ("roberta", "bert"),
        ("img_embeddings", "embeddings"),
        ("img_linear", "image_embeddings"),
        ("pos_linear", "image_location_embeddings"),
        ("img_layer_norm", "image_layer_norm"),
        ("pos_layer_norm", "image_location_layer_norm"),
        ("attention.self", "attention_self"),
        ("attention.output", "attention_output"),
    ):
        key = key.replace(a, b)
    if ".layer." in key:
        parts = key.split(".")
        n = int(parts[3])
        parts[3] = str(2 * n + int(".intermediate." in key or ".output." in key))
        key = ".".join(parts)
    for a, b in (
        ("pooler", "t_pooler"),
        ("cls.dense", "cls.predictions.transform.dense"),
        ("cls.layer_norm", "cls.predictions.transform.LayerNorm"),
        ("cls.bias", "cls.predictions.bias"),
        ("cls.decoder", "cls.predictions.decoder"),
        ("itm_output", "cls.bi_seq_relationship"),
    ):
        key = key.replace(a, b)
    return key


def detect_format(keys: list[str]) -> str:
    if any(k.startswith("bert.") for k in keys):
        return "volta"
    if any(k.startswith("roberta.img_embeddings.") for k in keys):
        return "original"
    if any(k.startswith("embeddings.image_embeddings.") for k in keys):
        return "ours"
    if any(k.startswith(("roberta.", "embeddings.word_embeddings.")) for k in keys):
        return "xlmr"
    raise ValueError(f"unrecognised checkpoint layout (first keys: {keys[:3]})")


def plan_load(
    source: dict[str, tuple], target: dict[str, tuple], task: str, fmt: str | None = None, name: str = ""
) -> engine.LoadPlan:
    """Plan loading a state dict with key->shape `source` (file order) into a model with `target`
    key->shape. Shapes are tuples; -1 entries (unknown sizes in manifests) only appear in dropped keys."""
    fmt = fmt or detect_format(list(source))
    if fmt == "ours":
        return engine.plan_same_names(source, target, fmt, name)
    plan = engine.LoadPlan(fmt, name)
    if fmt == "volta":
        _plan_volta(plan, source, task)
    elif fmt == "original":
        _plan_original(plan, source, task)
    elif fmt == "xlmr":
        _plan_xlmr(plan, source)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    head_from_file = any(dst.startswith("head.") for dst in plan.copy)
    return engine.finish_load_plan(
        plan, source, target, fresh=lambda key: _fresh_reason(fmt, key, head_from_file), fits={"row0": _row0_fits}
    )


def _fresh_reason(fmt: str, key: str, head_from_file: bool) -> str | None:
    """Why our `key`, which the released file lacks, keeps its VOLTA initialisation (None: it must not lack it)."""
    if not head_from_file and key.startswith("head."):
        return "task head, VOLTA init (N(0,0.02) weights, zero bias, LayerNorm 1/0)"
    if fmt == "xlmr" and key.startswith(("embeddings.image", "embeddings.v_LayerNorm")):
        return "image side: not in XLM-R, VOLTA init"
    if fmt == "xlmr" and key.startswith("pooler."):  # XLMRobertaForMaskedLM files have no pooler
        return "pooler: not in this XLM-R file, VOLTA init"
    return None


def _row0_fits(source: tuple, ours: tuple) -> bool:
    """XLM-R's token-type table (1 row) fits the first rows of ours (2)."""
    return len(source) == 2 and source[1] == ours[1] and source[0] <= ours[0]


def _copy_row0(ours: torch.Tensor, source: torch.Tensor) -> None:
    ours[: source.shape[0]].copy_(source)


def _plan_volta(plan: engine.LoadPlan, source: dict, task: str) -> None:
    heads = sorted({k.split(".")[1] for k in source if k.startswith("clfs_dict.")})
    if len(heads) > 1:
        plan.notes.append(f"file holds several task heads {heads}; using {VOLTA_TASK_KEY[task]}")
    for k in source:
        kind, val = volta_key(k, task)
        if kind == "head":
            key = k.split(".")[1]
            want = VOLTA_TASK_KEY[task] if len(heads) > 1 else heads[0]
            if key != want:
                plan.dropped.append((k, f"head of another task ({key}); this model is {task}"))
                continue
            if key != VOLTA_TASK_KEY[task]:
                plan.notes.append(f"task head {key} used for {task} (IGLUE's key is {VOLTA_TASK_KEY[task]})")
            kind = "map"
        if kind == "map":
            if val in plan.copy:
                plan.unexpected.append(k)  # two sources for one parameter: not a VOLTA UC2 file
            else:
                plan.copy[val] = (k, "full")
        elif kind == "alias":
            plan.aliases.append((k, val))
            if val not in source:
                plan.unexpected.append(k)
        elif kind == "drop":
            plan.dropped.append((k, val))
        else:
            plan.unexpected.append(k)
    plan.notes[:] = sorted(set(plan.notes))


def _plan_original(plan: engine.LoadPlan, source: dict, task: str) -> None:
    """UC2's model_step_200000.pt, mapped as VOLTA's convert_uc2.py maps it (then VOLTA -> ours).

    Faithful, not fixed: the converter renames both roberta.embeddings.LayerNorm.* (UC2's text
    embedding LN) and roberta.img_embeddings.LayerNorm.* (UC2's LN over the summed image embedding)
    to bert.embeddings.LayerNorm.*; the later key in the file (the image one) wins. So IGLUE's VOLTA
    UC2 normalises *text* embeddings with UC2's *image* LN, UC2's text LN is lost, and nothing feeds
    VOLTA's v_LayerNorm (the image-embedding LN), which keeps its construction values 1/0. We
    reproduce exactly that (embeddings.LayerNorm <- the later colliding key; embeddings.v_LayerNorm
    = 1/0) so that a model built from the original file equals one built from IGLUE's VOLTA file.
    """
    by_volta: dict[str, str] = {}
    for k in source:  # file order: a later key overwrites an earlier one, as in the converter
        v = _original_to_volta(k)
        if v in by_volta:
            plan.dropped.append(
                (
                    by_volta[v],
                    f"overwritten by {k}: both become {v} in VOLTA's convert_uc2.py "
                    f"and the later key wins (documented collision, kept as VOLTA has it)",
                )
            )
        by_volta[v] = k
    shown = set(by_volta.values())
    for k in source:
        if k not in shown:
            continue
        v = _original_to_volta(k)
        kind, val = volta_key(v, task)
        if kind == "map":
            plan.copy[val] = (k, "full")
        elif kind == "drop":
            plan.dropped.append((k, f"becomes {v}: {val}"))
        elif kind == "alias":  # cannot happen with UC2's names; keep the report honest if it does
            plan.unexpected.append(k)
        else:
            plan.dropped.append((k, f"becomes {v}, which VOLTA's model does not have (converter omits it)"))
    if "embeddings.v_LayerNorm.weight" not in plan.copy:
        for wb, val in (("weight", 1.0), ("bias", 0.0)):
            plan.constant[f"embeddings.v_LayerNorm.{wb}"] = val
            plan.initialised.append(
                (
                    f"embeddings.v_LayerNorm.{wb}",
                    f"no source: VOLTA's converter leaves it at construction value {val:g}",
                )
            )
    if any("roberta.img_embeddings.LayerNorm" in k for k in source):
        plan.notes.append(
            "embeddings.LayerNorm holds UC2's image-embedding LayerNorm (VOLTA converter name collision, "
            "reproduced on purpose); embeddings.v_LayerNorm is 1/0"
        )


def _plan_xlmr(plan: engine.LoadPlan, source: dict) -> None:
    """Hugging Face xlm-roberta-base (XLMRobertaModel or ...ForMaskedLM): text embeddings, layers, pooler."""
    for k in source:
        s = k[len("roberta.") :] if k.startswith("roberta.") else k
        if s.startswith("lm_head.") or s.endswith(("position_ids", "token_type_ids")):
            plan.dropped.append((k, "not part of UC2 (MLM head / buffer)"))
        elif s == "embeddings.token_type_embeddings.weight":
            # XLM-R has one token type; UC2 has two (row 1 = regions). Our choice (the paper is
            # silent): copy XLM-R's row into row 0, keep row 1 at VOLTA init.
            plan.copy["embeddings.token_type_embeddings.weight"] = (k, "row0")
            plan.initialised.append(("embeddings.token_type_embeddings.weight[1:]", "region token type: VOLTA init"))
        elif s.startswith("pooler.dense."):
            plan.copy["pooler." + s.split(".")[-1]] = (k, "full")
        elif s.startswith(("embeddings.", "encoder.layer.")):
            plan.copy[s] = (k, "full")
        else:
            plan.unexpected.append(k)


# ---- reading files


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in file order, extra) from any supported file or folder (HF folders: model.safetensors
    or pytorch_model.bin). extra holds our checkpoint metadata ("meta") when present."""
    if os.path.isdir(path):
        for fname in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, fname)):
                return read_checkpoint(os.path.join(path, fname))
        raise ValueError(f"{path}: folder has no model.safetensors or pytorch_model.bin")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: checkpoint file not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path)), {}
    try:
        obj = engine.read_torch_file(path)  # weights only; IGLUE's pickled tbLogger becomes an inert stand-in
    except engine.UnsafeCheckpointError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot read checkpoint: {e}") from None
    extra: dict = {}
    if isinstance(obj, dict) and "model_state_dict" in obj:  # VOLTA pytorch_ckpt_latest.tar
        extra = {k: v for k, v in obj.items() if k != "model_state_dict"}
        obj = obj["model_state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # ours (engine)
        extra = {k: v for k, v in obj.items() if k != "model"}
        obj = obj["model"]
        engine.check_checkpoint_model(extra.get("meta"), "uc2", path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: no state dict found (top-level keys: {list(obj)[:6] if isinstance(obj, dict) else type(obj)})"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj), extra


def load_into(model: UC2, path_or_sd: str | dict, fmt: str | None = None) -> engine.LoadPlan:
    """Load a checkpoint into `model` (in place); returns the plan (print plan.report()).
    Raises ValueError naming the first missing/unexpected/mis-shaped key."""
    if isinstance(path_or_sd, str):
        sd, _ = read_checkpoint(path_or_sd)
        name = path_or_sd
    else:
        sd, name = path_or_sd, ""
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = plan_load({k: tuple(v.shape) for k, v in sd.items()}, target, model.task, fmt, name)
    plan.raise_if_bad()
    for alias, of in plan.aliases:  # VOLTA files store aliases as one tensor; differing values = not a VOLTA file
        if not torch.equal(sd[alias], sd[of]):
            raise ValueError(f"{name or 'checkpoint'}: alias key {alias!r} differs from {of!r}")
    # original UC2 is fp16: the copy casts to fp32 as VOLTA's converter does
    engine.apply_load_plan(model, sd, plan, {"row0": _copy_row0})
    return plan


# ============================================================================ training


def iglue_no_decay(name: str) -> bool:
    """IGLUE/VOLTA's no-decay rule (VOLTA name contains "bias", "LayerNorm.bias" or "LayerNorm.weight"),
    on our names: unlike freeze.param_groups' ndim<=1 rule it DOES decay image_layer_norm.weight,
    image_location_layer_norm.weight and the GQA head's LayerNorm weight (head.2.weight). Used by --recipe iglue
    (NO_DECAY_RULES); the paper recipe keeps freeze.param_groups' ndim<=1 rule."""
    return name.endswith(".bias") or ".LayerNorm." in name or "v_LayerNorm." in name


NO_DECAY_RULES = {"paper": None, "iglue": lambda name, p: iglue_no_decay(name)}  # --recipe -> engine.train(no_decay=)


# The defaults that depend on --recipe and --task (every other default is in its add_argument, here or in
# engine.add_common_args). Paper, section 4 ("we follow IGLUE for training UC2"): epochs 5/10/10, lr 4e-5/2e-5/2e-5,
# batch 256/128/64 captions; AdamW, weight decay 0.01, 10% linear warm-up (engine's defaults). --recipe iglue: IGLUE's
# UC2 scripts/configs (docs/reference_facts.md#F-uc2-iglue-optim): AdamW eps 1e-6, wd 1e-4, clip 1.0, LR schedule
# length 20 epochs (optim_train_epochs); no-decay rule: iglue_no_decay (wired in main).
IGLUE_OPTIM = dict(weight_decay=1e-4, adam_eps=1e-6, clip_grad=1.0, schedule_epochs=20)
DEFAULTS = {
    ("paper", "xgqa"): dict(epochs=5, lr=4e-5, batch_size=256),
    ("paper", "xvnli"): dict(epochs=10, lr=2e-5, batch_size=128),
    ("paper", "xflickrco"): dict(epochs=10, lr=2e-5, batch_size=64),
    ("iglue", "xgqa"): dict(epochs=5, lr=4e-5, batch_size=256, **IGLUE_OPTIM),
    ("iglue", "xvnli"): dict(epochs=10, lr=2e-5, batch_size=128, **IGLUE_OPTIM),
    ("iglue", "xflickrco"): dict(epochs=10, lr=2e-5, batch_size=64, **IGLUE_OPTIM),
}


def build_parser() -> argparse.ArgumentParser:
    p = engine.ArgumentParser(description=__doc__)
    engine.add_common_args(p, DEFAULTS)
    u = p.add_argument_group("UC2 (train_uc2.py)")
    u.add_argument("--model-config", default="base", help="tiny | base | our config json | a VOLTA UC2 config json")
    u.add_argument(
        "--checkpoint",
        default=None,
        help="initial weights: IGLUE's VOLTA UC2 file (pre-trained or fine-tuned, .bin/.tar), UC2's original "
        "model_step_*.pt, an xlm-roberta-base folder (text side only), or a model_final.pt of ours",
    )
    u.add_argument(
        "--features",
        nargs="+",
        default=[],
        help="region-feature files: image-keyed LMDB/H5 (all are searched per image id); for xgqa a GQA "
        "serialized (per-question) LMDB is the training set",
    )
    u.add_argument("--max-regions", type=int, default=36, help="regions per image (IGLUE's UC2 runs: 36)")
    u.add_argument(
        "--hard-negatives",
        default=None,
        help="xflickrco: VOLTA's hard_negative.pkl for the 4th pair (default: <datasets>/flickr30k/hard_negative.pkl "
        "if present; without it the 4th pair uses a random image, with a warning)",
    )
    u.add_argument(
        "--retrieval-negatives",
        choices=data.RETRIEVAL_NEGATIVES,
        default="volta",
        help="xflickrco: volta = VOLTA's RetrievalDataset exactly, as IGLUE's UC2 runs (both negative "
        "captions are among the file's first 5, a VOLTA bug); corrected = captions of the drawn "
        "random / hard-pool images, never the positive's own image",
    )
    u.add_argument(
        "--retrieval-loss",
        choices=("triplet", "ce"),
        default="triplet",
        help="xflickrco: triplet on sigmoid scores, margin 0.2 (IGLUE's UC2 runs) or VOLTA's task-config cross-entropy",
    )
    u.add_argument("--tokenizer", default="xlm-roberta-base", help="XLM-R tokenizer folder or cached hub id")
    u.add_argument(
        "--eval-batch-size", type=int, default=128, help="examples (retrieval: caption-image pairs) per eval forward"
    )
    u.add_argument("--no-eval", action="store_true", help="skip the per-epoch evaluation")
    return p


class FeatureSet:
    """Several image-keyed readers (data.open_features) searched in order, e.g. Flickr30k train +
    xFlickr&CO test features. The per-image reader methods (get, kept_regions, regions) go to the reader
    holding the key."""

    def __init__(self, paths: list[str]):
        self.readers = [data.open_features(p) for p in paths]
        self.path = ", ".join(paths)
        for r in self.readers:  # open each now: an unreadable file is an error here, not in the first batch
            data.feature_keys(r)

    def keys(self) -> set[str]:
        return set().union(*(r.keys() for r in self.readers))

    def __contains__(self, key) -> bool:
        return any(key in r for r in self.readers)

    def _reader_for(self, key):
        for r in self.readers:
            if key in r:
                return r
        raise KeyError(key)

    def get(self, key, max_rows: int | None = None) -> tuple:  # (features, boxes, img_w, img_h)
        return self._reader_for(key).get(key, max_rows)

    def kept_regions(self, key, max_regions: int) -> tuple:  # (features, locations)
        return self._reader_for(key).kept_regions(key, max_regions)

    def regions(self, key, max_regions: int) -> dict[str, torch.Tensor]:
        return self._reader_for(key).regions(key, max_regions)


def split_features(paths: list[str]) -> tuple[list[str], list[str]]:
    """--features: (serialized GQA LMDBs, image-keyed files); a missing path is a one-line error."""
    for p in paths:
        if not os.path.exists(p):
            raise SystemExit(f"error: --features {p} does not exist")
    serialized = [p for p in paths if data.is_serialized_lmdb(p)]
    return serialized, [p for p in paths if p not in serialized]


def open_feature_files(paths: list[str]) -> tuple[FeatureSet | None, list[str]]:
    """--features: the image-keyed files as one FeatureSet (None: there are none) and the serialized GQA LMDBs."""
    with engine.about("--features"):  # unreadable / truncated LMDB or H5
        serialized, keyed = split_features(paths)
        return (FeatureSet(keyed) if keyed else None), serialized


def find_hard_negatives(args) -> str | None:
    """xflickrco training: --hard-negatives, else VOLTA's place for it, <datasets>/flickr30k/hard_negative.pkl
    (VOLTA reads it for every retrieval training run; IGLUE's UC2 numbers used it). None: not found."""
    if args.hard_negatives or args.task != "xflickrco":
        return args.hard_negatives
    try:
        found = data.dataset_dir(args.data_root) / "flickr30k" / "hard_negative.pkl"
    except ValueError:
        return None
    return str(found) if found.is_file() else None


def build_train_dataset(args, features: FeatureSet | None, serialized: list[str]):
    if args.task == "xgqa" and serialized:
        if len(serialized) > 1:
            raise SystemExit(f"error: several serialized GQA LMDBs given ({serialized}); give the training one")
        return data.REGION_FEATURES.dataset("xgqa", None, features=serialized[0], max_regions=args.max_regions)
    if features is None:
        raise SystemExit("error: --features is required (image-keyed region-feature LMDB/H5)")
    # IGLUE's training split (engine's --train-split default "train"): GQA train (LXMERT json) or its serialized
    # LMDB, XVNLI en/train.jsonl, Flickr30k train_ann.jsonl
    examples = data.load_split(args.data_root, args.task, args.train_split, args.train_lang)
    return data.REGION_FEATURES.dataset(
        args.task,
        examples,
        features=features,
        train=True,
        max_regions=args.max_regions,
        seed=args.seed,
        hard_negatives=args.hard_negatives,
        negatives=args.retrieval_negatives,
    )


def checked_train_dataset(args, features: FeatureSet | None, serialized: list[str]):
    """build_train_dataset with its examples' region features checked now, before training, not mid-epoch."""
    with engine.about("training data"):
        train_ds = build_train_dataset(args, features, serialized)
        if isinstance(train_ds, data.UC2Dataset):
            data.check_inputs(train_ds.examples, features=features, sample=data.VERIFY_SAMPLE)
        return train_ds


def load_checkpoint_arg(model: UC2, path: str) -> tuple[engine.LoadPlan, dict]:
    """--checkpoint into `model`: (the plan, the file's extra). A bad plan's key-by-key report follows the
    error's first line (engine.exits_on_bad_input prints it above the error)."""
    with engine.about("--checkpoint", path):
        state, extra = read_checkpoint(path)
        plan = load_into(model, state)
    plan.source = path
    return plan, extra


def model_config_from_args(args) -> dict:
    config = resolve_config(args.model_config)
    # data.py reads IGLUE's region files: 2048-d features, 7 location values (VOLTA's datasets pad to 2048 too)
    for key, have in (("v_feature_size", data.FEATURE_DIM), ("num_locs", 7)):
        if config[key] != have:
            raise SystemExit(
                f"error: --model-config {args.model_config}: {key} = {config[key]}, but the region "
                f"features this script reads have {have}"
            )
    engine.check_heads(config, [("hidden_size", "num_heads")], args.model_config)
    config["retrieval_loss"] = args.retrieval_loss
    if args.dropout is not None:
        config.update(hidden_dropout=args.dropout, attention_dropout=args.dropout, classifier_dropout=args.dropout)
    return config


@engine.exits_on_bad_input
def main(
    argv: list[str] | None = None, *, dist: engine.DistInfo | None = None, on_evaluated: Callable | None = None
) -> None:
    """train_uc2.py's command line (argv: its arguments). dist: a process group the caller set up and ends itself
    (eval_zeroshot fewshot runs several trainings and an evaluation in one); on_evaluated: engine.train's hook."""
    args = engine.parse_args(build_parser(), argv, DEFAULTS, "uc2")
    config = model_config_from_args(args)
    layout = layer_layout(args.task, config)
    schedule = freeze.schedule_from_args(args, layout.num_layers)

    if args.print_schedule:

        def count_train() -> int:
            return len(build_train_dataset(args, *open_feature_files(args.features)))

        return engine.print_schedule_only(
            build_model, config, layout, schedule, args, count_train, "--data-root/--features"
        )

    owns_group = dist is None
    dist = engine.setup_distributed() if owns_group else dist
    try:
        run_dir = engine.check_run_dir(args, dist)
        if not args.data_root:
            raise SystemExit("error: --data-root is required (folder holding IGLUE's datasets/)")
        features, serialized = open_feature_files(args.features)
        tokenizer = engine.load_tokenizer(args, config["vocab_size"])

        engine.seed_everything(args.seed)  # identical initial weights on every rank
        model = build_model(args.task, config)
        if args.checkpoint and not engine.resuming(args, run_dir):  # a run killed before epoch 1 ended starts anew
            plan, extra = load_checkpoint_arg(model, args.checkpoint)
            engine.check_tokenizer_vocab(
                tokenizer,
                config["vocab_size"],
                args.tokenizer,
                args.checkpoint,
                extra.get("meta", {}) if plan.fmt == "ours" else None,
            )  # None: released weights
            if dist.is_main:
                print(plan.report(), flush=True)
                (run_dir / "load_report.txt").write_text(plan.report(verbose=True) + "\n")
        elif not args.checkpoint and dist.is_main:
            print("warning: no --checkpoint: training from random initialisation", file=sys.stderr, flush=True)

        if args.task == "xflickrco":
            args.hard_negatives = find_hard_negatives(args)  # recorded in args.json
            if args.hard_negatives is None and dist.is_main:
                print(
                    "warning: no hard_negative.pkl (give --hard-negatives, or put it in <datasets>/flickr30k/): "
                    "the 4th pair of each caption uses a random other image, not VOLTA's hard negatives",
                    file=sys.stderr,
                    flush=True,
                )
        train_ds = checked_train_dataset(args, features, serialized)
        loader = engine.build_train_loader(
            train_ds, args, dist, data.UC2Collate(args.task, tokenizer, train=True, num_answers=config["num_answers"])
        )
        evaluate_fn = None
        if not args.no_eval:
            if features is None:
                raise SystemExit(
                    "error: evaluation needs image-keyed --features for the test images (or pass --no-eval)"
                )
            with engine.about("evaluation data"):
                evaluate_fn = engine.trainer_evaluate_fn(
                    "uc2",
                    args,
                    tokenizer,
                    dist,
                    features=features,
                    max_regions=args.max_regions,
                    pair_batch=args.eval_batch_size,
                )
        meta = {**engine.base_meta("uc2", args, config, tokenizer), "max_regions": args.max_regions}
        engine.train(
            args,
            model,
            layout,
            schedule,
            loader,
            evaluate_fn,
            meta,
            dist,
            no_decay=NO_DECAY_RULES[args.recipe],
            on_evaluated=on_evaluated,
            run_dir=run_dir,
        )
    finally:
        engine.cleanup_distributed(end_group=owns_group)


if __name__ == "__main__":
    engine.run_main(main)
