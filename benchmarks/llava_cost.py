"""What LLaVA-1.5-7B/13B captioning costs on this CPU through supir-rt's ONNX Runtime path.

A measurement, not a test. Whole 7B/13B models are not downloaded: a checkpoint with the real
dimensions (vocab 32064, hidden 4096/5120, MLP 11008/13824, 32/40 heads) but only a few decoder layers
of random fp16 weights is written in the llava-hf layout, converted by the real exporter
(export/export_llava.py), and run by the real runtime (supir_rt.caption.llava). Costs are measured
with a few layers and extrapolated to the full depth (32 or 40 layers): ORT's node profile splits
each decoder run into per-layer time and fixed time (RoPE/mask + final norm + lm_head), so
full = fixed + L_full * per-layer; weights and RAM add (L_full - L) times one layer's bytes.
The CLIP ViT-L/14-336 tower + projector is measured at full size once (--vision).

    python benchmarks/llava_cost.py --model 13b --precision int4 --vision

``--ab BEFORE AFTER`` compares the decode step of two exported folders (the Concat decoder made before
the in-place KV cache, and the current one), stepping them in alternation in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("llava_cost")

DIMS = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40},
}
VISION_REAL = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
               "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
VISION_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
               "image_size": 336, "patch_size": 14, "projection_dim": 64, "hidden_act": "quick_gelu"}
VOCAB = 32064


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def synthesize(folder: Path, model: str, layers: int, vision: dict) -> None:
    """A llava-hf folder with real dimensions, ``layers`` decoder layers and random fp16 weights."""
    import torch
    from safetensors.torch import save_file

    from tests.caption.conftest import CORPUS  # reuse the offline tokenizer corpus
    import io

    import sentencepiece as spm

    d = DIMS[model]
    h, inter = d["hidden_size"], d["intermediate_size"]
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {}
    # one shard per layer, like the published multi-shard checkpoints
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = rnd(h, h)
        t[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        t[p + "mlp.up_proj.weight"] = rnd(inter, h)
        t[p + "mlp.down_proj.weight"] = rnd(h, inter)
        name = f"model-layer{i:02d}.safetensors"
        save_file(t, str(folder / name))
        shards[name] = list(t)
        del t
    vh = vision["hidden_size"]
    n_pos = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    t = {"language_model.model.embed_tokens.weight": rnd(VOCAB, h), "language_model.lm_head.weight": rnd(VOCAB, h),
         "language_model.model.norm.weight": torch.ones(h, dtype=torch.float16),
         "multi_modal_projector.linear_1.weight": rnd(h, vh), "multi_modal_projector.linear_1.bias": rnd(h),
         "multi_modal_projector.linear_2.weight": rnd(h, h), "multi_modal_projector.linear_2.bias": rnd(h),
         "vision_tower.vision_model.embeddings.class_embedding": rnd(vh),
         "vision_tower.vision_model.embeddings.patch_embedding.weight": rnd(vh, 3, vision["patch_size"], vision["patch_size"]),
         "vision_tower.vision_model.embeddings.position_embedding.weight": rnd(n_pos, vh)}
    for ln in ("pre_layrnorm", "post_layernorm"):
        t[f"vision_tower.vision_model.{ln}.weight"] = torch.ones(vh, dtype=torch.float16)
        t[f"vision_tower.vision_model.{ln}.bias"] = torch.zeros(vh, dtype=torch.float16)
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_tower.vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{n}.weight"], t[p + f"self_attn.{n}.bias"] = rnd(vh, vh), rnd(vh)
        t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"] = rnd(vision["intermediate_size"], vh), rnd(vision["intermediate_size"])
        t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"] = rnd(vh, vision["intermediate_size"]), rnd(vh)
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + f"{ln}.weight"], t[p + f"{ln}.bias"] = torch.ones(vh, dtype=torch.float16), torch.zeros(vh, dtype=torch.float16)
    save_file(t, str(folder / "model-rest.safetensors"))
    shards["model-rest.safetensors"] = list(t)
    del t
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    text_config = {"model_type": "llama", "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                   **{k: v for k, v in d.items() if k != "num_hidden_layers"}, "num_hidden_layers": layers,
                   "num_key_value_heads": d["num_attention_heads"]}
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
              "text_config": text_config, "vision_config": {"model_type": "clip_vision_model", **vision}}
    (folder / "config.json").write_text(json.dumps(config))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())


def phase_export(src: Path, out: Path, precision: str, accuracy_level: int | None) -> dict:
    from export.llava.build import QuantConfig, export_llava

    t0 = time.perf_counter()
    export_llava(src, out, [precision], quant=QuantConfig(accuracy_level=accuracy_level), progress=False)
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    return {"export_s": time.perf_counter() - t0, "export_peak_rss_gb": peak_rss_gb(),
            "decoder_bytes": files[f"decoder_{precision}.onnx.data"], "vision_bytes": files.get("vision.onnx.data", 0),
            "embed_bytes": files["embed_tokens.npy"]}


def phase_run(out: Path, precision: str, prefill: int, steps: int, threads: int | None, vision: bool) -> dict:
    from PIL import Image

    from supir_rt.caption.llava import LlavaOnnx, SamplingConfig

    t0 = time.perf_counter()
    rt = LlavaOnnx(out, precision, threads=threads)
    load_s = time.perf_counter() - t0
    res: dict = {"load_s": load_s}
    if vision:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 683, 3), dtype=np.uint8))
        rt.image_features(img)  # warm-up
        t0 = time.perf_counter()
        rt.image_features(img)
        res["vision_s"] = time.perf_counter() - t0
    h = rt.text["hidden_size"]
    embeds = (np.random.default_rng(0).standard_normal((1, prefill, h)) * 0.02).astype(np.float32)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, logits: np.ndarray) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    forced = [5] * (steps + 1)
    last[0] = time.perf_counter()
    rt.generate_from_embeddings(embeds, SamplingConfig(), forced=forced, on_logits=tick)
    res["prefill_s"] = times[0]
    res["decode_ms_per_token"] = 1000 * float(np.median(times[2:]))  # skip the first decode step (warm-up)
    res["run_peak_rss_gb"] = peak_rss_gb()
    res |= kv_bytes_written_per_token(rt.text, prefill)
    rt.close()
    res |= profile_split(out, precision, embeds, steps, threads)
    return res


def profile_split(out: Path, precision: str, embeds: np.ndarray, steps: int, threads: int | None) -> dict:
    """Per-layer vs fixed (lm_head) time inside each decoder run, from ORT's node profile, running the
    real decode loop (``generate_from_embeddings``) on a profiling session.

    Differencing whole runs at two layer counts drowns in the load swings of a shared 2-core machine;
    the split inside one run does not.
    """
    import onnxruntime as ort

    from supir_rt.caption import layout
    from supir_rt.caption.llava import LlavaOnnx, SamplingConfig, _session_options

    rt = LlavaOnnx(out, precision, threads=threads)
    so = _session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = str(out / "profile")
    rt.decoder = ort.InferenceSession(str(out / layout.decoder_file(precision)), so, providers=["CPUExecutionProvider"])
    n_layers = rt.n_layers
    rt.generate_from_embeddings(embeds, SamplingConfig(), forced=[5] * (steps + 1))
    events = json.loads(Path(rt.decoder.end_profiling()).read_text())
    rt.close()
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    layer_us = [0.0] * len(runs)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].startswith("layers."):
            continue
        for r, (a, b) in enumerate(runs):
            if a <= e["ts"] <= b:
                layer_us[r] += e["dur"]
                break
    totals = [(b - a) for a, b in runs]
    per_layer = [u / n_layers for u in layer_us]
    fixed = [t - u for t, u in zip(totals, layer_us)]
    return {
        "prof_prefill_per_layer_s": per_layer[0] / 1e6, "prof_prefill_fixed_s": fixed[0] / 1e6,
        "prof_decode_per_layer_ms": float(np.median(per_layer[2:])) / 1e3,
        "prof_decode_fixed_ms": float(np.median(fixed[2:])) / 1e3,
        "layer_bytes": layer_data_bytes(out / layout.decoder_file(precision), "layers.0/"),
    }


def kv_bytes_written_per_token(text: dict, past: int, itemsize: int = 4) -> dict:
    """KV-cache bytes written per decoded token, per layer, by construction: the in-place cache writes the
    new key and value rows only; the earlier Concat decoder (before the in-place cache) wrote the whole
    past again plus the new row, for keys and values, every token."""
    row = text["num_kv_heads"] * text["head_dim"] * itemsize
    return {"kv_bytes_per_token_per_layer_in_place": 2 * row, "kv_bytes_per_token_per_layer_concat": 2 * row * (past + 1)}


def concat_decoder_steps(folder: Path, precision: str, embeds: np.ndarray, threads: int | None):
    """The decode loop as it was before the in-place cache, for an export made before it (format v1:
    each layer's graph ``Concat``-s past and new keys/values into fresh ``present`` tensors, which the
    next step binds as its past). A generator: prefill on the first ``next()``, then one decode step per
    ``next()``, each yielding its time in seconds."""
    import onnxruntime as ort

    from supir_rt.caption.llava import _session_options

    manifest = json.loads((folder / "manifest.json").read_text())
    text = manifest["text"]
    sess = ort.InferenceSession(str(folder / manifest["decoders"][precision]["file"]), _session_options(threads),
                                providers=["CPUExecutionProvider"])
    empty = np.zeros((1, text["num_kv_heads"], 0, text["head_dim"]), np.float32)
    names = [f"{i}.{k}" for i in range(text["num_layers"]) for k in ("key", "value")]
    past = {n: ort.OrtValue.ortvalue_from_numpy(empty) for n in names}
    out_names = [o.name for o in sess.get_outputs()]
    step_input = embeds
    while True:
        t0 = time.perf_counter()
        binding = sess.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(step_input))
        for n in names:
            binding.bind_ortvalue_input(f"past_key_values.{n}", past[n])
        for n in out_names:
            binding.bind_output(n)
        sess.run_with_iobinding(binding)
        outputs = dict(zip(out_names, binding.get_outputs()))
        outputs["logits"].numpy()
        past = {n: outputs[f"present.{n}"] for n in names}
        step_input = embeds[:, :1]
        yield time.perf_counter() - t0


def ab_decode(before: Path, after: Path, precision: str, prefill: int, steps: int, threads: int | None) -> dict:
    """Per-token decode time of the in-place decoder (``after``, the current runtime) against the Concat
    decoder (``before``, an export made before the in-place cache), stepped in alternation in one process
    (each of the current loop's steps runs one step of the old loop from its ``on_logits``), so that the
    load of a shared machine hits both alike. Both see the same prompt embeddings and the same past
    length at every step."""
    from supir_rt.caption.llava import LlavaOnnx, SamplingConfig

    rt = LlavaOnnx(after, precision, threads=threads)
    embeds = (np.random.default_rng(0).standard_normal((1, prefill, rt.text["hidden_size"])) * 0.02).astype(np.float32)
    old = concat_decoder_steps(before, precision, embeds, threads)
    new_t: list[float] = []
    old_t: list[float] = []
    mark = [0.0]

    def tick(step: int, logits: np.ndarray) -> None:
        new_t.append(time.perf_counter() - mark[0])
        old_t.append(next(old))
        mark[0] = time.perf_counter()

    mark[0] = time.perf_counter()
    rt.generate_from_embeddings(embeds, SamplingConfig(), forced=[5] * (steps + 1), on_logits=tick)
    rt.close()
    new_ms, old_ms = 1000 * np.asarray(new_t[2:]), 1000 * np.asarray(old_t[2:])  # skip prefill + first step
    return {
        "layers": rt.n_layers, "prefill_tokens": prefill, "steps": len(new_ms),
        "decode_ms_in_place_median": float(np.median(new_ms)), "decode_ms_concat_median": float(np.median(old_ms)),
        "speedup_median_of_ratios": float(np.median(old_ms / new_ms)),
        "decode_ms_in_place": [round(x, 1) for x in new_ms], "decode_ms_concat": [round(x, 1) for x in old_ms],
        "prefill_s_in_place": new_t[0], "prefill_s_concat": old_t[0],
    } | kv_bytes_written_per_token(rt.text, prefill)


def layer_data_bytes(path: Path, prefix: str) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.name.startswith(prefix):
            total += int({e.key: e.value for e in t.external_data}.get("length", len(t.raw_data)))
    return total


def child(args: argparse.Namespace, phase: str, layers: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--layers-now", str(layers), "--work", str(work),
           "--model", args.model, "--precision", args.precision, "--prefill", str(args.prefill),
           "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.vision:
        cmd += ["--vision"]
    if args.accuracy_level:
        cmd += ["--accuracy-level", str(args.accuracy_level)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(DIMS), default="13b")
    p.add_argument("--precision", choices=["int4", "int8"], default="int4")
    p.add_argument("--accuracy-level", type=int, default=None)
    p.add_argument("--layers", type=int, default=2, help="real-size decoder layers to build and run")
    p.add_argument("--prefill", type=int, default=640, help="prompt length: 576 image features + ~64 text tokens")
    p.add_argument("--steps", type=int, default=12, help="decode steps timed (median)")
    p.add_argument("--caption-tokens", type=int, default=150)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--vision", action="store_true", help="real-size CLIP tower (else a tiny stand-in)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--ab", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), default=None,
                   help="time decode steps of two exported folders in alternation: BEFORE made by the exporter "
                        "before the in-place KV cache (format v1), AFTER by the current one")
    p.add_argument("--phase", choices=["export", "run"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--layers-now", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    if args.ab:
        print(json.dumps(ab_decode(*args.ab, args.precision, args.prefill, args.steps, args.threads), indent=2))
        return 0
    if args.phase:
        src, out = args.work / f"src{args.layers_now}", args.work / f"out{args.layers_now}"
        if args.phase == "export":
            synthesize(src, args.model, args.layers_now, VISION_REAL if args.vision else VISION_TINY)
            res = phase_export(src, out, args.precision, args.accuracy_level)
        else:
            res = phase_run(out, args.precision, args.prefill, args.steps, args.threads, args.vision)
        print(json.dumps(res))
        return 0

    full = DIMS[args.model]["num_hidden_layers"]
    L = args.layers
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        r = child(args, "export", L, work) | child(args, "run", L, work)
        log.info("%d layer(s): %s", L, json.dumps(r))
    prefill = r["prof_prefill_fixed_s"] + full * r["prof_prefill_per_layer_s"]
    decode_ms = r["prof_decode_fixed_ms"] + full * r["prof_decode_per_layer_ms"]
    extra = (full - L) * r["layer_bytes"]
    vision_s = r.get("vision_s")
    summary = {
        "model": args.model, "precision": args.precision, "accuracy_level": args.accuracy_level, "layers": full,
        "measured_layers": L, "cores": os.cpu_count(), "threads": args.threads, "prefill_tokens": args.prefill,
        "layer_mb": r["layer_bytes"] / 1e6,
        "weights_gb": (r["decoder_bytes"] + extra + r["embed_bytes"] + r["vision_bytes"]) / 1e9,
        "run_peak_rss_gb_est": r["run_peak_rss_gb"] + extra / 2**30,
        "load_s_measured": r["load_s"], "load_s_est": r["load_s"] * (r["decoder_bytes"] + extra) / r["decoder_bytes"],
        "export_s_measured": r["export_s"], "export_peak_rss_gb": r["export_peak_rss_gb"],
        "vision_s": vision_s, "prefill_s_est": prefill, "decode_ms_per_token_est": decode_ms,
        "prefill_per_layer_s": r["prof_prefill_per_layer_s"], "decode_per_layer_ms": r["prof_decode_per_layer_ms"],
        "decode_fixed_ms": r["prof_decode_fixed_ms"],
        "kv_gb_written_per_token_in_place": full * r["kv_bytes_per_token_per_layer_in_place"] / 1e9,
        "kv_gb_written_per_token_concat": full * r["kv_bytes_per_token_per_layer_concat"] / 1e9,
        f"decode_ms_per_token_measured_{L}_layers": r["decode_ms_per_token"],
        f"caption_{args.caption_tokens}_tokens_s_est": prefill + args.caption_tokens * decode_ms / 1000 + (vision_s or 0),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
