"""SDXL's text/vector conditioner: CLIP-L, OpenCLIP ViT-bigG-14 text and the three size embedders.

Ports the inference path of `sgm/modules/encoders/modules.py` (Stability-AI/generative-models as
vendored by Fanghua-Yu/SUPIR @ bda91af) as configured by `options/SUPIR_v0.yaml`:

* `embedders.0` `FrozenCLIPEmbedder` (layer "hidden", layer_idx 11): Hugging Face `CLIPTextModel`
  (openai/clip-vit-large-patch14) in HF's module layout under `transformer.text_model`; output
  `hidden_states[layer_idx]` (hidden_states[0] is the embeddings output) with **no** final LayerNorm.
* `embedders.1` `FrozenOpenCLIPEmbedder2` (layer "penultimate", pooled, legacy False): the open_clip
  text tower in open_clip's layout under `model`; outputs the input of the last resblock (no ln_final)
  and pooled = ln_final(last) at the EOT position (argmax of ids) @ text_projection.
* `embedders.2..4` `ConcatTimestepEmbedderND` (outdim 256): original size, crop, target size.

State-dict keys equal the SDXL checkpoint's `conditioner.embedders.N.*` keys without `conditioner.`;
the old `...embeddings.position_ids` buffer is deliberately not registered. Removed upstream parts:
tokenisation inside the modules (see `supir_rt.tokenizer`), freezing/training switches, the unused
hidden layers after `layer_idx` (CLIP-L) are never run, the visual tower (deleted upstream too).
Attention is written here with `scaled_dot_product_attention` (causal); LayerNorms compute in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from supir_rt.config import CLIPTextConfig, ConditionerConfig
from supir_rt.model.blocks import LayerNorm32
from supir_rt.model.embeddings import timestep_embedding
from supir_rt.tokenizer import VOCAB_SIZE, load_tokenizer

# The causal attention kernel: one module-level seam.
# (q, k, v) each (B, heads, T, d) -> (B, heads, T, d), causal mask, scale 1/sqrt(d).
CausalAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


causal_attention_fn: CausalAttentionFn = _sdpa_causal

LAYER_NORM_EPS = 1e-5  # both CLIP text towers


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu  # exact erf GELU
    raise ValueError(f"unknown CLIP activation {name!r}; expected 'quick_gelu' or 'gelu'")


def _multi_head_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) each -> (B, T, C), causal multi-head attention."""
    b, t, c = q.shape
    q, k, v = (z.reshape(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))  # (B, heads, T, d)
    out = causal_attention_fn(q, k, v)  # (B, heads, T, d)
    return out.transpose(1, 2).reshape(b, t, c)


def _check_heads(cfg: CLIPTextConfig) -> None:
    if cfg.width % cfg.heads:
        raise ValueError(f"CLIP text width {cfg.width} is not divisible by heads {cfg.heads}")


# --------------------------------------------------------------------------------------------------
# embedders.0: CLIP-L, Hugging Face `transformers.models.clip.modeling_clip` layout
# --------------------------------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
    """HF `CLIPTextEmbeddings`: token + learned absolute position embedding (no position_ids buffer)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:t]  # (B, T, C)


class CLIPAttention(nn.Module):
    """HF `CLIPAttention`: separate q/k/v/out projections with bias, causal here."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        _check_heads(cfg)
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        out = _multi_head_causal(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    """HF `CLIPMLP`: fc1 -> activation -> fc2."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = _activation(cfg.activation)
        self.fc1 = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, T, C)


class CLIPEncoderLayer(nn.Module):
    """HF `CLIPEncoderLayer`: pre-norm residual attention then pre-norm residual MLP."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = LayerNorm32(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = LayerNorm32(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))  # (B, T, C)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])


class CLIPTextTransformer(nn.Module):
    """HF `CLIPTextTransformer` (`text_model`). `final_layer_norm` is kept for strict loading only."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm32(cfg.width, eps=LAYER_NORM_EPS)

    def hidden_state(self, input_ids: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """HF `hidden_states[layer_idx]`: (B, T) ids -> (B, T, C); runs only the first `layer_idx` layers."""
        n = len(self.encoder.layers)
        if not 0 <= layer_idx <= n:
            raise ValueError(f"layer_idx={layer_idx} outside the {n + 1} hidden states of a {n}-layer CLIP")
        x = self.embeddings(input_ids)  # (B, T, C) = hidden_states[0]
        for layer in self.encoder.layers[:layer_idx]:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    """HF `CLIPTextModel`: only holds `text_model`, so keys read `transformer.text_model.*`."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class FrozenCLIPEmbedder(nn.Module):
    """sgm `FrozenCLIPEmbedder` with layer="hidden": ids (B, 77) -> hidden_states[layer_idx] (B, 77, C)."""

    def __init__(self, cfg: CLIPTextConfig, layer_idx: int) -> None:
        super().__init__()
        if not 0 <= layer_idx <= cfg.layers:
            raise ValueError(f"clip_l_layer_idx={layer_idx} must be in [0, {cfg.layers}] for {cfg.layers} layers")
        self.layer_idx = layer_idx
        self.transformer = CLIPTextModel(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.text_model.hidden_state(input_ids, self.layer_idx)  # (B, T, C)


# --------------------------------------------------------------------------------------------------
# embedders.1: OpenCLIP ViT-bigG-14 text tower, open_clip layout
# --------------------------------------------------------------------------------------------------


class MultiheadSelfAttention(nn.Module):
    """The parameters of `torch.nn.MultiheadAttention` (packed q/k/v `in_proj_*`, `out_proj`), used
    as causal self-attention. Written out so the kernel is SDPA and the seam above applies."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's MultiheadAttention init of the packed projection (xavier uniform, zero bias)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, C)
        return self.out_proj(_multi_head_causal(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    """open_clip's `mlp` Sequential(c_fc, gelu, c_proj); only c_fc and c_proj carry weights."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = _activation(cfg.activation)
        self.c_fc = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.c_proj = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))  # (B, T, C)


