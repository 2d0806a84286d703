"""The table of docs/benchmarks.md from bench/results/*.json (make bench): SUF step-time ratios and optimizer
state (bench/suf_step.py), retrieval encoder calls, FLOPs and speed-up (bench/retrieval.py), bf16 against
float32 evaluation (bench/eval_precision.py), run-cost estimates (bench/run_cost.py); any other JSON is listed
generically. Rewrites the part of docs/benchmarks.md between its two table markers, with the date and the
machine, and prints it.

    .venv/bin/python -m bench.table [bench/results] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from bench import _common

Row = tuple[str, str, str]  # benchmark, what, result
PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- table: make bench writes from here -->", "<!-- table: to here -->"


# ---------------------------------------------------------------- one function per bench


def _per_attempt(r: dict) -> str:
    """Every attempt's measured ratio and deviation (bench/suf_step.py keeps them all)."""
    atts = r.get("attempts") or []
    if len(atts) < 2:
        return ""
    return (
        "; median of "
        + str(len(atts))
        + " attempts: "
        + ", ".join(f"{a['measured_ratio']:.2f}x ({a['deviation']:+.0%})" for a in atts)
    )


def suf_step(res: dict) -> list[Row]:
    rows, out = res.get("rows", []), []
    full = {r["model"]: r for r in rows if r.get("config") == "full"}
    for r in rows:
        state = r.get("optimizer_state_bytes", 0) / 2**20
        f = full.get(r["model"])
        what = f"{r['model'].upper()} {r['config']}" + (
            f" ({len(r['trainable_layers'])} layers train)" if "trainable_layers" in r else ""
        )
        if r.get("config") == "full":
            result = f"step {r['step_s']:.3f} s; optimizer state {state:,.0f} MB"
        else:
            share = (
                f" ({state / (f['optimizer_state_bytes'] / 2**20):.0%} of full)"
                if f and f.get("optimizer_state_bytes")
                else ""
            )
            result = (
                f"step {r['measured_ratio']:.2f}x full, predicted {r['predicted_ratio']:.2f}x ({r['deviation']:+.0%})"
                f"{_per_attempt(r)}; optimizer state {state:,.0f} MB{share}"
            )
        out.append(("SUF step time", what, result))
    out += _retried_attempts(res)
    if "ok" in res:
        out.append(
            (
                "SUF step time",
                "measured within tolerance of the counted work",
                f"{'yes' if res['ok'] else 'NO'} (tolerance {res.get('tolerance', 0):.0%}"
                f"{'' if res.get('gated', True) else ', --quick: not gated'})",
            )
        )
    return out


def _retried_attempts(res: dict) -> list[Row]:
    """Results of the former suf_step.py, which measured once more when the first attempt missed the gate and
    kept only the second attempt's rows: say so, with every attempt's largest deviation."""
    out = []
    for name, setup in (res.get("config", {}).get("models") or {}).items():
        tries = sorted(k for k in setup if k.startswith("attempt_") and k.endswith("_max_deviation"))
        if len(tries) > 1:
            worst = ", ".join(f"attempt {k.split('_')[1]} {setup[k]:.1%}" for k in tries)
            out.append(
                (
                    "SUF step time",
                    f"{name.upper()}: attempts (old bench, retried on a miss)",
                    f"largest deviation {worst}; the rows above are attempt {tries[-1].split('_')[1]}'s only: that "
                    f"bench re-measured after a missed gate and kept the new attempt (fixed: now a fixed number of "
                    f"attempts, all reported)",
                )
            )
    return out


def retrieval(res: dict) -> list[Row]:
    out = []
    u = res.get("uc2")
    if u:
        out.append(
            (
                "Retrieval",
                f"UC2, {u['images']} images x {u['captions']} captions ({u['pairs']:,} pairs)",
                f"pair_scores calls {u['optimized']['pair_scores_calls']:,} (batched) vs "
                f"{u['naive']['pair_scores_calls']:,} "
                f"(per pair); {u['speedup']:.1f}x faster; max score difference {u['max_abs_score_diff']:.1e}",
            )
        )
    c = res.get("cclm")
    if c:
        opt, naive = c["optimized"]["rows"], c["naive"]["rows"]
        out.append(
            (
                "Retrieval",
                f"CCLM, {c['images']} images x {c['captions']} captions, top k={c['k']}",
                f"image encoder {opt['encode_images']:,} / text encoder {opt['encode_texts']:,} / matching head "
                f"{opt['itm_scores'] + opt.get('itm_scores_with_image_kv', 0):,} rows, image keys/values "
                f"{opt.get('itm_image_kv', 0):,} (naive {naive['encode_images']:,} / {naive['encode_texts']:,} / "
                f"{naive['itm_scores']:,}); {c['speedup']:.1f}x faster; counts as expected: "
                f"{'yes' if c.get('counts_ok') else 'NO'}",
            )
        )
    b = res.get("cclm_itm_base")
    if b:
        out.append(
            (
                "Retrieval",
                f"CCLM ITM re-rank at base size, {b['pairs_per_image_counted']} candidate pairs per "
                f"image, vs X2-VLM's per-pair procedure",
                f"{b['flop_reduction']:.2f}x fewer FLOPs (counted); {b['time_reduction']:.2f}x faster on "
                f"{b['pairs_timed']} pairs; max difference {b['max_abs_diff']:.1e}",
            )
        )
    return out or generic(res, "Retrieval")


def eval_precision(res: dict) -> list[Row]:
    return [
        (
            "Eval precision",
            f"{name.upper()} tiny random, {r['images']} images: bf16 autocast vs float32",
            f"max score change {r['rel_max_diff']:.0%} of the range; best image kept for {r['top1_agree']:.0%} of "
            f"captions; largest R@k change {max(abs(v) for v in r['recall_delta'].values()):.1f} points",
        )
        for name, r in ((n, res[n]) for n in ("uc2", "cclm") if n in res)
    ]


