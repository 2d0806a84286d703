"""Study 3's report, re-derived from its record alone (docs/synthetic/protocol_study3.md sections 4-7).

  python -m synthetic.study3_report docs/synthetic/study3_record.json --out docs/synthetic/study3_results.md

Reads only the record (per-run final accuracies, the premise checks of every full run, the floors); every interval
comes from synthetic.analysis (pretraining seed = unit). Each cell says how it may be read: the protocol's reading
rule (a comparison tests SUF's mechanism only where the layer premise holds for >= 4 of 5 pretraining seeds), the
confirmatory headline, and amendment A2's exploratory `mid` strength.

Off the reading path: a study in the synthetic world (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from synthetic import analysis
from synthetic import world as sw

LANGS = sw.LANGS
POLICIES = ("suf", "llrd", "lpft", "top")
NAMES = {"suf": "SUF", "llrd": "LLRD", "lpft": "LP-FT", "top": "top"}
STATUS = {
    "base": "committed; the headline's cell",
    "mid": "exploratory (amendment A2: added after full's premise checks were seen)",
    "strong": "committed (calibration's fallback)",
}
HEADLINE = "suf-trained-base - full-trained-base"
READ_MIN_SEEDS = 4  # protocol section 5's reading rule: the layer premise in >= 4 of the 5 pretraining seeds


def arm(policy: str, emb: str, strength: str) -> str:
    """An arm's name in the record, e.g. suf-trained-base; top is one arm per strength (its policy freezes the
    embeddings)."""
    return f"{policy}-{'frozen' if policy == 'top' else emb}-{strength}"


def non_en(run: dict) -> float:
    return float(np.mean([run[lang] for lang in LANGS[1:]]))


def premise_cell(record: dict, strength: str, emb: str) -> dict:
    """The cell's verdicts over its pretraining seeds: how many hold the layer premise, and the checks' means."""
    cells = [by_s[strength][emb]["verdicts"] for by_s in record["premise"].values() if emb in by_s.get(strength, {})]
    if not cells:
        return {}
    mean = lambda key: float(np.mean([c[key] for c in cells if c[key] is not None]))  # noqa: E731
    holds = sum(bool(c["layer_premise"]) for c in cells)
    return {
        "seeds": len(cells),
        "holds": holds,
        "P0": sum(bool(c["P0_english"]) for c in cells),
        "P1": sum(bool(c["P1_alignment_erodes"]) for c in cells),
        "P2": sum(bool(c["P2_swap_back_helps"]) for c in cells),
        "english_margin": mean("english_margin"),
        "max_mean_drop": mean("max_mean_drop"),
        "swap_back_gain": mean("swap_back_gain"),
        "embedding_shift_gain": mean("embedding_shift_gain"),
        "reading": "a test of SUF's mechanism"
        if holds >= READ_MIN_SEEDS
        else "the world does not hold the premise here (an estimate, not a test of the mechanism)",
    }


def premise_table(record: dict, strengths: Sequence[str]) -> list[str]:
    lines = [
        "| strength (lr) | embeddings | layer premise holds | P0 English | P1 alignment erodes | P2 swap-back helps | "
        "English margin over blind | max alignment drop | swap-back 0–2 gain | embedding-shift gain | reading |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lrs = record["design"]["strengths"]
    for s in strengths:
        for e in ("trained", "frozen"):
            c = premise_cell(record, s, e)
            if c:
                n = c["seeds"]
                lines.append(
                    f"| {s} ({lrs[s]:g}) | {e} | {c['holds']}/{n} | {c['P0']}/{n} | {c['P1']}/{n} | {c['P2']}/{n} | "
                    f"{c['english_margin']:+.1f} | {c['max_mean_drop']:.2f} | {c['swap_back_gain']:+.1f} | "
                    f"{c['embedding_shift_gain']:+.1f} | {c['reading']} |"
                )
    return lines


def accuracy_table(record: dict, strengths: Sequence[str]) -> list[str]:
    """Each arm's mean test accuracy after the last epoch over every run it has (descriptive; no interval)."""
    lines = ["| arm | runs | " + " | ".join(LANGS) + " | non-en avg |", "|---|---|" + "---|" * (len(LANGS) + 1)]
    for s in strengths:
        for pol in ("full", *POLICIES):
            for e in ("trained", "frozen"):
                name = arm(pol, e, s)
                if pol == "top" and e == "trained" or name not in record["per_run"]:
                    continue
                runs = [r for by_f in record["per_run"][name].values() for r in by_f.values()]
                means = [float(np.mean([r[lang] for r in runs])) for lang in LANGS]
                lines.append(
                    f"| {name} | {len(runs)} | "
                    + " | ".join(f"{m:.1f}" for m in means)
                    + f" | {np.mean([non_en(r) for r in runs]):.1f} |"
                )
    return lines


def comparison_cell(result: dict, name: str) -> str:
    res = result["comparisons"].get(name)
    if res is None or "non_en_avg" not in res:
        return "–"
    c = res["non_en_avg"]
    mark = " **effect**" if analysis.verdict(c) == "effect" else ""
    return analysis.cell(c).replace("-", "−") + mark


