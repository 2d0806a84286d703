"""UC2 fine-tuning on xGQA / XVNLI / xFlickr&CO with scheduled unfreezing (SUF) and friends.

The model is UC2 exactly as IGLUE ran it through VOLTA (config `uc2_base`): a single-stream
XLM-R-base encoder over [text tokens ; projected region features], a ReLU pooler on the first text
token, and VOLTA's task heads and losses. Facts: tests/fixtures/uc2/README.md and
../shared/reference/uc2/README.md (sections 2, 3, 5, 7).

  python train_uc2.py --task xgqa --policy suf --data-root DATA --features FEATS \
      --checkpoint uc2_checkpoint_200000.bin --tokenizer xlm-roberta-base --output-dir runs/uc2-xgqa-suf
  python train_uc2.py --task xgqa --policy suf --model-config base --print-schedule
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.xlm_roberta.configuration_xlm_roberta import XLMRobertaConfig
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer

import data
import engine
import freeze

TASKS = ("xgqa", "xvnli", "xflickrco")
# VOLTA task keys of IGLUE's task configs (GQA, XVNLI, Flickr30k retrieval).
VOLTA_TASK_KEY = {"xgqa": "TASK15", "xvnli": "TASK19", "xflickrco": "TASK8"}

CONFIGS: dict[str, dict] = {
    # config/uc2_base.json of VOLTA (IGLUE's UC2).
    "base": dict(vocab_size=250002, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                 max_position_embeddings=514, type_vocab_size=2, pad_token_id=1, layer_norm_eps=1e-5,
                 v_feature_size=2048, num_locs=7, pooler_size=768, clf_hidden_size=768, num_answers=1842,
                 hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.1, initializer_range=0.02,
                 attn_implementation="sdpa", retrieval_loss="triplet"),
    # CPU-seconds size for tests/demo. Still 12 layers so every schedule is the paper's; region
    # features stay 2048-d so real and synthetic feature files fit unchanged.
    "tiny": dict(vocab_size=4096, hidden_size=32, num_layers=12, num_heads=2, intermediate_size=64,
                 max_position_embeddings=514, type_vocab_size=2, pad_token_id=1, layer_norm_eps=1e-5,
                 v_feature_size=2048, num_locs=7, pooler_size=32, clf_hidden_size=32, num_answers=1842,
                 hidden_dropout=0.1, attention_dropout=0.1, classifier_dropout=0.1, initializer_range=0.02,
                 attn_implementation="sdpa", retrieval_loss="triplet"),
}


def config_from_volta(volta: dict, **overrides) -> dict:
    """Our config dict from a VOLTA BertConfig json (e.g. config/uc2_base.json, parity_a/volta_config.json)."""
    sublayers = volta.get("bert_layer2attn_sublayer") or {str(i): s for i, s in enumerate(volta["tt_attn_sublayers"])}
    if volta.get("fusion_method", "text") != "text" or volta.get("image_embeddings", "uc2") != "uc2":
        raise ValueError("VOLTA config is not a UC2 config (need fusion_method 'text', image_embeddings 'uc2')")
    cfg = dict(CONFIGS["base"])
    cfg.update(vocab_size=volta["vocab_size"], hidden_size=volta["hidden_size"], num_layers=len(sublayers),
               num_heads=volta["num_attention_heads"], intermediate_size=volta["intermediate_size"],
               max_position_embeddings=volta["max_position_embeddings"], type_vocab_size=volta["type_vocab_size"],
               pad_token_id=volta.get("pad_token_id", 1), layer_norm_eps=volta["layer_norm_eps"],
               v_feature_size=volta["v_feature_size"], num_locs=volta["num_locs"], pooler_size=volta["pooler_size"],
               clf_hidden_size=volta["clf_hidden_size"], hidden_dropout=volta["hidden_dropout_prob"],
               attention_dropout=volta["attention_probs_dropout_prob"],
               initializer_range=volta.get("initializer_range", 0.02))
    cfg.update(overrides)
    return cfg


def resolve_config(name_or_path: str) -> dict:
    """'tiny' | 'base' | path to our config json or to a VOLTA UC2 config json."""
    if name_or_path in CONFIGS:
        return dict(CONFIGS[name_or_path])
    if not os.path.isfile(name_or_path):
        raise SystemExit(f"error: --model-config {name_or_path!r} is neither one of {sorted(CONFIGS)} nor a file")
    with open(name_or_path) as f:
        d = json.load(f)
    if "tt_attn_sublayers" in d or "bert_layer2attn_sublayer" in d:
        return config_from_volta(d)
    unknown = sorted(set(d) - set(CONFIGS["base"]))
    if unknown:
        raise SystemExit(f"error: {name_or_path}: unknown config key(s) {unknown}")
    return {**CONFIGS["base"], **d}


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
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(torch.zeros_like(input_ids))  # IGLUE's segment ids are all 0
        text = self.dropout(self.LayerNorm(text))
        region_type = self.token_type_embeddings.weight[1]
        image = self.image_layer_norm(self.image_embeddings(features)) \
            + self.image_location_layer_norm(self.image_location_embeddings(spatials)) + region_type
        image = self.v_dropout(self.v_LayerNorm(image))
        return text, image


def _xlmr_layer_config(c: dict) -> XLMRobertaConfig:
    xc = XLMRobertaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_layers"],
                          num_attention_heads=c["num_heads"], intermediate_size=c["intermediate_size"],
                          hidden_act="gelu", hidden_dropout_prob=c["hidden_dropout"],
                          attention_probs_dropout_prob=c["attention_dropout"], layer_norm_eps=c["layer_norm_eps"])
    xc._attn_implementation = c.get("attn_implementation", "sdpa")
    return xc


class UC2Encoder(nn.Module):
    """VOLTA's UC2 encoder = standard post-LN BERT layers over [text ; regions] (all weights shared
    between modalities), so each of its attention/FFN sublayer pairs is one XLM-R layer."""

    def __init__(self, c: dict):
        super().__init__()
        xc = _xlmr_layer_config(c)
        self.layer = nn.ModuleList([XLMRobertaLayer(xc, layer_idx=i) for i in range(c["num_layers"])])

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
        return nn.Sequential(nn.Linear(p, c["clf_hidden_size"]), nn.GELU(),
                             nn.LayerNorm(c["clf_hidden_size"], eps=c["layer_norm_eps"]),
                             nn.Linear(c["clf_hidden_size"], c["num_answers"]))
    if task == "xvnli":  # "VL-tri-classifier"
        return nn.Linear(p, 3)
    if task == "xflickrco":  # "VL-logit"
        return nn.Linear(p, 1)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def triplet_loss(scores: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """IGLUE's UC2 retrieval loss: hinge on sigmoid scores, positive in column 0, mean over negatives and batch."""
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
        pooled = F.relu(self.pooler(hidden[:, 0]))  # VOLTA fusion_act relu (original UC2: tanh)
        if trace is not None:
            n = text.shape[1]
            trace.update(embedding_t=text, embedding_v=image, pooled_output_t=pooled,
                         sublayer_outputs_t=[s[:, :n] for s in subs], sublayer_outputs_v=[s[:, n:] for s in subs])
        return pooled

    def forward(self, input_ids, attention_mask, features, spatials, image_mask, trace: dict | None = None):
        """Head output for N pairs: [N,1842] (xgqa), [N,3] (xvnli), [N,1] (xflickrco)."""
        return self.head(self.dropout(self.encode(input_ids, attention_mask, features, spatials, image_mask, trace)))

    @staticmethod
    def _flat(batch: dict) -> list[torch.Tensor]:
        """The 5 input tensors with leading batch dims ([B] or VOLTA's grouped [B,4]) flattened."""
        lead = batch["input_ids"].dim() - 1
        return [batch[k].flatten(0, lead - 1) for k in ("input_ids", "attention_mask", "features", "spatials", "image_mask")]

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
            raise ValueError(f"xflickrco training batch must be grouped [B,4,...], got input_ids {tuple(batch['input_ids'].shape)}")
        return retrieval_loss(scores, self.config.get("retrieval_loss", "triplet"))

    def predict(self, batch: dict) -> torch.Tensor:
        if self.task == "xflickrco":
            raise ValueError("predict() is for xgqa/xvnli; retrieval uses pair_scores()")
        return self._run(batch).argmax(-1)

    def cls_features(self, batch: dict) -> torch.Tensor:
        """Pooled output (VOLTA's pooled_output_t, before dropout): the classifier's input."""
        return self.encode(*self._flat(batch))

    def pair_scores(self, batch: dict) -> torch.Tensor:
        """Raw VL-logit per (caption, image) pair: [N] for flat inputs, [B,4] for grouped ones."""
        if self.task != "xflickrco":
            raise ValueError(f"pair_scores() needs the xflickrco model, this one is {self.task}")
        return self._run(batch).view(batch["input_ids"].shape[:-1])


