"""Translation-based alignment + PET vs SUF on a synthetic Multilingual-CLIP (issue 18;
protocol: docs/synthetic/protocol.md, Study 2). From a synthetic world (synthetic/world.py) it writes:

- an XTD10-like retrieval set in PECTVLM's layout (comparisons/mclip/train_mclip.py --dataset xtd reads it
  unchanged): one caption per image and language, all/test_1kcaptions_<lang>.txt, and the "machine translations"
  translated_from_en/<lang>.txt and translated_to_en/<lang>.txt, which in this world are **exact** translations
  (every language is a deterministic rendering of the same English sentence);
- a frozen "image tower": tanh of a fixed random projection of the slot-ordered region features, the
  {'names', 'features'} file train_mclip.py --image-features reads;
- an M-CLIP-like text tower per pretraining seed: a 4-layer XLM-R (hidden 64) of the world's vocabulary + mean
  pooling + LinearTransformation, trained CLIP-style (symmetric InfoNCE with a learned temperature) against the
  frozen image features on captions of every language with English the majority language and `lo` at 1/20 of
  English, saved in the released M-CLIP layout (a folder with model.safetensors of transformer.* /
  LinearTransformation.* keys, the tokenizer, text_config.json), so train_mclip.py --text-checkpoint and
  --tokenizer load it unchanged;

then checks the premise (zero-shot R@1 per language on held-out scenes), runs the arms through train_mclip.main and
reports per-language R@1, the disparity (average, range, std) and paired differences analysed by synthetic.analysis
(the pretraining seed is the unit of replication: a Student t 95% interval over the per-pretraining-seed means, n
stated, the per-pair table beside it, the smallest detectable effect; docs/synthetic/reanalysis.md).

  python -m synthetic.mclip_study --world synth_out/world --out synth_out/mclip --record     # make synth-mclip
  python -m synthetic.mclip_study --from-record docs/synthetic/mclip_results.json --out DIR   # no training

Off the reading path: a study in the synthetic world (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from formats import tokenizer_check
from formats.features import FEATURE_DIM
from comparisons.mclip import xtd_data
import engine
from comparisons.mclip import train_mclip
from synthetic import analysis
from synthetic import study as ss
from synthetic import world as sw
from formats import run_folder, torch_files

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "synthetic" / "mclip_results.json"
TARGETS = sw.LANGS[1:]
# English the majority language (M-CLIP's teacher and CLIP's training text are English), lo at 1/20 of English as
# the world's low-resource language; the other three at half of English. Our choice (protocol, Study 2).
PRETRAIN_LANG_WEIGHTS = {"en": 1.0, "rl": 0.5, "sw": 0.5, "cr": 0.5, "lo": 0.05}
SLOT_DIM = FEATURE_DIM
# Study arms -> train_mclip.py arguments (beyond the common ones). method1: target text <-> its exact English
# translation (MSE); method3 with exact translations trains and tests on English text (translate-test).
ARMS = {
    "zeroshot": ["--pet", "none", "--routine", "baseline1"],
    "lora": ["--pet", "lora", "--routine", "method1"],
    "adapter": ["--pet", "adapter", "--routine", "method1"],
    "full": ["--pet", "full", "--routine", "method1", "--policy", "full"],
    # SUF mapped to this tower and 50 epochs: the paper's schedule (k=3 of 12 layers, a stage per epoch of 5: 4
    # stages, all layers for the last 2 of 5 epochs) keeps its shape with k=1 of 4 layers and a stage a fifth of
    # training, 10 epochs (1 layer in epochs 0-9, 2 in 10-19, 3 in 20-29, all 4 from epoch 30)
    "suf": ["--pet", "full", "--routine", "method1", "--policy", "suf", "--suf-k", "1", "--unfreeze-every", "10"],
    "lora_m3": ["--pet", "lora", "--routine", "method3"],
}

ORDER = ("suf", "full", "lora", "zeroshot", "lora_m3", "adapter")  # job order within a seed pair (protocol)
LANG_ORDER = ("rl", "sw", "cr", "lo", "en")


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and budgets of the study (docs/synthetic/protocol.md, Study 2: fixed before any comparison)."""

    retrieval_scenes: int = 1000  # XTD10's 1,000 images
    premise_scenes: int = 500  # held-out scenes of the premise checks (not the retrieval set)
    pretrain_scenes: int = 5000
    pretrain_captions: int = 4  # partial-caption draws per pretraining scene
    n_shot: int = 50  # XTD's --n_shot 50: 50 train / 50 val / 900 test
    image_dim: int = 64  # the image tower's output = the text tower's LinearTransformation width
    text: dict = field(
        default_factory=lambda: {
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "max_position_embeddings": 66,
            "type_vocab_size": 1,
            "layer_norm_eps": 1e-5,
        }
    )
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_eval_every: int = 250
    # fine-tuning: the reference's (PECTVLM scripts/de.sh): Adam wd 0, cosine without warm-up, 50 epochs, batch 5,
    # validation every 5 steps, lr 1e-4, alignment ratio 0.5, dropout 0.1 (XLM-R's)
    epochs: int = 50
    batch_size: int = 5
    eval_steps: int = 5
    lr: float = 1e-4
    align_ratio: float = 0.5


