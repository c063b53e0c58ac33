"""Helpers for the serving tests: test images, free ports, PNG bombs, image comparison."""

from __future__ import annotations

import io
import socket
import struct
import zlib

import numpy as np
from PIL import Image

# Fast settings for the tiny model on 2 CPU cores.
FAST = {"num_steps": 2, "min_size": 128}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(seed: int, size=(48, 40), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header declaring width x height grey pixels, with almost no data (a decompression bomb
    as far as the header is concerned; written by hand: chunk = length, type, data, CRC32)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def assert_same_image(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to what a batched convolution may round differently on CPU: at most 1 grey level on at
    most 0.1 % of the values (tests/test_batching.py explains the bound)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (int(diff.max()), float((diff > 0).mean()))
