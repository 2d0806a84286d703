"""XVL-MAML in the synthetic world (docs/synthetic/protocol.md amendment A8): the real
comparisons/xvlmaml/xvlmaml.py continues each English run of policy full of a finished study (`make synth`),
meta-trains with the auxiliary language's dev split (synthetic.world.add_auxiliary), is evaluated zero-shot in every
language by the existing evaluation, and is compared,
paired on (pretraining seed, fine-tuning seed), with the study's full and SUF runs (their epoch-5 accuracies), by
synthetic.analysis (the pretraining seed is the unit of replication: a Student t 95% interval over the
per-pretraining-seed means, n stated, the per-pair table beside it; docs/synthetic/reanalysis.md):

  python -m synthetic.xvlmaml_study --out synth_out --record       # make synth-xvlmaml (after make synth)
  python -m synthetic.xvlmaml_study --from-record docs/synthetic/study1_record.json --out DIR   # no training

Also, as secondary results: a control that runs the same command with the contrastive weight 0 (the inner update
is then the identity and the outer loss the English task loss alone: the same number of extra English updates at
the same learning rate, without the auxiliary language), and the auxiliary x target matrix of xvlmaml.py for the
first seed pair.

Off the reading path: a study in the synthetic world (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from formats import readers
import train_uc2
from comparisons.xvlmaml import xvlmaml
from synthetic import analysis
from synthetic import study as ss
from synthetic import world as sw

AUX = "rl"  # the headline auxiliary language (amendment A8: why rl)
MATRIX_AUX = ("rl", "sw", "cr", "lo")
# xvlmaml's defaults scaled to this world (A8): learning rates by the ratio of the world's fine-tuning lr (3e-4,
# chosen on English dev, run r5) to IGLUE's UC2 xGQA lr (4e-5); the English batch is the world's fine-tuning
# batch; everything else (500 meta-updates, support/query 16, one second-order inner step, lambda 1, separate
# embeddings, 256-d head, temperature 0.07) is xvlmaml's default.
LR_SCALE = ss.STUDY_LR / train_uc2.DEFAULTS["paper", "xgqa"]["lr"]  # 7.5


def _scaled(lr: float) -> float:
    return float(f"{lr * LR_SCALE:.3g}")  # 7.5e-05, not 7.499999999999999e-05 in the commands and the record


HPARAMS = {
    "variant": "full",
    "lr": _scaled(xvlmaml.DEFAULTS["lr"]),
    "inner_lr": _scaled(xvlmaml.DEFAULTS["inner_lr"]),
    "en_batch_size": ss.FT["batch_size"],
    "iters_per_epoch": xvlmaml.DEFAULTS["iters_per_epoch"],
    "epochs": xvlmaml.DEFAULTS["epochs"],
}
BASELINES = ("full", "suf")
Runner = Callable[[list[tuple[list[str], Path]], int], None]


def xvlmaml_job(
    world: Path,
    init_run: Path,
    aux: str,
    seed: int,
    run: Path,
    *,
    cl_weight: float = 1.0,
    iters: int | None = None,
) -> tuple[list[str], Path]:
    """The xvlmaml.py train command continuing `init_run`; final zero-shot evaluation only (results.json)."""
    h = HPARAMS
    cmd = [
        sys.executable,
        "-m",
        "comparisons.xvlmaml.xvlmaml",
        "train",
        "--run",
        str(init_run),
        "--aux-lang",
        aux,
        "--data-root",
        str(world),
        "--features",
        str(world / "features.lmdb"),
        str(world / sw.AUX_FEATURES),
        "--tokenizer",
        str(world / "tokenizer"),
        "--max-regions",
        str(ss.FT["max_regions"]),
        "--variant",
        h["variant"],
        "--lr",
        repr(h["lr"]),
        "--inner-lr",
        repr(h["inner_lr"]),
        "--en-batch-size",
        str(h["en_batch_size"]),
        "--iters-per-epoch",
        str(iters or h["iters_per_epoch"]),
        "--epochs",
        str(h["epochs"]),
        "--cl-weight",
        repr(cl_weight),
        "--seed",
        str(seed),
        "--epoch-eval-split",
        "none",
        "--num-workers",
        "0",
        "--output-dir",
        str(run),
    ]
    return cmd, run.with_name(run.name + ".log")


def _evaluated(job: tuple[list[str], Path]) -> bool:
    return (Path(job[0][job[0].index("--output-dir") + 1]) / "results.json").is_file()


def run_dirs(out: Path, ps: int, fs: int) -> dict[str, Path]:
    base = out / "xvlmaml" / f"p{ps}-f{fs}"
    return {"xvlmaml": base / f"aux-{AUX}", "control": base / "control-cl0"}


def final_results(run: Path) -> dict[str, float]:
    """lang -> accuracy of the final zero-shot evaluation (results.json) of an xvlmaml run."""
    return {
        lang: m["accuracy"]
        for lang, m in readers.read_json(run / "results.json", annotations=False)["test"]["langs"].items()
    }


def job_cpu_seconds(log: Path) -> float | None:
    """CPU seconds synthetic.study.run_job appended to a job's log; None when the job ran another way."""
    found = re.findall(r"\[job: cpu ([0-9.]+) s", log.read_text()) if log.is_file() else []
    return float(found[-1]) if found else None


