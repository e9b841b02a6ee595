"""The run config's `task` section: settings only some tasks read (the fine-tuning ones)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TaskOptions:
    answers: Optional[str] = None       # VQA: the answer vocabulary, a JSON list built from the training annotations
    num_answers: Optional[int] = None   # VQA: the classifier's width; None: the vocabulary's length
    rerank_k: int = 0                   # retrieval evaluation: ITM re-ranks each query's top k (0: dual encoder only)
