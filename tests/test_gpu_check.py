"""bench/gpu_check.py (make gpu-check) in its CPU self-test: every section runs on the CPU at tiny size, says so,
and records what only a GPU can do as skipped with the reason; one JSON report of the documented format is written
even when a section fails. And bench/suf_step.py's row-wise AdamW check: why SUF keeps the embedding table's dense
AdamW update (docs/choices.md)."""

import json
import sys
from pathlib import Path

import pytest

from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import gpu_check, suf_step  # noqa: E402

SECTIONS = ["steps", "agreement", "suf_vs_full", "loader", "torchrun"]


@pytest.mark.system
def test_cpu_self_test_runs_every_section_and_names_what_needs_a_gpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--cpu", "--out", str(out), "--torchrun-timeout", str(scaled(120))])
    report = json.loads(out.read_text())
    assert rc == 0, json.dumps({k: v.get("reason") or v.get("rows") for k, v in report["sections"].items()})[-3000:]
    assert report["check"] == "gpu_check" and report["device"] == "cpu" and report["gpu"] is None and report["ok"]
    assert list(report["sections"]) == SECTIONS
    for name, sec in report["sections"].items():
        assert sec["status"] == "ok" and sec["device"] == "cpu", name
        ran = [r for r in sec["rows"] if r["status"] != "skipped"]
        assert ran and all(r["status"] == "ok" for r in ran), name
    steps = report["sections"]["steps"]["rows"]
    ran = {(r["model"], r["precision"]) for r in steps if r["status"] == "ok"}
    assert ran == {(m, p) for m in ("uc2", "cclm") for p in ("off", "bf16", "fp16")}
    assert all(r["width"] == "tiny" and r["updates_applied"] == 3 and r["finite"] for r in steps if r["status"] == "ok")
    assert {r["width"] for r in steps if r["status"] == "skipped"} == {"base"}
    for r in report["sections"]["agreement"]["rows"]:
        if r["status"] == "ok":
            assert r["relative_difference"] <= r["tolerance"] == gpu_check.TOLERANCE[r["precision"]]
    suf = {r["model"] + " " + r["config"]: r for r in report["sections"]["suf_vs_full"]["rows"]}
    assert suf["uc2 full"]["flop_ratio"] == 1.0 and suf["uc2 suf stage 0 (epoch 1)"]["flop_ratio"] < 1.0
    assert all(r["peak_memory_bytes"] is None for r in suf.values())  # a CPU has no max_memory_allocated
    assert all(r["samples_per_s"] > 0 and r["consumes_samples_per_s"] > 0 for r in report["sections"]["loader"]["rows"])
    (run,) = report["sections"]["torchrun"]["rows"]
    assert run["nproc"] == 2 and run["backend"] == "gloo" and run["returncode"] == 0
    assert run["trainable_layers"][0] != run["trainable_layers"][-1]  # through SUF's stage change
    skipped = "\n".join(report["skipped"])
    for reason in gpu_check.GPU_ONLY.values():
        assert reason in skipped


def test_a_failing_section_is_reported_and_fails_the_check(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setitem(gpu_check.SECTIONS, "agreement", broken)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--cpu", "--out", str(out), "--sections", "agreement"]) == 1
    report = json.loads(out.read_text())
    sec = report["sections"]["agreement"]
    assert not report["ok"] and sec["status"] == "failed" and sec["device"] == "cpu"
    assert sec["reason"] == "RuntimeError: no kernel image is available"


def test_adamw_moves_rows_without_gradient_so_a_rowwise_update_differs():
    r = suf_step.rowwise_adamw_check()
    # rows no token touched still move: decoupled weight decay, and the first moment decaying into updates
    assert r["rows_without_gradient_moved_by_adamw"] > 1e-3
    assert r["rows_without_gradient_moved_by_adamw_no_decay"] > 1e-3
    assert r["rowwise_vs_adamw_max_difference"] > 1e-3 and r["rowwise_vs_adamw_max_difference_no_decay"] > 1e-3
    assert r["control_all_rows_max_difference"] < 1e-6  # the row-wise update IS AdamW when every row is given
