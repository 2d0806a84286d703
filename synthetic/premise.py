"""Study 3's forgetting premise checks (docs/synthetic/protocol_study3.md section 4): does English-only fine-tuning
of policy full erode the cross-lingual alignment of the pretrained model, and where (the layers SUF protects, or the
word embeddings)? Every check compares a fine-tuned model with its own pretrained self, on the auxiliary dev splits
of every language (synthetic.world.add_auxiliary; never the test sets):

- C1 alignment per layer before/after: centred en -> X translation retrieval (synthetic.study.translation_retrieval);
- C2 layer swap-back: the fine-tuned model with encoder layers 0-2 (and 3-5) put back to the pretrained ones;
- C3 embedding shift: each foreign word's row moved by its English translation's shift; row movement per language;
- P0 English: English dev accuracy against the blind (question-only) run's.

  python -m synthetic.premise --world W --pretrained P.bin --run RUN [--blind BLIND_RUN]

Off the reading path: a study in the synthetic world (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from formats import tokenizer_check
import eval_zeroshot
import scoring.evaluate
from synthetic import pretrain as sp
from synthetic import study as ss
from synthetic import world as sw

SWAP_BLOCKS = ((0, 1, 2), (3, 4, 5))  # C2: the block SUF unfreezes last, and the next one
DEV = "dev"
BLIND_AUX_FEATURES = "features_aux_blind.lmdb"
# protocol_study3.md section 4 thresholds, fixed before any Study 3 run
P0_MARGIN = ss.PREMISE_MARGIN  # English dev of full >= blind + 15 points
P1_DROP = 0.10  # max over layers >= 1 of the mean non-English alignment drop
P2_GAIN = 1.0  # swap-back of layers 0-2: gain on the non-English dev average, points
C3_GAIN = 1.0  # embedding shift: gain on the non-English dev average, points (the embedding channel is open)


def aux_features(world: Path, blind: bool = False) -> Path:
    """The auxiliary dev splits' region features (written by add_auxiliary), or a blind copy (every region zero,
    boxes kept), written here on first use (synthetic.world.write_features, the aux scene stream)."""
    path = sw.add_auxiliary(world)
    if not blind:
        return path
    out = world / BLIND_AUX_FEATURES
    if not out.exists():
        part = world / (BLIND_AUX_FEATURES + ".partial")
        sw.write_features(sw.load_config(world), part, blind=True, streams=((sw.AUX_STREAM, sw.AUX_SCENES),))
        part.rename(out)
    return out


@torch.no_grad()
def dev_accuracy(model: torch.nn.Module, world: Path, tok, blind: bool = False) -> dict[str, float]:
    """Accuracy (%) on the auxiliary dev split of every language, by the project's own evaluation."""
    sets = scoring.evaluate.build_eval_sets(
        "uc2", "xgqa", world, tok, list(sw.LANGS), DEV, features=str(aux_features(world, blind)), max_regions=3
    )
    res = scoring.evaluate.evaluate_task(model, "xgqa", sets, batch_size=128)
    return {lang: float(r["accuracy"]) for lang, r in res.items()}


def swap_layers(ft: torch.nn.Module, pre: torch.nn.Module, layers: Sequence[int]) -> torch.nn.Module:
    """A copy of the fine-tuned task model with `layers` taken from the pretrained one."""
    out = copy.deepcopy(ft)
    state, src = out.state_dict(), pre.state_dict()
    for k in state:
        if any(k.startswith(f"encoder.layer.{i}.") for i in layers):
            state[k] = src[k].clone()
    out.load_state_dict(state)
    return out


def word_pairs(world: Path, tok) -> dict[str, list[tuple[int, int]]]:
    """lang -> (foreign word id, its English translation's id) for every non-English language."""
    lex = sw.lexicons(sw.load_config(world))
    ids = lambda w: tok.convert_tokens_to_ids(w)  # noqa: E731
    return {lang: [(ids(f), ids(en)) for en, f in lex[lang].items()] for lang in sw.LANGS[1:]}


EMB = "embeddings.word_embeddings.weight"


def embedding_shift(ft: torch.nn.Module, pre: torch.nn.Module, pairs: dict) -> torch.nn.Module:
    """C3: each foreign word's row gets its English translation's shift E_ft[en] - E_pre[en]."""
    out = copy.deepcopy(ft)
    state, e_pre = out.state_dict(), pre.state_dict()[EMB]
    e_ft = state[EMB].clone()
    for plist in pairs.values():
        for f, en in plist:
            state[EMB][f] = e_ft[f] + e_ft[en] - e_pre[en]
    out.load_state_dict(state)
    return out


