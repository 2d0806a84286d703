"""UC2-style pretraining of the project's own UC2 model on the synthetic world (issue 16; docs/synthetic/).

Objectives, one per step in a fixed cycle (UNITER/UC2 task sampling): masked language modelling with the
image (MLM), translation language modelling on parallel text (en + its exact translation + image, UC2's
TLM/VTLM), image-text matching (ITM), masked region classification (MRM: shape and colour of a zeroed
region). The checkpoint is written in VOLTA's key layout with VOLTA's pre-training-head names, so
`train_uc2.py --checkpoint` loads it as it loads IGLUE's uc2_checkpoint_200000.bin.

  python -m synthetic.pretrain --world synth_out/world --seed 0 --steps 3000 --out synth_out/pretrain-s0.bin

Off the reading path: the synthetic world's tooling (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from formats import tokenizer_check
from formats.features import box_locations, pad_regions
import train_uc2
from formats import volta
from synthetic import world as sw

OBJECTIVES = ("mlm", "itm", "mrm", "tlm", "mlm")  # one optimizer step each, cycled
OBJECTIVES_SINGLE = ("mrm", "itm", "mlm")  # the curriculum's one-object stage: cross-modal objectives first
NUM_REGION_CLASSES = len(sw.SHAPES) * len(sw.COLOURS)
MASK_PROB = 0.15
# Grounding curriculum (docs/synthetic/log.md, w1 attempt 1: without it nothing was grounded after 500 steps):
# the first SINGLE_FRAC of the steps use one-object scenes, where a masked colour word can only come from the
# one region. Its steps cycle OBJECTIVES_SINGLE (w1 attempt 2, single stage with the full cycle: MRM/ITM still at
# chance after 400 steps, while MRM alone on one-object scenes learned within ~100 steps at lr 1e-3). Dropout is
# off in pretraining (our choice: a deterministic toy corpus; it also costs ~17% of a step).
SINGLE_FRAC = 0.3
PRETRAIN_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.0}


class PretrainUC2(nn.Module):
    """train_uc2.UC2 (task head unused) + VOLTA-named pre-training heads."""

    def __init__(self, config: dict):
        super().__init__()
        h = config["hidden_size"]
        self.uc2 = train_uc2.UC2("xgqa", config)
        self.mlm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config["layer_norm_eps"]))
        self.mlm_decoder = nn.Linear(h, config["vocab_size"])
        self.itm = nn.Linear(config["pooler_size"], 2)
        self.mrm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config["layer_norm_eps"]))
        self.mrm_decoder = nn.Linear(h, NUM_REGION_CLASSES)
        for m in (self.mlm_transform, self.mlm_decoder, self.itm, self.mrm_transform, self.mrm_decoder):
            m.apply(self.uc2._init_weights)

    def states(self, batch: dict, layers: bool = False) -> dict:
        """Final text/region states and pooled output; with layers, every layer's text states (0 = embeddings)."""
        trace: dict = {}
        pooled = self.uc2.encode(
            batch["input_ids"],
            batch["attention_mask"],
            batch["features"],
            batch["spatials"],
            batch["image_mask"],
            trace=trace,
        )
        out = {"text": trace["sublayer_outputs_t"][-1], "regions": trace["sublayer_outputs_v"][-1], "pooled": pooled}
        if layers:
            out["layers"] = [trace["embedding_t"]] + trace["sublayer_outputs_t"][1::2]  # after each FFN block
        return out

    def mlm_logits(self, text_states: torch.Tensor) -> torch.Tensor:
        return self.mlm_decoder(self.mlm_transform(text_states))

    def mrm_logits(self, region_states: torch.Tensor) -> torch.Tensor:
        return self.mrm_decoder(self.mrm_transform(region_states))


# ---------------------------------------------------------------------------------------------- VOLTA layout


