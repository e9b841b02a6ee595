"""Turn one raw record into model-ready tensors for a stream kind.

Every random choice (augmentation, caption pick, MLM and MIM masks) is drawn from a seed derived
from (run seed, epoch, sample key), so a sample's tensors do not depend on where in the stream it
lands, on the worker that made it, or on whether the run was resumed.

Fields by kind (batched by collate: tensors stacked, other values listed):
    image_text: image, text_ids, text_mask, mlm_ids, mlm_labels      image: image, mim_mask
    text:       text_ids, text_mask, mlm_ids, mlm_labels
    vqa:        image, text_ids, text_mask (the question), vqa_targets [#answers] float32 (soft scores,
                vqa_targets.py), qid (int64), vqa_answers (the human answer strings, not a tensor)
    nlvr2:      image (left), image2 (right), text_ids, text_mask (the sentence), nlvr2_labels (1 = true)
The fine-tuning kinds carry no MLM fields. A training VQA question none of whose human answers is in
the vocabulary is skipped (`vqa_no_known_answer`), as the reference drops it; in evaluation
(train=False) it is kept with zero targets, so accuracy counts every question (a test split has no
answers at all).
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vlmo_large.data import decoding
from vlmo_large.data.masking import block_mim_mask, whole_word_mlm
from vlmo_large.data.transforms import eval_transform, train_transform
from vlmo_large.data.vqa_targets import soft_targets, target_tensor

KINDS = ("image_text", "image", "text", "vqa", "nlvr2")


def stable_hash(*parts) -> int:
    """63-bit hash that is the same in every process (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """timm/torchvision transforms draw from the global random, numpy and torch generators:
    seed them for one sample and put the caller's state back afterwards."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


@dataclass
class SampleProcessor:
    kind: str
    tokenizer: object | None
    image_size: int
    max_text_len: int
    train: bool = True
    mlm_prob: float = 0.15
    mim_ratio: float = 0.4
    patch_size: int = 16
    augment: str = "spec"
    pixels: str = "float"  # "uint8": raw pixels, normalised on the device (transforms.py)
    answers: Sequence[str] | None = None  # vqa: the answer vocabulary, in the classifier's order

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "image" and self.tokenizer is None:
            raise ValueError(f"kind {self.kind!r} needs a tokenizer")
        if self.kind == "vqa" and not self.answers:
            raise ValueError("kind 'vqa' needs the answer vocabulary (answers=)")
        self._answer_index = {answer: i for i, answer in enumerate(self.answers or ())}
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        self.transform = (train_transform(self.image_size, self.augment, pixels=self.pixels) if self.train
                          else eval_transform(self.image_size, pixels=self.pixels))

    def __call__(self, record: dict, seed: int, notes: list[str]) -> dict:
        """Tensors for one record, or SkipSample. `notes` collects non-fatal events."""
        if self.kind == "vqa":
            return self._vqa(record, seed, notes)
        if self.kind == "nlvr2":
            return self._nlvr2(record, seed, notes)
        rng = np.random.default_rng(seed)
        out: dict = {}
        if self.kind in ("image_text", "image"):
            out["image"] = self._image(decoding.image_bytes(record), seed, notes)
        if self.kind in ("image_text", "text"):
            texts = decoding.captions(record)
            text = texts[int(rng.integers(len(texts)))] if self.train else texts[0]
            out.update(self._text_fields(text, rng))
        if self.kind == "image":
            grid = self.image_size // self.patch_size
            out["mim_mask"] = torch.from_numpy(block_mim_mask(grid, rng=rng, ratio=self.mim_ratio))
        return out

    def _image(self, data: bytes, seed: int, notes: list[str]) -> torch.Tensor:
        img = decoding.decode_image(data, notes)
        with seeded_global_rngs(seed):
            return self.transform(img)

    def _text(self, text: str) -> dict:
        ids, mask = self.tokenizer.encode(text, self.max_text_len)
        return {"text_ids": torch.tensor(ids, dtype=torch.int64), "text_mask": torch.tensor(mask, dtype=torch.int64)}

    def _vqa(self, record: dict, seed: int, notes: list[str]) -> dict:
        meta = decoding.json_fields(record, {"question": str, "answers": list, "qid": int}, "bad_vqa_json")
        answers = [a for a in meta["answers"] if isinstance(a, str)]
        targets = soft_targets(answers, self._answer_index)
        if self.train and not targets:
            raise decoding.SkipSample("vqa_no_known_answer")
        return {"image": self._image(decoding.image_bytes(record), seed, notes), **self._text(meta["question"]),
                "vqa_targets": target_tensor([targets], len(self._answer_index))[0],
                "qid": torch.tensor(meta["qid"], dtype=torch.int64), "vqa_answers": answers}

    def _nlvr2(self, record: dict, seed: int, notes: list[str]) -> dict:
        meta = decoding.json_fields(record, {"sentence": str, "label": bool}, "bad_nlvr2_json")
        left, right = (decoding.image_bytes(record, f"img{side}") for side in (0, 1))
        return {"image": self._image(left, seed, notes), "image2": self._image(right, stable_hash(seed, "img1"), notes),
                **self._text(meta["sentence"]), "nlvr2_labels": torch.tensor(int(meta["label"]), dtype=torch.int64)}

    def _text_fields(self, text: str, rng: np.random.Generator) -> dict:
        tok, out = self.tokenizer, self._text(text)
        ids = out["text_ids"].numpy()
        mlm_ids, labels = whole_word_mlm(ids, tok.word_starts(ids), rng=rng, mask_id=tok.mask_id,
                                         special_ids=tok.special_ids, vocab_size=tok.vocab_size,
                                         prob=self.mlm_prob)
        return {**out, "mlm_ids": torch.from_numpy(mlm_ids), "mlm_labels": torch.from_numpy(labels)}


def collate(samples: list[dict]) -> dict:
    """Stack per-sample tensors into a batch; other fields (vqa_answers) and `keys` become lists."""
    batch = {}
    for name in samples[0]:
        if name not in ("key", "index"):
            values = [s[name] for s in samples]
            batch[name] = torch.stack(values) if torch.is_tensor(values[0]) else values
    batch["keys"] = [s["key"] for s in samples]
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    return batch
