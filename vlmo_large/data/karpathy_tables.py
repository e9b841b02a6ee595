"""Read a Karpathy-split caption file (dataset_coco.json, dataset_flickr30k.json) into rows per split.

The file: {"images": [{"filepath": "val2014" (COCO only), "filename", "split": "train"|"restval"|"val"|
"test", "sentences": [{"raw": caption}, ...]}, ...]}; images lie at <image_root>/[<filepath>/]<filename>.
Rows are pair_tables.TableRows (image path, captions, metadata {"filename", and "cocoid"/"imgid" when
present}), one TableRows per split, so the packing of `pairs` applies: training splits one sample per
caption, evaluation splits one sample per image with all its captions and the retrieval JSON.
An entry that is not an object, has no file name or an unknown split, a caption that is not text, and
a missing image are skipped, counted by reason and listed as "<file>: images[<n>]: reason (detail)".
"""
from __future__ import annotations

import os

from vlmo_large.data.pair_tables import SkipLog, TableRows, caption_list, read_json
from vlmo_large.errors import UserError

SPLITS = ("train", "restval", "val", "test")


def read_karpathy(path: str, image_root: str) -> tuple[dict[str, TableRows], SkipLog]:
    """({split: rows}, what was skipped) of one Karpathy file (module doc)."""
    data = read_json(path, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: not a Karpathy split file (no 'images' list)")
    splits, log = {split: TableRows() for split in SPLITS}, SkipLog()
    for n, entry in enumerate(data["images"]):
        where = f"{path}: images[{n}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"]:
            log.skip(where, "missing_image_field", "no filename")
            continue
        if entry.get("split") not in SPLITS:
            log.skip(where, "unknown_split", f"split {entry.get('split')!r} is none of {', '.join(SPLITS)}")
            continue
        image = os.path.join(image_root, entry.get("filepath") or "", entry["filename"])
        if not os.path.exists(image):
            log.skip(where, "missing_image_file", f"no {image}")
            continue
        sentences = entry.get("sentences") if isinstance(entry.get("sentences"), list) else []
        raw = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
        captions = caption_list(raw, where, log)
        if not captions:
            log.skip(where, "no_caption", "no caption text")
            continue
        meta = {k: entry[k] for k in ("filename", "cocoid", "imgid") if k in entry}
        splits[entry["split"]].rows.append((image, captions, meta))
    return splits, log