class ResidualAttentionBlock(nn.Module):
    """open_clip `ResidualAttentionBlock` (no layer scale): x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        _check_heads(cfg)
        self.ln_1 = LayerNorm32(cfg.width, eps=LAYER_NORM_EPS)
        self.attn = MultiheadSelfAttention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm32(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(cfg) for _ in range(cfg.layers)])


class OpenCLIPTextModel(nn.Module):
    """open_clip `CLIP` with the visual tower removed: the text tower's parameters and `logit_scale`
    (unused, present in the checkpoint)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        if cfg.projection_dim is None:
            raise ValueError("the OpenCLIP text tower needs projection_dim (bigG: 1280)")
        if cfg.layers < 1:
            raise ValueError("the OpenCLIP text tower needs at least one resblock for 'penultimate'")
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = LayerNorm32(cfg.width, eps=LAYER_NORM_EPS)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))  # used as x @ P
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """open_clip's init of the directly held parameters (submodules initialise themselves)."""
        width = self.positional_embedding.shape[1]
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> (penultimate (B, T, C): input of the last resblock, pooled (B, P))."""
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]  # (B, T, C)
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            x = block(x)
        penultimate = x  # (B, T, C), no ln_final
        x = self.ln_final(last(x))  # (B, T, C)
        eot = input_ids.argmax(dim=-1)  # (B,) EOT 49407 is the largest id
        pooled = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (B, P)
        return penultimate, pooled


class FrozenOpenCLIPEmbedder2(nn.Module):
    """sgm `FrozenOpenCLIPEmbedder2` (layer="penultimate", always_return_pooled, legacy=False)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.model = OpenCLIPTextModel(cfg)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids)  # (B, T, C), (B, P)


# --------------------------------------------------------------------------------------------------
# embedders.2-4 and the conditioner
# --------------------------------------------------------------------------------------------------


class ConcatTimestepEmbedderND(nn.Module):
    """sgm `ConcatTimestepEmbedderND`: (B, N) numbers -> (B, N * outdim), each number's sinusoid
    (cos first, `timestep_embedding`) in turn. Parameter-free; computed in float32."""

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(f"ConcatTimestepEmbedderND expects (B, N) numbers, got shape {tuple(x.shape)}")
        b, n = x.shape
        emb = timestep_embedding(x.reshape(b * n), self.outdim)  # (B*N, outdim)
        return emb.reshape(b, n * self.outdim)  # (B, N*outdim), number 0 first


def size_vector(
    pooled: torch.Tensor,
    size_embed_dim: int,
    original_size: tuple[int, int] = (1024, 1024),
    crop: tuple[int, int] = (0, 0),
    target: tuple[int, int] = (1024, 1024),
) -> torch.Tensor:
    """pooled (B, P) -> vector (B, P + 3 * 2 * size_embed_dim): pooled, emb(original), emb(crop),
    emb(target), in the embedders' order. Parameter-free, so engines' callers use it without the model."""
    b = pooled.shape[0]
    parts = [pooled]
    embed = ConcatTimestepEmbedderND(size_embed_dim)
    for pair in (original_size, crop, target):
        numbers = torch.tensor([list(pair)], dtype=torch.float32, device=pooled.device).expand(b, 2)  # (B, 2)
        parts.append(embed(numbers).to(pooled.dtype))  # (B, 2 * size_embed_dim)
    return torch.cat(parts, dim=-1)


