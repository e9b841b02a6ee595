"""Read records from webdataset tar shards, never raising on bad shards.

A record is webdataset's grouping of the files sharing a key: {"__key__", "__url__", ext: bytes}.
A missing or unreadable shard, or one that ends mid-file, is reported through `on_event(reason)`
and the stream continues with the next shard (the records read before the damage are kept).
"""
from __future__ import annotations

import tarfile
from typing import Callable, Iterator, Sequence

from webdataset.tariterators import group_by_keys, tar_file_iterator


def _files(path: str, stream) -> Iterator[dict]:
    for item in tar_file_iterator(stream):
        item["__url__"] = path
        yield item


def read_shard(path: str, on_event: Callable[[str], None]) -> Iterator[dict]:
    try:
        stream = open(path, "rb")
    except OSError:
        on_event("missing_shard")
        return
    with stream:
        try:
            yield from group_by_keys(_files(path, stream))
        except (tarfile.TarError, EOFError, OSError, ValueError):
            # a tar cut short: tarfile reports it as ReadError/EOFError ("unexpected end of data")
            on_event("truncated_shard")


def read_shards(paths: Sequence[str], on_event: Callable[[str], None],
                on_shard_end: Callable[[int], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (shard position in `paths`, record); call `on_shard_end(pos)` after each shard."""
    for pos, path in enumerate(paths):
        for record in read_shard(path, on_event):
            yield pos, record
        if on_shard_end is not None:
            on_shard_end(pos)
