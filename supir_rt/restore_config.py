"""Restore settings: one frozen dataclass with SUPIR's knobs, and the named presets.

Field names follow the official `SUPIRModel.batchify_sample` and `test.py`; the official `test.py` flag
each one comes from is given next to it. The default instance is the official `test.py`
configuration (current HEAD, 2025-05-12). Presets are data: a dict name -> `RestoreConfig`, resolved by
`restore_preset(name)`; variants are made with `dataclasses.replace` (or `RestoreConfig.with_overrides`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from supir_rt.config import DEFAULT_NEGATIVE_PROMPT, DEFAULT_POSITIVE_PROMPT
from supir_rt.errors import SettingError

ColorFix = Literal["wavelet", "adain", "none"]
Tiling = Literal["auto", "on", "off"]
TILINGS: tuple[str, ...] = ("auto", "on", "off")
VAETilingMode = Literal["exact", "official", "none"]
VAE_TILING_MODES: tuple[str, ...] = ("exact", "official", "none")
COLOR_FIXES: tuple[str, ...] = ("wavelet", "adain", "none")
Sampler = Literal["edm", "dpmpp2m-sde"]
SAMPLERS: tuple[str, ...] = ("edm", "dpmpp2m-sde")
"""``edm``: the official `RestoreEDMSampler` (restoration guidance, churn, linear control scale).
``dpmpp2m-sde``: the official `RestoreDPMPP2MSampler` of the Lightning configuration (DPM++ 2M SDE,
η = 1, Karras σ schedule), for few-step SDXL Lightning finetunes; like the official one it ignores
``restore_cfg``, ``s_churn`` and the linear control scale."""


# Settings each request of a batch may choose for itself: they act before or after the sampler loop (seed,
# prompts, output size, colour fix). Every other field is shared by a batch (`supir_rt.pipeline.check_batch`).
PER_REQUEST_FIELDS = frozenset({
    "seed", "upscale", "min_size", "color_fix_type", "a_prompt", "n_prompt", "quality_first",
})

MAX_SIDE = 16384  # px: no setting asks for a processing side or a tile above this
# float setting -> (lowest, highest, an example); generous bounds around the official UI's slider ranges,
# which keep NaN, Infinity and values no run could finish (upscale 1e308) out.
NUMBER_RANGES: dict[str, tuple[float, float, str]] = {
    "cfg_scale": (0.0, 100.0, "4"), "cfg_scale_start": (0.0, 100.0, "1"),
    "control_scale": (0.0, 10.0, "1"), "control_scale_start": (0.0, 10.0, "0"),
    "restore_cfg": (-100.0, 100.0, "-1 (off) or 4"), "restore_cfg_s_tmin": (0.0, 1000.0, "0.05"),
    "s_churn": (0.0, 1000.0, "5"), "s_noise": (0.0, 10.0, "1.01"),
    "upscale": (0.0, 32.0, "2"), "max_memory_gb": (0.0, 1e6, "16"),
}
_POSITIVE = ("upscale", "max_memory_gb")
_NOISE_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class RestoreConfig:
    """Everything that decides one restoration, besides the weights and the image.

    The defaults are `test.py`'s: linear CFG from 1.0 at high noise to 4.0, restoration guidance
    off, churn 5, s_noise 1.01, Wavelet colour fix, seed 1234.
    """

    num_steps: int = 50  # --edm_steps
    cfg_scale: float = 4.0  # --s_cfg: the CFG scale reached as σ -> 0 (scale_min of LinearCFG)
    use_linear_cfg: bool = True  # --linear_CFG (always on in test.py)
    cfg_scale_start: float = 1.0  # --spt_linear_CFG: the CFG scale at σ_max
    control_scale: float = 1.0  # --s_stage2
    use_linear_control_scale: bool = False  # --linear_s_stage2
    control_scale_start: float = 0.0  # --spt_linear_s_stage2
    restore_cfg: float = -1.0  # --s_stage1, τ_r of restoration guidance; <= 0 disables it
    restore_cfg_s_tmin: float = 0.05  # RestoreEDMSampler default: no guidance once σ_{k+1} <= this
    s_churn: float = 5.0  # --s_churn
    s_noise: float = 1.01  # --s_noise
    seed: int = 1234  # --seed; -1 picks a random seed in 0..65535 (recorded in the output)
    upscale: float = 1.0  # --upscale (an int in test.py)
    min_size: int = 1024  # --min_size: short side of the *processing* size, not of the output
    color_fix_type: ColorFix = "wavelet"  # --color_fix_type Wavelet / AdaIn / None
    a_prompt: str = DEFAULT_POSITIVE_PROMPT  # --a_prompt, the quality prompt appended to the caption
    n_prompt: str = DEFAULT_NEGATIVE_PROMPT  # --n_prompt
    quality_first: bool = False  # not official: put the quality prompt before the caption
    noise_device: str = "cpu"  # where the initial and churn noise are drawn; "cuda" = the official GPU stream
    sampler: Sampler = "edm"  # the sampler class of the official options YAML (edm = SUPIR_v0.yaml's)
    # Tiling (docs/tiling.md). auto: tile what would not fit the memory budget. The sampler tiles follow
    # SUPIR_v0_tiled.yaml (1024 px tiles, 512 px stride); the tiled VAE is --use_tile_vae's, in exact mode.
    tiling: Tiling = "auto"  # auto | on | off
    tile_size: int = 1024  # sampler tile side, image px (multiple of 64; 128 latent px)
    tile_stride: int = 512  # sampler tile stride, image px (multiple of 8, 8..tile_size)
    tile_batch: int = 1  # sampler tiles per network call (the engine's 2B batch = 2 x tile_batch)
    vae_tile_size: int = 512  # tiled VAE core tile, image px (multiple of 64)
    vae_tiling: VAETilingMode = "exact"  # exact | official (the official tiled VAE) | none (VAE never tiled)
    max_memory_gb: float | None = None  # budget for tiling auto; None = what the device has free
    # not official: caption each sampler tile's region of the stage-1 image and condition the tile with its own
    # caption (docs/captions.md); only for a sampler-tiled restore with a captioner that looks at pixels
    tile_captions: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or not 1 <= self.num_steps <= 1000:
            raise SettingError("num_steps", self.num_steps, "use an integer number of steps in 1..1000")
        if self.color_fix_type not in COLOR_FIXES:
            raise SettingError("color_fix_type", self.color_fix_type, f"choose one of {', '.join(COLOR_FIXES)}")
        self._check_numbers()
        if not isinstance(self.min_size, int) or not 0 <= self.min_size <= MAX_SIDE:
            raise SettingError("min_size", self.min_size, f"use an integer number of pixels in 0..{MAX_SIDE}, e.g. 1024")
        if not isinstance(self.noise_device, str) or not _NOISE_DEVICE.fullmatch(self.noise_device):
            raise SettingError("noise_device", self.noise_device, "not a device name; use cpu, cuda or cuda:N")
        if not isinstance(self.seed, int) or self.seed < -1 or self.seed >= 2**63:
            raise SettingError("seed", self.seed, "use a non-negative integer, or -1 for a random seed")
        if self.sampler not in SAMPLERS:
            raise SettingError("sampler", self.sampler, f"choose one of {', '.join(SAMPLERS)}")
        self._check_tiling()

    def _check_numbers(self) -> None:
        """Every float setting is a finite number in its range (`NUMBER_RANGES`): NaN, Infinity and absurd
        magnitudes are refused here, before any work, rather than failing (or producing NaN) mid-run."""
        for name, (low, high, example) in NUMBER_RANGES.items():
            value = getattr(self, name)
            if name == "max_memory_gb" and value is None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not low <= value <= high or (name in _POSITIVE and value <= 0):
                above = "above 0" if name in _POSITIVE else f"from {low:g}"
                raise SettingError(name, value, f"use a finite number {above} to {high:g}, e.g. {example}")

    def _check_tiling(self) -> None:
        if self.tiling not in TILINGS:
            raise SettingError("tiling", self.tiling, f"choose one of {', '.join(TILINGS)}")
        if self.vae_tiling not in VAE_TILING_MODES:
            raise SettingError("vae_tiling", self.vae_tiling, f"choose one of {', '.join(VAE_TILING_MODES)}")
        if not isinstance(self.tile_size, int) or not 64 <= self.tile_size <= MAX_SIDE or self.tile_size % 64:
            raise SettingError("tile_size", self.tile_size, "use a multiple of 64 px, e.g. 1024")
        if not isinstance(self.tile_stride, int) or not 8 <= self.tile_stride <= self.tile_size or self.tile_stride % 8:
            raise SettingError("tile_stride", self.tile_stride, f"use a multiple of 8 px between 8 and the tile size "
                               f"{self.tile_size}, e.g. {self.tile_size // 2 // 8 * 8 or 8}")
        if not isinstance(self.tile_captions, bool):
            raise SettingError("tile_captions", self.tile_captions, "use true or false")
        if not isinstance(self.tile_batch, int) or not 1 <= self.tile_batch <= 64:
            raise SettingError("tile_batch", self.tile_batch, "use an integer in 1..64, e.g. 1")
        if not isinstance(self.vae_tile_size, int) or not 64 <= self.vae_tile_size <= MAX_SIDE or self.vae_tile_size % 64:
            raise SettingError("vae_tile_size", self.vae_tile_size, "use a multiple of 64 px, e.g. 512")

    def with_overrides(self, **overrides: Any) -> RestoreConfig:
        """A copy with the given fields changed; None values are ignored (handy for CLI flags)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown restore setting(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalise_color_fix(name: str) -> str:
    """'Wavelet' / 'AdaIn' / 'None' (test.py spellings) or lower case -> 'wavelet' / 'adain' / 'none'."""
    key = str(name).lower()
    if key not in COLOR_FIXES:
        raise SettingError("color_fix_type", name, "choose one of wavelet, adain, none (or Wavelet, AdaIn, None)")
    return key


OFFICIAL = RestoreConfig()

RESTORE_PRESETS: dict[str, RestoreConfig] = {
    # test.py defaults (current HEAD): the default.
    "official": OFFICIAL,
    # The paper's setting: T = 100, constant CFG 7.5, τ_r = 4.
    "paper": dataclasses.replace(OFFICIAL, num_steps=100, cfg_scale=7.5, use_linear_cfg=False, restore_cfg=4.0),
    # README advice (2025-05-12) for quality: s_cfg 6, spt_linear_CFG 3, s_noise 1.02, s_stage2 0.93.
    "quality": dataclasses.replace(OFFICIAL, cfg_scale=6.0, cfg_scale_start=3.0, s_noise=1.02, control_scale=0.93),
    # README advice for fidelity: s_cfg 4, spt_linear_CFG 1, s_noise 1.01, s_stage2 1.0 (= test.py defaults).
    "fidelity": dataclasses.replace(OFFICIAL, cfg_scale=4.0, cfg_scale_start=1.0, s_noise=1.01, control_scale=1.0),
    # The official Lightning configuration (options/SUPIR_v0_Juggernautv9_lightning.yaml), for SDXL Lightning
    # finetunes such as Juggernaut RunDiffusionPhoto2 Lightning 4Steps: RestoreDPMPP2MSampler and its
    # default_setting (edm_steps 8, s_cfg_Quality 2.0, spt_linear_CFG_Quality 2.0); everything else as test.py.
    "lightning": dataclasses.replace(OFFICIAL, sampler="dpmpp2m-sde", num_steps=8, cfg_scale=2.0, cfg_scale_start=2.0),
}


def settings_from_png(path: str | Path) -> tuple[RestoreConfig, str | None]:
    """The settings (with the seed that was used) and the caption stored in an image written by supir-rt
    (``restore``, the UI or a server), for ``--settings-from``: restoring the same input with them
    reproduces that image. Settings this version does not know are ignored; bad ones raise `SettingError`."""
    from supir_rt.errors import UserError
    from supir_rt.images import read_metadata

    name = Path(path).name
    try:
        meta = read_metadata(path)
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"--settings-from {path}: cannot read it ({err}); give a PNG written by supir-rt") from None
    settings = meta.get("settings") if isinstance(meta, dict) else None
    if not isinstance(settings, dict):
        raise UserError(f"--settings-from {path}: {name} holds no supir-rt settings; give a PNG written by "
                        "supir-rt restore, the UI or a server")
    known = {f.name for f in dataclasses.fields(RestoreConfig)}
    config = RestoreConfig(**{k: v for k, v in settings.items() if k in known})
    caption = meta.get("caption")
    return config, caption if isinstance(caption, str) else None


