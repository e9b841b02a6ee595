"""Read records from webdataset tar shards, never raising on bad shards.

A record is the webdataset grouping of consecutive files sharing a key (webdataset's own
`base_plus_ext` split): {"__key__", "__url__", ext: bytes}. A missing or unreadable shard, or one
that ends mid-file, is reported through `on_event(reason)` and reading goes on with the next shard.
The grouping is done here rather than by webdataset's `group_by_keys` so that, on damage, every
record known to be complete (a later key had started) is kept and only the one in progress is lost.
"""
from __future__ import annotations

import tarfile
from typing import Callable, Iterator, Sequence

from webdataset.tariterators import base_plus_ext


def read_shard(path: str, on_event: Callable[[str], None]) -> Iterator[dict]:
    try:
        stream = open(path, "rb")
    except OSError:
        on_event("missing_shard")
        return
    current: dict | None = None
    with stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None or member.name.startswith("__"):
                        continue
                    if current is not None and key != current["__key__"]:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": path}
                    current[ext.lower()] = tar.extractfile(member).read()
                    tar.members = []  # streaming: do not keep every header in memory
        except (tarfile.TarError, EOFError, OSError):
            # a shard cut short (tarfile: ReadError / "unexpected end of data") or not a tar
            on_event("truncated_shard")
            return
    if current is not None:
        yield current


def read_shards(paths: Sequence[str], on_event: Callable[[str], None],
                on_shard_end: Callable[[int], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (shard position in `paths`, record); call `on_shard_end(pos)` after each shard."""
    for pos, path in enumerate(paths):
        for record in read_shard(path, on_event):
            yield pos, record
        if on_shard_end is not None:
            on_shard_end(pos)
