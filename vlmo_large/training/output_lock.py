"""One run per output folder: an exclusive flock on <output_dir>/.run.lock for the run's lifetime.

Two runs started into the same output_dir used to both train and interleave their checkpoints.
The lock is the kernel's (fcntl.flock), so it goes away with the process however that ends,
kill -9 included, and a stale lock file never blocks the next run. The file holds the holder's
pid and host, for the refusal message.

    lock = OutputLock(cfg.output_dir)
    lock.acquire()          # UserError naming the folder and the holder when another run has it
    ...
    lock.release()          # or leave it to the object's end or the process's
"""
from __future__ import annotations

import fcntl
import os
import socket

from vlmo_large.errors import UserError

LOCK_NAME = ".run.lock"


class OutputLock:
    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd = None

    def acquire(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"output_dir {self.output_dir} is in use by another run ({holder}); "
                            f"wait for it to end or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release  # a run started in-process (launchers/demo.py) frees the folder when it returns
