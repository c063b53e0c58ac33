"""Image files in and out: the images people actually have, and outputs that are never half-written.

Reading (`load_image`):
* one clear `ImageError` for a missing, unreadable, truncated or non-image file, and for an image above
  the decompression-bomb limit (`max_pixels`, raise it when the file is trusted);
* EXIF orientation applied; palette, grayscale (8- and 16-bit), CMYK, YCbCr, LAB, ... converted to RGB;
  16-bit channels scaled to 8 bits (the official code quantises to uint8 anyway);
* alpha kept: returned separately so that RGB is restored and alpha resized and reattached.
  (Official `test.py` drops alpha without compositing; this is a documented difference.)

Writing (`save_image`): format from the extension, generation parameters in the metadata (PNG text
chunk ``supir-rt``, a JPEG comment, EXIF ImageDescription for WebP/TIFF), written to a temporary file in
the same folder and renamed over the target (`os.replace`), so a crash leaves no partial file. Inputs are
never overwritten (`check_output_path`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from supir_rt.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Largest input accepted by default (64 megapixels): far beyond what SUPIR can process at once, small
enough to refuse decompression bombs before decoding them. Raise with ``max_pixels`` / ``--max-pixels``."""

METADATA_KEY = "supir-rt"
"""PNG text-chunk key (and JSON top-level object) holding the generation parameters."""

# Output formats by extension: extension -> (PIL format, supports alpha).
OUTPUT_FORMATS: dict[str, tuple[str, bool]] = {
    ".png": ("PNG", True),
    ".jpg": ("JPEG", False),
    ".jpeg": ("JPEG", False),
    ".webp": ("WEBP", True),
    ".tif": ("TIFF", True),
    ".tiff": ("TIFF", True),
    ".bmp": ("BMP", False),
}
INPUT_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".jfif", ".ppm", ".pgm", ".pbm",
    ".tga", ".jp2", ".j2k", ".ico", ".avif", ".heic",
})

_PIL_LIMIT_LOCK = threading.Lock()


class ImageError(UserError):
    """An input image cannot be used, or an output cannot be written; the message names file and fix."""


@dataclass
class LoadedImage:
    """An input ready for restoration: 8-bit RGB, plus the alpha channel when the file had one."""

    rgb: Image.Image
    alpha: Image.Image | None = None
    path: Path | None = None
    source_mode: str = "RGB"
    icc_profile: bytes | None = None
    notes: list[str] = field(default_factory=list)  # what was converted, for the log

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """A regular, non-hidden file with a known image extension (used to list folders)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in INPUT_EXTENSIONS


def open_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode ``path``; every failure is one `ImageError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ImageError(f"{path} is a folder; pass image files, or the folder to the CLI to restore all images in it")
    try:
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            old_limit = Image.MAX_IMAGE_PIXELS
            # Our own limit replaces Pillow's; it is checked from the header, before any pixel is decoded.
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(path)
                _check_pixels(path, img.size, max_pixels)
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = old_limit
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"{path}: not an image Pillow can read; pass a PNG, JPEG, WebP, TIFF or BMP file"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: {err}; raise the limit with --max-pixels if you trust this file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied; make the file readable") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{path}: the image data is damaged or truncated ({err}); re-export or re-download it") from None
    return img


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{path}: image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{path}: image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
            "(decompression-bomb guard); if you trust this file, raise the limit with --max-pixels "
            f"{w * h} (Restorer: max_pixels={w * h})"
        )


def load_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``path`` as 8-bit RGB + optional alpha, with EXIF orientation applied."""
    path = Path(path)
    img = open_image(path, max_pixels=max_pixels)
    loaded = from_pil(img)
    loaded.path = path
    return loaded


def from_pil(img: Image.Image) -> LoadedImage:
    """Any PIL image -> `LoadedImage` (EXIF orientation, mode conversion, alpha split)."""
    source_mode = img.mode
    notes: list[str] = []
    icc = img.info.get("icc_profile")
    try:
        orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
            notes.append(f"EXIF orientation {orientation} applied")
    except Exception as err:  # a malformed EXIF block must not make the image unusable
        log.warning("ignoring unreadable EXIF orientation (%s)", err)
    if source_mode == "CMYK":
        icc = None  # the profile describes the CMYK data, not the converted RGB
    rgb, alpha = _to_rgb_alpha(img, notes)
    return LoadedImage(rgb=rgb, alpha=alpha, source_mode=source_mode, icc_profile=icc, notes=notes)


