"""Key mapping of the original (liuhaotian) LLaVA layout to llava-hf names, and source-folder errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from export.llava.checkpoint import HF_TO_HF, CheckpointError, LlavaCheckpoint, rename  # noqa: E402


def canonical_state(model) -> dict[str, "torch.Tensor"]:
    """The tiny HF model's tensors under canonical llava-hf names."""
    out = {}
    for key, value in model.state_dict().items():
        name = rename(key, HF_TO_HF)
        if name is not None:
            out[name] = value
    return out


def write_original_layout(model, folder: Path, tokenizer_bytes: bytes) -> tuple[Path, Path]:
    """The tiny model written as liuhaotian/llava-v1.5 (2 .bin shards + index) + an openai CLIP folder."""
    state = canonical_state(model)
    text_cfg = model.config.text_config.to_dict()
    lm, vision = {}, {}
    for name, value in state.items():
        if name.startswith("language_model.model."):
            lm["model." + name[len("language_model.model."):]] = value.clone()
        elif name == "language_model.lm_head.weight":
            lm["lm_head.weight"] = value.clone()
        elif name.startswith("multi_modal_projector.linear_1."):
            lm["model.mm_projector.0." + name.rsplit(".", 1)[1]] = value.clone()
        elif name.startswith("multi_modal_projector.linear_2."):
            lm["model.mm_projector.2." + name.rsplit(".", 1)[1]] = value.clone()
        elif name.startswith("vision_tower.vision_model."):
            vision["vision_model." + name[len("vision_tower.vision_model."):]] = value.clone()
        else:
            raise AssertionError(name)
    lm["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry this buffer
    src = folder / "llava-v1.5-tiny"
    src.mkdir()
    keys = sorted(lm)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, names in shards.items():
        torch.save({k: lm[k] for k in names}, src / fname)
        weight_map.update({k: fname for k in names})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        **{k: text_cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                    "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                                    "bos_token_id", "eos_token_id")},
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_hidden_size": model.config.vision_config.hidden_size, "image_aspect_ratio": "pad", "rope_theta": 10000.0,
    }
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.model").write_bytes(tokenizer_bytes)

    clip = folder / "clip-vit-large-patch14-336"
    clip.mkdir()
    vision["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    vision["visual_projection.weight"] = torch.zeros(8, 32)
    vision["text_projection.weight"] = torch.zeros(8, 8)
    vision["logit_scale"] = torch.tensor(1.0)
    from safetensors.torch import save_file

    save_file(vision, str(clip / "model.safetensors"))
    vcfg = {k: v for k, v in model.config.vision_config.to_dict().items() if not k.startswith("_")}
    (clip / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "vision_config": vcfg}))
    return src, clip


@pytest.fixture(scope="module")
def original(tmp_path_factory, tiny_llava, tokenizer_bytes) -> tuple[Path, Path]:
    return write_original_layout(tiny_llava, tmp_path_factory.mktemp("orig"), tokenizer_bytes)


def test_original_layout_maps_to_hf_names(tiny_llava, original) -> None:
    src, clip = original
    ckpt = LlavaCheckpoint(src, clip)
    expected = canonical_state(tiny_llava)
    assert ckpt.layout == "original"
    assert sorted(ckpt.names()) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ckpt.get(name), value, rtol=0, atol=0, msg=name)
    assert ckpt.unused() == []
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in ckpt.dropped
    assert "logit_scale" in ckpt.dropped and "text_projection.weight" in ckpt.dropped
    assert ckpt.spec.text["num_kv_heads"] == 2 and ckpt.spec.feature_layer == -2


def test_hf_layout_as_saved_and_in_memory(tiny_llava, hf_folder) -> None:
    ckpt = LlavaCheckpoint(hf_folder)
    expected = canonical_state(tiny_llava)
    assert ckpt.layout == "hf"
    assert sorted(ckpt.names()) == sorted(expected)
    assert ckpt.spec.image_token_id == tiny_llava.config.image_token_index


def test_original_export_matches_hf_export(original, exported, tmp_path, image) -> None:
    from export.llava.build import export_llava
    from supir_rt.caption.llava import LlavaOnnx, SamplingConfig

    src, clip = original
    out = export_llava(src, tmp_path / "from-original", ["fp32"], clip_dir=clip, progress=False)
    a, b = LlavaOnnx(out, "fp32"), LlavaOnnx(exported, "fp32")
    np.testing.assert_array_equal(a.image_features(image), b.image_features(image))
    cfg = SamplingConfig(sample=False, max_new_tokens=12)
    ea = a.prompt_embeddings(a.prompt_chunks(), a.image_features(image))
    eb = b.prompt_embeddings(b.prompt_chunks(), b.image_features(image))
    assert a.generate_from_embeddings(ea, cfg) == b.generate_from_embeddings(eb, cfg)


def test_source_errors(original, hf_folder, tmp_path) -> None:
    src, _ = original
    with pytest.raises(CheckpointError, match="does not exist"):
        LlavaCheckpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        LlavaCheckpoint(tmp_path)
    with pytest.raises(CheckpointError, match="--clip-dir"):
        LlavaCheckpoint(src)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a LLaVA-1.5 config"):
        LlavaCheckpoint(wrong)
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in hf_folder.iterdir():
        if f.name != "tokenizer.model":
            (notok / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match="tokenizer.model is missing"):
        LlavaCheckpoint(notok).tokenizer_file()
