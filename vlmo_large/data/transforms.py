"""Image transforms, built from timm's factory (docs/MODEL.md section 4).

augment="spec" (pretraining default): RandomResizedCrop(scale 0.5-1, bicubic) -> horizontal flip
    -> RandAugment(n=2, m=7) -> ToTensor -> normalise(mean 0.5, std 0.5)
augment="light": RandomResizedCrop(scale 0.8-1) only. Flips, inversion and colour operations
    would falsify captions that name sides and colours (the synthetic dataset's do).
augment="none" / eval: resize -> crop ("squash": straight to a square, as the reference does for
    fine-tuning and retrieval; "center": short side then center crop) -> normalise

pixels="float" ends as above, a normalised float32 [3, H, W] tensor. pixels="uint8" stops before
ToTensor/normalise, at the uint8 [3, H, W] pixels (timm's prefetcher output): a quarter of the
bytes to move between processes and to the GPU; device_batch.normalize_pixels then does
(x / 255 - mean) / std on the device, the same float operations as ToTensor + Normalize.
"""
from __future__ import annotations

from timm.data import create_transform

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
RAND_AUGMENT = "rand-m7-n2"
AUGMENTS = ("spec", "light", "none")
PIXELS = ("float", "uint8")


def _raw_pixels(pixels: str) -> bool:
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
    return pixels == "uint8"


def train_transform(image_size: int, augment: str = "spec", pixels: str = "float"):
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if augment == "none":
        return eval_transform(image_size, pixels=pixels)
    spec = augment == "spec"
    return create_transform(image_size, is_training=True, scale=(0.5, 1.0) if spec else (0.8, 1.0),
                            ratio=(3 / 4, 4 / 3) if spec else (0.9, 1.1), hflip=0.5 if spec else 0.0,
                            color_jitter=None, auto_augment=RAND_AUGMENT if spec else None,
                            interpolation="bicubic", mean=MEAN, std=STD, re_prob=0.0,
                            use_prefetcher=_raw_pixels(pixels))


def eval_transform(image_size: int, crop_mode: str = "squash", pixels: str = "float"):
    return create_transform(image_size, is_training=False, interpolation="bicubic", crop_pct=1.0,
                            crop_mode=crop_mode, mean=MEAN, std=STD, use_prefetcher=_raw_pixels(pixels))