# ---------------------------------------------------------------------------------------------- scenes


def scene_key(scene: Sequence[sw.Obj]) -> tuple:
    return tuple((o.shape, o.colour, o.size, o.slot) for o in scene)


def draw_scenes(cfg: sw.WorldConfig, stream: str, n: int, exclude: set) -> list[tuple[list[sw.Obj], np.ndarray]]:
    """n scenes of `stream` whose content is new (not in exclude, no repeat), with their region features. A
    repeated scene would make two images with the same caption; one seen in pretraining would leak the test."""
    books = sw.codebooks(cfg)
    out, i = [], 0
    while len(out) < n:
        scene = sw.sample_scene(sw.scene_rng(cfg, stream, i), cfg)
        key = scene_key(scene)
        if key not in exclude:
            exclude.add(key)
            rng = np.random.default_rng([cfg.seed, 17, zlib.crc32(stream.encode()), i])
            out.append((scene, sw.scene_regions(scene, books, rng, cfg.noise)[0]))
        i += 1
    return out


def partial_caption(scene: Sequence[sw.Obj], rng: np.random.Generator) -> sw.Sentence:
    """A caption of 1..n of the scene's objects (left to right, colour and slot always, size half the time), in
    synthetic.world.caption's grammar (cr reverses the conjuncts). Partial, as COCO's captions are: a full description
    makes retrieval among 900 scenes trivial (log: pretraining attempt 1, R@1 >= 98.7 in every language)."""
    k = int(rng.integers(1, len(scene) + 1))
    objs = [scene[i] for i in sorted(rng.choice(len(scene), k, replace=False))]
    parts: list[tuple] = [("there", "is")]
    for i, o in enumerate(objs):
        adjs = ([sw.SIZES[o.size]] if rng.integers(2) else []) + [sw.COLOURS[o.colour]]
        parts.append((("and",) if i else ()) + (sw.np_("a", adjs, sw.SHAPES[o.shape]), "on", "the", sw.SLOTS[o.slot]))
    return sw.Sentence(tuple(parts), tuple(range(len(parts) - 1, 0, -1)) + (0,), ".")


def caption_rng(cfg: sw.WorldConfig, stream: str, i: int, draw: int = 0) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, 31, zlib.crc32(stream.encode()), i, draw])


def image_tower_weights(cfg: sw.WorldConfig, dim: int) -> np.ndarray:
    """The frozen image tower's projection [3 slots x 2048, dim], N(0, 1/fan_in), fixed by the world seed."""
    rng = np.random.default_rng([cfg.seed, 23])
    fan_in = len(sw.SLOTS) * SLOT_DIM
    return (rng.standard_normal((fan_in, dim), dtype=np.float32) / np.float32(math.sqrt(fan_in))).astype(np.float32)