def targets_avg(acc: dict[str, float], aux: str) -> float:
    """The headline: mean over the non-English languages other than the auxiliary one."""
    return float(np.mean([v for lang, v in acc.items() if lang not in ("en", aux)]))


COMPARISONS = (("xvlmaml", "full"), ("xvlmaml", "suf"), ("control", "full"), ("xvlmaml", "control"))


def analysis_spec(aux: str) -> dict:
    """A8 item 5 and 7a: the target average (headline; non-English, auxiliary excluded), the non-English average
    (auxiliary included) and every language, for synthetic.analysis."""
    return {
        "metrics": {
            "target_avg": {"op": "mean", "of": [lang for lang in sw.LANGS[1:] if lang != aux]},
            "non_en_avg": {"op": "mean", "of": list(sw.LANGS[1:])},
        },
        "comparisons": [list(c) for c in COMPARISONS],
        "report_metrics": ["target_avg", "non_en_avg", *sw.LANGS],
        "headline": "target_avg",
    }


def compare(results: dict, aux: str) -> dict:
    """Paired differences on (pretraining seed, fine-tuning seed), the pretraining seed as the unit
    (synthetic.analysis); a comparison whose runs are missing is left out."""
    return analysis.analyse({"per_run": results, "analysis": analysis_spec(aux)})


def study(
    out: Path,
    pretrain_seeds: Sequence[int],
    finetune_seeds: Sequence[int],
    *,
    control: bool = True,
    matrix_aux: Sequence[str] = MATRIX_AUX,
    iters: int | None = None,
    workers: int = 2,
    runner: Runner = ss.parallel,
) -> dict:
    """Run what is missing (headline runs first, then the controls, then the matrix of the first pair), then
    collect and compare. The study's full and SUF runs of every pair must exist (make synth)."""
    world, runs = out / "world", out / "runs"
    pairs = [(ps, fs) for ps in pretrain_seeds for fs in finetune_seeds]
    missing = [runs / f"{pol}-p{ps}-f{fs}" for ps, fs in pairs for pol in BASELINES]
    missing = [r for r in missing if not (r / "model_final.pt").is_file()]
    if missing:
        raise SystemExit(
            f"error: no finished study run {missing[0]} (run `make synth` / python -m synthetic.study first)"
        )
    sw.add_auxiliary(world)
    jobs = {"xvlmaml": [], "control": [], "matrix": []}
    for ps, fs in pairs:
        d = run_dirs(out, ps, fs)
        jobs["xvlmaml"].append(xvlmaml_job(world, runs / f"full-p{ps}-f{fs}", AUX, fs, d["xvlmaml"], iters=iters))
        if control:
            jobs["control"].append(
                xvlmaml_job(world, runs / f"full-p{ps}-f{fs}", AUX, fs, d["control"], cl_weight=0.0, iters=iters)
            )
    ps0, fs0 = pairs[0]
    mdir = run_dirs(out, ps0, fs0)["xvlmaml"].parent
    for aux in matrix_aux:
        if aux != AUX:
            init = runs / f"full-p{ps0}-f{fs0}"
            jobs["matrix"].append(xvlmaml_job(world, init, aux, fs0, mdir / f"aux-{aux}", iters=iters))
    todo = [job for group in jobs.values() for job in group if not _evaluated(job)]
    print(f"xvl-maml: {len(todo)} run(s) to do ...", flush=True)
    runner(todo, workers)
    return collect(out, pairs, jobs, matrix_aux, mdir, runs / f"full-p{ps0}-f{fs0}")


