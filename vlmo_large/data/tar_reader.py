"""Read records from webdataset tar shards, never raising on bad shards.

A record is the webdataset grouping of consecutive files sharing a key (webdataset's own
`base_plus_ext` split): {"__key__", "__url__", ext: bytes}. Shards are local paths or URLs
(shard_stream). Problems are reported through `on_event(reason)` and reading goes on with the
next shard:
    missing_shard    the shard cannot be opened, or its URL/command fails before sending a byte
    not_a_tar        what arrived is not a (possibly compressed) tar, an empty file included
    truncated_shard  the shard ends or fails mid-way; records before the damage are kept
    shard_timeout    no byte arrived for `timeout` seconds (a hung mount, a stalled pipe)
    duplicate_key    a key seen again right after its own record (webdataset would merge the two
                     and keep only the second's files): the repeat is dropped, the first kept
The grouping is done here rather than by webdataset's `group_by_keys` so that, on damage, every
record known to be complete (a later key had started) is kept and only the one in progress is lost.
"""
from __future__ import annotations

import tarfile
from typing import Callable, Iterator, Sequence

from webdataset.tariterators import base_plus_ext

from vlmo_large.data.shard_stream import ShardTimeout, TimedReader

DEFAULT_TIMEOUT_S = 300.0


def read_shard(path: str, on_event: Callable[[str], None], timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[dict]:
    current: dict | None = None
    repeat: set[str] | None = None  # extensions of a duplicate of `current` being dropped
    members = 0
    with TimedReader(path, timeout) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    members += 1
                    if not member.isreg():
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None or member.name.startswith("__"):
                        continue
                    ext = ext.lower()
                    if current is not None and key == current["__key__"] and (repeat is not None or ext in current):
                        if repeat is None or ext in repeat:  # one more copy of the same key
                            on_event("duplicate_key")
                            repeat = set()
                        repeat.add(ext)
                        continue
                    if current is not None and key != current["__key__"]:
                        yield current
                        current, repeat = None, None
                    if current is None:
                        current = {"__key__": key, "__url__": path}
                    current[ext] = tar.extractfile(member).read()
                    tar.members = []  # streaming: do not keep every header in memory
        except ShardTimeout:
            on_event("shard_timeout")
            return
        except (tarfile.TarError, EOFError, OSError):
            if stream.error is not None and stream.delivered == 0:
                on_event("missing_shard")  # not openable, or the URL / command failed at once
            elif members == 0:
                on_event("not_a_tar")
            else:
                on_event("truncated_shard")  # cut short ("unexpected end of data") or failed mid-way
            return
    if current is not None:
        yield current


def read_shards(paths: Sequence[str], on_event: Callable[[str], None],
                on_shard_end: Callable[[int], None] | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[int, dict]]:
    """Yield (shard position in `paths`, record); call `on_shard_end(pos)` after each shard."""
    for pos, path in enumerate(paths):
        for record in read_shard(path, on_event, timeout):
            yield pos, record
        if on_shard_end is not None:
            on_shard_end(pos)
