"""supir_rt.model.text against transformers' CLIP text models on tiny random weights.

CLIP-L (HF layout) is loaded into `transformers.CLIPTextModel` with the same state dict; the bigG
tower (open_clip layout) is converted key by key to `transformers.CLIPTextModelWithProjection`
(the mapping diffusers uses for open_clip checkpoints, rewritten here). The size embedders are
checked against the sinusoid formula; the official-size conditioner is built on the meta device and
its key names and parameter counts are checked against the published architectures.
"""

from __future__ import annotations

import math

import pytest
import torch

from supir_rt.config import CLIPTextConfig, ConditionerConfig, ModelConfig
from supir_rt.model.text import (
    ConcatTimestepEmbedderND,
    Conditioner,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder2,
)
from supir_rt.tokenizer import EOT_ID, SOT_ID, load_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat",
    "Cinematic, High Contrast, highly detailed photo of an old harbour at dusk, 32k, ultra HD",
    "",
]


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (LayerNorm weights around 1) so that any mis-wiring shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = any(s in name for s in ("layer_norm", "ln_", "final_layer_norm"))
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("embedding.weight") or name.endswith("positional_embedding"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1 * noise)


def _ids(pad_token: int, extra_random: int = 2, seed: int = 0) -> torch.Tensor:
    """Tokenised prompts plus random-text rows that end in EOT and are padded; (B, 77)."""
    ids = load_tokenizer()(PROMPTS, pad_token=pad_token)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (20, 75)[:extra_random]:
        row = torch.full((77,), pad_token, dtype=torch.long)
        row[0] = SOT_ID
        row[1 : n + 1] = torch.randint(0, 49406, (n,), generator=g)
        row[n + 1] = EOT_ID
        rows.append(row)
    return torch.cat([ids, torch.stack(rows)])


def _hf_config(cfg: CLIPTextConfig) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.width * cfg.mlp_ratio,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length, hidden_act=cfg.activation, layer_norm_eps=1e-5,
        projection_dim=cfg.projection_dim or cfg.width, bos_token_id=SOT_ID, eos_token_id=EOT_ID,
        pad_token_id=1, attention_dropout=0.0,
    )


def _load_hf(hf: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load checkpoint-layout keys (`text_model.*`) into an HF model. transformers 5's
    CLIPTextModel holds the text transformer's parts directly (its loader strips `text_model.`),
    so the prefix is dropped where the module tree lacks it."""
    if not any(k.startswith("text_model.") for k in hf.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("embeddings.position_ids") for k in missing), missing  # a buffer, not a weight


# ---- CLIP-L ---------------------------------------------------------------------------------------

CLIP_L_CASES = [
    (ModelConfig.tiny().conditioner_config.clip_l, ModelConfig.tiny().conditioner_config.clip_l_layer_idx),
    *[(CLIPTextConfig(width=48, layers=3, heads=4), idx) for idx in (0, 1, 2, 3)],
]


@pytest.mark.parametrize(("cfg", "layer_idx"), CLIP_L_CASES)
def test_clip_l_equals_transformers_hidden_state(cfg: CLIPTextConfig, layer_idx: int):
    ours = FrozenCLIPEmbedder(cfg, layer_idx).eval()
    _randomise(ours)
    hf = transformers.CLIPTextModel(_hf_config(cfg)).eval()
    _load_hf(hf, {k.removeprefix("transformer."): v for k, v in ours.state_dict().items()})
    ids = _ids(pad_token=EOT_ID)
    with torch.no_grad():
        expected = hf(input_ids=ids, output_hidden_states=True).hidden_states[layer_idx]
        got = ours(ids)
    assert got.shape == (ids.shape[0], 77, cfg.width)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_clip_l_rejects_bad_layer_idx():
    with pytest.raises(ValueError, match="clip_l_layer_idx=3"):
        FrozenCLIPEmbedder(CLIPTextConfig(width=32, layers=2, heads=2), 3)


# ---- OpenCLIP bigG ----------------------------------------------------------------------------------


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `model.*` open_clip keys -> transformers CLIPTextModelWithProjection keys."""
    renames = {
        "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        if key == "logit_scale":
            continue
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t()  # ours: x @ P; HF: Linear(x) = x @ W.T
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".")[-1]] = value
        else:
            assert key.startswith("transformer.resblocks."), key
            rest = key.removeprefix("transformer.resblocks.")
            n, sub = rest.split(".", 1)
            prefix = f"text_model.encoder.layers.{n}."
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if sub.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
                continue
            for a, b in renames.items():
                if sub.startswith(a + "."):
                    sub = b + sub[len(a):]
                    break
            out[prefix + sub] = value
    return out


