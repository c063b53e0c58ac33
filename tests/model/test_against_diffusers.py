"""supir-rt's SDXL UNet and VAE against an independent implementation: diffusers.

Weights are written in the SDXL single-file (LDM/SGM) key layout, exactly as supir-rt loads them, then
read into diffusers' `UNet2DConditionModel` / `AutoencoderKL` through diffusers' own single-file
conversion (`create_*_diffusers_config_from_ldm` builds the diffusers architecture from an SGM options
dict, `convert_ldm_*_checkpoint` renames the keys) and loaded strictly. No hub access: the options are
written here. The model is a small SDXL: the official structure (two resblocks per level, no attention
at full resolution, transformer depths per level, linear proj_in/out, context 2048, the 2816-wide
text_time vector) with narrow channels.

Tolerances. Both sides run on the CPU with the same weights and differ only by the order of
floating-point operations. Measured (torch 2.13, diffusers 0.42): the UNet agrees bit for bit in fp32;
the VAE encoder to ~1e-6 and the decoder to 5e-6 of the output's largest magnitude in fp32, and to
1e-14 in fp64 - so the fp32 residue is rounding, not a formula: each implementation alone is that far
from its own fp64 result (supir-rt's decoder 1.9e-6, diffusers' 5.0e-6; fp32 epsilon is 1.2e-7, and
the decoder stacks ~30 convolutions). Bounds: fp32 1e-5 of the output scale (the sum of the two
rounding errors, rounded up); fp64 (VAE; the UNet's norms compute in fp32 by design, so it has no clean
fp64 run) 1e-12. A wiring error (a swapped concat, a wrong sinusoid, a missing skip) moves outputs by
O(1) of their scale, and a 1 % change of one convolution is caught (last test).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from supir_rt.config import CLIPTextConfig, ConditionerConfig, ControlConfig, ModelConfig, UNetConfig, VAEConfig
from supir_rt.model.supir import ControlWrapper, initialise_random
from supir_rt.model.text import size_vector
from supir_rt.model.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

REL_TOL = 1e-5  # fp32: of the output's max |value|; see the module docstring
REL_TOL_FP64 = 1e-12  # fp64 (VAE only): rounding gone, only a formula difference could remain

# A small SDXL UNet: SDXL's conditioning widths (context 2048 = 768 + 1280, vector 2816 = 1280 + 6 * 256),
# SDXL's layout (channel_mult 1-2-4, attention at 4x/2x, two resblocks per level), narrow channels.
UNET = dict(model_channels=32, num_head_channels=16, transformer_depth=(1, 2, 3), context_dim=2048,
            adm_in_channels=2816)
VAE = VAEConfig(ch=32)  # SDXL's ch_mult (1, 2, 4, 4), two resblocks, mid attention; 32 base channels


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL_TOL) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel:g} x output scale {scale:.3e}"


def _sgm_options(unet: UNetConfig, vae: VAEConfig) -> dict:
    """The SDXL options YAML (sd_xl_base.yaml layout) for these configs, as a dict."""
    network = dict(
        adm_in_channels=unet.adm_in_channels, num_classes="sequential", use_checkpoint=False,
        in_channels=unet.in_channels, out_channels=unet.out_channels, model_channels=unet.model_channels,
        attention_resolutions=list(unet.attention_resolutions), num_res_blocks=unet.num_res_blocks,
        channel_mult=list(unet.channel_mult), num_head_channels=unet.num_head_channels, use_linear_in_transformer=True,
        transformer_depth=list(unet.transformer_depth), context_dim=unet.context_dim, spatial_transformer_attn_type="softmax",
    )
    ddconfig = dict(
        attn_type="vanilla", double_z=True, z_channels=vae.z_channels, resolution=vae.resolution,
        in_channels=vae.in_channels, out_ch=vae.out_ch, ch=vae.ch, ch_mult=list(vae.ch_mult),
        num_res_blocks=vae.num_res_blocks, attn_resolutions=[], dropout=0.0,
    )
    return {"model": {"params": {
        "scale_factor": vae.scale_factor,
        "network_config": {"params": network},
        "first_stage_config": {"params": {"embed_dim": vae.embed_dim, "ddconfig": ddconfig}},
    }}}


def _model_config() -> ModelConfig:
    unet = UNetConfig(**UNET)
    ctrl = ControlConfig(**UNET)
    # the text encoders are never built here; their widths only have to add up to SDXL's context/vector
    cond = ConditionerConfig(clip_l=CLIPTextConfig(width=768, layers=1, heads=12),
                             bigg=CLIPTextConfig(width=1280, layers=1, heads=20, projection_dim=1280))
    return ModelConfig(network_config=unet, control_stage_config=ctrl, first_stage_config=VAE,
                       conditioner_config=cond, name="small-sdxl")


@pytest.fixture(scope="module")
def options() -> dict:
    return _sgm_options(UNetConfig(**UNET), VAE)


@pytest.fixture(scope="module")
def supir_unet() -> ControlWrapper:
    torch.manual_seed(0)
    wrapper = ControlWrapper(_model_config())
    initialise_random(wrapper)
    with torch.no_grad():  # PyTorch's default init leaves the output conv tiny-valued; make every layer count
        for p in wrapper.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return wrapper.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def diffusers_unet(supir_unet, options):
    """diffusers' UNet2DConditionModel from the SDXL single-file keys of the supir-rt UNet."""
    from diffusers import UNet2DConditionModel

    single_file = {f"model.diffusion_model.{k}": v for k, v in supir_unet.diffusion_model.state_dict().items()
                   if not k.startswith("project_modules.")}  # what sd_xl_base_1.0.safetensors holds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # image_size is deprecated but avoids guessing a model type
        config = sfu.create_unet_diffusers_config_from_ldm(options, single_file, image_size=256)
    assert config["addition_embed_type"] == "text_time"  # diffusers recognised an SDXL UNet
    assert config["transformer_layers_per_block"] == list(UNET["transformer_depth"])
    model = UNet2DConditionModel(**config)
    converted = sfu.convert_ldm_unet_checkpoint(single_file, config)
    assert set(converted) == set(model.state_dict())  # every diffusers tensor comes from the file
    model.load_state_dict(converted, strict=True)
    return model.eval().requires_grad_(False)


