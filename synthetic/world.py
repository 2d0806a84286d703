"""A synthetic multilingual visual world in IGLUE's own formats (issue 16; protocol: docs/synthetic/protocol.md).

Scenes of 2-3 objects (shape, colour, size, horizontal slot) whose region features are fixed random
codebook vectors plus noise; English text from a small grammar and four languages derived from it
(relabelled vocabulary; + adjective-noun swap; + clause reordering; relabelled low-resource) that share
only special tokens, digits and punctuation; a word-level tokenizer over all of them; and an xGQA-like
task written exactly where and how IGLUE stores xGQA, so the real data.py / train_uc2.py /
eval_zeroshot.py read it unchanged:

  python -m synthetic.world --out synth_out/world     # datasets/, features.lmdb, tokenizer/, model_config.json

Everything is a function of WorldConfig (seed included): the same config writes byte-identical files.

Off the reading path: the synthetic world's tooling (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from formats import tokenizer_check
from formats.features import FEATURE_DIM
from synthetic import fixtures

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")
SIZES = ("small", "big")
SLOTS = ("left", "middle", "right")
LANGS = ("en", "rl", "sw", "cr", "lo")
# how each language is derived from English: (relabelled vocabulary, adjective after noun, clause order)
LANG_RULES = {
    "en": (False, False, False),
    "rl": (True, False, False),
    "sw": (True, True, False),
    "cr": (True, False, True),
    "lo": (True, False, False),
}
FUNCTION_WORDS = (
    "there",
    "is",
    "a",
    "the",
    "on",
    "and",
    "what",
    "colour",
    "shape",
    "object",
    "of",
    "or",
    "bigger",
    "smaller",
    "than",
    "yes",
    "no",
)
SHARED = ("?", ".", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")  # the only surface forms all languages share
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # XLM-R's ids 0-3, then <mask>
IMG_W, IMG_H = 600, 400
QTYPES = {
    "colour": "query",
    "shape": "query",
    "where": "query",
    "verify": "verify",
    "choose": "choose",
    "logical": "logical",
    "compare": "compare",
}


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 3
    noise: float = 0.5  # std of the per-region noise added to the codebook sum
    train_scenes: int = 2000
    train_questions_per_scene: int = 3
    valid_scenes: int = 200
    test_scenes: int = 300
    test_questions_per_scene: int = 2
    lang_weights: dict = field(default_factory=lambda: {"en": 1.0, "rl": 1.0, "sw": 1.0, "cr": 1.0, "lo": 0.05})
    version: str = "w1"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Obj:
    shape: int
    colour: int
    size: int
    slot: int


# ---------------------------------------------------------------------------------------------- scenes


def scene_rng(cfg: WorldConfig, stream: str, index: int) -> np.random.Generator:
    """Every random draw of the world comes from (world seed, stream, index): order-independent."""
    return np.random.default_rng([cfg.seed, zlib.crc32(stream.encode()), index])


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> list[Obj]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes = rng.choice(len(SHAPES), n, replace=False)
    slots = rng.choice(len(SLOTS), n, replace=False)
    return [
        Obj(int(s), int(rng.integers(len(COLOURS))), int(rng.integers(len(SIZES))), int(p))
        for s, p in sorted(zip(shapes, slots), key=lambda sp: sp[1])
    ]  # objects left to right


def codebooks(cfg: WorldConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 7])
    dim = FEATURE_DIM
    return {
        "shape": rng.standard_normal((len(SHAPES), dim), dtype=np.float32),
        "colour": rng.standard_normal((len(COLOURS), dim), dtype=np.float32),
        "size": rng.standard_normal((len(SIZES), dim), dtype=np.float32),
    }


def scene_regions(
    scene: Sequence[Obj], books: dict, rng: np.random.Generator, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, 2048] float32, boxes [n, 4] float32 pixels x1 y1 x2 y2) of one scene."""
    feats = np.stack([books["shape"][o.shape] + books["colour"][o.colour] + books["size"][o.size] for o in scene])
    feats = feats + noise * rng.standard_normal(feats.shape, dtype=np.float32)
    boxes = []
    for o in scene:
        half = rng.uniform(30, 45) if o.size == 0 else rng.uniform(60, 80)
        cx, cy = 100 + 200 * o.slot + rng.uniform(-20, 20), IMG_H / 2 + rng.uniform(-60, 60)
        boxes.append([max(cx - half, 0), max(cy - half, 0), min(cx + half, IMG_W - 1), min(cy + half, IMG_H - 1)])
    return feats.astype(np.float32), np.asarray(boxes, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- grammar
# A sentence is a list of parts; a part is a list of words and NPs. An NP is ("NP", det, adjectives, noun).
# English joins the parts in order; `cr` uses the template's own part order (clause reordering).


def np_(det: str, adjs: Sequence[str], noun: str) -> tuple:
    return ("NP", det, tuple(adjs), noun)


@dataclass(frozen=True)
class Sentence:
    parts: tuple  # tuple of parts (tuples of words / NPs)
    cr_order: tuple  # permutation of part indices for the clause-reordered language
    end: str  # "?" or "."


def _obj_np(o: Obj, det: str = "a", size: bool = True, colour: bool = True) -> tuple:
    adjs = ([SIZES[o.size]] if size else []) + ([COLOURS[o.colour]] if colour else [])
    return np_(det, adjs, SHAPES[o.shape])


def caption(scene: Sequence[Obj]) -> Sentence:
    """'there is a big red circle on the left and a small blue square on the middle ...' (cr: conjuncts reversed)."""
    parts: list[tuple] = [("there", "is")]
    for i, o in enumerate(scene):
        parts.append((("and",) if i else ()) + (_obj_np(o), "on", "the", SLOTS[o.slot]))
    order = tuple(range(len(parts) - 1, 0, -1)) + (0,)
    return Sentence(tuple(parts), order, ".")


def statements(scene: Sequence[Obj]) -> list[Sentence]:
    out = []
    for o in scene:
        out.append(Sentence(((np_("the", [], SHAPES[o.shape]),), ("is",), (COLOURS[o.colour],)), (0, 2, 1), "."))
        out.append(
            Sentence(
                (("the", "colour", "of"), (np_("the", [], SHAPES[o.shape]),), ("is", COLOURS[o.colour])), (1, 0, 2), "."
            )
        )
    for a, b in zip(scene, scene[1:]):
        if a.size != b.size:
            cmp = "bigger" if a.size > b.size else "smaller"
            out.append(
                Sentence(
                    ((np_("the", [], SHAPES[a.shape]),), ("is", cmp, "than"), (np_("the", [], SHAPES[b.shape]),)),
                    (2, 1, 0),
                    ".",
                )
            )
    return out


def _unique_colour(scene: Sequence[Obj]) -> list[Obj]:
    counts = np.bincount([o.colour for o in scene], minlength=len(COLOURS))
    return [o for o in scene if counts[o.colour] == 1]


def question(kind: str, scene: Sequence[Obj], rng: np.random.Generator) -> tuple[Sentence, str] | None:
    """(question, English answer) of one kind about the scene, or None if the kind does not apply."""
    o = scene[int(rng.integers(len(scene)))]
    the_shape = np_("the", [], SHAPES[o.shape])
    if kind == "colour":
        return Sentence((("what", "colour"), ("is",), (the_shape,)), (2, 0, 1), "?"), COLOURS[o.colour]
    if kind == "shape":
        cands = _unique_colour(scene)
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        the_object = np_("the", [COLOURS[o.colour]], "object")
        return Sentence((("what", "shape"), ("is",), (the_object,)), (2, 0, 1), "?"), SHAPES[o.shape]
    if kind == "where":
        return Sentence((("what",), ("is",), ("on", "the", SLOTS[o.slot])), (2, 0, 1), "?"), SHAPES[o.shape]
    if kind == "verify":
        yes = bool(rng.integers(2))
        shape, colour = (o.shape, o.colour) if yes else _absent(scene, rng)
        a_thing = np_("a", [COLOURS[colour]], SHAPES[shape])
        return Sentence((("is",), ("there",), (a_thing,)), (2, 1, 0), "?"), "yes" if yes else "no"
    if kind == "choose":
        other = int(rng.choice([c for c in range(len(COLOURS)) if c != o.colour]))
        pair = (o.colour, other) if rng.integers(2) else (other, o.colour)
        alternatives = (COLOURS[pair[0]], "or", COLOURS[pair[1]])
        return Sentence((("is",), (the_shape,), alternatives), (1, 2, 0), "?"), COLOURS[o.colour]
    if kind == "logical":
        yes = bool(rng.integers(2))
        a = o
        rest = [x for x in scene if x is not a]
        b = rest[int(rng.integers(len(rest)))]
        first, second = (a.shape, a.colour), (b.shape, b.colour)
        if not yes:  # one conjunct false: an absent (colour, shape)
            absent = _absent(scene, rng)
            first, second = (absent, second) if rng.integers(2) else (first, absent)
        nps = [np_("a", [COLOURS[c]], SHAPES[s]) for s, c in (first, second)]
        return Sentence((("is", "there"), (nps[0],), ("and", nps[1])), (2, 1, 0), "?"), "yes" if yes else "no"
    if kind == "compare":
        a, b = (scene[i] for i in rng.choice(len(scene), 2, replace=False))
        cmp = "bigger" if rng.integers(2) else "smaller"
        truth = a.size > b.size if cmp == "bigger" else a.size < b.size
        return Sentence(
            (("is",), (np_("the", [], SHAPES[a.shape]),), (cmp, "than", np_("the", [], SHAPES[b.shape]))),
            (1, 2, 0),
            "?",
        ), "yes" if truth else "no"
    raise ValueError(f"unknown question kind {kind!r}")


def _absent(scene: Sequence[Obj], rng: np.random.Generator) -> tuple[int, int]:
    present = {(o.shape, o.colour) for o in scene}
    while True:
        s, c = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
        if (s, c) not in present:
            return s, c


def balanced_question(scene: Sequence[Obj], rng: np.random.Generator) -> tuple[str, Sentence, str]:
    """A question of a uniformly drawn kind that applies to the scene: (kind, sentence, answer)."""
    kinds = list(QTYPES)
    while True:
        kind = kinds[int(rng.integers(len(kinds)))]
        got = question(kind, scene, rng)
        if got is not None:
            return kind, got[0], got[1]


# ---------------------------------------------------------------------------------------------- languages


def english_vocabulary() -> list[str]:
    return sorted(set(SHAPES + COLOURS + SIZES + SLOTS + FUNCTION_WORDS))


def lexicons(cfg: WorldConfig) -> dict[str, dict[str, str]]:
    """English word -> word of each language; pseudo-words are disjoint across languages and from English."""
    rng = np.random.default_rng([cfg.seed, 11])
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    english = english_vocabulary()
    used = set(english) | set(SHARED)
    out = {"en": {w: w for w in english}}
    for lang in LANGS[1:]:
        lex = {}
        for w in english:
            while True:
                n = int(rng.integers(2, 4))
                cand = "".join(
                    consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))] for _ in range(n)
                )
                if cand not in used:
                    used.add(cand)
                    lex[w] = cand
                    break
        out[lang] = lex
    return out


