"""Open a shard (local path or URL) as a byte stream whose reads give up after a stall.

URLs go through webdataset's own opener (`webdataset.gopen`): `pipe:<command>` (the command's
stdout), `http(s)://` (curl), `gs://`, ... and, registered here, `s3://` (the AWS CLI, `aws s3 cp
<url> -`, which reads the usual AWS credentials and endpoint settings).

A hung network mount or a pipe that never writes would block a loader worker for ever. So the
opening and every read happen in a helper thread, and the reader waits at most `timeout` seconds
for the next chunk: then it raises `ShardTimeout` (the shard is skipped and counted) and kills a
pipe's process. A thread stuck inside the kernel (a read on a dead mount) cannot be interrupted;
it is a daemon and is left behind, the worker moves on.
"""
from __future__ import annotations

import queue
import re
import threading

import psutil

from webdataset.gopen import Pipe, gopen, gopen_schemes

CHUNK = 1 << 20
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def is_url(spec: str) -> bool:
    """`pipe:...`, `http://...`, `s3://...`; not a local path (a Windows drive letter is not used here)."""
    return bool(_URL.match(spec))


def _gopen_s3(url, mode="rb", bufsize=8192, **kw):
    if mode[0] != "r":
        raise ValueError(f"{mode}: only reading s3:// shards is supported")
    # 141: SIGPIPE when the reader stops early, as webdataset's own pipe handlers allow
    return Pipe(["aws", "s3", "cp", url, "-"], mode=mode, bufsize=bufsize, ignore_status=[141])


gopen_schemes.setdefault("s3", _gopen_s3)


def _kill_tree(proc) -> None:
    """Kill a pipe's shell and what it started (`sh -c "a | b"` runs its commands as children)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        victims = []
    proc.kill()
    for child in victims:
        try:
            child.kill()
        except psutil.Error:
            pass


class ShardTimeout(Exception):
    """No byte of the shard arrived within the timeout."""


class TimedReader:
    """A read-only file object over `gopen(url)` filled by a helper thread (see module doc)."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._handle = None
        self._chunk, self._offset, self._eof = b"", 0, False  # the chunk being read and where
        self.delivered = 0  # bytes handed out so far
        self.error: BaseException | None = None  # the opener's or the stream's own failure
        threading.Thread(target=self._pump, name=f"shard-reader {url}", daemon=True).start()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _pump(self) -> None:
        try:
            # local paths: plain open (webdataset's gopen refuses them when WDS_SECURE is set)
            self._handle = gopen(self.url, "rb") if is_url(self.url) else open(self.url, "rb")
            while not self._stop.is_set():
                data = self._handle.read(CHUNK)
                if not data:
                    handle, self._handle = self._handle, None
                    handle.close()  # webdataset's Pipe raises here if the command (curl, aws) failed
                    self._put(b"")
                    break
                self._put(bytes(data))
        except BaseException as exc:  # handed to the reader, raised there
            self._put(exc)
        finally:
            self._close_handle()

    def _close_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        if self._stop.is_set():  # webdataset's Pipe: do not wait for a hung command
            _kill_tree(getattr(handle, "proc", None))
        try:
            handle.close()
        except Exception:
            pass  # a killed or failed command's status: the reader has already counted the shard

    def read(self, size: int = -1) -> bytes:
        parts, wanted = [], size
        while not self._eof and (wanted < 0 or wanted > 0):
            if self._offset >= len(self._chunk):
                self._next_chunk()
                continue
            end = len(self._chunk) if wanted < 0 else min(len(self._chunk), self._offset + wanted)
            parts.append(self._chunk[self._offset:end])
            wanted -= 0 if wanted < 0 else end - self._offset
            self._offset = end
        out = b"".join(parts)
        self.delivered += len(out)
        return out

    def _next_chunk(self) -> None:
        try:
            item = self._queue.get(timeout=self.timeout)
        except queue.Empty:
            raise ShardTimeout(f"{self.url}: no data for {self.timeout:g} s") from None
        if isinstance(item, BaseException):
            self.error = item
            raise item
        self._chunk, self._offset, self._eof = item, 0, not item

    def close(self) -> None:
        self._stop.set()
        _kill_tree(getattr(self._handle, "proc", None))  # unblocks the helper thread's read of the pipe

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
