"""Checks of a loaded IGLUE split as a whole (data.load_split makes one call): example ids that repeat.

  unique_ids(examples, path, task, split) -> examples   ValueError naming the file and both records of the first
                                    id that repeats where ids must be unique

Which splits must have unique ids, per task:
  xgqa       every split: GQA's question ids are unique in each of its files (training ones too; the native
             format is a dict keyed by them), so a repeat is a damaged or concatenated file.
  xvnli      evaluation splits (every split but train / train_<n>): a test pair counted twice is scored twice,
             and prediction files are keyed by pairID. Training splits may repeat a pairID (SNLI-VE's pairIDs
             are not promised unique across a file; a repeated training pair only weighs more).
  xflickrco  evaluation splits, ids "<id>#<caption number>": a repeated line would be scored twice. Training
             splits as xvnli.

Not on the reading path: the loaders read what the file says; this is the one-line refusal of what a scorer
would count twice.
"""

from __future__ import annotations

from typing import Sequence


def must_be_unique(task: str, split: str) -> bool:
    """Whether example ids must be unique in this split of this task (see the module docstring)."""
    return task == "xgqa" or not split.startswith("train")


def unique_ids(examples: Sequence, path, task: str, split: str) -> Sequence:
    """examples itself; a ValueError naming the file, the first repeated id and its two records (`.source`), and
    how many examples repeat an earlier id, where must_be_unique(task, split)."""
    if not must_be_unique(task, split):
        return examples
    first: dict[str, object] = {}
    repeat = None
    count = 0
    for ex in examples:
        seen = first.setdefault(ex.id, ex)
        if seen is not ex:
            count += 1
            repeat = repeat or (seen, ex)
    if repeat is not None:
        a, b = repeat
        shown = repr(a.id) if len(a.id) <= 80 else repr(a.id[:80]) + "..."
        raise ValueError(
            f"{path}: example id {shown} repeats ({a.source} and {b.source}; {count} of {len(examples)} examples "
            f"repeat an earlier id); ids must be unique in {task} split {split!r} (each example is scored once, "
            "by its id)"
        )
    return examples