BIGG_CASES = [
    ModelConfig.tiny().conditioner_config.bigg,
    CLIPTextConfig(width=64, layers=3, heads=4, activation="gelu", projection_dim=40),
    CLIPTextConfig(width=32, layers=1, heads=2, activation="gelu", projection_dim=16),
]


@pytest.mark.parametrize("cfg", BIGG_CASES)
def test_bigg_equals_transformers_with_projection(cfg: CLIPTextConfig):
    ours = FrozenOpenCLIPEmbedder2(cfg).eval()
    _randomise(ours, seed=1)
    hf = transformers.CLIPTextModelWithProjection(_hf_config(cfg)).eval()
    _load_hf(hf, open_clip_to_hf(ours.state_dict()))
    ids = _ids(pad_token=0)
    # HF pools at the first EOT; ours at argmax(ids): the same position for these ids
    assert torch.equal(ids.argmax(-1), (ids == EOT_ID).int().argmax(-1))
    with torch.no_grad():
        expected = hf(input_ids=ids, output_hidden_states=True)
        penultimate, pooled = ours(ids)
    assert penultimate.shape == (ids.shape[0], 77, cfg.width) and pooled.shape == (ids.shape[0], cfg.projection_dim)
    torch.testing.assert_close(penultimate, expected.hidden_states[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected.text_embeds, atol=1e-5, rtol=1e-5)


# ---- size embedders ---------------------------------------------------------------------------------


def _sinusoid(value: float, dim: int) -> list[float]:
    """cos(v * f_k) for k < dim/2, then sin(v * f_k), f_k = 10000^(-k / (dim/2))."""
    half = dim // 2
    freqs = [math.exp(-math.log(10000.0) * k / half) for k in range(half)]
    return [math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs]


def test_size_embedder_formula():
    emb = ConcatTimestepEmbedderND(8)(torch.tensor([[1024.0, 0.0], [3.0, 768.0]]))  # (2, 16)
    expected = torch.tensor(
        [_sinusoid(1024, 8) + _sinusoid(0, 8), _sinusoid(3, 8) + _sinusoid(768, 8)], dtype=torch.float32
    )
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, expected, atol=1e-4, rtol=0)  # fp32 phase of 1024 * f_0
    assert emb[0, 8:].tolist() == [1.0] * 4 + [0.0] * 4  # zero: cos 1, sin 0
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        ConcatTimestepEmbedderND(8)(torch.zeros(3))


def test_size_vector_layout():
    cond = Conditioner(ModelConfig.tiny().conditioner_config)
    d = cond.cfg.size_embed_dim
    pooled = torch.randn(2, cond.cfg.bigg.projection_dim)
    vec = cond.size_vector(pooled, original_size=(512, 768), crop=(0, 16), target=(1024, 1024))
    assert vec.shape == (2, cond.cfg.vector_dim)
    parts = [_sinusoid(v, d) for v in (512, 768, 0, 16, 1024, 1024)]
    expected = torch.tensor(sum(parts, []), dtype=torch.float32).expand(2, -1)
    assert torch.equal(vec[:, : pooled.shape[1]], pooled)
    torch.testing.assert_close(vec[:, pooled.shape[1] :], expected, atol=1e-4, rtol=0)


# ---- the conditioner ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Conditioner:
    torch.manual_seed(0)
    cond = Conditioner(ModelConfig.tiny().conditioner_config).eval()
    _randomise(cond, seed=2)
    return cond


def test_tokenize_pads_as_sdxl(tiny):
    ids_l, ids_g = tiny.tokenize(["a photo of a cat"])
    assert ids_l.shape == ids_g.shape == (1, 77) and ids_l.dtype == torch.long
    head = [SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID]
    assert ids_l[0, :7].tolist() == head and (ids_l[0, 7:] == 49407).all()
    assert ids_g[0, :7].tolist() == head and (ids_g[0, 7:] == 0).all()


