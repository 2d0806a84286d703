"""Run folders as the reports read them: which model, task and policy a run is (run_info), and the evaluation a
table shows for it (run_results: results.json, else the last evaluated epoch of metrics.jsonl, marked when the run
has not finished).

Not on the reading path: reporting reads what training and evaluation wrote; it never trains or evaluates.
"""

from __future__ import annotations

from pathlib import Path

from formats import readers
import eval_zeroshot
from formats import run_folder


def run_info(run: str | Path) -> dict:
    """model/task/policy/... of a run folder: results.json (what `evaluate` recorded), else
    args.json + the checkpoint's meta. Keys: model, task, policy, llrd_decay, top_layers, shots,
    fewshot_lang, init_policy (few-shot: the English run's policy)."""
    run = Path(run)
    info: dict = {}
    res = run / "results.json"
    if res.exists():
        for rec in readers.read_json(res, annotations=False).values():
            info.update(
                {
                    k: rec.get(k)
                    for k in (
                        "model",
                        "task",
                        "policy",
                        "llrd_decay",
                        "top_layers",
                        "shots",
                        "fewshot_lang",
                        "init_policy",
                    )
                    if rec.get(k) is not None
                }
            )
            break
    if not {"model", "task", "policy"} <= set(info):
        args = readers.read_json(run / "args.json", annotations=False) if (run / "args.json").exists() else {}
        meta = {}
        for name in ("model_final.pt", "checkpoint_last.pt"):
            if (run / name).exists() and "model" not in args:
                meta = eval_zeroshot.load_meta(run / name)
                break
        for k in ("model", "task", "policy", "llrd_decay", "top_layers"):
            info.setdefault(k, args.get(k, meta.get(k)))
        fs = readers.read_json(run / "fewshot.json", annotations=False) if (run / "fewshot.json").exists() else {}
        for k in ("shots", "fewshot_lang", "init_policy"):
            if fs.get(k) is not None:
                info.setdefault(k, fs[k])
    info.setdefault("shots", 0)
    return info


def run_results(run: str | Path, split: str = "test") -> dict | None:
    """The run's evaluation for the table: results.json[split] (written by `evaluate`), else the last
    epoch of metrics.jsonl evaluated on that split (the evaluation the trainer ran after its final epoch)."""
    run = Path(run)
    info = run_info(run)
    res = readers.read_json(run / "results.json", annotations=False) if (run / "results.json").exists() else {}
    if split in res:
        ckpt = str(res[split].get("checkpoint", ""))
        unfinished = (
            f"evaluated {ckpt} (epoch {res[split].get('epoch')})" if ckpt.endswith(run_folder.CHECKPOINT) else None
        )
        return {**info, "langs": res[split]["langs"], "source": f"results.json[{split}]", "unfinished": unfinished}
    if (run / "metrics.jsonl").exists():
        epochs = eval_zeroshot.read_epoch_metrics(run, split)
        if epochs:
            e, ev = epochs[-1]
            return {
                **info,
                "langs": ev,
                "source": f"metrics.jsonl epoch {e} ({split})",
                "unfinished": _unfinished(run, e),
            }
    return None


def _unfinished(run: Path, last_epoch: int) -> str | None:
    """Why a run's last evaluated epoch is not its final result (None: finished): no model_final.pt while a
    checkpoint_last.pt shows it stopped (or paused), or fewer epochs evaluated than args.json planned."""
    if (run / run_folder.FINAL).exists():
        return None
    args = readers.read_json(run / "args.json", annotations=False) if (run / "args.json").exists() else {}
    planned = args.get("epochs")
    if (run / run_folder.CHECKPOINT).exists() or (planned and last_epoch < planned):
        return f"epoch {last_epoch} of {planned or '?'}, no {run_folder.FINAL}"
    return None
