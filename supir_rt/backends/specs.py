"""The engine I/O contract: every exported network's inputs and outputs, declared once, as data.

ONNX input names and dynamic axes, TensorRT profiles, buffer shapes for a request, random sample
inputs and feed validation are all derived from these tables. Shapes use symbolic dims:
`B` (images per request), `2B` (the CFG pair [uncond, cond] stacked on the batch axis), `h`/`w`
(latent height/width) and `8h`/`8w` (image pixels). A dim is an int, a symbol, or `<k><symbol>`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from supir_rt.config import ModelConfig

Dim = int | str
_DIM = re.compile(r"^(\d*)([A-Za-z_]\w*)$")


@dataclass(frozen=True)
class DimRange:
    """Allowed values of one symbol: min, the value to optimise for, max (TensorRT's min/opt/max)."""

    min: int
    opt: int
    max: int


# Default ranges: 1-4 images per request, latents 8..256 (64..2048 px; test.py snaps sides to 64 px).
DEFAULT_RANGES: dict[str, DimRange] = {
    "B": DimRange(1, 1, 4),
    "h": DimRange(8, 128, 256),
    "w": DimRange(8, 128, 256),
}


# ------------------------------------------------------------------------------ TensorRT profiles

# The sampler's tile (tiled sampling): 128 x 128 latent (1024 px) tiles, stride 64, batched through
# `unet_adaptor` (2B rows per call). A plan gets a profile for exactly this shape, so tiled restores
# of any image size run on kernels tuned for it.
SAMPLER_TILE_LATENT = 128
SAMPLER_TILE_BATCH = 4
STATIC_LATENT = 128  # the common 1024 px-class request, one image


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile: a name and a (min, opt, max) range per symbol.

    A plan holds several; the runtime picks, per request, the tightest one containing its sizes
    (`select_profile`). Symbols a network does not use are ignored for that network.
    """

    name: str
    ranges: tuple[tuple[str, DimRange], ...]
    networks: tuple[str, ...] | None = None  # the networks that get it (None: all)

    @classmethod
    def of(cls, name: str, ranges: Mapping[str, DimRange], networks: tuple[str, ...] | None = None) -> Profile:
        for sym, r in ranges.items():
            if not 1 <= r.min <= r.opt <= r.max:
                raise ValueError(f"profile {name!r}: {sym} range {r.min}/{r.opt}/{r.max} needs 1 <= min <= opt <= max")
        return cls(name, tuple(sorted(ranges.items())), None if networks is None else tuple(networks))

    @property
    def range_map(self) -> dict[str, DimRange]:
        return dict(self.ranges)

    def restricted(self, symbols: set[str]) -> Profile:
        """The same profile over only the symbols a network uses."""
        return Profile(self.name, tuple((k, r) for k, r in self.ranges if k in symbols), self.networks)

    def contains(self, dims: Mapping[str, int]) -> bool:
        return all(r.min <= dims[k] <= r.max for k, r in self.ranges if k in dims)

    @property
    def is_static(self) -> bool:
        return all(r.min == r.max for _, r in self.ranges)

    def volume(self) -> int:
        n = 1
        for _, r in self.ranges:
            n *= r.max - r.min + 1
        return n

    def describe(self) -> str:
        """``static (B 1, h 128, w 128)`` / ``dynamic (B 1..4, h 8..256, w 8..256)``."""
        parts = [f"{k} {r.min}" if r.min == r.max else f"{k} {r.min}..{r.max}" for k, r in self.ranges]
        return f"{self.name} ({', '.join(parts)})"

    def to_json(self) -> dict:
        data = {"name": self.name, "ranges": {k: [r.min, r.opt, r.max] for k, r in self.ranges}}
        return data if self.networks is None else {**data, "networks": list(self.networks)}

    @classmethod
    def from_json(cls, data: Mapping) -> Profile:
        return cls.of(data["name"], {k: DimRange(*v) for k, v in data["ranges"].items()}, data.get("networks"))


def default_profiles(*, static_latent: tuple[int, int] | None = (STATIC_LATENT, STATIC_LATENT),
                     tile_latent: int | None = SAMPLER_TILE_LATENT, tile_batch: int = SAMPLER_TILE_BATCH,
                     dynamic: Mapping[str, DimRange] | None = DEFAULT_RANGES) -> tuple[Profile, ...]:
    """The profiles a plan is built with by default: a static one for the common 1024 px-class
    request, one for the sampler tile (a batch of 1..`tile_batch` tiles; `unet_adaptor` only, the
    network the tiled sampler calls), and a dynamic fallback. Pass None to leave one out."""
    profiles = []
    if static_latent is not None:
        h, w = static_latent
        profiles.append(Profile.of("static", {"B": DimRange(1, 1, 1), "h": DimRange(h, h, h), "w": DimRange(w, w, w)}))
    if tile_latent is not None:
        t = tile_latent
        profiles.append(Profile.of("tile", {"B": DimRange(1, tile_batch, tile_batch), "h": DimRange(t, t, t),
                                            "w": DimRange(t, t, t)}, networks=("unet_adaptor",)))
    if dynamic is not None:
        profiles.append(Profile.of("dynamic", dynamic))
    if not profiles:
        raise ValueError("at least one TensorRT profile is needed (static, tile or dynamic)")
    return tuple(profiles)


def network_profiles(spec: NetworkSpec, profiles: tuple[Profile, ...]) -> tuple[Profile, ...]:
    """The profiles as one network sees them: restricted to its symbols, duplicates dropped (e.g.
    the text encoders only have `B`, so `static` and `tile` may give the same shapes)."""
    symbols = set().union(*(s.symbols() for s in spec.inputs))
    out: list[Profile] = []
    seen: set[tuple] = set()
    for p in profiles:
        if p.networks is not None and spec.name not in p.networks:
            continue
        q = p.restricted(symbols)
        key = tuple(sorted(spec.profile(q.range_map).items())) if symbols else ()
        if key not in seen:
            seen.add(key)
            out.append(q)
    return tuple(out)


def select_profile(profiles: tuple[Profile, ...], dims: Mapping[str, int]) -> int | None:
    """Index of the tightest profile containing `dims` (static before dynamic, then the smallest
    range), or None when none does."""
    fits = [i for i, p in enumerate(profiles) if p.contains(dims)]
    if not fits:
        return None
    return min(fits, key=lambda i: (not profiles[i].is_static, profiles[i].volume(), i))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[Dim, ...]

    def symbols(self) -> set[str]:
        return {_parse(d)[1] for d in self.shape if isinstance(d, str)}

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given symbol values, e.g. {'B': 1, 'h': 128, 'w': 168}."""
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            else:
                k, sym = _parse(d)
                if sym not in dims:
                    raise KeyError(f"{self.name}: no value for dimension {sym!r}")
                out.append(k * dims[sym])
        return tuple(out)


def _parse(dim: str) -> tuple[int, str]:
    m = _DIM.match(dim)
    if not m:
        raise ValueError(f"bad symbolic dimension {dim!r}")
    return int(m.group(1) or 1), m.group(2)


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(s for s in self.outputs if s.name == name)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX `dynamic_axes`: every symbolic dim, named by its expression (e.g. '2B', 'h', '8w')."""
        axes: dict[str, dict[int, str]] = {}
        for s in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
            if named:
                axes[s.name] = named
        return axes

    def infer_dims(self, feed: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Read the symbol values off a feed; inconsistent sizes are an error."""
        dims: dict[str, int] = {}
        for s in self.inputs:
            t = feed[s.name]
            for d, size in zip(s.shape, t.shape):
                if isinstance(d, str):
                    k, sym = _parse(d)
                    if size % k:
                        raise ValueError(f"{self.name}.{s.name}: size {size} is not a multiple of {k} ({d})")
                    if dims.setdefault(sym, size // k) != size // k:
                        raise ValueError(
                            f"{self.name}.{s.name}: dimension {d}={size} disagrees with {sym}={dims[sym]} "
                            "from another input"
                        )
        return dims

    def output_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {s.name: s.resolve(dims) for s in self.outputs}

    def profile(self, ranges: Mapping[str, DimRange] = DEFAULT_RANGES) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT-style (min, opt, max) shape per input."""
        pick = {"min": {k: r.min for k, r in ranges.items()}, "opt": {k: r.opt for k, r in ranges.items()},
                "max": {k: r.max for k, r in ranges.items()}}
        return {s.name: tuple(s.resolve(pick[m]) for m in ("min", "opt", "max")) for s in self.inputs}

    def sample_inputs(
        self, dims: Mapping[str, int], *, generator: torch.Generator | None = None, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the right shapes/dtypes (floats ~N(0,1), timesteps in [0, 999], ids in vocab)."""
        feed = {}
        for s in self.inputs:
            shape = s.resolve(dims)
            if s.dtype == torch.int64:
                high = 1000 if s.name == "timesteps" else 49408
                feed[s.name] = torch.randint(0, high, shape, generator=generator).to(device)
            else:
                t = torch.randn(shape, generator=generator)
                if s.name == "control_scale":
                    t = torch.rand(shape, generator=generator)
                feed[s.name] = t.to(device=device, dtype=dtype or s.dtype)
        return feed


def validate_feed(spec: NetworkSpec, feed: Mapping[str, torch.Tensor], *, float_dtype: torch.dtype | None = None) -> None:
    """Names, dtypes, ranks and consistent symbolic sizes; one clear error naming the input."""
    missing = [n for n in spec.input_names if n not in feed]
    extra = [n for n in feed if n not in spec.input_names]
    if missing or extra:
        raise ValueError(f"{spec.name}: feed is missing {missing} / has unknown inputs {extra}; "
                         f"expected {spec.input_names}")
    for s in spec.inputs:
        t = feed[s.name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{spec.name}.{s.name}: expected a torch.Tensor, got {type(t).__name__}")
        want = s.dtype if not s.dtype.is_floating_point or float_dtype is None else float_dtype
        if t.dtype != want:
            raise TypeError(f"{spec.name}.{s.name}: dtype {t.dtype}, expected {want}")
        if t.dim() != len(s.shape):
            raise ValueError(f"{spec.name}.{s.name}: rank {t.dim()} {tuple(t.shape)}, expected shape {s.shape}")
        fixed = [(i, d, t.shape[i]) for i, d in enumerate(s.shape) if isinstance(d, int) and t.shape[i] != d]
        if fixed:
            raise ValueError(f"{spec.name}.{s.name}: shape {tuple(t.shape)}, expected {s.shape}")
    spec.infer_dims(feed)


def network_specs(config: ModelConfig) -> dict[str, NetworkSpec]:
    """The five exported networks for a model configuration."""
    f32, i64 = torch.float32, torch.int64
    ctx = config.network_config.context_dim
    adm = config.network_config.adm_in_channels
    zc = config.first_stage_config.z_channels
    proj = config.conditioner_config.bigg.projection_dim
    seq = config.conditioner_config.clip_l.context_length
    image = TensorSpec("image", f32, ("B", 3, "8h", "8w"))
    specs = [
        NetworkSpec("dr_encoder", (image,), (TensorSpec("latent", f32, ("B", zc, "h", "w")),),
                    "degradation-robust encoder: image in [-1, 1] -> control latent (posterior mean x scale_factor)"),
        NetworkSpec("vae_encoder", (image,), (TensorSpec("moments", f32, ("B", 2 * zc, "h", "w")),),
                    "standard SDXL encoder: image -> posterior moments (mean, logvar), for x_center"),
        NetworkSpec(
            "unet_adaptor",
            (TensorSpec("x_in", f32, ("2B", zc, "h", "w")), TensorSpec("timesteps", i64, ("2B",)),
             TensorSpec("context", f32, ("2B", seq, ctx)), TensorSpec("vector", f32, ("2B", adm)),
             TensorSpec("lq_latent", f32, ("2B", zc, "h", "w")), TensorSpec("control_scale", f32, (1,))),
            (TensorSpec("eps", f32, ("2B", zc, "h", "w")),),
            "GLVControl + UNet with connectors, one call per step for the CFG pair [uncond, cond]: "
            "c_in-scaled latent, integer DDPM index -> eps",
        ),
        NetworkSpec("vae_decoder", (TensorSpec("latent", f32, ("B", zc, "h", "w")),),
                    (TensorSpec("image", f32, ("B", 3, "8h", "8w")),),
                    "scaled latent (divided by scale_factor inside) -> image, not clamped"),
        NetworkSpec("text_encoders",
                    (TensorSpec("clip_l_ids", i64, ("B", seq)), TensorSpec("bigg_ids", i64, ("B", seq))),
                    (TensorSpec("crossattn", f32, ("B", seq, ctx)), TensorSpec("pooled", f32, ("B", proj))),
                    "CLIP-L hidden state + bigG penultimate (crossattn), bigG pooled projection"),
    ]
    return {s.name: s for s in specs}


NETWORKS = ("dr_encoder", "vae_encoder", "unet_adaptor", "vae_decoder", "text_encoders")
