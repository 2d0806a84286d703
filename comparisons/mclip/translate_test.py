"""The reference's English-CLIP translate-test baseline (PECTVLM align_from_to_en/run_mono_XTD.py, and
run_mono_task1.py / run_mono_task2.py for Multi30K): OpenAI CLIP ViT-L/14's own English text tower, no M-CLIP and no
training, scores the test images against the routine's text of one language.

What the reference does (22b7594): `clip.load("ViT-L/14")` gives both towers (text_model = image_model); the test
split is run_XTD.py's (XTD10: indices[2 n_shot:] of randperm(1000, Generator(split_seed 42)); Multi30K: the whole
test split); trainer.estimate_monolingual encodes the texts with `clip.tokenize(t, 77, truncate=True)` and
`encode_text`, the images with `encode_image`, L2-normalises both and takes the mean of image->text and
text->image R@1 (util.recall_k). The text: method3 / baseline2 -> the language's captions machine-translated into
English (translated_to_en/, the translate-test baseline proper); method1 / method2 / baseline1 -> the language's own
captions (native; English CLIP on other scripts).

Here: the text tower and tokenizer of a CLIP release folder (openai/clip-vit-large-patch14: whole-CLIPModel
weights, its tokenizer files) as transformers' CLIPTextModelWithProjection (`text_embeds` = OpenAI's encode_text:
the EOT position's state through text_projection), truncation to 77 tokens with EOT kept last (clip.tokenize's
truncate=True); images from the same --image-features file as the M-CLIP runs (`train_mclip.py features`, the same
ViT-L/14 tower); R@1 by train_mclip.recall_at_1 (percent; the reference logs fractions rounded to 4 places).
Differences: the reference runs both towers in fp16 on CUDA (clip.load), ours float32; transformers' CLIP
tokenizer has no ftfy text fixing (OpenAI's cleans text with ftfy first; equal on clean text).

    python -m comparisons.mclip.translate_test --dataset xtd --data-root XTD10 --lang de --routine method3 \
        --clip clip-vit-large-patch14 --image-features xtd-clip-vitl14.pt --output-dir runs/mclip-clipen-xtd50-de

Writes args.json and results.json in train_mclip.py's format (pet "english_clip"), so `train_mclip.py table`
shows it as a group of its own beside the M-CLIP runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from comparisons.mclip import train_mclip as T
from console import cli
from formats import run_folder

# run_mono_XTD.py :326-329 (run_mono_task1.py / run_mono_task2.py alike): the text each --strategy is scored on
ROUTINE_TEXT = {
    "method3": "to_en",
    "baseline2": "to_en",
    "method1": "native",
    "method2": "native",
    "baseline1": "native",
}
CONTEXT_LENGTH = 77  # clip.tokenize(t, 77, True)
PET_NAME = "english_clip"  # the group name `train_mclip.py table` gives these runs


def load_clip_text(folder: str | Path):
    """(CLIPTextModelWithProjection in eval mode, tokenizer) of a CLIP release folder: OpenAI's whole-CLIPModel
    layout (text_model.*, text_projection.weight beside the vision keys) or a text-only one. Every text key must be
    there with its shape: one-line ValueError otherwise."""
    from transformers import AutoTokenizer

    model = T.load_clip_tower(folder, "text", "--clip")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--clip {folder}: no readable CLIP tokenizer ({str(e).splitlines()[0]})") from None
    return model, tokenizer


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int, device: str = "cpu") -> torch.Tensor:
    """OpenAI's encode_text of clip.tokenize(texts, 77, truncate=True), in chunks: [N, projection_dim] float32."""
    out = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=CONTEXT_LENGTH,
            return_tensors="pt",
        )
        out.append(model(input_ids=tok["input_ids"].to(device)).text_embeds.float().cpu())
    return torch.cat(out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m comparisons.mclip.translate_test", description=__doc__)
    p.add_argument("--dataset", choices=tuple(T.DATASETS), required=True)
    p.add_argument("--data-root", required=True, help="XTD10 or multi30k-dataset folder (PECTVLM layout)")
    p.add_argument("--lang", required=True)
    p.add_argument("--routine", choices=tuple(ROUTINE_TEXT), default="method3", help="method3/baseline2: MT->en text")
    p.add_argument("--n-shot", type=int, default=50, help="XTD: test = what run_XTD.py's split leaves (50: 900)")
    p.add_argument("--split-seed", type=int, default=T.DEFAULTS["split_seed"])
    p.add_argument("--clip", required=True, help="CLIP release folder (openai/clip-vit-large-patch14)")
    p.add_argument("--image-features", default=None, help="the M-CLIP runs' features file (train_mclip.py features)")
    p.add_argument("--images", default=None, help="without --image-features: the image root, encoded by --clip")
    p.add_argument("--eval-batch-size", type=int, default=200, help="run_mono_XTD.py's --eval_bs")
    p.add_argument("--output-dir", required=True)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.lang not in T.DATASETS[args.dataset]:
        raise SystemExit(f"error: --lang {args.lang}: {args.dataset} has {', '.join(T.DATASETS[args.dataset])}")
    args.clip_vision = args.clip  # the features' image tower when computed here: the same release
    try:
        split = T.load_splits(args)["test"]
        images = T.image_feature_table({"test": split}, args)
        model, tokenizer = load_clip_text(args.clip)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    kind = ROUTINE_TEXT[args.routine]
    text = encode_texts(model, tokenizer, split.captions(kind, args.lang), args.eval_batch_size)
    image = torch.stack([images[p] for p in split.images])
    if image.shape[1] != text.shape[1]:
        raise SystemExit(f"error: image features are {image.shape[1]}-d, --clip's text embeddings {text.shape[1]}-d")
    try:
        test = T.recall_at_1(image, text)
    except FloatingPointError as e:
        raise SystemExit(f"error: test: {e}; results.json not written") from None
    result = {
        "model": "clip",
        "pet": PET_NAME,
        "routine": args.routine,
        "lang": args.lang,
        "dataset": args.dataset,
        "n_shot": args.n_shot,
        "test_text": kind,
        "test": test,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / run_folder.ARGS).write_text(json.dumps(run_folder.json_safe(vars(args)), indent=1) + "\n")
    run_folder.atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    print(json.dumps({"lang": args.lang, "routine": args.routine, "pet": PET_NAME, **test}))
    return result


if __name__ == "__main__":
    cli.run_main(main)
