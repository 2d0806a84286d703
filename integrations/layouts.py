"""A freeze.LayerLayout for any nn.Module: the user names the stack of layers (a module path such as
`bert.encoder.layer`, or a regex over parameter names with the layer id as its first group, as timm's
group_matcher does), the embeddings and the task head; find_layer_stack finds the stack of common Hugging Face
architectures (BERT/XLM-R `encoder.layer`, ViT/CLIP/SigLIP `encoder.layers`, decoder-only LMs `model.layers`)
and refuses where there is more than one candidate. Every parameter must be mapped: an unmapped one is an error
that names the modules to add (as freeze.layout_from_rules does), so that policy top and --freeze-embeddings
never silently train or freeze something the user did not name.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch.nn as nn

import freeze
from freeze import LayerLayout


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _widest(name: str, names: list[str], lost: set[str]) -> str:
    """The outermost module holding `name` all of whose parameters are in `lost` (the name itself if none)."""
    parts, best = name.split("."), name
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if not all(n in lost for n in names if _under(n, path)):
            break
        best = path
    return best


def find_layer_stack(model: nn.Module) -> str:
    """Module path of the model's stack of layers: the outermost nn.ModuleList whose entries are blocks of one
    class holding parameters. Raises ValueError when there is none or more than one (e.g. CLIPModel's text and
    vision towers, T5's encoder and decoder): then name the stack with layers=."""
    found = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or any(_under(path, f) for f, _ in found):
            continue
        kinds = {type(b) for b in m}
        if len(kinds) == 1 and all(any(True for _ in b.parameters()) for b in m):
            found.append((path, f"{path} ({len(m)} x {kinds.pop().__name__})"))
    if len(found) != 1:
        what = "no stack of layers" if not found else "several stacks of layers: " + ", ".join(d for _, d in found)
        raise ValueError(f"{type(model).__name__} has {what}; name the one to schedule with layers='<module path>'")
    return found[0][0]


def find_embeddings(model: nn.Module, stack: str) -> tuple[str, ...]:
    """The outermost modules with 'embed' in their name (embeddings, embed_tokens, ...) that hold parameters
    and are not inside the layer stack."""
    out: list[str] = []
    for path, m in model.named_modules():
        last = path.rsplit(".", 1)[-1].lower()
        if "embed" in last and not _under(path, stack) and not any(_under(path, o) for o in out):
            if any(True for _ in m.parameters()):
                out.append(path)
    return tuple(out)


def layout_for(
    model: nn.Module,
    layers: str | None = None,
    *,
    layer_regex: str | None = None,
    embeddings: Sequence[str] | None = None,
    head: Sequence[str] = (),
    others: Sequence[str] = (),
) -> LayerLayout:
    """LayerLayout of `model`. layers: module path of the stack (None: find_layer_stack), or layer_regex: a
    pattern matched at the start of every parameter name whose first group is the layer id (0 = bottom).
    embeddings: module paths frozen by freeze_embeddings and decayed most by LLRD (None: find_embeddings).
    head: the task head (the only non-layer modules policy top trains); others: the remaining modules (final
    norm, pooler, another tower), always trainable. Each non-layer parameter's freeze module is its path."""
    if layers is not None and layer_regex is not None:
        raise ValueError("give layers= or layer_regex=, not both")
    if layer_regex is None:
        layers = layers or find_layer_stack(model)
        layer_regex = re.escape(layers) + r"\.(\d+)\."
    rx = re.compile(layer_regex)
    names = [n for n, _ in model.named_parameters()]
    ids = [int(m.group(1)) for n in names if (m := rx.match(n))]
    if not ids:
        raise ValueError(f"no parameter of {type(model).__name__} matches the layer pattern {layer_regex!r}")
    embeddings = tuple(find_embeddings(model, layers) if embeddings is None and layers else embeddings or ())
    paths = [*embeddings, *head, *others]

    def layer_of(name: str) -> int | None:
        m = rx.match(name)
        return int(m.group(1)) if m else None

    def module_of(name: str) -> str:
        return next(p for p in paths if _under(name, p))

    lost = {n for n in names if layer_of(n) is None and not any(_under(n, p) for p in paths)}
    unmapped = sorted({_widest(n, names, lost) for n in lost})
    if unmapped:
        raise ValueError(
            f"{type(model).__name__}: parameters outside the layers in no named module: {', '.join(unmapped)}; "
            "add them to head= (trains under policy top) or others= (always trains)"
        )
    out = LayerLayout(max(ids) + 1, layer_of, module_of, embeddings, tuple(head))
    freeze.locate(model, out)  # every layer 0..N-1 holds parameters
    return out
