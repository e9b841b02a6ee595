"""Resolve shard specifications to a list of local tar paths or URLs.

Accepted: a brace pattern ("data/shard-{000000..000099}.tar"), a glob ("data/*.tar"), a
comma-free list of either, or a directory (all *.tar inside). Paths a brace pattern names but
that do not exist are kept: the stream counts them as `missing_shard` and carries on. A
specification that matches no existing file at all is a configuration error, raised at once.
URLs (`pipe:cmd`, `http(s)://`, `s3://`, `gs://`..., read by shard_stream) are brace-expanded
only: no globbing and no existence check (they are only known once read).
"""
from __future__ import annotations

import glob
import os
from typing import Sequence

from braceexpand import braceexpand

from vlmo_large.data.shard_stream import is_url

_GLOB_CHARS = set("*?[")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not patterns:
        raise ValueError("no shards given")
    paths: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if is_url(pattern):
            paths.extend(braceexpand(pattern))
            continue
        found: list[str] = []
        for expanded in braceexpand(pattern):
            if os.path.isdir(expanded):
                found.extend(sorted(glob.glob(os.path.join(expanded, "*.tar"))))
            elif _GLOB_CHARS & set(expanded):
                found.extend(sorted(glob.glob(expanded)))
            else:
                found.append(expanded)
        if not any(os.path.exists(p) for p in found):  # a FIFO or device counts
            raise FileNotFoundError(f"shard pattern {pattern!r} matches no files")
        paths.extend(found)
    return paths