def render(sentence: Sentence, lang: str, lex: dict[str, dict[str, str]]) -> str:
    relabel, adj_after, reorder = LANG_RULES[lang]
    words = lex[lang]
    order = sentence.cr_order if reorder else range(len(sentence.parts))
    out: list[str] = []
    for i in order:
        for item in sentence.parts[i]:
            if isinstance(item, tuple):
                _, det, adjs, noun = item
                out += [det, noun, *adjs] if adj_after else [det, *adjs, noun]
            else:
                out.append(item)
    return " ".join(w if w in SHARED else words[w] for w in out) + " " + sentence.end


def render_answer(answer: str, lang: str, lex: dict[str, dict[str, str]]) -> str:
    return lex[lang][answer]


# ---------------------------------------------------------------------------------------------- task files


def task_questions(cfg: WorldConfig, stream: str, scenes: int, per_scene: int) -> list[dict]:
    """[{qid, image, kind, sentence, answer}] for `scenes` scenes of `stream` (train / valid / test)."""
    out = []
    for i in range(scenes):
        rng = scene_rng(cfg, stream, i)
        scene = sample_scene(rng, cfg)
        for j in range(per_scene):
            kind, sent, ans = balanced_question(scene, rng)
            out.append(
                {
                    "qid": f"{stream}{i:05d}_{j}",
                    "image": f"{stream}{i:05d}",
                    "kind": kind,
                    "sentence": sent,
                    "answer": ans,
                    "scene": scene,
                }
            )
    return out


