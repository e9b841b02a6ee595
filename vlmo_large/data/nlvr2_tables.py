"""Read NLVR2 statements into packing items of kind "nlvr2" (shard_packing); bad lines are skipped and reported.

Two inputs:
- NLVR2's official JSON-lines files (train.json, dev.json, test1.json): one object per line,
  {"identifier": "train-10171-0-0", "sentence", "label": "True"|"False", "directory": 17 (train only)}.
  The pair's images are <image_root>[/<directory>]/<identifier without its last part>-img0.png (left)
  and -img1.png (right), as the NLVR2 repository lays out images/<split>/.
- the synthetic dataset's nlvr2/<split>.json (data/synthetic.py): a JSON list of {"id", "images": [left,
  right], "sentence", "label": true|false}, image paths relative to the JSON file.
A file holding a JSON list is the synthetic format, anything else JSON lines.

Items: {"images": [left, right], "json": {"sentence", "label": bool, "id"}}. A line that is not JSON or
not an object, has no sentence or identifier, a label other than True/False, or a missing image is
skipped, counted by reason and listed as "<file>:<line>: reason (detail)" ("<file>: [<n>]" in a list).
"""
from __future__ import annotations

import json
import os

from vlmo_large.data.pair_tables import SkipLog, is_json_list, json_lines, read_json
from vlmo_large.errors import UserError

_LABELS = {"True": True, "False": False, True: True, False: False}


def _label(value):
    try:
        return _LABELS.get(value)
    except TypeError:  # unhashable: a list or an object
        return None


def _statement(record, where: str, log: SkipLog) -> tuple[str, bool] | None:
    """(sentence, label) of one record, or None after logging why it is skipped."""
    if not isinstance(record, dict):
        log.skip(where, "not_an_object", f"a JSON {type(record).__name__}, not an object")
        return None
    sentence = record.get("sentence")
    if not isinstance(sentence, str) or not sentence.strip():
        log.skip(where, "missing_sentence", "no sentence text")
        return None
    label = _label(record.get("label"))
    if label is None:
        log.skip(where, "bad_label", f"label {json.dumps(record.get('label'))[:40]} is not True or False")
        return None
    return " ".join(sentence.split()), label


def _existing(paths: list[str], where: str, log: SkipLog) -> bool:
    for path in paths:
        if not os.path.exists(path):
            log.skip(where, "missing_image_file", f"no {path}")
            return False
    return True


def _pair_paths(record: dict, image_root: str) -> list[str]:
    stem = record["identifier"].rsplit("-", 1)[0]
    folder = os.path.join(image_root, str(record["directory"])) if "directory" in record else image_root
    return [os.path.join(folder, f"{stem}-img{side}.png") for side in (0, 1)]


def _read_lines(path: str, image_root: str, log: SkipLog) -> list[dict]:
    items = []
    for where, record in json_lines(path, log):
        statement = _statement(record, where, log)
        if statement is None:
            continue
        if not isinstance(record.get("identifier"), str) or "-" not in record["identifier"]:
            log.skip(where, "missing_identifier", "no identifier like 'train-10171-0-0'")
            continue
        images = _pair_paths(record, image_root)
        if _existing(images, where, log):
            items.append({"images": images, "json": {"sentence": statement[0], "label": statement[1],
                                                     "id": record["identifier"]}})
    return items


def _read_list(path: str, log: SkipLog) -> list[dict]:
    entries = read_json(path, "NLVR2 statement list")
    if not isinstance(entries, list):
        raise UserError(f"{path}: an NLVR2 statement list must be a JSON list of {{id, images, sentence, label}}")
    root, items = os.path.dirname(os.path.abspath(path)), []
    for n, record in enumerate(entries):
        where = f"{path}: [{n}]"
        statement = _statement(record, where, log)
        if statement is None:
            continue
        images = record.get("images")
        if not isinstance(images, list) or len(images) != 2 or not all(isinstance(p, str) for p in images):
            log.skip(where, "missing_image_field", "'images' must be [left path, right path]")
            continue
        images = [os.path.join(root, p) for p in images]
        if _existing(images, where, log):
            items.append({"images": images, "json": {"sentence": statement[0], "label": statement[1],
                                                     "id": record.get("id", n)}})
    return items


def read_nlvr2(path: str, image_root: str | None, log: SkipLog) -> list[dict]:
    """Items of one NLVR2 file, official JSON lines or the synthetic list (module doc). `image_root`:
    the split's image folder (official files; default the file's folder)."""
    if is_json_list(path):
        return _read_list(path, log)
    return _read_lines(path, image_root or os.path.dirname(os.path.abspath(path)), log)
