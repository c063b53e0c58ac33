"""Export-friendly torch modules for the three LLaVA-1.5 parts.

* ``VisionEncoder``: CLIP ViT-L/14-336 (transformers ``CLIPVisionModel``) up to the feature layer
  (``vision_feature_layer = -2``: the layers after it are removed, since their output is never used),
  CLS dropped, then the 2-layer GELU projector -> ``[B, 576, hidden]``.
* The Llama decoder is exported in pieces that ``compose.py`` joins into one ONNX graph, so that a 13B
  model is converted one layer at a time:
  ``RotaryAndMask`` (cos/sin for the new positions and the additive causal mask, from the past length),
  ``DecoderLayer`` (one Llama layer with past key/values, weights as graph inputs so one traced
  template serves every layer), and ``Head`` (final RMSNorm + lm_head on the last position only).

The decoder maths follows transformers' ``modeling_llama`` (eager attention): RMSNorm in fp32,
``rotate_half`` RoPE with cos/sin computed in fp32, softmax in fp32. Linear weights are stored
pre-transposed (``[in, out]``) so every projection is a plain ``MatMul`` that ORT's ``MatMulNBits``
quantizer can replace.
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Exactly transformers' default RoPE inverse frequencies (fp32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))


class RotaryAndMask(nn.Module):
    """cos/sin ``[S, head_dim]`` for positions P..P+S-1 and the additive causal mask ``[S, P+S]``."""

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.inv_freq = nn.Parameter(rope_inv_freq(head_dim, theta), requires_grad=False)
        self.dtype = dtype

    def forward(self, inputs_embeds: torch.Tensor, past_key: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seq = inputs_embeds.shape[1]
        past = past_key.shape[2]
        pos = torch.arange(past, past + seq, dtype=torch.float32)  # (S,)
        freqs = pos[:, None] * self.inv_freq  # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
        keys = torch.arange(0, past + seq)  # (P+S,)
        queries = torch.arange(past, past + seq)  # (S,)
        blocked = (keys[None, :] > queries[:, None]).to(torch.float32)  # (S, P+S)
        mask = blocked * torch.finfo(torch.float32).min
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype), mask


class DecoderLayer(nn.Module):
    """One Llama decoder layer with a KV cache; linear weights are ``[in, out]``."""

    WEIGHTS = {  # our parameter name -> (llava-hf name under layers.N., transpose)
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

    def __init__(self, text: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        hidden, inter = text["hidden_size"], text["intermediate_size"]
        self.n_heads, self.n_kv, self.head_dim = text["num_heads"], text["num_kv_heads"], text["head_dim"]
        self.eps = text["rms_norm_eps"]
        shapes = {
            "input_layernorm": (hidden,),
            "q_proj": (hidden, self.n_heads * self.head_dim),
            "k_proj": (hidden, self.n_kv * self.head_dim),
            "v_proj": (hidden, self.n_kv * self.head_dim),
            "o_proj": (self.n_heads * self.head_dim, hidden),
            "post_attention_layernorm": (hidden,),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        # Distinct placeholder values: the TorchScript exporter merges parameters with equal contents,
        # which would make two weights share one graph input. Real weights are filled in per layer.
        for k, (name, shape) in enumerate(shapes.items()):
            self.register_parameter(name, nn.Parameter(torch.full(shape, k + 1.0, dtype=dtype), requires_grad=False))

    def forward(
        self,
        hidden: torch.Tensor,  # (B, S, H)
        cos: torch.Tensor,  # (S, hd)
        sin: torch.Tensor,  # (S, hd)
        mask: torch.Tensor,  # (S, P+S), fp32 additive
        past_key: torch.Tensor,  # (B, n_kv, P, hd)
        past_value: torch.Tensor,  # (B, n_kv, P, hd)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq = hidden.shape[0], hidden.shape[1]
        x = rms_norm(hidden, self.input_layernorm, self.eps)
        q = (x @ self.q_proj).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        k = (x @ self.k_proj).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = (x @ self.v_proj).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = torch.cat((past_key, k), dim=2)  # (B, nkv, P+S, hd)
        v = torch.cat((past_value, v), dim=2)
        present_key, present_value = k, v
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        scores = (q @ k.transpose(2, 3)) * (self.head_dim**-0.5) + mask.to(q.dtype)  # (B, nh, S, P+S)
        probs = torch.softmax(scores.to(torch.float32), dim=-1).to(q.dtype)
        attn = (probs @ v).transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)  # (B, S, nh*hd)
        hidden = hidden + attn @ self.o_proj
        x = rms_norm(hidden, self.post_attention_layernorm, self.eps)
        hidden = hidden + (F.silu(x @ self.gate_proj) * (x @ self.up_proj)) @ self.down_proj
        return hidden, present_key, present_value


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