TINY_RANDOM_STEPS, TINY_RANDOM_MIN_SIZE = 4, 256


def tiny_random_defaults(base: RestoreConfig) -> dict[str, Any]:
    """The settings ``--tiny-random`` changes when not given, so that a CPU run of the tiny model is short:
    min_size 256, and 4 steps instead of a preset's 50 or 100. A preset already that short keeps its own
    count (lightning: 8 steps, the count its DPM++ 2M SDE schedule is made for)."""
    steps = base.num_steps if base.num_steps <= 2 * TINY_RANDOM_STEPS else TINY_RANDOM_STEPS
    return {"num_steps": steps, "min_size": TINY_RANDOM_MIN_SIZE}


def restore_preset(name: str) -> RestoreConfig:
    """The preset called ``name`` (see `RESTORE_PRESETS`)."""
    try:
        return RESTORE_PRESETS[name]
    except KeyError:
        raise SettingError("preset", name, f"unknown preset; choose one of {', '.join(RESTORE_PRESETS)}") from None


__all__ = [
    "COLOR_FIXES", "ColorFix", "MAX_SIDE", "NUMBER_RANGES", "OFFICIAL", "PER_REQUEST_FIELDS", "RESTORE_PRESETS",
    "RestoreConfig", "SAMPLERS", "Sampler", "TILINGS", "Tiling", "VAE_TILING_MODES", "VAETilingMode",
    "normalise_color_fix", "restore_preset", "settings_from_png", "tiny_random_defaults",
]
