"""CCLM's reference checkpoint format: X2-VLM's load_pretrained, key by key, and the checkpoint reader.

Not on the reading path: train_cclm.py calls `load_state(model, state)` (after `read_checkpoint(path)`), which
maps the released pretraining checkpoint (cclm_x2vlm_base.th) as X2-VLM's load_pretrained(is_eval=False) does
(docs/reference_facts.md#F-cclm-load-pretrained, #F-cclm-relpos-resize) or loads a fine-tuned one as it is.
The model is only passed in; the plan says what happened to every key (X2-VLM's ft_<task>.init_from_pretrain.tsv
rows: x2vlm_rows).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from formats import load_plan
from formats import torch_files


def resize_rel_pos_bias_table(table: torch.Tensor, dst_grid: int, num_extra: int = 3) -> torch.Tensor:
    """X2-VLM beit2.interpolate_pos_embed (docs/reference_facts.md#F-cclm-relpos-resize) for one [(2G-1)^2+3, heads]
    table: bicubic spline through the source grid placed at geometric-progression coordinates, sampled at
    integer offsets; float64 (scipy interp2d 'cubic' == RectBivariateSpline(kx=ky=3, s=0) on a regular
    grid), cast to float32."""
    from scipy.interpolate import RectBivariateSpline

    src_size = int((table.shape[0] - num_extra) ** 0.5)
    dst_size = 2 * dst_grid - 1
    if src_size == dst_size:
        return table.clone()
    left, right = 1.01, 1.5
    while right - left > 1e-6:  # q with 1 + q + ... + q^(src//2 - 1) ~ dst//2 (reference bisection)
        q = (left + right) / 2.0
        if (1.0 - q ** (src_size // 2)) / (1.0 - q) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    coords = np.array([-d for d in reversed(dis)] + [0.0] + dis)
    t = dst_size // 2
    target = np.arange(-t, t + 0.1, 1.0)
    grid = table[:-num_extra].detach().float().cpu().numpy().astype(np.float64)
    heads = [
        torch.from_numpy(
            RectBivariateSpline(coords, coords, grid[:, h].reshape(src_size, src_size), kx=3, ky=3, s=0)(
                target, target
            ).astype(np.float32)
        ).reshape(-1, 1)
        for h in range(table.shape[1])
    ]
    return torch.cat([torch.cat(heads, dim=1).to(table.device, table.dtype), table[-num_extra:]], dim=0)


# the keys each task model adds to the pretraining checkpoint's (X2-VLM's init_params: random init, lr x lr_mult)
NEW_KEYS = {
    "xvnli": ("cls_head.",),
    "xgqa": ("text_decoder.bert.embeddings.", "text_decoder.cls."),
    "xflickrco": (),
    "marvl": ("cls_head.",),  # XVLMPlusForMARVL's build_mlp(2 * text_width, 2)
}
PRETRAIN_ONLY = ("bbox_head.", "mlm_head.")
RETRIEVAL_KEYS = ("temp", "vision_proj.", "text_proj.", "itm_head.")


def _starts(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p) for p in prefixes)


def _is_decoder_cross_kv(key: str) -> bool:
    return key.startswith("text_decoder.bert.encoder.layer.") and (
        ".crossattention.self.key." in key or ".crossattention.self.value." in key
    )


PRETRAINING = "CCLM pretraining"  # the plan's format name for the released cclm_x2vlm_base.th
# X2-VLM's names (ft_<task>.init_from_pretrain.tsv) for the model keys a pretraining plan leaves as they are
NEW_RANDOM_INIT, OWN_BUFFER = "new_random_init", "model_buffer_not_in_ckpt"
KEEP_BUFFER = "drop_from_ckpt_keep_model_buffer"  # the checkpoint's (224) index buffer is dropped, the model's kept
UNUSED = "unused_pretrain_key"  # ... and for a checkpoint key the model does not use
INTERPOLATE = "interpolate_224_to_384"  # a copy through resize_rel_pos_bias_table


def plan_pretrained(
    ckpt_shapes: dict[str, tuple], model_shapes: dict[str, tuple], buffers: set[str], task: str, source: str = ""
) -> load_plan.LoadPlan:
    """How each fine-tuning key gets its value from the CCLM pretraining checkpoint, as the reference's
    load_pretrained(is_eval=False) does (docs/reference_facts.md#F-cclm-load-pretrained): copies under the same
    name, the xGQA decoder's layers from the cross encoder, the ViT's relative position tables interpolated to the
    new grid;
    the task's new keys and the model's buffers keep their values (reasons: X2-VLM's action names); the
    pretraining-only keys are dropped. Shapes only, so it runs on meta tensors; check with raise_if_bad."""
    plan = load_plan.LoadPlan(PRETRAINING, source)
    # XVLMPlusForVQA.load_pretrained copies no cross-attention key/value (weights and biases) into the
    # decoder when its K/V input width (hidden) differs from the cross encoder's (vision_width)
    kv = "encoder.layer.0.crossattention.self.key.weight"
    fresh_kv = task == "xgqa" and model_shapes.get("text_decoder.bert." + kv) != model_shapes.get("cross_encoder." + kv)
    for key, shape in model_shapes.items():
        src = key
        if task == "xgqa" and key.startswith("text_decoder.bert.encoder.layer."):
            src = "cross_encoder." + key[len("text_decoder.bert.") :]  # decoder = copy of the cross encoder
        if fresh_kv and _is_decoder_cross_kv(key):
            plan.initialised.append((key, NEW_RANDOM_INIT))
        elif "relative_position_index" in key:
            plan.initialised.append((key, KEEP_BUFFER if key in ckpt_shapes else OWN_BUFFER))
        elif src in ckpt_shapes:
            resized = "relative_position_bias_table" in key and tuple(ckpt_shapes[src]) != tuple(shape)
            plan.copy[key] = (src, INTERPOLATE if resized else "full")
        elif key in buffers:
            plan.initialised.append((key, OWN_BUFFER))
        elif _starts(key, NEW_KEYS[task]):
            plan.initialised.append((key, NEW_RANDOM_INIT))
        # else: no rule places it: finish_load_plan reports it missing
    used = {src for src, _ in plan.copy.values()} | {key for key, why in plan.initialised if why == KEEP_BUFFER}
    allowed_unused = PRETRAIN_ONLY + (() if task == "xflickrco" else RETRIEVAL_KEYS)
    for key in sorted(set(ckpt_shapes) - used):
        (plan.dropped.append((key, UNUSED)) if _starts(key, allowed_unused) else plan.unexpected.append(key))
    return load_plan.finish_load_plan(plan, ckpt_shapes, model_shapes, fits={INTERPOLATE: lambda s, t: s[1:] == t[1:]})


def x2vlm_rows(plan: load_plan.LoadPlan, model_keys) -> list[tuple[str, str, str]]:
    """A pretraining plan as X2-VLM's rows (finetune_key, action, pretrain_key) of ft_<task>.init_from_pretrain.tsv:
    model keys first (in model order), then ("-", "unused_pretrain_key", key)."""
    kept = dict(plan.initialised)
    rows = []
    for key in model_keys:
        if key in plan.copy:
            src, how = plan.copy[key]
            rows.append((key, how if how != "full" else "load_same_name" if src == key else "copy_renamed", src))
        else:
            rows.append((key, kept[key], key if kept[key] == KEEP_BUFFER else "-"))
    return rows + [("-", why, key) for key, why in plan.dropped]


def pretrained_load_plan(
    ckpt_shapes: dict[str, tuple], model_shapes: dict[str, tuple], buffers: set[str], task: str
) -> list[tuple[str, str, str]]:
    """plan_pretrained as X2-VLM's rows (x2vlm_rows). Raises ValueError naming the first key that fits none of
    the rules."""
    plan = plan_pretrained(ckpt_shapes, model_shapes, buffers, task)
    plan.raise_if_bad()
    return x2vlm_rows(plan, model_shapes)


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict, our run meta or None) from {'model': state_dict, 'meta' | 'config': ...} (ours /
    the reference's) or a bare state_dict."""
    try:
        ck = torch_files.read_torch_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: checkpoint file not found") from None
    except (torch_files.UnsafeCheckpointError, torch_files.OversizedFileError):
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling problem: one line naming the file
        raise ValueError(f"{path}: cannot read checkpoint: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    state = ck["model"] if isinstance(ck, dict) and "model" in ck else ck
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path}: expected a state_dict or {{'model': state_dict, ...}}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    meta = ck.get("meta") if isinstance(ck, dict) and isinstance(ck.get("meta"), dict) else None
    return state, meta


def is_pretraining_state(state: dict) -> bool:
    return any(_starts(k, PRETRAIN_ONLY) for k in state)


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> str:
    """Initialise a fine-tuning model from the CCLM pretraining state_dict exactly as the reference's
    load_pretrained(is_eval=False) does; returns a readable report."""
    own = model.state_dict()
    buffers = {n for n, _ in model.named_buffers() if n in own}
    plan = plan_pretrained(
        {k: tuple(v.shape) for k, v in state.items()},
        {k: tuple(v.shape) for k, v in own.items()},
        buffers,
        model.task,
        source,
    )
    grid = model.config["image_res"] // model.config["patch_size"]
    load_plan.apply_load_plan(
        model, state, plan, {INTERPOLATE: lambda ours, src: ours.copy_(resize_rel_pos_bias_table(src.float(), grid))}
    )
    rows = x2vlm_rows(plan, own)
    counts: dict[str, int] = {}
    for _, a, _ in rows:
        counts[a] = counts.get(a, 0) + 1
    new = [k for k, a, _ in rows if a == NEW_RANDOM_INIT]
    unused = [s for _, a, s in rows if a == UNUSED]
    return (
        f"loaded pretrained CCLM into {model.task}: "
        + ", ".join(f"{a} {n}" for a, n in counts.items())
        + f"\n  new (random init): {', '.join(new) or 'none'}\n  unused checkpoint keys: {', '.join(unused) or 'none'}"
    )


def load_finetuned(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """A fine-tuned state_dict of the reference layout (or ours): loaded as is (reference is_eval=True)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = load_plan.plan_same_names(
        {k: tuple(v.shape) for k, v in state.items()}, own, f"{model.task} model layout", source
    )
    load_plan.apply_load_plan(model, state, plan)
    return f"loaded fine-tuned {model.task} weights from {source}: {len(state)} entries"


def load_checkpoint(model: nn.Module, path: str) -> str:
    """The released pretraining checkpoint (mapped: docs/reference_facts.md#F-cclm-load-pretrained) or a
    fine-tuned one (as is)."""
    return load_state(model, read_checkpoint(path)[0], f"checkpoint {path}")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> str:
    if is_pretraining_state(state):
        return load_pretrained(model, state, source)
    return load_finetuned(model, state, source=source)