def test_forward_shapes_and_composition(tiny):
    cfg = tiny.cfg
    with torch.no_grad():
        out = tiny(PROMPTS)
        ids_l, ids_g = tiny.tokenize(PROMPTS)
        crossattn, pooled = tiny.encode_tokens(ids_l, ids_g)
        h_l = tiny.embedders[0](ids_l)
        h_g, _ = tiny.embedders[1](ids_g)
    assert out["crossattn"].shape == (3, 77, 64) == (3, 77, cfg.context_dim)
    assert out["vector"].shape == (3, 1600) == (3, cfg.vector_dim)
    assert torch.equal(out["crossattn"], crossattn)
    assert torch.equal(crossattn[..., : cfg.clip_l.width], h_l)  # CLIP-L first
    assert torch.equal(crossattn[..., cfg.clip_l.width :], h_g)
    assert torch.equal(out["vector"], tiny.size_vector(pooled, (1024, 1024), (0, 0), (1024, 1024)))
    with pytest.raises(TypeError, match="list of prompts"):
        tiny("a photo")
    with pytest.raises(ValueError, match="equal in shape"):
        tiny.encode_tokens(ids_l, ids_g[:, :10])


def test_dtype_follows_module():
    cond = Conditioner(ModelConfig.tiny().conditioner_config).to(torch.bfloat16)
    with torch.no_grad():
        out = cond(["a photo of a cat"])
    assert out["crossattn"].dtype == out["vector"].dtype == torch.bfloat16


# ---- official sizes on the meta device -------------------------------------------------------------


def _clip_l_keys(layers: int) -> list[str]:
    p = "embedders.0.transformer.text_model."
    keys = [p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight"]
    for i in range(layers):
        lp = f"{p}encoder.layers.{i}."
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
            keys += [lp + sub + ".weight", lp + sub + ".bias"]
    return keys + [p + "final_layer_norm.weight", p + "final_layer_norm.bias"]


def _bigg_keys(layers: int) -> list[str]:
    p = "embedders.1.model."
    keys = [p + "token_embedding.weight", p + "positional_embedding", p + "text_projection", p + "logit_scale",
            p + "ln_final.weight", p + "ln_final.bias"]
    for i in range(layers):
        lp = f"{p}transformer.resblocks.{i}."
        keys += [lp + "attn.in_proj_weight", lp + "attn.in_proj_bias"]
        for sub in ("ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys += [lp + sub + ".weight", lp + sub + ".bias"]
    return keys


def _text_params(cfg: CLIPTextConfig) -> int:
    """Parameter count of a CLIP text transformer from its architecture: embeddings, per layer
    (two LayerNorms, q/k/v/out projections with bias, MLP with bias), final LayerNorm, and for the
    OpenCLIP tower the bias-free text projection plus the scalar logit_scale."""
    w, h = cfg.width, cfg.width * cfg.mlp_ratio
    embeddings = cfg.vocab_size * w + cfg.context_length * w
    layer = 2 * (2 * w) + 4 * (w * w + w) + (w * h + h) + (h * w + w)
    total = embeddings + cfg.layers * layer + 2 * w
    if cfg.projection_dim is not None:
        total += w * cfg.projection_dim + 1
    return total


def test_official_on_meta_keys_and_parameter_counts():
    cfg = ConditionerConfig()
    with torch.device("meta"):
        cond = Conditioner(cfg)
    state = cond.state_dict()
    assert all(t.is_meta for t in state.values())
    assert sorted(state) == sorted(_clip_l_keys(12) + _bigg_keys(32))
    assert not list(cond.buffers())  # no position_ids / attn_mask buffers
    n_l = sum(p.numel() for p in cond.embedders[0].parameters())
    n_g = sum(p.numel() for p in cond.embedders[1].parameters())
    assert n_l == _text_params(cfg.clip_l) == 123_060_480  # CLIP ViT-L/14 text, incl. final LN
    assert n_g == _text_params(cfg.bigg) == 694_659_841  # OpenCLIP bigG text, incl. logit_scale
    assert sum(p.numel() for p in cond.embedders[2:].parameters()) == 0
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["embedders.1.model.logit_scale"] == ()
    assert shapes["embedders.0.transformer.text_model.embeddings.position_embedding.weight"] == (77, 768)
    out = cond(["a photo of a cat", "x"])
    assert out["crossattn"].shape == (2, 77, 2048) and out["vector"].shape == (2, 2816)
    assert out["crossattn"].is_meta and out["vector"].is_meta
