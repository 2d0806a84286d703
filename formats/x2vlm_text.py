"""X2-VLM's text cleaning of captions and questions (dataset/utils.py's pre_caption / pre_question), as its
fine-tuning datasets apply it.

  pre_caption(text, max_words)      captions, hypotheses, MaRVL statements: lower, punctuation out, first max_words
  pre_question(text, max_words)     xGQA questions (whitespace runs kept, as the reference)

Not on the reading path: data.py's CCLM datasets call these once per text (the image transforms are data.py's).
"""

from __future__ import annotations

import re

_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")


def pre_caption(caption: str, max_words: int) -> str:
    """X2-VLM caption/hypothesis cleaning: lower, punctuation -> space, '-' '/' -> space, <person> -> person,
    collapse whitespace, strip, keep the first `max_words` words."""
    text = _PUNCT.sub(" ", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise ValueError(f"text is empty after cleaning (raw: {caption!r})")
    return text


def pre_question(question: str, max_words: int) -> str:
    """X2-VLM question cleaning: lower, punctuation -> space, '-' '/' -> space, right-strip spaces, keep the
    first `max_words` space-separated pieces (whitespace runs are not collapsed, as in the reference)."""
    text = _PUNCT.sub(" ", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text
