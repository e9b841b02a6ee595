"""Turn one raw record into model-ready tensors for a stream kind.

Every random choice (augmentation, caption pick, MLM and MIM masks) is drawn from a seed derived
from (run seed, epoch, sample key), so a sample's tensors do not depend on where in the stream it
lands, on the worker that made it, or on whether the run was resumed.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from vlmo_large.data import decoding
from vlmo_large.data.masking import block_mim_mask, whole_word_mlm
from vlmo_large.data.transforms import eval_transform, train_transform

KINDS = ("image_text", "image", "text")


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

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "image" and self.tokenizer is None:
            raise ValueError(f"kind {self.kind!r} needs a tokenizer")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        self.transform = (train_transform(self.image_size, self.augment, pixels=self.pixels) if self.train
                          else eval_transform(self.image_size, pixels=self.pixels))

    def __call__(self, record: dict, seed: int, notes: list[str]) -> dict:
        """Tensors for one record, or SkipSample. `notes` collects non-fatal events."""
        rng = np.random.default_rng(seed)
        out: dict = {}
        if self.kind in ("image_text", "image"):
            img = decoding.decode_image(decoding.image_bytes(record), notes)
            with seeded_global_rngs(seed):
                out["image"] = self.transform(img)
        if self.kind in ("image_text", "text"):
            texts = decoding.captions(record)
            text = texts[int(rng.integers(len(texts)))] if self.train else texts[0]
            out.update(self._text_fields(text, rng))
        if self.kind == "image":
            grid = self.image_size // self.patch_size
            out["mim_mask"] = torch.from_numpy(block_mim_mask(grid, rng=rng, ratio=self.mim_ratio))
        return out

    def _text_fields(self, text: str, rng: np.random.Generator) -> dict:
        tok = self.tokenizer
        ids, mask = tok.encode(text, self.max_text_len)
        ids = np.asarray(ids, dtype=np.int64)
        mlm_ids, labels = whole_word_mlm(ids, tok.word_starts(ids), rng=rng, mask_id=tok.mask_id,
                                         special_ids=tok.special_ids, vocab_size=tok.vocab_size,
                                         prob=self.mlm_prob)
        return {"text_ids": torch.from_numpy(ids), "text_mask": torch.tensor(mask, dtype=torch.int64),
                "mlm_ids": torch.from_numpy(mlm_ids), "mlm_labels": torch.from_numpy(labels)}


def collate(samples: list[dict]) -> dict:
    """Stack per-sample tensors into a batch; `keys` stays a list of strings."""
    batch = {name: torch.stack([s[name] for s in samples])
             for name in samples[0] if name not in ("key", "index")}
    batch["keys"] = [s["key"] for s in samples]
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    return batch