def answer_vocabulary() -> list[str]:
    return sorted(set(COLOURS + SHAPES + ("yes", "no")))


def _dump_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=None, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")


def write_task(cfg: WorldConfig, out: Path, lex: dict) -> dict[str, list[dict]]:
    """IGLUE layout under out/datasets: gqa/annotations/{train,valid}.json + answer vocabulary (English), and
    xGQA/annotations/few_shot/<lang>/test.json (exact translations, GQA native format with structural types)."""
    ds = out / "datasets"
    answers = answer_vocabulary()
    _dump_json(ds / "gqa" / "annotations" / "trainval_label2ans.json", answers)
    _dump_json(ds / "gqa" / "annotations" / "trainval_ans2label.json", {a: i for i, a in enumerate(answers)})
    sets = {
        "train": task_questions(cfg, "train", cfg.train_scenes, cfg.train_questions_per_scene),
        "valid": task_questions(cfg, "valid", cfg.valid_scenes, cfg.train_questions_per_scene),
        "test": task_questions(cfg, "test", cfg.test_scenes, cfg.test_questions_per_scene),
    }
    for split in ("train", "valid"):
        _dump_json(
            ds / "gqa" / "annotations" / f"{split}.json",
            [
                {
                    "img_id": q["image"],
                    "label": {q["answer"]: 1.0},
                    "question_id": q["qid"],
                    "sent": render(q["sentence"], "en", lex),
                }
                for q in sets[split]
            ],
        )
    for lang in LANGS:
        _dump_json(ds / "xGQA" / "annotations" / "few_shot" / lang / "test.json", _native_gqa(sets["test"], lang, lex))
    return sets