def collect(out: Path, pairs, jobs: dict, matrix_aux: Sequence[str], mdir: Path, first_full: Path) -> dict:
    results: dict = {k: {} for k in ("full", "suf", "xvlmaml", "control")}
    for ps, fs in pairs:
        for pol in BASELINES:
            results[pol].setdefault(ps, {})[fs] = ss.final_accuracy(out / "runs" / f"{pol}-p{ps}-f{fs}")
        for kind, run in run_dirs(out, ps, fs).items():
            if (run / "results.json").is_file():
                results[kind].setdefault(ps, {})[fs] = final_results(run)
    cost = {
        kind: [c for c in (job_cpu_seconds(log) for _, log in group) if c is not None] for kind, group in jobs.items()
    }
    matrix = None
    done = {aux: mdir / f"aux-{aux}" / "results.json" for aux in matrix_aux}
    if matrix_aux and all(p.is_file() for p in done.values()):
        langs = {aux: readers.read_json(p, annotations=False)["test"]["langs"] for aux, p in done.items()}
        base = {lang: {"accuracy": acc} for lang, acc in ss.final_accuracy(first_full).items()}
        matrix = xvlmaml.matrix_table("xgqa", langs, base)
    return {
        "aux": AUX,
        "hparams": HPARAMS,
        "pairs": [list(p) for p in pairs],
        "results": {k: v for k, v in results.items() if v},
        "intervals": compare({k: v for k, v in results.items() if v}, AUX),
        "matrix": matrix,
        "matrix_pair": list(pairs[0]),
        "cpu_seconds": cost,
    }


def format_report(rep: dict) -> str:
    aux, langs = rep["aux"], sw.LANGS
    targets = [lang for lang in langs[1:] if lang != aux]
    h = rep["hparams"]
    lines = [
        "# XVL-MAML in the synthetic world (docs/synthetic/protocol.md amendment A8)",
        "",
        f"auxiliary language {aux} (its dev split); variant {h['variant']}; {h['epochs']} x {h['iters_per_epoch']} "
        f"meta-updates, lr {h['lr']:g}, inner lr {h['inner_lr']:g}, English batch {h['en_batch_size']}; continued "
        "from each English run of policy full; test accuracy, final evaluation. Headline: the target average = "
        f"mean over {', '.join(targets)} (non-English, auxiliary excluded).",
        *(["", f"Made without training from the per-run values of `{rep['source']}`."] if rep.get("source") else []),
        "",
        "## Accuracy per run",
        "",
        "| setup | pair | en | " + " | ".join(langs[1:]) + " | target avg | non-en avg |",
        "|---|---|---|" + "---|" * len(langs[1:]) + "---|---|",
    ]
    for kind, by_p in rep["results"].items():
        for ps, by_f in sorted(by_p.items()):
            for fs, acc in sorted(by_f.items()):
                lines.append(
                    f"| {kind} | p{ps} f{fs} | {acc['en']:.1f} | "
                    + " | ".join(f"{acc[lang]:.1f}" for lang in langs[1:])
                    + f" | {targets_avg(acc, aux):.1f} | {ss.non_en_avg(acc):.1f} |"
                )
    lines += ["", "## Mean over pairs", "", "| setup | runs | en | " + " | ".join(langs[1:]) + " | target avg |"]
    lines.append("|---|---|---|" + "---|" * len(langs[1:]) + "---|")
    for kind, by_p in rep["results"].items():
        accs = [a for by_f in by_p.values() for a in by_f.values()]
        mean = {lang: float(np.mean([a[lang] for a in accs])) for lang in langs}
        lines.append(
            f"| {kind} | {len(accs)} | {mean['en']:.1f} | "
            + " | ".join(f"{mean[lang]:.1f}" for lang in langs[1:])
            + f" | {float(np.mean([targets_avg(a, aux) for a in accs])):.1f} |"
        )
    lines += ["", *ss.intervals_section(rep["intervals"], "Paired differences")]
    if rep["matrix"]:
        ps, fs = rep["matrix_pair"]
        lines += ["", f"## Auxiliary x target matrix (secondary; one seed pair: p{ps} f{fs}; no interval)", ""]
        lines.append(xvlmaml.format_matrix(rep["matrix"]))
    cost = rep["cpu_seconds"]
    if cost is None:
        lines += [
            "",
            "## Cost",
            "",
            "Not in the record this report was made from (each job's log holds its CPU seconds).",
        ]
    elif any(cost.values()):
        lines += ["", "## Cost (CPU seconds per job, one thread)", ""]
        for kind, secs in cost.items():
            if secs:
                lines.append(f"- {kind}: {len(secs)} job(s), {min(secs):.0f}–{max(secs):.0f} s each")
    return "\n".join(lines) + "\n"


