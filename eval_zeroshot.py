#!/usr/bin/env python
"""Zero-shot cross-lingual evaluation on IGLUE, translate-test and few-shot transfer, for UC2 and CCLM
checkpoints written by train_uc2/train_cclm. The paper's tables and figures from run folders: python -m report.

  python eval_zeroshot.py evaluate --run RUN [--langs en de] [--split test] [--translate-test]
  python eval_zeroshot.py --run RUN                  (same as `evaluate`)
  torchrun --nproc_per_node N eval_zeroshot.py evaluate --run-dir RUN   (torchrun would take --run as its own)
  python eval_zeroshot.py fewshot --checkpoint RUN/model_final.pt --lang de --shots 48 --output-dir OUT

Metrics are percentages, as IGLUE and the paper report them. The evaluation itself (scoring/evaluate.py's
evaluate_task, each model answering through its own predict / retrieval_scores) is the one the trainers run after
every epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from formats import tokenizer_check
import engine
import scoring.evaluate
import scoring.metrics
import scoring.results
import train_cclm
import train_uc2
from console import cli
from formats import feature_sets, iglue, iglue_layout, readers, run_folder, torch_files, volta
from formats.features import is_serialized_lmdb
from training import after_epoch, devices

MODEL_SCRIPTS = {"uc2": train_uc2, "cclm": train_cclm}  # meta["model"] -> the script that builds it


# ---------------------------------------------------------------------------------------------
# Run folders: checkpoint meta, per-epoch metrics log


def load_meta(path: str | Path) -> dict:
    """The metadata dict of a checkpoint, memory-mapped so the weights are not read."""
    ckpt = torch_files.load_checkpoint(path, mmap=True)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: no 'meta' dict in the checkpoint (not written by train_uc2/train_cclm?)")
    return meta


def read_epoch_metrics(run: str | Path, split: str | None = None) -> list[tuple[int, dict[str, dict]]]:
    """[(epoch, {lang: metrics})] from the run's metrics.jsonl (engine.train writes one line per
    epoch and language: {"type": "eval", "epoch", "step", "lang", "split", <metric>: value, ...}),
    only the lines of `split` if given. A later line for the same epoch and language wins (a resumed
    run re-logs its epoch)."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{path}: not found (no per-epoch metrics log in this run folder)")
    by_epoch: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write leaves half a last line: the epochs before it stand
                break
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        if rec.get("type") == "eval" and "lang" in rec and "epoch" in rec and split in (None, rec.get("split")):
            keys = ("type", "epoch", "step", "lang", "split")
            metrics = {k: v for k, v in rec.items() if k not in keys and isinstance(v, (int, float))}
            by_epoch.setdefault(int(rec["epoch"]), {})[rec["lang"]] = metrics
    return sorted(by_epoch.items())


def feature_reader(features):
    """--features as the trainers take it (one path or several): the image-keyed files (a per-question
    serialized GQA LMDB holds no test images), several searched in order (formats.feature_sets.FeatureSet)."""
    if features is None or not isinstance(features, (list, tuple)):
        return features
    keyed = [str(p) for p in features if not is_serialized_lmdb(p)]
    if len(keyed) <= 1:
        return keyed[0] if keyed else None
    return feature_sets.FeatureSet(keyed)


# ---------------------------------------------------------------------------------------------
# Checkpoints -> models


