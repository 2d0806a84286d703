"""Multilingual-CLIP with translation-based alignment and parameter-efficient tuning (PET) on XTD10 / Multi30K.

The third system of our comparison (Zhang et al., arXiv 2305.03510; reference code eric-ai-lab/PECTVLM,
align_from_to_en/, "the reference" below). One run adapts the M-CLIP text tower to one target language:

- text tower: XLM-R (transformers XLMRobertaModel), mean-pooled over the attention mask, then
  ``LinearTransformation`` (1024 -> 768 for M-CLIP/XLM-Roberta-Large-Vit-L-14): the attribute names of
  Multilingual-CLIP's pt_multilingual_clip.MultilingualCLIP, so its released state dict loads as it is;
- image tower: OpenAI CLIP's vision transformer + projection (transformers CLIPVisionModelWithProjection), frozen.
  It has no dropout, so train and eval mode give the same features: `train_mclip.py features` computes them once
  into a file every run shares (or a run computes them itself from --images and --clip-vision);
- loss: symmetric cross-entropy of 100 x cosine similarities (fixed scale), image features without gradient,
  plus ratio x an alignment term between the routine's text and its partner (MSE on the unnormalised
  embeddings, neither side detached; or the alternatives ``contrastive`` / ``contrastive_with_image``);
- routines: baseline1 (target text), method1 (target <-> English), method2 (target <-> MT en->target),
  baseline2 (MT target->en), method3 (MT target->en <-> English); each is tested on the text it trains on;
- PET: full fine-tuning, LoRA (peft), bottleneck adapters, Compacter, soft prompts (after <s>), hard prompts (a text
  prefix);
- training: Adam (weight decay 0), cosine schedule without warm-up, validation every --eval-steps optimizer steps,
  the best validation state (``>=``, as the reference: the latest of equal scores) is tested; --tuning-head
  reference / corrected: run_XTD.py's --tuning_head as it ran (an empty head group: trains what off trains) / the
  pooler and LinearTransformation trained at --head-lr 3e-6 in a group of their own.

    python -m comparisons.mclip.train_mclip --dataset xtd --data-root XTD10 --lang de --routine method3 --pet lora \
        --text-checkpoint M-CLIP-XLM-Roberta-Large-Vit-L-14 --tokenizer M-CLIP-XLM-Roberta-Large-Vit-L-14 \
        --image-features xtd_vitl14.pt --output-dir runs/mclip-xtd-de-method3-lora
    python -m comparisons.mclip.train_mclip table runs/mclip-xtd-*      # per-language R@1, average, range, std
    python -m comparisons.mclip.train_mclip features --dataset xtd --data-root XTD10 --images COCO2014 \
        --clip-vision clip-vit-large-patch14 --out xtd_vitl14.pt   # the frozen image tower, once

Run folder: args.json, metrics.jsonl (train / val / test records), checkpoint_last.pt (resume state after every
epoch), model_final.pt ({"model": the best validation state of the trainable parameters only, i.e. the
language's PET module, "meta": ...}), results.json (test R@1 of the best state).
Under torchrun (`python -m torch.distributed.run --nproc_per_node N -m comparisons.mclip.train_mclip ...`)
--batch-size is the global batch: each rank encodes its shard, the text embeddings are gathered with gradient for
the in-batch negatives and the alignment term, gradients are summed over the ranks, rank 0 writes the run folder.
With --dropout 0, N processes take the steps of one process over the same global batch within float rounding
(tests/test_mclip.py checks 2 gloo ranks against 1 within tests/parity.py's tolerance; validation and test R@1 are
exactly the one-process ones).
With dropout each rank draws its own masks, so the runs differ as two seeds do. --resume is bitwise exact with the
same number of processes (each rank's RNG is in the checkpoint) and refused with another.
--amp (default off = float32, as the reference trains; auto/bf16/fp16 as the other trainers through
engine.setup_amp): autocast over the text tower, the loss's similarities in float32; fp16 steps through
engine.optimizer_step's GradScaler (state in checkpoint_last.pt, skipped steps counted in metrics.jsonl).
Validation and test run in float32 unless --eval-amp.

Off the reading path: a comparison system (comparisons/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from transformers import XLMRobertaConfig, XLMRobertaModel

import data
from formats import tokenizer_check
from formats import readers
from comparisons.mclip import xtd_data
import engine
from console import cli
from training import devices, progress
from formats import run_folder, torch_files
import freeze
import scoring.evaluate
import scoring.metrics

LOGIT_SCALE = 100.0  # the reference's fixed scale (trainer.py), not CLIP's learned one
ROUTINES = {  # routine: (text kind trained and tested on, alignment partner kind or None)
    "baseline1": ("native", None),
    "method1": ("native", "en"),
    "method2": ("native", "from_en"),
    "baseline2": ("to_en", None),
    "method3": ("to_en", "en"),
}
# Test text of PECTVLM's run_cross.py, the script its published run scripts call: validation follows the routine
# (trainer.py) but the final test swaps the text of baselines/method1 and method2/3 (an older trainer's naming).
# Reproduced only under --test-text run_cross; the default tests on the text the routine trains and validates on.
RUN_CROSS_TEST_TEXT = {
    "baseline1": "to_en",
    "method1": "to_en",
    "method2": "native",
    "baseline2": "native",
    "method3": "native",
}
ALIGN_LOSSES = ("mse", "contrastive", "contrastive_with_image")
# --dataset: its languages. multi30k = Multi30K task 1 (translations), multi30k_task2 = task 2 (independent
# descriptions, the first of 5 per image as PECTVLM's run_choose_pet_task2.py loads them; xtd_data)
DATASETS = {
    "xtd": xtd_data.XTD_LANGS,
    "multi30k": xtd_data.MULTI30K_LANGS,
    "multi30k_task2": xtd_data.MULTI30K_TASK2_LANGS,
}
PETS = ("full", "lora", "lora_cross", "adapter", "compacter", "prompt", "none")
# LoRA targets: run_XTD.py's (the paper's 0.16%) and run_cross.py's, the script PECTVLM's published run scripts call
LORA_TARGETS = {"lora": ["query", "value"], "lora_cross": ["query", "key", "value", "attention.output.dense"]}

TEXT_CONFIGS = {
    # xlm-roberta-large's config.json: the text tower of M-CLIP/XLM-Roberta-Large-Vit-L-14 (out_dim 768)
    "large": {
        "vocab_size": 250002,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "out_dim": 768,
    },
    "tiny": {
        "vocab_size": 1000,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 66,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "out_dim": 16,
    },
}
# ---------------------------------------------------------------------------------------------- model


def text_config(name_or_dict: str | dict, dropout: float | None = None) -> tuple[XLMRobertaConfig, int]:
    """(XLMRobertaConfig, output dim) of a named config or a dict of TEXT_CONFIGS' keys. dropout None: XLM-R's
    0.1 (hidden and attention), what the reference trains with; 0 makes training deterministic."""
    cfg = dict(TEXT_CONFIGS[name_or_dict] if isinstance(name_or_dict, str) else name_or_dict)
    out_dim = cfg.pop("out_dim")
    if dropout is not None:
        cfg.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return XLMRobertaConfig(
        pad_token_id=data.PAD_ID, bos_token_id=data.BOS_ID, eos_token_id=data.EOS_ID, **cfg
    ), out_dim


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states the mask keeps, in the reference's order of operations."""
    return (hidden * mask.unsqueeze(2)).sum(dim=1) / mask.sum(dim=1)[:, None]


