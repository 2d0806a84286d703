"""CallCounter: counts a model's calls to its retrieval building blocks (bench/retrieval.py and the tests check
the scoring protocols with it; it lives here because bench/ must not import tests/)."""

from __future__ import annotations

from typing import Callable

import torch


class CallCounter:
    """Counts, per method, the calls a model's own methods receive and the rows (images / captions / pairs) that
    went through them. The counting wrappers are set on the model instance (they shadow the class's methods), so
    calls the model makes on itself (retrieval_scores -> encode_images, ...) are counted too."""

    METHODS = (
        "encode_images",
        "encode_texts",
        "itm_scores",
        "pair_scores",
        "encode_embedded",
        "itm_image_kv",
        "itm_scores_with_image_kv",
    )

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.calls = {m: 0 for m in self.METHODS}
        self.rows = {m: 0 for m in self.METHODS}
        for m in self.METHODS:
            if hasattr(model, m):
                setattr(model, m, self._counted(m, getattr(model, m)))
        self.embedded = {"captions": 0, "images": 0}  # UC2: rows through its embeddings layer, per modality
        if isinstance(getattr(model, "embeddings", None), torch.nn.Module):
            model.embeddings.register_forward_hook(self._count_embedded)

    def _count_embedded(self, module, inputs, output) -> None:
        self.embedded["captions"] += inputs[0].shape[0]
        self.embedded["images"] += inputs[1].shape[0]

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.calls, 0)
        self.rows = dict.fromkeys(self.rows, 0)
        self.embedded = dict.fromkeys(self.embedded, 0)

    def _counted(self, name: str, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            self.calls[name] += 1
            first = args[0] if args else next(iter(kwargs.values()))
            self.rows[name] += first["input_ids"].shape[0] if isinstance(first, dict) else first.shape[0]
            return fn(*args, **kwargs)

        return counted
