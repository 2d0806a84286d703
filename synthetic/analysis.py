"""The synthetic studies' analysis, re-derived from a record alone (issue 24; docs/synthetic/reanalysis.md).

  python -m synthetic.analysis docs/synthetic/study1_record.json          # Study 1 + XVL-MAML (transcribed)
  python -m synthetic.analysis docs/synthetic/mclip_results.json          # Study 2 (its own record)
  python -m synthetic.analysis <study3 folder>/record.json --out ANALYSIS.md

The method (fixed for Study 3 in docs/synthetic/protocol_study3.md, applied here to Studies 1 and 2):
- the paired difference a - b of one (pretraining seed, fine-tuning seed) pair is the per-pair table's cell;
- the **pretraining seed is the unit of replication**: each pretraining seed's differences are averaged over its
  fine-tuning seeds, and the interval is a Student t-interval over those n means (df = n - 1), n stated. The
  fine-tuning seeds of one pretraining seed are not independent replicates of the question "does the policy help
  a pretrained model?", and in Studies 1 and 2 the design was crossed (the same fine-tuning seed under every
  pretraining seed), so the pairs are not independent either; a two-level bootstrap over 2 pretraining seeds
  resamples two values and gives intervals about half as wide as they should be;
- the smallest effect the design can detect (two-sided alpha 0.05, power 0.8, one-sample t-test on the n
  pretraining-seed means, the observed SD s of those means): delta = (t_{1-alpha/2, n-1} + t_{power, n-1}) * s /
  sqrt(n) (the usual t approximation to the noncentral-t power equation). With n = 2, s rests on one degree of
  freedom and delta is itself very uncertain: it is stated, not relied on;
- "an effect" = the t-interval excludes 0; otherwise "no detectable difference at this size".

A record holds `per_run`: arm -> pretraining seed -> fine-tuning seed -> {metric or language: value}, and an
`analysis` spec: `metrics` (name -> {"op": mean | range | std, "of": [languages]}; a name found in a run's dict is
read directly), `comparisons` ([a, b] = a - b, or [a, b, c, d] = (a - b) - (c - d), an interaction),
`report_metrics`, `headline` and `headline_of` (comparison -> its own headline metric, e.g. XVL-MAML's target
average). Study 2's record
(synthetic/mclip_study.py) has no spec: MCLIP_SPEC is its protocol's (2.1).

Off the reading path: a study in the synthetic world (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from formats import readers

ALPHA, POWER = 0.05, 0.8
MCLIP_SPEC = {  # docs/synthetic/protocol.md 2.1: target average over rl sw cr lo; range and std over all 5 (ddof 0)
    "metrics": {
        "target_avg": {"op": "mean", "of": ["rl", "sw", "cr", "lo"]},
        "range": {"op": "range", "of": ["en", "rl", "sw", "cr", "lo"]},
        "std": {"op": "std", "of": ["en", "rl", "sw", "cr", "lo"]},
    },
    "comparisons": [[a, b] for b in ("suf", "full") for a in ("zeroshot", "lora", "adapter", "full", "suf", "lora_m3")],
    "report_metrics": ["target_avg", "range", "std", "rl", "sw", "cr", "lo", "en"],
    "headline": "target_avg",
}


# ---------------------------------------------------------------------------------------------- statistics


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean and Student t-interval of `values` (n >= 2; n = 1: mean only, lo/hi None)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    out = {"mean": float(x.mean()), "n": n, "lo": None, "hi": None, "sd": None, "df": n - 1, "t": None}
    if n < 2:
        return out
    sd = float(x.std(ddof=1))
    t = float(stats.t.ppf(1 - (1 - level) / 2, n - 1))
    half = t * sd / math.sqrt(n)
    return {**out, "lo": out["mean"] - half, "hi": out["mean"] + half, "sd": sd, "t": t}


def detectable_effect(sd: float | None, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Smallest mean difference a two-sided one-sample t-test on n unit means with SD `sd` detects with the given
    power: (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n). None when n < 2 or sd unknown."""
    if sd is None or n < 2:
        return None
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


