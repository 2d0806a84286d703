"""Study 3 (issue 24; docs/synthetic/protocol_study3.md): premise checks on full, the embeddings factor, five
pretraining seeds with their own fine-tuning seeds, two fine-tuning strengths, LP-FT, and the analysis with the
pretraining seed as the unit. Every run goes through the real train_uc2.py; the record holds every run's numbers
(per language, per epoch), the premise checks and the intervals.

  python -m synthetic.study3 --out synth3_out --record      # make synth: the whole study (~2 h 40 min, 2 cores)
  python -m synthetic.study3 --out synth3_small --small     # make synth-small (~15 min)

Order: calibration (pretraining seed 0: full x embeddings x strengths, the blind floors, the premise checks; the
fallback of protocol section 5 applied once if needed), then every other run, then the checks, the record and the
report. A finished run is never run again (its model_final.pt exists), so an interrupted study continues.

Off the reading path: a study in the synthetic world (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from synthetic import analysis
from synthetic import lpft
from synthetic import premise
from synthetic import study as ss
from synthetic import study3_report
from synthetic.study3_report import arm
from synthetic import world as sw
from synthetic.xvlmaml_study import job_cpu_seconds

ROOT = ss.ROOT
RECORD = ROOT / "docs" / "synthetic" / "study3_record.json"
PROTOCOL = "docs/synthetic/protocol_study3.md"
STRENGTHS = {"base": 3e-4, "mid": 1e-3, "strong": 1e-3}  # protocol section 3; mid: amendment A2 (exploratory)
STRONG_FALLBACK = {"premise": 2e-3, "english": 6e-4}  # protocol section 5, applied once
POLICIES = ("full", "suf", "llrd", "lpft", "top")
EMBEDDINGS = ("trained", "frozen")
PRETRAIN_SEEDS = (0, 1, 2, 3, 4)
SMALL = {  # make synth-small; LP-FT: amendment A3
    "pretrain_seeds": (0, 1),
    "finetune_per_seed": 1,
    "strengths": ("base",),
    "policies": ("full", "suf", "lpft"),
}


def finetune_seeds(ps: int, per_seed: int = 2) -> list[int]:
    """Distinct per pretraining seed (protocol section 3: nested, not crossed)."""
    return [100 + 2 * ps + i for i in range(per_seed)]


def arms(policies: Sequence[str], strengths: Sequence[str]) -> list[tuple[str, str, str]]:
    """(policy, embeddings, strength); top once per strength (its policy freezes the embeddings)."""
    return [(p, e, s) for s in strengths for p in policies for e in EMBEDDINGS if not (p == "top" and e == "trained")]


def resume_if_interrupted(cmd: list[str]) -> list[str]:
    """A run stopped before its end (its folder holds args.json, no model_final.pt) continues from its last epoch's
    checkpoint, or starts afresh when it stopped before the first (the trainers' --resume; bitwise exact, so the
    finished run equals an uninterrupted one)."""
    run = Path(cmd[cmd.index("--output-dir") + 1])
    return cmd + ["--resume"] if (run / "args.json").is_file() or (run / "checkpoint_last.pt").is_file() else cmd


class Design:
    def __init__(self, out: Path, pretrain_seeds, per_seed: int, strengths, policies, checkpoint0: Path, steps=None):
        self.out, self.world, self.runs = out, out / "world", out / "runs"
        self.pretrain_seeds, self.per_seed = list(pretrain_seeds), per_seed
        self.strengths = {s: STRENGTHS[s] for s in strengths}
        self.policies, self.max_steps = list(policies), steps
        self.ckpts = {p: (checkpoint0 if p == 0 else out / "pretrain" / f"seed{p}.bin") for p in self.pretrain_seeds}

    def run_dir(self, name: str, ps: int, fs: int) -> Path:
        return self.runs / f"{name}-p{ps}-f{fs}"

    def finetune_job(self, ckpt, policy: str, fs: int, strength: str, run: Path, **kw) -> tuple[list[str], Path]:
        """synthetic.study's fine-tuning job at this design's lr and step cap; an interrupted run resumes."""
        cmd, log = ss.finetune_job(
            self.world, ckpt, policy, fs, self.strengths[strength], run, max_steps=self.max_steps, **kw
        )
        return resume_if_interrupted(cmd), log

    def finetune(self, policy: str, emb: str, strength: str, ps: int, fs: int) -> tuple[list[str], Path] | None:
        run = self.run_dir(arm(policy, emb, strength), ps, fs)
        if (run / "model_final.pt").is_file():
            return None
        ckpt = self.runs / f"lp-p{ps}-f{fs}.pt" if policy == "lpft" else self.ckpts[ps]
        pol = "full" if policy == "lpft" else policy
        cmd, log = self.finetune_job(ckpt, pol, fs, strength, run)
        return (cmd + ["--freeze-embeddings"] if emb == "frozen" and policy != "top" else cmd), log

    def blind(self, strength: str, ps: int) -> tuple[list[str], Path] | None:
        run = self.run_dir(f"blind-{strength}", ps, finetune_seeds(ps)[0])
        if (run / "model_final.pt").is_file():
            return None
        return self.finetune_job(
            self.ckpts[ps], "full", finetune_seeds(ps)[0], strength, run, features="features_blind.lmdb"
        )

    def random_init(self, strength: str) -> tuple[list[str], Path] | None:
        run = self.runs / f"randinit-{strength}-f100"
        if (run / "model_final.pt").is_file():
            return None
        return self.finetune_job(None, "full", 100, strength, run)

    def floors(self) -> dict:
        """The blind runs' and random initialisation's final test accuracies, and the answer priors."""
        out: dict = {"answer_prior": ss.majority_floor(self.world), "blind": {}, "random_init": {}}
        for s in self.strengths:
            for ps in self.pretrain_seeds:
                run = self.run_dir(f"blind-{s}", ps, finetune_seeds(ps)[0])
                if (run / "model_final.pt").is_file():
                    out["blind"].setdefault(str(ps), {})[s] = ss.final_accuracy(run)
            run = self.runs / f"randinit-{s}-f100"
            if (run / "model_final.pt").is_file():
                out["random_init"][s] = ss.final_accuracy(run)
        return out

    def probe(self, ps: int, fs: int) -> tuple[list[str], Path] | None:
        out = self.runs / f"lp-p{ps}-f{fs}.pt"
        if out.is_file():
            return None
        cmd = [sys.executable, "-m", "synthetic.lpft", "--world", str(self.world), "--checkpoint", str(self.ckpts[ps])]
        return cmd + ["--seed", str(fs), "--out", str(out)], out.with_suffix(".log")

    def jobs(self, pretrain_seeds, strengths, policies, random_init=False) -> list[tuple[list[str], Path]]:
        """Probes first (LP-FT's second phase needs them); then strength by strength in the design's order (base,
        the headline's, first: amendment A2), full and the floors before the rest."""
        seeds = [(ps, fs) for ps in pretrain_seeds for fs in finetune_seeds(ps, self.per_seed)]
        out = [self.probe(ps, fs) for ps, fs in seeds] if "lpft" in policies else []
        for s in [s for s in self.strengths if s in strengths]:
            first, rest = [], [self.random_init(s)] if random_init else []
            for ps, fs in seeds:
                for pol, emb, _ in arms(policies, [s]):
                    (first if pol == "full" else rest).append(self.finetune(pol, emb, s, ps, fs))
            first += [self.blind(s, ps) for ps in pretrain_seeds]
            out += first + rest
        return [j for j in out if j is not None]


def premise_cells(d: Design, pretrain_seeds, strengths: Sequence[str] | None = None) -> dict:
    """pretraining seed -> strength -> embeddings -> {fine-tuning seed: checks, "verdicts": ...}; cached per run."""
    out: dict = {}
    for ps in pretrain_seeds:
        for s in strengths or d.strengths:
            blind = d.run_dir(f"blind-{s}", ps, finetune_seeds(ps)[0])
            for emb in EMBEDDINGS:
                checks, blind_en = {}, None
                for fs in finetune_seeds(ps, d.per_seed):
                    run = d.run_dir(arm("full", emb, s), ps, fs)
                    cache = run / "premise.json"
                    if not (run / "model_final.pt").is_file() or not (blind / "model_final.pt").is_file():
                        continue  # not finished (a --record-only record lists it under "missing")
                    if not cache.is_file():
                        res = premise.check_run(d.world, d.ckpts[ps], run, blind)
                        cache.write_text(json.dumps(res, indent=1) + "\n")
                    checks[str(fs)] = json.loads(cache.read_text())
                    blind_en = checks[str(fs)].get("blind_dev_en")
                if not checks:
                    continue
                cell = {**checks, "verdicts": premise.verdicts(list(checks.values()), blind_en)}
                out.setdefault(str(ps), {}).setdefault(s, {})[emb] = cell
    return out


def calibrate(d: Design, workers: int) -> dict:
    """Protocol section 5: seed 0's full runs, floors and checks; the strong fallback once, mechanically. The decision
    is stored in <out>/calibration.json and read back on restart (the moved runs must not be judged again)."""
    p0, stored = d.pretrain_seeds[:1], d.out / "calibration.json"
    judged = [s for s in ("base", "strong") if s in d.strengths]  # mid (amendment A2) plays no part
    if stored.is_file():
        fallback = json.loads(stored.read_text())["fallback"]
        if fallback:
            d.strengths["strong"] = fallback["strong_lr"]
        print(f"calibration: stored decision {fallback} ({stored})", flush=True)
        return {"fallback": fallback, "cells": premise_cells(d, p0, judged)[str(p0[0])]}
    decided = calibrate_once(d, p0, judged, workers)
    stored.write_text(json.dumps({"fallback": decided["fallback"]}, indent=1) + "\n")
    return decided


def calibrate_once(d: Design, p0: list[int], judged: list[str], workers: int) -> dict:
    ss.parallel(d.jobs(p0, judged, ["full"]), workers)
    cells = premise_cells(d, p0, judged)[str(p0[0])]
    if "strong" not in d.strengths or any(c["verdicts"]["layer_premise"] for s in cells.values() for c in s.values()):
        return {"fallback": None, "cells": cells}
    english_fails = not all(c["verdicts"]["P0_english"] for c in cells["strong"].values())
    reason = "english" if english_fails else "premise"
    d.strengths["strong"] = STRONG_FALLBACK[reason]
    print(f"calibration: layer premise fails in every cell; strong -> {d.strengths['strong']} ({reason})", flush=True)
    moved = [
        d.run_dir(arm("full", e, "strong"), p0[0], fs) for e in EMBEDDINGS for fs in finetune_seeds(p0[0], d.per_seed)
    ]
    for run in moved + [d.run_dir("blind-strong", p0[0], finetune_seeds(p0[0])[0])]:  # kept aside for the record
        for path in (run, run.with_name(run.name + ".log")):
            path.rename(path.with_name(path.name.replace(run.name, run.name + "-calibration-lr1e-3")))
    ss.parallel(d.jobs(p0, ["strong"], ["full"]), workers)
    return {
        "fallback": {"reason": reason, "strong_lr": d.strengths["strong"]},
        "cells": premise_cells(d, p0, judged)[str(p0[0])],
    }


def collect(d: Design) -> tuple[dict, dict, dict]:
    """per_run (final test accuracy per language), per_epoch, cpu seconds per job."""
    per_run: dict = {}
    per_epoch: dict = {}
    cpu: dict = {}
    for ps in d.pretrain_seeds:
        for fs in finetune_seeds(ps, d.per_seed):
            for pol, emb, s in arms(d.policies, list(d.strengths)):
                name = arm(pol, emb, s)
                run = d.run_dir(name, ps, fs)
                if not (run / "model_final.pt").is_file():
                    continue
                ev = ss.evals(run)
                per_run.setdefault(name, {}).setdefault(str(ps), {})[str(fs)] = ss.final_accuracy(run)
                per_epoch.setdefault(name, {}).setdefault(str(ps), {})[str(fs)] = {
                    str(e): {lang: r["accuracy"] for lang, r in recs.items()} for e, recs in sorted(ev.items())
                }
                cpu[run.name] = job_cpu_seconds(run.with_name(run.name + ".log"))
    return per_run, per_epoch, cpu


def analysis_spec(strengths: Sequence[str], policies: Sequence[str]) -> dict:
    """Protocol section 6: the headline, every policy - full per cell, the embeddings and dose interactions."""
    comps: list = []
    others = [p for p in ("suf", "llrd", "lpft") if p in policies]
    for s in strengths:
        for e in EMBEDDINGS:
            comps += [[arm(p, e, s), arm("full", e, s)] for p in others]
            if "top" in policies:
                comps.append([arm("top", e, s), arm("full", e, s)])
        for p in others:
            comps.append(
                [arm(p, "frozen", s), arm("full", "frozen", s), arm(p, "trained", s), arm("full", "trained", s)]
            )
    for hi in [s for s in ("mid", "strong") if s in strengths and "base" in strengths]:  # mid: amendment A2
        for e in EMBEDDINGS:
            for p in others + (["top"] if "top" in policies else []):
                comps.append([arm(p, e, hi), arm("full", e, hi), arm(p, e, "base"), arm("full", e, "base")])
    head = [arm("suf", "trained", "base"), arm("full", "trained", "base")]
    comps.sort(key=lambda c: c != head)  # the headline first
    return {
        "metrics": {"non_en_avg": {"op": "mean", "of": list(sw.LANGS[1:])}},
        "comparisons": comps,
        "report_metrics": ["non_en_avg", *sw.LANGS],
        "headline": "non_en_avg",
    }


def git_commit(path: str | None = None) -> str:
    cmd = ["git", "log", "-1", "--format=%H", *(["--", path] if path else [])]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="synth3_out", help="study folder (world/, pretrain/, runs/, record.json)")
    p.add_argument("--small", action="store_true", help="make synth-small (SMALL)")
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=None, help="(tests) override the design's")
    p.add_argument("--checkpoint", default=str(ROOT / "tests" / "fixtures" / "synth" / "pretrain_seed0.bin"))
    p.add_argument("--pretrain-steps", type=int, default=ss.PRETRAIN_STEPS)
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="(tests) cap fine-tuning steps")
    p.add_argument("--world-config", default=None, help="(tests) a WorldConfig JSON instead of the default world")
    p.add_argument("--workers", type=int, default=2, help="parallel one-thread jobs (2 cores: 2)")
    p.add_argument("--record", action="store_true", help=f"copy the record to {RECORD.relative_to(ROOT)}")
    p.add_argument(
        "--record-only",
        action="store_true",
        help="train nothing: the record and report of the runs finished so far (the rest listed under 'missing')",
    )
    args = p.parse_args(argv)
    start, out = time.time(), Path(args.out)
    small = SMALL if args.small else {}
    d = Design(
        out,
        args.pretrain_seeds or small.get("pretrain_seeds", PRETRAIN_SEEDS),
        small.get("finetune_per_seed", 2),
        small.get("strengths", tuple(STRENGTHS)),
        small.get("policies", POLICIES),
        Path(args.checkpoint),
        args.max_steps_per_epoch,
    )
    if not (d.world / "world.json").exists():
        cfg = (
            sw.WorldConfig(**json.loads(Path(args.world_config).read_text())) if args.world_config else sw.WorldConfig()
        )
        sw.build_world(d.world, cfg)
    sw.add_auxiliary(d.world)
    todo = [ss.pretrain_job(d.world, s, args.pretrain_steps, c) for s, c in d.ckpts.items() if not c.exists()]
    print(f"pretraining {len(todo)} seed(s) ...", flush=True)
    ss.parallel(todo, args.workers)
    calibration = calibrate(d, args.workers)
    jobs = d.jobs(d.pretrain_seeds, list(d.strengths), d.policies, random_init=not args.small)
    missing = [log.with_suffix("").name for _, log in jobs] if args.record_only else []
    print(f"fine-tuning {0 if args.record_only else len(jobs)} job(s); not run: {len(missing)} ...", flush=True)
    ss.parallel([] if args.record_only else jobs, args.workers)
    prem = premise_cells(d, d.pretrain_seeds)
    per_run, per_epoch, cpu = collect(d)
    spec = analysis_spec(list(d.strengths), d.policies)
    record = {
        "study": "Study 3 (issue 24)",
        "protocol": PROTOCOL,
        "protocol_commit": git_commit(PROTOCOL),
        "code_commit": git_commit(),
        "design": {
            "pretrain_seeds": d.pretrain_seeds,
            "finetune_seeds": {str(ps): finetune_seeds(ps, d.per_seed) for ps in d.pretrain_seeds},
            "strengths": d.strengths,
            "policies": d.policies,
            "embeddings": list(EMBEDDINGS),
            "finetuning": {**ss.FT, "max_steps_per_epoch": d.max_steps},
            "lpft_probe": lpft.PROBE,
            "small": bool(args.small),
        },
        "calibration": {"fallback": calibration["fallback"]},
        "missing": missing,
        "premise": prem,
        "floors": d.floors(),
        "per_run": per_run,
        "per_epoch": per_epoch,
        "analysis": spec,
    }
    record["intervals"] = analysis.analyse(record)
    record["compute"] = {"cpu_seconds": cpu, "wall_seconds": time.time() - start}
    (out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    report = study3_report.render(record)
    (out / "RESULTS.md").write_text(report)
    if args.record:
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(report)
    print(f"study 3 finished in {time.time() - start:.0f} s; {out / 'RESULTS.md'}, {out / 'record.json'}")


if __name__ == "__main__":
    main()
