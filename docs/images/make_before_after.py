"""Regenerate docs/images/before_after.png: a synthetic scene, a synthetic degradation of it, and what
``supir-rt restore --tiny-random`` makes of the degraded image.

The third panel comes from random weights: it shows the pipeline running end to end and is NOT a
restoration (no SUPIR weights can be downloaded where this picture was made).
Run from the repository root: ``python docs/images/make_before_after.py``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 192


def scene() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    sky = np.stack([90 + 80 * y, 140 + 60 * y, 230 - 40 * y], -1)
    img = Image.fromarray(sky.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse((120, 20, 170, 70), fill=(250, 220, 90))
    d.polygon([(0, 150), (60, 80), (120, 150)], fill=(70, 110, 70))
    d.polygon([(70, 150), (140, 70), (192, 150)], fill=(50, 90, 60))
    d.rectangle((0, 150, SIZE, SIZE), fill=(60, 120, 170))
    for i in range(0, SIZE, 8):
        d.line((i, 160 + (i % 16) // 4, i + 5, 160 + (i % 16) // 4), fill=(200, 220, 240))
    d.text((8, 8), "supir-rt", fill=(255, 255, 255))
    return img


def degrade(img: Image.Image) -> Image.Image:
    """x4 bicubic down and up, Gaussian blur 1.2 px, Gaussian noise sigma 8, JPEG quality 20."""
    small = img.resize((SIZE // 4, SIZE // 4), Image.Resampling.BICUBIC).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    arr = np.asarray(small.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    arr += np.random.default_rng(0).normal(0, 8, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=20)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def main() -> None:
    clean = scene()
    bad = degrade(clean)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "degraded.png", Path(tmp) / "out.png"
        bad.save(src)
        subprocess.run([sys.executable, "-m", "supir_rt.cli", "restore", str(src), "-o", str(out), "--tiny-random",
                        "--steps", "4", "--min-size", "256", "-q"], check=True)
        tiny = Image.open(out).convert("RGB")
    labels = ["clean (synthetic)", "degraded input", "--tiny-random output:", ]
    sheet = Image.new("RGB", (3 * SIZE + 20, SIZE + 34), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i, (panel, label) in enumerate(zip((clean, bad, tiny), labels)):
        sheet.paste(panel, (i * (SIZE + 10), 0))
        d.text((i * (SIZE + 10) + 2, SIZE + 3), label, fill=(0, 0, 0))
    d.text((2 * (SIZE + 10) + 2, SIZE + 18), "random weights, NOT a restoration", fill=(180, 0, 0))
    target = Path(__file__).with_name("before_after.png")
    sheet.save(target, optimize=True)
    print(target, target.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