# ---------------------------------------------------------------------------------------------- the record


def spec_of(record: dict) -> dict:
    if "analysis" in record:
        return record["analysis"]
    if "arms" in record and "per_run" in record:  # Study 2's record (synthetic/mclip_study.py)
        return MCLIP_SPEC
    raise SystemExit("error: the record has no 'analysis' spec and is not a Study 2 record (no 'arms'/'per_run')")


def metric_value(run: dict, metric: str, spec: dict) -> float | None:
    """The run's value of `metric`: read directly when the run holds it, else computed from its definition;
    None when neither is possible (the record does not hold what it needs)."""
    if metric in run:
        return float(run[metric])
    d = spec.get("metrics", {}).get(metric)
    if d is None or any(lang not in run for lang in d["of"]):
        return None
    vals = np.array([run[lang] for lang in d["of"]], dtype=float)
    if d["op"] == "mean":
        return float(vals.mean())
    if d["op"] == "range":
        return float(vals.max() - vals.min())
    if d["op"] == "std":
        return float(vals.std())  # ddof 0, as the paper's disparity measure
    raise SystemExit(f"error: metric {metric}: unknown op {d['op']!r} (mean, range, std)")


def pair_table(per_run: dict, a: str, b: str, metric: str, spec: dict) -> dict[str, dict[str, float]]:
    """pretraining seed -> fine-tuning seed -> a - b, for the pairs where both runs hold the metric."""
    out: dict = {}
    for ps, by_f in per_run.get(a, {}).items():
        for fs, run in by_f.items():
            base = per_run.get(b, {}).get(ps, {}).get(fs)
            if base is None:
                continue
            va, vb = metric_value(run, metric, spec), metric_value(base, metric, spec)
            if va is not None and vb is not None:
                out.setdefault(str(ps), {})[str(fs)] = va - vb
    return out


def compare(table: dict[str, dict[str, float]]) -> dict:
    """The corrected analysis of one per-pair table."""
    seed_means = {ps: float(np.mean(list(by_f.values()))) for ps, by_f in sorted(table.items())}
    unit = t_interval(list(seed_means.values()))
    pairs = [v for by_f in table.values() for v in by_f.values()]
    return {
        "pairs": table,
        "seed_means": seed_means,
        "unit": unit,  # the interval: pretraining seeds
        "detectable": detectable_effect(unit["sd"], unit["n"]),
        "pairs_t": t_interval(pairs),  # for reference only: the pairs as if independent (they are not)
        "pair_range": [min(pairs), max(pairs)],
    }


def interaction_table(per_run: dict, arms: Sequence[str], metric: str, spec: dict) -> dict[str, dict[str, float]]:
    """(a - b) - (c - d) on the same (pretraining seed, fine-tuning seed): a difference of paired differences."""
    a, b, c, d = arms
    first, second = pair_table(per_run, a, b, metric, spec), pair_table(per_run, c, d, metric, spec)
    out: dict = {}
    for ps, by_f in first.items():
        for fs, v in by_f.items():
            if fs in second.get(ps, {}):
                out.setdefault(ps, {})[fs] = v - second[ps][fs]
    return out


def comparison_name(arms: Sequence[str]) -> str:
    return f"{arms[0]} - {arms[1]}" if len(arms) == 2 else f"({arms[0]} - {arms[1]}) - ({arms[2]} - {arms[3]})"