def volta_name(our_key: str) -> str:
    """Our UC2 key -> the VOLTA key formats.volta.volta_key maps back to it (checked by the caller)."""
    inv_emb = {v: k for k, v in volta.VOLTA_EMB.items()}
    parts = our_key.split(".")
    if parts[0] == "embeddings":
        return f"bert.embeddings.{inv_emb[parts[1]]}.{parts[2]}"
    if parts[0] == "pooler":
        return f"bert.t_pooler.dense.{parts[1]}"
    if parts[0] == "encoder":
        k, module, wb = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
        for table, sub in ((volta.VOLTA_ATTN, 2 * k), (volta.VOLTA_FFN, 2 * k + 1)):
            inv = {v: key for key, v in table.items()}
            if module in inv:
                return f"bert.encoder.layer.{sub}.{inv[module]}.{wb}"
    raise ValueError(f"no VOLTA name for {our_key}")


HEAD_NAMES = {
    "mlm_transform.0": "cls.predictions.transform.dense",
    "mlm_transform.2": "cls.predictions.transform.LayerNorm",
    "itm": "cls.bi_seq_relationship",
    "mrm_transform.0": "cls.imagePredictions.transform.dense",
    "mrm_transform.2": "cls.imagePredictions.transform.LayerNorm",
    "mrm_decoder": "cls.imagePredictions.decoder_dict.0",
}


def volta_state_dict(model: PretrainUC2) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.uc2.state_dict().items():
        if k.startswith("head."):
            continue  # a pre-trained checkpoint has no task head
        name = volta_name(k)
        assert volta.volta_key(name, "xgqa") == ("map", k), (k, name)
        out[name] = v.detach().clone()
    heads = dict(model.named_parameters())
    for ours, theirs in HEAD_NAMES.items():
        out[f"{theirs}.weight"] = heads[f"{ours}.weight"].detach().clone()
        out[f"{theirs}.bias"] = heads[f"{ours}.bias"].detach().clone()
    out["cls.predictions.decoder.weight"] = model.mlm_decoder.weight.detach().clone()
    out["cls.predictions.bias"] = model.mlm_decoder.bias.detach().clone()
    return out


def load_pretrained(path: str | Path, config: dict) -> PretrainUC2:
    """A checkpoint written by this script, back into PretrainUC2 (encoder through formats.volta.load_into)."""
    sd, _ = volta.read_checkpoint(str(path))
    model = PretrainUC2(config)
    volta.load_into(model.uc2, sd)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in HEAD_NAMES.items():
            params[f"{ours}.weight"].copy_(sd[f"{theirs}.weight"])
            params[f"{ours}.bias"].copy_(sd[f"{theirs}.bias"])
        model.mlm_decoder.weight.copy_(sd["cls.predictions.decoder.weight"])
        model.mlm_decoder.bias.copy_(sd["cls.predictions.bias"])
    return model.eval()


# ---------------------------------------------------------------------------------------------- corpus