def run_cost(res: dict) -> list[Row]:
    return [
        (
            "Run cost (estimate)",
            r["model"],
            f"{r['train_flops_per_sample'] / 1e9:.0f} GFLOP per training sample; per 100k samples "
            + ", ".join(f"{g} {h * 60:.1f} min" for g, h in r["hours_per_100k_samples"].items())
            + f" at {res['mfu']:.0%} of bf16 peak; weights+grads+AdamW "
            f"{r['memory_gib_weights_grads_adamw']['full']:.1f} "
            f"GiB (full) / {r['memory_gib_weights_grads_adamw']['suf']:.1f} GiB (SUF stage 1), activations "
            "not included",
        )
        for r in res["estimates"]
    ]


def eval_cost(res: dict) -> list[Row]:
    u, c, t = res["uc2"], res["cclm"], res["tf32"]
    rows = [
        (
            "eval_cost",
            f"{m.upper()} xFlickrCo per-epoch languages (English per epoch, all at the end)",
            f"{r['evaluations_now']} test-set evaluations per {r['epochs']}-epoch run instead of "
            f"{r['evaluations_before']} (x{r['ratio']:.2f} fewer)",
        )
        for m, r in res["langs"].items()
    ]
    rows.append(
        (
            "eval_cost",
            f"UC2 all-pairs retrieval, base size, {u['images']} x {u['captions']} (embeddings once, length order)",
            f"x{u['flops_before'] / u['flops_now']:.3f} fewer FLOPs ({u['flops_before'] / 1e15:.2f} -> "
            f"{u['flops_now'] / 1e15:.2f} PFLOP); scores max |diff| {u['max_abs_diff']:.1e} "
            f"({u['tol']:.2f} of the parity tolerance)",
        )
    )
    rows.append(
        (
            "eval_cost",
            f"CCLM xGQA answer ranking, base size, {c['candidates']} candidates (LM head at scored positions)",
            f"x{c['flops_before'] / c['flops_now']:.2f} fewer FLOPs, x{c['seconds_before'] / c['seconds_now']:.2f} "
            f"faster; scores bitwise equal: {'yes' if c['bitwise_equal'] else 'NO'}",
        )
    )
    tf32 = (
        f"{t['device']}: x{t['seconds_fp32'] / t['seconds_tf32']:.2f} faster, max |diff| {t['max_abs_diff']:.1e}"
        if t.get("measured")
        else f"not measured ({t.get('why', 'no GPU')})"
    )
    return rows + [("eval_cost", "TF32 float32 evaluation (--eval-tf32)", tf32)]


def generic(res, bench: str, prefix: str = "", limit: int = 30) -> list[Row]:
    """Scalars of any other result file, as key paths."""
    out: list[Row] = []
    if isinstance(res, dict):
        for k, v in res.items():
            if not prefix and k in ("bench", "date", "machine"):  # in the Sources line and the table's heading
                continue
            out += generic(v, bench, f"{prefix}{k}.", limit)
    elif isinstance(res, (int, float, str, bool)) or res is None:
        out.append((bench, prefix.rstrip("."), f"{res:.4g}" if isinstance(res, float) else str(res)))
    return out[:limit]


RENDER = {
    "suf_step": suf_step,
    "retrieval": retrieval,
    "eval_precision": eval_precision,
    "run_cost": run_cost,
    "eval_cost": eval_cost,
}


def source_date(path: Path, res) -> str:
    if isinstance(res, dict) and isinstance(res.get("date"), str):
        return res["date"]
    return dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def build(results: Path) -> str:
    rows: list[Row] = []
    sources = []
    order = list(RENDER)  # the issue's order, then any other result file by name
    for path in sorted(
        results.glob("*.json"), key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.name)
    ):
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            rows.append((path.stem, "unreadable result file", f"{path.name}:{e.lineno}: {e.msg}"))
            continue
        render = RENDER.get(res.get("bench") if isinstance(res, dict) and res.get("bench") in RENDER else path.stem)
        try:
            rows += render(res) if render else generic(res, path.stem)
        except (KeyError, TypeError, ZeroDivisionError) as e:  # a bench changed its format: show it, do not fail
            rows += [(path.stem, f"(format not recognised: {type(e).__name__} {e})", "")] + generic(res, path.stem)
        sources.append(f"`{path.name}` ({source_date(path, res)})")
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [
        f"Table written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {_common.machine()}.",
        f"Sources: {', '.join(sources) or 'none'}. CPU timings on a shared machine: compare ratios measured "
        "in one run, "
        f"not absolute times across runs.",
        "",
        "| benchmark | what | result |",
        "|---|---|---|",
    ]
    lines += [f"| {esc(b)} | {esc(w)} | {esc(r)} |" for b, w, r in rows]
    return "\n".join(lines) + "\n"


def into_page(page: str, table: str) -> str:
    """The page with the text between its markers replaced by the table."""
    if BEGIN not in page or END not in page.split(BEGIN, 1)[1]:
        raise SystemExit(f"error: {PAGE} lacks the lines {BEGIN} ... {END} that mark where the table goes")
    head, rest = page.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default=str(_common.RESULTS), help="folder of result JSON files")
    p.add_argument("--out", default=str(PAGE), help="the page whose marked table is rewritten (default %(default)s)")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(f"error: results folder {results} does not exist (run the bench/ scripts first: make bench)")
    table = build(results)
    out = Path(args.out)
    out.write_text(into_page(out.read_text(), table))
    print(table, end="")
    print(f"wrote the table into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
