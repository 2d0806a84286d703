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
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.xlm_roberta.configuration_xlm_roberta import XLMRobertaConfig
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer

import data
from formats import iglue_layout
from formats.features import FEATURE_DIM
from checks import preflight
import engine
from console import cli, what_trains
from formats import load_plan, model_config, run_folder, tokenizer_check
import freeze
from formats import feature_sets, volta
from scoring import retrieval_protocols
import scoring.evaluate
import scoring.metrics
from training import devices

TASKS = data.TASKS

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


# Config keys VOLTA's UC2 config space needs beyond CONFIGS (absent = the uc2_base value): the FFN activation
# (VOLTA hidden_act: gelu | relu | swish), the pooler activation (VOLTA fusion_act: relu, anything else tanh) and
# per-layer attention width / head count / FFN width (VOLTA's sublayer2* overrides), as lists over layers.
OPTIONAL_CONFIG_KEYS = ("hidden_act", "pooler_act", "layer_attn_sizes", "layer_num_heads", "layer_intermediate_sizes")


def resolve_config(name_or_path: str) -> dict:
    """'base' | path to our config json (its keys over base) or to a VOLTA UC2 config json."""
    return model_config.read_model_config(
        name_or_path, CONFIGS, OPTIONAL_CONFIG_KEYS, foreign=lambda d: volta.config_if_volta(d, CONFIGS["base"])
    )


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
    if task in ("xgqa", "marvl"):  # VOLTA SimpleClassifier: "VL-classifier-GQA"; "VL-binary-classifier" (NLVR2
        n_in, n_out = (p, c["num_answers"]) if task == "xgqa" else (2 * p, 2)  # pair: both pooled outputs, 2 classes)
        return nn.Sequential(
            nn.Linear(n_in, c["clf_hidden_size"]),
            nn.GELU(),
            nn.LayerNorm(c["clf_hidden_size"], eps=c["layer_norm_eps"]),
            nn.Linear(c["clf_hidden_size"], n_out),
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
        self.images_per_example = 2 if task == "marvl" else 1  # marvl: each layer runs once per image of the pair
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
        return self.encode_embedded(text, attention_mask, image, image_mask, trace)

    def encode_embedded(self, text, attention_mask, image, image_mask, trace: dict | None = None):
        """encode() after the embeddings layer (scoring.retrieval_protocols embeds each caption and image once)."""
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
        """Head output for N pairs: [N,1842] (xgqa), [N,3] (xvnli), [N,1] (xflickrco); marvl: N = 2B rows (left,
        right of each example), [B,2] from dropout(pooled).view(-1, 2 * pooler_size), as VOLTA's NLVR2 head."""
        pooled = self.dropout(self.encode(input_ids, attention_mask, features, spatials, image_mask, trace))
        return self.head(pooled.view(-1, 2 * pooled.shape[1]) if self.task == "marvl" else pooled)

    @staticmethod
    def _flat(batch: dict) -> list[torch.Tensor]:
        """The 5 input tensors with leading batch dims ([B] or VOLTA's grouped [B,4] / marvl [B,2]) flattened."""
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
        if self.task in ("xvnli", "marvl"):  # BCE averaged, NOT scaled (VOLTA's VL-tri- / VL-binary-classifier)
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
        return scoring.metrics.require_finite(self._run(batch), "logits").argmax(-1)

    def cls_features(self, batch: dict) -> torch.Tensor:
        """Pooled output (VOLTA's pooled_output_t, before dropout): the classifier's input."""
        return self.encode(*self._flat(batch))

    def pair_scores(self, batch: dict) -> torch.Tensor:
        """Raw VL-logit per (caption, image) pair: [N] for flat inputs, [B,4] for grouped ones."""
        if self.task != "xflickrco":
            raise ValueError(f"pair_scores() needs the xflickrco model, this one is {self.task}")
        return self._run(batch).view(batch["input_ids"].shape[:-1])

    # ---- evaluation protocol (scoring.evaluate.evaluate_task)
    tie_order = "volta"  # VOLTA's eval_retrieval.py ranks in np.argsort(-s) order (scoring.metrics.reference_order)
    unscored = None  # every (caption, image) pair is scored

    def prepare_task(self, data_root, tokenizer) -> None:
        """Task data the model needs before predicting: none (UC2's heads classify over fixed label sets)."""

    @torch.no_grad()
    def retrieval_scores(
        self, images, captions, batches: Callable, dist, device, opts, encoded: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VOLTA's protocol: the VL logit of every (caption, image) pair (scoring.retrieval_protocols)."""
        return retrieval_protocols.volta_retrieval_scores(self, images, captions, batches, dist, device, opts, encoded)


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
    ("paper", "marvl"): dict(epochs=20, lr=1e-5, batch_size=64),  # paper silent: IGLUE's NLVR2 (TASK12), choices.md
    ("iglue", "xgqa"): dict(epochs=5, lr=4e-5, batch_size=256, **IGLUE_OPTIM),
    ("iglue", "xvnli"): dict(epochs=10, lr=2e-5, batch_size=128, **IGLUE_OPTIM),
    ("iglue", "xflickrco"): dict(epochs=10, lr=2e-5, batch_size=64, **IGLUE_OPTIM),
    ("iglue", "marvl"): dict(epochs=20, lr=1e-5, batch_size=64, **IGLUE_OPTIM),
}


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
    engine.add_common_args(p, DEFAULTS)
    u = p.add_argument_group("UC2 (train_uc2.py)")
    u.add_argument("--model-config", default="base", help="base | our config json | a VOLTA UC2 config json")
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
        help="region-feature files: image-keyed LMDB/H5 (all are searched per image id); IGLUE's serialized "
        "GQA (xgqa) / NLVR2 (marvl) LMDB is the training set, + the valid / dev one for --eval-split valid / dev",
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
    u.add_argument("--no-eval", action="store_true", help="skip every evaluation, per-epoch and final (no curves)")
    return p


def open_feature_files(paths: list[str]) -> tuple[feature_sets.FeatureSet | None, list[str]]:
    """--features: the image-keyed files as one FeatureSet (None: there are none) and the serialized LMDBs."""
    with cli.about("--features"):  # unreadable / truncated LMDB or H5
        serialized, keyed = feature_sets.split_features(paths)
        return (feature_sets.FeatureSet(keyed) if keyed else None), serialized


def find_hard_negatives(args) -> str | None:
    """xflickrco training: --hard-negatives, else VOLTA's place for it, <datasets>/flickr30k/hard_negative.pkl
    (VOLTA reads it for every retrieval training run; IGLUE's UC2 numbers used it). None: not found."""
    if args.hard_negatives or args.task != "xflickrco":
        return args.hard_negatives
    try:
        found = iglue_layout.dataset_dir(args.data_root) / "flickr30k" / "hard_negative.pkl"
    except ValueError:
        return None
    return str(found) if found.is_file() else None


def build_train_dataset(args, features: feature_sets.FeatureSet | None, serialized: list[str]):
    if serialized:  # IGLUE's serialized GQA / NLVR2 LMDB: the training set itself (xgqa / marvl; + a dev file)
        train = feature_sets.serialized_roles(args.task, serialized)[0]
        return data.REGION_FEATURES.dataset(args.task, None, features=train, max_regions=args.max_regions)
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


def checked_train_dataset(args, features: feature_sets.FeatureSet | None, serialized: list[str]):
    """build_train_dataset with its examples' region features checked now, before training, not mid-epoch."""
    with cli.about("training data"):
        train_ds = build_train_dataset(args, features, serialized)
        if isinstance(train_ds, data.UC2Dataset):
            preflight.check_inputs(train_ds.examples, features=features, sample=preflight.VERIFY_SAMPLE)
        return train_ds


def load_checkpoint_arg(model: UC2, path: str) -> tuple[load_plan.LoadPlan, dict]:
    """--checkpoint into `model`: (the plan, the file's extra). A bad plan's key-by-key report follows the
    error's first line (console.cli.exits_on_bad_input prints it above the error)."""
    with cli.about("--checkpoint", path):
        state, extra = volta.read_checkpoint(path)
        plan = volta.load_into(model, state)
    plan.source = path
    return plan, extra


def model_config_from_args(args) -> dict:
    config = resolve_config(args.model_config)
    # data.py reads IGLUE's region files: 2048-d features, 7 location values (VOLTA's datasets pad to 2048 too)
    for key, have in (("v_feature_size", FEATURE_DIM), ("num_locs", 7)):
        if config[key] != have:
            raise SystemExit(
                f"error: --model-config {args.model_config}: {key} = {config[key]}, but the region "
                f"features this script reads have {have}"
            )
    model_config.check_heads(config, [("hidden_size", "num_heads")], args.model_config)
    config["retrieval_loss"] = args.retrieval_loss
    if args.dropout is not None:
        config.update(hidden_dropout=args.dropout, attention_dropout=args.dropout, classifier_dropout=args.dropout)
    return config


@cli.exits_on_bad_input
def main(
    argv: list[str] | None = None, *, dist: devices.DistInfo | None = None, on_evaluated: Callable | None = None
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

        return what_trains.print_schedule_only(
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
        if args.checkpoint and not run_folder.resuming(args, run_dir):  # a run killed before epoch 1 ended starts anew
            plan, extra = load_checkpoint_arg(model, args.checkpoint)
            tokenizer_check.check_tokenizer_vocab(
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
            with cli.about("evaluation data"):
                evaluate_fn = scoring.evaluate.trainer_evaluate_fn(
                    "uc2",
                    args,
                    tokenizer,
                    dist,
                    features=features,
                    serialized=serialized,
                    max_regions=args.max_regions,
                    pair_batch=args.eval_batch_size,
                )
        meta = {**run_folder.base_meta("uc2", args, config, tokenizer), "max_regions": args.max_regions}
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
    cli.run_main(main)