def row_movement(ft: torch.nn.Module, pre: torch.nn.Module, pairs: dict) -> dict[str, float]:
    """Relative movement ||E_ft - E_pre|| / ||E_pre|| of English rows and of each language's rows."""
    a, b = ft.state_dict()[EMB], pre.state_dict()[EMB]
    rows = {
        "en": sorted({en for p in pairs.values() for _, en in p}),
        **{k: [f for f, _ in p] for k, p in pairs.items()},
    }
    return {k: float((a[r] - b[r]).norm() / b[r].norm()) for k, r in rows.items()}


def non_en(acc: dict[str, float]) -> float:
    return float(np.mean([acc[lang] for lang in sw.LANGS[1:]]))


def check_run(world: Path, pretrained: Path, run: Path, blind_run: Path | None = None) -> dict:
    """C1-C3 and P0's numbers of one fine-tuned run against its pretrained checkpoint."""
    torch.set_num_threads(1)
    sw.add_auxiliary(world)
    ft, meta = eval_zeroshot.load_model(eval_zeroshot.run_checkpoint(run))
    config = meta["config"]
    tok = tokenizer_check.load_tokenizer(str(world / "tokenizer"))
    pre_full = sp.load_pretrained(pretrained, config).eval()
    pre = copy.deepcopy(ft)  # the task model with the pretrained encoder (the head is ft's: unused by C1)
    pre.load_state_dict(
        {**ft.state_dict(), **{k: v for k, v in pre_full.uc2.state_dict().items() if not k.startswith("head.")}}
    )
    wrap = sp.PretrainUC2(config).eval()
    c1 = {}
    for name, m in (("pre", pre), ("post", ft)):
        wrap.uc2 = m
        c1[name] = ss.translation_retrieval(wrap, world, tok, split=DEV)
    drop = {lang: [a - b for a, b in zip(c1["pre"][lang], c1["post"][lang])] for lang in sw.LANGS[1:]}
    mean_drop = [float(np.mean([drop[lang][i] for lang in drop])) for i in range(len(drop[sw.LANGS[1]]))]
    acc = dev_accuracy(ft, world, tok)
    swaps = {f"{b[0]}-{b[-1]}": dev_accuracy(swap_layers(ft, pre, b), world, tok) for b in SWAP_BLOCKS}
    pairs = word_pairs(world, tok)
    shifted = dev_accuracy(embedding_shift(ft, pre, pairs), world, tok)
    out = {
        "alignment": {"pre": c1["pre"], "post": c1["post"], "mean_drop": mean_drop},
        "dev": acc,
        "swap_back": {k: {"dev": v, "gain_non_en": non_en(v) - non_en(acc)} for k, v in swaps.items()},
        "embedding_shift": {"dev": shifted, "gain_non_en": non_en(shifted) - non_en(acc)},
        "row_movement": row_movement(ft, pre, pairs),
    }
    if blind_run is not None:
        blind, _ = eval_zeroshot.load_model(eval_zeroshot.run_checkpoint(blind_run))
        out["blind_dev_en"] = dev_accuracy(blind, world, tok, blind=True)["en"]
    return out


def verdicts(checks: Sequence[dict], blind_dev_en: float | None) -> dict:
    """A cell's verdicts (protocol_study3.md section 4) from its full runs' checks (one per fine-tuning seed)."""
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    drop = np.mean([c["alignment"]["mean_drop"] for c in checks], axis=0)
    en = mean([c["dev"]["en"] for c in checks])
    swap = mean([c["swap_back"]["0-2"]["gain_non_en"] for c in checks])
    shift = mean([c["embedding_shift"]["gain_non_en"] for c in checks])
    out = {
        "P0_english": None if blind_dev_en is None else bool(en - blind_dev_en >= P0_MARGIN),
        "english_margin": None if blind_dev_en is None else en - blind_dev_en,
        "P1_alignment_erodes": bool(drop[1:].max() >= P1_DROP),
        "max_mean_drop": float(drop[1:].max()),
        "P2_swap_back_helps": bool(swap >= P2_GAIN),
        "swap_back_gain": swap,
        "embedding_channel_open": bool(shift >= C3_GAIN),
        "embedding_shift_gain": shift,
    }
    out["layer_premise"] = bool(out["P0_english"] and out["P1_alignment_erodes"] and out["P2_swap_back_helps"])
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True)
    p.add_argument("--pretrained", required=True, help="the run's pretraining checkpoint")
    p.add_argument("--run", required=True, help="a finished train_uc2.py run of policy full")
    p.add_argument("--blind", default=None, help="the blind (question-only) run of the same pretraining seed")
    p.add_argument("--out", default=None, help="write the checks here as JSON")
    args = p.parse_args(argv)
    res = check_run(Path(args.world), Path(args.pretrained), Path(args.run), Path(args.blind) if args.blind else None)
    res["verdicts"] = verdicts([res], res.get("blind_dev_en"))
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps(res["verdicts"], indent=1))


if __name__ == "__main__":
    main()