def retrieval_loss(scores: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "triplet":
        return triplet_loss(scores)
    if kind == "ce":  # the VOLTA task config's CrossEntropyLoss, target = slot 0
        return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))
    raise ValueError(f"unknown retrieval loss {kind!r} (triplet|ce)")


def build_model(task: str, config: dict) -> UC2:
    return UC2(task, config)


def LAYOUT(task: str, config: dict | None = None) -> freeze.LayerLayout:
    """12 XLM-R layers; text+image embeddings = "embeddings"; pooler and task head = "head" (always trainable)."""
    n = (config or CONFIGS["base"])["num_layers"]
    return freeze.layout_from_rules(n, [("encoder.layer.", 0, 1)],
                                    [("embeddings.", "embeddings"), ("pooler.", "head"), ("head.", "head")])


# ============================================================================ checkpoints
#
# Formats read (auto-detected):
#   volta     IGLUE's VOLTA files: pre-trained uc2_checkpoint_200000.bin, fine-tuned pytorch_model_*.bin
#             (plain state dicts, alias keys), pytorch_ckpt_latest.tar (wrapped, with a pickled tbLogger)
#   original  UC2's own model_step_200000.pt (VLXLMRForPretraining, fp16 or fp32), renamed exactly as
#             VOLTA's conversions/convert_uc2.py does, collision included (see _original_to_volta)
#   xlmr      a Hugging Face xlm-roberta-base folder/file: text side only
#   ours      checkpoints written by this script (engine format, or a plain state dict of our names)

