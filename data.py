"""IGLUE data for UC2 (region features) and CCLM (images): annotations, datasets, transforms, text, batches.

Sections, in file order: annotation files; text; transforms; datasets; collate; model inputs.
Below it, in formats/: the safe readers of JSON and image files (readers.py), the feature stores (features.py),
tokenizer loading (tokenizer_check.py), X2-VLM's text cleaning (x2vlm_text.py) and RandAugment
(x2vlm_randaugment.py), the restricted unpickler (pickles.py), VOLTA's retrieval-negative sampling
(volta_negatives.py); in training/: the loader (loaders.BatchLoader). Above it, in checks/: the pre-flight checks
of the trainers and the data inventory (`python -m checks.inventory --data-root DIR`).

Annotations
  TASKS, Example                    task names; one uniform record per question / pair / caption
  select_langs(requested, available) parse `--langs` ("de,ko" / list / None = all) against what exists
  load_split(root, task, split, lang, translate_test=False) -> list[Example]   (the file: formats/iglue_layout.py)
  right_image(ex)                   a marvl pair's right image as an Example (image / image_file = the right one)
  load_answer_vocab(root) -> (ans2label, label2ans)   the 1,842 GQA answers
  XVNLI_LABELS_UC2 / XVNLI_LABELS_CCLM  class order of each model (VOLTA / X2-VLM)
Text
  encode_texts(tokenizer, texts, max_len) -> (ids, mask)   pad to longest, truncation keeps </s>
Transforms (X2-VLM's, for CCLM: uint8 pixels in batches, the model normalises)
  eval_pixels / train_pixels(img, res[, rng, flip]); normalize_images; eval_transform / train_transform (composed)
Datasets and batches (item i is always example i: stable order and ids, for sharded evaluation)
  UC2Dataset, SerializedGQADataset / SerializedNLVR2Dataset (IGLUE's serialized LMDBs), CCLMDataset   with set_epoch
  RetrievalImages, RetrievalCaptions   retrieval eval: each image / caption once; image item i is the image with
                                    index i (== Example.label of its captions)
  UC2Collate / CCLMCollate(task, tokenizer, train)   items -> contract batches (tokenising in the workers)
  Retrieval negatives: UC2 training items draw them as VOLTA's RetrievalDataset does (negatives="volta") or
  as VOLTA meant to ("corrected"; formats/volta_negatives.py); CCLM batches may hold two captions of one image:
  `idx` (image index) lets the loss treat them as positives, as X2-VLM does.
Model inputs (what a model reads beside text; no model-name branches anywhere else in this file)
  REGION_FEATURES (UC2) / IMAGES (CCLM): .dataset(task, examples, ...), .retrieval_eval(examples, ...),
  .collate(task, tokenizer, train); model_inputs("uc2" / "cclm"); make_dataset / make_retrieval_eval /
  make_collate(model, ...) the same, for callers that hold the model's name

Image folder layout expected by CCLM (`--images ROOT`; symlink your downloads into it):
  ROOT/gqa/<imageId>.jpg                         GQA images (images.zip), used by GQA/xGQA
  ROOT/flickr30k/<flickr id>.jpg                 Flickr30k images, used by XVNLI, Flickr30k, xFlickr&CO
  ROOT/coco/COCO_val2014_<12 digits>.jpg         COCO val2014, used by the COCO half of xFlickr&CO
  ROOT/nlvr2/{train/<directory>,dev,test1}/<identifier prefix>-img{0,1}.png   NLVR2 (marvl's English splits)
  ROOT/marvl/<lang>/images/<concept number>/<file>, ROOT/marvl_fewshot/<lang>/all/<file>   MaRVL (X2-VLM's layout)
(or pass images={"gqa": DIR, "flickr30k": DIR, "coco": DIR, ...} to the datasets).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from formats import iglue_layout, nlvr2_marvl, nlvr2_serialized, readers, split_checks, volta_negatives
from formats import tokenizer_check, x2vlm_randaugment, x2vlm_text
from formats import annotation_fields as fields
from formats.bad_input import BadInput
from formats.features import (
    FEATURE_DIM,
    SerializedGQA,
    as_reader,
    batch_regions,
    box_locations,
    is_serialized_lmdb,
    read_record,
    serialized_task,
)
from formats.pickles import read_pickle

TASKS = iglue_layout.TASKS  # the one task table: IGLUE's tasks, with their files' layout
BOS_ID, PAD_ID, EOS_ID, UNK_ID = tokenizer_check.XLMR_SPECIAL_IDS.values()
NUM_ANSWERS = 1842
XVNLI_LABELS_UC2 = ("contradiction", "neutral", "entailment")  # VOLTA LABEL_MAP order
XVNLI_LABELS_CCLM = ("contradiction", "entailment", "neutral")  # X2-VLM label_mapper order
XVNLI_NO_GOLD = "-"  # SNLI-style "no consensus" label present in the real files (VOLTA: zero target)
IMAGE_SUBDIRS = {"gqa": "gqa", "flickr30k": "flickr30k", "coco": "coco"}

# Max text lengths in tokens incl. <s>/</s> (None = no truncation), as each reference tokenises.
MAX_TEXT_LEN = {
    ("uc2", "xgqa", True): 40,
    ("uc2", "xgqa", False): 40,
    ("uc2", "xvnli", True): 80,
    ("uc2", "xvnli", False): 80,
    ("uc2", "xflickrco", True): 80,
    ("uc2", "xflickrco", False): 80,
    ("uc2", "marvl", True): 80,
    ("uc2", "marvl", False): 80,
    ("cclm", "xgqa", True): 40,
    ("cclm", "xgqa", False): None,
    ("cclm", "xvnli", True): 80,
    ("cclm", "xvnli", False): None,
    ("cclm", "xflickrco", True): 80,
    ("cclm", "xflickrco", False): 80,
    ("cclm", "marvl", True): None,  # X2-VLM's MARVL.py: tokenizer(text, padding="longest"), no truncation
    ("cclm", "marvl", False): None,
}
# X2-VLM word limits of pre_question / pre_caption.
CCLM_MAX_WORDS = {
    ("xgqa", True): 30,
    ("xgqa", False): 50,
    ("xvnli", True): 80,
    ("xvnli", False): 80,
    ("xflickrco", True): 80,
    ("xflickrco", False): 80,
    ("marvl", True): 30,  # X2-VLM's nlvr_dataset: max_words = 30
    ("marvl", False): 30,
}

# ----------------------------------------------------------------------------------------------
# Annotation files
# ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Example:
    """One question (xgqa), premise-image/hypothesis pair (xvnli), caption (xflickrco) or caption about an image
    pair (marvl: image / image_file the left image, image2 / image2_file the right one)."""

    task: str
    lang: str
    id: str  # question_id / pairID / "<image id>#<caption number>" / NLVR2 identifier, MaRVL id
    image: str  # region-feature key exactly as VOLTA looks it up
    image_file: str  # image path relative to the images root (see module docstring)
    text: str  # raw question / hypothesis (sentence2) / caption (NLVR2 sentence, MaRVL caption)
    label: int = -1  # xgqa: answer index (-1 = gold answer outside the 1,842); xvnli: index in
    # XVNLI_LABELS_UC2 (-1 for "-"); xflickrco: index of the image in the split; marvl: 1 true, 0 false
    gold: str = ""  # xgqa: gold answer string; xvnli: gold_label; marvl: "True" / "False"
    scores: dict = field(default_factory=dict)  # xgqa: {answer index: soft score} (in-vocabulary only)
    answers: dict = field(default_factory=dict)  # xgqa: {answer string: score} as in the file
    qtype: str = ""  # xgqa: types.structural (verify/query/choose/logical/compare) when given
    source: str = ""  # "<file>:<line>" or "<file> question <id>" for error messages
    image2: str = ""  # marvl: the right image's region-feature key ("" for one-image tasks)
    image2_file: str = ""  # marvl: the right image's file, relative to the images root


def select_langs(requested: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """`--langs` value ("de,ko", ["de", "ko"], "all" or None) -> languages, checked against `available`."""
    if requested is None or requested == "all" or requested == ["all"]:
        return list(available)
    wanted = [l for item in ([requested] if isinstance(requested, str) else requested) for l in item.split(",") if l]
    unknown = [l for l in wanted if l not in available]
    if unknown:
        raise ValueError(f"language(s) {', '.join(unknown)} not available; found: {', '.join(available) or 'none'}")
    return wanted


def _answer_scores(value, where: str) -> dict[str, float]:
    """GQA's training-format label {answer: score}: anything else (a list would become {'n': 'o'} through dict(),
    a string score a late float() error) is an error naming the item."""
    ok = isinstance(value, dict) and all(
        isinstance(a, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for a, v in value.items()
    )
    if not ok:
        raise ValueError(
            f"{where}: field 'label' must be an object of answer: score (number), got {json.dumps(value)[:60]}"
        )
    return {a: float(v) for a, v in value.items()}


def _require_known_labels(examples: list, path: Path, what: str) -> list:
    """A split none of whose labels is known (every answer outside the vocabulary, every gold label '-') would
    train on all-zero targets / score 0: wrong vocabulary or file."""
    if examples and all(ex.label < 0 for ex in examples):
        raise ValueError(
            f"{path}: none of the {len(examples)} examples has a known label ({what}); wrong file or answer vocabulary?"
        )
    return examples


def load_answer_vocab(data_root) -> tuple[dict[str, int], list[str]]:
    """GQA answer vocabulary (trainval_ans2label/label2ans .json, or VOLTA's .pkl) -> (ans2label, label2ans)."""
    folder = iglue_layout.dataset_dir(data_root) / "gqa" / "annotations"
    for ext, load in ((".json", readers.read_json), (".pkl", read_pickle)):
        a2l, l2a = folder / f"trainval_ans2label{ext}", folder / f"trainval_label2ans{ext}"
        if a2l.is_file() and l2a.is_file():
            ans2label, label2ans = load(a2l), load(l2a)
            if not isinstance(ans2label, dict) or not isinstance(label2ans, list):
                raise ValueError(f"{a2l} / {l2a}: expected a dict of answer -> index and a list of answers")
            bad = [
                a
                for a, i in ans2label.items()
                if not (type(i) is int and 0 <= i < len(label2ans) and label2ans[i] == a)
            ]
            if bad or len(ans2label) != len(label2ans):
                raise ValueError(f"{a2l} and {l2a} disagree (e.g. answer {bad[:1]}); re-download them")
            return dict(ans2label), list(label2ans)
    raise ValueError(
        f"answer vocabulary not found: expected {folder / 'trainval_ans2label.json'} and "
        f"{folder / 'trainval_label2ans.json'}"
    )


def _rel(path: Path, ds: Path) -> str:
    try:
        return str(path.relative_to(ds))
    except ValueError:
        return str(path)


def load_split(data_root, task: str, split: str, lang: str, translate_test: bool = False) -> list[Example]:
    """All examples of one annotation file, in file order."""
    ds = iglue_layout.dataset_dir(data_root)
    path = iglue_layout.split_file(ds, task, split, lang, translate_test)
    rel = _rel(path, ds)
    if task == "xgqa":
        exs = _require_known_labels(
            _load_gqa(path, rel, lang, ds), path, "every answer is outside the 1,842-answer vocabulary"
        )
    elif task == "xvnli":
        exs = _require_known_labels(_load_xvnli(path, rel, lang), path, "every gold_label is '-'")
    elif task == "marvl":
        exs = _load_pairs(path, rel, lang, few_shot=path.parent.parent.name == "few_shot")
    else:
        exs = _load_retrieval(path, rel, lang, xflickrco_keys=path.parent.parent.parent.name == "xFlickrCO")
    return split_checks.unique_ids(exs, path, task, split)  # a repeated id in a scored split: an error


def _load_gqa(path: Path, rel: str, lang: str, ds: Path) -> list[Example]:
    data = readers.read_json(path)
    ans2label, _ = load_answer_vocab(ds)
    out = []
    if isinstance(data, list):  # LXMERT/IGLUE training format: img_id, label {answer: score}, question_id, sent
        for i, q in enumerate(data):
            where = f"{path} item {i}"
            if not isinstance(q, dict):
                raise ValueError(f"{where}: expected an object, got {type(q).__name__}")
            answers = _answer_scores(fields.field(q, "label", where), where)
            gold = max(answers, key=answers.get) if answers else ""
            out.append(
                _gqa_example(
                    lang,
                    fields.ident(fields.field(q, "question_id", where), where, "question_id"),
                    fields.ident(fields.field(q, "img_id", where), where, "img_id"),
                    fields.text(fields.field(q, "sent", where), where, "sent"),
                    answers,
                    gold,
                    "",
                    f"{rel} item {i}",
                    ans2label,
                )
            )
    elif isinstance(data, dict):  # GQA native format: question_id -> {question, imageId, answer, types, ...}
        for qid, q in data.items():
            where = f"{path} question {qid}"
            if not isinstance(q, dict):
                raise ValueError(f"{where}: expected an object, got {type(q).__name__}")
            gold = fields.text(fields.field(q, "answer", where), where, "answer")
            qtype = (q.get("types") or {}).get("structural", "")
            out.append(
                _gqa_example(
                    lang,
                    str(qid),
                    fields.ident(fields.field(q, "imageId", where), where, "imageId"),
                    fields.text(fields.field(q, "question", where), where, "question"),
                    {gold: 1.0},
                    gold,
                    qtype,
                    f"{rel} question {qid}",
                    ans2label,
                )
            )
    else:
        raise ValueError(f"{path}: expected a JSON list (GQA training format) or dict (GQA native format)")
    return out


def _gqa_example(lang, qid, image_id, question, answers, gold, qtype, source, ans2label) -> Example:
    scores = {ans2label[a]: float(s) for a, s in answers.items() if a in ans2label}
    return Example(
        task="xgqa",
        lang=lang,
        id=qid,
        image=image_id,
        image_file=f"{IMAGE_SUBDIRS['gqa']}/{image_id}.jpg",
        text=str(question),
        label=ans2label.get(gold, -1),
        gold=gold,
        scores=scores,
        answers=answers,
        qtype=qtype,
        source=source,
    )


def _load_xvnli(path: Path, rel: str, lang: str) -> list[Example]:
    out = []
    for n, obj in readers.read_jsonl(path):
        where = f"{path}:{n}"
        gold = fields.field(obj, "gold_label", where)
        if gold not in XVNLI_LABELS_UC2 and gold != XVNLI_NO_GOLD:
            raise ValueError(f"{where}: unknown gold_label {gold!r} (expected entailment, neutral, contradiction or -)")
        flickr_id = fields.ident(fields.field(obj, "Flikr30kID", where), where, "Flikr30kID")
        try:
            key = str(int(flickr_id.split(".")[0]))  # VOLTA: int(Flikr30kID.split(".")[0])
        except ValueError:
            raise ValueError(f"{where}: Flikr30kID {flickr_id!r} is not a Flickr30k image number") from None
        out.append(
            Example(
                task="xvnli",
                lang=lang,
                id=fields.ident(fields.field(obj, "pairID", where), where, "pairID"),
                image=key,
                image_file=f"{IMAGE_SUBDIRS['flickr30k']}/{flickr_id}.jpg",
                text=fields.text(fields.field(obj, "sentence2", where), where, "sentence2"),
                label=XVNLI_LABELS_UC2.index(gold) if gold != XVNLI_NO_GOLD else -1,
                gold=gold,
                source=f"{rel}:{n}",
            )
        )
    return out


def _load_pairs(path: Path, rel: str, lang: str, few_shot: bool) -> list[Example]:
    """NLVR2 (nlvr2/annotations/*.jsonl) or MaRVL lines: formats/nlvr2_marvl.py reads each."""
    if path.parent.parent.name == "nlvr2":
        read = nlvr2_marvl.nlvr2_pair
    else:
        read = functools.partial(nlvr2_marvl.marvl_pair, few_shot=few_shot)
    return [
        Example("marvl", lang, source=f"{rel}:{n}", **read(obj, f"{path}:{n}")) for n, obj in readers.read_jsonl(path)
    ]


def right_image(ex: Example) -> Example:
    """A pair's right image as an Example (image / image_file the right one; its errors name the right image)."""
    return replace(ex, image=ex.image2, image_file=ex.image2_file, source=f"{ex.source} (right image)")


def _load_retrieval(path: Path, rel: str, lang: str, xflickrco_keys: bool) -> list[Example]:
    """One Example per caption; label = index of its image in the split (first-appearance order)."""
    out, image_index = [], {}
    for n, obj in readers.read_jsonl(path):
        where = f"{path}:{n}"
        img_path = fields.text(fields.field(obj, "img_path", where), where, "img_path")
        sentences = fields.field(obj, "sentences", where)
        if not isinstance(sentences, list):
            raise ValueError(f"{where}: 'sentences' must be a list of captions")
        image_id = fields.ident(fields.field(obj, "id", where), where, "id")
        if xflickrco_keys:  # xFlickr&CO features are keyed by img_path verbatim (IGLUE's boxes36 H5)
            key = img_path
            sub = IMAGE_SUBDIRS["coco"] if "COCO" in img_path else IMAGE_SUBDIRS["flickr30k"]
        else:  # Flickr30k: VOLTA uses int(img_path.split(".")[0])
            try:
                key = str(int(img_path.split(".")[0]))
            except ValueError:
                raise ValueError(f"{where}: img_path {img_path!r} is not a Flickr30k image number") from None
            sub = IMAGE_SUBDIRS["flickr30k"]
        if not sentences:  # no caption: nothing to retrieve it by (X2-VLM skips such a line too)
            continue
        idx = image_index.setdefault(key, len(image_index))
        for k, caption in enumerate(sentences):
            out.append(
                Example(
                    task="xflickrco",
                    lang=lang,
                    id=f"{image_id}#{k}",
                    image=key,
                    image_file=f"{sub}/{img_path}",
                    text=fields.text(caption, where, f"sentences[{k}]"),
                    label=idx,
                    source=f"{rel}:{n}",
                )
            )
    return out


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


def encode_texts(tokenizer, texts: Sequence[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] (L = longest in the batch, right-padded with the pad id) and attention mask [B, L].
    Sequences longer than max_len keep <s>, the first max_len-2 ids and </s> (VOLTA / HF truncation)."""
    # the tokenizer's public call: it also clears truncation/padding state an earlier call left in its backend
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"] if len(texts) else []
    if max_len is not None:
        ids = [x if len(x) <= max_len else x[: max_len - 1] + x[-1:] for x in ids]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    length = int(lengths.max()) if len(ids) else 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_ID
    # one vectorised fill instead of a tensor per row (the per-row loop cost as much as the tokenizer)
    mask = np.arange(length) < lengths[:, None]
    out = np.full((len(ids), length), pad, dtype=np.int64)
    out[mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(out), torch.from_numpy(mask.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Transforms (X2-VLM's, for CCLM's images; RandAugment itself: formats/x2vlm_randaugment.py)
# ----------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pixels(img: Image.Image) -> torch.Tensor:
    """uint8 [H, W, 3] of an RGB image (PIL's layout; normalize_images makes ToTensor's [3, H, W] floats)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
_STD = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., H, W, 3], as CCLM batches carry them, -> ToTensor + CLIP Normalize: float32
    [..., 3, H, W] with torchvision's float32 ops in its order (x / 255, - mean, / std), on the pixels' device.
    Float input is already normalised and returned as it is. Batches stay uint8 and in PIL's layout until the
    model (train_cclm.VisionEncoder) normalises them: the loader copies a quarter of the bytes, with plain
    memcpy, and the transpose and float work run on the accelerator."""
    if images.dtype != torch.uint8:
        return images
    x = images.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(255).sub_(_MEAN.to(x.device)).div_(_STD.to(x.device))


def eval_pixels(img: Image.Image, res: int) -> torch.Tensor:
    return pixels(img.resize((res, res), Image.Resampling.BICUBIC))


def eval_transform(img: Image.Image, res: int = 384) -> torch.Tensor:
    """X2-VLM test transform: Resize((res, res)) bicubic (PIL, antialiased), ToTensor, CLIP Normalize."""
    return normalize_images(eval_pixels(img, res))


def train_pixels(img: Image.Image, res: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    top, left, h, w = x2vlm_randaugment.random_resized_crop_box(rng, img.width, img.height)
    img = img.crop((left, top, left + w, top + h)).resize((res, res), Image.Resampling.BICUBIC)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pixels(x2vlm_randaugment.random_augment(img, rng))


def train_transform(img: Image.Image, res: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """X2-VLM train transform: RandomResizedCrop(res, scale (0.5, 1)) bicubic, horizontal flip p=0.5 when
    `flip` (XVNLI, xFlickr&CO; xGQA flips before, in the dataset), RandomAugment(2, 7), ToTensor, Normalize."""
    return normalize_images(train_pixels(img, res, rng, flip))


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """All dataset randomness: a generator seeded by (seed, epoch, index), never the global RNG."""
    return np.random.default_rng([seed, epoch, index])


def _read_regions(reader, ex: Example, max_regions: int, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    return read_record(reader, ex.image if key is None else key, ex, "kept_regions", max_regions)


class _EpochDataset(Dataset):
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


RETRIEVAL_NEGATIVES = ("volta", "corrected")  # how retrieval negatives are drawn: formats/volta_negatives.py


class UC2Dataset(_EpochDataset):
    """Region-feature examples. xgqa/xvnli items: one (text, image) pair. xflickrco training items: VOLTA's
    4 pairs per caption: (image, caption), (image, a "random" caption), (another image, caption),
    (image, a "hard" caption), drawn by one of RETRIEVAL_NEGATIVES: "volta" (default) draws them as VOLTA's
    RetrievalDataset does, quirks included, "corrected" as VOLTA meant to (formats/volta_negatives.py)."""

    def __init__(
        self,
        examples: Sequence[Example],
        features,
        task: str,
        *,
        train: bool = False,
        max_regions: int = 36,
        seed: int = 0,
        hard_negatives: dict | str | None = None,
        negatives: str = "volta",
    ):
        if not examples:
            raise ValueError(f"{task}: no examples")
        if negatives not in RETRIEVAL_NEGATIVES:
            raise ValueError(f"unknown retrieval negatives {negatives!r}; expected one of {RETRIEVAL_NEGATIVES}")
        self.examples, self.task, self.train = list(examples), task, train
        self.reader, self.max_regions, self.seed = as_reader(features), max_regions, seed
        self.negatives = negatives
        self.retrieval = (
            volta_negatives.RetrievalNegatives(self.examples, hard_negatives, negatives)
            if task == "xflickrco" and train
            else None
        )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        if self.retrieval is None:
            regions = _read_regions(self.reader, ex, self.max_regions)
            if self.task == "marvl":  # the pair's two images: [left, right]
                regions = [regions, _read_regions(self.reader, right_image(ex), self.max_regions)]
            return {
                "kind": "example",
                "example": ex,
                "text": ex.text,
                "max_regions": self.max_regions,
                "regions": regions,
            }
        negs = self.retrieval
        img = negs.image_of[index]
        if self.negatives == "volta":
            rngs = volta_negatives.volta_rngs(self.seed, self.epoch, index)
            _, cap_other, rand_img, _, cap_hard = negs.volta(*rngs, img)
        else:
            cap_other, rand_img, cap_hard = negs.corrected(_rng(self.seed, self.epoch, index), img)
        pos = _read_regions(self.reader, ex, self.max_regions)
        neg = _read_regions(self.reader, ex, self.max_regions, key=negs.image_keys[rand_img])
        other, hard = self.examples[cap_other], self.examples[cap_hard]
        return {
            "kind": "retrieval_train",
            "example": ex,
            "texts": [ex.text, other.text, ex.text, hard.text],
            "image_indices": [img, img, rand_img, img],
            "caption_images": [img, negs.image_of[cap_other], img, negs.image_of[cap_hard]],
            "caption_indices": [index, cap_other, index, cap_hard],
            "regions": [pos, pos, neg, pos],
            "max_regions": self.max_regions,
        }


class SerializedGQADataset(_EpochDataset):
    """UC2 GQA training/validation straight from IGLUE's per-question serialized LMDB (questions, answers
    and features all come from the records; no annotation file). Items match UC2Dataset's xgqa items.
    Images with more than max_regions boxes are truncated like the image-keyed path (VOLTA's serialized
    loader raises instead; IGLUE's files always have 36 = max_regions boxes)."""

    def __init__(self, path: str | os.PathLike, max_regions: int = 36, lang: str = "en"):
        self.db, self.max_regions, self.lang = SerializedGQA(path), max_regions, lang

    def __len__(self) -> int:
        return len(self.db)

    def __getitem__(self, index: int) -> dict:
        rec = self.db.record(index)
        entry = rec["entry"]
        scores = {int(l): float(s) for l, s in zip(entry["labels"], entry["scores"])}
        ex = Example(
            task="xgqa",
            lang=self.lang,
            id=str(entry["question_id"]),
            image=str(rec["img_id"]),
            image_file=f"{IMAGE_SUBDIRS['gqa']}/{rec['img_id']}.jpg",
            text=str(entry["question"]),
            label=max(scores, key=scores.get) if scores else -1,
            scores=scores,
            source=f"{self.db.path} record {rec['key']}",
        )
        n = min(len(rec["boxes"]), self.max_regions)
        feats = np.asarray(rec["features"], dtype=np.float32).reshape(-1, FEATURE_DIM)[:n]
        boxes = np.asarray(rec["boxes"], dtype=np.float32).reshape(-1, 4)[:n]
        return {
            "kind": "example",
            "example": ex,
            "text": ex.text,
            "max_regions": self.max_regions,
            "regions": (feats, box_locations(boxes, int(rec["img_w"]), int(rec["img_h"]))),
        }


class SerializedNLVR2Dataset(_EpochDataset):
    """UC2 marvl training / dev straight from IGLUE's serialized NLVR2 LMDB (formats/nlvr2_serialized.py): sentence,
    label and both images' features come from each record, as VOLTA's NLVR2Loader takes them (no annotation
    file). Items match UC2Dataset's marvl items; Example.image_file is "" (the record holds the features)."""

    def __init__(self, path: str | os.PathLike, max_regions: int = 36, lang: str = "en"):
        self.db, self.max_regions, self.lang = nlvr2_serialized.SerializedNLVR2(path), max_regions, lang
        self.db.check()  # a spread sample of records now, not mid-epoch (each record is checked when read too)

    def __len__(self) -> int:
        return len(self.db)

    def __getitem__(self, index: int) -> dict:
        p = self.db.pair(index, self.max_regions)
        source = f"{self.db.path} record {p['key']}"
        ex = Example("marvl", self.lang, p["id"], p["image"], "", p["text"], p["label"], p["gold"], source=source)
        ex.image2 = p["image2"]
        return {
            "kind": "example",
            "example": ex,
            "text": ex.text,
            "max_regions": self.max_regions,
            "regions": p["regions"],
        }


def _left_or_right_in(question: str, answers: Iterable[str]) -> bool:
    # X2-VLM's careful_hflip test: plain case-sensitive substring match on the raw question and answers
    return any("left" in s or "right" in s for s in [question, *answers])


class CCLMDataset(_EpochDataset):
    """Image examples for CCLM. Eval: reference test transform. Training: reference augmentation, seeded by
    (seed, epoch, index). XVNLI examples without a gold label ("-") are dropped, as X2-VLM's loader does."""

    def __init__(
        self,
        examples: Sequence[Example],
        images,
        task: str,
        *,
        train: bool = False,
        image_res: int = 384,
        seed: int = 0,
    ):
        self.examples = [ex for ex in examples if not (task == "xvnli" and ex.gold == XVNLI_NO_GOLD)]
        self.dropped = len(examples) - len(self.examples)
        if not self.examples:
            raise ValueError(f"{task}: no examples")
        self.images, self.task, self.train, self.image_res, self.seed = images, task, train, image_res, seed
        self.max_words = CCLM_MAX_WORDS[(task, train)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        img = readers.open_image(self.images, ex)
        img2 = readers.open_image(self.images, right_image(ex)) if self.task == "marvl" else None
        item = {"kind": "example", "example": ex}
        try:
            clean = x2vlm_text.pre_question if self.task == "xgqa" else x2vlm_text.pre_caption
            item["text"] = clean(ex.text, self.max_words)
        except ValueError as e:
            raise ValueError(f"{ex.source} (example {ex.id}): {e}") from None
        if not self.train:
            item["pixels"] = eval_pixels(img, self.image_res)  # uint8; the model normalises
            if img2 is not None:  # marvl: the right image, as the left
                item["pixels2"] = eval_pixels(img2, self.image_res)
            return item
        rng = _rng(self.seed, self.epoch, index)
        if self.task == "xgqa":
            # xGQA flips in the dataset (p=0.5) unless 'left'/'right' occurs in question or answers
            if rng.random() < 0.5 and not _left_or_right_in(ex.text, ex.answers):
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            answers = list(ex.answers)
            item["answers"], item["weights"] = answers, [1.0 / len(answers)] * len(answers)
        item["pixels"] = train_pixels(img, self.image_res, rng, flip=self.task != "xgqa")
        if img2 is not None:  # marvl: X2-VLM's nlvr_dataset transforms each image on its own (draws after the left)
            item["pixels2"] = train_pixels(img2, self.image_res, rng, flip=True)
        return item


def distinct_images(examples: Sequence[Example]) -> list[Example]:
    """First example of each image, in first-appearance order (its position == Example.label); a pair's right
    image (marvl) counts too, as right_image(ex)."""
    seen, out = set(), []
    for ex in itertools.chain.from_iterable((e, right_image(e)) if e.image2 else (e,) for e in examples):
        if ex.image not in seen:
            seen.add(ex.image)
            out.append(ex)
    return out


class RetrievalImages(Dataset):
    """Retrieval eval: each image of a split once, item i = image index i (Example.label of its captions).
    fields(example) -> the item's visual fields (a ModelInputs' image_fields: regions or pixels)."""

    def __init__(self, examples: Sequence[Example], fields: Callable[[Example], dict], image_res: int = 384):
        self.items, self.fields, self.image_res = distinct_images(examples), fields, image_res

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        ex = self.items[index]
        return {"kind": "image", "example": ex, "image_index": index, **self.fields(ex)}


class RetrievalCaptions(Dataset):
    """Retrieval eval: each caption once, with the index of its gold image; clean(text): the model's text
    cleaning (None: the raw caption)."""

    def __init__(self, examples: Sequence[Example], clean: Callable[[str], str] | None = None):
        self.examples, self.clean = list(examples), clean

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        text = ex.text
        if self.clean is not None:
            try:
                text = self.clean(text)
            except ValueError as e:
                raise ValueError(f"{ex.source} (example {ex.id}): {e}") from None
        return {"kind": "caption", "example": ex, "text": text, "image_index": ex.label}


def _without_empty_lines(examples: Sequence[Example]) -> list[Example]:
    """Examples of annotation lines with at least one non-empty caption; image indices (Example.label)
    renumbered in first-appearance order when a line was skipped."""
    keep = {ex.source for ex in examples if ex.text}
    kept = [ex for ex in examples if ex.source in keep]
    if len(kept) == len(examples):
        return list(examples)
    index: dict[str, int] = {}
    return [replace(ex, label=index.setdefault(ex.image, len(index))) for ex in kept]


# ----------------------------------------------------------------------------------------------
# Collate (runs in DataLoader workers: tokenising happens here)
# ----------------------------------------------------------------------------------------------


def _batch_lang(examples: Sequence[Example]) -> str:
    return ",".join(sorted({ex.lang for ex in examples}))


def _common(items) -> dict:
    """`id` (example ids; image keys for retrieval image batches) and `lang` ("de"; "de,ko" if mixed)."""
    exs = [it["example"] for it in items]
    ids = [ex.image for ex in exs] if items[0]["kind"] == "image" else [ex.id for ex in exs]
    return {"id": ids, "lang": _batch_lang(exs)}


def _xgqa_labels(exs: Sequence[Example], num_answers: int | None = None) -> dict:
    out = {"label": torch.tensor([ex.label for ex in exs], dtype=torch.long), "qtype": [ex.qtype for ex in exs]}
    if num_answers is not None:  # UC2 soft targets (all zero when no answer is in the vocabulary)
        out["target"] = torch.zeros(len(exs), num_answers, dtype=torch.float32)
        for i, ex in enumerate(exs):
            for a, s in ex.scores.items():
                out["target"][i, a] = s
    return out


def _item_images(items, key: str = "pixels") -> torch.Tensor:
    """uint8 [B, H, W, 3] (normalize_images turns them into the model's input)."""
    pixels = [it[key] for it in items]
    out = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.uint8)
    for row, p in zip(out, pixels):
        row.copy_(p)
    return out


def _item_regions(items) -> dict:
    return batch_regions([it["regions"] for it in items], items[0]["max_regions"], (len(items),))


class UC2Collate:
    """Items of UC2Dataset / Serialized*Dataset / RetrievalImages / RetrievalCaptions -> contract batch."""

    def __init__(
        self, task: str, tokenizer, train: bool = False, max_len: int | None = -1, num_answers: int = NUM_ANSWERS
    ):
        self.task, self.tokenizer, self.train, self.num_answers = task, tokenizer, train, num_answers
        self.max_len = MAX_TEXT_LEN[("uc2", task, train)] if max_len == -1 else max_len

    def __call__(self, items: list[dict]) -> dict:
        kind = items[0]["kind"]
        batch = _common(items)
        exs = [it["example"] for it in items]
        if kind == "image":
            batch.update(_item_regions(items))
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
            batch["image_key"] = [ex.image for ex in exs]
            return batch
        if kind == "retrieval_train":
            ids, mask = encode_texts(self.tokenizer, [t for it in items for t in it["texts"]], self.max_len)
            batch["input_ids"], batch["attention_mask"] = ids.view(len(items), 4, -1), mask.view(len(items), 4, -1)
            regions = [r for it in items for r in it["regions"]]
            batch.update(batch_regions(regions, items[0]["max_regions"], (len(items), 4)))  # [B, 4, ...]
            return batch
        batch["input_ids"], batch["attention_mask"] = encode_texts(
            self.tokenizer, [it["text"] for it in items], self.max_len
        )
        if kind == "caption":
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
            return batch
        if self.task == "marvl":  # VOLTA's process "nlvr": the caption with each image, grouped by pair
            batch["input_ids"] = batch["input_ids"][:, None].repeat(1, 2, 1)  # [B, 2, L]
            batch["attention_mask"] = batch["attention_mask"][:, None].repeat(1, 2, 1)
            regions = [r for it in items for r in it["regions"]]
            batch.update(batch_regions(regions, items[0]["max_regions"], (len(items), 2)))  # [B, 2, ...]
            batch["label"] = torch.tensor([ex.label for ex in exs], dtype=torch.long)
            batch["target"] = torch.nn.functional.one_hot(batch["label"], 2).float()  # VOLTA's target.scatter_
            return batch
        batch.update(_item_regions(items))
        if self.task == "xgqa":
            batch.update(_xgqa_labels(exs, self.num_answers))
        elif self.task == "xvnli":
            label = torch.tensor([ex.label for ex in exs], dtype=torch.long)
            target = torch.zeros(len(exs), 3, dtype=torch.float32)
            has = label >= 0
            target[has, label[has]] = 1.0  # "-" (label -1): all-zero target, as VOLTA
            batch["target"], batch["label"] = target, label
        return batch


class CCLMCollate:
    """Items of CCLMDataset / RetrievalImages / RetrievalCaptions -> contract batch."""

    def __init__(self, task: str, tokenizer, train: bool = False, max_len: int | None = -1):
        self.task, self.tokenizer, self.train = task, tokenizer, train
        self.max_len = MAX_TEXT_LEN[("cclm", task, train)] if max_len == -1 else max_len

    def __call__(self, items: list[dict]) -> dict:
        kind = items[0]["kind"]
        batch = _common(items)
        exs = [it["example"] for it in items]
        if kind == "image":
            batch["images"] = _item_images(items)
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
            batch["image_key"] = [ex.image for ex in exs]
            return batch
        batch["text_ids"], batch["text_atts"] = encode_texts(self.tokenizer, [it["text"] for it in items], self.max_len)
        if kind == "caption":
            batch["image_index"] = torch.tensor([it["image_index"] for it in items], dtype=torch.long)
            return batch
        batch["images"] = _item_images(items)
        if self.task == "marvl":  # [2B, ...]: all left images, then all right ones (X2-VLM's MARVL.py torch.cat)
            batch["images"] = torch.cat([batch["images"], _item_images(items, "pixels2")])
            batch["label"] = torch.tensor([ex.label for ex in exs], dtype=torch.long)
        elif self.task == "xgqa":
            if self.train:
                answers = [a for it in items for a in it["answers"]]
                batch["answer_ids"], batch["answer_atts"] = encode_texts(self.tokenizer, answers, None)
                batch["weights"] = torch.tensor([w for it in items for w in it["weights"]], dtype=torch.float32)
                batch["k"] = [len(it["answers"]) for it in items]
            else:
                batch.update(_xgqa_labels(exs))
        elif self.task == "xvnli":
            batch["label"] = torch.tensor([XVNLI_LABELS_CCLM.index(ex.gold) for ex in exs], dtype=torch.long)
        elif self.task == "xflickrco":
            batch["idx"] = torch.tensor([ex.label for ex in exs], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------
# Model inputs: what each model reads beside text, behind one interface
# ----------------------------------------------------------------------------------------------


class RegionFeatureInputs:
    """UC2 (VOLTA): region features (`features`: a path, reader or FeatureSet), VOLTA's text as it is in the file,
    UC2Dataset / SerializedGQADataset items, UC2Collate batches."""

    model = "uc2"

    def dataset(
        self,
        task: str,
        examples: Sequence[Example] | None,
        *,
        features=None,
        images=None,
        train: bool = False,
        max_regions: int = 36,
        image_res: int = 384,
        seed: int = 0,
        hard_negatives=None,
        negatives: str = "volta",
    ) -> Dataset:
        """UC2Dataset; with a serialized LMDB as `features` (IGLUE's GQA or NLVR2 training / dev files hold the
        questions or sentences too; `examples` is then ignored) a SerializedGQADataset / SerializedNLVR2Dataset."""
        if isinstance(features, (str, os.PathLike)) and is_serialized_lmdb(features):
            if (kind := serialized_task(features)) != task:
                raise BadInput(f"{features} is a serialized LMDB of {kind} records, not of {task}'s")
            serialized = SerializedGQADataset if task == "xgqa" else SerializedNLVR2Dataset
            return serialized(features, max_regions=max_regions)
        return UC2Dataset(
            examples,
            features,
            task,
            train=train,
            max_regions=max_regions,
            seed=seed,
            hard_negatives=hard_negatives,
            negatives=negatives,
        )

    def retrieval_eval(
        self, examples: Sequence[Example], *, features=None, images=None, max_regions: int = 36, image_res: int = 384
    ) -> tuple[RetrievalImages, RetrievalCaptions]:
        """Every image and caption of the split, an empty caption included (VOLTA scores it as <s></s>)."""
        fields = functools.partial(_region_fields, as_reader(features), max_regions)
        return RetrievalImages(examples, fields, image_res), RetrievalCaptions(examples)

    def collate(self, task: str, tokenizer, train: bool = False) -> UC2Collate:
        return UC2Collate(task, tokenizer, train)


class ImageInputs:
    """CCLM (X2-VLM): image files (`images`: the images root, see the module docstring), X2-VLM's text cleaning,
    CCLMDataset items, CCLMCollate batches."""

    model = "cclm"

    def dataset(
        self,
        task: str,
        examples: Sequence[Example] | None,
        *,
        features=None,
        images=None,
        train: bool = False,
        max_regions: int = 36,
        image_res: int = 384,
        seed: int = 0,
        hard_negatives=None,
        negatives: str = "volta",
    ) -> Dataset:
        return CCLMDataset(examples, images, task, train=train, image_res=image_res, seed=seed)

    def retrieval_eval(
        self, examples: Sequence[Example], *, features=None, images=None, max_regions: int = 36, image_res: int = 384
    ) -> tuple[RetrievalImages, RetrievalCaptions]:
        """An annotation line whose captions are all empty is skipped, as X2-VLM's xflickrco_eval_dataset does
        (IGLUE's de and id test files have one each: 1,999 images there)."""
        examples = _without_empty_lines(examples)
        clean = functools.partial(x2vlm_text.pre_caption, max_words=CCLM_MAX_WORDS[("xflickrco", False)])
        fields = functools.partial(_pixel_fields, images, image_res)
        return RetrievalImages(examples, fields, image_res), RetrievalCaptions(examples, clean)

    def collate(self, task: str, tokenizer, train: bool = False) -> CCLMCollate:
        return CCLMCollate(task, tokenizer, train)


def _region_fields(reader, max_regions: int, ex: Example) -> dict:
    return {"regions": _read_regions(reader, ex, max_regions), "max_regions": max_regions}


def _pixel_fields(images, image_res: int, ex: Example) -> dict:
    return {"pixels": eval_pixels(readers.open_image(images, ex), image_res)}  # uint8


REGION_FEATURES, IMAGES = RegionFeatureInputs(), ImageInputs()
MODEL_INPUTS = {inputs.model: inputs for inputs in (REGION_FEATURES, IMAGES)}


def model_inputs(model: str) -> RegionFeatureInputs | ImageInputs:
    """The inputs of a model by its name ("uc2" / "cclm"), for callers that hold only the name."""
    if model not in MODEL_INPUTS:
        raise ValueError(f"unknown model {model!r}; expected {' or '.join(MODEL_INPUTS)}")
    return MODEL_INPUTS[model]


def make_dataset(model: str, task: str, examples: Sequence[Example] | None, **kwargs) -> Dataset:
    """model_inputs(model).dataset(task, examples, **kwargs)."""
    return model_inputs(model).dataset(task, examples, **kwargs)


def make_retrieval_eval(model: str, examples: Sequence[Example], **kwargs) -> tuple[RetrievalImages, RetrievalCaptions]:
    """model_inputs(model).retrieval_eval(examples, **kwargs)."""
    return model_inputs(model).retrieval_eval(examples, **kwargs)


def make_collate(model: str, task: str, tokenizer, train: bool = False) -> UC2Collate | CCLMCollate:
    """model_inputs(model).collate(task, tokenizer, train)."""
    return model_inputs(model).collate(task, tokenizer, train)


if __name__ == "__main__":
    print(
        "data.py --data-root/--verify moved: python -m checks.inventory --data-root DIR [--verify] ...",
        file=sys.stderr,
    )
    sys.exit(2)
