"""What the controls of `supir-rt ui` do, as plain functions over one `Restorer` (no Gradio here).

`RestoreUI` holds the restorer (loaded once), the knobs, the temporary folder the outputs go to and the
lock that makes model jobs take turns (the page's queue already runs one at a time; the lock keeps a
`Restorer`, which is not thread-safe, safe from any other caller). Cancelling is cooperative: a job
checks its session's cancel counter before it starts and after every sampler step (a step cannot be
interrupted).

Every method takes and returns plain values (upload paths, strings, dicts of knob values, PIL images).
Problems the user can fix raise `UIError` with the message shown in the page.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from supir_rt.caption import clean_caption
from supir_rt.images import ImageError, LoadedImage, load_image, read_metadata, save_image
from supir_rt.stages import NonFiniteOutputError, noise_source, processing_sizes
from supir_rt.restore_config import RESTORE_PRESETS, RestoreConfig, restore_preset
from supir_rt.sampler import StepInfo
from supir_rt.ui.knobs import NOT_FROM_PRESET, Knob, coerce, config_from_values, knobs_for, values_from_config

log = logging.getLogger(__name__)

Report = Callable[[float, str], None]
MAX_CAPTION_FILE_BYTES = 64 * 1024


class UIError(Exception):
    """A problem the user can fix (bad upload, bad setting, cancelled job); the message says what to do."""


class Cancelled(Exception):
    """Raised from the step callback when the user cancelled the running job."""


@dataclass(frozen=True)
class RunOutput:
    before: Image.Image  # the input resized to the output size, for the comparison slider
    after: Image.Image  # the restored image
    png: Path  # the restored PNG with its settings in the metadata
    seed: int
    status: str
    stage1: Image.Image | None = None  # the stage-1 image of this restore, for the Stage 1 panel


@dataclass(frozen=True)
class Reproduced:
    values: dict[str, Any]  # knob name -> value
    caption: str
    status: str


@dataclass
class _LoadedCache:
    """The last few decoded uploads (decoding a large photo on every knob change would be slow)."""

    size: int = 2
    items: OrderedDict[str, LoadedImage] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RestoreUI:
    """The UI's actions over one loaded `Restorer`; outputs go to ``workdir`` (a temporary folder)."""

    def __init__(self, restorer: Any, workdir: str | Path, *, defaults: Mapping[str, Any] | None = None,
                 keep_outputs: int = 32, config_type: type = RestoreConfig) -> None:
        self.restorer = restorer
        self.workdir = Path(workdir)
        self.outputs = self.workdir / "outputs"
        self.defaults = dict(defaults or {})  # applied on top of every preset (--tiny-random's small sizes)
        self.knobs: tuple[Knob, ...] = knobs_for(config_type)
        self.config_type = config_type
        self.keep_outputs = keep_outputs
        self._kept: deque[Path] = deque()
        self._cache = _LoadedCache()
        self._lock = threading.Lock()  # one model job at a time
        self._cancelled: dict[str, int] = {}  # session -> its jobs with a ticket up to this one are cancelled

    # ----------------------------------------------------------------------------------- information

    @property
    def has_captioner(self) -> bool:
        return self.restorer.captioner is not None

    @property
    def presets(self) -> list[str]:
        return list(RESTORE_PRESETS)

    def footer(self) -> str:
        """Device, backend, precision and model of the loaded restorer, and the supir-rt version."""
        from supir_rt import __version__

        desc = self.restorer.description
        device = desc.get("device") or str(self.restorer.device)
        model = desc.get("model", "?")
        if model == "tiny-random":
            model = "tiny-random (random weights: the output is NOT a restoration)"
        weights = [desc[k] for k in ("sdxl", "supir") if desc.get(k)]
        if weights:
            model += f" ({', '.join(weights)})"
        elif desc.get("engines_dir"):
            model += f" (engines {desc['engines_dir']})"
        return (f"Device **{device}** · backend **{desc.get('backend', '?')}** · {desc.get('dtype', '?')} · "
                f"model **{model}** · supir-rt {__version__}")

    def default_config(self, preset: str = "official") -> RestoreConfig:
        """Preset ``preset`` with the server's overlay (``defaults``), as ``config_type``."""
        base = restore_preset(preset)
        if not isinstance(base, self.config_type):  # a RestoreConfig extended with more settings
            base = self.config_type(**dataclasses.asdict(base))
        return base.with_overrides(**self.defaults)

    def initial_values(self) -> dict[str, Any]:
        return values_from_config(self.default_config(), self.knobs)

    # ---------------------------------------------------------------------------------------- uploads

    def load(self, path: str | Path) -> LoadedImage:
        """The upload as a `LoadedImage`; `ImageError` messages (not an image, too many pixels: a
        decompression-bomb guard, damaged data) become `UIError`."""
        key = str(path)
        with self._cache.lock:
            if key in self._cache.items:
                self._cache.items.move_to_end(key)
                return self._cache.items[key]
        try:
            loaded = load_image(path, max_pixels=self.restorer.max_pixels)
        except ImageError as err:
            raise UIError(_upload_message(str(err), path)) from None
        with self._cache.lock:
            self._cache.items[key] = loaded
            while len(self._cache.items) > self._cache.size:
                self._cache.items.popitem(last=False)
        return loaded

    def describe(self, path: str | Path | None, values: Mapping[str, Any]) -> str:
        """The input, processing and output sizes for the current upscale / min-size, before running."""
        if not path:
            return ""
        loaded = self.load(path)
        w, h = loaded.size
        by_name = {k.name: k for k in self.knobs}
        upscale = coerce(by_name["upscale"], values.get("upscale", self.initial_values()["upscale"]))
        min_size = coerce(by_name["min_size"], values.get("min_size", self.initial_values()["min_size"]))
        try:
            sizes = processing_sizes(w, h, upscale, min_size)
        except ValueError as err:
            raise UIError(str(err)) from None
        (pw, ph), (ow, oh) = sizes.processing, sizes.output
        text = f"Input **{w}×{h}** px → processing **{pw}×{ph}** px → output **{ow}×{oh}** px"
        if loaded.alpha is not None:
            text += " (alpha kept)"
        limit = self.restorer.max_processing_pixels
        if limit is not None and pw * ph > limit:
            text += (f"\n\n**Too large:** {pw}×{ph} px is above this server's limit of {limit:,} pixels; "
                     "lower the upscale or the minimum processing size, or downscale the photo")
        return text

    def read_caption_file(self, path: str | Path | None) -> str:
        """The caption in an uploaded ``.txt`` (the sidecar beside a photo), cleaned as captions are."""
        if not path:
            return ""
        path = Path(path)
        data = path.read_bytes()[: MAX_CAPTION_FILE_BYTES + 1]
        if len(data) > MAX_CAPTION_FILE_BYTES:
            raise UIError(f"{path.name} is larger than {MAX_CAPTION_FILE_BYTES // 1024} KB; a caption file holds "
                          "one caption in plain text")
        try:
            return clean_caption(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise UIError(f"{path.name} is not UTF-8 text; save the caption as a plain .txt file") from None

    # ---------------------------------------------------------------------------------------- settings

    def config(self, values: Mapping[str, Any]) -> RestoreConfig:
        """The knobs' values as a `RestoreConfig`, every problem one message naming the knob."""
        try:
            config = config_from_values(values, self.knobs, self.default_config())
            noise_source(0, config.noise_device)
        except ValueError as err:
            raise UIError(f"Invalid setting: {err}") from None
        return config

    def preset_values(self, name: str) -> dict[str, Any]:
        """The knobs of preset ``name``; the seed and the prompts are left as they are."""
        try:
            config = self.default_config(name)
        except ValueError as err:
            raise UIError(str(err)) from None
        return values_from_config(config, self.knobs, skip=NOT_FROM_PRESET)

    @staticmethod
    def random_seed() -> int:
        return random.randint(0, 2**32 - 1)

    def prompt_warnings(self, caption: str, a_prompt: str, n_prompt: str, quality_first: bool) -> str:
        """Warnings when CLIP's 77-token window cuts the quality prompt or the negative prompt."""
        positive, negative = self.restorer.prompt_warnings(caption or "", a_prompt or "", n_prompt or "",
                                                           quality_first=bool(quality_first))
        notes = []
        if positive:
            notes.append("**Prompt cut:** " + positive.replace(" (--max-new-tokens)", "")
                         .replace("(--quality-first)", "(tick “Quality prompt first”)"))
        if negative:
            notes.append("**Negative prompt cut:** " + negative)
        return "\n\n".join(notes)

    def reproduce(self, path: str | Path | None) -> Reproduced:
        """The settings, caption and prompts stored in a PNG written by supir-rt (``restore`` or this UI)."""
        if not path:
            raise UIError("Drop a PNG written by supir-rt to read its settings back")
        name = Path(path).name
        try:
            meta = read_metadata(path)
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError):
            raise UIError(f"{name} is not an image with supir-rt settings; drop a PNG written by supir-rt") from None
        settings = meta.get("settings") if isinstance(meta, dict) else None
        if not isinstance(settings, dict):
            raise UIError(f"{name} has no supir-rt settings in its metadata; drop a PNG written by supir-rt "
                          "restore or by this page")
        fields = {f for f in self.config_type.__dataclass_fields__}
        unknown = sorted(set(settings) - fields)
        try:
            config = self.config_type(**{k: v for k, v in settings.items() if k in fields})
        except (TypeError, ValueError) as err:
            raise UIError(f"{name}: its settings are not valid here ({err})") from None
        notes = [f"Settings of **{meta.get('source') or name}** loaded (seed {config.seed}); upload that photo "
                 "and press Restore to reproduce the result."]
        if unknown:
            notes.append(f"Ignored settings this version does not have: {', '.join(unknown)}.")
        runtime = meta.get("runtime") or {}
        ours = self.restorer.description
        if isinstance(runtime, dict) and runtime.get("model") != ours.get("model"):
            notes.append(f"It was made with model {runtime.get('model')!r}; this server runs {ours.get('model')!r}, "
                         "so the result will differ.")
        caption = meta.get("caption") if isinstance(meta.get("caption"), str) else ""
        return Reproduced(values_from_config(config, self.knobs), caption, " ".join(notes))

    # ------------------------------------------------------------------------------------- model jobs

    def stage1(self, path: str | Path | None, values: Mapping[str, Any]) -> Image.Image:
        """The stage-1 image (degradation-robust encoder + decoder) at the output size."""
        loaded = self._require(path)
        config = self.config(values)
        with self._lock:
            try:
                return self.restorer.stage1_image(loaded, config)
            except ImageError as err:
                raise UIError(_upload_message(str(err), path)) from None

    def caption(self, path: str | Path | None, values: Mapping[str, Any]) -> str:
        """A caption from the configured image captioner (LLaVA or a transformers model) of the stage-1 image."""
        if not self.has_captioner:
            raise UIError("No captioner on this server: type the caption, or restart with --captioner llava "
                          "--llava-dir DIR or --captioner hf --caption-model DIR")
        loaded = self._require(path)
        config = self.config(values)
        with self._lock:
            return self.restorer.caption(loaded, config)

    def restore(self, path: str | Path | None, caption: str, values: Mapping[str, Any], *, session: str = "",
                ticket: int = 0, report: Report | None = None) -> RunOutput:
        """Restore the upload with the knobs' settings; the PNG (settings in its metadata) goes to the
        temporary folder. ``report(fraction, text)`` follows the stages and sampler steps.

        ``ticket`` is the session's cancel counter when the job was submitted: `cancel` with a ticket at
        least as large stops the job (raises `Cancelled`) before it starts or after its current step."""
        loaded = self._require(path)
        config = self.config(values)
        report = report or _no_report

        def check_cancel() -> None:
            if self._cancelled.get(session, -1) >= ticket:
                raise Cancelled

        def on_step(info: StepInfo) -> None:
            check_cancel()
            done = info.index + 1
            text = f"sampling: step {done}/{info.total}" if done < info.total else "decoding, colour fix"
            report(0.05 + 0.9 * done / info.total, text)

        report(0.0, "waiting for the previous job")
        with self._lock:
            check_cancel()
            report(0.02, "stage 1 (degradation-robust encoder), prompts")
            start = time.perf_counter()
            try:
                restored = self.restorer.restore(loaded, config, caption=caption or "", source=Path(Path(path).name),
                                                 callback=on_step)
            except (ImageError, NonFiniteOutputError) as err:
                raise UIError(_upload_message(str(err), path)) from None
            seconds = time.perf_counter() - start
            report(0.96, "stage 1 image for its panel")
            stage1 = self.restorer.stage1_image(loaded, config)  # encoder + decoder once more: small beside sampling
            report(0.98, "saving the PNG")
            png = self._save(restored, loaded, Path(path).stem)
        after = restored.image.convert("RGB")
        before = loaded.rgb.resize(after.size, Image.Resampling.BICUBIC)
        w, h = after.size
        status = (f"Done in {seconds:.1f} s: {w}×{h} px, seed {restored.result.seed}, {config.num_steps} steps. "
                  "The PNG below holds the settings (drop it on “Reproduce” to read them back).")
        return RunOutput(before=before, after=after, png=png, seed=restored.result.seed, status=status, stage1=stage1)

    def cancel(self, session: str = "", ticket: int = 0) -> str:
        """Cancel the session's jobs submitted with a ticket up to ``ticket``: a waiting job is dropped when
        its turn comes, a running one stops after its current sampler step (a step cannot be interrupted)."""
        self._cancelled[session] = max(ticket, self._cancelled.get(session, -1))
        return "Cancelled: a running job stops after its current step, a waiting one does not start."

    def close(self) -> None:
        shutil.rmtree(self.outputs, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- helpers

    def _require(self, path: str | Path | None) -> LoadedImage:
        if not path:
            raise UIError("Upload a photo first (drop it on the photo box, paste it, or click to choose a file)")
        return self.load(path)

    def _save(self, restored: Any, loaded: LoadedImage, stem: str) -> Path:
        folder = self.outputs / uuid.uuid4().hex
        folder.mkdir(parents=True)
        image = restored.image
        alpha = image.getchannel("A") if image.mode == "RGBA" else None
        png = save_image(folder / f"{stem}_restored.png", image.convert("RGB"), alpha=alpha,
                         metadata=restored.metadata, icc_profile=loaded.icc_profile)
        self._kept.append(folder)
        while len(self._kept) > self.keep_outputs:  # a long-running server keeps only the latest outputs
            shutil.rmtree(self._kept.popleft(), ignore_errors=True)
        return png


def _no_report(fraction: float, text: str) -> None:
    pass


def _upload_message(message: str, path: str | Path | None) -> str:
    """`ImageError` messages name the file by its server path and point at CLI flags; in the page the
    file is the user's upload and the limits are the server's."""
    if path:
        message = message.replace(str(path), Path(path).name)
    message = message.replace("; raise the limit with --max-pixels if you trust this file", "")
    if "decompression-bomb guard" in message:
        message = message.split("; if you trust this file")[0] + ". Downscale the photo, or start the server " \
                                                                  "with a higher --max-pixels"
    return message


__all__ = ["Cancelled", "Reproduced", "RestoreUI", "RunOutput", "UIError"]
