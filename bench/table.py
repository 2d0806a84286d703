"""One Markdown table from every bench/results/*.json (make bench): SUF step-time ratios and optimizer state
(bench/suf_step.py), retrieval encoder calls and speed-up (bench/retrieval.py), data-loader ratios
(bench/data_throughput.py), dynamic padding savings (bench/padding.py); any other JSON is listed generically.
Writes <results>/TABLE.md with the date and the machine, and prints it.

    .venv/bin/python bench/table.py [bench/results] [--out bench/results/TABLE.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

Row = tuple[str, str, str]  # benchmark, what, result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch}, Python {platform.python_version()}, "
        f"{platform.system()} (load average now {load})"
    )


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


def data_throughput(res: dict) -> list[Row]:
    out, cfg = [], res.get("config", {})
    for key, name in (("region_features", "region features (UC2)"), ("images", "images (CCLM)")):
        r = res.get(key)
        if not r:
            continue
        us = r.get("us_per_sample", {})
        parts = [f"raw read+decode {r['raw_per_s']:,.0f}/s"]
        if "tokenize" in us:
            parts.append(f"tokenize {us['tokenize']:.0f} us/sample")
        if "in_process_loader" in us:
            parts.append(
                f"in-process loader {us['in_process_loader']:.0f} us/sample (tokenizer "
                f"{r['tokenizer_share_of_in_process_loader']:.0%} of it)"
            )
        if "ceiling_ratio" in r:
            parts.append(f"ceiling for a loader that reads as raw and tokenises {r['ceiling_ratio']:.2f}x")
        out.append(("Data loader", f"{name}, batch {cfg.get('batch_size', '?')}", "; ".join(parts)))
        for w, lw in r.get("loader", {}).items():
            result = (
                f"{lw['samples_per_s']:,.0f} samples/s; per worker {lw['per_worker_ratio']:.2f}x raw read+decode "
                f"({'meets' if lw['meets_target'] else 'misses'} the {cfg.get('target_ratio', 0.9):.0%} target)"
            )
            if "per_worker_ratio_vs_raw_plus_tokenize" in lw:
                result += f", {lw['per_worker_ratio_vs_raw_plus_tokenize']:.2f}x read+decode+tokenize"
            if "transport_us_per_sample" in lw:
                result += f"; worker transport {lw['transport_us_per_sample']:.0f} us/sample"
            if "plain_dataloader" in lw:  # the same pipeline through torch's own transport, same run
                pl = lw["plain_dataloader"]
                result += (
                    f"; plain DataLoader {pl['samples_per_s']:,.0f} samples/s "
                    f"(slabs {lw['slab_over_plain']:.2f}x plain); main-thread CPU per batch "
                    f"{lw['main_thread_cpu_us_per_batch']:,.0f} us (slabs) vs "
                    f"{pl['main_thread_cpu_us_per_batch']:,.0f} us (plain)"
                )
            if lw.get("contended"):
                result += " (contended: fewer cores than workers + main)"
            out.append(("Data loader", f"{name}, {w} worker{'s' if w != '1' else ''}", result))
    tok = res.get("tokenizer_public_call")
    if tok:
        out.append(
            (
                "Data loader",
                "tokenising: the tokenizer's public call (data.encode_texts) vs its Rust backend",
                f"{tok['call_over_backend']:.2f}x the backend's texts/s; tokenising is "
                f"{tok['share_of_in_process_uc2_loader']:.0%} of the in-process UC2 loader "
                f"({tok['share_of_in_process_uc2_loader_backend']:.0%} with the backend)",
            )
        )
    feed = res.get("feeding", {})
    for key in ("region_features", "region_features_plain", "images_eval", "images_eval_plain", "images_train"):
        if key in feed:
            f = feed[key]
            out.append(
                (
                    "Data loader",
                    f"feeding one GPU: {key} (consumer rate modelled from counted FLOPs)",
                    f"{f['per_worker_samples_per_s']:,.0f} samples/s per worker here; "
                    + "; ".join(
                        f"{g} consumes {f[g]['consumer_samples_per_s']:,.0f}/s: {f[g]['workers_needed']} workers "
                        f"for 1.5x"
                        for g in ("A100", "H100")
                        if g in f
                    ),
                )
            )
    return out


def padding(res: dict) -> list[Row]:
    out = []
    for r in res.get("rows", []):
        batch = f"batch {r.get('batch_size', res.get('config', {}).get('batch_size', '?'))}"
        if r.get("one_batch_per_lang"):
            batch += ": one batch per language, the sample has fewer examples"
        out.append(
            (
                "Dynamic padding",
                f"{r['model'].upper()} {r['task']} {r['split']} text ({r['examples']:,} examples, {batch})",
                f"{r['dynamic_tokens']:,} tokens vs {r['fixed_tokens']:,} padded to "
                f"{r['max_len'] if r['max_len'] is not None else 'the longest'} ({r['saving']:.0%} fewer; "
                f"real tokens {r['real_tokens']:,})",
            )
        )
    if tok := res.get("config", {}).get("tokenizer"):
        out.append(("Dynamic padding", "tokenizer", tok))
    return out


def generic(res, bench: str, prefix: str = "", limit: int = 30) -> list[Row]:
    """Scalars of any other result file, as key paths."""
    out: list[Row] = []
    if isinstance(res, dict):
        for k, v in res.items():
            out += generic(v, bench, f"{prefix}{k}.", limit)
    elif isinstance(res, (int, float, str, bool)) or res is None:
        out.append((bench, prefix.rstrip("."), f"{res:.4g}" if isinstance(res, float) else str(res)))
    return out[:limit]


RENDER = {
    "suf_step": suf_step,
    "retrieval": retrieval,
    "data_throughput": data_throughput,
    "padding": padding,
    "eval_precision": eval_precision,
    "run_cost": run_cost,
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
        "# Benchmarks",
        "",
        f"Table written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine()}.",
        f"Sources: {', '.join(sources) or 'none'}. CPU timings on a shared machine: compare ratios measured "
        "in one run, "
        f"not absolute times across runs.",
        "",
        "| benchmark | what | result |",
        "|---|---|---|",
    ]
    lines += [f"| {esc(b)} | {esc(w)} | {esc(r)} |" for b, w, r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "results", nargs="?", default=str(Path(__file__).parent / "results"), help="folder of result JSON files"
    )
    p.add_argument("--out", default=None, help="default: <results>/TABLE.md")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(f"error: results folder {results} does not exist (run the bench/ scripts first: make bench)")
    table = build(results)
    out = Path(args.out) if args.out else results / "TABLE.md"
    out.write_text(table)
    print(table, end="")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
