"""The released M-CLIP text checkpoint's layout (tests/fixtures/mclip/M-CLIP-*.keys.tsv) and our loader.

The manifests are derived from the release's public description, not from its weights (none are reachable here):
Multilingual-CLIP's pt_multilingual_clip.MultilingualCLIP is `transformer` = AutoModel.from_pretrained(modelBase)
(an XLMRobertaModel, pooler included) + `LinearTransformation` = Linear(transformerDimSize, numDims); its model
table gives modelBase xlm-roberta-large for both releases and numDims 768 (Vit-L-14) or 512 (Vit-B-32). Checked on
the meta device (no memory), as tests/test_ckpt_uc2.py checks UC2's full-size layouts.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import XLMRobertaConfig, XLMRobertaModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comparisons.mclip import train_mclip as T  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "mclip"
RELEASES = {"M-CLIP-XLM-Roberta-Large-Vit-L-14": 768, "M-CLIP-XLM-Roberta-Large-Vit-B-32": 512}
# xlm-roberta-large's config.json (Hugging Face FacebookAI/xlm-roberta-large), written out here, independent of
# train_mclip.TEXT_CONFIGS
XLMR_LARGE = dict(
    vocab_size=250002,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def manifest(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in (FIX / f"{name}.keys.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(d) for d in shape.strip("[]").split(",") if d), dtype)
    return out


def meta_state(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, dtype=DTYPES[d], device="meta") for k, (s, d) in manifest(name).items()}


def our_model(out_dim: int) -> T.MCLIPText:
    with torch.device("meta"):
        return T.build_text_model({**T.TEXT_CONFIGS["large"], "out_dim": out_dim})


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_manifest_is_multilingual_clips_architecture_on_xlm_roberta_large(name):
    """MultilingualCLIP's two modules built from xlm-roberta-large's config, as its __init__ builds them."""
    with torch.device("meta"):
        transformer = XLMRobertaModel(XLMRobertaConfig(**XLMR_LARGE))  # AutoModel's class for xlm-roberta-large
        linear = nn.Linear(XLMR_LARGE["hidden_size"], RELEASES[name])
    built = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    built |= {f"LinearTransformation.{k}": v for k, v in linear.state_dict().items()}
    want = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in built.items()}
    assert manifest(name) == want
    assert list(manifest(name)) == list(want)  # the manifest keeps state_dict order
    assert sum(torch.Size(s).numel() for s, _ in want.values()) == {768: 560_677_632, 512: 560_415_232}[RELEASES[name]]


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_our_text_tower_loads_exactly_the_release_layout(name):
    model = our_model(RELEASES[name])
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()} == (
        manifest(name)
    )
    T.load_text_weights(model, meta_state(name), name)
    # a release saved by transformers < 4.31 also holds the position_ids buffer: not a weight, dropped
    T.load_text_weights(model, {**meta_state(name), "transformer.embeddings.position_ids": torch.empty(1, 514)}, name)


def test_a_missing_or_extra_key_or_another_width_is_a_one_line_error():
    name = "M-CLIP-XLM-Roberta-Large-Vit-L-14"
    model = our_model(768)
    state = meta_state(name)
    del state["transformer.pooler.dense.weight"]
    with pytest.raises(ValueError, match=r"missing \['transformer.pooler.dense.weight'\], unexpected \[\]") as e:
        T.load_text_weights(model, state, name)
    assert "\n" not in str(e.value)
    state = {**meta_state(name), "transformer.encoder.layer.24.output.dense.weight": torch.empty(1024, 4096)}
    with pytest.raises(ValueError, match=r"unexpected \['transformer.encoder.layer.24.output.dense.weight'\]") as e:
        T.load_text_weights(model, state, name)
    assert "\n" not in str(e.value)
    # the Vit-B-32 release's 512-d projection into a tower made for ViT-L/14's 768-d image space
    with pytest.raises(
        ValueError, match=r"LinearTransformation.weight has shape \(512, 1024\), the model \(768, 1024\)"
    ):
        T.load_text_weights(model, meta_state("M-CLIP-XLM-Roberta-Large-Vit-B-32"), "Vit-B-32")