# VOLTA pre-training heads kept in uc2_checkpoint_200000.bin; no part of the task model.
VOLTA_PRETRAIN_HEADS = tuple(f"cls.{k}" for k in (
    "predictions.bias", "predictions.transform.dense.weight", "predictions.transform.dense.bias",
    "predictions.transform.LayerNorm.weight", "predictions.transform.LayerNorm.bias", "predictions.decoder.weight",
    "bi_seq_relationship.weight", "bi_seq_relationship.bias", "imagePredictions.transform.dense.weight",
    "imagePredictions.transform.dense.bias", "imagePredictions.transform.LayerNorm.weight",
    "imagePredictions.transform.LayerNorm.bias", "imagePredictions.decoder_dict.0.weight",
    "imagePredictions.decoder_dict.0.bias"))

_VOLTA_EMB = {"word_embeddings": "word_embeddings", "position_embeddings": "position_embeddings",
              "new_token_type_embeddings": "token_type_embeddings", "LayerNorm": "LayerNorm",
              "image_embeddings": "image_embeddings", "image_location_embeddings": "image_location_embeddings",
              "image_layer_norm": "image_layer_norm", "image_location_layer_norm": "image_location_layer_norm",
              "v_LayerNorm": "v_LayerNorm"}
# VOLTA sublayer 2k (attention) / 2k+1 (FFN) -> our layer k; v_* twins are aliases of the text weights.
_VOLTA_ATTN = {"attention_self.query": "attention.self.query", "attention_self.key": "attention.self.key",
               "attention_self.value": "attention.self.value", "attention_output.dense": "attention.output.dense",
               "attention_output.LayerNorm": "attention.output.LayerNorm"}
