"""Checked fields of one annotation record (a JSON line or item): each wrong value is a one-line ValueError naming
the record (`where`: "<file>:<line>" or "<file> item <i>") and the field.

  field(obj, key, where)            obj[key]; a missing field names it
  text(value, where, key) -> str    a JSON string (null, a number or a list would be trained on as "None", "12345")
  ident(value, where, key) -> str   a JSON string or integer (question / pair / image ids), as its decimal string

Not on the reading path: data.py's annotation loaders and formats/nlvr2_marvl.py read every field through these.
"""

from __future__ import annotations

import json


def field(obj: dict, key: str, where: str):
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    return obj[key]


def text(value, where: str, key: str) -> str:
    """A text field must be a JSON string: null, a number or a list would be trained on as "None", "12345"..."""
    if not isinstance(value, str):
        shown = json.dumps(value)[:60]
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {shown}")
    return value


def ident(value, where: str, key: str) -> str:
    """An identifier (question, pair, image id) is a JSON string or integer: null or a list would become "None" or
    "[1]" in prediction files and feature lookups."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        shown = json.dumps(value)[:60]
        raise ValueError(f"{where}: field {key!r} must be a string or an integer, got {type(value).__name__} {shown}")
    return str(value)
