"""Turn a raw webdataset record (bytes per extension) into an RGB image and/or a caption.

Bad input raises `SkipSample(reason)`; the stream counts the reason and moves on. Unusual image
modes are converted (and counted apart from the skips, as `converted_<mode>`), never rejected.
"""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
# refuse decompression bombs instead of stalling a worker on one giant image
MAX_IMAGE_PIXELS = 16384 * 16384
CONVERTED = "converted_"  # prefix of the counters of images converted to RGB and used


class SkipSample(Exception):
    """Raised for a sample that cannot be used; `reason` is the counter name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def image_bytes(record: dict, name: str | None = None) -> bytes:
    """The record's image: `<key>.<ext>`, or `<key>.<name>.<ext>` when named (NLVR2's img0 / img1)."""
    for ext in IMAGE_EXTENSIONS:
        member = f"{name}.{ext}" if name else ext
        if member in record:
            return record[member]
    raise SkipSample("missing_image")


def json_fields(record: dict, fields: dict[str, type], reason: str) -> dict:
    """The record's `json` member as an object holding each of `fields` with its type (bool is not an
    int here); anything else is SkipSample(reason)."""
    try:
        meta = json.loads(record["json"].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, ValueError):
        raise SkipSample(reason) from None
    if not isinstance(meta, dict):
        raise SkipSample(reason)
    for name, kind in fields.items():
        value = meta.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SkipSample(reason)
    return meta


def decode_image(data: bytes, notes: list[str] | None = None) -> Image.Image:
    """Decode to an 8-bit RGB image; append `converted_<mode>` to `notes` for non-RGB input."""
    if not data:
        raise SkipSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise SkipSample("image_too_large")
            img.load()  # truncated files fail here, not at open
    except SkipSample:
        raise
    except Exception:
        raise SkipSample("corrupt_image") from None
    if img.width == 0 or img.height == 0:
        raise SkipSample("empty_image")
    if img.mode != "RGB" and notes is not None:
        notes.append(f"{CONVERTED}{img.mode}")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        # 16/32-bit greyscale: PIL's convert would clip at 255; rescale the value range instead
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # composite on white: transparent pixels often hold arbitrary (black) colour values
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample("bad_text_encoding") from None
    text = " ".join(text.split())
    if not text:
        raise SkipSample("empty_caption")
    return text


def captions(record: dict) -> list[str]:
    """All captions of a record: `txt` (one caption) or `json` ({"captions": [...]}, {"caption": str},
    a list of strings or a string). Non-string entries of a list are ignored; any other JSON shape
    (number, bool, null, object) is `bad_caption_json`."""
    if "txt" in record:
        return [decode_text(record["txt"])]
    if "json" in record:
        try:
            meta = json.loads(record["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise SkipSample("bad_text_encoding") from None
        items = meta.get("captions", meta.get("caption")) if isinstance(meta, dict) else meta
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or (items and not any(isinstance(t, str) for t in items)):
            raise SkipSample("bad_caption_json")
        texts = [" ".join(t.split()) for t in items if isinstance(t, str)]
        texts = [t for t in texts if t]
        if not texts:
            raise SkipSample("empty_caption")
        return texts
    raise SkipSample("missing_caption")