_VOLTA_FFN = {"intermediate.dense": "intermediate.dense", "output.dense": "output.dense",
              "output.LayerNorm": "output.LayerNorm"}
_V_TWIN = re.compile(r"^(attention_self|attention_output|intermediate|output)\.v_(\w+)$")


def volta_key(key: str, task: str) -> tuple[str, str]:
    """Classify one VOLTA state-dict key: ("map", our_key) | ("alias", canonical VOLTA key) |
    ("drop", reason) | ("head", our_key) | ("unknown", "")."""
    if key in VOLTA_PRETRAIN_HEADS:
        return "drop", "VOLTA pre-training head (MLM/ITM/region class); unused by the task model, as in VOLTA's from_pretrained"
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
    """UC2 original key -> the name VOLTA's convert_uc2.py gives it (its rename rules, in its order)."""
    for a, b in (("roberta", "bert"), ("img_embeddings", "embeddings"), ("img_linear", "image_embeddings"),
                 ("pos_linear", "image_location_embeddings"), ("img_layer_norm", "image_layer_norm"),
                 ("pos_layer_norm", "image_location_layer_norm"), ("attention.self", "attention_self"),
                 ("attention.output", "attention_output")):
        key = key.replace(a, b)
    if ".layer." in key:
        parts = key.split(".")
        n = int(parts[3])
        parts[3] = str(2 * n + int(".intermediate." in key or ".output." in key))
        key = ".".join(parts)
    for a, b in (("pooler", "t_pooler"), ("cls.dense", "cls.predictions.transform.dense"),
                 ("cls.layer_norm", "cls.predictions.transform.LayerNorm"), ("cls.bias", "cls.predictions.bias"),
                 ("cls.decoder", "cls.predictions.decoder"), ("itm_output", "cls.bi_seq_relationship")):
        key = key.replace(a, b)
    return key


@dataclass
class LoadPlan:
    """Where every source key goes. `copy`: our key -> (source key, how); how = "full" or "row0"
    (XLM-R's 1-row token-type table into row 0 of ours)."""
    fmt: str
    source: str = ""
    copy: dict[str, tuple[str, str]] = field(default_factory=dict)
    aliases: list[tuple[str, str]] = field(default_factory=list)      # (source key, key it duplicates)
    dropped: list[tuple[str, str]] = field(default_factory=list)      # (source key, reason)
    initialised: list[tuple[str, str]] = field(default_factory=list)  # (our key, how/why)
    constant: dict[str, float] = field(default_factory=dict)          # our key -> fill value
    missing: list[str] = field(default_factory=list)                  # our keys with no source: error
    unexpected: list[str] = field(default_factory=list)               # source keys we cannot place: error
    mismatched: list[str] = field(default_factory=list)               # shape errors, readable
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def report(self, verbose: bool = False) -> str:
        lines = [f"checkpoint {self.source or '(in memory)'}: format {self.fmt}; {len(self.copy)} parameters loaded, "
                 f"{len(self.aliases)} alias keys, {len(self.dropped)} dropped, {len(self.initialised)} initialised fresh, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches"]
        lines += [f"  note: {n}" for n in self.notes]
        if verbose:
            lines += [f"  loaded   {dst} <- {src}{'' if how == 'full' else ' [' + how + ']'}" for dst, (src, how) in self.copy.items()]
            lines += [f"  alias    {src} (same tensor as {of})" for src, of in self.aliases]
        lines += [f"  dropped  {k}: {why}" for k, why in self.dropped]
        lines += [f"  init     {k}: {why}" for k, why in self.initialised]
        lines += [f"  MISSING  {k}" for k in self.missing]
        lines += [f"  UNEXPECTED {k}" for k in self.unexpected]
        lines += [f"  SHAPE    {m}" for m in self.mismatched]
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        if not self.ok:
            first = (self.missing and f"missing key {self.missing[0]!r}") or \
                    (self.unexpected and f"unexpected key {self.unexpected[0]!r}") or self.mismatched[0]
            raise ValueError(f"{self.source or 'checkpoint'} ({self.fmt}): {first} "
                             f"({len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                             f"{len(self.mismatched)} shape mismatches)\n{self.report()}")


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