class Conditioner(nn.Module):
    """sgm `GeneralConditioner` for SDXL: `embedders` 0-4 as in the checkpoint.

    `forward(prompts)` returns {"crossattn": (B, 77, clip_l.width + bigg.width),
    "vector": (B, bigg.projection_dim + 3 * 2 * size_embed_dim)} with SUPIR's fixed size
    conditioning (1024, 1024) / (0, 0) / (1024, 1024). Outputs have the module's dtype.
    """

    def __init__(self, cfg: ConditionerConfig) -> None:
        super().__init__()
        if cfg.bigg.projection_dim is None:
            raise ValueError("ConditionerConfig.bigg.projection_dim must be set (pooled width)")
        for name, c in (("clip_l", cfg.clip_l), ("bigg", cfg.bigg)):
            if c.vocab_size != VOCAB_SIZE:
                raise ValueError(f"{name}.vocab_size={c.vocab_size}: the CLIP tokenizer has {VOCAB_SIZE} tokens")
        self.cfg = cfg
        self.embedders = nn.ModuleList(
            [
                FrozenCLIPEmbedder(cfg.clip_l, cfg.clip_l_layer_idx),
                FrozenOpenCLIPEmbedder2(cfg.bigg),
                ConcatTimestepEmbedderND(cfg.size_embed_dim),  # original_size_as_tuple
                ConcatTimestepEmbedderND(cfg.size_embed_dim),  # crop_coords_top_left
                ConcatTimestepEmbedderND(cfg.size_embed_dim),  # target_size_as_tuple
            ]
        )

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.embedders[1].model.positional_embedding
        return w.device, w.dtype

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (CLIP-L ids, bigG ids), each LongTensor (B, 77) on the module's device;
        CLIP-L padded with `clip_l_pad_token` (49407), bigG with `bigg_pad_token` (0)."""
        tok = load_tokenizer()
        device, _ = self._device_dtype()
        ids_l = tok(prompts, pad_token=self.cfg.clip_l_pad_token, context_length=self.cfg.clip_l.context_length)
        ids_g = tok(prompts, pad_token=self.cfg.bigg_pad_token, context_length=self.cfg.bigg.context_length)
        return ids_l.to(device), ids_g.to(device)

    def encode_tokens(self, clip_l_ids: torch.Tensor, bigg_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 77) ids twice -> crossattn (B, 77, C_l + C_g) (CLIP-L first), pooled (B, P)."""
        if clip_l_ids.shape != bigg_ids.shape or clip_l_ids.ndim != 2:
            raise ValueError(
                f"token ids must both be (B, T) and equal in shape, got {tuple(clip_l_ids.shape)} "
                f"and {tuple(bigg_ids.shape)}"
            )
        h_l = self.embedders[0](clip_l_ids)  # (B, T, C_l)
        h_g, pooled = self.embedders[1](bigg_ids)  # (B, T, C_g), (B, P)
        return torch.cat([h_l, h_g], dim=-1), pooled  # (B, T, C_l + C_g), (B, P)

    def size_vector(
        self,
        pooled: torch.Tensor,
        original_size: tuple[int, int] = (1024, 1024),
        crop: tuple[int, int] = (0, 0),
        target: tuple[int, int] = (1024, 1024),
    ) -> torch.Tensor:
        """pooled (B, P) -> vector (B, P + 3 * 2 * size_embed_dim): pooled, emb(original), emb(crop),
        emb(target), in that order (the embedders' order)."""
        return size_vector(pooled, self.cfg.size_embed_dim, original_size, crop, target)

    def forward(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompts -> {"crossattn": (B, 77, context_dim), "vector": (B, vector_dim)}."""
        if isinstance(prompts, str):
            raise TypeError("Conditioner expects a list of prompts, got a single str")
        crossattn, pooled = self.encode_tokens(*self.tokenize(prompts))
        return {"crossattn": crossattn, "vector": self.size_vector(pooled)}


__all__ = [
    "Conditioner", "ConcatTimestepEmbedderND", "size_vector", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2",
    "OpenCLIPTextModel", "CLIPTextTransformer", "quick_gelu", "causal_attention_fn",
]