def _unet_inputs(b: int = 2, h: int = 16, w: int = 24):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([981, 37])
    context = torch.randn(b, 77, UNET["context_dim"], generator=g)
    pooled = torch.randn(b, 1280, generator=g)
    lq = torch.randn(b, 4, h, w, generator=g)
    return x, t, context, pooled, lq


# original size, crop top-left, target size: distinct numbers so that an order slip shows
SIZES = ((768, 1152), (16, 48), (1024, 896))


def _diffusers_eps(model, x, t, context, pooled) -> torch.Tensor:
    time_ids = torch.tensor([[*SIZES[0], *SIZES[1], *SIZES[2]]], dtype=torch.float32).expand(x.shape[0], 6)
    return model(x, t, encoder_hidden_states=context,
                 added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def test_unet_without_adaptor_matches_diffusers_sdxl(supir_unet, diffusers_unet):
    """The plain SDXL path (no control) with supir-rt's size vector = diffusers' text_time embedding."""
    x, t, context, pooled, _ = _unet_inputs()
    y = size_vector(pooled, 256, *SIZES)
    ours = supir_unet.diffusion_model(x, timesteps=t, context=context, y=y, control=None)
    ref = _diffusers_eps(diffusers_unet, x, t, context, pooled)
    assert ref.abs().max() > 0.1  # a live network, not a near-zero output that any wiring would match
    _close(ours, ref)


def test_unet_with_adaptor_at_scale_zero_matches_diffusers_sdxl(supir_unet, diffusers_unet):
    """The production call (GLVControl + connectors) at control_scale 0 is exactly the SDXL UNet."""
    x, t, context, pooled, lq = _unet_inputs()
    y = size_vector(pooled, 256, *SIZES)
    ours = supir_unet(x, t, context, y, lq, control_scale=0.0)
    ref = _diffusers_eps(diffusers_unet, x, t, context, pooled)
    _close(ours, ref)
    # and the adaptor is live: at scale 1 the same call moves the output by far more than the tolerance
    moved = (supir_unet(x, t, context, y, lq, control_scale=1.0) - ref).abs().max()
    assert moved > 1e3 * REL_TOL * ref.abs().max()


@pytest.fixture(scope="module")
def supir_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    vae = AutoencoderKL(VAE)
    initialise_random(vae)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vae.eval().requires_grad_(False)


def _diffusers_vae(state: dict[str, torch.Tensor], options: dict):
    """diffusers' AutoencoderKL from `first_stage_model.*` keys (the SDXL single-file layout)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    single_file = {f"first_stage_model.{k}": v for k, v in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = sfu.create_vae_diffusers_config_from_ldm(options, single_file, image_size=256)
    model = DiffusersAutoencoderKL(**config)
    converted = sfu.convert_ldm_vae_checkpoint(single_file, config)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    return model.eval().requires_grad_(False)


def _sdxl_vae_state(vae: AutoencoderKL, encoder: str = "encoder") -> dict[str, torch.Tensor]:
    """The VAE keys of the SDXL file; `encoder="denoise_encoder"` puts SUPIR's DR encoder in the encoder's place."""
    state = {}
    for k, v in vae.state_dict().items():
        if k.startswith("denoise_encoder.") or (encoder != "encoder" and k.startswith("encoder.")):
            continue
        state[k] = v
    if encoder != "encoder":
        state |= {"encoder." + k[len(encoder) + 1:]: v for k, v in vae.state_dict().items() if k.startswith(encoder + ".")}
    return state


def _image(b: int = 2, h: int = 48, w: int = 80) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


PRECISIONS = pytest.mark.parametrize("dtype, rel", [(torch.float32, REL_TOL), (torch.float64, REL_TOL_FP64)],
                                     ids=["fp32", "fp64"])


@PRECISIONS
@pytest.mark.parametrize("denoise", [False, True], ids=["encoder", "denoise_encoder"])
def test_vae_posterior_matches_diffusers(supir_vae, options, denoise, dtype, rel):
    ref_model = _diffusers_vae(_sdxl_vae_state(supir_vae, "denoise_encoder" if denoise else "encoder"), options)
    ours_model, ref_model = copy.deepcopy(supir_vae).to(dtype), ref_model.to(dtype)
    x = _image().to(dtype)
    ours = ours_model.encode(x, denoise=denoise)
    ref = ref_model.encode(x).latent_dist
    assert ours.mean.shape == (2, 4, 6, 10)
    _close(ours.mean, ref.mean, rel)
    _close(ours.logvar, ref.logvar, rel)  # both clamp to [-30, 20]


@PRECISIONS
def test_vae_decoder_matches_diffusers(supir_vae, options, dtype, rel):
    ref_model = _diffusers_vae(_sdxl_vae_state(supir_vae), options).to(dtype)
    ours_model = copy.deepcopy(supir_vae).to(dtype)
    g = torch.Generator().manual_seed(12)
    z = torch.randn(2, 4, 6, 10, generator=g).to(dtype)
    ours = ours_model.decode(z)
    ref = ref_model.decode(z).sample
    assert ours.shape == (2, 3, 48, 80)
    _close(ours, ref, rel)


def test_diffusers_reference_rejects_a_wrong_weight(supir_unet, diffusers_unet):
    """The comparison is sensitive: one output-block conv perturbed by 1 % of its scale breaks it."""
    x, t, context, pooled, _ = _unet_inputs()
    y = size_vector(pooled, 256, *SIZES)
    unet = copy.deepcopy(supir_unet.diffusion_model)
    with torch.no_grad():
        w = unet.output_blocks[4][0].in_layers[2].weight
        w.add_(0.01 * w.abs().max() * torch.randn_like(w))
    ref = _diffusers_eps(diffusers_unet, x, t, context, pooled)
    err = (unet(x, timesteps=t, context=context, y=y) - ref).abs().max()
    assert err > 100 * REL_TOL * ref.abs().max()
