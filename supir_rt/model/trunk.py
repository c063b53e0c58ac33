"""The SDXL UNet encoder trunk (time/label embeddings, input blocks, middle block).

Shared by the UNet (`model.diffusion_model`) and GLVControl (`model.control_model`), which is a full
copy of it. Ports the constructor of `UNetModel` in
`sgm/modules/diffusionmodules/openaimodel.py` (Fanghua-Yu/SUPIR @ bda91af), encoder half only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from supir_rt.config import ControlConfig, UNetConfig
from supir_rt.model.blocks import Downsample, ResBlock, SpatialTransformer, TimestepEmbedSequential
from supir_rt.model.embeddings import timestep_embedding


@dataclass(frozen=True)
class TrunkLayout:
    """Channel widths the decoder and the connectors need, derived while building the trunk."""

    skip_channels: tuple[int, ...]  # width of each input block's output (the UNet skips), in order
    middle_channels: int
    time_embed_dim: int


class EncoderTrunk(nn.Module):
    """Attributes `time_embed`, `label_emb`, `input_blocks`, `middle_block` (checkpoint names)."""

    def __init__(self, cfg: UNetConfig | ControlConfig) -> None:
        super().__init__()
        mc, nhc = cfg.model_channels, cfg.num_head_channels
        ted = mc * 4
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        # "sequential" label embedding: label_emb.0.{0,2}
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        )
        blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, ch // nhc, nhc, cfg.transformer_depth[level], cfg.context_dim))
                blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted), SpatialTransformer(ch, ch // nhc, nhc, cfg.middle_depth, cfg.context_dim), ResBlock(ch, ted)
        )
        self.layout = TrunkLayout(tuple(skips), ch, ted)
        self.attention_levels = tuple(2**lvl in cfg.attention_resolutions for lvl in range(len(cfg.channel_mult)))

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) integer DDPM indices, (N, adm) vector -> (N, 4*model_channels) block embedding."""
        dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.model_channels).to(dtype)  # fp32 sinusoid, then cast
        return self.time_embed(t_emb) + self.label_emb(y.to(dtype))
