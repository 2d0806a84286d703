"""UC2 parity with VOLTA/IGLUE: outputs.pt of every fixture folder reproduced within tests/parity.py's tolerance.

Fixture folders: $PARITY_FIXTURES (os.pathsep-separated) or every tests/fixtures/uc2/parity_* folder (set A,
set B with other dimensions, ...). Every dimension comes from the folder's own volta_config.json / model_dims.json.
"""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import scoring.metrics  # noqa: E402
import train_uc2 as U  # noqa: E402
from formats import volta  # noqa: E402
from parity import assert_matches_reference  # noqa: E402
from scoring import retrieval_protocols  # noqa: E402

HERE = Path(__file__).resolve().parent
TASK_DIRS = {"gqa": "xgqa", "xvnli": "xvnli", "retrieval": "xflickrco", "marvl": "marvl"}  # marvl: TASK12 (NLVR2)


def _folders() -> list[Path]:
    # $PARITY_FIXTURES may list UC2 and CCLM sets together: UC2 sets are the ones with VOLTA's config;
    # every other folder is checked (and must pass) as a CCLM set by tests/test_parity_cclm.py.
    env = os.environ.get("PARITY_FIXTURES")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p and (Path(p) / "volta_config.json").is_file()]
    return sorted(d for d in (HERE / "fixtures" / "uc2").glob("parity_*") if d.is_dir())


def _cases():
    cases = []
    for folder in _folders():
        dirs = [d for d in TASK_DIRS if (folder / d).is_dir()] or ["(no task folders)"]
        cases += [pytest.param(folder, d, id=f"{folder.name}-{d}") for d in dirs]
    return cases


def _config(folder: Path) -> dict:
    cfg = volta.config_from_volta(json.loads((folder / "volta_config.json").read_text()), U.CONFIGS["base"])
    dims = folder / "model_dims.json"
    if dims.is_file():
        d = json.loads(dims.read_text())
        cfg["num_answers"] = d.get("tasks", {}).get("gqa", {}).get("num_labels", cfg["num_answers"])
        assert cfg["hidden_size"] == d["hidden_size"] and cfg["num_layers"] == d["num_layers"]
    return cfg


def _close(name, ours, ref):
    ref = ref if torch.is_tensor(ref) else torch.tensor(ref, dtype=ours.dtype)
    assert_matches_reference(name, ours, ref)


def _recall_metrics(scores: np.ndarray) -> dict:
    """IGLUE eval_retrieval.py semantics, 1 caption per image: captions x images score matrix."""
    n_cap, n_img = scores.shape
    ir = np.array([int(np.where(np.argsort(scores[c])[::-1] == c)[0][0]) for c in range(n_cap)])
    tr = np.array([int(np.where(np.argsort(scores[:, i])[::-1] == i)[0][0]) for i in range(n_img)])

    def stats(r):
        return {
            "r1": 100 * np.mean(r < 1),
            "r5": 100 * np.mean(r < 5),
            "r10": 100 * np.mean(r < 10),
            "medr": math.floor(np.median(r)) + 1,
            "meanr": r.mean() + 1,
        }

    return {"image_retrieval": stats(ir), "text_retrieval": stats(tr), "ir_ranks": ir.tolist(), "tr_ranks": tr.tolist()}


