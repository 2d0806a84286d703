"""A MaRVL-like two-image task in the synthetic world (issue 25 item 5), written where and how IGLUE stores
NLVR2 and MaRVL, so the real loaders, train_uc2.py --task marvl and eval_zeroshot.py read it unchanged:

  python -m synthetic.pairs --world synth_out/world     # adds the files below to a built world (idempotent)

  datasets/nlvr2/annotations/{train,dev,test}.jsonl          English (NLVR2 lines: identifier, sentence, label
                                                             "True"/"False", ...; images <identifier minus its
                                                             last part>-img0 / -img1; test = "test1-..." as test-P)
  datasets/nlvr2/annotations/dev-<lang>_gmt.jsonl            NLVR2 dev in every other world language (as IGLUE
                                                             ships dev-{id,sw,tr,zh}_gmt.jsonl)
  datasets/marvl/zero_shot/annotations/marvl-<lang>.jsonl    the test pairs in every world language but English
                                                             (MaRVL lines: concept, language, caption, left_img,
                                                             right_img, annotator_info, chapter, id, label bool)
  datasets/marvl/zero_shot/annotations_machine-translate/marvl-<lang>_gmt.jsonl   the same, caption in English
  datasets/marvl/few_shot/annotations/marvl-<lang>_train{1,2,4,10}.jsonl          few-shot: n sets of 4 pairs
  features_pairs.lmdb / features_pairs_blind.lmdb            region features of every image (IGLUE's LMDB
                                                             layout, keyed as VOLTA's nlvr2_dataset.py looks
                                                             them up: NLVR2 <..>-img0, MaRVL the file's stem)

The task (as NLVR2): a statement about a PAIR of scenes, true or false; every statement is written for a set of
four pairs, two where it holds and two where it does not (NLVR2's and MaRVL's sets), so the statement alone says
nothing: the text-only floor is exactly 0.5 on every file, in every language. Two kinds, drawn with equal odds:
  count   "there is 2 red object on the left and 0 red object on the right ." (left = the left image): true when
          both counts hold; a false pair has exactly one image (left or right, equal odds) with another count.
  colour  "the circle on the left is the colour of the square on the right .": the left image has the circle,
          the right the square; true when their colours agree.
Both images are needed: a classifier that sees the statement and ONE image (either one) is right at most
ONE_IMAGE_BOUND of the time (count 3/4: a wrong count on its side decides False, a right one leaves 2/3 True;
colour 1/2: each colour alone is uniform under both labels), in expectation 0.625 over the two kinds;
one_image_bound(file) gives the bound of a file from its kinds. The test statements of every language are exact
translations of the English ones (the same pairs, images and labels), so languages differ only in their words.

Written by add_pairs, never by build_world: a world without it is byte-identical to the one the study's runs and
the shipped fixtures were made from; sizes are PairsConfig's (pairs.json), not WorldConfig fields. Words: only
the world's vocabulary and the shared digits, so the world's tokenizer and pretrained checkpoints read it.

Off the reading path: the synthetic world's tooling (synthetic/README.md); nothing on the card imports it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from formats.features import FEATURE_DIM
from synthetic import world as W

KINDS = ("count", "colour")
COUNTS = (0, 1, 2)  # stated counts of one colour in one image (a scene holds 2-3 objects)
PAIRS_PER_SET = 4  # NLVR2 / MaRVL: one statement judged on four pairs
ONE_IMAGE_BOUND = {"count": 0.75, "colour": 0.5}  # the best accuracy of any (statement, one image) classifier
FEWSHOT_SETS = (1, 2, 4, 10)  # marvl-<lang>_train<n>.jsonl: n sets (IGLUE's train1 .. train10)
FEATURES = "features_pairs.lmdb"
FEATURES_BLIND = "features_pairs_blind.lmdb"
RECORD = "pairs.json"
NLVR2_PREFIX = {"train": "train", "dev": "dev", "test": "test1"}  # NLVR2's identifiers (test-P: test1-...)


@dataclass(frozen=True)
class PairsConfig:
    train_sets: int = 500  # 2,000 English training pairs
    dev_sets: int = 50
    test_sets: int = 75  # 300 test pairs per language
    version: str = "p1"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Statement:
    kind: str
    colour: int = -1  # count: the colour counted
    counts: tuple = ()  # count: (left, right) as stated
    shapes: tuple = ()  # colour: (shape in the left image, shape in the right image)

    def sentence(self) -> W.Sentence:
        """The statement in the world's grammar (render() gives it in any language)."""
        if self.kind == "count":
            c = W.COLOURS[self.colour]
            left = (W.np_(str(self.counts[0]), [c], "object"), "on", "the", "left")
            right = ("and", W.np_(str(self.counts[1]), [c], "object"), "on", "the", "right")
            return W.Sentence((("there", "is"), left, right), (2, 1, 0), ".")
        a, b = (W.SHAPES[s] for s in self.shapes)
        return W.Sentence(
            (
                (W.np_("the", [], a), "on", "the", "left"),
                ("is", "the", "colour", "of"),
                (W.np_("the", [], b), "on", "the", "right"),
            ),
            (2, 1, 0),
            ".",
        )

    def concept_word(self) -> str:
        """The English word a MaRVL-like concept is named after (MaRVL: "39-Panci")."""
        return W.COLOURS[self.colour] if self.kind == "count" else W.SHAPES[self.shapes[0]]


