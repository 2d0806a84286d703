"""The evaluation driver the trainers run after every epoch (trainer_evaluate_fn -> evaluate_task) and
eval_zeroshot.py runs from its command line: test sets per language (data.py), each rank runs its shard, gather
assembles, the metrics of scoring/metrics.py. A model answers through its own methods: predict(batch) (xgqa,
xvnli), retrieval_scores(...) (xflickrco). Below the reading path: the loop in engine.py only calls evaluate_fn."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

import data
from training import loaders
from checks import preflight
from console import cli
from formats import feature_sets, iglue_layout
from formats.bad_input import BadInput
from training import after_epoch, devices
from scoring import metrics


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The task model behind a DDP (or similar) wrapper: predict/retrieval_scores live there."""
    return getattr(model, "module", model)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device | str, amp: str = "off"):
    """Evaluation precision: float32 unless asked (--amp bf16|fp16; our choice: exact numbers by default)."""
    return devices.autocast(torch.device(device), AMP_DTYPES[amp])


def pad_cat(tensors: Sequence[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Concatenate along dim 0, right-padding dim 1 to the longest (text lengths differ by batch/rank)."""
    if tensors and tensors[0].dim() >= 2:
        width = max(t.shape[1] for t in tensors)
        tensors = [F.pad(t, [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]], value=value) for t in tensors]
    return torch.cat(list(tensors), 0)


@torch.no_grad()
def predict_records(model: torch.nn.Module, batches: Iterable[dict], device, amp: str = "off") -> list[tuple]:
    """(id, predicted index, gold label, question type or "") for every example in `batches`."""
    records = []
    for batch in batches:
        with autocast_for(device, amp):
            pred = model.predict(devices.to_device(batch, device)).cpu().tolist()
        labels = batch["label"].tolist()
        qtypes = batch.get("qtype") or [""] * len(labels)
        records += [(str(i), int(p), int(l), str(q)) for i, p, l, q in zip(batch["id"], pred, labels, qtypes)]
    return records


# ---------------------------------------------------------------------------------------------
# Evaluation sets (data.py) and evaluate_task (the trainers' per-epoch evaluate_fn)


@dataclass
class EvalSet:
    """One language's test data: `dataset` (xgqa/xvnli) or `images` + `captions` (xflickrco)."""

    lang: str
    split: str
    translate_test: bool
    collate: Callable
    dataset: Any = None
    images: Any = None
    captions: Any = None
    source: str = ""
    examples: Sequence = ()  # the annotations read (preflight.check_inputs)


def eval_langs(data_root, task: str, split: str = "test", langs=None, translate_test: bool = False) -> list[str]:
    """Languages of (task, split) found under data_root (`langs` selects). With translate_test the
    English test set is the original one (IGLUE's .mt results keep the English column)."""
    found = set(iglue_layout.available_langs(data_root, task, split, translate_test))
    if translate_test:
        found = (found - {"en"}) | ({"en"} & set(iglue_layout.available_langs(data_root, task, split)))
    if not found:
        splits = ", ".join(iglue_layout.available_splits(data_root, task, translate_test)) or "none"
        raise ValueError(
            f"{task}: no {'translate-test ' if translate_test else ''}{split!r} files under "
            f"{data_root}; splits found: {splits}"
        )
    return metrics.ordered_langs(data.select_langs(langs, metrics.ordered_langs(found)))


def build_eval_sets(
    model_name: str,
    task: str,
    data_root,
    tokenizer,
    langs=None,
    split: str = "test",
    translate_test: bool = False,
    features=None,
    images=None,
    max_regions: int = 36,
    image_res: int = 384,
    dev_lmdb=None,
) -> dict[str, EvalSet]:
    """{lang: EvalSet} for every language of (task, split) under data_root (or `langs`). features: the
    image-keyed region-feature reader UC2 reads the test images from (a path or train_uc2.FeatureSet).
    dev_lmdb (UC2 marvl, split dev; xgqa, split valid): IGLUE's serialized NLVR2 dev / GQA validation file, English
    dev / valid itself (serialized_dev_set)."""
    collate = data.make_collate(model_name, task, tokenizer, train=False)
    sets = {}
    if dev_lmdb is not None:
        chosen = serialized_dev_langs(dev_lmdb, data_root, task, split, langs)
    else:
        chosen = eval_langs(data_root, task, split, langs, translate_test)
    for lang in chosen:
        mt = translate_test and lang != "en"
        if dev_lmdb is not None and lang == "en":
            sets[lang] = serialized_dev_set(dev_lmdb, task, collate, max_regions)
            continue
        if model_name == "uc2" and features is None:
            raise ValueError(
                f"{task} {split} {lang}: UC2 reads its images' region features from image-keyed --features, and none "
                "were given (a trainer runs without evaluating with --no-eval)"
            )
        examples = data.load_split(data_root, task, split, lang, translate_test=mt)
        source = str(iglue_layout.split_file(data_root, task, split, lang, translate_test=mt))
        if task == "xflickrco":
            imgs, caps = data.make_retrieval_eval(
                model_name, examples, features=features, images=images, max_regions=max_regions, image_res=image_res
            )
            sets[lang] = EvalSet(lang, split, mt, collate, images=imgs, captions=caps, source=source, examples=examples)
        else:
            ds = data.make_dataset(
                model_name,
                task,
                examples,
                features=features,
                images=images,
                train=False,
                max_regions=max_regions,
                image_res=image_res,
            )
            sets[lang] = EvalSet(lang, split, mt, collate, dataset=ds, source=source, examples=examples)
    return sets


def serialized_dev_set(path, task: str, collate: Callable, max_regions: int) -> EvalSet:
    """English dev (IGLUE's val_split: NLVR2 dev, GQA val) from IGLUE's serialized NLVR2 dev / GQA validation LMDB, as
    VOLTA validates: ids, texts, labels and the images' features from the records (data.SerializedNLVR2Dataset /
    SerializedGQADataset), no annotation file. `examples` stays empty: no annotation's feature keys to check (the
    records themselves are checked, check_serialized_set)."""
    ds = data.make_dataset("uc2", task, None, max_regions=max_regions, features=str(path))
    return EvalSet("en", feature_sets.SERIALIZED_DEV[task].split, False, collate, dataset=ds, source=str(path))


def serialized_dev_langs(path, data_root, task: str, split: str, langs) -> list[str]:
    """The languages beside a serialized English dev file: en (the file) and the other languages of the split under
    data_root (marvl: NLVR2 dev machine-translated, `dev-<lang>_gmt.jsonl`, image-keyed) that `langs` selects."""
    dev_of = feature_sets.SERIALIZED_DEV.get(task)
    if dev_of is None or split != dev_of.split:
        which = f"a serialized {dev_of.data} {dev_of.noun} file" if dev_of else "a serialized dev file"
        how = f"--task {task} --eval-split {dev_of.split}" if dev_of else "--task marvl --eval-split dev"
        raise ValueError(f"{path}: {which} is evaluated with {how}, not {task} {split}")
    try:
        found = set(iglue_layout.available_langs(data_root, task, split)) | {"en"}
    except ValueError:  # no datasets/ folder under data_root: the serialized file is the whole dev set
        found = {"en"}
    chosen = metrics.ordered_langs(data.select_langs(langs, metrics.ordered_langs(found)))
    if "en" not in chosen:
        raise ValueError(f"{path}: a serialized {dev_of.data} {dev_of.noun} file is English, but --langs leaves en out")
    return chosen


def check_serialized_set(dataset) -> None:
    """Every record of a serialized dev set decoded now (a bad one stops the run before training, not after its first
    epoch): NLVR2's checks (nlvr2_serialized.check), GQA's items read; a GQA record lacking a field is one line."""
    if isinstance(dataset, data.SerializedNLVR2Dataset):
        return dataset.db.check(sample=None)
    for i in range(len(dataset)):
        try:
            dataset[i]
        except BadInput:
            raise
        except (KeyError, TypeError, ValueError) as e:  # a missing field, a field of the wrong kind or shape
            key = dataset.db.keys()[i].decode(errors="replace")
            detail = (str(e).strip().splitlines() or [""])[0][:160]
            raise BadInput(
                f"{dataset.db.path}: record {key!r}: not a GQA question record ({type(e).__name__} {detail})"
            )


def serialized_dev_file(task: str, split: str, paths) -> str | None:
    """eval_zeroshot: the serialized dev file among a run's --features (serialized_roles, training file optional)
    English `split` is read from; None for a split it does not hold (a test split is read image-keyed)."""
    dev_of = feature_sets.SERIALIZED_DEV.get(task)
    if dev_of is None or split != dev_of.split or not paths:
        return None
    return feature_sets.serialized_roles(task, feature_sets.split_features(list(paths))[0], training=False)[1]


def set_examples(sets: dict[str, EvalSet]) -> dict[str, Sequence]:
    """{lang: the examples evaluated} for the predictions files: the annotations read, a serialized set's records."""
    return {l: s.examples or [s.dataset[i]["example"] for i in range(len(s.dataset or ()))] for l, s in sets.items()}


def trainer_evaluate_fn(
    model_name: str,
    args: argparse.Namespace,
    tokenizer,
    dist,
    *,
    features=None,
    images=None,
    max_regions: int = 36,
    image_res: int = 384,
    pair_batch: int = 1024,
    serialized: Sequence[str] = (),
) -> Callable:
    """The trainers' per-epoch evaluate_fn(model, epoch) -> {lang: metrics}: evaluate_task on --eval-split of
    --langs, sharded over ranks. Every feature key / image file is checked now (ValueError): a missing
    one stops the run before training, not after its first epoch. serialized: UC2's serialized LMDBs from
    --features; a dev file among them (feature_sets.serialized_roles) is English dev, every record decoded now."""
    dev_lmdb = feature_sets.serialized_roles(args.task, list(serialized))[1]
    sets = build_eval_sets(
        model_name,
        args.task,
        args.data_root,
        tokenizer,
        langs=args.langs,
        split=args.eval_split,
        features=features,
        images=images,
        max_regions=max_regions,
        image_res=image_res,
        dev_lmdb=dev_lmdb,
    )
    if dev_lmdb is not None:
        check_serialized_set(sets["en"].dataset)
    for s in sets.values():
        preflight.check_inputs(s.examples, features=features, images=images)
    # every evaluation image decoded once (languages share them): a corrupt one stops the run now, not after epoch 1
    preflight.check_inputs(
        [ex for s in sets.values() for ex in s.examples], features=features, images=images, sample=None
    )
    unknown = [lang for lang in getattr(args, "eval_langs", None) or [] if lang not in sets]
    if unknown:
        raise ValueError(
            f"--eval-langs {' '.join(unknown)}: not among the evaluated languages "
            f"({' '.join(metrics.ordered_langs(sets))}; see --langs)"
        )

    def evaluate_fn(model: torch.nn.Module, epoch: int, langs: Sequence[str] | None = None) -> dict:
        return evaluate_task(
            model,
            args.task,
            sets,
            dist,
            batch_size=args.eval_batch_size,
            num_workers=args.num_workers,
            pair_batch=pair_batch,
            langs=langs,
            tf32=getattr(args, "eval_tf32", True),
        )

    return evaluate_fn


def eval_loader(dataset, indices, collate, batch_size: int, num_workers: int):
    return loaders.BatchLoader(
        Subset(dataset, list(indices)),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
    )


def progress(iterable, desc: str, dist=None, total: int | None = None, delay: float = 0.0):
    """The evaluation's progress bar (with its ETA), on rank 0 only (dist None: torchrun's RANK), gone when done;
    delay: drawn only once the loop has run that many seconds (short loops stay quiet)."""
    rank0 = dist.is_main if dist is not None else cli.is_rank0_process()
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, delay=delay, disable=not rank0)


def model_device(model: torch.nn.Module, dist) -> torch.device:
    if dist is not None:
        return dist.device
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_task(
    model: torch.nn.Module,
    task: str,
    sets: dict[str, EvalSet],
    dist=None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    amp: str = "off",
    k_test: int | None = None,
    pair_batch: int = 1024,
    itm_batch: int = 128,
    langs: Sequence[str] | None = None,
    predictions: dict | None = None,
    tf32: bool = True,
) -> dict[str, dict]:
    """{lang: metrics} on every rank. Each rank runs its shard of every test set; gather
    assembles the predictions (retrieval: the score matrices), so every example counts exactly once and
    the numbers equal a single-process run. The model is put in eval mode and restored afterwards.
    `predictions` (xgqa/xvnli): filled with {lang: [(example id, predicted label), ...]} in file order.
    tf32: float32 matmuls in TF32 on a CUDA GPU that has it (--eval-tf32; training.after_epoch.tf32_matmuls)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = model_device(model, dist)
    results = {}
    encoded: dict = {}  # retrieval: the model's cache across languages (CCLM: the last language's encoded images)
    with after_epoch.tf32_matmuls(device, tf32):
        try:
            for lang in langs or metrics.ordered_langs(sets):
                s = sets[lang]
                if task == "xflickrco":
                    opts = RetrievalOptions(amp, pair_batch, k_test, itm_batch)
                    results[lang] = _evaluate_retrieval(model, s, dist, device, batch_size, num_workers, opts, encoded)
                    continue
                n = len(s.dataset)
                mine = devices.shard(n, dist)
                loader = eval_loader(s.dataset, mine, s.collate, batch_size, num_workers)
                batches = progress(loader, f"{task} {lang}", dist)
                local = predict_records(model, batches, device, amp)
                records = devices.gather(list(zip(mine, local, strict=True)), dist)
                if sorted(i for i, _ in records) != list(range(n)):  # every example exactly once
                    raise RuntimeError(f"{task} {lang}: gathered {len(records)} predictions for {n} examples")
                ids, preds, labels, qtypes = zip(*(r for _, r in sorted(records)))
                results[lang] = metrics.classification_metrics(preds, labels, qtypes if task == "xgqa" else None)
                if predictions is not None:
                    predictions[lang] = list(zip(ids, preds))
        finally:
            model.train(was_training)
    return results


@dataclass(frozen=True)
class RetrievalOptions:
    """How a model scores a retrieval test set (each model reads the fields its protocol uses):
    amp: evaluation precision; pair_batch: UC2 (caption, image) pairs per forward; k_test: CCLM's ITC
    prefilter size (None: the model config's); itm_batch: CCLM pairs per ITM forward."""

    amp: str = "off"
    pair_batch: int = 1024
    k_test: int | None = None
    itm_batch: int = 128


def _evaluate_retrieval(
    model,
    s: EvalSet,
    dist,
    device,
    batch_size: int,
    num_workers: int,
    opts: RetrievalOptions,
    encoded: dict | None = None,
) -> dict:
    """The model's own retrieval protocol (model.retrieval_scores), then R@K with its reference's tie order
    (model.tie_order) and unscored value (model.unscored)."""
    n_img, n_txt = len(s.images), len(s.captions)

    def batches(dataset, indices, what: str | None):
        loader = eval_loader(dataset, indices, s.collate, batch_size, num_workers)
        return loader if what is None else progress(loader, f"xflickrco {s.lang} {what}", dist)

    i2t, t2i = model.retrieval_scores(s.images, s.captions, batches, dist, device, opts, encoded)
    if i2t.shape != (n_img, n_txt) or t2i.shape != (n_txt, n_img):
        raise RuntimeError(
            f"xflickrco {s.lang}: gathered {tuple(i2t.shape)} / {tuple(t2i.shape)} score matrices for "
            f"{n_img} images x {n_txt} captions"
        )
    txt2img = [ex.label for ex in s.captions.examples]
    return metrics.recall_metrics(i2t, t2i, txt2img, unscored=model.unscored, ties=model.tie_order)
