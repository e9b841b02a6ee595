"""<output_dir>/metrics.jsonl: one JSON line per optimizer step, appended and flushed as training
goes (rank 0), so that a run killed at any point keeps every step it logged.

On (re)start the lines of steps after the starting step are dropped first: those steps belong to
a run whose later work was lost and they are trained again now, so the file never holds a step
twice. A fresh start (step 0) therefore empties it, like the checkpoints it describes. A line cut
off by a kill mid-write is dropped too.

    log = MetricsFile(os.path.join(cfg.output_dir, "metrics.jsonl"), start_step=resumed_step)
    log.append({"step": 3, "loss": 4.2})
"""
from __future__ import annotations

import json
import os


def _kept_lines(path: str, start_step: int) -> list[str]:
    if not os.path.isfile(path):
        return []
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class MetricsFile:
    def __init__(self, path: str, start_step: int):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept = _kept_lines(path, start_step)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        self._file = open(path, "a")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
