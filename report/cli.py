"""Reports from run folders: `python -m report table|plot|similarity|figures` (what `eval_zeroshot.py
table|plot|similarity|figures` did before; eval_zeroshot.py keeps the evaluation itself).

  python -m report table RUN [RUN ...]        Tables 1-3 layout, the paper's numbers beside ours
  python -m report plot RUN [RUN ...]         Figure 2 (per language) / 3 (per question type)
  python -m report similarity --run RUN       Figure 4 ([CLS] similarity of parallel examples)
  python -m report figures RUN [RUN ...]      plot + similarity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from formats import tokenizer_check
import console.cli
import engine
import eval_zeroshot
import scoring.evaluate
from report import figures, tables
from report import runs as report_runs
from formats import run_folder


def cmd_similarity(args) -> int:
    """Figure 4 for one run: [CLS] features of every test language, pairwise parallel similarity."""
    dist = engine.setup_distributed()
    run = Path(args.run)
    try:
        model, meta = eval_zeroshot.load_model(eval_zeroshot.run_checkpoint(run), dist.device)
        if meta["task"] not in ("xgqa", "xvnli"):
            raise SystemExit(
                f"error: similarity needs an xgqa or xvnli run (translation-parallel examples), {run} is {meta['task']}"
            )
        eval_zeroshot.resolve_data_args(args, eval_zeroshot.read_run_args(run), meta)
        tokenizer = tokenizer_check.load_tokenizer(args.tokenizer)
        sets = scoring.evaluate.build_eval_sets(
            meta["model"],
            meta["task"],
            args.data_root,
            tokenizer,
            args.langs,
            args.split,
            features=eval_zeroshot.feature_reader(args.features),
            images=args.images,
            max_regions=args.max_regions,
            image_res=meta["config"].get("image_res", 384),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    sim = figures.similarity_for(
        model, sets, dist, batch_size=args.batch_size, num_workers=args.num_workers, amp=args.amp
    )
    if dist.is_main:
        out = Path(args.out or run)
        out.mkdir(parents=True, exist_ok=True)
        sim.update(
            model=meta["model"],
            task=meta["task"],
            policy=meta.get("policy"),
            split=args.split,
            checkpoint=str(eval_zeroshot.run_checkpoint(run)),
        )
        run_folder.atomic_write_text(out / "fig4_cls_similarity.json", json.dumps(sim, indent=1) + "\n")
        figures.plot_similarity(
            sim,
            out / "fig4_cls_similarity.png",
            f"{meta['task']} {meta['model']} {meta.get('policy')}: [CLS] similarity x100",
        )
        print(
            "\n".join(
                [" " * 4 + "".join(f"{l:>6}" for l in sim["langs"])]
                + [f"{a:>4}" + "".join(f"{100 * v:6.0f}" for v in row) for a, row in zip(sim["langs"], sim["matrix"])]
            )
        )
        print(f"unpaired similarity: {100 * sim['unpaired']:.1f}\nwrote {out / 'fig4_cls_similarity.json'}, .png")
    engine.cleanup_distributed()
    return 0


def cmd_plot(args) -> int:
    try:
        runs = runs_with_curves(args.runs)
        if not runs:
            raise SystemExit(f"error: none of the folders given has per-epoch evaluations in a {run_folder.METRICS}")
        return _plot(args, runs)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def runs_with_curves(folders: Sequence[str]) -> list[Path]:
    """The run folders whose metrics.jsonl holds evaluation lines (the curves' points); every other one is named
    on stderr and skipped (a --no-eval run has none)."""
    runs = []
    for r in map(Path, folders):
        if not (r / run_folder.METRICS).is_file():
            print(f"note: {r} has no {run_folder.METRICS}: no curves", file=sys.stderr)
        elif not eval_zeroshot.read_epoch_metrics(r):
            print(f"note: {r} has no evaluation in its {run_folder.METRICS} (--no-eval?): no curves", file=sys.stderr)
        else:
            runs.append(r)
    return runs


def _plot(args, runs: list[Path]) -> int:
    groups: dict[tuple, list] = {}
    for r in runs:
        info = report_runs.run_info(r)
        groups.setdefault((info.get("model"), info.get("task")), []).append(r)
    for (model, task), rs in groups.items():
        out = Path(args.out) if args.out else (rs[0] if len(rs) == 1 else rs[0].parent / "figures")
        tag = "" if len(groups) == 1 and (args.out or len(rs) == 1) else f"_{model}_{task}"
        for f in figures.plot_curves(rs, out, tag):
            print(f"wrote {f} (+ .json, .csv)")
    return 0


def cmd_figures(args) -> int:
    """plot for every run with evaluations (the others named and skipped); similarity for every xgqa/xvnli run whose
    data is reachable."""
    try:
        runs = runs_with_curves(args.runs)
        if runs:
            _plot(args, runs)
        else:
            print("note: no run has evaluations: no Figures 2-3", file=sys.stderr)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for r in args.runs:
        if not (Path(r) / run_folder.FINAL).is_file() and not (Path(r) / run_folder.CHECKPOINT).is_file():
            continue
        info = report_runs.run_info(r)
        if info.get("task") not in ("xgqa", "xvnli"):
            continue
        sargs = argparse.Namespace(**{**vars(args), "run": r, "out": None})
        try:
            cmd_similarity(sargs)
        except SystemExit as e:
            print(f"note: Figure 4 skipped for {r}: {e}", file=sys.stderr)
    return 0


def cmd_table(args) -> int:
    runs = [Path(r) for r in args.runs]
    try:
        missing = [r for r in runs if report_runs.run_results(r, args.split) is None]
        if len(missing) == len(runs):
            raise SystemExit(
                f"error: none of the {len(runs)} run folder(s) has {args.split} results (results.json "
                f"or {args.split} evaluations in {run_folder.METRICS}); evaluate them first (make eval RUN=...)"
            )
        for r in missing:
            print(f"note: {r} has no {args.split} results: not in the tables", file=sys.stderr)
        built = tables.build_tables(runs, args.split)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(tables.format_tables(built, args.per_language, paper=not args.no_paper))
    if args.out:
        run_folder.atomic_write_text(args.out, json.dumps(built, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.iglue_csv:
        for name, text in tables.merged_iglue_csvs([Path(r) for r in args.runs], args.split).items():
            run_folder.atomic_write_text(Path(args.iglue_csv) / name, text)
            print(f"wrote {Path(args.iglue_csv) / name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = console.cli.ArgumentParser(prog="python -m report", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("similarity", help="Figure 4: [CLS] similarity of translation-parallel examples")
    sim.add_argument("--run", "--run-dir", dest="run", required=True, help="run folder (--run-dir under torchrun)")
    sim.add_argument("--out", default=None, help="output folder (default: the run folder)")
    eval_zeroshot.add_data_args(sim, translate_test=False, retrieval=False)
    pl = sub.add_parser("plot", help="Figures 2/3: per-epoch curves from metrics.jsonl")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", default=None, help="output folder (default: the run, or <parent>/figures for several)")
    fg = sub.add_parser("figures", help="plot + similarity for every run given")
    fg.add_argument("runs", nargs="+")
    fg.add_argument("--out", default=None, help="output folder of the curves (default: beside the runs)")
    eval_zeroshot.add_data_args(fg, translate_test=False, retrieval=False)
    tb = sub.add_parser("table", help="Tables 1-3 from run folders, the paper's numbers beside ours")
    tb.add_argument("runs", nargs="+")
    tb.add_argument("--split", default="test", help="results.json entry to use (default test)")
    tb.add_argument("--per-language", action="store_true", help="also per-language tables (paper Tables 4-6)")
    tb.add_argument(
        "--no-paper", action="store_true", help="leave the paper's numbers out (runs outside its setting: synthetic)"
    )
    tb.add_argument("--out", default=None, help="also write the tables as JSON here")
    tb.add_argument(
        "--iglue-csv",
        default=None,
        metavar="DIR",
        help="also write IGLUE's results/ CSVs here, one row per setup (few-shot: the per-language runs "
        "of a setup merged into one row, e.g. xGQA_48.csv)",
    )
    return p


@console.cli.exits_on_bad_input
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    commands = {"plot": cmd_plot, "similarity": cmd_similarity, "figures": cmd_figures, "table": cmd_table}
    return commands[args.command](args)
