"""Loading a tokenizer safely (local files only, no remote code; XLM-R's special ids checked: load_tokenizer) and
which tokenizer a checkpoint was trained with: tokenizer_fingerprint (recorded in our checkpoints' meta) and
check_tokenizer_vocab (a tokenizer that cannot belong to the model is a one-line error: out-of-range ids, or not
the vocabulary the weights were trained with, which would silently map tokens to the wrong rows).

Not on the reading path: the trainers call check_tokenizer_vocab once, after loading weights.
"""

from __future__ import annotations

import hashlib
import os

XLMR_SPECIAL_IDS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}  # data.BOS_ID, PAD_ID, EOS_ID, UNK_ID


def tokenizer_fingerprint(tokenizer) -> str:
    """12 hex digits of sha1 over the vocabulary (id, token): tells two tokenizers of the same size apart."""
    h = hashlib.sha1()
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{i}\t{token}\n".encode())
    return h.hexdigest()[:12]


def check_tokenizer_vocab(
    tokenizer,
    embedding_rows: int,
    tokenizer_name: str,
    checkpoint: str | None = None,
    checkpoint_meta: dict | None = None,
) -> None:
    """One-line SystemExit when the tokenizer cannot belong to the model: more ids than embedding rows
    (out of range), or not the tokenizer `checkpoint` was trained with: released / reference weights
    (checkpoint_meta None) were trained with XLM-R's full vocabulary (embedding_rows ids); ours record its
    size and vocabulary fingerprint (tokenizer_size, tokenizer_vocab) in checkpoint_meta (absent: unknown).
    A different vocabulary would silently map tokens to the wrong pre-trained rows. Random-init models
    (tiny config, tests) may have spare rows. Both trainers call it after loading weights."""
    if checkpoint is None:
        trained = {}
    elif checkpoint_meta is None:  # released / reference weights
        trained = {"tokenizer_size": embedding_rows}
    else:
        trained = checkpoint_meta
    n, trained_ids, trained_vocab = len(tokenizer), trained.get("tokenizer_size"), trained.get("tokenizer_vocab")
    if trained_ids is not None and n != trained_ids:
        raise SystemExit(
            f"error: --tokenizer {tokenizer_name} has {n} ids but checkpoint {checkpoint} was trained with "
            f"a {trained_ids}-id tokenizer; use the tokenizer the checkpoint was trained with"
        )
    vocab = tokenizer_fingerprint(tokenizer) if trained_vocab is not None else None
    if vocab != trained_vocab:
        raise SystemExit(
            f"error: --tokenizer {tokenizer_name} is not the tokenizer checkpoint {checkpoint} was trained "
            f"with (same size, different vocabulary: fingerprint {vocab} vs {trained_vocab}); "
            f"use the tokenizer the checkpoint was trained with"
        )
    if n > embedding_rows:
        raise SystemExit(
            f"error: --tokenizer {tokenizer_name} has {n} ids but the model config's vocab_size is "
            f"{embedding_rows} (ids >= {embedding_rows} have no embedding); use a matching tokenizer or config"
        )


def check_special_ids(tok, name: str) -> None:
    """A tokenizer whose special ids are not XLM-R's (every model here embeds with XLM-R's ids): ValueError."""
    got = {
        "<s>": tok.convert_tokens_to_ids("<s>"),
        "<pad>": tok.pad_token_id,
        "</s>": tok.convert_tokens_to_ids("</s>"),
        "<unk>": tok.unk_token_id,
    }
    want = XLMR_SPECIAL_IDS
    if got != want:
        raise ValueError(f"tokenizer {name}: special ids {got} differ from XLM-R's {want}")


def load_tokenizer(path_or_hub_id: str | os.PathLike):
    """XLM-R tokenizer from a local folder or the local Hugging Face cache (never downloads)."""
    from transformers import AutoTokenizer

    name = str(path_or_hub_id)
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception:
        raise ValueError(
            f"tokenizer {name!r} not found locally: give a folder with tokenizer files (e.g. a saved "
            f"xlm-roberta-base tokenizer) or a hub id already in the local HF cache"
        ) from None
    check_special_ids(tok, name)
    return tok