def record(rep: dict, path: Path = ss.RECORD) -> None:
    """Add the comparisons under "xvlmaml" to the study's record, keeping what is there."""
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec["xvlmaml"] = {
        "design": f"aux {rep['aux']}, pairs {rep['pairs']}, "
        + ", ".join(f"{k} {v}" for k, v in rep["hparams"].items()),
        "headline": "target average = mean over the non-English languages other than the auxiliary",
        "per_run": rep["results"],
        "analysis": analysis_spec(rep["aux"]),
        "intervals": rep["intervals"],
        "matrix": rep["matrix"],
    }
    path.write_text(json.dumps(rec, indent=1) + "\n")


def from_record(source: Path) -> dict:
    """No training: the report of the runs a record holds per run (e.g. docs/synthetic/study1_record.json, which
    transcribes r7's full and SUF and r8's XVL-MAML and control exactly); the matrix is the study record's
    (RECORD, entry xvlmaml), the jobs' CPU seconds are in no record (cpu_seconds None)."""
    src = analysis.read_record(source)
    kinds = ("full", "suf", "xvlmaml", "control")
    if not all(k in src.get("per_run", {}) for k in kinds[:3]):
        raise SystemExit(f"error: {source}: 'per_run' needs the runs of {', '.join(kinds[:3])}")
    results = {k: src["per_run"][k] for k in kinds if k in src["per_run"]}
    pairs = sorted((int(ps), int(fs)) for ps, by_f in results["xvlmaml"].items() for fs in by_f)
    old = readers.read_json(ss.RECORD, annotations=False).get("xvlmaml", {}) if ss.RECORD.is_file() else {}
    return {
        "aux": AUX,
        "hparams": HPARAMS,
        "pairs": [list(p) for p in pairs],
        "results": results,
        "intervals": compare(results, AUX),
        "matrix": old.get("matrix"),
        "matrix_pair": list(pairs[0]),
        "cpu_seconds": None,
        "source": str(source),
    }


def _print_jobs(jobs: list[tuple[list[str], Path]], workers: int) -> None:
    for cmd, log in jobs:
        print(shlex.join(cmd), ">", shlex.quote(str(log)), "2>&1")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="synth_out", help="the study folder of synthetic/study.py (world/, runs/)")
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--no-control", action="store_true", help="skip the contrastive-weight-0 control runs")
    p.add_argument("--matrix-aux", nargs="*", default=list(MATRIX_AUX), help="matrix rows (none: no matrix)")
    p.add_argument("--workers", type=int, default=2, help="parallel one-thread jobs (2 cores: 2)")
    p.add_argument("--record", action="store_true", help=f"add the comparisons to {ss.RECORD.relative_to(ss.ROOT)}")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do, run nothing")
    p.add_argument("--from-record", default=None, help="no training: report the runs a record holds per run")
    args = p.parse_args(argv)
    start, out = time.time(), Path(args.out)
    runner = _print_jobs if args.dry_run else ss.parallel
    if args.from_record:
        rep = from_record(Path(args.from_record))
        out.mkdir(parents=True, exist_ok=True)
    else:
        rep = study(
            out,
            args.pretrain_seeds,
            args.finetune_seeds,
            control=not args.no_control,
            matrix_aux=args.matrix_aux,
            workers=args.workers,
            runner=runner,
        )
    if args.dry_run:
        return
    (out / "xvlmaml.json").write_text(json.dumps(rep, indent=1) + "\n")
    report = format_report(rep)
    (out / "XVLMAML.md").write_text(report)
    if args.record:
        record(rep)
    print(report)
    print(f"finished in {time.time() - start:.0f} s; {out / 'XVLMAML.md'}, {out / 'xvlmaml.json'}")


if __name__ == "__main__":
    main()
