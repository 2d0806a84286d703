"""One line of NLVR2 or MaRVL (IGLUE's task "marvl"): a caption about a pair of images, true or false, with the
feature keys of its two images as VOLTA looks them up and their image files as X2-VLM reads them.

  nlvr2_pair(obj, where) -> dict    an NLVR2 line (identifier, sentence, label "True" / "False")
  marvl_pair(obj, where, few_shot) -> dict   a MaRVL line (id, caption, left_img, right_img, language, label bool)
Both return {"id", "text", "label" (1 true, 0 false), "gold" ("True" / "False"), "image", "image_file", "image2",
"image2_file"} (image = the left image); a wrong line is a one-line ValueError naming file:line and the field.

Feature keys (VOLTA's nlvr2_dataset.py): NLVR2 "<identifier without its sentence number>-img0" / "-img1"; MaRVL
the image file's base name up to its first dot ("39-0.jpg" -> "39-0"). Image files under the images root
(X2-VLM's utils/marvl_preproc.py for MaRVL; NLVR2's own distribution layout, where X2-VLM's preprocessed json is
not public): nlvr2/<split>/[<directory>/]<prefix>-img0.png (train images sit in numbered folders, the line's
`directory`); marvl/<language>/images/<concept number>/<left_img> (zero-shot test);
marvl_fewshot/<language>/all/<base name> (few-shot files).

Not on the reading path: data.load_split makes one call per line.
"""

from __future__ import annotations

import json
import posixpath

from formats.annotation_fields import field, ident, text

NLVR2_LABELS = {"True": 1, "False": 0}  # VOLTA: 0 if str(label) == "False" else 1; anything else is refused here


def _pair(ex_id, caption, label, key0, file0, key1, file1) -> dict:
    return {
        "id": ex_id,
        "text": caption,
        "label": label,
        "gold": "True" if label else "False",
        "image": key0,
        "image_file": file0,
        "image2": key1,
        "image2_file": file1,
    }


def nlvr2_pair(obj: dict, where: str) -> dict:
    identifier = text(field(obj, "identifier", where), where, "identifier")
    label = field(obj, "label", where)
    if not isinstance(label, str) or label not in NLVR2_LABELS:
        raise ValueError(f'{where}: field \'label\' must be "True" or "False" (NLVR2), got {json.dumps(label)[:60]}')
    parts = identifier.split("-")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{where}: identifier {identifier!r} is not NLVR2's <split>-<set>-<pair>-<sentence>")
    prefix = "-".join(parts[:-1])  # VOLTA: "-".join(identifier.split("-")[:-1])
    folder = parts[0]
    if "directory" in obj:  # NLVR2's training images sit in numbered folders
        folder += "/" + ident(obj["directory"], where, "directory")
    caption = text(field(obj, "sentence", where), where, "sentence")
    files = [f"nlvr2/{folder}/{prefix}-img{i}.png" for i in (0, 1)]
    return _pair(identifier, caption, NLVR2_LABELS[label], f"{prefix}-img0", files[0], f"{prefix}-img1", files[1])


def marvl_pair(obj: dict, where: str, few_shot: bool) -> dict:
    label = field(obj, "label", where)
    if not isinstance(label, bool):
        raise ValueError(f"{where}: field 'label' must be true or false (a JSON boolean), got {json.dumps(label)[:60]}")
    language = text(field(obj, "language", where), where, "language")
    caption = text(field(obj, "caption", where), where, "caption")
    names = [text(field(obj, k, where), where, k) for k in ("left_img", "right_img")]
    bases = [posixpath.basename(n) for n in names]
    keys = [b.split(".")[0] for b in bases]  # VOLTA: img.split("/")[-1].split(".")[0]
    if few_shot:
        files = [f"marvl_fewshot/{language}/all/{b}" for b in bases]
    else:
        files = [f"marvl/{language}/images/{n.split('-')[0]}/{n}" for n in names]
    if names[0] == names[1] or keys[0] == keys[1]:
        raise ValueError(
            f"{where}: left_img {names[0]!r} and right_img {names[1]!r} are the same image (feature key "
            f"{keys[0]!r}); a pair needs two images"
        )
    return _pair(ident(field(obj, "id", where), where, "id"), caption, int(label), keys[0], files[0], keys[1], files[1])