class Corpus:
    """Pretraining scenes and texts, every draw a function of (world, pretraining seed, stream, step)."""

    def __init__(self, world: Path, seed: int):
        self.cfg = sw.load_config(world)
        self.lex = json.loads((world / "lexicon.json").read_text())
        self.books = sw.codebooks(self.cfg)
        self.tok = tokenizer_check.load_tokenizer(world / "tokenizer")
        self.seed = seed
        w = self.cfg.lang_weights
        self.langs = list(sw.LANGS)
        self.weights = np.array([w[l] for l in self.langs], dtype=np.float64) / sum(w[l] for l in self.langs)
        foreign = [l for l in self.langs if l != "en"]
        self.foreign, self.foreign_weights = foreign, np.array([w[l] for l in foreign]) / sum(w[l] for l in foreign)

    def rng(self, stream: str, step: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, self.seed, zlib.crc32(stream.encode()), step])

    def sentence(self, scene, rng) -> sw.Sentence:
        """A caption (40%), a statement (30%) or a question followed by its answer (30%; scenes of 2+ objects)."""
        r = rng.random()
        if r < 0.4 or (r >= 0.7 and len(scene) == 1):
            return sw.caption(scene)
        if r < 0.7:
            st = sw.statements(scene)
            return st[int(rng.integers(len(st)))]
        _, q, ans = sw.balanced_question(scene, rng)
        return sw.Sentence(q.parts + ((q.end, ans),), q.cr_order + (len(q.parts),), ".")

    def scenes(self, rng, n: int, single: bool = False):
        cfg = sw.WorldConfig(**{**self.cfg.to_dict(), "min_objects": 1, "max_objects": 1}) if single else self.cfg
        scenes = [sw.sample_scene(rng, cfg) for _ in range(n)]
        regions = [sw.scene_regions(s, self.books, rng, self.cfg.noise) for s in scenes]
        return scenes, regions

    def batch(
        self, stream: str, step: int, size: int, parallel: bool = False, lang: str | None = None, single: bool = False
    ) -> dict:
        """single: one-object scenes (the grounding curriculum's first stage)."""
        rng = self.rng(stream, step)
        scenes, regions = self.scenes(rng, size, single)
        sents = [self.sentence(s, rng) for s in scenes]
        if parallel:  # en + exact translation into a (weighted) foreign language
            langs = rng.choice(self.foreign, size, p=self.foreign_weights)
            enc = self.tok(
                [sw.render(s, "en", self.lex) for s in sents],
                [sw.render(s, l, self.lex) for s, l in zip(sents, langs)],
                padding=True,
                return_tensors="pt",
            )
        else:
            langs = [lang] * size if lang else rng.choice(self.langs, size, p=self.weights)
            enc = self.tok([sw.render(s, l, self.lex) for s, l in zip(sents, langs)], padding=True, return_tensors="pt")
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "langs": list(langs),
            "scenes": scenes,
            "rng": rng,
        }
        batch.update(regions_batch(regions, self.cfg.max_objects))
        return batch


def regions_batch(regions, max_regions: int) -> dict:
    feats = [f for f, _ in regions]
    locs = [box_locations(b, sw.IMG_W, sw.IMG_H) for _, b in regions]
    padded = [pad_regions(f, l, max_regions) for f, l in zip(feats, locs)]
    return {k: torch.stack([p[k] for p in padded]) for k in padded[0]}


def region_classes(scenes, max_regions: int) -> torch.Tensor:
    out = torch.full((len(scenes), max_regions), -100, dtype=torch.long)
    for i, s in enumerate(scenes):
        for j, o in enumerate(s):
            out[i, j] = o.shape * len(sw.COLOURS) + o.colour
    return out


# ---------------------------------------------------------------------------------------------- objectives


def mask_tokens(ids: torch.Tensor, rng: np.random.Generator, vocab: int, mask_id: int, first_word: int) -> tuple:
    """BERT masking of word tokens (ids >= first_word): 15%, at least one per row; 80% <mask>, 10% random, 10% kept."""
    word = ids >= first_word
    pick = torch.from_numpy(rng.random(ids.shape) < MASK_PROB) & word
    for i in range(ids.shape[0]):
        if not pick[i].any():
            cand = word[i].nonzero().flatten()
            pick[i, cand[int(rng.integers(len(cand)))]] = True
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    r = torch.from_numpy(rng.random(ids.shape))
    out = ids.clone()
    out[pick & (r < 0.8)] = mask_id
    rand = pick & (r >= 0.8) & (r < 0.9)
    out[rand] = torch.from_numpy(rng.integers(first_word, vocab, ids.shape))[rand]
    return out, labels


