"""Tables 1-3 of the paper (and the per-language Tables 4-6) from run folders, ours beside the paper's numbers
(report/paper_numbers.json, a data file), and IGLUE's results/ CSVs merged over runs (one row per setup).

Not on the reading path: `python -m report table` prints what evaluation already wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import data
from formats import readers
import scoring.metrics
from formats import iglue
from report import runs as report_runs

# The paper's reported numbers (Reinhardt et al., "Improving Vision-Language Cross-Lingual Transfer with Scheduled
# Unfreezing"); what each entry holds: the file's "_about". Keys there are "model policy" / "task metric".
PAPER = json.loads(Path(__file__).with_name("paper_numbers.json").read_text())
PAPER_TABLE1 = {tuple(k.split()): {c: tuple(v) for c, v in d.items()} for k, d in PAPER["table1"].items()}
PAPER_TABLE2 = {k: tuple(v) for k, v in PAPER["table2"].items()}
PAPER_TABLE3 = {k: tuple(v) for k, v in PAPER["table3"].items()}
PAPER_PER_LANG = {
    tuple(k.split()): {tuple(s.split()): d for s, d in rows.items()} for k, rows in PAPER["per_language"].items()
}
IGLUE_MARVL = PAPER["iglue_marvl"]  # IGLUE's published UC2 row: a reference, neither the paper's nor ours
PAPER_FIG4_UNPAIRED = {tuple(k.split()): v for k, v in PAPER["fig4_unpaired"].items()}


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def _cell(ours: float | None, paper: float | None, partial: bool = False, unfinished: bool = False) -> str:
    o = "-" if ours is None or ours != ours else f"{ours:.1f}" + ("*" if partial else "") + ("!" if unfinished else "")
    return o if paper is None else f"{o} ({paper:.1f})"


def _setup_name(r: dict) -> str:
    name = {"uc2": "UC2", "cclm": "CCLM"}.get(r.get("model"), str(r.get("model")))
    pol = r.get("policy")
    extra = {
        "full": "",
        "suf": "+SUF",
        "llrd": f"+LLRD(d={r.get('llrd_decay')})",
        "top": f"+top{r.get('top_layers')}",
    }.get(pol, f"+{pol}")
    return name + extra


def build_tables(runs: Sequence[str | Path], split: str = "test") -> dict:
    """Rows of Tables 1-3 (ours beside the paper's). Several runs of one setup are averaged."""
    recs = [{**r, "run": str(run)} for run in runs if (r := report_runs.run_results(run, split)) is not None]
    zs = [r for r in recs if not r.get("shots")]
    fs = [r for r in recs if r.get("shots")]
    groups: dict[tuple, list] = {}
    for r in zs:
        key = (
            r.get("model"),
            r.get("policy"),
            r.get("llrd_decay") if r.get("policy") == "llrd" else None,
            r.get("top_layers") if r.get("policy") == "top" else None,
        )
        groups.setdefault(key, []).append(r)

    def en_avg(rs: list[dict], task: str, metric: str) -> tuple[float, float]:
        rs = [r for r in rs if r.get("task") == task]
        return (
            _mean([r["langs"].get("en", {}).get(metric, float("nan")) for r in rs]),
            _mean([scoring.metrics.zs_average(r["langs"], metric) for r in rs]),
        )

    def unfinished(rs: list[dict], task: str) -> bool:
        """True when a number comes from a run that has not finished (marked ! in the table)."""
        return any(r.get("unfinished") for r in rs if r.get("task") == task)

    def partial(rs: list[dict], task: str) -> bool:
        """True when a run's average misses some of IGLUE's target languages (marked * in the table)."""
        return any(set(iglue.TARGET_LANGS[task]) - set(r["langs"]) for r in rs if r.get("task") == task)

    cols = [("xgqa", "accuracy"), ("xvnli", "accuracy"), ("xflickrco", "tr_r1"), ("xflickrco", "ir_r1")]
    table1 = []
    order = sorted(
        groups,
        key=lambda k: (
            str(k[0]),
            ["full", "suf", "top", "llrd"].index(k[1]) if k[1] in ("full", "suf", "top", "llrd") else 9,
            str(k[2]),
            str(k[3]),
        ),
    )
    for key in order:
        rs = groups[key]
        paper = PAPER_TABLE1.get((key[0], key[1])) if key[2] is None and key[3] is None else None
        row = {"setup": _setup_name(rs[0]), "runs": [r.get("source") for r in rs], "cells": {}}
        for task, metric in cols:
            en, avg = en_avg(rs, task, metric)
            p = (paper or {}).get(task if metric == "accuracy" else metric)
            row["cells"][f"{task}:{metric}"] = {
                "en": en,
                "avg": avg,
                "paper_en": p[0] if p else None,
                "paper_avg": p[1] if p else None,
                "partial": partial(rs, task),
                "unfinished": unfinished(rs, task),
            }
        table1.append(row)
    table2 = []
    for key in order:
        if key[0] != "cclm":
            continue
        en, avg = en_avg(groups[key], "xgqa", "accuracy")
        paper = PAPER_TABLE2.get(key[1]) if (key[1] != "top" or key[3] == 6) and key[2] is None else None
        if en == en or avg == avg:
            table2.append(
                {
                    "setup": _setup_name(groups[key][0]),
                    "en": en,
                    "avg": avg,
                    "partial": partial(groups[key], "xgqa"),
                    "unfinished": unfinished(groups[key], "xgqa"),
                    "paper_en": paper[0] if paper else None,
                    "paper_avg": paper[1] if paper else None,
                }
            )
    table3 = []
    for pol in ("full", "suf"):
        zs_avg = en_avg(groups.get(("uc2", pol, None, None), []), "xgqa", "accuracy")[1]
        fs_runs = [r for r in fs if r.get("model") == "uc2" and r.get("task") == "xgqa" and r.get("init_policy") == pol]
        # each few-shot run adapts to one language: the few-shot number is the mean of those languages
        fs_vals = {
            r["fewshot_lang"]: r["langs"].get(r["fewshot_lang"], {}).get("accuracy", float("nan"))
            for r in fs_runs
            if r.get("fewshot_lang")
        }
        table3.append(
            {
                "setup": {"full": "Standard", "suf": "SUF"}[pol],
                "zero_shot": zs_avg,
                "few_shot": _mean(list(fs_vals.values())),
                "few_shot_langs": sorted(fs_vals),
                "shots": sorted({r["shots"] for r in fs_runs}),
                "paper_zero_shot": PAPER_TABLE3[pol][0],
                "paper_few_shot": PAPER_TABLE3[pol][1],
            }
        )
    per_lang = {}
    for (task, metric), paper_rows in PAPER_PER_LANG.items():
        for key in order:
            rs = [r for r in groups[key] if r.get("task") == task]
            if not rs:
                continue
            langs = scoring.metrics.ordered_langs({l for r in rs for l in r["langs"]})
            paper = paper_rows.get((key[0], key[1])) if key[2] is None and key[3] is None else None
            per_lang.setdefault(f"{task}:{metric}", []).append(
                {
                    "setup": _setup_name(rs[0]),
                    "ours": {l: _mean([r["langs"].get(l, {}).get(metric, float("nan")) for r in rs]) for l in langs},
                    "paper": paper,
                }
            )
    marvl = [  # MaRVL (not in the paper): ours per setup, IGLUE's UC2 row printed under it as a reference
        {
            "setup": _setup_name(groups[k][0]),
            **dict(zip(("en", "avg"), en_avg(groups[k], "marvl", "accuracy"))),
            "partial": partial(groups[k], "marvl"),
            "unfinished": unfinished(groups[k], "marvl"),
        }
        for k in order
        if any(r.get("task") == "marvl" for r in groups[k])
    ]
    unfinished_runs = [f"{r['source']} of {r['run']}: {r['unfinished']}" for r in recs if r.get("unfinished")]
    return {
        "marvl": marvl,
        "table1": table1,
        "table2": table2,
        "table3": table3,
        "per_language": per_lang,
        "unfinished": unfinished_runs,
        "footnotes": reference_footnotes([groups[k] for k in order]),
    }


# ---------------------------------------------------------------- beside the references' logs
# Where our numbers and the ones the references' own code prints differ by protocol, not by model: each is named
# under the tables (issue 26 item 5), with the reference's figure where it can be computed from ours. X2-VLM's
# XVNLI meter: docs/reference_facts.md#F-cclm-xvnli-accuracy; its k_test prefilter and argsort ranks:
# docs/reference_facts.md#F-cclm-retrieval-eval, docs/reference_facts.md#F-retrieval-ranks; IGLUE's -1.0 cells:
# formats/iglue.py (merged_iglue_csvs above writes them too).


def _x2vlm_xvnli(langs: dict) -> dict[str, float]:
    """X2-VLM's XVNLI log divides the correct answers by n + 1 (one more than the examples): ours x n / (n + 1)."""
    return {l: m["accuracy"] * m["n"] / (m["n"] + 1) for l, m in langs.items() if "accuracy" in m and m.get("n")}


def _iglue_average(langs: dict, task: str, metric: str) -> float:
    """IGLUE's own average over its target languages, a missing language counted as its CSV's -1.0."""
    targets = iglue.TARGET_LANGS[task]
    return sum(langs.get(l, {}).get(metric, -1.0) for l in targets) / len(targets)


def _k_test(run: dict) -> int | None:
    """CCLM's retrieval prefilter size of a run: recorded by `evaluate` (results.json) or the run's args.json."""
    for name in ("results.json", "args.json"):
        path = Path(run["run"]) / name
        if path.is_file():
            rec = readers.read_json(path, annotations=False)
            rec = next(iter(rec.values()), {}) if name == "results.json" else rec
            if isinstance(rec, dict) and rec.get("k_test") is not None:
                return int(rec["k_test"])
    return None


def reference_footnotes(groups: Sequence[list[dict]]) -> list[str]:
    notes = []
    cols = [("xgqa", "accuracy"), ("xvnli", "accuracy"), ("xflickrco", "tr_r1"), ("xflickrco", "ir_r1")]
    for rs in groups:
        name = _setup_name(rs[0])
        for task, metric in cols:
            missing = [r for r in rs if r.get("task") == task and set(iglue.TARGET_LANGS[task]) - set(r["langs"])]
            if missing:
                avg = _mean([_iglue_average(r["langs"], task, metric) for r in missing])
                notes.append(
                    f"* {name} {task} {metric}: our ZS averages the languages evaluated; IGLUE's own averaging "
                    f"counts each missing language as -1.0: {avg:.1f}"
                )
        if rs[0].get("model") != "cclm":
            continue
        xvnli = [r for r in rs if r.get("task") == "xvnli"]
        if xvnli:
            logged = [_x2vlm_xvnli(r["langs"]) for r in xvnli]
            en = _mean([d.get("en", float("nan")) for d in logged])
            zs = _mean([_mean([v for l, v in d.items() if l != "en"]) for d in logged])
            notes.append(
                f"{name} XVNLI as X2-VLM's log prints it (correct / (n + 1); ours / n): EN {en:.1f}, ZS {zs:.1f}"
            )
        retrieval = [r for r in rs if r.get("task") == "xflickrco"]
        if retrieval:
            notes.append(
                f"{name} xFlickrCO: a test file's repeated img_path is scored as one image here; X2-VLM scores "
                "each occurrence as its own image (differs only where an img_path repeats)"
            )
            small = sorted({k for r in retrieval if (k := _k_test(r)) is not None and k < 10})
            if small:
                notes.append(
                    f"{name} xFlickrCO with k_test {', '.join(map(str, small))} < 10: a gold outside the k_test "
                    "prefilter ranks behind its ties here; X2-VLM ranks by argsort position, so R@5/R@10 can differ"
                )
    return notes


def merged_iglue_csvs(runs: Sequence[str | Path], split: str = "test") -> dict[str, str]:
    """{file name: CSV text}: IGLUE's results/ files over several runs, one row per run (named by its folder, as
    `evaluate` names it) and the row "n" of each (see iglue.iglue_csv). A few-shot run adapts to one language, so the
    few-shot runs that start from one English run (one folder per target language) are merged into one row,
    named by that English run: xGQA_48.csv with IGLUE's few-shot columns (target languages, avg over them;
    -1.0 where a language has no run yet)."""
    rows: dict[str, dict[str, dict]] = {}  # file name -> {setup name -> {lang: metrics}}
    for run in runs:
        r = report_runs.run_results(run, split)
        if r is None or r.get("task") not in data.TASKS:
            continue
        shots = r.get("shots") or 0
        fewshot = iglue.is_fewshot(shots)
        setup = Path(run).name
        if fewshot and (Path(run) / "fewshot.json").is_file():
            info = readers.read_json(Path(run) / "fewshot.json", annotations=False)
            setup = Path(info.get("init_checkpoint", run)).parent.name
        langs = (
            {r["fewshot_lang"]: r["langs"][r["fewshot_lang"]]}
            if fewshot and r.get("fewshot_lang") in r["langs"]
            else r["langs"]
        )
        for metric in scoring.metrics.MAIN_METRICS[r["task"]]:
            merged = rows.setdefault(iglue.csv_name(r["task"], metric, shots, False, split), {}).setdefault(setup, {})
            merged.update(langs)
            merged.setdefault("_task", {"task": r["task"], "metric": metric, "shots": shots})
    out = {}
    for name, setups in rows.items():
        lines = []
        for setup, langs in setups.items():
            spec = langs["_task"]
            per_lang = {l: m for l, m in langs.items() if l != "_task"}
            text = iglue.iglue_csv(spec["task"], per_lang, setup, spec["metric"], spec["shots"]).splitlines()
            lines += ([text[0]] if not lines else []) + text[1:]
        out[name] = "\n".join(lines) + "\n"
    return out


def format_tables(t: dict, per_language: bool = False, paper: bool = True) -> str:
    """The tables as text; paper=False leaves the paper's numbers out (runs that are not the paper's setting, such
    as the synthetic world's: a synthetic number beside a real one invites a comparison that means nothing)."""
    theirs = " (paper)" if paper else ""
    cell = _cell if paper else (lambda ours, _, *a, **k: _cell(ours, None, *a, **k))
    out = [
        f"Table 1: ours{theirs}. EN and ZS-XLT = mean over non-English languages; accuracy / R@1; "
        "* = not all of IGLUE's target languages were evaluated; ! = from a run that has not finished.",
        f"{'setup':<20}"
        + "".join(
            f"{h:>15}" for h in ("xGQA EN", "xGQA ZS", "XVNLI EN", "XVNLI ZS", "TR EN", "TR ZS", "IR EN", "IR ZS")
        ),
    ]
    for row in t["table1"]:
        cells = []
        for c in ("xgqa:accuracy", "xvnli:accuracy", "xflickrco:tr_r1", "xflickrco:ir_r1"):
            v = row["cells"][c]
            cells += [
                cell(v["en"], v["paper_en"], unfinished=v["unfinished"]),
                cell(v["avg"], v["paper_avg"], v["partial"], v["unfinished"]),
            ]
        out.append(f"{row['setup']:<20}" + "".join(f"{c:>15}" for c in cells))
    if t["table2"]:
        out += ["", f"Table 2: CCLM on xGQA, ours{theirs}; top6 = CM only.", f"{'setup':<20}{'en':>15}{'avg':>15}"]
        out += [
            f"{r['setup']:<20}{cell(r['en'], r['paper_en'], unfinished=r['unfinished']):>15}"
            f"{cell(r['avg'], r['paper_avg'], r['partial'], r['unfinished']):>15}"
            for r in t["table2"]
        ]
    if any(r["few_shot"] == r["few_shot"] or r["zero_shot"] == r["zero_shot"] for r in t["table3"]):
        out += [
            "",
            f"Table 3: UC2 on xGQA, target-language mean, ours{theirs}; few-shot = standard fine-tuning "
            "on the target language after English training with the row's policy.",
            f"{'setup':<20}{'zero-shot':>15}{'few-shot':>15}  few-shot languages",
        ]
        out += [
            f"{r['setup']:<20}{cell(r['zero_shot'], r['paper_zero_shot']):>15}"
            f"{cell(r['few_shot'], r['paper_few_shot']):>15}  {','.join(r['few_shot_langs']) or '-'}"
            for r in t["table3"]
        ]
    if t.get("marvl"):
        ref = IGLUE_MARVL["uc2"]
        out += [
            "",
            "MaRVL (IGLUE's fourth task; the paper reports none): ours. EN = NLVR2 test-P, ZS = mean over id, sw, ta, "
            "tr, zh.",
            f"{'setup':<20}{'en':>15}{'avg':>15}",
        ]
        out += [
            f"{r['setup']:<20}{_cell(r['en'], None, unfinished=r['unfinished']):>15}"
            f"{_cell(r['avg'], None, r['partial'], r['unfinished']):>15}"
            for r in t["marvl"]
        ]
        out.append(
            f"reference, not ours: IGLUE's UC2 (results/marvl): EN {ref['zero_shot']['en']:.2f}, ZS "
            f"{ref['zero_shot']['avg']:.2f}, translate-test ZS {ref['translate_test']['avg']:.2f}"
        )
    if t.get("unfinished"):
        out += ["", "! unfinished runs (their last evaluated epoch is shown):"] + [f"  {u}" for u in t["unfinished"]]
    if t.get("footnotes"):
        out += ["", "Beside the references' own logs (protocol differences, not model ones):"]
        out += [f"  {n}" for n in t["footnotes"]]
    if per_language:
        for name, rows in t["per_language"].items():
            langs = scoring.metrics.ordered_langs({l for r in rows for l in r["ours"]})
            out += ["", f"Per language ({name}), ours{theirs}:", f"{'setup':<20}" + "".join(f"{l:>13}" for l in langs)]
            out += [
                f"{r['setup']:<20}" + "".join(f"{cell(r['ours'].get(l), (r['paper'] or {}).get(l)):>13}" for l in langs)
                for r in rows
            ]
    return "\n".join(out)
