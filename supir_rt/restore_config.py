"""Restore settings: one frozen dataclass with SUPIR's knobs, and the named presets.

Field names follow the official `SUPIRModel.batchify_sample` and `test.py`; the official `test.py` flag
each one comes from is given next to it. The default instance is the official `test.py`
configuration (current HEAD, 2025-05-12). Presets are data: a dict name -> `RestoreConfig`, resolved by
`restore_preset(name)`; variants are made with `dataclasses.replace` (or `RestoreConfig.with_overrides`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or not 1 <= self.num_steps <= 1000:
            raise SettingError("num_steps", self.num_steps, "use an integer number of steps in 1..1000")
        if self.color_fix_type not in COLOR_FIXES:
            raise SettingError("color_fix_type", self.color_fix_type, f"choose one of {', '.join(COLOR_FIXES)}")
        if not self.upscale > 0:
            raise SettingError("upscale", self.upscale, "must be > 0 (1 keeps the input size)")
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise SettingError("min_size", self.min_size, "must be a non-negative integer number of pixels")
        if self.s_churn < 0:
            raise SettingError("s_churn", self.s_churn, "must be >= 0")
        if self.s_noise < 0:
            raise SettingError("s_noise", self.s_noise, "must be >= 0")
        if not isinstance(self.seed, int) or self.seed < -1 or self.seed >= 2**63:
            raise SettingError("seed", self.seed, "use a non-negative integer, or -1 for a random seed")
        if self.sampler not in SAMPLERS:
            raise SettingError("sampler", self.sampler, f"choose one of {', '.join(SAMPLERS)}")
        self._check_tiling()

    def _check_tiling(self) -> None:
        if self.tiling not in TILINGS:
            raise SettingError("tiling", self.tiling, f"choose one of {', '.join(TILINGS)}")
        if self.vae_tiling not in VAE_TILING_MODES:
            raise SettingError("vae_tiling", self.vae_tiling, f"choose one of {', '.join(VAE_TILING_MODES)}")
        if not isinstance(self.tile_size, int) or self.tile_size < 64 or self.tile_size % 64:
            raise SettingError("tile_size", self.tile_size, "use a multiple of 64 px, e.g. 1024")
        if not isinstance(self.tile_stride, int) or not 8 <= self.tile_stride <= self.tile_size or self.tile_stride % 8:
            raise SettingError("tile_stride", self.tile_stride, f"use a multiple of 8 px between 8 and the tile size "
                               f"{self.tile_size}, e.g. {self.tile_size // 2 // 8 * 8 or 8}")
        if not isinstance(self.tile_batch, int) or self.tile_batch < 1:
            raise SettingError("tile_batch", self.tile_batch, "use an integer >= 1, e.g. 1")
        if not isinstance(self.vae_tile_size, int) or self.vae_tile_size < 64 or self.vae_tile_size % 64:
            raise SettingError("vae_tile_size", self.vae_tile_size, "use a multiple of 64 px, e.g. 512")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise SettingError("max_memory_gb", self.max_memory_gb, "use a positive number of GiB, e.g. 16")

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


def restore_preset(name: str) -> RestoreConfig:
    """The preset called ``name`` (see `RESTORE_PRESETS`)."""
    try:
        return RESTORE_PRESETS[name]
    except KeyError:
        raise SettingError("preset", name, f"unknown preset; choose one of {', '.join(RESTORE_PRESETS)}") from None


__all__ = [
    "COLOR_FIXES", "ColorFix", "OFFICIAL", "PER_REQUEST_FIELDS", "RESTORE_PRESETS", "RestoreConfig", "SAMPLERS", "Sampler", "TILINGS",
    "Tiling", "VAE_TILING_MODES", "VAETilingMode", "normalise_color_fix", "restore_preset",
]