@pytest.mark.parametrize("folder,task_dir", _cases())
def test_parity_uc2(folder: Path, task_dir: str):
    assert (folder / task_dir).is_dir(), f"fixture folder {folder} has no task folders {sorted(TASK_DIRS)}"
    task = TASK_DIRS[task_dir]
    inp = torch.load(folder / task_dir / "inputs.pt", weights_only=True)
    out = torch.load(folder / task_dir / "outputs.pt", weights_only=True)
    for attn in ("sdpa", "eager"):
        model = U.build_model(task, {**_config(folder), "attn_implementation": attn}).eval()
        plan = volta.load_into(model, str(folder / task_dir / "pytorch_model.bin"))
        assert plan.fmt == "volta" and plan.ok and not plan.initialised, plan.report()
        trace = {}
        with torch.no_grad():
            logits = model._run(inp, trace=trace)
            _close(f"{attn} logits", logits, out["logits"])
            for k in ("pooled_output_t", "embedding_t", "embedding_v"):
                _close(f"{attn} {k}", trace[k], out[k])
            for k in ("sublayer_outputs_t", "sublayer_outputs_v"):
                assert len(trace[k]) == len(out[k])
                for i, (a, b) in enumerate(zip(trace[k], out[k])):
                    _close(f"{attn} {k}[{i}]", a, b)
            b = inp["input_ids"].shape[0]  # marvl: B pairs (VOLTA's batch_size before its nlvr reshape to 2B rows)
            if task in ("xgqa", "xvnli", "marvl"):
                batch = {**inp, "target": inp["target"]}
                _close("loss_train", model.loss(batch), out["loss_train"])
                _close("loss_val", model.loss(batch), out["loss_val"])
                # VOLTA's score: target value at the argmax (train: mean over the batch, val: sum)
                hit = inp["target"].gather(1, model.predict(batch)[:, None]).sum()
                _close("batch_score_train", hit / b, out["batch_score_train"])
                _close("batch_score_val", hit, out["batch_score_val"])
                if task == "marvl":  # the pair's class (1 = True); VOLTA's target is its one-hot
                    assert torch.equal(inp["target"].argmax(1), inp["label"])
                    _close("predict", model.predict(batch), out["logits"].argmax(1))
            else:
                scores = model.pair_scores(inp)
                _close("scores_grouped", scores, out["scores_grouped"])
                for kind, ref in (("ce", "loss_ce"), ("triplet", "loss_triplet")):
                    _close(ref, U.retrieval_loss(scores, kind), out[ref])
                model.config["retrieval_loss"] = "triplet"
                _close("loss (default triplet)", model.loss(inp), out["loss_triplet"])
                _close("batch_score_train", (scores.argmax(1) == 0).float().mean(), out["batch_score_train"])
                caps, imgs = inp["eval_captions"], inp["eval_images"]
                nc, ni = caps["input_ids"].shape[0], imgs["features"].shape[0]
                pairs = {k: caps[k].repeat_interleave(ni, 0) for k in ("input_ids", "attention_mask")}
                pairs.update(
                    {k: imgs[k].repeat(nc, *[1] * (imgs[k].dim() - 1)) for k in ("features", "spatials", "image_mask")}
                )
                matrix = model.pair_scores(pairs).view(nc, ni)
                _close("eval_score_matrix", matrix, out["eval_score_matrix"])
                # the evaluation code path (scoring.retrieval_protocols.score_all_pairs trims common padding)
                ez_matrix = retrieval_protocols.score_all_pairs(model, imgs, caps, pair_batch=4)
                _close("scoring.retrieval_protocols.score_all_pairs", ez_matrix, out["eval_score_matrix"])
    metrics_file = folder / task_dir / "eval_retrieval_metrics.json"
    if task == "xflickrco" and metrics_file.is_file():
        ref = json.loads(metrics_file.read_text())
        got = _recall_metrics(matrix.numpy())
        assert got["ir_ranks"] == ref["ir_ranks_from_matrix"] and got["tr_ranks"] == ref["tr_ranks_from_matrix"]
        ez_got = scoring.metrics.recall_metrics(matrix.T, matrix, list(range(matrix.shape[0])))
        for side, prefix in (("image_retrieval", "ir"), ("text_retrieval", "tr")):
            for k, v in ref[side].items():
                assert abs(got[side][k] - v) < 1e-3, f"{side} {k}: {got[side][k]} vs {v}"
                assert abs(ez_got[f"{prefix}_{k}"] - v) < 1e-3, (
                    f"recall_metrics {prefix}_{k}: {ez_got[f'{prefix}_{k}']} vs {v}"
                )
