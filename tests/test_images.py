"""Image I/O: the files people have (EXIF, modes, alpha, 16-bit), bad files, atomic writes, metadata."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from supir_rt import images
from supir_rt.images import (
    ImageError, check_output_path, load_image, read_metadata, save_image,
)


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (gray, RGB or RGBA by channel count), written by hand so every Pillow reads it."""
    h, w = arr.shape[:2]
    color_type = {1: 0, 3: 2, 4: 6}[1 if arr.ndim == 2 else arr.shape[2]]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return _png(w, h, 16, color_type, zlib.compress(raw))


def _png(w: int, h: int, depth: int, color_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgb_array(w: int = 12, h: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    arr = rgb_array(20, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (10, 20)
    assert any("EXIF" in note for note in loaded.notes)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "I", "F"])
def test_non_rgb_modes_become_rgb(tmp_path, mode):
    img = Image.fromarray(rgb_array()).convert(mode)
    loaded = images.from_pil(img)
    assert loaded.rgb.mode == "RGB" and loaded.alpha is None and loaded.size == (12, 8)


def test_grayscale_file_becomes_rgb_with_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(rgb_array()[..., 0], "L").save(path)
    arr = np.asarray(load_image(path).rgb)
    assert arr.shape == (8, 12, 3)
    assert np.array_equal(arr[..., 0], arr[..., 2])


def test_palette_with_transparency_keeps_alpha(tmp_path):
    img = Image.fromarray(rgb_array()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    img.info["transparency"] = 0
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.rgb.mode == "RGB" and loaded.alpha is not None
    assert 0 in np.asarray(loaded.alpha)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_split_off(tmp_path, mode):
    rgba = np.dstack([rgb_array(), np.linspace(0, 255, 96, dtype=np.uint8).reshape(8, 12)])
    img = Image.fromarray(rgba, "RGBA").convert(mode)
    loaded = images.from_pil(img)
    assert loaded.rgb.mode == "RGB"
    assert np.array_equal(np.asarray(loaded.alpha), rgba[..., 3])


def test_16_bit_png_inputs(tmp_path):
    gray = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    (tmp_path / "g16.png").write_bytes(png16(gray))
    arr = np.asarray(load_image(tmp_path / "g16.png").rgb)
    assert np.array_equal(arr[..., 0], np.round(gray / 257).astype(np.uint8))

    rgb = (np.arange(60).reshape(4, 5, 3) * 1000).astype(np.uint16)
    (tmp_path / "c16.png").write_bytes(png16(rgb))
    assert np.array_equal(np.asarray(load_image(tmp_path / "c16.png").rgb), (rgb >> 8).astype(np.uint8))

    rgba = (np.arange(80).reshape(4, 5, 4) * 800).astype(np.uint16)
    (tmp_path / "a16.png").write_bytes(png16(rgba))
    loaded = load_image(tmp_path / "a16.png")
    assert loaded.rgb.size == (5, 4) and loaded.alpha is not None


def test_missing_file_folder_and_non_image(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    (tmp_path / "notes.png").write_text("hello, not pixels")
    with pytest.raises(ImageError, match="not an image"):
        load_image(tmp_path / "notes.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(path)


def test_huge_dimensions_are_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(100_000, 100_000, 8, 2, zlib.compress(b"\x00" * 10)))
    with pytest.raises(ImageError, match="--max-pixels") as err:
        load_image(path)
    assert "100000x100000" in str(err.value)
    # raising the limit gets past the guard; the file is then found to be damaged, still a clear error
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(path, max_pixels=10**10 + 1)


def test_small_limit_is_enforced(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(rgb_array()).save(path)
    with pytest.raises(ImageError, match="above the limit of 50"):
        load_image(path, max_pixels=50)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def test_png_round_trip_with_alpha_and_metadata(tmp_path):
    path = tmp_path / "out.png"
    alpha = Image.fromarray(np.full((8, 12), 77, np.uint8), "L")
    save_image(path, rgb_array(), alpha=alpha, metadata={"settings": {"seed": 5}, "caption": "ü"})
    with Image.open(path) as img:
        assert img.mode == "RGBA" and img.getpixel((0, 0))[3] == 77
    assert read_metadata(path) == {"settings": {"seed": 5}, "caption": "ü"}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # usual permissions, not the temp file's 0600


@pytest.mark.parametrize("ext", [".jpg", ".webp", ".tif"])
def test_other_formats_carry_metadata(tmp_path, ext):
    path = tmp_path / f"out{ext}"
    save_image(path, rgb_array(), metadata={"seed": 3})
    assert read_metadata(path) == {"seed": 3}


def test_jpeg_drops_alpha_with_a_warning(tmp_path, caplog):
    path = tmp_path / "out.jpg"
    save_image(path, rgb_array(), alpha=np.zeros((8, 12), np.uint8))
    assert "alpha channel is dropped" in caplog.text
    with Image.open(path) as img:
        assert img.mode == "RGB"


def test_unknown_extension(tmp_path):
    with pytest.raises(ImageError, match="extension '.xyz'"):
        save_image(tmp_path / "out.xyz", rgb_array())


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous result")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "replace", boom)
    with pytest.raises(ImageError, match="No space left"):
        save_image(target, rgb_array())
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_unwritable_destinations(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ImageError, match="not a folder"):
        check_output_path(blocker / "out.png")
    with pytest.raises(ImageError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.png")
    with pytest.raises(ImageError, match="does not exist|not writable|cannot write"):
        save_image(tmp_path / "missing" / "out.png", rgb_array())


def test_output_equal_to_input_is_refused(tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(rgb_array()).save(src)
    with pytest.raises(ImageError, match="refusing to overwrite an input"):
        check_output_path(tmp_path / "." / "in.png", [src], overwrite=True)
    link = tmp_path / "link.png"
    link.symlink_to(src)
    with pytest.raises(ImageError, match="refusing to overwrite an input"):
        check_output_path(link, [src], overwrite=True)


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"x")
    with pytest.raises(ImageError, match="--overwrite"):
        check_output_path(out)
    assert check_output_path(out, overwrite=True) == out


def test_input_extensions_cover_folders(tmp_path):
    for name in ("a.png", "b.JPG", ".hidden.png", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(p.name for p in tmp_path.iterdir() if images.is_image_file(p)) == ["a.png", "b.JPG"]
