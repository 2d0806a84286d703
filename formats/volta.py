"""UC2's reference checkpoint and config formats: IGLUE's VOLTA files, UC2's original release, XLM-R.

Not on the reading path: train_uc2.py calls `load_into(model, path)` (and `config_from_volta` for a VOLTA config
json) and gets a LoadPlan that says what happened to every key. The key maps reproduce VOLTA's names and its
convert_uc2.py (docs/reference_facts.md#F-uc2-convert, #F-uc2-config); the model is only passed in.

Formats read (auto-detected):
  volta     IGLUE's VOLTA files: pre-trained uc2_checkpoint_200000.bin, fine-tuned pytorch_model_*.bin
            (plain state dicts, alias keys), pytorch_ckpt_latest.tar (wrapped, with a pickled tbLogger)
  original  UC2's own model_step_200000.pt (VLXLMRForPretraining, fp16 or fp32), renamed exactly as
            VOLTA's convert_uc2.py does, collision included (docs/reference_facts.md#F-uc2-convert)
  xlmr      a Hugging Face xlm-roberta-base folder/file: text side only
  ours      checkpoints written by train_uc2.py (engine format, or a plain state dict of our names)
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from formats import load_plan
from formats import torch_files

# VOLTA task keys of IGLUE's task configs (GQA, XVNLI, Flickr30k retrieval, NLVR2 = MaRVL's English training).
VOLTA_TASK_KEY = {"xgqa": "TASK15", "xvnli": "TASK19", "xflickrco": "TASK8", "marvl": "TASK12"}

# ---------------------------------------------------------------- VOLTA config json -> our config

VOLTA_ACTS = ("gelu", "relu", "swish")

# VOLTA's BertConfig defaults (volta/config.py:223-287): BertConfig.from_json_file starts from these and sets every
# key of the json over them (config.py:394-408), so a key a json leaves out takes this value
# (docs/reference_facts.md#F-volta-config-keys).
VOLTA_DEFAULTS = {
    "hidden_size": 768,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "pooler_size": 768,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "do_lower_case": True,
    "pad_token_id": 0,
    "layer_norm_eps": 1e-12,
    "num_locs": 5,
    "max_boxes": 36,
    "v_coordinate_embeddings_dim": None,
    "add_global_imgfeat": None,
    "image_embeddings": "vilbert",
    "initializer_range": 0.02,
    "v_feature_size": 2048,
    "v_hidden_size": 768,
    "v_num_attention_heads": 12,
    "v_intermediate_size": 3072,
    "v_pooler_size": 1024,
    "v_attention_probs_dropout_prob": 0.1,
    "v_hidden_act": "gelu",
    "v_hidden_dropout_prob": 0.1,
    "v_initializer_range": 0.2,
    "visual_target_weights": {"0": 1},
    "qa_task_weight": 0.0,
    "qa_num_answers": 0,
    "fixed_layers": [],
    "fusion_method": "mul",
    "fusion_act": "relu",
    "objective": 0,
    "clf_hidden_size": 1536,
    "m_encoder": None,
    "m_layer": 0,
    "v_layers": [],
    "has_mapping": "linear",
    "has_mapping_bias": False,
    "load_x_model": False,
    "fixed_embs": None,
    "image_head_ln": True,
    "bert_model": "bert-base-uncased",
    "itm_dim": 2,
    "visualization": False,
    "tt_attn_sublayers": [],
    "tv_attn_sublayers": [],
    "vt_attn_sublayers": [],
    "vv_attn_sublayers": [],
    "t_ff_sublayers": [],
    "v_ff_sublayers": [],
    "shared_sublayers": [],
    "single_ln_sublayers": [],
    "sublayer2attn_hidden_size": {},
    "sublayer2num_attention_heads": {},
    "sublayer2intermediate_size": {},
    "sublayer2v_attn_hidden_size": {},
    "sublayer2v_num_attention_heads": {},
    "sublayer2v_intermediate_size": {},
    "bert_layer2attn_sublayer": {},
    "bert_layer2ff_sublayer": {},
    "norm_embeddings": False,
}

_UNUSED_PRETRAIN = "read only by VOLTA's pre-training heads/losses (BertForVLPreTraining), no part of the task model"
_SHARED = "UC2 shares every sublayer, so VOLTA aliases the image weights/dropouts/activation to the text ones"
# What config_from_volta does with every key of VOLTA's config schema, plus `model` (IGLUE's uc2_base.json sets it;
# train_task.py:202-203 sets it from bert_model): ("map", our key) carried over; ("check", what) refused with a
# one-line error naming the key and value unless it holds what UC2 needs; ("unused", why) VOLTA's UC2 task model,
# its task datasets and its tokenizer never read it, so it changes no input and no number.
VOLTA_CONFIG_KEYS: dict[str, tuple[str, str]] = {
    "vocab_size": ("map", "vocab_size"),
    "hidden_size": ("map", "hidden_size"),
    "num_attention_heads": ("map", "num_heads"),
    "intermediate_size": ("map", "intermediate_size"),
    "pooler_size": ("map", "pooler_size"),
    "hidden_act": ("map", "hidden_act"),
    "hidden_dropout_prob": ("map", "hidden_dropout"),
    "attention_probs_dropout_prob": ("map", "attention_dropout"),
    "max_position_embeddings": ("map", "max_position_embeddings"),
    "type_vocab_size": ("map", "type_vocab_size"),
    "pad_token_id": ("map", "pad_token_id"),
    "layer_norm_eps": ("map", "layer_norm_eps"),
    "initializer_range": ("map", "initializer_range"),
    "num_locs": ("map", "num_locs"),
    "v_feature_size": ("map", "v_feature_size"),
    "clf_hidden_size": ("map", "clf_hidden_size"),
    "fusion_act": ("map", "pooler_act"),
    "sublayer2attn_hidden_size": ("map", "layer_attn_sizes"),
    "sublayer2num_attention_heads": ("map", "layer_num_heads"),
    "sublayer2intermediate_size": ("map", "layer_intermediate_sizes"),
    "do_lower_case": ("check", "false: VOLTA hands it to the tokenizer (task_utils.py:300); ours never lowercases"),
    "bert_model": ("check", "an XLM-R tokenizer name: VOLTA tokenizes with it (task_utils.py:300)"),
    "add_global_imgfeat": ("check", "null: 'first'/'last' add a mean-of-regions box to every image"),
    "norm_embeddings": ("check", "false: true L2-normalises every region feature and box vector"),
    "fixed_layers": ("check", "[]: VOLTA freezes the parameters it names (train_utils.py:255-260); use --freeze"),
    "fusion_method": ("check", "'text' (UC2's pooled text head)"),
    "image_embeddings": ("check", "'uc2' (UC2's shared embeddings)"),
    "v_hidden_size": ("check", "= hidden_size: " + _SHARED),
    "v_num_attention_heads": ("check", "= num_attention_heads: " + _SHARED),
    "v_intermediate_size": ("check", "= intermediate_size: " + _SHARED),
    "sublayer2v_attn_hidden_size": ("check", "= the text size of each sublayer: " + _SHARED),
    "sublayer2v_num_attention_heads": ("check", "= the text heads of each sublayer: " + _SHARED),
    "sublayer2v_intermediate_size": ("check", "= the text size of each sublayer: " + _SHARED),
    "tt_attn_sublayers": ("check", "attention at every even sublayer"),
    "tv_attn_sublayers": ("check", "attention at every even sublayer"),
    "vt_attn_sublayers": ("check", "attention at every even sublayer"),
    "vv_attn_sublayers": ("check", "attention at every even sublayer"),
    "t_ff_sublayers": ("check", "feed-forward at every odd sublayer"),
    "v_ff_sublayers": ("check", "feed-forward at every odd sublayer"),
    "shared_sublayers": ("check", "every sublayer"),
    "single_ln_sublayers": ("check", "every sublayer"),
    "bert_layer2attn_sublayer": ("check", "layer k -> sublayer 2k (gives the layer count where present)"),
    "bert_layer2ff_sublayer": ("check", "layer k -> sublayer 2k+1"),
    "v_attention_probs_dropout_prob": ("unused", _SHARED + " (encoders.py:205-209)"),
    "v_hidden_dropout_prob": ("unused", _SHARED + " (encoders.py:387-391); UC2Embeddings uses hidden_dropout_prob"),
    "v_hidden_act": ("unused", _SHARED + " (encoders.py:474-475)"),
    "v_pooler_size": ("unused", "only the image pooler reads it, which fusion_method 'text' leaves out"),
    "v_initializer_range": ("unused", "no VOLTA code reads it"),
    "v_coordinate_embeddings_dim": ("unused", "read only by VL-BERT's embeddings"),
    "max_boxes": ("unused", "no VOLTA code reads it (the task config's max_region_num sets the boxes)"),
    "visual_target_weights": ("unused", _UNUSED_PRETRAIN),
    "qa_task_weight": ("unused", _UNUSED_PRETRAIN),
    "qa_num_answers": ("unused", _UNUSED_PRETRAIN),
    "objective": ("unused", "pre-training only (train_concap.py)"),
    "image_head_ln": ("unused", _UNUSED_PRETRAIN),
    "itm_dim": ("unused", _UNUSED_PRETRAIN),
    "visualization": ("unused", "only returns attention maps; changes no output"),
    "m_encoder": ("unused", "no VOLTA code reads it"),
    "m_layer": ("unused", "no VOLTA code reads it"),
    "v_layers": ("unused", "pre-training only (train_concap_wiki.py)"),
    "has_mapping": ("unused", "no VOLTA code reads it"),
    "has_mapping_bias": ("unused", "no VOLTA code reads it"),
    "load_x_model": ("unused", "no VOLTA code reads it"),
    "fixed_embs": ("unused", "no VOLTA code reads it"),
    "model": ("unused", "UC2Embeddings stores it and never reads it (embeddings.py:571)"),
}


def _refuse(key: str, value, why: str) -> None:
    raise ValueError(f"VOLTA config: {key} = {value!r} is not supported: {why}")


def _check_volta_inputs(volta: dict) -> None:
    """Keys that change UC2's inputs (tokens, regions) or what trains: UC2's value or a one-line refusal."""
    unknown = sorted(set(volta) - set(VOLTA_CONFIG_KEYS))
    if unknown:
        _refuse(unknown[0], volta[unknown[0]], "not a key of VOLTA's BertConfig (volta/config.py); remove it")
    if "vocab_size" not in volta:
        raise ValueError("VOLTA config: vocab_size is missing (VOLTA's BertConfig has no default for it)")
    v = {**VOLTA_DEFAULTS, **volta}
    if v["add_global_imgfeat"] is not None:
        _refuse(
            "add_global_imgfeat",
            v["add_global_imgfeat"],
            "VOLTA's readers then add a mean-of-regions box with location [0,0,1,1,1,...] to every image "
            "(_image_features_reader.py:177-203); ours read the regions as stored (IGLUE's UC2 config sets null)",
        )
    if v["norm_embeddings"]:
        _refuse(
            "norm_embeddings",
            v["norm_embeddings"],
            "VOLTA's reader then L2-normalises every region feature and location vector "
            "(_image_features_reader.py:171-174); ours do not (IGLUE's UC2 config leaves it false)",
        )
    if v["do_lower_case"]:
        _refuse(
            "do_lower_case",
            v["do_lower_case"],
            "VOLTA passes it to its tokenizer (task_utils.py:300; its default is true); our XLM-R tokenizer "
            "never lowercases: set it false as IGLUE's uc2_base.json does",
        )
    if "xlm-roberta" not in str(v["bert_model"]):
        _refuse("bert_model", v["bert_model"], "VOLTA tokenizes with it; UC2 needs an XLM-R tokenizer")
    if v["fixed_layers"]:
        _refuse("fixed_layers", v["fixed_layers"], "VOLTA freezes those parameters; say it with --freeze instead")
    n_ff = v["bert_layer2ff_sublayer"]
    if any(int(s) != 2 * int(k) + 1 for k, s in n_ff.items()):
        _refuse("bert_layer2ff_sublayer", n_ff, "UC2's layer k is feed-forward sublayer 2k+1")


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


def config_from_volta(volta: dict, base: dict, **overrides) -> dict:
    """Our config dict from a VOLTA BertConfig json (e.g. config/uc2_base.json, parity_a/volta_config.json); keys
    VOLTA's config does not hold (heads, losses, attention kernel) come from `base` (train_uc2.CONFIGS["base"]).
    A key the json leaves out takes VOLTA's default, as BertConfig.from_json_file does; every key is mapped,
    checked or known unused (VOLTA_CONFIG_KEYS): anything else is refused with a one-line error naming it."""
    _check_volta_inputs(volta)
    volta = {**VOLTA_DEFAULTS, **volta}
    sublayers = volta["bert_layer2attn_sublayer"] or {str(i): s for i, s in enumerate(volta["tt_attn_sublayers"])}
    if volta["fusion_method"] != "text" or volta["image_embeddings"] != "uc2":
        raise ValueError(
            f"VOLTA config is not a UC2 config: fusion_method = {volta['fusion_method']!r}, image_embeddings = "
            f"{volta['image_embeddings']!r} (UC2 needs 'text' and 'uc2')"
        )
    n = len(sublayers)
    _check_volta_uc2_layout(volta, n)
    if volta["hidden_act"] not in VOLTA_ACTS:
        raise ValueError(f"VOLTA config: hidden_act {volta['hidden_act']!r} is none of VOLTA's {VOLTA_ACTS}")
    cfg = dict(base)
    cfg.update(
        vocab_size=volta["vocab_size"],
        hidden_size=volta["hidden_size"],
        num_layers=n,
        num_heads=volta["num_attention_heads"],
        intermediate_size=volta["intermediate_size"],
        max_position_embeddings=volta["max_position_embeddings"],
        type_vocab_size=volta["type_vocab_size"],
        pad_token_id=volta["pad_token_id"],
        layer_norm_eps=volta["layer_norm_eps"],
        v_feature_size=volta["v_feature_size"],
        num_locs=volta["num_locs"],
        pooler_size=volta["pooler_size"],
        clf_hidden_size=volta["clf_hidden_size"],
        hidden_dropout=volta["hidden_dropout_prob"],
        attention_dropout=volta["attention_probs_dropout_prob"],
        initializer_range=volta["initializer_range"],
    )
    if volta["hidden_act"] != "gelu":
        cfg["hidden_act"] = volta["hidden_act"]
    if volta["fusion_act"] != "relu":
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


def config_if_volta(d: dict, base: dict) -> dict | None:
    """Our config from a VOLTA UC2 config json; None for a config json of ours."""
    return config_from_volta(d, base) if "tt_attn_sublayers" in d or "bert_layer2attn_sublayer" in d else None


# ---------------------------------------------------------------- checkpoint keys

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

VOLTA_EMB = {
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
VOLTA_ATTN = {
    "attention_self.query": "attention.self.query",
    "attention_self.key": "attention.self.key",
    "attention_self.value": "attention.self.value",
    "attention_output.dense": "attention.output.dense",
    "attention_output.LayerNorm": "attention.output.LayerNorm",
}
VOLTA_FFN = {
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
    if m and m.group(1) in VOLTA_EMB:
        return "map", f"embeddings.{VOLTA_EMB[m.group(1)]}.{m.group(2)}"
    m = re.match(r"^bert\.t_pooler\.dense\.(weight|bias)$", key)
    if m:
        return "map", f"pooler.{m.group(1)}"
    m = re.match(r"^bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        sub, module, wb = int(m.group(1)), m.group(2), m.group(3)
        twin = _V_TWIN.match(module)
        if twin:
            return "alias", f"bert.encoder.layer.{sub}.{twin.group(1)}.{twin.group(2)}.{wb}"
        table = VOLTA_ATTN if sub % 2 == 0 else VOLTA_FFN
        if module in table:
            return "map", f"encoder.layer.{sub // 2}.{table[module]}.{wb}"
        return "unknown", ""
    m = re.match(r"^clfs_dict\.(\w+)\.(.+)$", key)
    if m:
        rest = m.group(2)
        if task in ("xgqa", "marvl"):  # SimpleClassifier's logit_fc (VL-classifier-GQA, VL-binary-classifier)
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
) -> load_plan.LoadPlan:
    """Plan loading a state dict with key->shape `source` (file order) into a model with `target`
    key->shape. Shapes are tuples; -1 entries (unknown sizes in manifests) only appear in dropped keys."""
    fmt = fmt or detect_format(list(source))
    if fmt == "ours":
        return load_plan.plan_same_names(source, target, fmt, name)
    plan = load_plan.LoadPlan(fmt, name)
    if fmt == "volta":
        _plan_volta(plan, source, task)
    elif fmt == "original":
        _plan_original(plan, source, task)
    elif fmt == "xlmr":
        _plan_xlmr(plan, source)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    head_from_file = any(dst.startswith("head.") for dst in plan.copy)
    return load_plan.finish_load_plan(
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


def _plan_volta(plan: load_plan.LoadPlan, source: dict, task: str) -> None:
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


def _plan_original(plan: load_plan.LoadPlan, source: dict, task: str) -> None:
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


def _plan_xlmr(plan: load_plan.LoadPlan, source: dict) -> None:
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
        return dict(torch_files.read_safetensors(path)), {}
    try:
        obj = torch_files.read_torch_file(path)  # weights only; IGLUE's pickled tbLogger becomes an inert stand-in
    except (torch_files.UnsafeCheckpointError, torch_files.OversizedFileError):
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
        load_plan.check_checkpoint_model(extra.get("meta"), "uc2", path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path}: no state dict found (top-level keys: {list(obj)[:6] if isinstance(obj, dict) else type(obj)})"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj), extra


def load_into(model: nn.Module, path_or_sd: str | dict, fmt: str | None = None) -> load_plan.LoadPlan:
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
    load_plan.apply_load_plan(model, sd, plan, {"row0": _copy_row0})
    return plan