def task_streams(cfg: WorldConfig) -> tuple[tuple[str, int], ...]:
    return (("train", cfg.train_scenes), ("valid", cfg.valid_scenes), ("test", cfg.test_scenes))


def task_scenes(
    cfg: WorldConfig, streams: Sequence[tuple[str, int]] | None = None
) -> Iterator[tuple[str, list[Obj], np.random.Generator]]:
    for stream, n in task_streams(cfg) if streams is None else streams:
        for i in range(n):
            rng = scene_rng(cfg, stream, i)
            feature_rng = np.random.default_rng([cfg.seed, 13, zlib.crc32(stream.encode()), i])
            yield f"{stream}{i:05d}", sample_scene(rng, cfg), feature_rng


def write_features(
    cfg: WorldConfig, path: Path, blind: bool = False, streams: Sequence[tuple[str, int]] | None = None
) -> Path:
    """Region-feature LMDB in IGLUE's h5_to_lmdb.py layout (pickled dict per image id + `keys`).
    blind: every region's features are zero (boxes kept): the question-only floor's input.
    streams: (scene stream, scene count) pairs (default: the task's train, valid, test)."""
    import lmdb

    books = codebooks(cfg)
    items = list(task_scenes(cfg, streams))
    path.mkdir(parents=True, exist_ok=True)
    per_image = cfg.max_objects * (FEATURE_DIM * 4 + 64) + 2048
    env = lmdb.open(str(path), map_size=2 * per_image * len(items) + (1 << 22))
    with env.begin(write=True) as txn:
        for key, scene, rng in items:
            feats, boxes = scene_regions(scene, books, rng, cfg.noise)
            if blind:
                feats = np.zeros_like(feats)
            item = {
                "features": feats,
                "boxes": boxes,
                "img_w": np.int64(IMG_W),
                "img_h": np.int64(IMG_H),
                "num_boxes": np.int64(len(scene)),
                "img_id": key,
                "obj_id": np.array([o.shape for o in scene], dtype=np.int64),
            }
            txn.put(key.encode(), pickle.dumps(item, protocol=4))
        txn.put(b"keys", pickle.dumps([k.encode() for k, _, _ in items], protocol=4))
    env.close()
    return path


# ---------------------------------------------------------------------------------------------- auxiliary data
# XVL-MAML (comparisons/xvlmaml/xvlmaml.py, docs/synthetic/protocol.md amendment A8) meta-trains on an
# auxiliary language's xGQA dev split.
# Written by add_auxiliary, never by build_world: a world without it is byte-identical to the worlds the study's
# runs and the shipped fixtures were made from. Its own scene stream ("aux") and its own LMDB, so no existing file
# changes. Sizes are constants, not WorldConfig fields: a new field would change world.json and the world record
# the shipped pretraining checkpoint carries.
AUX_STREAM = "aux"
AUX_SCENES = 200  # as the English dev split (valid)
AUX_QUESTIONS_PER_SCENE = 3
AUX_FEATURES = "features_aux.lmdb"


def auxiliary_questions(cfg: WorldConfig) -> list[dict]:
    return task_questions(cfg, AUX_STREAM, AUX_SCENES, AUX_QUESTIONS_PER_SCENE)


