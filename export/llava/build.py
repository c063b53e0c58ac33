"""Export LLaVA-1.5 to the supir-rt ONNX Runtime model folder (see ``supir_rt/caption/layout.py``).

Parts: ``vision.onnx`` (CLIP tower + projector, fp32), ``embed_tokens.npy``, and one
``decoder_<precision>.onnx`` per requested precision, built layer by layer from the checkpoint shards
(``compose.py``) so that a 13B model converts within ~5 GB of RAM.

Why plain ``torch.onnx.export`` + ORT's ``MatMulNBits`` quantizer rather than onnxruntime-genai's
builder (``exclude_embeds=true``): measured on this kind of 2-core CPU,
the builder's decoder decodes ~10 % faster and prefills the same, but it loads
the whole model at ~7 bytes per parameter (~92 GB for 13B) and its runtime cannot feed
``inputs_embeds``, so the loop must be ours anyway; the streamed plain export fits a 24 GB machine and
reproduces transformers' greedy ids exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from export.llava.checkpoint import LlavaCheckpoint
from export.llava.compose import OPSET, Composer, fill, quantize, trace_template
from export.llava.graphs import LAYER_WEIGHTS, AttentionIn, AttentionOut, Head, VisionEncoder, rope_cache
from supir_rt.caption import layout

log = logging.getLogger(__name__)

BITS = {"int4": 4, "int8": 8, "fp16": None, "fp32": None}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How int4/int8 decoders are quantized (symmetric, block-wise along K, ORT MatMulNBits)."""

    block_size: int = 32
    # MatMulNBits accuracy_level (4 = int8 activations). None = automatic: unset for 4-bit weights
    # (fp32 compute is the fast int4 path here) and 4 for 8-bit weights: on this AVX2 CPU with ORT 1.32
    # the 8-bit kernel without it was measured 30-150x slower (0.8-5 s for a 4096x32064 lm_head at M=1,
    # vs ~30 ms with level 4; benchmarks/RESULTS.md).
    accuracy_level: int | None = None
    lm_head_bits: int = 8  # the output projection is quantized to 8 bits even for int4 decoders

    def level(self, bits: int) -> int | None:
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if bits == 8 else None


def _versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    import supir_rt

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "supir_rt": supir_rt.__version__,
    }


def _current_manifest(out: Path) -> dict[str, Any]:
    """The folder's manifest when it is of the current format (its parts can be kept), else {}."""
    try:
        return layout.read_manifest(out) if (out / layout.MANIFEST).is_file() else {}
    except layout.ModelDirError:
        return {}  # an older format: everything is exported again


