"""`make` as a user types it, from the repository root. The tests themselves may run under `make test PY=...`
(README): make passes its command-line variables to child makes through MAKEFLAGS, so the inherited make
variables are removed, or every target the tests inspect would print that PY instead of its own."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INHERITED = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PY")


def run_make(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in INHERITED}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, env=clean)
