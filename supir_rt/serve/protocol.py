"""The request/response contract shared by every server front end (Ray Serve, Triton, PyTriton).

No serving framework is imported here: a request is image bytes + a settings JSON object, a response is
PNG bytes with the generation parameters in their metadata, and a rejected request is a `RequestError`
with an HTTP status, the field at fault and one message saying how to fix it.

Settings use the `RestoreConfig` field names, plus ``preset``. Their checks are derived from `RestoreConfig`
itself: the known names are its fields, the accepted JSON types its annotations, the ranges its own
validation, applied to the request as a whole (`SettingError.field` names the field at fault).
"""

from __future__ import annotations

import dataclasses
import io
import json
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from supir_rt.errors import SettingError
from supir_rt.images import METADATA_KEY, ImageError, LoadedImage, encode_metadata, from_pil
from supir_rt.restore_config import (
    RESTORE_PRESETS, RestoreConfig, normalise_color_fix, restore_preset, tiny_random_defaults,
)

# --tiny-random defaults that keep a CPU request short (as the CLI's, `tiny_random_defaults`); explicit settings win.
TINY_DEFAULTS = tiny_random_defaults(RestoreConfig())


@dataclass(frozen=True)
class Limits:
    """What one server accepts; `docs/serving.md` lists the defaults and the flags that change them."""

    max_body_bytes: int = 32 * 1024 * 1024  # whole request body
    max_image_pixels: int = 16 * 1024 * 1024  # decoded input size (decompression-bomb guard)
    max_processing_pixels: int | None = None  # SDXL processing size (upscale × input, min_size); None: by device
    max_steps: int = 200
    request_timeout_s: float = 600.0


# The default processing-size limit of a replica, by where it runs: a GPU does 4 Mpx (2048²) in well
# under the timeout; a CPU replica is for trying the plumbing, and 1 Mpx (1024², SUPIR's own size) there
# already takes a long time with the real model.
DEFAULT_PROCESSING_PIXELS = {"cuda": 4 * 1024 * 1024, "cpu": 1024 * 1024}


def processing_pixels_limit(limits: Limits, device: str) -> int:
    """``limits.max_processing_pixels``, or the default for ``device`` (cuda[:N] or cpu)."""
    if limits.max_processing_pixels is not None:
        return limits.max_processing_pixels
    return DEFAULT_PROCESSING_PIXELS["cuda" if device.startswith("cuda") else "cpu"]


class RequestError(ValueError):
    """A request the server rejects: ``status`` (HTTP), ``field`` at fault, ``kind`` (a metrics label)."""

    def __init__(self, status: int, field: str, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.kind = status, field, message, kind

    def as_json(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "field": self.field, "message": self.message}}

    def __reduce__(self) -> tuple[Any, ...]:  # keeps every attribute across process boundaries
        return (RequestError, (self.status, self.field, self.message, self.kind))


# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------

_TYPES: dict[str, Any] = typing.get_type_hints(RestoreConfig)


def _check_type(name: str, value: Any) -> Any:
    """``value`` as the field's type, or a `RequestError` naming the field (JSON numbers/booleans/strings)."""
    kind = _TYPES.get(name)
    if typing.get_origin(kind) is typing.Literal:
        if name == "color_fix_type" and isinstance(value, str):
            try:
                return normalise_color_fix(value)
            except ValueError as err:
                raise RequestError(422, name, str(err), "invalid_setting") from None
        choices = typing.get_args(kind)
        if value not in choices:
            raise RequestError(422, name, f"{name}={value!r}: choose one of {', '.join(map(str, choices))}",
                               "invalid_setting")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise RequestError(422, name, f"{name}={value!r}: expected a JSON {_json_name(kind)}", "invalid_setting")
    return float(value) if kind is float else value