def image_tower(scene: Sequence[sw.Obj], regions: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """tanh(W^T [left; middle; right] region features), an empty slot zero: a fixed nonlinear function of the
    scene's features that keeps which object is where (captions say it)."""
    x = np.zeros((len(sw.SLOTS), SLOT_DIM), dtype=np.float32)
    for o, feats in zip(scene, regions):
        x[o.slot] = feats
    return torch.from_numpy(np.tanh(x.reshape(-1) @ weights).astype(np.float32))


def image_name(i: int) -> str:
    """XTD10 names its images by COCO 2014 file name (<prefix>_<train|val...>_<id>.jpg), which xtd_data.load_xtd
    requires; ours say that they are synthetic."""
    return f"synth_val_{i:05d}.jpg"


# ---------------------------------------------------------------------------------------------- files


def write_retrieval_set(
    root: Path, scenes: list[tuple[list[sw.Obj], np.ndarray]], sentences: list[sw.Sentence], lex: dict, weights
) -> dict[str, torch.Tensor]:
    """PECTVLM's XTD10 layout under root (what xtd_data.load_xtd reads) and the image features {image path: row}."""
    names = [image_name(i) for i in range(len(scenes))]
    files = {"all/test_image_names.txt": names}
    for lang in sw.LANGS:
        native = [sw.render(s, lang, lex) for s in sentences]
        files[xtd_data.XTD_FILES["native"].format(lang)] = native
        files[xtd_data.XTD_FILES["from_en"].format(lang)] = native  # exact translation of the English caption
        files[xtd_data.XTD_FILES["to_en"].format(lang)] = [sw.render(s, "en", lex) for s in sentences]  # exact
    for rel, lines in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {xtd_data.xtd_image_path(n): image_tower(sc, reg, weights) for n, (sc, reg) in zip(names, scenes)}


def text_config(cfg: StudyConfig, vocab_size: int) -> dict:
    """train_mclip.py --text-config json (TEXT_CONFIGS' keys)."""
    return {"vocab_size": vocab_size, **cfg.text, "out_dim": cfg.image_dim}


def prepare(world_cfg: sw.WorldConfig, cfg: StudyConfig, out: Path) -> dict:
    """Retrieval set, premise set, pretraining pool, image features, tokenizer, text config under out/data."""
    d = out / "data"
    if (d / "prepared.json").is_file():
        return json.loads((d / "prepared.json").read_text())
    if d.exists():
        shutil.rmtree(d)  # an interrupted preparation: its files are a function of the configs, rewritten whole
    lex = sw.lexicons(world_cfg)
    weights = image_tower_weights(world_cfg, cfg.image_dim)
    seen: set = set()
    retrieval = draw_scenes(world_cfg, "mclip_retrieval", cfg.retrieval_scenes, seen)
    premise = draw_scenes(world_cfg, "mclip_premise", cfg.premise_scenes, seen)
    pool = draw_scenes(world_cfg, "mclip_pretrain", cfg.pretrain_scenes, seen)
    caps = lambda stream, scenes: [
        partial_caption(s, caption_rng(world_cfg, stream, i)) for i, (s, _) in enumerate(scenes)
    ]  # noqa
    feats = write_retrieval_set(d / "XTD10", retrieval, caps("mclip_retrieval", retrieval), lex, weights)
    train_mclip.write_image_features(d / "image_features.pt", feats)
    write_retrieval_set(d / "premise", premise, caps("mclip_premise", premise), lex, weights)
    premise_feats = [image_tower(s, r, weights) for s, r in premise]
    pool_feats = [image_tower(s, r, weights) for s, r in pool]
    run_folder.save_checkpoint(d / "premise_features.pt", {"features": torch.stack(premise_feats)})
    draws = [
        [partial_caption(s, caption_rng(world_cfg, "mclip_pretrain", i, k)) for k in range(cfg.pretrain_captions)]
        for i, (s, _) in enumerate(pool)
    ]
    captions = {l: [[sw.render(c, l, lex) for c in cs] for cs in draws] for l in sw.LANGS}
    run_folder.save_checkpoint(d / "pretrain_pool.pt", {"features": torch.stack(pool_feats), "captions": captions})
    tok = sw.write_tokenizer(lex, d / "tokenizer")
    (d / "text_config.json").write_text(json.dumps(text_config(cfg, len(tok)), indent=1) + "\n")
    info = {"world": world_cfg.to_dict(), "study": asdict(cfg), "vocab_size": len(tok)}
    (d / "prepared.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# ---------------------------------------------------------------------------------------------- pretraining


def zero_shot_r1(model, tok, captions: dict[str, list[str]], image: torch.Tensor) -> dict[str, float]:
    """Mean R@1 (i2t, t2i) per language of captions[lang][i] against image[i]."""
    model.eval()
    out = {}
    with torch.no_grad():
        for lang, texts in captions.items():
            text = torch.cat(
                [train_mclip.encode(model, tok, texts[i : i + 250], "cpu") for i in range(0, len(texts), 250)]
            )
            out[lang] = train_mclip.recall_at_1(image, text)["mean_r1"]
    model.train()
    return out


def premise_captions(d: Path) -> dict[str, list[str]]:
    return xtd_data.load_xtd(d / "premise", list(sw.LANGS)).texts["native"]


def pretrain(out: Path, cfg: StudyConfig, seed: int) -> Path:
    """The M-CLIP-like text tower of one pretraining seed, written to out/text_seed<seed>/ in M-CLIP's layout."""
    d, dest = out / "data", out / f"text_seed{seed}"
    if (dest / "pretrain.json").is_file():
        return dest
    torch.set_num_threads(1)
    tok = tokenizer_check.load_tokenizer(d / "tokenizer")
    config = json.loads((d / "text_config.json").read_text())
    engine.seed_everything(seed)
    model = train_mclip.build_text_model(config)  # XLM-R's dropout 0.1
    pool = torch_files.load_checkpoint(d / "pretrain_pool.pt")
    image_n = train_mclip.l2_normalise(pool["features"])
    premise_image = torch_files.load_checkpoint(d / "premise_features.pt")["features"]
    captions = premise_captions(d)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature, learned, capped at 100
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1] + [log_scale]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.pretrain_lr
    )
    warm = max(1, cfg.pretrain_steps // 10)
    lr_at = lambda s: min((s + 1) / warm, max(0.0, (cfg.pretrain_steps - s) / (cfg.pretrain_steps - warm)))  # noqa
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng([seed, 29])
    langs = list(PRETRAIN_LANG_WEIGHTS)
    p = np.array([PRETRAIN_LANG_WEIGHTS[l] for l in langs])
    log, start = [], time.process_time()
    for step in range(1, cfg.pretrain_steps + 1):
        idx = rng.choice(len(image_n), cfg.pretrain_batch, replace=False)
        which = rng.choice(len(langs), cfg.pretrain_batch, p=p / p.sum())
        draw = rng.integers(0, cfg.pretrain_captions, cfg.pretrain_batch)
        texts = [pool["captions"][langs[w]][i][k] for i, w, k in zip(idx, which, draw)]
        text_n = train_mclip.l2_normalise(train_mclip.encode(model, tok, texts, "cpu"))
        loss = train_mclip.symmetric_ce(image_n[idx], text_n, log_scale.exp().clamp(max=100.0))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.pretrain_eval_every == 0 or step == cfg.pretrain_steps:
            r1 = zero_shot_r1(model, tok, captions, premise_image)
            log.append({"step": step, "loss": loss.item(), "scale": log_scale.exp().item(), "premise_r1": r1})
            print(json.dumps({"seed": seed, **log[-1]}), flush=True)
    save_text_tower(model, dest, d)
    info = {"seed": seed, "steps": cfg.pretrain_steps, "cpu_s": time.process_time() - start, "log": log}
    (dest / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    return dest


def save_text_tower(model: train_mclip.MCLIPText, dest: Path, d: Path) -> None:
    """M-CLIP's release layout: weights (safetensors: loading cannot run code), tokenizer, config."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest / "model.safetensors"))
    for f in (d / "tokenizer").iterdir():
        shutil.copy(f, dest / f.name)
    shutil.copy(d / "text_config.json", dest / "text_config.json")


def premise_check(out: Path, seed: int) -> dict:
    """Zero-shot R@1 per language on the premise scenes (chance 100/N) and the protocol's criterion."""
    d, folder = out / "data", out / f"text_seed{seed}"
    model = train_mclip.build_text_model(json.loads((d / "text_config.json").read_text()), dropout=0.0)
    train_mclip.load_text_weights(model, train_mclip.read_state_dict(folder), str(folder))
    image = torch_files.load_checkpoint(d / "premise_features.pt")["features"]
    r1 = zero_shot_r1(model, tokenizer_check.load_tokenizer(folder), premise_captions(d), image)
    chance = 100.0 / len(image)
    checks = {
        "every_language_at_least_5": min(r1.values()) >= 5.0,
        "english_best": max(r1, key=r1.get) == "en",
        "range_at_least_5": max(r1.values()) - min(r1.values()) >= 5.0,
    }
    return {"seed": seed, "r1": r1, "chance": chance, "checks": checks, "holds": all(checks.values())}


# ---------------------------------------------------------------------------------------------- fine-tuning


def run_argv(out: Path, cfg: StudyConfig, arm: str, lang: str, pseed: int, fseed: int) -> list[str]:
    d, text = out / "data", out / f"text_seed{pseed}"
    return [
        "--dataset", "xtd", "--data-root", str(d / "XTD10"), "--lang", lang, "--n-shot", str(cfg.n_shot),
        "--text-config", str(d / "text_config.json"), "--text-checkpoint", str(text), "--tokenizer", str(text),
        "--image-features", str(d / "image_features.pt"), "--seed", str(fseed), "--epochs", str(cfg.epochs),
        "--batch-size", str(cfg.batch_size), "--eval-steps", str(cfg.eval_steps), "--lr", str(cfg.lr),
        "--align-ratio", str(cfg.align_ratio), "--output-dir", str(run_dir(out, arm, lang, pseed, fseed)),
        *ARMS[arm],
    ]  # fmt: skip


def run_dir(out: Path, arm: str, lang: str, pseed: int, fseed: int | None) -> Path:
    tail = f"p{pseed}" if arm == "zeroshot" else f"p{pseed}f{fseed}"  # zero-shot trains nothing: no seed
    return out / "runs" / f"{arm}-{lang}-{tail}"


def _run_one(argv: list[str]) -> tuple[str, float]:
    torch.set_num_threads(1)
    start = time.process_time()
    train_mclip.main(argv)
    return argv[argv.index("--output-dir") + 1], time.process_time() - start


def arm_langs(arm: str, langs: Sequence[str]) -> list[str]:
    """method3 with exact translations gives every language the same inputs (English text, English partner):
    one run (the last language) stands for all of them."""
    return [langs[-1] if "lo" not in langs else "lo"] if arm == "lora_m3" else list(langs)


def job_list(out, cfg, arms, langs, pseeds, fseeds) -> list[list[str]]:
    """Seed-major (pretraining seed, fine-tuning seed), then ORDER's arms, then languages: an interrupted study
    leaves whole pairs. A finished run (results.json) is skipped; an interrupted one resumed (--resume is exact)."""
    jobs = []
    for p in pseeds:
        for f in fseeds:
            for arm in sorted(arms, key=ORDER.index):
                if arm == "zeroshot" and f != fseeds[0]:
                    continue
                for lang in arm_langs(arm, langs):
                    argv = run_argv(out, cfg, arm, lang, p, f)
                    rd = run_dir(out, arm, lang, p, f)
                    if (rd / "results.json").is_file():
                        continue
                    jobs.append(argv + (["--resume"] if (rd / run_folder.ARGS).is_file() and arm != "zeroshot" else []))
    return jobs


def run_jobs(jobs: list[list[str]], n_jobs: int, timing: Path) -> None:
    timing.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=n_jobs) as pool, open(timing, "a") as t:
        for run, cpu in pool.map(_run_one, jobs):
            t.write(json.dumps({"run": run, "cpu_s": round(cpu, 1)}) + "\n")
            t.flush()


# ---------------------------------------------------------------------------------------------- report


def collect(out: Path, arms, langs, pseeds, fseeds) -> dict:
    """arm -> pseed -> fseed -> {lang: test mean R@1} of finished runs (zero-shot repeated for every fseed)."""
    res: dict = {}
    for arm in arms:
        for p in pseeds:
            for f in fseeds:
                got = {}
                for lang in langs:
                    ran = arm_langs(arm, langs)[0] if arm == "lora_m3" else lang
                    path = run_dir(out, arm, ran, p, f) / "results.json"
                    if path.is_file():
                        got[lang] = json.loads(path.read_text())["test"]["mean_r1"]
                if len(got) == len(langs):
                    res.setdefault(arm, {}).setdefault(p, {})[f] = got
    return res


def summary(scores: dict[str, float]) -> dict[str, float]:
    """target average (non-English), and range / std across all languages present (the paper's disparity)."""
    targets = [v for l, v in scores.items() if l != "en"]
    return {"target_avg": float(np.mean(targets)), **train_mclip.disparity(scores)}


BASES = ("suf", "full")


def analysis_spec(langs: Sequence[str]) -> dict:
    """Protocol 2.1's comparisons (every arm - SUF, every arm - full; headline: the target average over the
    non-English languages; range and std across all languages, ddof 0), for synthetic.analysis. With every language
    it is synthetic.analysis.MCLIP_SPEC."""
    targets = [lang for lang in LANG_ORDER if lang in langs and lang != "en"]
    every = [lang for lang in sw.LANGS if lang in langs]
    return {
        "metrics": {
            "target_avg": {"op": "mean", "of": targets},
            "range": {"op": "range", "of": every},
            "std": {"op": "std", "of": every},
        },
        "comparisons": [[a, b] for b in BASES for a in ("zeroshot", "lora", "adapter", "full", "suf", "lora_m3")],
        "report_metrics": ["target_avg", "range", "std", *targets, *(["en"] if "en" in langs else [])],
        "headline": "target_avg",
    }


def compare(res: dict, langs: Sequence[str]) -> dict:
    """Every arm - SUF and every arm - full, paired on (pretraining seed, fine-tuning seed), the pretraining seed as
    the unit (synthetic.analysis); zero-shot is paired with each fine-tuning seed's runs by repetition."""
    return analysis.analyse({"per_run": res, "analysis": analysis_spec(langs)})


def mean_table(res: dict, langs) -> dict:
    """arm -> {lang: mean over seeds, target_avg / avg / range / std: mean over seeds of each run-set's value}."""
    out = {}
    for arm, by_p in res.items():
        sets = [s for by_f in by_p.values() for s in by_f.values()]
        row = {l: float(np.mean([s[l] for s in sets])) for l in langs}
        for m in ("target_avg", "avg", "range", "std"):
            row[m] = float(np.mean([summary(s)[m] for s in sets]))
        out[arm] = {**row, "n": len(sets)}
    return out


def build_record(res: dict, langs: Sequence[str], premise: list[dict], extra: dict) -> dict:
    """The study's record: premise, means, every run (per_run), the analysis spec and its intervals."""
    return {
        "premise": premise,
        "table": mean_table(res, langs),
        "per_run": res,
        "analysis": analysis_spec(langs),
        "intervals": compare(res, langs),
        **extra,
    }


def format_report(record: dict, langs: Sequence[str]) -> str:
    lines = ["# Synthetic M-CLIP study (docs/synthetic/protocol.md, Study 2)", ""]
    if record.get("source"):
        lines += [f"Made without training from the per-run values of `{record['source']}`.", ""]
    lines += ["Premise (zero-shot mean R@1 on held-out scenes, per pretraining seed):", ""]
    for pr in record["premise"]:
        cells = " ".join(f"{l} {v:.1f}" for l, v in pr["r1"].items())
        lines.append(f"- seed {pr['seed']}: {cells} (chance {pr['chance']:.2f}); holds: {pr['holds']} {pr['checks']}")
    lines += ["", "Test mean R@1 (i2t, t2i), mean over runs; target avg = non-English; range/std across languages:", ""]
    head = "| arm | n | " + " | ".join(langs) + " | target avg | range | std |"
    lines += [head, "|" + "---|" * (len(langs) + 5)]
    for arm, row in record["table"].items():
        cells = " | ".join(f"{row[l]:.1f}" for l in langs)
        lines.append(
            f"| {arm} | {row['n']} | {cells} | {row['target_avg']:.1f} | {row['range']:.1f} | {row['std']:.1f} |"
        )
    lines += ["", *ss.intervals_section(record["intervals"], "Paired differences arm − SUF and arm − full")]
    return "\n".join(lines) + "\n"


def report(out: Path, arms, langs, pseeds, fseeds, premise: list[dict], extra: dict) -> dict:
    record = build_record(collect(out, arms, langs, pseeds, fseeds), langs, premise, extra)
    text = format_report(record, langs)
    (out / "RESULTS.md").write_text(text)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)
    return record


