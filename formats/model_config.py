"""--model-config: a model's configuration by name (the trainer's CONFIGS table) or from a JSON file (its keys
override the "base" config; UC2 also reads VOLTA's config files), and the check that every width divides by its
number of attention heads.

Not on the reading path: a trainer makes one call here. A file a user hands us is a format: its errors are one
line naming the file and the key.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from formats import readers


def read_model_config(
    name: str,
    configs: dict[str, dict],
    optional: Sequence[str] = (),
    foreign: Callable[[dict], dict | None] | None = None,
) -> dict:
    """--model-config NAME|FILE: a copy of configs[NAME], or a JSON file whose keys override configs["base"];
    foreign(d) converts a file in another format (UC2: VOLTA's config) and returns None for one of ours."""
    if name in configs:
        return dict(configs[name])
    if not os.path.isfile(name):
        raise SystemExit(f"error: --model-config {name!r}: not one of {', '.join(configs)} and no such file")
    try:
        cfg = readers.read_json(name, annotations=False)
    except ValueError as e:
        raise SystemExit(f"error: --model-config {e}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"error: --model-config {name}: expected a JSON object of config keys")
    converted = foreign(cfg) if foreign is not None else None
    if converted is not None:
        return converted
    unknown = sorted(set(cfg) - set(configs["base"]) - set(optional))
    if unknown:
        raise SystemExit(f"error: --model-config {name}: unknown key {unknown[0]!r}")
    return {**configs["base"], **cfg}


def check_heads(config: dict, pairs: list[tuple[str, str]], source: str) -> None:
    """One-line SystemExit when a width of the model config is not divisible by its number of attention heads
    (torch would fail later, deep in the first forward pass). pairs: (width key, heads key)."""
    for width, heads in pairs:
        w, h = config.get(width), config.get(heads)
        if not (isinstance(w, int) and isinstance(h, int) and w >= 1 and h >= 1 and w % h == 0):
            raise SystemExit(
                f"error: --model-config {source}: {width} {w} is not divisible by {heads} {h} "
                f"(each attention head takes {width} / {heads} dimensions)"
            )
