"""What every bench shares: the machine a result was measured on, a wall-clock timer, a FLOP counter, and writing
the result file (bench/results/<bench>.json, which `python -m bench.table` turns into docs/benchmarks.md's table)."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode

from formats import run_folder

RESULTS = Path(__file__).resolve().parent / "results"
# The tests' tiny model configs (tests/fixtures/configs: the keys they change over the trainer's base config),
# read by path as data files: bench/ imports nothing from tests/.
TINY_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "configs"
UC2_TINY = str(TINY_CONFIGS / "uc2_tiny.json")
CCLM_TINY = str(TINY_CONFIGS / "cclm_tiny.json")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU, cores, torch, Python, OS and the load average now (a shared machine's load moves timings)."""
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch}, Python {platform.python_version()}, "
        f"{platform.system()} (load average now {load})"
    )


def run_info() -> dict:
    """The date and machine fields every result file starts with."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine()}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def flops(fn) -> int:
    """The FLOPs torch counts for fn() (its matmuls, convolutions and attention: torch.utils.flop_counter)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def write_result(out: str | Path, result: dict) -> None:
    run_folder.atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