def _to_rgb_alpha(img: Image.Image, notes: list[str]) -> tuple[Image.Image, Image.Image | None]:
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        notes.append(f"{mode} (high bit depth) scaled to 8 bits")
        gray = Image.fromarray(_high_depth_to_uint8(img))
        return gray.convert("RGB"), None
    if mode == "P":
        has_alpha = "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        return img.convert("RGB"), img.getchannel("A")
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
        img = img.convert("RGB")
    return img, None


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0 / 255.0
        return np.clip(np.nan_to_num(arr * scale) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    # 16-bit data (PNG/TIFF) lives in 0..65535: scale by 255/65535 with rounding.
    return np.clip((arr * 255 + 32767) // 65535, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def output_format(path: str | Path) -> tuple[str, bool]:
    """(PIL format name, supports alpha) for an output path's extension."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in OUTPUT_FORMATS:
        raise ImageError(
            f"{path}: cannot tell the output format from the extension {ext or '(none)'!r}; "
            f"use one of {', '.join(sorted(OUTPUT_FORMATS))}"
        )
    return OUTPUT_FORMATS[ext]


def same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_path(output: str | Path, inputs: list[Path] | tuple[Path, ...] = (), *, overwrite: bool = False) -> Path:
    """Validate an output file path before any work: known extension, writable folder, not an input,
    not an existing file unless ``overwrite``. Returns the path."""
    output = Path(output)
    output_format(output)
    for src in inputs:
        if same_file(src, output):
            raise ImageError(f"output {output} is the input file {src}; refusing to overwrite an input, choose another -o")
    if output.is_dir():
        raise ImageError(f"output {output} is a folder; give a file name, or pass the folder with -o for batch output")
    if output.exists() and not overwrite:
        raise ImageError(f"output {output} already exists; remove it, choose another -o, or pass --overwrite")
    check_writable_folder(output.parent)
    return output


def check_writable_folder(folder: str | Path) -> None:
    folder = Path(folder) if str(folder) else Path(".")
    if not folder.exists():
        raise ImageError(f"output folder {folder} does not exist; create it or choose another -o")
    if not folder.is_dir():
        raise ImageError(f"output folder {folder} is not a folder; choose another -o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ImageError(f"output folder {folder} is not writable (permission denied); choose another -o")


def encode_metadata(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, ensure_ascii=False, default=str)


def save_image(
    path: str | Path,
    rgb: np.ndarray | Image.Image,
    *,
    alpha: Image.Image | np.ndarray | None = None,
    metadata: dict[str, Any] | None = None,
    icc_profile: bytes | None = None,
    quality: int = 95,
) -> Path:
    """Write an 8-bit RGB image (+ alpha) atomically; the format follows the extension.

    ``metadata`` is stored as JSON under the key ``supir-rt`` (PNG text chunk; JPEG comment; EXIF
    ImageDescription for WebP/TIFF; BMP has no metadata). Alpha is dropped with a warning for formats
    without alpha (JPEG, BMP).
    """
    path = Path(path)
    fmt, has_alpha = output_format(path)
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")
    if alpha is not None:
        a = alpha if isinstance(alpha, Image.Image) else Image.fromarray(np.ascontiguousarray(alpha), "L")
        if a.size != img.size:
            a = a.resize(img.size, Image.Resampling.BICUBIC)
        if has_alpha:
            img = img.copy()
            img.putalpha(a)
        else:
            log.warning("%s: %s cannot store transparency; the alpha channel is dropped (use .png to keep it)", path, fmt)
    kwargs: dict[str, Any] = {}
    text = encode_metadata(metadata) if metadata else None
    if fmt == "PNG":
        info = PngInfo()
        if text:
            info.add_text(METADATA_KEY, text)
            info.add_text("Software", "supir-rt")
        kwargs["pnginfo"] = info
    elif fmt == "JPEG":
        kwargs.update(quality=quality, subsampling=0)
        if text:
            kwargs["comment"] = (METADATA_KEY + ":" + text).encode("utf-8")
    elif fmt in ("WEBP", "TIFF"):
        if fmt == "WEBP":
            kwargs["quality"] = quality
        if text:
            exif = Image.Exif()
            exif[0x010E] = METADATA_KEY + ":" + text  # ImageDescription
            exif[0x0131] = "supir-rt"  # Software
            kwargs["exif"] = exif.tobytes()
    if icc_profile and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        kwargs["icc_profile"] = icc_profile
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in ``path``'s folder, then rename it over ``path``."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".part")
    except FileNotFoundError:
        raise ImageError(f"output folder {folder} does not exist; create it or choose another -o") from None
    except PermissionError:
        raise ImageError(f"output folder {folder} is not writable (permission denied); choose another -o") from None
    except OSError as err:
        raise ImageError(f"cannot write into {folder} ({err}); choose another -o") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise ImageError(f"cannot write {path} ({err}); check free space and permissions, or choose another -o") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The generation parameters stored by `save_image`, or None when the file has none."""
    with Image.open(path) as img:
        text = img.info.get(METADATA_KEY)
        if text is None:
            comment = img.info.get("comment")
            if isinstance(comment, bytes):
                comment = comment.decode("utf-8", "replace")
            if comment is None:
                desc = img.getexif().get(0x010E)
                comment = desc if isinstance(desc, str) else None
            if comment and comment.startswith(METADATA_KEY + ":"):
                text = comment[len(METADATA_KEY) + 1:]
    return json.loads(text) if text else None


__all__ = [
    "DEFAULT_MAX_PIXELS", "INPUT_EXTENSIONS", "ImageError", "LoadedImage", "METADATA_KEY", "OUTPUT_FORMATS",
    "check_output_path", "check_writable_folder", "from_pil", "is_image_file", "load_image", "open_image",
    "output_format", "read_metadata", "same_file", "save_image", "write_bytes_atomic",
]