def analyse(record: dict) -> dict:
    """Every comparison of the spec: [a, b] = a - b; [a, b, c, d] = (a - b) - (c - d) (an interaction)."""
    spec = spec_of(record)
    per_run = record["per_run"]
    out: dict = {}
    for arms in spec["comparisons"]:
        if len(arms) not in (2, 4):
            raise SystemExit(f"error: comparison {arms}: give [a, b] or [a, b, c, d]")
        if len(set(arms[:2])) < 2 or any(a not in per_run for a in arms):
            continue
        res = {}
        for m in spec["report_metrics"]:
            table = (
                pair_table(per_run, arms[0], arms[1], m, spec)
                if len(arms) == 2
                else interaction_table(per_run, arms, m, spec)
            )
            if table:
                res[m] = compare(table)
        if res:
            out[comparison_name(arms)] = res
    return {"headline": spec["headline"], "headline_of": spec.get("headline_of", {}), "comparisons": out}


# ---------------------------------------------------------------------------------------------- report


def cell(c: dict) -> str:
    u = c["unit"]
    if u["lo"] is None:
        return f"{u['mean']:+.1f} (n = 1: no interval)"
    return f"{u['mean']:+.1f} [{u['lo']:+.1f}, {u['hi']:+.1f}]"


def verdict(c: dict) -> str:
    u = c["unit"]
    if u["lo"] is None:
        return "no interval (one pretraining seed)"
    return "effect" if u["lo"] > 0 or u["hi"] < 0 else "no detectable difference"


def format_report(result: dict, title: str = "Re-analysis") -> str:
    head = result["headline"]
    lines = [
        f"# {title}",
        "",
        "Pretraining seed = unit of replication: mean of the paired differences, Student t 95% interval over the "
        "per-pretraining-seed means (n = number of pretraining seeds, df = n - 1); `detectable` = smallest effect "
        "detected with 80% power at two-sided alpha 0.05 from the observed SD s of the seed means, "
        "(t_{0.975,n-1} + t_{0.80,n-1}) * s / sqrt(n). Generated by `python -m synthetic.analysis`.",
        "",
        f"## Headline metric `{head}` (a comparison with its own headline names it)",
        "",
        "| comparison | per pair (p·f) | per pretraining seed | n | mean [t 95%] | s | detectable | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in result["comparisons"].items():
        own = result.get("headline_of", {}).get(name, head)
        c = res.get(own)
        if c is None:
            lines.append(f"| {name.replace(' - ', ' − ')} | not in the record | | | | | | |")
            continue
        pairs = " ".join(f"p{ps}f{fs} {v:+.2f}" for ps, by_f in c["pairs"].items() for fs, v in by_f.items())
        means = " ".join(f"p{ps} {v:+.2f}" for ps, v in c["seed_means"].items())
        sd = "–" if c["unit"]["sd"] is None else f"{c['unit']['sd']:.2f}"
        det = "–" if c["detectable"] is None else f"{c['detectable']:.1f}"
        label = name.replace(" - ", " − ") + ("" if own == head else f" (`{own}`)")
        lines.append(f"| {label} | {pairs} | {means} | {c['unit']['n']} | {cell(c)} | {sd} | {det} | {verdict(c)} |")
    metrics = sorted({m for res in result["comparisons"].values() for m in res if m != head})
    if metrics:
        lines += [
            "",
            "## Every metric (mean [t 95% over pretraining-seed means])",
            "",
            "| comparison | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for name, res in result["comparisons"].items():
            lines.append(
                f"| {name.replace(' - ', ' − ')} | "
                + " | ".join(cell(res[m]) if m in res else "–" for m in metrics)
                + " |"
            )
    return "\n".join(lines) + "\n"


def read_record(path: Path) -> dict:
    """A study record (JSON); a missing or malformed file is a one-line SystemExit naming it (and the line)."""
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such record")
    try:
        return readers.read_json(path, annotations=False)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("record", help="a study record (JSON with per_run)")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--json", default=None, help="also write the analysis (every number) here as JSON")
    args = p.parse_args(argv)
    path = Path(args.record)
    record = read_record(path)
    if "per_run" not in record:
        raise SystemExit(f"error: {path}: no 'per_run' key (the analysis needs every run's numbers)")
    result = analyse(record)
    report = format_report(result, f"Re-analysis of {path.name}")
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
