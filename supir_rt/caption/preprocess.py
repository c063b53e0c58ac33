"""LLaVA-1.5 image preprocessing, as SUPIR calls it (``image_processor.preprocess`` directly).

This is transformers' ``CLIPImageProcessor`` for ``openai/clip-vit-large-patch14-336``: RGB, resize so
the short side is 336 (PIL bicubic; the long side truncated, ``int(336 * long / short)``), centre
crop 336x336 (offsets floored), rescale by 1/255 (in float64, then float32), normalise with the CLIP
mean/std. LLaVA's ``image_aspect_ratio: pad`` is *not* applied (SUPIR bypasses ``process_images``), so
non-square images lose their edges, as in the original.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"image {width}x{height} is smaller than the {size}px crop after resizing")
    top = (height - size) // 2
    left = (width - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_image(
    image: Image.Image,
    size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """PIL image -> ``pixel_values`` float32 ``[1, 3, size, size]``."""
    image = center_crop(resize_short_side(image.convert("RGB"), size), size)
    x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W)