def count_of(scene: Sequence[W.Obj], colour: int) -> int:
    return sum(o.colour == colour for o in scene)


def colour_of(scene: Sequence[W.Obj], shape: int) -> int | None:
    return next((o.colour for o in scene if o.shape == shape), None)


def holds(st: Statement, left: Sequence[W.Obj], right: Sequence[W.Obj]) -> bool:
    """The statement's truth on a pair, from the scenes (the labels' definition)."""
    if st.kind == "count":
        return (count_of(left, st.colour), count_of(right, st.colour)) == tuple(st.counts)
    a, b = colour_of(left, st.shapes[0]), colour_of(right, st.shapes[1])
    return a is not None and a == b


def one_image_view(st: Statement, scene: Sequence[W.Obj], side: int):
    """What one image (side 0 left, 1 right) tells about the statement: all a one-image classifier can use."""
    if st.kind == "count":
        return count_of(scene, st.colour) == st.counts[side]
    return colour_of(scene, st.shapes[side])


def _scene(
    rng: np.random.Generator,
    cfg: W.WorldConfig,
    colour: int = -1,
    count: int = 0,
    shape: int = -1,
    shape_colour: int = -1,
):
    """A scene of the world's sizes with exactly `count` objects of `colour` (colour >= 0), or holding `shape` in
    `shape_colour` (shape >= 0); the rest drawn as sample_scene draws them."""
    n = int(rng.integers(max(cfg.min_objects, count), cfg.max_objects + 1))
    shapes = [int(s) for s in rng.choice(len(W.SHAPES), n, replace=False)]
    if shape >= 0 and shape not in shapes:
        shapes[int(rng.integers(n))] = shape
    slots = [int(p) for p in rng.choice(len(W.SLOTS), n, replace=False)]
    colours = [int(rng.integers(len(W.COLOURS))) for _ in range(n)]
    if colour >= 0:
        chosen = set(int(i) for i in rng.choice(n, count, replace=False))
        others = [c for c in range(len(W.COLOURS)) if c != colour]
        colours = [colour if i in chosen else others[int(rng.integers(len(others)))] for i in range(n)]
    if shape >= 0:
        colours[shapes.index(shape)] = shape_colour
    sizes = [int(rng.integers(len(W.SIZES))) for _ in range(n)]
    objs = [W.Obj(s, c, z, p) for s, c, z, p in zip(shapes, colours, sizes, slots)]
    return sorted(objs, key=lambda o: o.slot)


def sample_set(cfg: W.WorldConfig, stream: str, index: int) -> tuple[Statement, list[tuple[list, list, bool]]]:
    """One set: a statement and its four (left scene, right scene, label) pairs, two true and two false in a
    drawn order; a function of (world seed, stream, index) only."""
    rng = W.scene_rng(cfg, f"pairs-{stream}", index)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    labels = [bool(x) for x in rng.permutation([1, 1, 0, 0])]
    pairs = []
    if kind == "count":
        st = Statement(
            "count", colour=int(rng.integers(len(W.COLOURS))), counts=tuple(int(rng.choice(COUNTS)) for _ in range(2))
        )
        for label in labels:
            counts = list(st.counts)
            if not label:  # exactly one image has another count
                side = int(rng.integers(2))
                counts[side] = int(rng.choice([c for c in COUNTS if c != counts[side]]))
            left, right = (_scene(rng, cfg, colour=st.colour, count=c) for c in counts)
            pairs.append((left, right, label))
    else:
        st = Statement("colour", shapes=tuple(int(rng.integers(len(W.SHAPES))) for _ in range(2)))
        for label in labels:
            a = int(rng.integers(len(W.COLOURS)))
            b = a if label else int(rng.choice([c for c in range(len(W.COLOURS)) if c != a]))
            left = _scene(rng, cfg, shape=st.shapes[0], shape_colour=a)
            right = _scene(rng, cfg, shape=st.shapes[1], shape_colour=b)
            pairs.append((left, right, label))
    return st, pairs


