"""Synthetic MaRVL batches in the contract's layouts (docs: PLAN's MaRVL contract, data.UC2Collate / CCLMCollate
"marvl"), for model tests that need no data files: UC2 grouped by pair [B,2,...] (slot 0 = left image),
CCLM images [2B,...] (all left images, then all right ones)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LABELS = (1, 0, 1, 0)


def uc2_batch(config: dict, b: int = 3, length: int = 6, regions: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config["vocab_size"], (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 3:] = config["pad_token_id"]  # a shorter caption
    image_mask = torch.ones(b, 2, regions, dtype=torch.long)
    image_mask[0, 1, -1] = 0  # the right image of example 0 has a padded region
    label = torch.tensor(LABELS[:b])
    return {
        "input_ids": ids[:, None].repeat(1, 2, 1),  # the caption once per image (VOLTA's question.repeat)
        "attention_mask": ids.ne(config["pad_token_id"]).long()[:, None].repeat(1, 2, 1),
        "features": torch.randn(b, 2, regions, config["v_feature_size"], generator=g),
        "spatials": torch.rand(b, 2, regions, config["num_locs"], generator=g),
        "image_mask": image_mask,
        "target": F.one_hot(label, 2).float(),
        "label": label,
    }


def uc2_swapped(batch: dict) -> dict:
    """The same examples with left and right images exchanged."""
    return {k: v.flip(1) if k in ("features", "spatials", "image_mask") else v for k, v in batch.items()}


def uc2_slot(batch: dict, slot: int) -> list[torch.Tensor]:
    """encode()'s five inputs for one image of every pair."""
    return [batch[k][:, slot] for k in ("input_ids", "attention_mask", "features", "spatials", "image_mask")]


def cclm_batch(config: dict, b: int = 3, length: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config["vocab_size"], (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    atts = torch.ones(b, length, dtype=torch.long)
    ids[1, 3:], atts[1, 3:] = config["pad_token_id"], 0
    res = config["image_res"]
    return {
        "images": torch.randn(2 * b, 3, res, res, generator=g),  # normalised float: left images, then right
        "text_ids": ids,
        "text_atts": atts,
        "label": torch.tensor(LABELS[:b]),
    }


def cclm_swapped(batch: dict) -> dict:
    b = batch["text_ids"].shape[0]
    return {**batch, "images": torch.cat([batch["images"][b:], batch["images"][:b]])}