def plan_load(source: dict[str, tuple], target: dict[str, tuple], task: str, fmt: str | None = None,
              name: str = "") -> LoadPlan:
    """Plan loading a state dict with key->shape `source` (file order) into a model with `target`
    key->shape. Shapes are tuples; -1 entries (unknown sizes in manifests) only appear in dropped keys."""
    fmt = fmt or detect_format(list(source))
    plan = LoadPlan(fmt, name)
    if fmt == "ours":
        for k in source:
            (plan.copy.__setitem__(k, (k, "full")) if k in target else plan.unexpected.append(k))
    elif fmt == "volta":
        _plan_volta(plan, source, task)
    elif fmt == "original":
        _plan_original(plan, source, task)
    elif fmt == "xlmr":
        _plan_xlmr(plan, source)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    # fresh-init bookkeeping and completeness
    placed = set(plan.copy) | set(plan.constant)
    head_from_file = any(dst.startswith("head.") for dst in plan.copy)
    for k in target:
        if k in placed:
            continue
        if fmt in ("volta", "original", "xlmr") and not head_from_file and k.startswith("head."):
            plan.initialised.append((k, "task head, VOLTA init (N(0,0.02) weights, zero bias, LayerNorm 1/0)"))
        elif fmt == "xlmr" and k.startswith(("embeddings.image", "embeddings.v_LayerNorm")):
            plan.initialised.append((k, "image side: not in XLM-R, VOLTA init"))
        elif fmt == "xlmr" and k.startswith("pooler."):  # XLMRobertaForMaskedLM files have no pooler
            plan.initialised.append((k, "pooler: not in this XLM-R file, VOLTA init"))
        else:
            plan.missing.append(k)
    for dst, (src, how) in plan.copy.items():
        if dst not in target:
            plan.unexpected.append(src)
            continue
        s, t = tuple(source[src]), tuple(target[dst])
        ok = s == t if how == "full" else (len(s) == 2 and s[1] == t[1] and s[0] <= t[0])
        if not ok:
            plan.mismatched.append(f"{src} {list(s)} -> {dst} {list(t)}")
    plan.copy = {d: v for d, v in plan.copy.items() if d in target}
    return plan


def _plan_volta(plan: LoadPlan, source: dict, task: str) -> None:
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


def _plan_original(plan: LoadPlan, source: dict, task: str) -> None:
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
            plan.dropped.append((by_volta[v], f"overwritten by {k}: both become {v} in VOLTA's convert_uc2.py "
                                              f"and the later key wins (documented collision, kept as VOLTA has it)"))
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
            plan.initialised.append((f"embeddings.v_LayerNorm.{wb}",
                                     f"no source: VOLTA's converter leaves it at construction value {val:g}"))
    if any("roberta.img_embeddings.LayerNorm" in k for k in source):
        plan.notes.append("embeddings.LayerNorm holds UC2's image-embedding LayerNorm (VOLTA converter name collision, "
                          "reproduced on purpose); embeddings.v_LayerNorm is 1/0")


def _plan_xlmr(plan: LoadPlan, source: dict) -> None:
    """Hugging Face xlm-roberta-base (XLMRobertaModel or ...ForMaskedLM): text embeddings, layers, pooler."""
    for k in source:
        s = k[len("roberta."):] if k.startswith("roberta.") else k
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