def _native_gqa(questions: list[dict], lang: str, lex: dict) -> dict:
    """xGQA's file format (GQA native, structural question types) of questions rendered in `lang`."""
    return {
        q["qid"]: {
            "question": render(q["sentence"], lang, lex),
            "imageId": q["image"],
            "answer": q["answer"],
            "types": {"structural": QTYPES[q["kind"]], "semantic": "attr", "detailed": q["kind"]},
        }
        for q in questions
    }


def add_auxiliary(world: Path) -> Path:
    """Write xGQA/annotations/few_shot/<lang>/dev.json in every language (exact translations: the same question
    ids, scenes and answers) and their region features in <world>/features_aux.lmdb; the scenes come from their
    own stream, so they are new images (not train/valid/test, not pretraining scenes). Idempotent: a world that
    already has features_aux.lmdb (written last) is left as it is. Returns the LMDB's path."""
    world = Path(world)
    if not (world / "world.json").is_file():
        raise SystemExit(f"error: {world}: no world.json (not a complete synthetic world)")
    lmdb_path = world / AUX_FEATURES
    if lmdb_path.exists():
        return lmdb_path
    cfg = load_config(world)
    lex = lexicons(cfg)
    questions = auxiliary_questions(cfg)
    for lang in LANGS:
        _dump_json(
            world / "datasets" / "xGQA" / "annotations" / "few_shot" / lang / "dev.json",
            _native_gqa(questions, lang, lex),
        )
    partial = world / (AUX_FEATURES + ".partial")
    if partial.exists():  # an interrupted earlier call
        for f in partial.iterdir():
            f.unlink()
    write_features(cfg, partial, streams=((AUX_STREAM, AUX_SCENES),))
    partial.rename(lmdb_path)
    return lmdb_path


# ---------------------------------------------------------------------------------------------- tokenizer


def all_words(lex: dict[str, dict[str, str]]) -> list[str]:
    words = set(SHARED)
    for table in lex.values():
        words |= set(table.values())
    return sorted(words)


def write_tokenizer(lex: dict[str, dict[str, str]], out_dir: Path):
    """Word-level tokenizer (tokenizers library) over every language, XLM-R's special ids, saved as a
    transformers tokenizer folder (tokenizer_check.load_tokenizer reads it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in all_words(lex):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fixtures.save_xlmr_style_tokenizer(tok, out_dir)
    return tokenizer_check.load_tokenizer(out_dir)


def model_config(vocab_size: int) -> dict:
    """train_uc2 config of the world's model (a --model-config json): 12 layers so SUF's schedule is the paper's."""
    # num_answers: the head as wide as the world's answer vocabulary, as IGLUE's is GQA's 1,842 (log, run r1: with
    # 1,842 outputs of which 14 are ever a target, 125 steps left every language at 0.00, English included)
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_layers": 12,
        "num_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "pooler_size": 64,
        "clf_hidden_size": 64,
        "num_answers": len(answer_vocabulary()),
    }


# ---------------------------------------------------------------------------------------------- main


def build_world(out: Path, cfg: WorldConfig = WorldConfig()) -> dict:
    """Write the whole world under `out`; returns {'lex', 'sets', 'tokenizer'}."""
    out = Path(out)
    if (out / "world.json").exists():
        raise SystemExit(f"error: {out} already holds a world (world.json); give another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    lex = lexicons(cfg)
    sets = write_task(cfg, out, lex)
    write_features(cfg, out / "features.lmdb")
    write_features(cfg, out / "features_blind.lmdb", blind=True)
    tok = write_tokenizer(lex, out / "tokenizer")
    _dump_json(out / "model_config.json", model_config(len(tok)))
    _dump_json(out / "lexicon.json", lex)
    _dump_json(out / "world.json", cfg.to_dict())  # last: its presence means the world is complete
    return {"lex": lex, "sets": sets, "tokenizer": tok}


def load_config(world: Path) -> WorldConfig:
    return WorldConfig(**json.loads((Path(world) / "world.json").read_text()))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="world folder to create (must not hold a world yet)")
    p.add_argument("--seed", type=int, default=0, help="world seed (codebooks, lexicons, task scenes)")
    p.add_argument(
        "--aux",
        action="store_true",
        help="add the auxiliary-language dev splits (XVL-MAML) to the world at --out, building it first if absent",
    )
    args = p.parse_args(argv)
    if not (args.aux and (Path(args.out) / "world.json").is_file()):
        build_world(Path(args.out), WorldConfig(seed=args.seed))
        print(f"world written to {args.out}")
    if args.aux:
        print(f"auxiliary dev splits and features written: {add_auxiliary(Path(args.out))}")


if __name__ == "__main__":
    main()