def policy_table(record: dict, result: dict, strengths: Sequence[str]) -> list[str]:
    head = "| strength | embeddings | " + " | ".join(f"{NAMES[p]} − full" for p in POLICIES) + " | detectable (SUF) |"
    lines = [head, "|---|---|" + "---|" * (len(POLICIES) + 1)]
    for s in strengths:
        for e in ("trained", "frozen"):
            cells = [comparison_cell(result, f"{arm(p, e, s)} - {arm('full', e, s)}") for p in POLICIES]
            suf = result["comparisons"].get(f"{arm('suf', e, s)} - {arm('full', e, s)}", {})
            det = suf.get("non_en_avg", {}).get("detectable")
            lines.append(f"| {s} | {e} | " + " | ".join(cells) + f" | {'–' if det is None else f'{det:.1f}'} |")
    return lines


def interaction_table(result: dict, strengths: Sequence[str]) -> list[str]:
    lines = ["| interaction (non-English average) | mean [t 95%] over pretraining seeds |", "|---|---|"]
    for name in result["comparisons"]:
        if name.startswith("("):
            shown = name.replace(" - ", " − ")
            lines.append(f"| {shown} | {comparison_cell(result, name)} |")
    return lines


def floors_table(record: dict) -> list[str]:
    f = record["floors"]
    lines = ["| floor | strength | en | non-en avg |", "|---|---|---|---|"]
    for ps, by_s in sorted(f["blind"].items()):
        for s, run in by_s.items():
            lines.append(
                f"| blind (question only), pretraining seed {ps} | {s} | {run['en']:.1f} | {non_en(run):.1f} |"
            )
    for s, run in f["random_init"].items():
        lines.append(f"| random initialisation | {s} | {run['en']:.1f} | {non_en(run):.1f} |")
    prior = f["answer_prior"]
    lines.append(
        f"| answer prior (per-template majority; every language) | – | {prior['per_template_majority']:.1f} | |"
    )
    return lines


def premise_per_seed(prem: dict) -> list[str]:
    lines = [
        "| pretraining seed | strength | embeddings | English margin | max alignment drop | swap-back 0-2 | "
        "embedding shift | layer premise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ps, by_s in prem.items():
        for s, by_e in by_s.items():
            for e, cell in by_e.items():
                v = cell["verdicts"]
                margin = "–" if v["english_margin"] is None else f"{v['english_margin']:+.1f}"
                lines.append(
                    f"| {ps} | {s} | {e} | {margin} | {v['max_mean_drop']:.2f} | {v['swap_back_gain']:+.1f} | "
                    f"{v['embedding_shift_gain']:+.1f} | {'holds' if v['layer_premise'] else 'fails'} |"
                )
    return lines


def render(record: dict) -> str:
    strengths = [s for s in ("base", "mid", "strong") if s in record["design"]["strengths"]]
    result = analysis.analyse(record)
    head = result["comparisons"].get(HEADLINE, {}).get("non_en_avg")
    lines = [
        "# Study 3: results, re-derived from the record",
        "",
        "Generated by `python -m synthetic.study3_report <record>` from the record alone (protocol: "
        "[protocol_study3.md](protocol_study3.md)). Test accuracy after epoch 5; non-English average = mean of rl, "
        "sw, cr, lo. Intervals: Student t 95% over the pretraining-seed means (each the mean of its two fine-tuning "
        "seeds), n = number of pretraining seeds; **effect** = the interval excludes 0. Strengths: "
        + "; ".join(f"`{s}` lr {record['design']['strengths'][s]:g}, {STATUS[s]}" for s in strengths)
        + ".",
        "",
        *(
            [
                f"**Not run: {len(record['missing'])} of the design's runs** (the record's `missing`); every table "
                "below holds the runs that finished.",
                "",
            ]
            if record.get("missing")
            else []
        ),
        "## Headline (confirmatory): SUF − full, base strength, embeddings trained",
        "",
    ]
    if head is not None:
        u = head["unit"]
        lines.append(
            f"SUF − full on the non-English average: **{analysis.cell(head).replace('-', '−')}** "
            f"(n = {u['n']} pretraining seeds; {analysis.verdict(head)}; smallest effect detectable at 80% power "
            f"{head['detectable']:.1f} points). Read as: "
            f"{premise_cell(record, 'base', 'trained').get('reading', 'no premise checks in the record')}."
        )
    lines += ["", "## Premise checks (policy full, auxiliary dev splits; protocol section 4)", ""]
    lines += premise_table(record, strengths)
    lines += ["", "Per pretraining seed (means over its two fine-tuning seeds):", ""] + premise_per_seed(
        record["premise"]
    )
    lines += ["", "## Every policy against full (non-English average; secondary, no multiplicity correction)", ""]
    lines += policy_table(record, result, strengths)
    lines += ["", "## Interactions: embeddings frozen vs trained, and the dose (stronger − base)", ""]
    lines += interaction_table(result, strengths)
    lines += ["", "## Mean accuracy per arm (descriptive)", ""]
    lines += accuracy_table(record, strengths)
    lines += ["", "## Floors", ""]
    lines += floors_table(record)
    lines += ["", analysis.format_report(result, "Every comparison, per pair").replace("# Every", "## Every", 1)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("record", help="Study 3's record.json")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    record = analysis.read_record(Path(args.record))
    for key in ("per_run", "premise", "floors", "design"):
        if key not in record:
            raise SystemExit(f"error: {args.record}: no {key!r} key (not a Study 3 record)")
    text = render(record)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