def export_vision(ckpt: LlavaCheckpoint, out_dir: Path) -> dict[str, Any]:
    spec = ckpt.spec
    t0 = time.perf_counter()
    encoder = VisionEncoder(spec.vision_config, spec.text["hidden_size"], spec.feature_layer).eval()
    tower = dict(ckpt.prefixed("vision_tower.vision_model."))
    projector = dict(ckpt.prefixed("multi_modal_projector."))
    encoder.load_checkpoint_tensors(tower, projector)
    del tower, projector
    encoder.float()
    cfg = encoder.tower.config
    size = cfg.image_size
    example = torch.zeros(2, 3, size, size)  # batch 2 so no axis is specialised to 1
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_path = Path(tmp) / layout.VISION
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder,
                (example,),
                str(tmp_path),
                dynamo=False,
                input_names=["pixel_values"],
                output_names=["image_features"],
                dynamic_axes={"pixel_values": {0: "batch"}, "image_features": {0: "batch"}},
                opset_version=OPSET,
            )
        model = onnx.load(str(tmp_path))
    for stale in (out_dir / layout.VISION, out_dir / (layout.VISION + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model, str(out_dir / layout.VISION), save_as_external_data=True, all_tensors_to_one_file=True,
        location=layout.VISION + ".data", size_threshold=1024,
    )
    log.info("vision.onnx written in %.1f s", time.perf_counter() - t0)
    return {
        "image_size": size,
        "patch_size": cfg.patch_size,
        "num_features": (size // cfg.patch_size) ** 2,
        "feature_layer": spec.feature_layer,
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
    }


def export_embeddings(ckpt: LlavaCheckpoint, out_dir: Path) -> tuple[int, str]:
    table = ckpt.get("language_model.model.embed_tokens.weight")
    dtype = np.float16 if table.dtype == torch.float16 else np.float32
    array = table.to(torch.float16 if dtype == np.float16 else torch.float32).numpy()
    np.save(out_dir / layout.EMBED, array)
    return int(array.shape[0]), np.dtype(dtype).name


def _value(name: str, elem: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _layer_weights(ckpt: LlavaCheckpoint, i: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    weights = {}
    for ours, (src, transpose) in LAYER_WEIGHTS.items():
        t = ckpt.get(f"language_model.model.layers.{i}.{src}").to(torch.float32)
        if transpose:
            t = t.t().contiguous()
        weights[ours] = t.numpy().astype(dtype, copy=False)
    return weights


def attention_node(text: dict[str, Any], elem: int) -> onnx.ModelProto:
    """One ``GroupQueryAttention`` (ORT contrib op) as a model for the composer: RoPE on q and k
    (``rotate_half`` style, rows of the shared cos/sin caches at positions from ``seqlens_k``), causal
    attention with fp32 softmax, and the new keys/values written into the cache buffer in place when
    ``past_key`` and ``present_key`` are bound to the same buffer (``past_present_share_buffer``)."""
    heads, n_kv, head_dim = text["num_heads"], text["num_kv_heads"], text["head_dim"]
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
        ["attn", "present_key", "present_value"],
        domain="com.microsoft", num_heads=heads, kv_num_heads=n_kv, do_rotary=1, rotary_interleaved=0,
        scale=float(head_dim**-0.5),
    )
    cache = ["batch", n_kv, "capacity", head_dim]
    graph = helper.make_graph(
        [node], "attention",
        [_value("q", elem, ["batch", "seq", heads * head_dim]), _value("k", elem, ["batch", "seq", n_kv * head_dim]),
         _value("v", elem, ["batch", "seq", n_kv * head_dim]), _value("past_key", elem, cache),
         _value("past_value", elem, cache), _value("seqlens_k", TensorProto.INT32, ["batch"]),
         _value("total_sequence_length", TensorProto.INT32, []),
         _value("cos_cache", elem, ["positions", head_dim // 2]), _value("sin_cache", elem, ["positions", head_dim // 2])],
        [_value("attn", elem, ["batch", "seq", heads * head_dim]), _value("present_key", elem, cache),
         _value("present_value", elem, cache)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def export_decoder(
    ckpt: LlavaCheckpoint,
    text: dict[str, Any],
    out_dir: Path,
    precision: str,
    quant: QuantConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``decoder_<precision>.onnx`` + ``.data`` one layer at a time.

    Inputs: ``inputs_embeds [B, S, H]``, per layer ``past_key_values.{i}.{key,value} [B, kv heads,
    capacity, head_dim]`` (a preallocated cache buffer), ``seqlens_k [B]`` (int32: tokens in the cache
    after this run, minus 1) and ``total_sequence_length`` (int32 scalar: the same plus 1). Outputs:
    ``logits [B, vocab]`` (last position) and ``present.{i}.{key,value}``, the same buffers: bind each
    present to its past's OrtValue and the cache is appended in place (``llava.LlavaOnnx``).
    """
    bits = BITS[precision]
    torch_dtype = torch.float16 if precision == "fp16" else torch.float32
    np_dtype = np.dtype(np.float16 if precision == "fp16" else np.float32)
    elem = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    hidden, n_kv, head_dim, n_layers = text["hidden_size"], text["num_kv_heads"], text["head_dim"], text["num_layers"]
    heads, vocab = text["num_heads"], text["vocab_size"]

    emb = torch.zeros(2, 3, hidden, dtype=torch_dtype)
    seq_axes = {0: "batch", 1: "seq"}
    in_t = trace_template(AttentionIn(text, torch_dtype), (emb,), ["hidden"], ["q", "k", "v"], {"hidden": seq_axes})
    out_t = trace_template(
        AttentionOut(text, torch_dtype), (emb, torch.zeros(2, 3, heads * head_dim, dtype=torch_dtype)),
        ["hidden", "attn"], ["hidden_out"], {"hidden": seq_axes, "attn": seq_axes},
    )
    attention = attention_node(text, elem)
    head_t = trace_template(Head(text, torch_dtype), (emb,), ["hidden"], ["logits"], {"hidden": seq_axes})

    path = out_dir / layout.decoder_file(precision)
    composer = Composer(path)
    cos, sin = rope_cache(head_dim, text["rope_theta"], text["max_position_embeddings"])
    composer.add_initializer("rope.cos_cache", cos.to(torch_dtype).numpy())
    composer.add_initializer("rope.sin_cache", sin.to(torch_dtype).numpy())
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_layers + 1, desc=f"decoder {precision}", unit="layer")
    for i in range(n_layers):
        weights = _layer_weights(ckpt, i, np_dtype)
        hidden_in = "inputs_embeds" if i == 0 else f"hidden.{i}"
        for part, template in (("in", in_t), ("out", out_t)):
            names = {value.name for value in template.graph.input}
            model = fill(template, {k: v for k, v in weights.items() if k in names})
            if bits:
                model = quantize(model, bits, quant.block_size, quant.level(bits))
            wiring = ({"hidden": hidden_in, "q": f"layers.{i}.q", "k": f"layers.{i}.k", "v": f"layers.{i}.v"}
                      if part == "in" else {"hidden": hidden_in, "attn": f"layers.{i}.attn", "hidden_out": f"hidden.{i + 1}"})
            composer.add(model, f"layers.{i}/{part}/", wiring)
            if part == "in":
                composer.add(attention, f"layers.{i}/attention/", {
                    "q": f"layers.{i}.q", "k": f"layers.{i}.k", "v": f"layers.{i}.v",
                    "past_key": f"past_key_values.{i}.key", "past_value": f"past_key_values.{i}.value",
                    "seqlens_k": "seqlens_k", "total_sequence_length": "total_sequence_length",
                    "cos_cache": "rope.cos_cache", "sin_cache": "rope.sin_cache", "attn": f"layers.{i}.attn",
                    "present_key": f"present.{i}.key", "present_value": f"present.{i}.value",
                })
            del model
        del weights
        if bar is not None:
            bar.update(1)
        log.debug("layer %d/%d done (%.1f s)", i + 1, n_layers, time.perf_counter() - t0)
    lm = ckpt.get("language_model.lm_head.weight").to(torch.float32).t().contiguous().numpy()
    norm = ckpt.get("language_model.model.norm.weight").to(torch.float32).numpy()
    if lm.shape != (hidden, vocab):
        raise ValueError(f"lm_head has shape {lm.shape[::-1]}, expected ({vocab}, {hidden})")
    model = fill(head_t, {"norm": norm.astype(np_dtype), "lm_head": lm.astype(np_dtype)})
    del lm
    head_bits = min(quant.lm_head_bits, 8) if bits else None
    if bits and head_bits:
        model = quantize(model, max(bits, head_bits), quant.block_size, quant.level(max(bits, head_bits)))
    composer.add(model, "head/", {"hidden": f"hidden.{n_layers}", "logits": "logits"})
    if bar is not None:
        bar.update(1)
        bar.close()
    inputs = [_value("inputs_embeds", elem, ["batch", "seq", hidden]),
              _value("seqlens_k", TensorProto.INT32, ["batch"]), _value("total_sequence_length", TensorProto.INT32, [])]
    outputs = [_value("logits", TensorProto.FLOAT, ["batch", vocab])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(_value(f"past_key_values.{i}.{kind}", elem, ["batch", n_kv, "capacity", head_dim]))
            outputs.append(_value(f"present.{i}.{kind}", elem, ["batch", n_kv, "capacity", head_dim]))
    composer.finish(inputs, outputs)
    log.info("%s written in %.1f s", path.name, time.perf_counter() - t0)
    return {
        "file": path.name,
        "bits": bits,
        "lm_head_bits": (max(bits, head_bits) if bits and head_bits else None),
        "block_size": quant.block_size if bits else None,
        "accuracy_level": quant.level(bits) if bits else None,
        "lm_head_accuracy_level": quant.level(max(bits, head_bits)) if bits and head_bits else None,
        "io_dtype": np_dtype.name,
        "kv_cache": "in-place",
    }


def export_llava(
    source: str | Path,
    out_dir: str | Path,
    precisions: Sequence[str] = ("int4",),
    *,
    clip_dir: str | Path | None = None,
    quant: QuantConfig = QuantConfig(),
    skip_vision: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a LLaVA-1.5 folder (llava-hf or original layout) to an exported model folder."""
    for p in precisions:
        layout.decoder_file(p)  # validates
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = LlavaCheckpoint(source, clip_dir)
    tokenizer = ckpt.tokenizer_file()
    spec = ckpt.spec
    log.info("source %s: layout %s, %d layers, hidden %d", ckpt.folder, spec.layout, spec.text["num_layers"], spec.text["hidden_size"])
    old = _current_manifest(out)

    text = dict(spec.text)
    vocab, embed_dtype = export_embeddings(ckpt, out)
    text["vocab_size"] = vocab
    shutil.copyfile(tokenizer, out / layout.TOKENIZER)
    if skip_vision:
        if "vision" not in old:
            raise ValueError(f"--skip-vision needs an existing export in {out} (no vision entry in its manifest)")
        vision = old["vision"]
    else:
        vision = export_vision(ckpt, out)
    decoders = dict(old.get("decoders", {})) if old.get("text") == text else {}
    for precision in precisions:
        decoders[precision] = export_decoder(ckpt, text, out, precision, quant, progress)
    unused = [n for n in ckpt.unused() if not (skip_vision and n.startswith(("vision_tower.", "multi_modal_projector.")))]
    if unused:
        raise ValueError(f"{ckpt.folder}: {len(unused)} checkpoint tensors were not used by the export: {unused[:8]}")
    layout.write_manifest(out, {
        "source": {"layout": spec.layout, "path": str(ckpt.folder)},
        "text": text,
        "vision": vision,
        "embed": {"file": layout.EMBED, "dtype": embed_dtype},
        "image_token_id": spec.image_token_id,
        "decoders": decoders,
        "versions": _versions(),
    })
    log.info("exported %s to %s", ", ".join(precisions), out)
    return out