def from_record(source: Path, out: Path) -> dict:
    """No training: the report and record re-made from a record's per-run values (e.g. docs/synthetic/
    mclip_results.json), its premise, config, arms and compute kept; written to out/RESULTS.md, out/results.json."""
    old = analysis.read_record(source)
    if not old.get("per_run"):
        raise SystemExit(f"error: {source}: no 'per_run' key (the analysis needs every run's numbers)")
    run = next(iter(next(iter(next(iter(old["per_run"].values())).values())).values()))
    langs = [lang for lang in LANG_ORDER if lang in run]
    extra = {k: old[k] for k in ("config", "arms", "compute") if k in old}
    record = build_record(old["per_run"], langs, old.get("premise", []), extra)
    text = format_report({**record, "source": str(source)}, langs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text(text)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)
    return record


# ---------------------------------------------------------------------------------------------- main


def compute(out: Path, pseeds: Sequence[int]) -> dict:
    """CPU seconds (one thread each) of the fine-tuning runs (timing.jsonl, every call) and of pretraining."""
    timing = out / "timing.jsonl"
    runs = [json.loads(line) for line in timing.read_text().splitlines()] if timing.is_file() else []
    pre = {s: json.loads((out / f"text_seed{s}" / "pretrain.json").read_text())["cpu_s"] for s in pseeds}
    return {"runs": len(runs), "runs_cpu_s": round(sum(r["cpu_s"] for r in runs), 1), "pretrain_cpu_s": pre}