def streams(pcfg: PairsConfig) -> dict[str, int]:
    return {"train": pcfg.train_sets, "dev": pcfg.dev_sets, "test": pcfg.test_sets, "fewshot": max(FEWSHOT_SETS)}


def sets_of(cfg: W.WorldConfig, stream: str, n: int) -> list[tuple[Statement, list]]:
    return [sample_set(cfg, stream, i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- file lines


def nlvr2_lines(sets: list, split: str, lang: str, lex: dict) -> list[dict]:
    """NLVR2's line format (every key of the real file); identifier <split>-<set>-<pair>-0, the images
    <split>-<set>-<pair>-img0 / -img1 (VOLTA's nlvr2_dataset: the identifier minus its last part)."""
    prefix, out = NLVR2_PREFIX[split], []
    for s, (st, pairs) in enumerate(sets):
        for p, (_, _, label) in enumerate(pairs):
            base = f"{prefix}-{s}-{p}"
            out.append(
                {
                    "validation": {"synth": str(label)},
                    "sentence": W.render(st.sentence(), lang, lex),
                    "left_url": f"synthetic://{base}-img0.png",
                    "writer": "synth",
                    "label": str(label),  # "True" / "False", as NLVR2
                    "right_url": f"synthetic://{base}-img1.png",
                    "synset": st.kind,
                    "query": f"{st.kind}{s}",
                    "identifier": f"{base}-0",
                    "extra_validations": {},
                }
            )
    return out


def marvl_image(s: int, p: int, side: int, fewshot: bool) -> str:
    """MaRVL's image names: zero-shot "<set>-<k>.jpg", few-shot "<concept>/<set>-n-<k>.jpg" (k = 2 pair + side)."""
    return f"{s}-n-{2 * p + side}.jpg" if fewshot else f"{s}-{2 * p + side}.jpg"


def image_key(name: str) -> str:
    """The feature key of a MaRVL image (VOLTA: the file name's stem)."""
    return name.split("/")[-1].split(".")[0]


def marvl_lines(sets: list, lang: str, lex: dict, caption_lang: str | None = None, fewshot: bool = False) -> list[dict]:
    """MaRVL's line format (every key of the real file): caption in caption_lang (default lang; "en" for the
    machine-translated files, whose `language` stays lang as IGLUE's do), label a JSON boolean."""
    out = []
    for s, (st, pairs) in enumerate(sets):
        concept = f"{s}-{lex[lang][st.concept_word()]}"
        for p, (_, _, label) in enumerate(pairs):
            left, right = (marvl_image(s, p, side, fewshot) for side in (0, 1))
            if fewshot:
                left, right = f"{concept}/{left}", f"{concept}/{right}"
            out.append(
                {
                    "concept": concept,
                    "language": lang,
                    "caption": W.render(st.sentence(), caption_lang or lang, lex),
                    "left_img": left,
                    "right_img": right,
                    "annotator_info": {
                        "annotator_id": f"{lang}_01",
                        "country_of_birth": "synthetic",
                        "country_of_residence": "synthetic",
                        "gender": "none",
                        "age": 0,
                    },
                    "chapter": st.kind,
                    "id": f"{lang}-{len(out)}",
                    "label": label,
                }
            )
    return out


def _dump_jsonl(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- features


def images(cfg: W.WorldConfig, pcfg: PairsConfig) -> list[tuple[str, list, np.random.Generator]]:
    """(feature key, scene, feature generator) of every image of the task: NLVR2 train/dev/test, MaRVL test
    (the NLVR2 test pairs under MaRVL's names: the same features) and few-shot."""
    out = []
    for stream, n in streams(pcfg).items():
        for s, (_, pairs) in enumerate(sets_of(cfg, stream, n)):
            for p, pair in enumerate(pairs):
                for side in (0, 1):
                    keys = (
                        [image_key(marvl_image(s, p, side, True))]
                        if stream == "fewshot"
                        else [f"{NLVR2_PREFIX[stream]}-{s}-{p}-img{side}"]
                    )
                    if stream == "test":  # MaRVL's names of the same images: the same features
                        keys.append(image_key(marvl_image(s, p, side, False)))
                    for key in keys:
                        rng = np.random.default_rng([cfg.seed, 17, zlib.crc32(stream.encode()), s, p, side])
                        out.append((key, pair[side], rng))
    return out


def write_features(cfg: W.WorldConfig, pcfg: PairsConfig, path: Path, blind: bool = False) -> Path:
    """IGLUE's h5_to_lmdb.py layout, as world.write_features (blind: every region zero, boxes kept)."""
    import lmdb

    books = W.codebooks(cfg)
    items = images(cfg, pcfg)
    path.mkdir(parents=True, exist_ok=True)
    per_image = cfg.max_objects * (FEATURE_DIM * 4 + 64) + 2048
    env = lmdb.open(str(path), map_size=2 * per_image * len(items) + (1 << 22))
    with env.begin(write=True) as txn:
        for key, scene, rng in items:
            feats, boxes = W.scene_regions(scene, books, rng, cfg.noise)
            item = {
                "features": np.zeros_like(feats) if blind else feats,
                "boxes": boxes,
                "img_w": np.int64(W.IMG_W),
                "img_h": np.int64(W.IMG_H),
                "num_boxes": np.int64(len(scene)),
                "img_id": key,
                "obj_id": np.array([o.shape for o in scene], dtype=np.int64),
            }
            txn.put(key.encode(), pickle.dumps(item, protocol=4))
        txn.put(b"keys", pickle.dumps([k.encode() for k, _, _ in items], protocol=4))
    env.close()
    return path


# ---------------------------------------------------------------------------------------------- images
# For CCLM, which reads pixels: each scene drawn (its objects' shapes in their colours and sizes, at their slots),
# saved where formats/nlvr2_marvl.py looks for the files of a line under an images root (<world>/images):
# nlvr2/<split>/<prefix>-img<k>.png, marvl/<lang>/images/<set>/<left_img>, marvl_fewshot/<lang>/all/<name>.
RGB = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 170, 50),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
IMAGES = "images"


def draw_scene(scene: Sequence[W.Obj], width: int = 96):
    """The scene as a PIL image width x (2/3 width): grey ground, each object in its slot's third."""
    from PIL import Image, ImageDraw

    h = width * W.IMG_H // W.IMG_W
    img = Image.new("RGB", (width, h), (128, 128, 128))
    d = ImageDraw.Draw(img)
    for o in scene:
        cx, cy = (o.slot + 0.5) * width / 3, h / 2
        r = width / 3 * (0.18 if o.size == 0 else 0.4)
        fill, shape = RGB[W.COLOURS[o.colour]], W.SHAPES[o.shape]
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif shape == "star":
            d.regular_polygon((cx, cy, r), 5, fill=fill)
            d.regular_polygon((cx, cy, r), 5, rotation=36, fill=fill)
        elif shape == "cross":
            d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=fill)
            d.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=fill)
        else:  # heart
            d.ellipse((cx - r, cy - r, cx, cy), fill=fill)
            d.ellipse((cx, cy - r, cx + r, cy), fill=fill)
            d.polygon([(cx - r, cy - r / 2), (cx + r, cy - r / 2), (cx, cy + r)], fill=fill)
    return img


