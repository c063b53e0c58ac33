"""Model configuration: frozen dataclasses with the official SUPIR/SGM parameter names.

Ports the structure of ``options/SUPIR_v0.yaml`` (Fanghua-Yu/SUPIR @ bda91af) as typed data:
``network_config`` (LightGLVUNet), ``control_stage_config`` (GLVControl), ``first_stage_config``
(AutoencoderKL + scale factor) and ``conditioner_config`` (the two CLIP text encoders and the size
embedders). Two presets: ``ModelConfig.official()`` and ``ModelConfig.tiny()``.
Variants are made with ``dataclasses.replace``; nothing is mutated after construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The official default prompts (options/SUPIR_v0.yaml `p_p` / `n_p`, identical to test.py defaults).
DEFAULT_POSITIVE_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - "
    "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore "
    "detailing, hyper sharpness, perfect without deformations."
)
DEFAULT_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, "
    "3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, "
    "signature, jpeg artifacts, deformed, lowres, over-smooth"
)


@dataclass(frozen=True)
class UNetConfig:
    """`network_config.params` of SUPIR_v0.yaml: the SDXL UNet with SUPIR's connectors (LightGLVUNet)."""

    adm_in_channels: int = 2816
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_head_channels: int = 64
    transformer_depth: tuple[int, ...] = (1, 2, 10)
    transformer_depth_middle: int | None = None  # None: the last entry of transformer_depth
    context_dim: int = 2048
    use_linear_in_transformer: bool = True
    project_type: str = "ZeroSFT"
    project_channel_scale: int = 2

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth {self.transformer_depth} needs one entry per channel_mult level "
                f"{self.channel_mult}"
            )
        if self.model_channels % 32:
            raise ValueError(f"model_channels={self.model_channels} must be a multiple of 32 (GroupNorm(32))")
        if self.project_type != "ZeroSFT":
            raise ValueError(f"project_type={self.project_type!r}: only 'ZeroSFT' (SUPIR v0) is supported")

    @property
    def middle_depth(self) -> int:
        return self.transformer_depth[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle


@dataclass(frozen=True)
class ControlConfig:
    """`control_stage_config.params`: GLVControl, a copy of the SDXL encoder + `input_hint_block`."""

    adm_in_channels: int = 2816
    in_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_head_channels: int = 64
    transformer_depth: tuple[int, ...] = (1, 2, 10)
    transformer_depth_middle: int | None = None
    context_dim: int = 2048
    use_linear_in_transformer: bool = True
    input_upscale: int = 1

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth {self.transformer_depth} needs one entry per channel_mult level "
                f"{self.channel_mult}"
            )
        if self.input_upscale != 1:
            raise ValueError(f"input_upscale={self.input_upscale}: only 1 (SUPIR v0) is supported")

    @property
    def middle_depth(self) -> int:
        return self.transformer_depth[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle


@dataclass(frozen=True)
class VAEConfig:
    """`first_stage_config.params` (AutoencoderKL `ddconfig` + `embed_dim`) and the latent scale."""

    embed_dim: int = 4
    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    scale_factor: float = 0.13025

    def __post_init__(self) -> None:
        if self.attn_resolutions:
            raise ValueError(f"attn_resolutions={self.attn_resolutions}: the SDXL VAE has none (only mid attention)")
        if not self.double_z:
            raise ValueError("double_z=False is not an SDXL VAE")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class CLIPTextConfig:
    """One CLIP text transformer. `layer_idx` is the hidden-state index taken for `crossattn`
    (hidden_states[0] = embeddings); `None` means the input of the last block (open_clip 'penultimate')."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    activation: str = "quick_gelu"  # CLIP-L: quick_gelu; bigG: gelu
    projection_dim: int | None = None  # bigG only: pooled output width (text_projection)


@dataclass(frozen=True)
class ConditionerConfig:
    """`conditioner_config`: embedders 0 (CLIP-L, hidden state `clip_l_layer_idx`, no final LN),
    1 (OpenCLIP bigG, penultimate + pooled), 2-4 (size/crop/target sinusoids of `size_embed_dim` each)."""

    clip_l: CLIPTextConfig = CLIPTextConfig()
    clip_l_layer_idx: int = 11
    bigg: CLIPTextConfig = CLIPTextConfig(width=1280, layers=32, heads=20, activation="gelu", projection_dim=1280)
    size_embed_dim: int = 256
    clip_l_pad_token: int = 49407  # HF CLIPTokenizer pads with <|endoftext|>
    bigg_pad_token: int = 0  # open_clip.tokenize pads with 0

    @property
    def context_dim(self) -> int:
        return self.clip_l.width + self.bigg.width

    @property
    def vector_dim(self) -> int:
        assert self.bigg.projection_dim is not None
        return self.bigg.projection_dim + 3 * 2 * self.size_embed_dim


@dataclass(frozen=True)
class DenoiserConfig:
    """`denoiser_config`: DiscreteDenoiserWithControl, EpsScaling, LegacyDDPMDiscretization."""

    num_idx: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012


@dataclass(frozen=True)
class ModelConfig:
    network_config: UNetConfig = UNetConfig()
    control_stage_config: ControlConfig = ControlConfig()
    first_stage_config: VAEConfig = VAEConfig()
    conditioner_config: ConditionerConfig = ConditionerConfig()
    denoiser_config: DenoiserConfig = DenoiserConfig()
    p_p: str = DEFAULT_POSITIVE_PROMPT
    n_p: str = DEFAULT_NEGATIVE_PROMPT
    name: str = "official"

    def __post_init__(self) -> None:
        unet, ctrl, cond = self.network_config, self.control_stage_config, self.conditioner_config
        if unet.context_dim != cond.context_dim or ctrl.context_dim != cond.context_dim:
            raise ValueError(
                f"context_dim: UNet {unet.context_dim}, control {ctrl.context_dim}, text encoders "
                f"{cond.context_dim} (CLIP-L width + bigG width) must all be equal"
            )
        if unet.adm_in_channels != cond.vector_dim or ctrl.adm_in_channels != cond.vector_dim:
            raise ValueError(
                f"adm_in_channels: UNet {unet.adm_in_channels}, control {ctrl.adm_in_channels}, "
                f"conditioner vector {cond.vector_dim} must all be equal"
            )
        for name in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions"):
            if getattr(unet, name) != getattr(ctrl, name):
                raise ValueError(
                    f"GLVControl must mirror the UNet encoder: {name} is {getattr(ctrl, name)} "
                    f"(control) vs {getattr(unet, name)} (UNet)"
                )

    @classmethod
    def official(cls) -> ModelConfig:
        """SUPIR v0 as in options/SUPIR_v0.yaml (SDXL base + SUPIR-v0Q/v0F)."""
        return cls()

    @classmethod
    def tiny(cls) -> ModelConfig:
        """Reduced width for tests and smoke runs; same structure, random weights."""
        depth = (1, 2, 3)
        clip = CLIPTextConfig(width=32, layers=2, heads=2)
        bigg = CLIPTextConfig(width=32, layers=2, heads=2, activation="gelu", projection_dim=64)
        return cls(
            network_config=UNetConfig(
                model_channels=32, num_head_channels=16, transformer_depth=depth, context_dim=64,
                adm_in_channels=1600,
            ),
            control_stage_config=ControlConfig(
                model_channels=32, num_head_channels=16, transformer_depth=depth, context_dim=64,
                adm_in_channels=1600,
            ),
            first_stage_config=VAEConfig(ch=32),
            conditioner_config=ConditionerConfig(clip_l=clip, clip_l_layer_idx=1, bigg=bigg),
            name="tiny",
        )

    @classmethod
    def from_official_yaml(cls, path: str | Path) -> ModelConfig:
        """Read an official options YAML (e.g. options/SUPIR_v0.yaml) so that variants build too."""
        import yaml

        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"options YAML not found: {path}") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
        try:
            params = doc["model"]["params"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: no model.params section; is this a SUPIR options file?") from None

        def section(key: str) -> dict[str, Any]:
            try:
                return dict(params[key]["params"])
            except (KeyError, TypeError):
                raise ValueError(f"{path}: model.params.{key}.params is missing") from None

        unet = _dataclass_from(UNetConfig, section("network_config"), path, "network_config")
        ctrl = _dataclass_from(ControlConfig, section("control_stage_config"), path, "control_stage_config")
        first = section("first_stage_config")
        dd = dict(first.pop("ddconfig", {}))
        dd["embed_dim"] = first.pop("embed_dim", VAEConfig.embed_dim)
        dd["scale_factor"] = params.get("scale_factor", VAEConfig.scale_factor)
        vae = _dataclass_from(VAEConfig, dd, path, "first_stage_config")
        cond = _conditioner_from(params.get("conditioner_config", {}), path)
        den = params.get("denoiser_config", {}).get("params", {})
        disc = den.get("discretization_config", {}).get("params", {}) or {}
        denoiser = DenoiserConfig(
            num_idx=den.get("num_idx", DenoiserConfig.num_idx),
            linear_start=disc.get("linear_start", DenoiserConfig.linear_start),
            linear_end=disc.get("linear_end", DenoiserConfig.linear_end),
        )
        return cls(
            network_config=unet, control_stage_config=ctrl, first_stage_config=vae,
            conditioner_config=cond, denoiser_config=denoiser,
            p_p=params.get("p_p", DEFAULT_POSITIVE_PROMPT), n_p=params.get("n_p", DEFAULT_NEGATIVE_PROMPT),
            name=path.stem,
        )


# Official YAML keys that change nothing at inference (training switches, attention kernels, defaults
# the official code asserts) and are therefore accepted and dropped.
_INERT_KEYS = {
    "use_checkpoint": None, "spatial_transformer_attn_type": None, "legacy": False,
    "num_classes": "sequential", "use_spatial_transformer": True, "mode": "XL-base",
    "out_channels": None, "attn_type": None, "lossconfig": None, "ckpt_path": None,
    "use_fp16": None, "num_heads": -1, "dropout": 0.0,
}


def _dataclass_from(cls: type, values: dict[str, Any], path: Path, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in _INERT_KEYS:
            expected = _INERT_KEYS[key]
            if expected is not None and value != expected and not (key == "dropout" and not value):
                raise ValueError(f"{path}: {where}.{key}={value!r} is not supported (only {expected!r})")
        else:
            raise ValueError(f"{path}: unknown parameter {where}.{key}={value!r}")
    return cls(**kwargs)


def _conditioner_from(section: dict[str, Any], path: Path) -> ConditionerConfig:
    """The YAML names the embedder classes and the layer choice; the text widths are those of the
    pretrained CLIP-L / bigG and are not in the file."""
    models = (section.get("params") or {}).get("emb_models") or []
    cond = ConditionerConfig()
    if not models:
        return cond
    targets = [m.get("target", "").rsplit(".", 1)[-1] for m in models]
    expected = ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"] + ["ConcatTimestepEmbedderND"] * 3
    if targets != expected:
        raise ValueError(f"{path}: conditioner embedders {targets} differ from SDXL's {expected}")
    clip_params = models[0].get("params") or {}
    layer_idx = clip_params.get("layer_idx", cond.clip_l_layer_idx) if clip_params.get("layer") == "hidden" else None
    if layer_idx is None:
        raise ValueError(f"{path}: CLIP-L embedder must use layer 'hidden' with a layer_idx")
    if (models[1].get("params") or {}).get("layer", "penultimate") != "penultimate":
        raise ValueError(f"{path}: the bigG embedder must use layer 'penultimate'")
    outdim = (models[2].get("params") or {}).get("outdim", cond.size_embed_dim)
    return dataclasses.replace(cond, clip_l_layer_idx=layer_idx, size_embed_dim=outdim)


PRESETS = {"official": ModelConfig.official, "tiny": ModelConfig.tiny}


def model_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


__all__ = [
    "CLIPTextConfig", "ConditionerConfig", "ControlConfig", "DenoiserConfig", "ModelConfig",
    "UNetConfig", "VAEConfig", "PRESETS", "model_config", "DEFAULT_POSITIVE_PROMPT",
    "DEFAULT_NEGATIVE_PROMPT",
]