class _Stub:
    """Stand-in for a class that is not importable here (e.g. volta.train_utils.tbLogger)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


# Globals a checkpoint may need besides torch's own tensor/storage rebuild functions.
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                 ("builtins", "slice"), ("builtins", "complex"), ("numpy.core.multiarray", "scalar"),
                 ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                 ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("torch", "Size"),
                 ("torch", "device"), ("torch", "float16"), ("torch", "float32"), ("torch", "bfloat16")}


class _StubbingUnpickler(pickle.Unpickler):
    """Loads tensors and plain data; every other class (VOLTA's tbLogger, ...) becomes a harmless stub,
    so IGLUE's pytorch_ckpt_latest.tar opens without VOLTA installed and runs no foreign code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS or (module == "torch._utils" and name.startswith("_rebuild_")) \
                or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": "stub." + module})


class _StubbingPickleModule:
    Unpickler = _StubbingUnpickler
    load = staticmethod(lambda f, **kw: _StubbingUnpickler(f, **kw).load())


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
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a pickled foreign object (IGLUE's tbLogger): stub it, keep tensors
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_StubbingPickleModule)
        except Exception as e:
            raise ValueError(f"{path}: cannot read checkpoint: {e}") from None
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
        raise ValueError(f"{path}: no state dict found (top-level keys: {list(obj)[:6] if isinstance(obj, dict) else type(obj)})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj), extra


def load_into(model: UC2, path_or_sd: str | dict, fmt: str | None = None) -> LoadPlan:
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
    params = dict(model.state_dict())
    with torch.no_grad():
        for dst, (src, how) in plan.copy.items():
            t = sd[src].to(torch.float32)  # original UC2 is fp16: cast to fp32 as VOLTA's converter does
            if how == "row0":
                params[dst][: t.shape[0]].copy_(t)
            else:
                params[dst].copy_(t)
        for dst, val in plan.constant.items():
            params[dst].fill_(val)
    return plan


# ============================================================================ training

# Paper, section 4 ("we follow IGLUE for training UC2"): epochs 5/10/10, lr 4e-5/2e-5/2e-5, batch
# 256/128/64 captions; AdamW, weight decay 0.01, 10% linear warm-up (engine defaults).
DEFAULTS = {
    "model": "uc2",
    "xgqa": {"epochs": 5, "lr": 4e-5, "batch_size": 256},
    "xvnli": {"epochs": 10, "lr": 2e-5, "batch_size": 128},
    "xflickrco": {"epochs": 10, "lr": 2e-5, "batch_size": 64},
    # IGLUE's UC2 scripts/configs (VOLTA train_task.py): AdamW eps 1e-6, weight decay 1e-4, clip 1.0,
    # LR schedule length 20 epochs (optim_train_epochs); no-decay rule: iglue_no_decay (wired in main).
    "recipes": {"iglue": {"weight_decay": 1e-4, "adam_eps": 1e-6, "clip_grad": 1.0, "schedule_epochs": 20}},
}


def iglue_no_decay(name: str) -> bool:
    """IGLUE/VOLTA's no-decay rule (VOLTA name contains "bias", "LayerNorm.bias" or "LayerNorm.weight"),
    on our names: unlike freeze.param_groups' ndim<=1 rule it DOES decay image_layer_norm.weight,
    image_location_layer_norm.weight and the GQA head's LayerNorm weight (head.2.weight). Used by --recipe iglue
    (NO_DECAY_RULES); the paper recipe keeps freeze.param_groups' ndim<=1 rule."""
    return name.endswith(".bias") or ".LayerNorm." in name or "v_LayerNorm." in name


NO_DECAY_RULES = {"paper": None, "iglue": lambda name, p: iglue_no_decay(name)}  # --recipe -> engine.train(no_decay=)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_common_args(p, DEFAULTS)
    u = p.add_argument_group("UC2 (train_uc2.py)")
    u.add_argument("--model-config", default="base", help="tiny | base | our config json | a VOLTA UC2 config json")
    u.add_argument("--checkpoint", default=None,
                   help="initial weights: IGLUE's VOLTA UC2 file (pre-trained or fine-tuned, .bin/.tar), UC2's original "
                        "model_step_*.pt, an xlm-roberta-base folder (text side only), or a model_final.pt of ours")
    u.add_argument("--features", nargs="+", default=[],
                   help="region-feature files: image-keyed LMDB/H5 (all are searched per image id); for xgqa a GQA "
                        "serialized (per-question) LMDB is the training set")
    u.add_argument("--max-regions", type=int, default=36, help="regions per image (IGLUE's UC2 runs: 36)")
    u.add_argument("--hard-negatives", default=None,
                   help="xflickrco: VOLTA's hard_negative.pkl for the 4th pair (default: <datasets>/flickr30k/hard_negative.pkl "
                        "if present; without it the 4th pair uses a random image, with a warning)")
    u.add_argument("--retrieval-loss", choices=("triplet", "ce"), default="triplet",
                   help="xflickrco: triplet on sigmoid scores, margin 0.2 (IGLUE's UC2 runs) or VOLTA's task-config cross-entropy")
    u.add_argument("--tokenizer", default="xlm-roberta-base", help="XLM-R tokenizer folder or cached hub id")
    u.add_argument("--eval-batch-size", type=int, default=128, help="examples (retrieval: caption-image pairs) per eval forward")
    u.add_argument("--no-eval", action="store_true", help="skip the per-epoch evaluation")
    return p


class FeatureSet:
    """Several image-keyed readers (data.open_features) searched in order, e.g. Flickr30k train +
    xFlickr&CO test features. Per-image reader methods (regions, get, ...) go to the reader holding the key."""

    def __init__(self, paths: list[str]):
        self.readers = [data.open_features(p) for p in paths]
        self.path = ", ".join(paths)
        for r in self.readers:  # open each now: an unreadable file is an error here, not in the first batch
            r.keys()

    def keys(self) -> set[str]:
        return set().union(*(r.keys() for r in self.readers))

    def __contains__(self, key) -> bool:
        return any(key in r for r in self.readers)

    def _reader_for(self, key):
        for r in self.readers:
            if key in r:
                return r
        raise KeyError(key)

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("readers", "path"):
            raise AttributeError(name)
        return lambda key, *a, **kw: getattr(self._reader_for(key), name)(key, *a, **kw)


def _split_features(paths: list[str]) -> tuple[list[str], list[str]]:
    for p in paths:
        if not os.path.exists(p):
            raise SystemExit(f"error: --features {p} does not exist")
    serialized = [p for p in paths if data.is_serialized_lmdb(p)]
    return serialized, [p for p in paths if p not in serialized]


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
        return data.make_dataset("uc2", "xgqa", None, features=serialized[0], max_regions=args.max_regions)
    if features is None:
        raise SystemExit("error: --features is required (image-keyed region-feature LMDB/H5)")
    # IGLUE's training split (engine's --train-split default "train"): GQA train (LXMERT json) or its serialized
    # LMDB, XVNLI en/train.jsonl, Flickr30k train_ann.jsonl
    examples = data.load_split(args.data_root, args.task, args.train_split, args.train_lang)
    return data.make_dataset("uc2", args.task, examples, features=features, train=True, max_regions=args.max_regions,
                             seed=args.seed, hard_negatives=args.hard_negatives)


def model_config_from_args(args) -> dict:
    config = resolve_config(args.model_config)
    config["retrieval_loss"] = args.retrieval_loss
    if args.dropout is not None:
        config.update(hidden_dropout=args.dropout, attention_dropout=args.dropout, classifier_dropout=args.dropout)
    return config


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = model_config_from_args(args)
    layout = LAYOUT(args.task, config)
    schedule = freeze.schedule_from_args(args, layout.num_layers)

    if args.print_schedule:
        def count_train() -> int:
            serialized, keyed = _split_features(args.features)
            return len(build_train_dataset(args, FeatureSet(keyed) if keyed else None, serialized))
        return engine.print_schedule_only(build_model, config, layout, schedule, args, count_train,
                                          "--data-root/--features")

    dist = engine.setup_distributed()
    try:
        run_dir = engine.check_run_dir(args, dist)
        if not args.data_root:
            raise SystemExit("error: --data-root is required (folder holding IGLUE's datasets/)")
        try:
            serialized, keyed = _split_features(args.features)
            features = FeatureSet(keyed) if keyed else None
        except ValueError as e:  # unreadable / truncated LMDB or H5
            raise SystemExit(f"error: --features: {e}") from None
        tokenizer = engine.load_tokenizer(args, config["vocab_size"])

        engine.seed_everything(args.seed)  # identical initial weights on every rank
        model = build_model(args.task, config)
        if args.checkpoint and not engine.resuming(args, run_dir):  # a run killed before epoch 1 ended starts anew
            try:
                state, extra = read_checkpoint(args.checkpoint)
                plan = load_into(model, state)
            except ValueError as e:  # first line to the user last; the key-by-key report above it
                first, _, report = str(e).partition("\n")
                if report and dist.is_main:
                    print(report, file=sys.stderr, flush=True)
                named = "" if args.checkpoint in first else f"{args.checkpoint}: "
                raise SystemExit(f"error: --checkpoint: {named}{first}") from None
            plan.source = args.checkpoint
            engine.check_tokenizer_vocab(tokenizer, config["vocab_size"], args.tokenizer, args.checkpoint,
                                         extra.get("meta", {}) if plan.fmt == "ours" else None)  # None: released weights
            if dist.is_main:
                print(plan.report(), flush=True)
                (run_dir / "load_report.txt").write_text(plan.report(verbose=True) + "\n")
        elif not args.checkpoint and dist.is_main:
            print("warning: no --checkpoint: training from random initialisation", file=sys.stderr, flush=True)

        if args.task == "xflickrco":
            args.hard_negatives = find_hard_negatives(args)  # recorded in args.json
            if args.hard_negatives is None and dist.is_main:
                print("warning: no hard_negative.pkl (give --hard-negatives, or put it in <datasets>/flickr30k/): "
                      "the 4th pair of each caption uses a random other image, not VOLTA's hard negatives",
                      file=sys.stderr, flush=True)
        try:
            train_ds = build_train_dataset(args, features, serialized)
            if isinstance(train_ds, data.UC2Dataset):  # fail before training, not mid-epoch
                data.check_inputs(train_ds.examples, features=features)
        except ValueError as e:
            raise SystemExit(f"error: training data: {e}") from None
        collate = data.UC2Collate(args.task, tokenizer, train=True, num_answers=config["num_answers"])  # head width
        loader = engine.build_train_loader(train_ds, args, dist, collate)
        evaluate_fn = None
        if not args.no_eval:
            if features is None:
                raise SystemExit("error: evaluation needs image-keyed --features for the test images (or pass --no-eval)")
            import eval_zeroshot  # imported here: it imports the trainers itself
            try:
                evaluate_fn = eval_zeroshot.trainer_evaluate_fn("uc2", args, tokenizer, dist, features=features,
                                                                max_regions=args.max_regions,
                                                                pair_batch=args.eval_batch_size)
            except ValueError as e:
                raise SystemExit(f"error: evaluation data: {e}") from None
        meta = {**engine.base_meta("uc2", args, config, tokenizer), "max_regions": args.max_regions}
        engine.train(args, model, layout, schedule, loader, evaluate_fn, meta, dist,
                     no_decay=NO_DECAY_RULES[args.recipe])
    finally:
        engine.cleanup_distributed()


if __name__ == "__main__":
    main()
