"""Data-loader throughput vs the raw read rate, measured side by side in one run.

Region features (UC2): samples/s through UC2Dataset + UC2Collate in a DataLoader vs raw LMDB reads/s
(txn.get + unpickle of the same image records in one process). Images (CCLM): samples/s through
CCLMDataset (eval transform) + CCLMCollate vs raw Pillow decode + bicubic resize of the same files.
Target: per worker, the loader delivers >= 90% of the raw rate. Repeats are interleaved
(raw, loader, raw, loader, ...) and medians reported. All data is synthetic, written to a temp dir.

    .venv/bin/python bench/data_throughput.py [--quick] [--workers 1 2] [--out bench/results/data_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

TARGET = 0.9


def synthetic_examples(n: int) -> list[data.Example]:
    words = "a man woman dog cat red blue runs sits on the street near car with bike park".split()
    return [data.Example(task="xvnli", lang="en", id=f"pair{i}", image=str(1000 + i), image_file=f"flickr30k/{1000 + i}.jpg",
                         text=" ".join(words[(i * 7 + k) % len(words)] for k in range(8 + i % 9)), label=i % 3,
                         gold=data.XVNLI_LABELS_UC2[i % 3], source=f"synthetic:{i}") for i in range(n)]


def time_raw_lmdb(path: str, keys: list[str]) -> float:
    env = data._open_lmdb(path)
    t = time.perf_counter()
    with env.begin() as txn:
        for k in keys:
            pickle.loads(txn.get(k.encode()))
    return len(keys) / (time.perf_counter() - t)


def time_raw_images(root: Path, files: list[str], res: int) -> float:
    t = time.perf_counter()
    for f in files:
        with Image.open(root / f) as img:
            (img if img.mode == "RGB" else img.convert("RGB")).resize((res, res), Image.Resampling.BICUBIC)
    return len(files) / (time.perf_counter() - t)


def time_loader(loader: DataLoader, n: int) -> float:
    t = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["id"])
    assert seen == n
    return n / (time.perf_counter() - t)


def make_loader(ds, collate, workers: int, batch: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def summarize(raw: list[float], loaders: dict[int, list[float]], batch: int) -> dict:
    raw_med = statistics.median(raw)
    out = {"raw_per_s": raw_med, "raw_repeats": raw, "loader": {}}
    for w, rates in loaders.items():
        med = statistics.median(rates)
        per_worker = med / max(1, w)
        out["loader"][str(w)] = {"samples_per_s": med, "batches_per_s": med / batch, "repeats": rates,
                                 "per_worker_samples_per_s": per_worker, "per_worker_ratio": per_worker / raw_med,
                                 "meets_target": per_worker / raw_med >= TARGET}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small data, 2 repeats")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader worker counts (0 = main process)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--image-res", type=int, default=384)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = p.parse_args()
    n_feat, n_img = (128, 64) if args.quick else (512, 256)
    repeats = args.repeats or (2 if args.quick else 5)
    workers = args.workers if args.workers is not None else ([0, 1] if args.quick else [0, 1, 2])
    torch.set_num_threads(1)  # DataLoader workers run single-threaded; the in-process (0 worker) case too

    load_start = list(os.getloadavg())  # the machine may be shared: record how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exs_feat, exs_img = synthetic_examples(n_feat), synthetic_examples(n_img)
        data.write_synthetic_features(tmp / "feats.lmdb", [ex.image for ex in exs_feat], num_boxes=36)
        data.write_synthetic_images(tmp / "images", [ex.image_file for ex in exs_img], size=(500, 375))
        tok = data.make_tiny_tokenizer([ex.text for ex in exs_feat], tmp / "tok", vocab_size=200)

        feat_ds = data.UC2Dataset(exs_feat, str(tmp / "feats.lmdb"), "xvnli")
        img_ds = data.CCLMDataset(exs_img, str(tmp / "images"), "xvnli", image_res=args.image_res)
        feat_loaders = {w: make_loader(feat_ds, data.UC2Collate("xvnli", tok), w, args.batch_size) for w in workers}
        img_loaders = {w: make_loader(img_ds, data.CCLMCollate("xvnli", tok), w, args.batch_size) for w in workers}
        keys = [ex.image for ex in exs_feat]
        files = [ex.image_file for ex in exs_img]

        # warm-up: page cache, worker start-up
        time_raw_lmdb(str(tmp / "feats.lmdb"), keys)
        time_raw_images(tmp / "images", files[:8], args.image_res)
        for w in workers:
            time_loader(feat_loaders[w], n_feat)
            time_loader(img_loaders[w], n_img)

        raw_f, raw_i = [], []
        load_f = {w: [] for w in workers}
        load_i = {w: [] for w in workers}
        for r in range(repeats):
            raw_f.append(time_raw_lmdb(str(tmp / "feats.lmdb"), keys))
            for w in workers:
                load_f[w].append(time_loader(feat_loaders[w], n_feat))
            raw_i.append(time_raw_images(tmp / "images", files, args.image_res))
            for w in workers:
                load_i[w].append(time_loader(img_loaders[w], n_img))
            print(f"repeat {r + 1}/{repeats}: lmdb {raw_f[-1]:.0f}/s, "
                  + ", ".join(f"feature loader w={w} {load_f[w][-1]:.0f}/s" for w in workers)
                  + f"; pillow {raw_i[-1]:.0f}/s, " + ", ".join(f"image loader w={w} {load_i[w][-1]:.0f}/s" for w in workers),
                  flush=True)
        for loaders in (feat_loaders, img_loaders):
            loaders.clear()

    result = {
        "config": {"quick": args.quick, "batch_size": args.batch_size, "repeats": repeats, "workers": workers,
                   "feature_images": n_feat, "boxes": 36, "images": n_img, "image_size": [500, 375],
                   "image_res": args.image_res, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
                   "target_ratio": TARGET,
                   "raw_feature_read": "txn.get + pickle.loads per image (one process)",
                   "raw_image_read": "PIL open + decode (+ convert if not RGB) + resize bicubic per image (one process)",
                   "loader": "DataLoader(Dataset + collate incl. tokenising), persistent workers, samples/s; "
                             "workers=0 = same pipeline in the main process (per-worker rate = rate / max(1, workers))"},
        "region_features": summarize(raw_f, load_f, args.batch_size),
        "images": summarize(raw_i, load_i, args.batch_size),
    }
    for name in ("region_features", "images"):
        res = result[name]
        print(f"{name}: raw {res['raw_per_s']:.1f}/s")
        for w, r in res["loader"].items():
            print(f"  workers={w}: {r['batches_per_s']:.2f} batches/s ({r['samples_per_s']:.1f} samples/s), per worker "
                  f"{r['per_worker_ratio']:.2f} x raw -> {'meets' if r['meets_target'] else 'MISSES'} the {TARGET:.0%} target")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
