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
