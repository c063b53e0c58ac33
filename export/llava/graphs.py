"""Export-friendly torch modules for the three LLaVA-1.5 parts.

* ``VisionEncoder``: CLIP ViT-L/14-336 (transformers ``CLIPVisionModel``) up to the feature layer
  (``vision_feature_layer = -2``: the layers after it are removed, since their output is never used),
  CLS dropped, then the 2-layer GELU projector -> ``[B, 576, hidden]``.
* The Llama decoder is exported in pieces that ``compose.py`` joins into one ONNX graph, so that a 13B
  model is converted one layer at a time. Per layer: ``AttentionIn`` (RMSNorm + q/k/v projections), one
  ORT ``GroupQueryAttention`` node written by ``build.py`` (RoPE, causal attention, and the KV cache
  appended in place in a preallocated buffer), ``AttentionOut`` (o_proj + residual + MLP); weights are
  graph inputs so one traced template serves every layer. Then ``Head`` (final RMSNorm + lm_head on the
  last position only).

The decoder maths follows transformers' ``modeling_llama`` (eager attention): RMSNorm in fp32,
``rotate_half`` RoPE with cos/sin computed in fp32 (``rope_cache``), softmax in fp32 (inside the op).
Linear weights are stored pre-transposed (``[in, out]``) so every projection is a plain ``MatMul`` that
ORT's ``MatMulNBits`` quantizer can replace.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class VisionEncoder(nn.Module):
    """CLIP vision tower (hidden state ``feature_layer``, CLS dropped) + LLaVA's mlp2x_gelu projector."""

    def __init__(self, vision_config: dict[str, Any], text_hidden: int, feature_layer: int = -2) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(**vision_config)
        config._attn_implementation = "eager"
        self.tower = CLIPVisionModel(config)
        # transformers < 5 nests the modules under .vision_model; 5.x does not.
        self.inner = getattr(self.tower, "vision_model", self.tower)
        # hidden_states[k] is the output of layer k (hidden_states[0] = embeddings), so feature layer
        # -2 of L layers is the output of layer L-1: keep only the layers that feed it.
        n_layers = config.num_hidden_layers
        keep = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
        self.inner.encoder.layers = self.inner.encoder.layers[:keep]
        self.kept_layers = keep
        self.inner.post_layernorm = nn.Identity()  # only feeds the pooled output, which LLaVA ignores
        self.linear_1 = nn.Linear(config.hidden_size, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values (B, 3, 336, 336) -> hidden (B, 1 + 576, 1024): the un-normed output of the kept layers
        hidden = self.tower(pixel_values=pixel_values).last_hidden_state
        features = hidden[:, 1:]  # (B, 576, 1024): CLS dropped ("default" strategy)
        return self.linear_2(F.gelu(self.linear_1(features)))  # (B, 576, H)

    def load_checkpoint_tensors(self, tower: dict[str, torch.Tensor], projector: dict[str, torch.Tensor]) -> None:
        """Strict load. ``tower``: CLIP vision keys after ``vision_model.`` (``embeddings.*``, ``encoder.*``,
        ...); ``projector``: ``linear_{1,2}.{weight,bias}``. Weights of removed layers are dropped."""
        own = self.inner.state_dict()
        tower = {k: v for k, v in tower.items() if not _is_removed_layer(k, self.kept_layers)}
        missing = sorted(set(own) - set(tower))
        extra = sorted(set(tower) - set(own))
        if missing or extra:
            raise ValueError(f"vision tower keys do not match CLIP: missing {missing[:8]}, unexpected {extra[:8]}")
        self.inner.load_state_dict(tower, strict=True)
        own_p = {k for k in self.state_dict() if k.startswith("linear_")}
        if own_p != set(projector):
            raise ValueError(f"projector keys {sorted(projector)} != {sorted(own_p)}")
        self.load_state_dict(projector, strict=False)


def _is_removed_layer(key: str, kept: int) -> bool:
    """True for weights of encoder layers at or after ``kept`` (and the unused post_layernorm)."""
    parts = key.split(".")
    if key.startswith("post_layernorm."):
        return True
    if key.startswith("encoder.layers."):
        return int(parts[2]) >= kept
    return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Exactly transformers' default RoPE inverse frequencies (fp32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))


def rope_cache(head_dim: int, theta: float, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_positions, head_dim / 2]`` (fp32) as transformers computes them: ``pos * inv_freq``
    in fp32, then cos/sin. GroupQueryAttention reads row ``p`` for position ``p`` and applies both halves
    (``rotate_half`` style, ``rotary_interleaved=0``)."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * rope_inv_freq(head_dim, theta)
    return freqs.cos(), freqs.sin()


# Where each Llama layer's weights come from: our parameter name -> (llava-hf name under ``layers.N.``,
# transposed). Linear weights are stored ``[in, out]``.
LAYER_WEIGHTS = {
    "input_layernorm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "post_attention_layernorm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}


def _weight_shapes(text: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    q, kv = text["num_heads"] * text["head_dim"], text["num_kv_heads"] * text["head_dim"]
    return {
        "input_layernorm": (hidden,), "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (q, hidden), "post_attention_layernorm": (hidden,), "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


class _Weights(nn.Module):
    """Holds the named layer weights as placeholders with distinct values: the TorchScript exporter merges
    parameters with equal contents, which would make two weights share one graph input. Real weights
    are filled in per layer (``compose.fill``)."""

    def __init__(self, text: dict[str, Any], names: tuple[str, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = text["rms_norm_eps"]
        shapes = _weight_shapes(text)
        for name in names:
            k = list(shapes).index(name)
            self.register_parameter(name, nn.Parameter(torch.full(shapes[name], k + 1.0, dtype=dtype), requires_grad=False))


class AttentionIn(_Weights):
    """First half of a Llama layer: RMSNorm, then the q/k/v projections ``[B, S, heads * head_dim]``
    (GroupQueryAttention's layout; RoPE is applied inside that op)."""

    def __init__(self, text: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
        super().__init__(text, ("input_layernorm", "q_proj", "k_proj", "v_proj"), dtype)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = rms_norm(hidden, self.input_layernorm, self.eps)  # (B, S, H)
        return x @ self.q_proj, x @ self.k_proj, x @ self.v_proj


class AttentionOut(_Weights):
    """Second half of a Llama layer: output projection + residual, RMSNorm, SwiGLU MLP + residual."""

    def __init__(self, text: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
        super().__init__(text, ("o_proj", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj"), dtype)

    def forward(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        hidden = hidden + attn @ self.o_proj  # attn (B, S, heads * head_dim)
        x = rms_norm(hidden, self.post_attention_layernorm, self.eps)
        return hidden + (F.silu(x @ self.gate_proj) * (x @ self.up_proj)) @ self.down_proj


class Head(nn.Module):
    """Final RMSNorm and lm_head on the last position: logits ``[B, vocab]``."""

    def __init__(self, text: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = text["rms_norm_eps"]
        self.norm = nn.Parameter(torch.full((text["hidden_size"],), 1.0, dtype=dtype), requires_grad=False)
        self.lm_head = nn.Parameter(torch.full((text["hidden_size"], text["vocab_size"]), 2.0, dtype=dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        last = hidden[:, -1]  # (B, H)
        return (rms_norm(last, self.norm, self.eps) @ self.lm_head).to(torch.float32)  # (B, V)