class SoftPrompt(nn.Module):
    """Trainable embeddings inserted right after <s> (the reference's soft_prompt.py; peft's prompt tuning puts
    them before <s>, hence our own). The attention mask is extended with ones, so mean pooling covers them."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embeds = nn.Parameter(init.detach().clone())

    def forward(self, token_embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = token_embeds.shape[0]
        soft = self.embeds.unsqueeze(0).expand(b, -1, -1).to(token_embeds.dtype)
        embeds = torch.cat([token_embeds[:, :1], soft, token_embeds[:, 1:]], dim=1)
        ones = mask.new_ones(b, self.embeds.shape[0])
        return embeds, torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)


class MCLIPText(nn.Module):
    """M-CLIP's text tower (Multilingual-CLIP pt_multilingual_clip.MultilingualCLIP, same state-dict keys)."""

    def __init__(self, config: XLMRobertaConfig, out_dim: int):
        super().__init__()
        self.transformer = XLMRobertaModel(config)  # with its pooler, unused: the released checkpoint has it
        self.LinearTransformation = nn.Linear(config.hidden_size, out_dim)
        self.prompt: SoftPrompt | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.prompt is None:
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            embeds = self.transformer.embeddings.word_embeddings(input_ids)
            embeds, attention_mask = self.prompt(embeds, attention_mask)
            hidden = self.transformer(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return self.LinearTransformation(mean_pool(hidden, attention_mask))


def build_text_model(config: str | dict, dropout: float | None = None) -> MCLIPText:
    cfg, out_dim = text_config(config, dropout)
    return MCLIPText(cfg, out_dim)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch file (weights only); a folder means its model.safetensors or
    pytorch_model.bin (the Hugging Face layout of M-CLIP's and OpenAI CLIP's releases)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise ValueError(f"{path}: holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    if path.suffix == ".safetensors":
        return torch_files.read_safetensors(path)
    state = torch_files.load_checkpoint(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def load_text_weights(model: MCLIPText, state: dict[str, torch.Tensor], source: str) -> None:
    """Released M-CLIP weights (keys transformer.* and LinearTransformation.*); any other key set is an error."""
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}  # old buffer, not a weight
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: not an M-CLIP text state dict of this config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- PET


class BottleneckAdapter(nn.Module):
    """y + up(gelu_new(down(y))) after a linear layer (OpenDelta's AdapterLayer: weights N(0, 0.01), biases 0).
    Written here: peft has no sequential bottleneck adapter, and the `adapters` package pins transformers 4."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        for lin in (self.down_proj, self.up_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=0.01)
            nn.init.zeros_(lin.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up_proj(F.gelu(self.down_proj(y), approximate="tanh"))  # gelu_new = tanh approximation


class PHMLinear(nn.Module):
    """Parameterised hypercomplex linear layer of Compacter (OpenDelta's PHMLinear with the reference's settings:
    factorised rank-1 weights, an unfactorised learned rule): H = sum_i kron(C_i, A_i B_i), y = x H + b.
    C [n, n, n] ~ N(0, 0.01^2); A_i [in/n, rank], B_i [rank, out/n] Xavier-uniform with gain sqrt(2) (the
    Compacter code base's glorot_uniform); b = 0."""

    def __init__(self, in_features: int, out_features: int, n: int = 4, rank: int = 1):
        super().__init__()
        if in_features % n or out_features % n:
            raise ValueError(f"PHMLinear {in_features} -> {out_features}: both must be multiples of phm_dim {n}")
        self.phm_rule = nn.Parameter(torch.empty(n, n, n).normal_(mean=0.0, std=0.01))
        self.W_left = nn.Parameter(torch.empty(n, in_features // n, rank))
        self.W_right = nn.Parameter(torch.empty(n, rank, out_features // n))
        for i in range(n):
            nn.init.xavier_uniform_(self.W_left.data[i], gain=math.sqrt(2))
            nn.init.xavier_uniform_(self.W_right.data[i], gain=math.sqrt(2))
        self.b = nn.Parameter(torch.zeros(out_features))

    def weight(self) -> torch.Tensor:
        """H [in, out] = sum_i kron(phm_rule[i], W_left[i] @ W_right[i])."""
        w = torch.bmm(self.W_left, self.W_right)
        n, (a, c), (k, p) = w.shape[0], self.phm_rule.shape[1:], w.shape[1:]
        return torch.einsum("bac,bkp->bakcp", self.phm_rule, w).reshape(n, a * k, c * p).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.b


# Compacter's activation. The reference builds Compacter through OpenDelta's AutoDeltaConfig -> CompacterConfig,
# whose non_linearity defaults to 'relu', and from_config passes it to CompacterModel, overriding that class's own
# default 'gelu_new' (docs/reference_facts.md#F-opendelta-compacter-act): the reference ran ReLU.
COMPACTER_ACTS = {"relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class Compacter(nn.Module):
    """y + up(act(down(y))) with PHM down (dim -> dim / reduction) and up projections (OpenDelta's
    HyperComplexAdapterLayer; written here: neither peft nor a transformers-5 package has it). act: ReLU as the
    reference ran it, or gelu_new (CompacterModel's own default, which the reference's config overrides)."""

    def __init__(self, dim: int, reduction: int = 16, n: int = 4, act: str = "relu"):
        super().__init__()
        self.down_sampler = PHMLinear(dim, dim // reduction, n)
        self.up_sampler = PHMLinear(dim // reduction, dim, n)
        self.act = act

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up_sampler(COMPACTER_ACTS[self.act](self.down_sampler(y)))


def _run_adapter(module: nn.Linear, inputs, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def add_adapters(model: MCLIPText, make: Callable[[int], nn.Module]) -> None:
    """make(width) after every layer's output.dense and attention.output.dense (the reference's modified_modules).
    The adapter is a submodule of the linear layer, so the base weights keep their released names."""
    for name, module in model.transformer.encoder.named_modules():
        if name.endswith("output.dense") and isinstance(module, nn.Linear):
            module.adapter = make(module.out_features).to(module.weight.device)
            module.register_forward_hook(_run_adapter)


def add_lora(model: MCLIPText, r: int, alpha: int, targets: Sequence[str] = ("query", "value")) -> None:
    """peft LoRA on every layer's modules named by targets (the reference: OpenDelta LoRA r 8, alpha 16, dropout 0;
    A Kaiming-uniform, B zero, as peft's default)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
    inject_adapter_in_model(cfg, model.transformer)


def add_soft_prompt(model: MCLIPText, tokenizer, prefix: str | None, n_tokens: int, std: float = 0.02) -> None:
    """Soft prompt initialised from the prefix's token embeddings (without <s> and </s>), else N(0, std^2) with
    n_tokens rows (the reference: soft_token_num 4, std 0.02)."""
    emb = model.transformer.embeddings.word_embeddings.weight
    if prefix:
        ids = data.encode_texts(tokenizer, [prefix])[0][0, 1:-1]
        init = emb.detach()[ids]
    else:
        init = torch.empty(n_tokens, emb.shape[1]).normal_(mean=0.0, std=std)
    model.prompt = SoftPrompt(init.to(emb.device))


def apply_pet(model: MCLIPText, pet: str, args, tokenizer=None) -> None:
    """Freeze and extend the model for --pet. full: every parameter trains (the reference without
    --delta_tuning); none: nothing trains (zero-shot); lora/adapter/compacter: the modules + the output LayerNorms;
    prompt: the soft prompt only. The projection LinearTransformation stays frozen under PET, as run_XTD.py, except
    lora_cross: run_cross.py's LoRA (query, key, value, attention.output.dense) + the output LayerNorms + the
    pooler + LinearTransformation (the configuration PECTVLM's published run scripts use, with --lora_r 1)."""
    model.requires_grad_(pet == "full")
    if pet == "full":
        model.tuned = [n for n, _ in model.named_parameters()]
        return
    if pet in LORA_TARGETS:
        add_lora(model, args.lora_r, args.lora_alpha, LORA_TARGETS[pet])
    elif pet == "adapter":
        add_adapters(model, lambda width: BottleneckAdapter(width, args.adapter_dim))
    elif pet == "compacter":
        add_adapters(model, lambda width: Compacter(width, args.compacter_reduction, args.phm_dim, args.compacter_act))
    elif pet == "prompt":
        add_soft_prompt(model, tokenizer, args.soft_prefix, args.soft_tokens)
    for name, p in model.named_parameters():  # peft marks its own modules trainable; keep exactly ours
        with_ln = pet in ("lora", "lora_cross", "adapter", "compacter") and _is_output_ln(name)
        p.requires_grad_(
            _is_pet_param(name, pet)
            or with_ln
            or (pet == "lora_cross" and name.startswith(("LinearTransformation.", "transformer.pooler.")))
        )
    model.tuned = [n for n, p in model.named_parameters() if p.requires_grad]


def _is_output_ln(name: str) -> bool:
    """The encoder's attention.output.LayerNorm and output.LayerNorm of every layer: what the reference's
    unfrozen_modules=['output.LayerNorm'] matches (OpenDelta matches by name suffix; not the embeddings' one)."""
    return name.startswith("transformer.encoder.") and ".output.LayerNorm." in name


def _is_pet_param(name: str, pet: str) -> bool:
    return {
        "lora": ".lora_" in name,
        "lora_cross": ".lora_" in name,
        "adapter": ".adapter." in name,
        "compacter": ".adapter." in name,
        "prompt": name.startswith("prompt."),
    }.get(pet, False)


def tuned_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters --pet tunes (fixed by apply_pet: a freeze policy's changing requires_grad does not alter it)."""
    names = set(getattr(model, "tuned", ()))
    return {n: p for n, p in model.named_parameters() if n in names}


# --tuning-head (run_XTD.py --tuning_head, its head group at --head_lr 3e-6; docs/reference_facts.md#F-pectvlm-args):
# off = without the flag; reference = what the flag does: it sets the attribute requires_grad on the pooler and
# LinearTransformation modules, not on their parameters, so its head group is empty and the run trains exactly what
# it trains without the flag; corrected = those parameters train, in a group of their own at --head-lr.
TUNING_HEAD = ("off", "reference", "corrected")
HEAD_PREFIXES = ("transformer.pooler.", "LinearTransformation.")


def apply_tuning_head(model: MCLIPText, mode: str) -> None:
    """--tuning-head corrected: the pooler's and LinearTransformation's parameters join the tuned ones (saved in the
    run's state with the PET module). M-CLIP pools by the mean, so the pooler never gets a gradient (Adam skips it):
    of the head, only LinearTransformation moves. off / reference: nothing changes."""
    if mode != "corrected":
        return
    for name, p in model.named_parameters():
        if name.startswith(HEAD_PREFIXES):
            p.requires_grad_(True)
    tuned = set(model.tuned) | {n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIXES)}
    model.tuned = [n for n, _ in model.named_parameters() if n in tuned]


def optimizer_groups(model: MCLIPText, args) -> list[dict]:
    """Adam's parameter groups without a freeze schedule. off: one group at --lr. reference: run_XTD.py's two
    groups (:302-318), the head first: {trainable parameters named pooler / LinearTransformation, --head-lr} (empty:
    the flag trained none of them) and {every trainable parameter, --lr}; corrected: {the head, --head-lr} and
    {the rest, --lr}. The head group comes first in both, as the reference orders them."""
    params = tuned_params(model)
    mode = getattr(args, "tuning_head", "off")
    if mode == "off":
        return [{"params": list(params.values()), "lr": args.lr}]
    if mode == "reference":  # the reference's own selection, by substring of the name
        head = [p for n, p in params.items() if "pooler" in n or "LinearTransformation" in n]
        return [{"params": head, "lr": args.head_lr}, {"params": list(params.values()), "lr": args.lr}]
    head = [p for n, p in params.items() if n.startswith(HEAD_PREFIXES)]
    rest = [p for n, p in params.items() if not n.startswith(HEAD_PREFIXES)]
    return [{"params": head, "lr": args.head_lr}, {"params": rest, "lr": args.lr}]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tuned parameters (a language's PET module, or the whole tower under --pet full), copied to the CPU
    (the best state of a full fine-tuning run would otherwise hold a second tower in accelerator memory)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in tuned_params(model).items()}


def is_added_by_pet(name: str) -> bool:
    return ".lora_" in name or ".adapter." in name or name.startswith("prompt.")


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, base): base counts the text tower's own parameters, not those PET added."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for n, p in model.named_parameters() if not is_added_by_pet(n))


# ---------------------------------------------------------------------------------------------- loss and metric


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)  # the reference's form (no epsilon)


def symmetric_ce(a_n: torch.Tensor, b_n: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """(CE(scale a b^T, diag) + CE(scale b a^T, diag)) / 2 of L2-normalised rows a_n, b_n; the similarities in
    float32 under AMP too."""
    # Under --amp autocast would run this matmul in bf16/fp16. bf16 keeps 8 significant bits: logits of
    # 100 x cos (up to |100|) would be rounded in steps of up to 0.5 (fp16: 1/16), and the softmax reads a
    # logit change of 0.5 as odds x1.65. So the similarity is float32 (B x B x D flops, nothing next to the
    # tower). The cross-entropy needs no cast of ours: autocast runs cross_entropy in float32 itself (on its
    # float32 list, CPU and CUDA), and here its input is float32 already.
    up = torch.promote_types(a_n.dtype, torch.float32)  # float32, or float64 where given (the exact tests)
    with torch.autocast(a_n.device.type, enabled=False):
        logits = scale * a_n.to(up) @ b_n.to(up).T
    labels = torch.arange(len(a_n), device=a_n.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def routine_loss(
    image: torch.Tensor, text: torch.Tensor, partner: torch.Tensor | None, align: str, ratio: float
) -> torch.Tensor:
    """The reference's loss (trainer.py): image-text symmetric CE on the routine's text, plus ratio x the
    alignment term between the text and its partner (routines with one)."""
    image_n, text_n = l2_normalise(image.to(text.dtype)), l2_normalise(text)  # the reference: .float()
    loss = symmetric_ce(image_n, text_n)
    if partner is None:
        return loss
    if align == "mse":
        return loss + ratio * F.mse_loss(text, partner)
    if align == "contrastive":
        return loss + ratio * symmetric_ce(l2_normalise(partner), text_n)
    if align == "contrastive_with_image":
        return loss + ratio * symmetric_ce(image_n, l2_normalise(partner))
    raise ValueError(f"unknown alignment loss {align!r} (have {', '.join(ALIGN_LOSSES)})")


def recall_at_1(image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """Image i matches text i. i2t / t2i R@1 and their mean (the paper's metric), in percent. A tie with the
    match counts as a hit (the reference's topk leaves ties to the kernel; with float scores they do not occur)."""
    sim = l2_normalise(image.float()) @ l2_normalise(text.float()).T
    scoring.metrics.require_finite(sim, "image-text similarities")  # NaN would rank as a hit: R@1 100
    diag = sim.diagonal()
    i2t = (sim > diag[:, None]).sum(1).eq(0).double().mean().item() * 100
    t2i = (sim > diag[None, :]).sum(0).eq(0).double().mean().item() * 100
    return {"i2t_r1": i2t, "t2i_r1": t2i, "mean_r1": (i2t + t2i) / 2}


def disparity(scores: dict[str, float]) -> dict[str, float]:
    """Average, range (max - min) and population standard deviation across languages (paper silent on ddof)."""
    v = np.array(list(scores.values()), dtype=np.float64)
    return {"avg": float(v.mean()), "range": float(v.max() - v.min()), "std": float(v.std())}


# ---------------------------------------------------------------------------------------------- images


def clip_preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """OpenAI CLIP's transform: resize the short side to size (bicubic), centre crop, ToTensor, CLIP Normalize."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return data.normalize_images(torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)))


@torch.no_grad()
def encode_images(vision, paths: Sequence[Path], batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """Projected CLIP image embeddings [N, D] (CLIPVisionModelWithProjection.image_embeds), float32."""
    size = vision.config.image_size
    out = []
    for i in range(0, len(paths), batch_size):
        pix = torch.stack([clip_preprocess(readers.load_image(p), size) for p in paths[i : i + batch_size]])
        out.append(vision(pixel_values=pix.to(device)).image_embeds.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, vision.config.projection_dim)


def read_image_features(path: str | Path) -> dict[str, torch.Tensor]:
    """A features file {"names": [image path, ...], "features": FloatTensor [N, D]} -> {name: row}."""
    obj = torch_files.load_checkpoint(path)
    if not isinstance(obj, dict) or "names" not in obj or "features" not in obj:
        raise ValueError(f"{path}: expected a dict with 'names' and 'features'")
    names, feats = list(obj["names"]), obj["features"]
    if not torch.is_tensor(feats) or feats.dim() != 2 or len(names) != len(feats):
        raise ValueError(f"{path}: 'features' must be [len(names), D], got {getattr(feats, 'shape', type(feats))}")
    return {n: feats[i].float() for i, n in enumerate(names)}


def image_feature_table(splits: dict[str, xtd_data.RetrievalSplit], args) -> dict[str, torch.Tensor]:
    """Every split's image features, from --image-features, or computed once with --clip-vision over --images."""
    needed = sorted({p for s in splits.values() for p in s.images})
    if args.image_features:
        table = read_image_features(args.image_features)
        missing = [p for p in needed if p not in table]
        if missing:
            raise ValueError(f"{args.image_features}: no features for {len(missing)} image(s), e.g. {missing[0]!r}")
    else:
        if not (args.images and args.clip_vision):
            raise ValueError("give --image-features, or --images with --clip-vision")
        table = compute_image_features(needed, args.images, args.clip_vision)
    bad = [p for p in needed if not torch.isfinite(table[p]).all()]
    if bad:
        source = args.image_features or f"--clip-vision {args.clip_vision}"
        raise ValueError(f"{source}: the features of {len(bad)} image(s) hold NaN or inf, e.g. {bad[0]!r}")
    return table


def compute_image_features(
    names: Sequence[str], image_root: str | Path, clip_vision: str | Path, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """CLIP image embeddings of image_root/name for every name; every file is checked before any compute.
    clip_vision: a CLIPVisionModelWithProjection folder or OpenAI's full CLIP release (openai/clip-vit-large-patch14,
    CLIPModel weights: transformers takes its vision tower and projection)."""
    paths = [Path(image_root) / p for p in names]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise ValueError(f"image file {absent[0]} not found ({len(absent)} missing under --images)")
    vision = load_clip_vision(clip_vision)
    feats = encode_images(vision.to(device), paths, device=device)
    return {n: feats[i] for i, n in enumerate(names)}


def load_clip_vision(folder: str | Path):
    """CLIPVisionModelWithProjection from a CLIP release folder (config.json + weights), in eval mode."""
    return load_clip_tower(folder, "vision", "--clip-vision")


def load_clip_tower(folder: str | Path, tower: str, flag: str):
    """CLIP{Vision,Text}ModelWithProjection (tower "vision" / "text") of a CLIP release folder, in eval mode.
    Loaded here rather than by from_pretrained: from a whole-CLIPModel release (OpenAI's layout) it takes the
    projection width from the tower's sub-config instead of CLIPConfig.projection_dim and silently re-initialises
    a projection of the wrong shape. Every key of the tower must be present with its shape (flag names the option
    in the one-line errors)."""
    import transformers
    from transformers import AutoConfig, CLIPConfig

    name = tower.capitalize()
    tower_config, model_class = (
        getattr(transformers, f"CLIP{name}Config"),
        getattr(transformers, f"CLIP{name}ModelWithProjection"),
    )
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {folder}: no readable config.json ({str(e).splitlines()[0]})") from None
    if isinstance(config, CLIPConfig):
        sub = getattr(config, f"{tower}_config")
        sub.projection_dim = config.projection_dim
    elif isinstance(config, tower_config):
        sub = config
    else:
        raise ValueError(f"{flag} {folder}: config is {type(config).__name__}, not a CLIP config")
    model = model_class(sub)
    own = model.state_dict()
    state = {k: v for k, v in read_state_dict(folder).items() if k in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{flag} {folder}: weights lack {len(missing)} {tower} key(s), e.g. {missing[0]!r}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{flag} {folder}: {k} has shape {tuple(v.shape)}, the config {tuple(own[k].shape)}")
    model.load_state_dict(state)
    return model.eval()


def write_image_features(path: str | Path, table: dict[str, torch.Tensor]) -> None:
    names = sorted(table)
    run_folder.save_checkpoint(path, {"names": names, "features": torch.stack([table[n] for n in names])})


# ---------------------------------------------------------------------------------------------- training


def batch_texts(texts: Sequence[str], prompt: str | None) -> list[str]:
    """A hard prompt is the prefix text before each caption (the paper's English hard prompt)."""
    return [f"{prompt} {t}" for t in texts] if prompt else list(texts)


def encode(model: MCLIPText, tokenizer, texts: Sequence[str], device) -> torch.Tensor:
    """The reference's MultilingualCLIP.forward(txt, tokenizer): pad to the longest, no truncation."""
    ids, mask = data.encode_texts(tokenizer, texts)
    return model(ids.to(device), mask.to(device))


@torch.no_grad()
def evaluate(
    model: MCLIPText,
    tokenizer,
    split: xtd_data.RetrievalSplit,
    images: dict[str, torch.Tensor],
    kind: str,
    lang: str,
    args,
    device,
    dist: devices.DistInfo | None = None,
) -> dict[str, float]:
    """R@1 of the split's images against its captions of (kind, lang), texts in chunks of --eval-batch-size.
    Under torchrun each rank encodes its share of the chunks: the chunks (and so their padding) are those of one
    process, so every rank gets the one-process result exactly."""
    was_training = model.training
    model.eval()
    texts = batch_texts(split.captions(kind, lang), args.hard_prompt)
    starts = range(0, len(texts), args.eval_batch_size)
    mine = [starts[c] for c in devices.shard(len(starts), dist)]
    with scoring.evaluate.autocast_for(device, getattr(args, "eval_amp", "off")):  # float32 unless --eval-amp
        feats = [encode(model, tokenizer, texts[i : i + args.eval_batch_size], device).float().cpu() for i in mine]
    feats = devices.gather(feats, dist)
    model.train(was_training)
    image = torch.stack([images[p] for p in split.images])
    return recall_at_1(image, torch.cat(feats))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled training order of an epoch, from (seed, epoch) only: a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def cosine_no_warmup(total_steps: int) -> Callable[[int], float]:
    """transformers.get_cosine_schedule_with_warmup with 0 warm-up steps and half a cycle."""
    return lambda step: max(0.0, 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps))))


def train_step(
    model,
    tokenizer,
    split: xtd_data.RetrievalSplit,
    idx: list[int],
    images,
    args,
    device,
    dist: devices.DistInfo | None = None,
) -> torch.Tensor:
    """The loss of the global batch idx. Under torchrun each rank encodes its shard of idx (devices.shard) and the
    text embeddings of all ranks are gathered with gradient (devices.gather_with_grad), so every rank computes the loss
    of the whole batch (its in-batch negatives included): the one-process loss. Image features are cached, so each rank
    takes the whole batch's from its table."""
    main_kind, partner_kind = ROUTINES[args.routine]
    # the reference computes image features under no_grad: the image tower is frozen and gets no gradient
    image = torch.stack([images[split.images[i]] for i in idx]).detach().to(device)
    sizes = shard_sizes(len(idx), dist)
    start = sum(sizes[: dist.rank]) if sizes else 0
    mine = idx[start : start + sizes[dist.rank]] if sizes else idx
    texts = lambda kind: batch_texts([split.captions(kind, args.lang)[i] for i in mine], args.hard_prompt)  # noqa

    def embed(kind: str) -> torch.Tensor:
        if not mine:  # a last batch smaller than the world leaves this rank without rows
            return torch.zeros(0, model.LinearTransformation.out_features, device=device, requires_grad=True)
        # the tower runs under the caller's autocast (--amp); its output goes to the gather and the loss in float32
        return encode(model, tokenizer, texts(kind), device).float()

    text = embed(main_kind) if not sizes else devices.gather_with_grad(embed(main_kind))
    partner = None
    if partner_kind:
        partner = embed(partner_kind) if not sizes else devices.gather_with_grad(embed(partner_kind))
    return routine_loss(image, text, partner, args.align_loss, args.align_ratio)


def shard_sizes(n: int, dist: "devices.DistInfo | None") -> list[int]:
    """Rows of each rank's shard of a batch of n (devices.shard's split); [] in one process."""
    if dist is None or not dist.distributed:
        return []
    return [len(devices.shard(n, devices.DistInfo(rank=r, world=dist.world))) for r in range(dist.world)]


def sum_gradients(params: Sequence[nn.Parameter], dist: "devices.DistInfo | None") -> None:
    """Sum each trainable parameter's gradient over the ranks (one flat all-reduce). A parameter with a gradient
    on some rank gets the sum (zeros standing in where a rank has none, e.g. an empty shard); one with a gradient
    on no rank keeps None, as in one process (Adam then skips it)."""
    import torch.distributed as tdist

    if dist is None or not dist.distributed:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    tdist.all_reduce(has)
    params = [p for p, h in zip(params, has.tolist()) if h]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    tdist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def fit(
    model, tokenizer, splits, images, args, run_dir: Path, log, device, dist: devices.DistInfo | None = None
) -> dict[str, torch.Tensor]:
    """The reference's loop (trainer.train): step, validate every --eval-steps steps, keep the best state.
    Under torchrun: --batch-size is the global batch, sharded over the ranks (train_step); gradients are
    summed over the ranks (sum_gradients), so every rank takes the one-process step and the ranks stay equal;
    rank 0 writes metrics and checkpoints, which hold every rank's RNG state."""
    dist = dist or devices.DistInfo()
    layout, schedule = freeze_plan(model, args)
    if schedule is None:
        optimizer = torch.optim.Adam(optimizer_groups(model, args), lr=args.lr, weight_decay=0.0)
    else:  # every parameter in fixed groups; frozen ones get no gradient, so Adam skips them
        optimizer = torch.optim.Adam(freeze.param_groups(model, layout, schedule, args.lr, 0.0), weight_decay=0.0)
    n = len(splits["train"].images)
    steps_per_epoch = math.ceil(n / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_no_warmup(steps_per_epoch * args.epochs))
    logged = -1 if getattr(args, "tuning_head", "off") != "off" else 0  # the --lr group's (after the head's)
    amp_dtype, scaler = engine.setup_amp(args.amp, device)
    # engine's counters (epoch, step, nonfinite_steps, amp_skipped_steps, metrics_offset); best: the best validation
    # mean R@1, the step it was reached at and that state of the trainable parameters
    prog, best = progress.Progress(), {"r1": -1.0, "step": -1, "state": trainable_state(model)}
    ckpt = run_dir / run_folder.CHECKPOINT
    if args.resume and ckpt.is_file():
        try:
            prog, best = resume_from(ckpt, model, optimizer, sched, scaler, log, device, dist)
        except ValueError as e:
            raise SystemExit(f"error: --resume: {e}") from None
    main_kind = ROUTINES[args.routine][0]
    model.train()
    for epoch in range(prog.epoch, args.epochs):
        order = epoch_order(n, args.seed, epoch)
        for b in range(0, n, args.batch_size):
            if schedule is not None:
                freeze.apply_schedule(model, layout, schedule, epoch, prog.step)
            idx = order[b : b + args.batch_size]
            with devices.autocast(device, amp_dtype):
                loss = train_step(model, tokenizer, splits["train"], idx, images, args, device, dist)
            # every rank holds the loss of the whole batch and devices.gather_with_grad's backward sums the ranks'
            # gradients of the gathered rows: each rank backpropagates 1/world of it, so its rows get their
            # one-process gradient (exactly, for a power-of-two world) before the text tower's (fp16) backward
            ((scaler.scale(loss) if scaler is not None else loss) / dist.world).backward()
            # every rank holds the loss of the whole batch: the same finiteness, the same summed (scaled)
            # gradients, so the GradScaler takes the same decision (and scale) on every rank
            sum_gradients(list(tuned_params(model).values()), dist)
            n_bad = (~torch.isfinite(loss.detach())).float()
            # engine's step: unscale (fp16), skip a non-finite update, step or let the GradScaler skip, zero_grad,
            # LR schedule (no clipping: the reference clips nothing)
            ok, amp_skipped, _, _ = engine.optimizer_step(model, optimizer, sched, scaler, 0.0, n_bad, dist)
            prog.step += 1
            prog.nonfinite_steps += not ok
            prog.amp_skipped_steps += amp_skipped
            log.write(train_record(epoch, prog, loss, sched.get_last_lr()[logged]))
            if prog.step % args.eval_steps == 0:
                try:
                    val = evaluate(model, tokenizer, splits["val"], images, main_kind, args.lang, args, device, dist)
                except FloatingPointError as e:
                    raise FloatingPointError(f"validation at step {prog.step}: {e}") from None
                log.write({"type": "val", "epoch": epoch, "step": prog.step, **val})
                if val["mean_r1"] >= best["r1"]:
                    best = {"r1": val["mean_r1"], "step": prog.step, "state": trainable_state(model)}
        prog.epoch = epoch + 1
        prog.metrics_offset = log.size()
        rngs = devices.gather([engine.rng_state(device)], dist)  # every rank's: each has its own dropout stream
        if dist.is_main:
            run_folder.save_checkpoint(
                ckpt,
                {
                    "model": trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rngs,
                    "world": dist.world,
                    "progress": vars(prog),
                    "best": {"r1": best["r1"], "step": best["step"]},
                    "best_state": best["state"],
                },
            )
        engine.barrier(dist)  # no rank runs ahead of a checkpoint it might have to resume from
    progress.check_made_progress(prog, run_dir)  # the trainers' guard: no result from a run without a finite step
    return best["state"]


def mclip_layout(model: MCLIPText) -> "freeze.LayerLayout":
    """The text tower's layers for freeze.py: XLM-R's encoder layers; embeddings, pooler and the projection
    (the "head") outside them."""
    return freeze.layout_from_rules(
        model.transformer.config.num_hidden_layers,
        [("transformer.encoder.layer.", 0, 1)],
        [
            ("transformer.embeddings.", "embeddings"),
            ("transformer.pooler.", "pooler"),
            ("LinearTransformation.", "head"),
        ],
        task_head_modules=("head",),
    )


def freeze_plan(model: MCLIPText, args) -> tuple["freeze.LayerLayout | None", "freeze.Schedule | None"]:
    """--policy on the whole text tower (--pet full only): SUF, LLRD or top-m next to the PET methods, a comparison
    none of the papers has. The policy full is the reference's full fine-tuning; no schedule is then needed."""
    if getattr(args, "policy", "full") == "full":
        return None, None
    layout = mclip_layout(model)
    return layout, freeze.schedule_from_args(args, layout.num_layers)


def train_record(epoch: int, prog: progress.Progress, loss: torch.Tensor, lr: float) -> dict:
    return {
        "type": "train",
        "epoch": epoch,
        "step": prog.step,
        "loss": loss.item(),
        "lr": lr,
        "nonfinite_steps": prog.nonfinite_steps,
        "amp_skipped_steps": prog.amp_skipped_steps,
    }


def resume_from(ckpt: Path, model, optimizer, sched, scaler, log, device, dist) -> tuple[progress.Progress, dict]:
    """Every rank reads the checkpoint and takes its own RNG state. Another number of processes is refused: each
    rank's dropout stream is part of the state, so the result would not be the uninterrupted run's."""
    state = torch_files.load_checkpoint(ckpt)
    if state.get("world", 1) != dist.world:
        raise ValueError(
            f"{ckpt}: saved by {state.get('world', 1)} process(es), resumed with {dist.world}; "
            f"--resume with the same number of processes"
        )
    load_trainable(model, state["model"], str(ckpt))
    optimizer.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:  # --amp fp16 (the resume check keeps --amp)
        scaler.load_state_dict(state["scaler"])
    rngs = [state["rng"]] if isinstance(state["rng"], dict) else state["rng"]  # one process's, before torchrun
    engine.set_rng_state(rngs[dist.rank], device)
    counters = dict(state["progress"])
    if "metrics_size" in counters:  # written before Progress (training/progress.py): best score and step were counters
        counters["metrics_offset"] = counters.pop("metrics_size")
        state["best"] = {"r1": counters.pop("best"), "step": counters.pop("best_step")}
    prog = progress.Progress(**counters)
    log.truncate(prog.metrics_offset)
    return prog, {**state["best"], "state": state["best_state"]}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a trainable-parameter state (a PET module) into the model; names must be exactly its trainable ones."""
    params = tuned_params(model)
    if set(params) != set(state):
        diff = sorted(set(params) ^ set(state))
        raise ValueError(f"{source}: trainable parameters differ from this --pet setting (e.g. {diff[0]!r})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


# ---------------------------------------------------------------------------------------------- CLI


# The reference's published run scripts (PECTVLM scripts/de.sh, scripts/grid_method*/<lang>.sh): Adam, weight
# decay 0, no warm-up, 50 epochs, batch 5, validation every 5 steps, eval batch 100, seed 1, XTD split seed 42,
# n_shot 50, lr 1e-4 and alignment ratio 0.5 (scripts/de.sh; the grids search lr {5e-5, 1e-4, 2e-4} and ratio
# {0.003 ... 0.5}, and the paper does not report the chosen values). LoRA r 8: the paper's (0.16%); those scripts
# pass --lora_r 1. run_XTD.py's argparse defaults differ (batch 4, every 4 steps, lr 1e-3, ratio 1.0).
DEFAULTS = {
    "lr": 1e-4,
    "epochs": 50,
    "batch_size": 5,
    "eval_steps": 5,
    "eval_batch_size": 100,
    "split_seed": 42,
    "seed": 1,
    "align_ratio": 0.5,
    "lora_r": 8,
    "lora_alpha": 16,
    "adapter_dim": 24,
    "soft_tokens": 4,
    "compacter_reduction": 16,
    "phm_dim": 4,
    "head_lr": 3e-6,  # run_XTD.py --head_lr (:31), used by --tuning-head
}

# Where the defaults come from: they mix two of the reference's scripts: run_XTD.py's LoRA (r 8, query/value,
# LinearTransformation frozen) with scripts/de.sh's numbers for run_cross.py (lr 1e-4, ratio 0.5, batch 5, validation
# every 5 steps, eval batch 100). --preset NAME gives one published script's settings instead (a flag given on the
# command line still wins); docs/mclip.md#presets. Values: PECTVLM 22b7594 (docs/reference_facts.md#F-pectvlm-args).
PRESETS = {
    # align_from_to_en/run_XTD.py's argparse defaults (:29-52) with --delta_tuning (its LoRA: r 8 on query/value)
    "run_xtd": {
        "pet": "lora",
        "lora_r": 8,
        "epochs": 50,
        "batch_size": 4,
        "eval_batch_size": 200,
        "eval_steps": 4,
        "lr": 1e-3,
        "seed": 1,
        "split_seed": 42,
        "align_loss": "mse",
        "align_ratio": 1.0,
        "test_text": "routine",
    },
    # align_from_to_en/run_cross.py's argparse defaults (:26-44) with --delta_tuning (LoRA r 1 on query, key, value,
    # attention.output.dense; LinearTransformation and pooler trained too; its test-text mapping)
    "run_cross": {
        "pet": "lora_cross",
        "lora_r": 1,
        "epochs": 50,
        "batch_size": 4,
        "eval_batch_size": 200,
        "eval_steps": 4,
        "lr": 1e-3,
        "seed": 1,
        "align_loss": "mse",
        "align_ratio": 1.0,
        "test_text": "run_cross",
    },
    # scripts/de.sh (:3-19; the other languages' <lang>.sh alike): run_cross.py with these flags
    "de_sh": {
        "pet": "lora_cross",
        "lora_r": 1,
        "routine": "method1",
        "epochs": 50,
        "batch_size": 5,
        "eval_batch_size": 100,
        "eval_steps": 5,
        "lr": 1e-4,
        "seed": 1,
        "align_loss": "mse",
        "align_ratio": 0.5,
        "test_text": "run_cross",
    },
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """build_parser's arguments, with --preset's values as the defaults (flags given explicitly win)."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
    d = DEFAULTS
    p.add_argument("--dataset", choices=tuple(DATASETS), required=True, help="multi30k: task 1; multi30k_task2")
    p.add_argument("--data-root", required=True, help="XTD10 or multi30k-dataset folder (PECTVLM layout)")
    p.add_argument("--lang", required=True, help="target language of this run")
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="one published PECTVLM script's settings (run_xtd: run_XTD.py's defaults; run_cross: run_cross.py's; "
        "de_sh: scripts/<lang>.sh). Default: run_XTD.py's LoRA r 8 with scripts/de.sh's lr 1e-4, ratio 0.5, batch 5",
    )
    p.add_argument("--routine", choices=tuple(ROUTINES), default="method3")
    p.add_argument("--align-loss", choices=ALIGN_LOSSES, default="mse")
    p.add_argument("--align-ratio", type=float, default=d["align_ratio"], help="weight of the alignment term")
    p.add_argument("--pet", choices=PETS, default="lora", help="none = zero-shot (no training)")
    p.add_argument(
        "--n-shot",
        type=int,
        default=50,
        help="XTD: train/val images (50: 50/50/900); Multi30K: train subsample (0 = full data)",
    )
    p.add_argument("--split-seed", type=int, default=d["split_seed"])
    p.add_argument(
        "--test-text",
        choices=("routine", "run_cross"),
        default="routine",
        help="routine: test on the text the routine trains on; run_cross: PECTVLM run_cross.py's mapping "
        "(baseline1/method1 tested on MT->en, baseline2/method2/method3 on the native text)",
    )
    p.add_argument("--hard-prompt", default=None, help="text put before every caption, e.g. 'a photo of'")
    p.add_argument("--soft-prefix", default=None, help="--pet prompt: initialise from this text's token embeddings")
    p.add_argument("--soft-tokens", type=int, default=d["soft_tokens"], help="--pet prompt without --soft-prefix")
    p.add_argument("--lora-r", type=int, default=d["lora_r"])
    p.add_argument("--lora-alpha", type=int, default=d["lora_alpha"])
    p.add_argument("--adapter-dim", type=int, default=d["adapter_dim"])
    p.add_argument(
        "--compacter-reduction", type=int, default=d["compacter_reduction"], help="Compacter bottleneck = width / this"
    )
    p.add_argument("--phm-dim", type=int, default=d["phm_dim"], help="Compacter's n (hypercomplex division)")
    p.add_argument(
        "--compacter-act",
        choices=tuple(COMPACTER_ACTS),
        default="relu",
        help="Compacter's activation: relu as the reference ran it (OpenDelta's CompacterConfig default); gelu_new "
        "= CompacterModel's own default, which that config overrides",
    )
    p.add_argument(
        "--tuning-head",
        choices=TUNING_HEAD,
        default="off",
        help="run_XTD.py's --tuning_head: reference = as it ran (its head group at --head-lr is empty: trains what off "
        "trains); corrected = the pooler and LinearTransformation train at --head-lr in a group of their own",
    )
    p.add_argument("--head-lr", type=float, default=d["head_lr"], help="--tuning-head's group (run_XTD.py's 3e-6)")
    p.add_argument("--text-config", default="large", help="large | tiny | a json of TEXT_CONFIGS keys")
    p.add_argument("--text-checkpoint", default=None, help="M-CLIP text weights (folder or file)")
    p.add_argument(
        "--random-init", action="store_true", help="train a randomly initialised text tower (no --text-checkpoint)"
    )
    p.add_argument("--tokenizer", required=True, help="XLM-R tokenizer folder (M-CLIP's release ships one)")
    p.add_argument("--image-features", default=None, help="{'names', 'features'} torch file of CLIP image embeddings")
    p.add_argument("--images", default=None, help="image root (XTD: train2014/ val2014/; Multi30K: flickr30k-images/)")
    p.add_argument(
        "--clip-vision",
        default=None,
        help="CLIP release folder (openai/clip-vit-large-patch14) or a CLIPVisionModelWithProjection one",
    )
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--eval-steps", type=int, default=d["eval_steps"])
    p.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="text tower dropout (hidden and attention); default: XLM-R's 0.1, as the reference trains. "
        "0: torchrun over N processes takes the one-process steps (within float rounding)",
    )
    p.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="off",  # the reference trains the text tower in float32: its published numbers
        help="training precision: off = float32 (the reference's); auto = bf16 on GPUs that support it, else off "
        "(always off on CPU); fp16 uses a GradScaler (its state is in checkpoint_last.pt)",
    )
    p.add_argument(
        "--eval-amp",
        choices=("off", "bf16", "fp16"),
        default="off",
        help="validation and test precision (default float32: the best state is chosen on exact scores)",
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--load-pet",
        default=None,
        help="model_final.pt of an earlier run: start from its module (with --eval-only: evaluate it)",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="train nothing: test the module as loaded (--load-pet) or initialised; --epochs stays >= 1",
    )
    freeze.add_policy_args(p)
    return p


# Arguments a --resume must repeat (they change the result; paths may move): engine's (those this parser has) and
# ours; engine.check_resume_args compares them with the run's args.json.
RESUME_KEYS = engine.RESUME_KEYS + tuple(
    """dataset lang routine align_loss align_ratio pet n_shot split_seed hard_prompt soft_prefix soft_tokens lora_r
    lora_alpha adapter_dim compacter_reduction compacter_act phm_dim text_config eval_steps eval_batch_size
    eval_amp tuning_head head_lr""".split()
)


def check_resume_args(args, run_dir: Path) -> None:
    """One-line SystemExit if --resume changes an argument the interrupted run was started with."""
    try:
        saved = json.loads((run_dir / run_folder.ARGS).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --resume: cannot read {run_dir / run_folder.ARGS} ({e})") from None
    if saved.get("pet") == "compacter" and "compacter_act" not in saved:
        saved = {**saved, "compacter_act": "gelu_new"}  # runs started before --compacter-act ran gelu_new
    engine.check_resume_args(args, saved, RESUME_KEYS, run_dir / run_folder.ARGS)


# Ranges of M-CLIP's own numbers, checked with engine's (epochs, lr, batch sizes, dropout, ...) by the trainers' one
# check (engine.check_arg_ranges) right after parsing.
ARG_RULES = {
    "align_ratio": engine.NOT_NEGATIVE,
    "n_shot": engine.NOT_NEGATIVE,
    "head_lr": engine.NOT_NEGATIVE,
    **dict.fromkeys(
        "eval_steps soft_tokens lora_r lora_alpha adapter_dim compacter_reduction phm_dim".split(), engine.AT_LEAST_1
    ),
}


def check_args(args) -> None:
    engine.check_arg_ranges(args, ARG_RULES)
    if args.random_init and args.text_checkpoint:
        raise SystemExit("error: --random-init and --text-checkpoint: give one (random weights or M-CLIP's)")
    langs = DATASETS[args.dataset]
    # a set in XTD10's layout with other languages (the synthetic world's, synthetic/mclip_study.py) has its caption
    # file
    other_xtd = args.dataset == "xtd" and Path(args.data_root, xtd_data.XTD_FILES["native"].format(args.lang)).is_file()
    if args.lang not in langs and not other_xtd:
        raise SystemExit(f"error: --lang {args.lang}: {args.dataset} has {', '.join(langs)}")
    if args.policy != "full" and args.pet != "full":
        raise SystemExit(f"error: --policy {args.policy} schedules the whole text tower: it needs --pet full")
    check_tuning_head(args)
    if args.pet != "none" and args.n_shot == 0 and args.dataset == "xtd":
        raise SystemExit("error: XTD10 has no training split without --n-shot; use --pet none for zero-shot")


def check_tuning_head(args) -> None:
    """--tuning-head: only where run_XTD.py's flag could run, or where the corrected head group is defined."""
    mode = args.tuning_head
    if mode == "off":
        return
    if args.pet == "none":  # (with --eval-only, corrected names the module --load-pet holds: PET + head)
        raise SystemExit(f"error: --tuning-head {mode}: --pet none trains nothing")
    if args.policy != "full":
        raise SystemExit(f"error: --tuning-head {mode} with --policy {args.policy}: the policy sets the head's lr")
    if mode == "reference" and args.pet in ("full", "lora_cross"):
        # run_XTD.py would put the trainable pooler / LinearTransformation in both of its groups: torch refuses
        raise SystemExit(
            f"error: --tuning-head reference with --pet {args.pet}: the pooler and LinearTransformation already "
            f"train, so run_XTD.py's two groups would share them (torch refuses); use --tuning-head corrected"
        )


def check_schedule(args, n_train: int) -> None:
    """A run must validate at least once: the state it tests is the best validated one (the reference would fail
    loading a best checkpoint it never wrote)."""
    if args.pet == "none" or args.eval_only:
        return
    steps = math.ceil(n_train / args.batch_size) * args.epochs
    if steps < args.eval_steps:
        raise ValueError(
            f"{steps} optimizer steps ({n_train} training examples, --batch-size {args.batch_size}, "
            f"--epochs {args.epochs}) never reach --eval-steps {args.eval_steps}: nothing would be "
            f"validated"
        )


def resolve_text_config(name: str) -> str | dict:
    if name in TEXT_CONFIGS:
        return name
    try:
        cfg = json.loads(Path(name).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --text-config {name}: not {' / '.join(TEXT_CONFIGS)} nor a readable json ({e})")
    unknown = sorted(set(cfg) ^ set(TEXT_CONFIGS["large"]))
    if unknown:
        raise SystemExit(f"error: --text-config {name}: key {unknown[0]!r} missing or unknown")
    return cfg


def load_splits(args) -> dict[str, xtd_data.RetrievalSplit]:
    langs = sorted({args.lang, "en"})
    if args.dataset == "xtd":
        return xtd_data.xtd_splits(xtd_data.load_xtd(args.data_root, langs), args.n_shot, args.split_seed)
    task = 2 if args.dataset == "multi30k_task2" else 1
    return xtd_data.multi30k_splits(args.data_root, langs, args.n_shot, args.split_seed, task)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        return print_table(argv[1:])
    if argv[:1] == ["features"]:
        return features_main(argv[1:])
    args = parse_args(argv)
    check_args(args)
    if not (args.text_checkpoint or args.random_init):
        raise SystemExit(
            "error: no --text-checkpoint: give M-CLIP's text weights (the release folder), or --random-init to "
            "train a randomly initialised text tower"
        )
    dist = engine.setup_distributed()
    try:
        return run(args, dist)
    finally:
        engine.cleanup_distributed()


def run(args, dist: "devices.DistInfo") -> dict:
    """One language's run, in one process or as one of torchrun's ranks (each holds the whole model and the
    image-feature table; --batch-size is the global batch)."""
    run_dir = engine.check_run_dir(args, dist)
    device = dist.device
    try:
        splits = load_splits(args)
        check_schedule(args, len(splits["train"].images))
        images = image_feature_table(splits, args)
        tokenizer = tokenizer_check.load_tokenizer(args.tokenizer)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    config = resolve_text_config(args.text_config)
    engine.seed_everything(args.seed)  # the same on every rank: the ranks start from the same weights
    model = build_text_model(config, args.dropout)
    if args.text_checkpoint:
        try:
            load_text_weights(model, read_state_dict(args.text_checkpoint), args.text_checkpoint)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    width = next(iter(images.values())).shape[0]
    if width != model.LinearTransformation.out_features:
        raise SystemExit(
            f"error: image features are {width}-d, the text tower's output "
            f"{model.LinearTransformation.out_features}-d (another CLIP than this M-CLIP was made for?)"
        )
    try:
        apply_pet(model, args.pet, args, tokenizer)
        apply_tuning_head(model, args.tuning_head)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.load_pet:
        load_pet_file(model, args.load_pet, args.pet)
    model.to(device)
    if dist.distributed:  # each rank its own dropout stream (a resumed run restores each; see resume_from)
        engine.seed_everything(args.seed * 1_000_003 + 7919 * (dist.rank + 1))
    trainable, base = count_params(model)
    log = run_folder.MetricsLog(run_dir / run_folder.METRICS, dist.is_main)
    if run_folder.resuming(args, run_dir):
        check_resume_args(args, run_dir)
    elif dist.is_main:
        log.truncate(0)
        (run_dir / run_folder.ARGS).write_text(json.dumps(run_folder.json_safe(vars(args)), indent=1) + "\n")
        log.write(
            {
                "type": "params",
                "trainable": trainable,
                "base": base,
                "share_pct": 100 * trainable / base,
                "world": dist.world,
            }
        )
    best = trainable_state(model)
    test_kind = ROUTINES[args.routine][0] if args.test_text == "routine" else RUN_CROSS_TEST_TEXT[args.routine]
    try:  # non-finite scores (validation or test) end the run as one line: no model_final.pt, no results.json
        if args.pet != "none" and not args.eval_only:
            best = fit(model, tokenizer, splits, images, args, run_dir, log, device, dist)
            load_trainable(model, best, "best validation state")
        try:
            test = evaluate(model, tokenizer, splits["test"], images, test_kind, args.lang, args, device, dist)
        except FloatingPointError as e:
            raise FloatingPointError(f"test: {e}") from None
    except (ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}; {run_folder.FINAL} and results.json not written") from None
    log.write({"type": "test", **test})
    meta = {
        "model": "mclip",
        "text_config": config,
        "pet": args.pet,
        "routine": args.routine,
        "lang": args.lang,
        "dataset": args.dataset,
        "n_shot": args.n_shot,
        "test_text": test_kind,
        "policy": args.policy,
        "tuning_head": args.tuning_head,
        "trainable": trainable,
        "base": base,
        "args": run_folder.json_safe(vars(args)),
    }
    result = {**{k: v for k, v in meta.items() if k != "args"}, "test": test}
    if dist.is_main:
        run_folder.save_checkpoint(run_dir / run_folder.FINAL, {"model": best, "meta": meta})
        run_folder.atomic_write_text(run_dir / "results.json", json.dumps(result, indent=1, default=str) + "\n")
        print(json.dumps({"lang": args.lang, "routine": args.routine, "pet": args.pet, **test}))
    engine.barrier(dist)
    return result


def load_pet_file(model: MCLIPText, path: str, pet: str) -> None:
    """Start from a saved language module (model_final.pt of an earlier run with the same --pet)."""
    try:
        obj = torch_files.load_checkpoint(path)
        meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
        if meta.get("model") != "mclip" or meta.get("pet") != pet:
            raise ValueError(
                f"{path}: not a train_mclip.py --pet {pet} module (meta: model {meta.get('model')!r}, "
                f"pet {meta.get('pet')!r})"
            )
        load_trainable(model, obj["model"], path)
    except ValueError as e:
        raise SystemExit(f"error: --load-pet {e}") from None


def features_main(argv: Sequence[str]) -> dict:
    """`train_mclip.py features`: the --image-features file of every image of a dataset's splits (the image tower
    is frozen and dropout-free, so one file serves every run, language, routine and PET method)."""
    p = cli.ArgumentParser(prog="train_mclip.py features")
    p.add_argument("--dataset", choices=tuple(DATASETS), required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--clip-vision", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # N ranks would all compute the table and write one file
        raise SystemExit("error: train_mclip.py features runs in one process; launch it without torchrun")
    if Path(a.out).exists():
        raise SystemExit(f"error: --out {a.out} exists; remove it or choose another path")
    try:
        if a.dataset == "xtd":
            names = xtd_data.load_xtd(a.data_root, ["en"]).images
        else:
            task = 2 if a.dataset == "multi30k_task2" else 1
            splits = [xtd_data.load_multi30k(a.data_root, s, ["en"], task) for s in xtd_data.MULTI30K_SPLITS]
            names = sorted({n for split in splits for n in split.images})
        cuda = torch.cuda.is_available() and os.environ.get("SUF_DEVICE", "") != "cpu"
        table = compute_image_features(names, a.images, a.clip_vision, "cuda" if cuda else "cpu")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_image_features(a.out, table)
    print(f"{len(table)} image features -> {a.out}")
    return table


# The paper's reported improvement, as our seed summary states it (arXiv 2305.03510's abstract and results): vs
# Multilingual-CLIP's baseline, across the 11 languages of XTD and Multi30K, in zero-shot, few-shot and full data.
# Our seed material holds no per-language numbers (nor the baseline's range / std), so none are printed.
REPORTED_DROP = {"range": 5.0, "std": 1.5}
REPORTED_LINE = (
    "paper (arXiv 2305.03510, as our seed summary states it): multilingual disparity down by > 5 points "
    "of range and > 1.5 points of std vs the baseline, on XTD and Multi30K, zero-shot, few-shot and full "
    "data; our seed material has no per-language numbers, so none are printed beside ours"
)


def table_args(argv: Sequence[str]) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="train_mclip.py table", description="Per-language test R@1, average, range and std of train_mclip.py runs."
    )
    p.add_argument("runs", nargs="+", help="run folders (each with results.json)")
    p.add_argument(
        "--baseline",
        default=None,
        help="a group as this table names it (e.g. xtd/baseline1/none/50/test:native): every other group "
        "of its dataset gets its change of range and std against it",
    )
    return p.parse_args(argv)


def read_groups(run_dirs: Sequence[str]) -> dict[str, dict[str, float]]:
    """{group name: {lang: test mean R@1}}; group = dataset/routine/pet/n_shot[/test:<text kind>][/policy:<p>]
    [/head:<--tuning-head>] (the policy is named when it is not full: `--pet full --policy suf` runs are a group of
    their own; so are --tuning-head reference / corrected runs)."""
    groups: dict[tuple, dict[str, float]] = {}
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: {path}: no results (run unfinished?)")
        r = readers.read_json(path, annotations=False)
        key = (r["dataset"], r["routine"], r["pet"], r["n_shot"])
        key += (f"test:{r['test_text']}",) if "test_text" in r else ()
        key += (f"policy:{r['policy']}",) if r.get("policy", "full") != "full" else ()
        key += (f"head:{r['tuning_head']}",) if r.get("tuning_head", "off") != "off" else ()
        scores = groups.setdefault(key, {})
        if r["lang"] in scores:
            raise SystemExit(f"error: {path}: a second {r['lang']} run of group {'/'.join(map(str, key))}")
        scores[r["lang"]] = r["test"]["mean_r1"]
    return {"/".join(map(str, k)): v for k, v in sorted(groups.items())}


def against_baseline(
    stats: dict[str, float], scores: dict[str, float], base_stats: dict[str, float], base_scores: dict[str, float]
) -> dict:
    """Change of range and std (run - baseline; negative = less disparity) and whether each drop exceeds the
    paper's reported one. Only over the same languages: range and std of other language sets do not compare."""
    if set(scores) != set(base_scores):
        return {"error": f"languages differ ({','.join(sorted(scores))} vs {','.join(sorted(base_scores))})"}
    change = {f"{m}_change": stats[m] - base_stats[m] for m in REPORTED_DROP}
    return {
        **change,
        **{f"{m}_drop_exceeds_reported": -change[f"{m}_change"] > drop for m, drop in REPORTED_DROP.items()},
    }


def print_table(argv: Sequence[str]) -> dict:
    """Per-language test mean R@1 of each (dataset, routine, pet, n_shot) group, with average, range and std; the
    paper's reported improvement; with --baseline, each group's change of range and std against that group.
    XTD10 numbers: 800 of its 1,000 images are COCO train images, on which M-CLIP was trained."""
    args = table_args(argv)
    groups = read_groups(args.runs)
    if args.baseline is not None and args.baseline not in groups:
        raise SystemExit(f"error: --baseline {args.baseline}: no such group among the runs (have {', '.join(groups)})")
    stats = {name: disparity(scores) for name, scores in groups.items()}
    out = {}
    print(REPORTED_LINE)
    for name, scores in groups.items():
        s = stats[name]
        out[name] = {**scores, **s}
        cells = " ".join(f"{l}={v:.1f}" for l, v in sorted(scores.items()))
        note = "  (XTD10: 800/1000 images are COCO train, seen by M-CLIP)" if name.startswith("xtd/") else ""
        print(f"{name}: {cells} | avg {s['avg']:.2f} range {s['range']:.2f} std {s['std']:.2f}{note}")
        base = args.baseline
        if base is None or base == name or base.split("/")[0] != name.split("/")[0]:
            continue
        vs = against_baseline(s, scores, stats[base], groups[base])
        out[name]["vs_baseline"] = {"baseline": base, **vs}
        if "error" in vs:
            print(f"  vs {base}: not compared: {vs['error']}")
            continue
        verdict = lambda m: "exceeds" if vs[f"{m}_drop_exceeds_reported"] else "does not exceed"  # noqa: E731
        print(
            f"  vs {base}: range {vs['range_change']:+.2f} ({verdict('range')} the reported drop of 5), "
            f"std {vs['std_change']:+.2f} ({verdict('std')} the reported drop of 1.5)"
        )
    return out


if __name__ == "__main__":
    cli.run_main(main)