def load_world_config(world: str | None, seed: int) -> sw.WorldConfig:
    if world is None:
        return sw.WorldConfig(seed=seed)
    path = Path(world) / "world.json"
    if not path.is_file():
        raise SystemExit(
            f"error: --world {world}: no world.json (write one with python -m synthetic.world --out {world})"
        )
    return sw.load_config(Path(world))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=None, help="a synthetic/world.py folder (its world.json); default: WorldConfig()")
    p.add_argument("--out", required=True, help="study folder (resumable: finished steps are kept)")
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--finetune-seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS))
    p.add_argument("--langs", nargs="+", choices=sw.LANGS, default=list(LANG_ORDER))
    p.add_argument("--jobs", type=int, default=2, help="fine-tuning processes at once (one thread each)")
    p.add_argument("--pretrain-only", action="store_true", help="stop after pretraining and the premise checks")
    p.add_argument("--report-only", action="store_true", help="only collect finished runs and report")
    p.add_argument(
        "--from-record", default=None, help="no training: re-make the report and record from a record's per-run values"
    )
    p.add_argument("--record", action="store_true", help=f"also write the record {RECORD.relative_to(ROOT)}")
    p.add_argument("--config", default=None, help="json of StudyConfig fields to override (tests: a tiny study)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = StudyConfig()
    if args.config:
        cfg = replace(cfg, **json.loads(Path(args.config).read_text()))
    out = Path(args.out)
    if args.from_record:
        record = from_record(Path(args.from_record), out)
        if args.record:
            RECORD.write_text(json.dumps(record, indent=1) + "\n")
        return record
    world_cfg = load_world_config(args.world, 0)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if not args.report_only:
        prepare(world_cfg, cfg, out)
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(args.pretrain_seeds))) as pool:
            list(
                pool.map(
                    pretrain, [out] * len(args.pretrain_seeds), [cfg] * len(args.pretrain_seeds), args.pretrain_seeds
                )
            )
    premise = [premise_check(out, s) for s in args.pretrain_seeds]
    (out / "premise.json").write_text(json.dumps(premise, indent=1) + "\n")
    if args.pretrain_only:
        print(json.dumps(premise, indent=1))
        return {"premise": premise}
    if not args.report_only:
        jobs = job_list(out, cfg, args.arms, args.langs, args.pretrain_seeds, args.finetune_seeds)
        run_jobs(jobs, args.jobs, out / "timing.jsonl")
    extra = {
        "config": asdict(cfg),
        "arms": {a: ARMS[a] for a in args.arms},
        "compute": compute(out, args.pretrain_seeds),
    }
    record = report(out, args.arms, args.langs, args.pretrain_seeds, args.finetune_seeds, premise, extra)
    if args.record:
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