def objective_loss(model: PretrainUC2, obj: str, batch: dict, tok) -> torch.Tensor:
    rng = batch["rng"]
    if obj in ("mlm", "tlm"):
        ids, labels = mask_tokens(batch["input_ids"], rng, len(tok), tok.mask_token_id, len(sw.SPECIALS))
        st = model.states({**batch, "input_ids": ids})
        return F.cross_entropy(model.mlm_logits(st["text"]).flatten(0, 1), labels.flatten())
    if obj == "itm":
        n = batch["input_ids"].shape[0]
        swap = torch.from_numpy(rng.random(n) < 0.5)
        perm = torch.roll(torch.arange(n), 1)
        mixed = {
            k: torch.where(swap.view(-1, *[1] * (batch[k].dim() - 1)), batch[k][perm], batch[k])
            for k in ("features", "spatials", "image_mask")
        }
        same = torch.tensor([batch["scenes"][i] == batch["scenes"][int(perm[i])] for i in range(n)])
        target = (~swap | same).long()
        st = model.states({**batch, **mixed})
        return F.cross_entropy(model.itm(st["pooled"]), target)
    if obj == "mrm":
        feats, mask = batch["features"], batch["image_mask"].bool()
        pick = torch.from_numpy(rng.random(mask.shape) < MASK_PROB) & mask
        for i in range(mask.shape[0]):
            if not pick[i].any():
                cand = mask[i].nonzero().flatten()
                pick[i, cand[int(rng.integers(len(cand)))]] = True
        labels = region_classes(batch["scenes"], mask.shape[1])
        labels[~pick] = -100
        st = model.states({**batch, "features": feats.masked_fill(pick[..., None], 0.0)})
        return F.cross_entropy(model.mrm_logits(st["regions"]).flatten(0, 1), labels.flatten())
    raise ValueError(f"unknown objective {obj!r}")


# ---------------------------------------------------------------------------------------------- grounding checks


@torch.no_grad()
def grounding(model: PretrainUC2, corpus: Corpus, n: int = 256) -> dict:
    """Held-out scenes: ITM accuracy, MRM accuracy, masked-attribute probe per language (colour and shape
    words of captions masked one at a time; chance 1/6)."""
    model.eval()
    out: dict = {}
    b = corpus.batch("heldout-itm", 0, n, lang="en")
    perm = torch.roll(torch.arange(n), 1)
    swap = torch.arange(n) % 2 == 1
    mixed = {
        k: torch.where(swap.view(-1, *[1] * (b[k].dim() - 1)), b[k][perm], b[k])
        for k in ("features", "spatials", "image_mask")
    }
    same = torch.tensor([b["scenes"][i] == b["scenes"][int(perm[i])] for i in range(n)])
    pred = model.itm(model.states({**b, **mixed})["pooled"]).argmax(-1)
    out["itm_acc"] = float((pred == (~swap | same).long()).float().mean())
    b = corpus.batch("heldout-mrm", 0, n, lang="en")
    labels = region_classes(b["scenes"], b["features"].shape[1])
    feats = b["features"].clone()
    feats[:, 0] = 0.0  # mask the first region of each scene
    pred = model.mrm_logits(model.states({**b, "features": feats})["regions"][:, 0]).argmax(-1)
    out["mrm_acc"] = float((pred == labels[:, 0]).float().mean())
    for lang in sw.LANGS:
        out[f"attr_{lang}"] = attribute_probe(model, corpus, lang, n)
    model.train()
    return out