def image_files(cfg: W.WorldConfig, pcfg: PairsConfig) -> list[tuple[str, list]]:
    """(path under the images root, scene) of every image file of the task, per language for MaRVL."""
    out = []
    for stream, n in streams(pcfg).items():
        for s, (_, pairs) in enumerate(sets_of(cfg, stream, n)):
            for p, pair in enumerate(pairs):
                for side in (0, 1):
                    if stream != "fewshot":
                        prefix = NLVR2_PREFIX[stream]
                        out.append((f"nlvr2/{prefix}/{prefix}-{s}-{p}-img{side}.png", pair[side]))
                    for lang in (x for x in W.LANGS if x != "en"):
                        if stream == "test":
                            out.append((f"marvl/{lang}/images/{s}/{marvl_image(s, p, side, False)}", pair[side]))
                        if stream == "fewshot":
                            out.append((f"marvl_fewshot/{lang}/all/{marvl_image(s, p, side, True)}", pair[side]))
    return out


def add_images(world: Path, pcfg: PairsConfig | None = None, width: int = 96) -> Path:
    """Draw every image of the two-image task under <world>/images (CCLM's --images root); idempotent (the folder
    is renamed into place when complete). Returns the images root."""
    world = Path(world)
    root = world / IMAGES
    if root.is_dir():
        return root
    if not (world / RECORD).is_file():
        raise SystemExit(f"error: {world}: no {RECORD} (add the two-image task first: python -m synthetic.pairs)")
    pcfg = pcfg or PairsConfig(**{k: v for k, v in json.loads((world / RECORD).read_text())["config"].items()})
    partial = world / (IMAGES + ".partial")
    for rel, scene in image_files(W.load_config(world), pcfg):
        path = partial / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_scene(scene, width).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    partial.rename(root)
    return root


