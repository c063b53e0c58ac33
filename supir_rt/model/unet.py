"""The SDXL UNet with SUPIR's connector decoder (LightGLVUNet, `mode: XL-base`).

Ports `UNetModel` of `sgm/modules/diffusionmodules/openaimodel.py` and `LightGLVUNet` of
`SUPIR/modules/SUPIR_v0.py` (Fanghua-Yu/SUPIR @ bda91af).
The connector widths are derived from the trunk layout, so any `model_channels` builds; at 320 they
equal the official hard-coded lists. Removed upstream: checkpointing, xformers, training masks.
"""

from __future__ import annotations

import torch
from torch import nn

from supir_rt.config import UNetConfig
from supir_rt.model.blocks import ResBlock, SpatialTransformer, TimestepEmbedSequential, Upsample, normalization
from supir_rt.model.control import ControlScale, ZeroCrossAttn, ZeroSFT
from supir_rt.model.trunk import EncoderTrunk


class LightGLVUNet(EncoderTrunk):
    """`model.diffusion_model`: SDXL UNet + `project_modules` (10 ZeroSFT + 2 ZeroCrossAttn)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__(cfg)
        mc, nhc, ted = cfg.model_channels, cfg.num_head_channels, self.layout.time_embed_dim
        skips = list(self.layout.skip_channels)
        ch = self.layout.middle_channels
        blocks, dec_in, has_up = [], [], []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                dec_in.append(ch)  # decoder width entering this output block
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), ted, mc * mult)]
                ch = mc * mult
                if self.attention_levels[level]:
                    layers.append(SpatialTransformer(ch, ch // nhc, nhc, cfg.transformer_depth[level], cfg.context_dim))
                upsample = level > 0 and i == cfg.num_res_blocks
                if upsample:
                    layers.append(Upsample(ch))
                has_up.append(upsample)
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        self.project_modules = nn.ModuleList(self._connectors(cfg, dec_in, has_up))

    def _connectors(self, cfg: UNetConfig, dec_in: list[int], has_up: list[bool]) -> list[nn.Module]:
        """Control index i (0..n) pairs with output block n-1-i; i = n is the middle block.

        The official list is the 10 ZeroSFTs in control order with a ZeroCrossAttn inserted before the
        ZeroSFT of each control index whose output block ends in an Upsample (indices 3 and 6 in SDXL),
        giving the official 12-entry order.
        """
        norm_nc = list(self.layout.skip_channels) + [self.layout.middle_channels]  # UNet skip widths
        n_out = len(dec_in)
        concat = [dec_in[n_out - 1 - i] for i in range(n_out)] + [0]  # decoder widths, 0 for the middle
        modules: list[nn.Module] = []
        for i, (nc, cc) in enumerate(zip(norm_nc, concat)):
            label_nc = nc * cfg.project_channel_scale // 2
            if i < n_out and has_up[n_out - 1 - i]:
                modules.append(ZeroCrossAttn(context_dim=nc, query_dim=cc))
            modules.append(ZeroSFT(label_nc, nc, cc))
        return modules

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        control: list[torch.Tensor] | None = None,
        control_scale: ControlScale = 1.0,
    ) -> torch.Tensor:
        """eps prediction. `control=None` runs the plain SDXL UNet (no connectors)."""
        dtype = control[0].dtype if control is not None else self.time_embed[0].weight.dtype
        x, context, y = x.to(dtype), context.to(dtype), y.to(dtype)
        emb = self.embed(timesteps, y)  # (B, 4*mc)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)  # (B, 4*mc, H/4, W/4)
        pm = iter(reversed(self.project_modules))
        ci = len(hs)  # control index of the middle block
        if control is not None:
            h = next(pm)(control[ci], h, control_scale=control_scale)
        for block in self.output_blocks:
            ci -= 1
            skip = hs.pop()
            if control is None:
                h = torch.cat([h, skip], dim=1)  # (B, C_dec + C_skip, H, W)
                h = block(h, emb, context)
                continue
            h = next(pm)(control[ci], skip, h, control_scale=control_scale)
            if isinstance(block[-1], Upsample):
                for layer in block[:-1]:
                    h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h, context)
                h = next(pm)(control[ci], h, control_scale=control_scale)  # ZeroCrossAttn before the Upsample
                h = block[-1](h)
            else:
                h = block(h, emb, context)
        return self.out(h.to(dtype))
