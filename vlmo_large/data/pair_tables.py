"""Read image-text tables (CSV or JSONL) into packing items; bad rows are skipped and reported.

CSV: a header with an `image` column and a `caption` column (one caption per row).
JSONL: one object per line, {"image": path, "caption": str} or {"image": path, "captions": [str, ...]}.
Every other column / field (labels, ids, sources) is kept as the sample's metadata (`<key>.meta.json`
in the shards). Only strings are captions: a line that is not JSON, not an object or has no image,
and a caption that is null, a number, a list or empty are skipped, counted by reason and reported
with their line. A CSV without the needed columns is a `UserError` (nothing could be packed).
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field

from vlmo_large.errors import UserError

CAPTION_FIELDS = ("caption", "captions")


@dataclass
class SkipLog:
    """What reading an input skipped: counts by reason, and each problem with where it was."""
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # "table:line: reason (detail)"

    def skip(self, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.problems.append(f"{where}: {reason} ({detail})")


@dataclass
class TableRows(SkipLog):
    """Rows read from tables: (image path, captions, metadata), the skip counts, and where."""
    rows: list[tuple[str, list[str], dict]] = field(default_factory=list)


def read_json(path: str, what: str):
    """The JSON content of `path`; a file that cannot be read or parsed is a UserError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror})") from exc
    except ValueError as exc:
        raise UserError(f"{path}: the {what} is not valid JSON ({exc})") from exc


def is_json_list(path: str) -> bool:
    """Whether the file holds a JSON list (its first non-blank character is "["), told without parsing it:
    the fine-tuning readers take a list (the synthetic format) or an object / JSON lines (the official one)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(4096).lstrip()[:1] == "["
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror})") from exc


def caption_list(value, where: str, out: SkipLog) -> list[str]:
    """The captions of a value (a string or a list): strings only, whitespace collapsed; the rest is skipped."""
    values = value if isinstance(value, list) else [value]
    captions = []
    for v in values:
        if not isinstance(v, str):
            out.skip(where, "caption_not_text", f"caption {json.dumps(v)[:40]} is not a string")
        elif not v.split():
            out.skip(where, "empty_caption", "empty caption")
        else:
            captions.append(" ".join(v.split()))
    return captions


def _read_csv(table: str, root: str, out: TableRows) -> None:
    with open(table, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ("image", "caption") if c not in columns]
        if missing:
            raise UserError(f"{table}: no {' or '.join(repr(c) for c in missing)} column; it has "
                            f"{', '.join(repr(c) for c in columns) or 'no header'}; the pairs tool wants "
                            "the columns 'image' and 'caption' (other columns are kept as metadata)")
        for row in reader:
            where = f"{table}:{reader.line_num}"
            if not row.get("image"):
                out.skip(where, "missing_image_field", "no image path")
                continue
            meta = {k: v for k, v in row.items() if k not in ("image", "caption") and k is not None}
            captions = caption_list(row.get("caption") or "", where, out)
            out.rows.append((os.path.join(root, row["image"]), captions, meta))


def json_lines(path: str, log):
    """(where, record) for each non-blank line of a JSON-lines file, where = "path:line"; a line that
    is not JSON is skipped into `log` (SkipLog or TableRows) as bad_json."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except ValueError as exc:
                log.skip(where, "bad_json", f"not valid JSON: {exc}")


def _read_jsonl(table: str, root: str, out: TableRows) -> None:
    for where, record in json_lines(table, out):
        if not isinstance(record, dict):
            out.skip(where, "not_an_object", f"a JSON {type(record).__name__}, not an object")
            continue
        image = record.get("image")
        if not isinstance(image, str) or not image:
            out.skip(where, "missing_image_field", "no image path")
            continue
        if not any(k in record for k in CAPTION_FIELDS):
            out.skip(where, "missing_caption", "neither 'caption' nor 'captions'")
            continue
        value = record["captions"] if "captions" in record else record["caption"]
        meta = {k: v for k, v in record.items() if k != "image" and k not in CAPTION_FIELDS}
        out.rows.append((os.path.join(root, image), caption_list(value, where, out), meta))


def read_pair_table(table: str, image_root: str | None = None, out: TableRows | None = None) -> TableRows:
    """Rows of one table, added to `out` if given. Relative image paths are taken relative to
    `image_root` (default: the table's folder)."""
    out = out if out is not None else TableRows()
    root = image_root or os.path.dirname(os.path.abspath(table))
    if table.endswith(".csv"):
        _read_csv(table, root, out)
    else:
        _read_jsonl(table, root, out)
    return out
