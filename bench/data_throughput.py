"""Data-loader throughput vs the raw read rate, measured side by side in one run.

Region features (UC2): samples/s through UC2Dataset + UC2Collate in a data.BatchLoader vs raw LMDB read + decode
(txn.get + unpickle of the same image records in one process). Images (CCLM): CCLMDataset (eval transform)
+ CCLMCollate (uint8 pixels; the model normalises them) vs raw Pillow decode + bicubic resize of the same
files. Issue target: per worker, the loader delivers >= 90% of the raw rate.

The raw side only reads and decodes; the loader must also do work no raw read includes, so besides the
issue's ratio the bench measures, side by side, the parts of the loader's per-sample time:
  tokenize   data.encode_texts on the same texts in the same batches (the collate's tokenising; beside it the
             tokenizer's Rust backend called directly, the faster private path data.py no longer takes),
  in-process the whole pipeline with workers=0 (read + decode + tokenize + padded batch tensors),
  transport  per-worker time minus in-process time: what handing batches from a worker to the main process
             costs, for data.BatchLoader (fastload.py: a small pickle per batch, the tensors stay in reused
             shared-memory slabs) and, side by side, for torch's plain DataLoader with the same arguments
             (a new shared-memory file per batch, a file descriptor per tensor); also the main thread's CPU time
             per batch of each (what the training loop itself pays to receive a batch),
and reports the ratio to raw read+decode+tokenize (the work any loader that tokenises must do) next to the
issue's ratio; `ceiling_ratio` = raw read+decode+tokenize / raw read+decode is the most a loader that reads
like the raw side and tokenises in the worker can reach. Per-worker rates are only meaningful with a core per
worker plus one for the main process (flagged "contended" otherwise). Workers are persistent and warmed up,
so start-up is not timed. Repeats are interleaved (raw, tokenize, loaders, raw, ...) and medians reported.
All data is synthetic, in a temp dir.

What matters beside a GPU is whether the loader keeps it fed. The bench also runs CCLM's TRAINING pipeline
(CCLMDataset(train=True): X2-VLM's augmentation) and compares each pipeline's per-worker rate with the rate
one GPU consumes: training FLOPs per sample counted with torch's FlopCounterMode on the base-size models (meta
device: CCLM XVNLI at 384 px, 40 text tokens; UC2 XVNLI 36 regions, 40 tokens; forward + backward), and an
assumed sustained rate of 40% of the bf16 dense peak (A100 312, H100 989 TFLOP/s): a stated model, not a
measurement. Reported: workers per GPU needed for 1.5x the consumer rate, and engine.default_num_workers
for one process per GPU on an 8-GPU node of this many cores. The engine logs the real wait
(data_wait_frac in metrics.jsonl).

    .venv/bin/python bench/data_throughput.py [--quick] [--workers 0 1] [--batch-size 64] \
        [--out bench/results/data_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
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
import engine  # noqa: E402
from formats import run_folder  # noqa: E402
import train_cclm  # noqa: E402
import train_uc2  # noqa: E402

TARGET = 0.9


def synthetic_examples(n: int) -> list[data.Example]:
    words = "a man woman dog cat red blue runs sits on the street near car with bike park".split()
    return [
        data.Example(
            task="xvnli",
            lang="en",
            id=f"pair{i}",
            image=str(1000 + i),
            image_file=f"flickr30k/{1000 + i}.jpg",
            text=" ".join(words[(i * 7 + k) % len(words)] for k in range(8 + i % 9)),
            label=i % 3,
            gold=data.XVNLI_LABELS_UC2[i % 3],
            source=f"synthetic:{i}",
        )
        for i in range(n)
    ]


def rate(n: int, fn) -> tuple[float, float]:
    """(samples/s, CPU seconds the calling (main) thread spent) of one call of fn."""
    t, cpu = time.perf_counter(), time.thread_time()
    fn()
    return n / (time.perf_counter() - t), time.thread_time() - cpu


def raw_lmdb(path: str, keys: list[str]) -> None:
    env = data._open_lmdb(path)
    with env.begin() as txn:
        for k in keys:
            pickle.loads(txn.get(k.encode()))


def raw_images(root: Path, files: list[str], res: int) -> None:
    for f in files:
        with Image.open(root / f) as img:
            (img if img.mode == "RGB" else img.convert("RGB")).resize((res, res), Image.Resampling.BICUBIC)


def tokenize_backend(tok, texts: list[str], batch: int) -> None:
    """What data.encode_texts did before it used the tokenizer's public call: the fast tokenizer's Rust backend
    directly (encode_batch_fast: no character offsets). Same ids (tests/test_data.py); measured for the cost."""
    backend = tok._tokenizer
    backend.no_truncation()
    backend.no_padding()
    for i in range(0, len(texts), batch):
        [e.ids for e in backend.encode_batch_fast(texts[i : i + batch], add_special_tokens=True)]


def tokenize(tok, texts: list[str], batch: int, max_len: int | None) -> None:
    for i in range(0, len(texts), batch):
        data.encode_texts(tok, texts[i : i + batch], max_len)


def drain(loader: DataLoader, n: int) -> None:
    seen = sum(len(b["id"]) for b in loader)
    assert seen == n, (seen, n)


def make_loader(ds, collate, workers: int, batch: int, plain: bool = False) -> DataLoader:
    """data.BatchLoader (batches through fastload's slabs) or, plain, torch's DataLoader with the same arguments."""
    kind = DataLoader if plain else data.BatchLoader
    return kind(
        ds,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def summarize(
    raw: list[float],
    tok: list[float],
    loaders: dict[int, list[float]],
    batch: int,
    plain: dict[int, list[float]],
    main_cpu: dict[str, list[float]],
    n: int,
) -> dict:
    """Medians; per-sample times in microseconds; ratios per worker; `plain`: torch DataLoader rates by workers,
    `main_cpu`: main-thread CPU seconds per drain by loader ("w1", "plain_w1", ...)."""
    raw_med, tok_med = statistics.median(raw), statistics.median(tok)
    must = 1 / (1 / raw_med + 1 / tok_med)  # read + decode + tokenize, back to back
    inproc = statistics.median(loaders[0]) if 0 in loaders else None
    out = {
        "raw_per_s": raw_med,
        "raw_repeats": raw,
        "tokenize_per_s": tok_med,
        "tokenize_repeats": tok,
        "raw_plus_tokenize_per_s": must,
        "ceiling_ratio": must / raw_med,
        "us_per_sample": {"raw_read_decode": 1e6 / raw_med, "tokenize": 1e6 / tok_med},
        "loader": {},
    }
    if inproc:
        out["us_per_sample"]["in_process_loader"] = 1e6 / inproc
        out["tokenizer_share_of_in_process_loader"] = inproc / tok_med
    for w, rates in loaders.items():
        med = statistics.median(rates)
        per_worker = med / max(1, w)
        row = {
            "samples_per_s": med,
            "batches_per_s": med / batch,
            "repeats": rates,
            "per_worker_samples_per_s": per_worker,
            "per_worker_ratio": per_worker / raw_med,
            "per_worker_ratio_vs_raw_plus_tokenize": per_worker / must,
            "meets_target": per_worker / raw_med >= TARGET,
            "contended": w + 1 > (os.cpu_count() or 1),
        }
        if w and inproc:
            row["transport_us_per_sample"] = 1e6 / per_worker - 1e6 / inproc
        row["main_thread_cpu_us_per_batch"] = 1e6 * statistics.median(main_cpu[f"w{w}"]) / (n / batch)
        if w in plain:
            p_med = statistics.median(plain[w]) / w
            row["plain_dataloader"] = {
                "samples_per_s": statistics.median(plain[w]),
                "repeats": plain[w],
                "per_worker_samples_per_s": p_med,
                "main_thread_cpu_us_per_batch": 1e6 * statistics.median(main_cpu[f"plain_w{w}"]) / (n / batch),
                **({"transport_us_per_sample": 1e6 / p_med - 1e6 / inproc} if inproc else {}),
            }
            row["slab_over_plain"] = per_worker / p_med
        out["loader"][str(w)] = row
    return out


GPUS = {"A100": 312e12, "H100": 989e12}  # bf16 dense peak FLOP/s
MFU = 0.4  # assumed sustained fraction of the peak in training
FEED_MARGIN = 1.5  # loader rate / consumer rate asked for


def train_flops_per_sample(model_name: str) -> float:
    """Forward + backward FLOPs of one XVNLI training sample of the base-size model (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    n, length = 2, 40
    text = {
        "input_ids": torch.ones(n, length, dtype=torch.long, device="meta"),
        "attention_mask": torch.ones(n, length, dtype=torch.long, device="meta"),
    }
    with torch.device("meta"):
        if model_name == "cclm":
            model = train_cclm.build_model("xvnli", dict(train_cclm.CONFIGS["base"]))
            batch = {
                "images": torch.empty(n, 3, 384, 384),
                "text_ids": text["input_ids"],
                "text_atts": text["attention_mask"],
                "label": torch.zeros(n, dtype=torch.long),
            }
        else:
            model = train_uc2.build_model("xvnli", dict(train_uc2.CONFIGS["base"]))
            batch = {
                **text,
                "features": torch.empty(n, 37, 2048),
                "spatials": torch.empty(n, 37, 7),
                "image_mask": torch.ones(n, 37, dtype=torch.long),
                "label": torch.zeros(n, dtype=torch.long),
                "target": torch.zeros(n, 3),
            }
    model.train()
    with FlopCounterMode(display=False) as counter:
        model.loss(batch).backward()
    return counter.get_total_flops() / n


def feeding(per_worker: dict[str, float], cpus: int) -> dict:
    """Per pipeline: modelled GPU consumer rates, workers needed for FEED_MARGIN x that, and the default.
    per_worker: pipeline -> samples/s of one worker (pipelines named "<pipeline>_plain": torch's transport)."""
    flops = {"uc2": train_flops_per_sample("uc2"), "cclm": train_flops_per_sample("cclm")}
    out = {
        "assumptions": {
            "mfu": MFU,
            "peak_bf16_flops": GPUS,
            "feed_margin": FEED_MARGIN,
            "train_flops_per_sample": flops,
        },
        "default_num_workers_8_gpus": engine.default_num_workers(cpus=cpus, procs_per_node=8),
    }
    for pipeline, rate in per_worker.items():
        model = "uc2" if pipeline.startswith("region_features") else "cclm"
        out[pipeline] = {
            "per_worker_samples_per_s": rate,
            **{
                gpu: {
                    "consumer_samples_per_s": peak * MFU / flops[model],
                    "workers_needed": math.ceil(FEED_MARGIN * peak * MFU / flops[model] / rate),
                }
                for gpu, peak in GPUS.items()
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small data, 2 repeats")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="DataLoader worker counts (0 = main process; default 0 1, and 2 with >= 3 cores)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (per-batch costs amortise over it)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--image-res", type=int, default=384)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = p.parse_args(argv)
    n_feat, n_img = (128, 64) if args.quick else (512, 256)
    repeats = args.repeats or (2 if args.quick else 5)
    workers = args.workers if args.workers is not None else ([0, 1, 2] if (os.cpu_count() or 1) >= 3 else [0, 1])
    if 0 not in workers:
        workers = [0] + workers  # the in-process rate is the reference for the transport cost
    torch.set_num_threads(1)  # DataLoader workers run single-threaded; the in-process (0 worker) case too
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer thread, as in the workers

    load_start = list(os.getloadavg())  # the machine may be shared: record how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exs_feat, exs_img = synthetic_examples(n_feat), synthetic_examples(n_img)
        data.write_synthetic_features(tmp / "feats.lmdb", [ex.image for ex in exs_feat], num_boxes=36)
        data.write_synthetic_images(tmp / "images", [ex.image_file for ex in exs_img], size=(500, 375))
        tok = data.make_tiny_tokenizer([ex.text for ex in exs_feat], tmp / "tok", vocab_size=200)

        feat_ds = data.UC2Dataset(exs_feat, str(tmp / "feats.lmdb"), "xvnli")
        img_ds = data.CCLMDataset(exs_img, str(tmp / "images"), "xvnli", image_res=args.image_res)
        train_ds = data.CCLMDataset(exs_img, str(tmp / "images"), "xvnli", image_res=args.image_res, train=True)
        feat_col, img_col = data.UC2Collate("xvnli", tok), data.CCLMCollate("xvnli", tok)
        feat_loaders = {w: make_loader(feat_ds, feat_col, w, args.batch_size) for w in workers}
        img_loaders = {w: make_loader(img_ds, img_col, w, args.batch_size) for w in workers}
        with_workers = [w for w in workers if w]
        feat_plain = {w: make_loader(feat_ds, feat_col, w, args.batch_size, plain=True) for w in with_workers}
        img_plain = {w: make_loader(img_ds, img_col, w, args.batch_size, plain=True) for w in with_workers}
        train_loader = make_loader(train_ds, data.CCLMCollate("xvnli", tok), 0, args.batch_size)
        keys, files = [ex.image for ex in exs_feat], [ex.image_file for ex in exs_img]
        feat_texts = [ex.text for ex in exs_feat]
        img_texts = [data.pre_caption(ex.text, data.CCLM_MAX_WORDS[("xvnli", False)]) for ex in exs_img]

        cases = {  # name -> (samples, callable); each repeat runs every case once, in this order
            "feat_raw": (n_feat, lambda: raw_lmdb(str(tmp / "feats.lmdb"), keys)),
            "feat_tok": (n_feat, lambda: tokenize(tok, feat_texts, args.batch_size, feat_col.max_len)),
            "feat_tok_backend": (n_feat, lambda: tokenize_backend(tok, feat_texts, args.batch_size)),
            **{f"feat_w{w}": (n_feat, lambda w=w: drain(feat_loaders[w], n_feat)) for w in workers},
            **{f"feat_plain_w{w}": (n_feat, lambda w=w: drain(feat_plain[w], n_feat)) for w in with_workers},
            "img_raw": (n_img, lambda: raw_images(tmp / "images", files, args.image_res)),
            "img_tok": (n_img, lambda: tokenize(tok, img_texts, args.batch_size, img_col.max_len)),
            **{f"img_w{w}": (n_img, lambda w=w: drain(img_loaders[w], n_img)) for w in workers},
            **{f"img_plain_w{w}": (n_img, lambda w=w: drain(img_plain[w], n_img)) for w in with_workers},
            "img_train_w0": (n_img, lambda: drain(train_loader, n_img)),
        }
        for n, fn in cases.values():  # warm-up: page cache, worker start-up, tokenizer caches
            fn()
        rates: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(repeats):
            for name, (n, fn) in cases.items():
                samples_per_s, main_cpu = rate(n, fn)
                rates[name].append(samples_per_s)
                cpu[name].append(main_cpu)
            print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True)
        for loaders in (feat_loaders, img_loaders, feat_plain, img_plain):
            loaders.clear()

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {
            "quick": args.quick,
            "batch_size": args.batch_size,
            "repeats": repeats,
            "workers": workers,
            "feature_images": n_feat,
            "boxes": 36,
            "images": n_img,
            "image_size": [500, 375],
            "image_res": args.image_res,
            "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg()),
            "target_ratio": TARGET,
            "raw_feature_read": "txn.get + pickle.loads per image (one process)",
            "raw_image_read": "PIL open + decode (+ convert if not RGB) + resize bicubic per image (one process)",
            "tokenize": "data.encode_texts of the collate's texts, same batches and max length (one process)",
            "loader": "data.BatchLoader(Dataset + collate incl. tokenising), persistent workers, warmed up, samples/s; "
            "workers=0 = same pipeline in the main process (per-worker rate = rate / max(1, workers))",
        },
        **{
            name: summarize(
                rates[f"{pre}_raw"],
                rates[f"{pre}_tok"],
                {w: rates[f"{pre}_w{w}"] for w in workers},
                args.batch_size,
                {w: rates[f"{pre}_plain_w{w}"] for w in with_workers},
                {k[len(pre) + 1 :]: v for k, v in cpu.items() if k.startswith(pre + "_")},
                n,
            )
            for name, pre, n in (("region_features", "feat", n_feat), ("images", "img", n_img))
        },
    }
    tok_call, tok_backend = statistics.median(rates["feat_tok"]), statistics.median(rates["feat_tok_backend"])
    result["tokenizer_public_call"] = {
        "encode_texts_per_s": tok_call,
        "backend_encode_batch_fast_per_s": tok_backend,
        "call_over_backend": tok_call / tok_backend,
        "share_of_in_process_uc2_loader": statistics.median(rates["feat_w0"]) / tok_call,
        "share_of_in_process_uc2_loader_backend": statistics.median(rates["feat_w0"]) / tok_backend,
    }
    result["cclm_train_transform"] = {
        "in_process_samples_per_s": statistics.median(rates["img_train_w0"]),
        "eval_in_process_samples_per_s": statistics.median(rates["img_w0"]),
    }
    per_worker = {
        "region_features": statistics.median(rates["feat_w0"]),
        "images_eval": statistics.median(rates["img_w0"]),
        "images_train": statistics.median(rates["img_train_w0"]),
    }
    if 1 in with_workers:  # one worker through torch's own transport: the in-process rate minus its transport cost
        for name, pre in (("region_features", "feat"), ("images_eval", "img")):
            plain_us = 1e6 / statistics.median(rates[f"{pre}_plain_w1"]) - 1e6 / statistics.median(rates[f"{pre}_w1"])
            per_worker[f"{name}_plain"] = 1 / (1 / per_worker[name] + max(0.0, plain_us) / 1e6)
    result["feeding"] = feeding(per_worker, os.cpu_count() or 1)
    for name in ("region_features", "images"):
        res = result[name]
        us = res["us_per_sample"]
        print(
            f"{name}: raw read+decode {res['raw_per_s']:.0f}/s ({us['raw_read_decode']:.0f} us/sample), tokenize "
            f"{us['tokenize']:.0f} us/sample, in-process loader "
            f"{us.get('in_process_loader', float('nan')):.0f} us/sample "
            f"(tokenizer share {res.get('tokenizer_share_of_in_process_loader', float('nan')):.0%}); ceiling for a "
            f"loader that reads as raw and tokenises: {res['ceiling_ratio']:.2f} x raw read+decode"
        )
        for w, r in res["loader"].items():
            extra = (
                f", transport {r['transport_us_per_sample']:.0f} us/sample" if "transport_us_per_sample" in r else ""
            )
            if "plain_dataloader" in r:
                pl = r["plain_dataloader"]
                extra += (
                    f"; plain DataLoader {pl['samples_per_s']:.0f} samples/s"
                    + (
                        f", transport {pl['transport_us_per_sample']:.0f} us/sample"
                        if "transport_us_per_sample" in pl
                        else ""
                    )
                    + f": slabs {r['slab_over_plain']:.2f}x plain; main-thread CPU per batch "
                    f"{r['main_thread_cpu_us_per_batch']:.0f} us (slabs) vs "
                    f"{pl['main_thread_cpu_us_per_batch']:.0f} us"
                )
            print(
                f"  workers={w}: {r['batches_per_s']:.2f} batches/s ({r['samples_per_s']:.0f} samples/s), per worker "
                f"{r['per_worker_ratio']:.2f} x raw read+decode ({'meets' if r['meets_target'] else 'MISSES'} the "
                f"{TARGET:.0%} target), {r['per_worker_ratio_vs_raw_plus_tokenize']:.2f} x raw read+decode+tokenize"
                f"{extra}{' [contended: fewer cores than workers + main]' if r['contended'] else ''}"
            )
    t = result["tokenizer_public_call"]
    print(
        f"tokenizer: encode_texts (public call) {t['encode_texts_per_s']:.0f} texts/s, the Rust backend directly "
        f"{t['backend_encode_batch_fast_per_s']:.0f}/s ({t['call_over_backend']:.2f}x); share of the in-process UC2 "
        f"loader {t['share_of_in_process_uc2_loader']:.0%} (backend: {t['share_of_in_process_uc2_loader_backend']:.0%})"
    )
    feed = result["feeding"]
    print(f"feeding one GPU (modelled: {MFU:.0%} of bf16 peak; loader rate per worker measured here in-process):")
    for pipeline in feed:
        if pipeline in ("assumptions", "default_num_workers_8_gpus"):
            continue
        r = feed[pipeline]
        print(
            f"  {pipeline}: {r['per_worker_samples_per_s']:.0f} samples/s per worker; "
            + "; ".join(
                f"{gpu} consumes {r[gpu]['consumer_samples_per_s']:.0f}/s -> {r[gpu]['workers_needed']} "
                f"workers for {FEED_MARGIN}x"
                for gpu in GPUS
            )
        )
    print(
        f"  default --num-workers with 8 processes on these {os.cpu_count()} CPUs: "
        f"{feed['default_num_workers_8_gpus']} per process"
    )
    out = Path(args.out)
    run_folder.atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
