"""VOLTA UC2 configs: every size VOLTA accepts for UC2 is carried over, and configs it is not are refused by name.

The numbers themselves are checked against VOLTA's outputs by tests/test_parity_uc2.py (set B has per-layer sizes,
swish and a tanh pooler); here: the config mapping, the refusals, and the round trip through our own config json.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_uc2 as U  # noqa: E402
from formats import volta  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "uc2"


def _volta(name: str) -> dict:
    return json.loads((FIX / name / "volta_config.json").read_text())


def test_volta_per_sublayer_sizes_and_activations_become_per_layer_config():
    cfg = volta.config_from_volta(_volta("parity_b"), U.CONFIGS["base"])
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_heads"], cfg["intermediate_size"]) == (3, 24, 3, 52)
    assert cfg["layer_attn_sizes"] == [24, 32, 24] and cfg["layer_num_heads"] == [3, 4, 3]
    assert cfg["layer_intermediate_sizes"] == [52, 52, 36]
    assert (cfg["hidden_act"], cfg["pooler_act"]) == ("swish", "tanh")
    model = U.build_model("xvnli", cfg)
    att = model.encoder.layer[1].attention.self
    assert (att.num_attention_heads, att.attention_head_size, tuple(att.query.weight.shape)) == (4, 8, (32, 24))
    assert tuple(model.encoder.layer[2].intermediate.dense.weight.shape) == (36, 24)
    uniform = volta.config_from_volta(_volta("parity_a"), U.CONFIGS["base"])
    assert not set(U.OPTIONAL_CONFIG_KEYS) & set(uniform)  # uc2_base-like configs stay as before


def test_our_config_json_with_per_layer_sizes_resolves_back(tmp_path):
    cfg = volta.config_from_volta(_volta("parity_b"), U.CONFIGS["base"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert U.resolve_config(str(path)) == cfg


@pytest.mark.parametrize(
    "change,message",
    [
        ({"shared_sublayers": [0, 1, 2, 3]}, "shared_sublayers"),  # sublayers 4, 5 with separate image weights
        ({"single_ln_sublayers": [0, 1, 3, 4, 5]}, "single_ln_sublayers"),
        ({"sublayer2v_intermediate_size": {"3": 40}}, "sublayer 3: intermediate_size 52 (text) != 40"),
        ({"v_num_attention_heads": 4}, "num_attention_heads"),
        ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
    ],
)
def test_volta_configs_that_are_not_uc2_are_refused_by_key(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        volta.config_from_volta({**_volta("parity_b"), **change}, U.CONFIGS["base"])


def test_cli_refuses_a_model_config_whose_region_sizes_the_feature_files_cannot_feed():
    args = SimpleNamespace(
        model_config=str(FIX / "parity_b" / "volta_config.json"), retrieval_loss="triplet", dropout=None
    )
    with pytest.raises(SystemExit, match="v_feature_size = 20"):
        U.model_config_from_args(args)
    args.model_config = str(FIX / "parity_a" / "volta_config.json")
    assert U.model_config_from_args(args)["v_feature_size"] == 2048


# Every key of VOLTA's BertConfig.__init__ (volta/config.py:223-287 at 62f78cd; docs/reference_facts.md
# #F-volta-config-keys), plus `model`, which IGLUE's uc2_base.json sets and train_task.py:202-203 sets too.
VOLTA_SCHEMA = """
vocab_size hidden_size num_attention_heads intermediate_size pooler_size hidden_act hidden_dropout_prob
attention_probs_dropout_prob max_position_embeddings type_vocab_size do_lower_case pad_token_id layer_norm_eps
num_locs max_boxes v_coordinate_embeddings_dim add_global_imgfeat image_embeddings initializer_range v_feature_size
v_hidden_size v_num_attention_heads v_intermediate_size v_pooler_size v_attention_probs_dropout_prob v_hidden_act
v_hidden_dropout_prob v_initializer_range visual_target_weights qa_task_weight qa_num_answers fixed_layers
fusion_method fusion_act objective clf_hidden_size m_encoder m_layer v_layers has_mapping has_mapping_bias
load_x_model fixed_embs image_head_ln bert_model itm_dim visualization tt_attn_sublayers tv_attn_sublayers
vt_attn_sublayers vv_attn_sublayers t_ff_sublayers v_ff_sublayers shared_sublayers single_ln_sublayers
sublayer2attn_hidden_size sublayer2num_attention_heads sublayer2intermediate_size sublayer2v_attn_hidden_size
sublayer2v_num_attention_heads sublayer2v_intermediate_size bert_layer2attn_sublayer bert_layer2ff_sublayer
norm_embeddings
""".split()


def test_every_key_of_voltas_config_schema_is_mapped_checked_or_known_unused():
    assert len(VOLTA_SCHEMA) == len(set(VOLTA_SCHEMA)) == 64
    assert set(volta.VOLTA_CONFIG_KEYS) == set(VOLTA_SCHEMA) | {"model"}
    assert set(volta.VOLTA_DEFAULTS) == set(VOLTA_SCHEMA) - {"vocab_size"}  # the one positional argument
    assert {how for how, _ in volta.VOLTA_CONFIG_KEYS.values()} == {"map", "check", "unused"}
    ours = volta.config_from_volta(_volta("parity_b"), U.CONFIGS["base"])
    mapped = {ours_key for how, ours_key in volta.VOLTA_CONFIG_KEYS.values() if how == "map"}
    assert mapped <= set(ours), mapped - set(ours)


UNUSED_CHANGES = {
    "v_attention_probs_dropout_prob": 0.5,
    "v_hidden_dropout_prob": 0.5,
    "v_hidden_act": "relu",
    "v_pooler_size": 7,
    "v_initializer_range": 3.0,
    "v_coordinate_embeddings_dim": 9,
    "max_boxes": 100,
    "visual_target_weights": {"1": 1},
    "qa_task_weight": 1.0,
    "qa_num_answers": 10,
    "objective": 2,
    "image_head_ln": False,
    "itm_dim": 3,
    "visualization": True,
    "m_encoder": "x",
    "m_layer": 3,
    "v_layers": ["a"],
    "has_mapping": "mlp",
    "has_mapping_bias": True,
    "load_x_model": True,
    "fixed_embs": "x",
    "model": "bert",
}


def test_keys_known_unused_change_nothing_and_every_other_key_is_covered_by_a_test():
    unused = {k for k, (how, _) in volta.VOLTA_CONFIG_KEYS.items() if how == "unused"}
    assert unused == set(UNUSED_CHANGES)
    base = volta.config_from_volta(_volta("parity_b"), U.CONFIGS["base"])
    for key, value in UNUSED_CHANGES.items():
        assert volta.config_from_volta({**_volta("parity_b"), key: value}, U.CONFIGS["base"]) == base, key


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("add_global_imgfeat", "first", "add_global_imgfeat = 'first' is not supported: VOLTA's readers then add"),
        ("add_global_imgfeat", "last", "add_global_imgfeat = 'last' is not supported"),
        ("norm_embeddings", True, "norm_embeddings = True is not supported: VOLTA's reader then L2-normalises"),
        ("do_lower_case", True, "do_lower_case = True is not supported"),
        ("bert_model", "bert-base-uncased", "bert_model = 'bert-base-uncased' is not supported"),
        ("fixed_layers", ["bert.embeddings"], "fixed_layers = \\['bert.embeddings'\\] is not supported"),
        ("bert_layer2ff_sublayer", {"0": 2}, "bert_layer2ff_sublayer = \\{'0': 2\\}"),
        ("fusion_method", "mul", "fusion_method = 'mul'"),
        ("image_embeddings", "vilbert", "image_embeddings = 'vilbert'"),
        ("hiden_act", "gelu", "hiden_act = 'gelu' is not supported: not a key of VOLTA's BertConfig"),
    ],
)
def test_volta_keys_that_change_inputs_or_training_are_refused_in_one_line_naming_key_and_value(key, value, message):
    with pytest.raises(ValueError, match="^VOLTA config.*" + message) as err:
        volta.config_from_volta({**_volta("parity_b"), key: value}, U.CONFIGS["base"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["do_lower_case", "bert_model", "fusion_method", "image_embeddings"])
def test_a_left_out_key_takes_voltas_default_as_bertconfig_from_json_file_does(key):
    # VOLTA's defaults: do_lower_case true, bert_model bert-base-uncased, fusion_method mul, image_embeddings vilbert
    cfg = {k: v for k, v in _volta("parity_b").items() if k != key}
    with pytest.raises(ValueError, match=key):
        volta.config_from_volta(cfg, U.CONFIGS["base"])
    no_pad = {k: v for k, v in _volta("parity_b").items() if k != "pad_token_id"}
    assert volta.config_from_volta(no_pad, U.CONFIGS["base"])["pad_token_id"] == 0  # VOLTA's default, not XLM-R's 1


def test_cli_refuses_a_volta_config_that_adds_a_global_image_box(tmp_path):
    path = tmp_path / "uc2_first.json"
    path.write_text(json.dumps({**_volta("parity_a"), "add_global_imgfeat": "first"}))
    out = tmp_path / "run"
    argv = ["--task", "xvnli", "--model-config", str(path), "--data-root", str(tmp_path), "--output-dir", str(out)]
    with pytest.raises(SystemExit, match="^error: VOLTA config: add_global_imgfeat = 'first' is not supported"):
        U.main(argv)
    assert not out.exists()