def load_model(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the task model from a checkpoint written by train_uc2/train_cclm ({"model", "meta"}):
    meta["model"] picks the script (MODEL_SCRIPTS), build_model(meta["task"], meta["config"])."""
    state = torch_files.load_checkpoint(path)
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("model") not in ("uc2", "cclm") or "config" not in meta:
        raise ValueError(f"{path}: no meta with model uc2|cclm and config (not a train_uc2/train_cclm checkpoint)")
    model = MODEL_SCRIPTS[meta["model"]].build_model(meta["task"], meta["config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(
            f"{path}: weights do not fit a {meta['model']} {meta['task']} model ({str(e).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), meta


def load_released_uc2(path: str | Path, task: str, config: str = "base", device="cpu") -> tuple[torch.nn.Module, dict]:
    """A released fine-tuned UC2 checkpoint (IGLUE's VOLTA-format pytorch_model_best.bin / .tar, no meta of
    ours) as a task model, with the meta evaluate needs (policy "released")."""
    cfg = train_uc2.resolve_config(config)
    model = train_uc2.build_model(task, cfg)
    try:
        plan = volta.load_into(model, str(path))
    except ValueError as e:  # its first line names the file and the first bad key; the plan follows
        raise ValueError(f"{str(e).splitlines()[0]} (is it a fine-tuned UC2 {task} checkpoint?)") from None
    if plan.initialised:
        raise ValueError(
            f"{path}: not a fine-tuned UC2 {task} checkpoint (no weights for "
            f"{', '.join(k for k, _ in plan.initialised[:3])})"
        )
    return model.to(device).eval(), {"model": "uc2", "task": task, "config": cfg, "policy": "released"}


def run_checkpoint(run: Path) -> Path:
    """The model of a run folder: model_final.pt, else the resume checkpoint."""
    for name in (run_folder.FINAL, run_folder.CHECKPOINT):
        if (run / name).is_file():
            return run / name
    raise SystemExit(f"error: {run}: no {run_folder.FINAL} or {run_folder.CHECKPOINT} (not a finished run folder?)")


# ---------------------------------------------------------------------------------------------
# CLI


def add_data_args(
    p: argparse.ArgumentParser, *, langs: bool = True, translate_test: bool = True, retrieval: bool = True
) -> None:
    """Data and evaluation options; a command that would ignore one of them does not offer it
    (similarity: no translate-test or retrieval options; fewshot: --eval-langs instead of --langs)."""
    g = p.add_argument_group("data (default: the run's args.json)")
    g.add_argument("--data-root", default=None, help="IGLUE folder holding datasets/")
    g.add_argument(
        "--features", nargs="+", default=None, help="UC2 region-feature LMDB/H5 file(s) holding the test images"
    )
    g.add_argument("--images", default=None, help="CCLM image root (gqa/, flickr30k/, coco/)")
    g.add_argument(
        "--tokenizer", default=None, help="XLM-R tokenizer folder or cached hub id (default: checkpoint meta)"
    )
    g.add_argument("--max-regions", type=int, default=None, help="UC2 regions per image (default: run's, else 36)")
    e = p.add_argument_group("evaluation")
    if langs:
        e.add_argument("--langs", nargs="+", default=None, help="languages (default: all found)")
    e.add_argument("--split", default=None, help="IGLUE split (default: the run's --eval-split, else test)")
    if translate_test:
        e.add_argument(
            "--translate-test", action="store_true", help="IGLUE's machine-translated test files (English: original)"
        )
    e.add_argument("--batch-size", type=int, default=64, help="examples per forward")
    e.add_argument("--num-workers", type=int, default=2, help="data-loader workers")
    e.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="precision (default float32)")
    after_epoch.add_tf32_arg(e)
    if retrieval:
        e.add_argument(
            "--k-test", type=int, default=None, help="CCLM retrieval prefilter size (default: model config, 128)"
        )
        e.add_argument("--pair-batch", type=int, default=1024, help="UC2 retrieval: (caption, image) pairs per forward")
        e.add_argument("--itm-batch", type=int, default=128, help="CCLM retrieval: pairs per ITM forward")


def read_run_args(run: Path | None) -> dict:
    """A run folder's args.json ({} when there is none)."""
    path = run / run_folder.ARGS if run is not None else None
    return readers.read_json(path, annotations=False) if path is not None and path.is_file() else {}


def resolve_data_args(args, run_args: dict, meta: dict) -> None:
    """Fill data and evaluation arguments left unset from the run's args.json / the checkpoint meta."""
    for key in ("data_root", "features", "images", "max_regions", "split", "langs"):  # fewshot has no --langs
        if getattr(args, key, "") is None:  # --split: the run's --eval-split
            setattr(args, key, run_args.get("eval_split" if key == "split" else key, meta.get(key)))
    args.split = args.split or "test"
    if args.tokenizer is None:
        args.tokenizer = meta.get("tokenizer") or run_args.get("tokenizer")
    args.features = [args.features] if isinstance(args.features, str) else args.features
    if args.max_regions is None:
        args.max_regions = 36
    if not args.data_root:
        raise SystemExit("error: --data-root not given and not in the run's args.json")
    if not args.tokenizer:
        raise SystemExit("error: --tokenizer not given and not in the checkpoint meta / args.json")


def evaluate(args: argparse.Namespace, dist: devices.DistInfo) -> int:
    """Zero-shot evaluation of --run's final model (or --checkpoint) in --langs, in the caller's process group:
    the evaluate command's body (xvlmaml's final evaluation calls it); writes results.json and the IGLUE CSVs."""
    if bool(args.run) == bool(args.checkpoint):
        raise SystemExit("error: give exactly one of --run RUN_DIR or --checkpoint FILE")
    run = Path(args.run) if args.run else None
    ckpt = run_checkpoint(run) if run else Path(args.checkpoint)
    out_dir = Path(args.output_dir) if args.output_dir else (run or ckpt.parent)
    try:
        if getattr(args, "released_task", None):
            model, meta = load_released_uc2(ckpt, args.released_task, args.released_config, dist.device)
        else:
            model, meta = load_model(ckpt, dist.device)
        resolve_data_args(args, read_run_args(run or ckpt.parent), meta)
        tokenizer = tokenizer_check.load_tokenizer(args.tokenizer)
        model.prepare_task(args.data_root, tokenizer)
        task = meta["task"]
        sets = scoring.evaluate.build_eval_sets(
            meta["model"],
            task,
            args.data_root,
            tokenizer,
            args.langs,
            args.split,
            args.translate_test,
            features=feature_reader(args.features),
            images=args.images,
            max_regions=args.max_regions,
            image_res=meta["config"].get("image_res", 384),
            dev_lmdb=scoring.evaluate.serialized_dev_file(task, args.split, args.features),  # UC2 marvl dev, xgqa valid
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    start = time.time()
    preds: dict[str, list] = {}
    try:  # bad data found while evaluating (e.g. a missing feature key or image): one line, nothing written
        results = scoring.evaluate.evaluate_task(
            model,
            task,
            sets,
            dist,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            amp=args.amp,
            tf32=args.eval_tf32,
            k_test=args.k_test,
            pair_batch=args.pair_batch,
            itm_batch=args.itm_batch,
            predictions=preds,
        )
    except (ValueError, FloatingPointError) as e:  # FloatingPointError: NaN logits/scores are not an accuracy
        raise SystemExit(f"error: {e}") from None
    if dist.is_main:
        fewshot_file = out_dir / "fewshot.json"
        fewshot = readers.read_json(fewshot_file, annotations=False) if fewshot_file.is_file() else {}
        sched = meta.get("schedule") or {}
        record = {
            "model": meta["model"],
            "task": task,
            "policy": meta.get("policy"),
            "llrd_decay": sched.get("llrd_decay"),
            "top_layers": sched.get("top_layers"),
            "suf_k": sched.get("suf_k"),
            "split": args.split,
            "translate_test": args.translate_test,
            "k_test": args.k_test,  # CCLM's retrieval prefilter (None: the model config's); report's k_test note
            "shots": fewshot.get("shots", 0),
            "fewshot_lang": fewshot.get("fewshot_lang"),
            "init_policy": fewshot.get("init_policy"),
            "checkpoint": str(ckpt),
            "epoch": meta.get("epoch"),
            "checkpoint_file": scoring.results.checkpoint_file_id(ckpt),
            "langs": results,
            "summary": scoring.metrics.summarize(task, results),
            "files": {l: s.source for l, s in sets.items()},
            "processes": dist.world,
            "seconds": round(time.time() - start, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        name = args.model_name or (run.name if run else ckpt.parent.name)
        title = (
            f"{task} {meta['model']} policy={meta.get('policy')} split={args.split}"
            f"{' translate-test' if args.translate_test else ''} ({ckpt}, epoch {meta.get('epoch')})"
        )
        print(scoring.metrics.format_table(task, results, title), flush=True)
        path = scoring.results.write_results(out_dir, record, name)
        names = scoring.results.label_names(meta["model"], task, args.data_root) if preds else []
        scoring.results.write_predictions(out_dir, record, preds, scoring.evaluate.set_examples(sets), names)
        metrics = scoring.metrics.MAIN_METRICS[task]
        csvs = ", ".join(iglue.csv_name(task, m, record["shots"], args.translate_test, args.split) for m in metrics)
        print(f"wrote {path} [{scoring.results.eval_key(args.split, args.translate_test)}] and {csvs}", flush=True)
    engine.barrier(dist)
    return 0


# ---------------------------------------------------------------------------------------------
# Few-shot cross-lingual transfer (paper Table 3; IGLUE few-shot protocol)
# IGLUE's few-shot scripts: 20 epochs, batch 64, lr grid {1e-4, 5e-5, 1e-5}, UC2 with IGLUE's
# optimizer recipe, the best checkpoint on the validation split kept (xGQA: the target language's
# dev; XVNLI: English dev). The paper only says it follows IGLUE for xGQA with UC2, 48 shots, and
# that few-shot training is standard fine-tuning (policy full) whatever the English policy was.


def add_fewshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="English-trained checkpoint (model_final.pt)")
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        default=None,
        help="English run folder instead of --checkpoint (--run-dir under torchrun)",
    )
    p.add_argument("--lang", required=True, help="target language of the few-shot split")
    p.add_argument("--shots", default="48", help="IGLUE shot count: train_<shots> (xFlickrCo also e.g. 100x5)")
    p.add_argument("--output-dir", required=True, help="few-shot run folder (one sub-folder per learning rate)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-5, 1e-5], help="learning-rate grid")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--fs-batch-size", type=int, default=64, help="training batch size")
    p.add_argument(
        "--select-split",
        default=None,
        help="validation split (default: the target language's dev, else English dev/valid, else none: last epoch)",
    )
    p.add_argument(
        "--eval-langs", nargs="+", default=None, help="test languages reported (default: the target language)"
    )
    p.add_argument("--model-name", default=None)
    p.add_argument(
        "--trainer-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="anything after this goes to train_<model>.py unchanged (e.g. --micro-batch-size 16)",
    )
    add_data_args(p, langs=False)


def selection_split(data_root, task: str, lang: str, requested: str | None) -> tuple[str | None, str | None]:
    """(split, lang) the few-shot checkpoints are selected on; (None, None) = take the last epoch.
    Default: the target language's dev split (xGQA); else English dev (what IGLUE's XVNLI few-shot
    scripts validate on). xFlickrCo: last epoch unless --select-split (our choice: IGLUE validates
    on a 4-way proxy of Flickr30k valid; full retrieval on it every epoch would cost more than the
    training)."""
    if requested:
        return requested, lang if lang in iglue_layout.available_langs(data_root, task, requested) else "en"
    if task == "xflickrco":
        return None, None
    if lang in iglue_layout.available_langs(data_root, task, "dev"):
        return "dev", lang
    if "en" in iglue_layout.available_langs(data_root, task, "dev"):
        return "dev", "en"
    return None, None


def selection_score(task: str, metrics: dict) -> float:
    """Few-shot model selection: accuracy; retrieval: mean of text and image R@1 (our choice)."""
    if task == "xflickrco":
        return (metrics["tr_r1"] + metrics["ir_r1"]) / 2
    return metrics["accuracy"]


def run_fewshot(args: argparse.Namespace, dist: devices.DistInfo) -> int:
    """The fewshot command: one training per learning rate (the trainer's main in this process group), the best
    epoch kept (BestCheckpoint), then `evaluate` of it in --eval-langs; writes fewshot.json beside the results."""
    if bool(args.run) == bool(args.checkpoint):
        raise SystemExit("error: give exactly one of --run RUN_DIR or --checkpoint FILE")
    init = run_checkpoint(Path(args.run)) if args.run else Path(args.checkpoint)
    try:
        meta = load_meta(init)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    task, model_name = meta["task"], meta["model"]
    resolve_data_args(args, read_run_args(init.parent), meta)
    train_split = f"train_{args.shots}"
    if args.lang not in iglue_layout.available_langs(args.data_root, task, train_split):
        raise SystemExit(
            f"error: {task}: no few-shot split {train_split!r} for language {args.lang!r} under "
            f"{args.data_root}; languages with it: "
            f"{', '.join(iglue_layout.available_langs(args.data_root, task, train_split)) or 'none'}"
        )
    sel_split, sel_lang = selection_split(args.data_root, task, args.lang, args.select_split)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    script = MODEL_SCRIPTS[model_name]
    config_file = out / "model_config.json"  # the English run's architecture, whatever its config name
    run_folder.atomic_write_text(config_file, json.dumps(meta["config"], indent=1) + "\n")
    trials = []
    for lr in args.lrs:
        run_dir = out / f"lr{lr:g}"
        flags = {
            "task": task,
            "checkpoint": init,
            "model-config": config_file,
            "train-split": train_split,
            "train-lang": args.lang,
            "policy": "full",
            "lr": lr,
            "epochs": args.epochs,
            "batch-size": args.fs_batch_size,
            "data-root": args.data_root,
            "tokenizer": args.tokenizer,
            "output-dir": run_dir,
        }
        argv = [s for k, v in flags.items() for s in (f"--{k}", str(v))]
        if model_name == "uc2":  # the paper follows IGLUE's few-shot setup for UC2: its optimizer recipe too
            features = [str(f) for f in args.features or []]
            argv += ["--recipe", "iglue", "--features", *features, "--max-regions", str(args.max_regions)]
        else:
            argv += ["--images", str(args.images)] if args.images else []
        argv += ["--eval-split", sel_split, "--langs", sel_lang, "--eval-every", "1"] if sel_split else ["--no-eval"]
        argv += list(args.trainer_args)
        if (run_dir / run_folder.FINAL).is_file():
            print(f"few-shot lr {lr:g}: {run_dir} already finished, reusing it", flush=True)
        else:
            if (run_dir / run_folder.CHECKPOINT).is_file():
                argv.append("--resume")
            print(f"few-shot lr {lr:g}: train_{model_name}.py " + " ".join(argv), flush=True)
            keep_best = BestCheckpoint(run_dir, task, sel_lang, meta, {"shots": args.shots, "fewshot_lang": args.lang})
            script.main(argv, dist=dist, on_evaluated=keep_best)
        trials.append(_fewshot_trial(run_dir, task, sel_lang, lr))
    best = max(trials, key=lambda t: t["score"] if t["score"] == t["score"] else -math.inf)
    info = {
        "shots": args.shots,
        "fewshot_lang": args.lang,
        "init_checkpoint": str(init),
        "init_policy": meta.get("policy"),
        "model": model_name,
        "task": task,
        "train_split": train_split,
        "selection": {
            "split": sel_split,
            "lang": sel_lang,
            "metric": "mean(tr_r1, ir_r1)" if task == "xflickrco" else "accuracy",
        },
        "trials": trials,
        "best": best,
    }
    run_folder.atomic_write_text(out / "fewshot.json", json.dumps(info, indent=1) + "\n")
    print(f"few-shot: best lr {best['lr']:g}, epoch {best['epoch']} ({best['checkpoint']})", flush=True)
    eargs = argparse.Namespace(
        **{
            **vars(args),
            "run": None,
            "checkpoint": best["checkpoint"],
            "output_dir": str(out),
            "langs": args.eval_langs or [args.lang],
            "translate_test": False,
        }
    )
    return evaluate(eargs, dist)


def _fewshot_trial(run_dir: Path, task: str, sel_lang: str | None, lr: float) -> dict:
    """Best epoch of one learning rate: by the selection split (model_best.pt), else the last epoch."""
    epochs = read_epoch_metrics(run_dir) if (run_dir / run_folder.METRICS).is_file() else []
    scored = [(selection_score(task, ev[sel_lang]), e) for e, ev in epochs if sel_lang and sel_lang in ev]
    if scored and (run_dir / "model_best.pt").is_file():
        score, epoch = max(scored, key=lambda t: (t[0], -t[1]))  # earliest epoch among equal scores
        return {"lr": lr, "epoch": epoch, "score": score, "checkpoint": str(run_dir / "model_best.pt")}
    return {
        "lr": lr,
        "epoch": epochs[-1][0] if epochs else None,
        "score": float("nan"),
        "checkpoint": str(run_dir / run_folder.FINAL),
    }


class BestCheckpoint:
    """The trainer's on_evaluated hook (engine.train) for one few-shot run: saves <run_dir>/model_best.pt whenever
    the per-epoch evaluation on the selection split improves."""

    def __init__(self, run_dir: Path, task: str, lang: str | None, meta: dict, fewshot: dict):
        self.run_dir, self.task, self.lang, self.meta, self.fewshot = run_dir, task, lang, meta, fewshot
        self.best = -math.inf  # a resumed run: the best epoch logged so far
        if lang and (run_dir / run_folder.METRICS).is_file() and (run_dir / "model_best.pt").is_file():
            self.best = max(
                [selection_score(task, ev[lang]) for _, ev in read_epoch_metrics(run_dir) if lang in ev],
                default=-math.inf,
            )

    def __call__(self, model: torch.nn.Module, epoch: int, results: dict, dist: devices.DistInfo) -> None:
        """epoch: 0-based; called on every rank after the epoch's evaluation, rank 0 writes."""
        if not self.lang or self.lang not in results:
            return
        score = selection_score(self.task, results[self.lang])
        if score > self.best:  # strictly better: the earliest best epoch is kept
            self.best = score
            if dist.is_main:
                meta = {
                    **self.meta,
                    "policy": "full",
                    "epoch": epoch + 1,
                    "fewshot": self.fewshot,
                    "selection_score": score,
                }
                run_folder.save_checkpoint(
                    self.run_dir / "model_best.pt", {"model": scoring.evaluate.unwrap(model).state_dict(), "meta": meta}
                )


COMMANDS = ("evaluate", "fewshot")
MOVED = ("plot", "similarity", "figures", "table")  # the reports: python -m report (report/)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="zero-shot / translate-test evaluation of a run in every language")
    ev.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        default=None,
        help="run folder (model_final.pt, else checkpoint_last.pt); under torchrun write --run-dir "
        "(torchrun's parser takes --run as an abbreviation of its --run-path)",
    )
    ev.add_argument("--checkpoint", default=None, help="a checkpoint file instead of --run")
    ev.add_argument("--output-dir", default=None, help="where results.json/CSV go (default: the run folder)")
    ev.add_argument("--model-name", default=None, help="model column of the IGLUE CSV (default: run folder name)")
    ev.add_argument(
        "--released-task",
        choices=engine.TASKS,
        default=None,
        help="--checkpoint is a released fine-tuned UC2 checkpoint for this task (IGLUE's VOLTA format)",
    )
    ev.add_argument("--released-config", default="base", help="its UC2 config (train_uc2.py --model-config)")
    add_data_args(ev)
    fs = sub.add_parser("fewshot", help="few-shot fine-tuning of an English-trained checkpoint on one language")
    add_fewshot_args(fs)
    return p


@cli.exits_on_bad_input
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MOVED:
        print(f"eval_zeroshot.py {argv[0]} moved: python -m report {shlex.join(argv)}", file=sys.stderr)
        return 2
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["evaluate"] + argv  # `eval_zeroshot.py --run RUN` = evaluate
    args = build_parser().parse_args(argv)
    # one process group for everything a command runs (fewshot: every learning rate's training and the evaluation):
    # under torchrun a second group on the same store can read the first group's addresses and fail to connect
    dist = engine.setup_distributed()
    try:
        return {"evaluate": evaluate, "fewshot": run_fewshot}[args.command](args, dist)
    finally:
        engine.cleanup_distributed()


if __name__ == "__main__":
    cli.run_main(main)