def attribute_probe(model: PretrainUC2, corpus: Corpus, lang: str, n: int) -> float:
    """Caption of each held-out scene in `lang`; every colour/shape word masked in turn; accuracy of the
    MLM prediction restricted to the 6 words of that attribute in that language."""
    rng = corpus.rng("heldout-attr", 0)
    scenes, regions = corpus.scenes(rng, n)
    texts = [sw.render(sw.caption(s), lang, corpus.lex) for s in scenes]
    enc = corpus.tok(texts, padding=True, return_tensors="pt")
    reg = regions_batch(regions, corpus.cfg.max_objects)
    groups = {
        a: torch.tensor(corpus.tok.convert_tokens_to_ids([corpus.lex[lang][w] for w in words]))
        for a, words in (("colour", sw.COLOURS), ("shape", sw.SHAPES))
    }
    correct = total = 0
    for attr, ids in groups.items():
        is_attr = torch.isin(enc["input_ids"], ids)
        for k in range(int(is_attr.sum(1).max())):
            pos = torch.full((n,), -1)
            for i in range(n):
                where = is_attr[i].nonzero().flatten()
                if k < len(where):
                    pos[i] = where[k]
            rows = (pos >= 0).nonzero().flatten()
            masked = enc["input_ids"].clone()
            masked[rows, pos[rows]] = corpus.tok.mask_token_id
            st = model.states({"input_ids": masked, "attention_mask": enc["attention_mask"], **reg})
            logits = model.mlm_logits(st["text"][rows, pos[rows]])[:, ids]
            correct += int((ids[logits.argmax(-1)] == enc["input_ids"][rows, pos[rows]]).sum())
            total += len(rows)
    return correct / total


# ---------------------------------------------------------------------------------------------- training


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.1) -> float:
    w = max(1, int(steps * warmup))
    return lr * (step + 1) / w if step < w else lr * max(0.0, (steps - step) / max(1, steps - w))


def pretrain(
    world: Path,
    seed: int,
    steps: int,
    out: Path,
    batch_size: int = 64,
    lr: float = 1e-3,
    eval_every: int = 0,
    log=print,
    single_frac: float = SINGLE_FRAC,
    probe_n: int = 256,
) -> dict:
    torch.manual_seed(seed)
    corpus = Corpus(world, seed)
    config = {**train_uc2.resolve_config(str(world / "model_config.json")), **PRETRAIN_DROPOUT}
    model = PretrainUC2(config)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    history, start, running = [], time.time(), {}
    model.train()
    for step in range(steps):
        single = step < single_frac * steps
        cycle = OBJECTIVES_SINGLE if single else OBJECTIVES
        obj = cycle[step % len(cycle)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        batch = corpus.batch("pretrain", step, batch_size, parallel=obj == "tlm", single=single)
        loss = objective_loss(model, obj, batch, corpus.tok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.setdefault(obj, []).append(float(loss.detach()))
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            rec = {
                "step": step + 1,
                "s": round(time.time() - start, 1),
                **{f"loss_{k}": round(float(np.mean(v)), 4) for k, v in running.items()},
                **{k: round(v, 4) for k, v in grounding(model, corpus, probe_n).items()},
            }
            running = {}
            history.append(rec)
            log(json.dumps(rec))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(volta_state_dict(model), tmp)
    tmp.replace(out)
    meta = {
        "world": sw.load_config(world).to_dict(),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "objectives": OBJECTIVES,
        "objectives_single": OBJECTIVES_SINGLE,
        "seconds": round(time.time() - start, 1),
        "history": history,
        "single_frac": single_frac,
        "dropout": 0.0,
        "final": grounding(model, corpus, probe_n),
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="folder written by python -m synthetic.world")
    p.add_argument("--seed", type=int, default=0, help="pretraining seed (initial weights, data order, masking)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--single-frac", type=float, default=SINGLE_FRAC, help="fraction of steps on one-object scenes first"
    )
    p.add_argument("--eval-every", type=int, default=500, help="grounding checks every N steps (0: only at the end)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the same bits whatever the machine's core count)"
    )
    p.add_argument("--out", required=True, help="checkpoint file (VOLTA layout); <out>.json gets the grounding record")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = pretrain(
        Path(args.world),
        args.seed,
        args.steps,
        Path(args.out),
        args.batch_size,
        args.lr,
        args.eval_every,
        single_frac=args.single_frac,
    )
    print(json.dumps({"final": meta["final"], "seconds": meta["seconds"]}))


if __name__ == "__main__":
    main()
