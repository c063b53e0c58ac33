"""The restore settings as UI controls: one `Knob` per `RestoreConfig` field, the official name as help.

The knobs people reach for (steps, CFG, control scale, τ_r, seed, upscale, colour fix) and the other
official settings are described here with ranges and help. Any other field of `RestoreConfig` (a setting
added later, such as tiling) gets a control derived from its type and default, so a new setting appears
in the UI without editing this file; fields whose name mentions tiles go to their own "Tiling" group.

Pure data and conversions: no Gradio import (`supir_rt.ui.layout` turns knobs into components).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from supir_rt.restore_config import COLOR_FIXES, RestoreConfig

Kind = Literal["slider", "int", "float", "bool", "choice", "text"]
Group = Literal["main", "advanced", "tiling", "prompt"]


@dataclass(frozen=True)
class Knob:
    """How one `RestoreConfig` field is shown: label, help (official flag first), kind and range."""

    name: str
    label: str
    help: str
    kind: Kind
    group: Group
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is a valid value (an empty box)
    number_type: type = float  # int or float for numeric knobs


def _slider(name: str, label: str, help: str, lo: float, hi: float, step: float, group: Group = "main",
            number_type: type = float) -> Knob:
    return Knob(name, label, help, "slider", group, lo, hi, step, number_type=number_type)


# The described settings, in display order. Help text starts with the official test.py flag.
DESCRIBED: tuple[Knob, ...] = (
    _slider("num_steps", "Steps", "--edm_steps: sampler steps (official 50)", 1, 1000, 1, number_type=int),
    _slider("cfg_scale", "CFG scale", "--s_cfg: classifier-free guidance reached at low noise (official 4.0)",
            0.0, 20.0, 0.1),
    _slider("control_scale", "Control scale", "--s_stage2: strength of the low-quality image's control (1.0)",
            0.0, 2.0, 0.01),
    _slider("restore_cfg", "Restoration guidance τ_r",
            "--s_stage1: pulls the sample towards the stage-1 image; ≤ 0 turns it off (official -1, paper 4)",
            -1.0, 10.0, 0.1),
    Knob("seed", "Seed", "--seed: -1 picks a random seed, recorded in the output (official 1234)", "int", "main",
         -1, None, 1, number_type=int),
    _slider("upscale", "Upscale", "--upscale: output size = upscale × input size (1)", 0.25, 8.0, 0.25),
    Knob("color_fix_type", "Colour fix", "--color_fix_type: match colours to the stage-1 image (Wavelet)",
         "choice", "main", choices=COLOR_FIXES),
    _slider("cfg_scale_start", "CFG scale at high noise",
            "--spt_linear_CFG: where the linear CFG ramp starts (1.0)", 0.0, 20.0, 0.1, "advanced"),
    Knob("use_linear_cfg", "Linear CFG", "--linear_CFG: ramp CFG from its start value to the CFG scale (on)",
         "bool", "advanced"),
    _slider("control_scale_start", "Control scale at high noise",
            "--spt_linear_s_stage2: start of the control ramp, with linear control scale (0.0)",
            0.0, 2.0, 0.01, "advanced"),
    Knob("use_linear_control_scale", "Linear control scale", "--linear_s_stage2: ramp the control strength (off)",
         "bool", "advanced"),
    _slider("s_churn", "Churn", "--s_churn: noise added back at each step (5)", 0.0, 40.0, 0.5, "advanced"),
    _slider("s_noise", "Churn noise scale", "--s_noise: scale of the churn noise (1.01)", 0.9, 1.2, 0.001,
            "advanced"),
    Knob("restore_cfg_s_tmin", "τ_r stops below σ", "RestoreEDMSampler restore_cfg_s_tmin: no restoration "
         "guidance once σ falls below this (0.05)", "float", "advanced", 0.0, None, 0.01),
    _slider("min_size", "Minimum processing size", "--min_size: short side of the processing size in px (1024)",
            0, 4096, 64, "advanced", number_type=int),
    Knob("noise_device", "Noise device", "where the sampler noise is drawn; cuda reproduces an official GPU run "
         "(cpu)", "text", "advanced"),
    Knob("a_prompt", "Quality prompt", "--a_prompt: appended to the caption", "text", "prompt"),
    Knob("n_prompt", "Negative prompt", "--n_prompt: what CFG steers away from", "text", "prompt"),
    Knob("tile_captions", "Tile captions", "not official: with a tiled sampler and a captioner (llava, hf), caption "
         "every tile and condition it with its own caption (docs/captions.md); off", "bool", "tiling"),
    Knob("quality_first", "Quality prompt first", "not official: put the quality prompt before the caption so "
         "that a long caption does not push it out of CLIP's 77 tokens", "bool", "prompt"),
)

# Fields a preset does not change: the seed and the prompts are the user's, not the preset's.
NOT_FROM_PRESET = frozenset({"seed", "a_prompt", "n_prompt"})


def _is_tiling(name: str) -> bool:
    return "tile" in name or "tiling" in name


def derived_knob(field: dataclasses.Field, hint: Any) -> Knob | None:
    """A control for a field that `DESCRIBED` does not know, from its type hint and default."""
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else str
    label = field.name.replace("_", " ").capitalize()
    group: Group = "tiling" if _is_tiling(field.name) else "advanced"
    help_text = f"RestoreConfig.{field.name}"
    if typing.get_origin(hint) is Literal:
        return Knob(field.name, label, help_text, "choice", group, choices=tuple(str(a) for a in typing.get_args(hint)),
                    optional=optional)
    if hint is bool:
        return Knob(field.name, label, help_text, "bool", group, optional=optional)
    if hint is int:
        return Knob(field.name, label, help_text, "int", group, step=1, optional=optional, number_type=int)
    if hint is float:
        return Knob(field.name, label, help_text, "float", group, optional=optional)
    if hint is str:
        return Knob(field.name, label, help_text, "text", group, optional=optional)
    return None  # tuples, nested objects: not editable here (the preset's value is kept)


def knobs_for(config_type: type = RestoreConfig) -> tuple[Knob, ...]:
    """Every editable field of ``config_type``: the described ones in their order, then the others."""
    hints = typing.get_type_hints(config_type)
    names = {f.name for f in dataclasses.fields(config_type)}
    known = {k.name: k for k in DESCRIBED}
    knobs = [k for k in DESCRIBED if k.name in names]
    for field in dataclasses.fields(config_type):
        if field.name not in known:
            knob = derived_knob(field, hints[field.name])
            if knob is not None:
                knobs.append(knob)
    return tuple(knobs)


def coerce(knob: Knob, value: Any) -> Any:
    """A component's value as the field's type (sliders and number boxes give floats)."""
    if value is None or (isinstance(value, str) and value == "" and knob.kind != "text"):
        if knob.optional:
            return None
        raise ValueError(f"{knob.label}: a value is needed")
    if knob.kind in ("slider", "int", "float"):
        if knob.number_type is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError(f"{knob.label}: {value} is not a whole number")
            return int(number)
        return float(value)
    if knob.kind == "bool":
        return bool(value)
    return str(value)


def config_from_values(values: Mapping[str, Any], knobs: tuple[Knob, ...], base: RestoreConfig) -> RestoreConfig:
    """A `RestoreConfig` from the knobs' values (fields without a knob keep ``base``'s value).

    Raises ValueError with the knob's label (what the user sees) rather than the field name."""
    by_name = {k.name: k for k in knobs}
    overrides = {name: coerce(by_name[name], value) for name, value in values.items() if name in by_name}
    try:
        return dataclasses.replace(base, **overrides)
    except (TypeError, ValueError) as err:
        message = str(err)
        for knob in knobs:
            if message.startswith(f"{knob.name}=") or f" {knob.name}=" in message:
                message = f"{knob.label}: {message}"
                break
        raise ValueError(message) from None


def values_from_config(config: RestoreConfig, knobs: tuple[Knob, ...], *, skip: frozenset[str] = frozenset()
                       ) -> dict[str, Any]:
    """The knobs' values for ``config`` (fields in ``skip`` left out)."""
    return {k.name: getattr(config, k.name) for k in knobs if k.name not in skip}


__all__ = ["DESCRIBED", "Knob", "NOT_FROM_PRESET", "coerce", "config_from_values", "derived_knob", "knobs_for",
           "values_from_config"]