def _json_name(kind: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(kind, str(kind))


def parse_settings(raw: str | bytes | Mapping[str, Any] | None, limits: Limits = Limits(), *,
                   tiny: bool = False) -> RestoreConfig:
    """The `RestoreConfig` for a request's ``settings`` (JSON object, may be empty or absent)."""
    if raw is None or raw == "" or raw == b"":
        doc: Any = {}
    elif isinstance(raw, Mapping):
        doc = dict(raw)
    else:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, "settings", f"settings is not valid JSON ({err}); send a JSON object such as "
                               '{"seed": 7, "num_steps": 30}', "bad_settings") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "settings", f"settings must be a JSON object, got {type(doc).__name__}", "bad_settings")
    preset = doc.pop("preset", "official")
    if preset not in RESTORE_PRESETS:
        raise RequestError(422, "preset", f"unknown preset {preset!r}; choose one of {', '.join(RESTORE_PRESETS)}",
                           "invalid_setting")
    known = [f.name for f in dataclasses.fields(RestoreConfig)]
    for name in doc:
        if name not in known:
            raise RequestError(422, name, f"unknown setting {name!r}; known: preset, {', '.join(known)}",
                               "unknown_setting")
    values = {name: _check_type(name, value) for name, value in doc.items() if value is not None}
    base = restore_preset(preset)
    if tiny:
        base = base.with_overrides(**{k: v for k, v in tiny_random_defaults(base).items() if k not in values})
    try:  # the request as a whole (tile_size 256 with tile_stride 128 is valid together, not one by one)
        config = base.with_overrides(**values)
    except SettingError as err:
        raise RequestError(422, err.field, str(err), "invalid_setting") from None
    except (ValueError, TypeError) as err:
        raise RequestError(422, "settings", str(err), "invalid_setting") from None
    if config.num_steps > limits.max_steps:
        raise RequestError(422, "num_steps", f"num_steps={config.num_steps} is above this server's limit of "
                           f"{limits.max_steps}", "limit")
    return config


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def decode_image(data: bytes, limits: Limits = Limits(), *, field: str = "image") -> LoadedImage:
    """Uploaded bytes -> `LoadedImage`; the pixel limit is checked from the header, before decoding."""
    if not data:
        raise RequestError(400, field, f"{field} is empty; send the image file in the multipart field {field!r}",
                           "bad_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w < 1 or h < 1 or w * h > limits.max_image_pixels:
                raise RequestError(413, field, f"{field} is {w}x{h} = {w * h:,} pixels; this server accepts 1 to "
                                   f"{limits.max_image_pixels:,} pixels (decompression-bomb guard)", "too_large")
            img.load()
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(400, field, f"{field} is not an image Pillow can read; send a PNG, JPEG, WebP, TIFF or "
                           "BMP file", "bad_image") from None
    except Image.DecompressionBombError:  # above Pillow's own limit, which it checks before ours
        raise RequestError(413, field, f"{field} declares more pixels than Pillow decodes (decompression-bomb guard);"
                           f" this server accepts up to {limits.max_image_pixels:,} pixels", "too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RequestError(400, field, f"{field}: the image data is damaged or truncated ({err})", "bad_image") from None
    try:
        return from_pil(img)
    except ImageError as err:
        raise RequestError(400, field, f"{field}: {err}", "bad_image") from None


def encode_png(image: Image.Image, metadata: Mapping[str, Any] | None = None) -> bytes:
    """PNG bytes (RGB or RGBA) with ``metadata`` as JSON under the ``supir-rt`` text key, as the CLI writes."""
    info = PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, encode_metadata(dict(metadata)))
        info.add_text("Software", "supir-rt")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_metadata(data: bytes) -> dict[str, Any] | None:
    """The ``supir-rt`` metadata of PNG bytes (as `encode_png` stores it), or None."""
    with Image.open(io.BytesIO(data)) as img:
        text = img.info.get(METADATA_KEY)
    return json.loads(text) if text else None


__all__ = ["DEFAULT_PROCESSING_PIXELS", "Limits", "RequestError", "processing_pixels_limit", "TINY_DEFAULTS", "decode_image", "encode_png", "parse_settings", "png_metadata"]