# ---------------------------------------------------------------------------------------------- the task files


def one_image_bound(lines: list[dict], kind_key: str) -> float:
    """The most any (statement, one image) classifier can score on these lines: ONE_IMAGE_BOUND per kind, weighted
    by the kinds' shares (kind_key: "synset" for NLVR2 lines, "chapter" for MaRVL lines)."""
    return sum(ONE_IMAGE_BOUND[x[kind_key]] for x in lines) / len(lines)


def text_only_floor(lines: list[dict], text_key: str, label_key: str = "label") -> float:
    """The most any text-only classifier can score on these lines: per distinct statement, its majority label."""
    by_text: dict[str, list] = {}
    for x in lines:
        by_text.setdefault(x[text_key], []).append(str(x[label_key]))
    return sum(max(v.count("True"), v.count("False")) for v in by_text.values()) / len(lines)


def add_pairs(world: Path, pcfg: PairsConfig = PairsConfig()) -> dict:
    """Write the two-image task into a built world (the files in the module's docstring). Idempotent: a world that
    already has features_pairs_blind.lmdb (written last) is left as it is. Returns the record written to
    pairs.json: the config, sizes, and per file the text-only floor and the one-image bound."""
    world = Path(world)
    if not (world / "world.json").is_file():
        raise SystemExit(f"error: {world}: no world.json (not a complete synthetic world)")
    if (world / FEATURES_BLIND).exists():
        return json.loads((world / RECORD).read_text())
    cfg, lex = W.load_config(world), json.loads((world / "lexicon.json").read_text())
    ds = world / "datasets"
    nl, zs, fs = ds / "nlvr2" / "annotations", ds / "marvl" / "zero_shot", ds / "marvl" / "few_shot" / "annotations"
    sets = {stream: sets_of(cfg, stream, n) for stream, n in streams(pcfg).items()}
    record = {"config": pcfg.to_dict(), "files": {}}

    def note(rel: str, lines: list[dict], text_key: str, kind_key: str) -> None:
        record["files"][rel] = {
            "lines": len(lines),
            "true": sum(str(x["label"]) == "True" for x in lines),
            "text_only_floor": text_only_floor(lines, text_key),
            "one_image_bound": one_image_bound(lines, kind_key),
        }

    others = [lang for lang in W.LANGS if lang != "en"]
    for split in ("train", "dev", "test"):
        lines = nlvr2_lines(sets[split], split, "en", lex)
        _dump_jsonl(nl / f"{split}.jsonl", lines)
        note(f"nlvr2/{split}.jsonl", lines, "sentence", "synset")
    for lang in others:
        lines = nlvr2_lines(sets["dev"], "dev", lang, lex)
        _dump_jsonl(nl / f"dev-{lang}_gmt.jsonl", lines)
        note(f"nlvr2/dev-{lang}_gmt.jsonl", lines, "sentence", "synset")
        lines = marvl_lines(sets["test"], lang, lex)
        _dump_jsonl(zs / "annotations" / f"marvl-{lang}.jsonl", lines)
        note(f"marvl/marvl-{lang}.jsonl", lines, "caption", "chapter")
        _dump_jsonl(
            zs / "annotations_machine-translate" / f"marvl-{lang}_gmt.jsonl", marvl_lines(sets["test"], lang, lex, "en")
        )
        for n in FEWSHOT_SETS:
            _dump_jsonl(fs / f"marvl-{lang}_train{n}.jsonl", marvl_lines(sets["fewshot"][:n], lang, lex, fewshot=True))
    W._dump_json(world / RECORD, record)
    write_features(cfg, pcfg, world / FEATURES)
    write_features(cfg, pcfg, world / FEATURES_BLIND, blind=True)  # last: its presence means the task is complete
    return record


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="a world built by python -m synthetic.world")
    p.add_argument("--images", action="store_true", help="also draw every image under <world>/images (for CCLM)")
    args = p.parse_args(argv)
    record = add_pairs(Path(args.world))
    if args.images:
        print(f"images drawn under {add_images(Path(args.world))}")
    for rel, r in record["files"].items():
        print(
            f"{rel}: {r['lines']} pairs, {r['true']} true, text-only floor {r['text_only_floor']:.3f}, "
            f"one-image bound {r['one_image_bound']:.3f}"
        )


if __name__ == "__main__":
    main()
