"""Measure what half precision costs a correct model, and what a wrong model costs: the evidence behind
the parity tolerances in `bench_parity.py`.

For each seed, a model with seeded random weights (`build_model`, PyTorch's default init) runs every
network through the torch backend in fp32 (the reference) and in fp16 and bf16 (a copy cast with
`.to(dtype)`, norms in fp32 as in the model), on the benchmarks' seeded feeds; the error is the
benchmarks' metric, max |out − ref| / max |ref|. End to end, `Pipeline.run` (test.py settings, N steps)
restores the benchmarks' random image with all five networks in one precision, and the uint8 results
are compared in grey levels **before the colour fix** (`color_fix_type="none"`) and, for comparison,
after the default wavelet fix. Then the fp32 model is made wrong in small ways (one UNet convolution
perturbed by a fraction of its weights' standard deviation; one ZeroCrossAttn connector switched off)
and the same metrics are taken against the correct fp32 model.

    python benchmarks/measure_precision.py                      # tiny, seeds 0-2, latent 16x16, 4 steps
    python benchmarks/measure_precision.py --model-size full --networks dr_encoder,vae_encoder,vae_decoder \
        --seeds 0 --no-restore                                  # official VAE widths (the UNet needs ~20 GB)

Prints one Markdown table and writes the numbers as JSON (`--json`). Half precision on a CPU runs
through oneDNN (bf16 natively with AVX512-BF16, fp16 emulated): the roundings of inputs, weights and
activations are those of a GPU run, the accumulation order is not, so GPU figures can differ a little
(`bash benchmarks/gpu_check.sh` checks the tolerances on a GPU at 1024² with the official architecture).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_parity import rel_error  # noqa: E402

from supir_rt.backends.modules import NETWORK_MODULES, OWNER_MODULES  # noqa: E402
from supir_rt.backends.specs import NETWORKS, network_specs  # noqa: E402
from supir_rt.backends.torch_backend import TorchEngine  # noqa: E402
from supir_rt.config import ModelConfig  # noqa: E402
from supir_rt.model.supir import build_model, initialise_random  # noqa: E402

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
PERTURBATIONS = (0.01, 0.03, 0.1)  # fractions of the weights' std added as noise to one UNet conv


OWNERS = OWNER_MODULES  # the SUPIRModel part each network reads


def seeded_model(config: ModelConfig, networks: list[str], seed: int):
    """The model with seeded random weights in the parts these networks need only (the official UNet +
    adaptor alone is 15.5 GB in fp32); the other parts stay on the meta device. The tiny model is built
    whole by `build_model` (as the tests and `test_parity_checks.py` build it)."""
    if config.name == "tiny":
        torch.manual_seed(seed)
        return build_model(config)
    model = build_model(config, device="meta")
    torch.manual_seed(seed)
    for owner in dict.fromkeys(OWNERS[n] for n in networks):
        part = getattr(model, owner).to_empty(device="cpu")
        initialise_random(part)
    return model


def engines_for(model, networks, dtype: torch.dtype) -> dict[str, TorchEngine]:
    specs = network_specs(model.config)
    out = {}
    for name in networks:
        module = NETWORK_MODULES[name](model).eval()
        if dtype != torch.float32:
            module = copy.deepcopy(module).to(dtype)
        out[name] = TorchEngine(module, specs[name], torch.device("cpu"), dtype)
    return out


def feed_for(model, network: str, latent: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    """The benchmarks' feed (`ModelHost.sample_feed`): seeded N(0, 1) floats, random timesteps/ids."""
    g = torch.Generator().manual_seed(seed * 1000 + NETWORKS.index(network))
    return network_specs(model.config)[network].sample_inputs({"B": 1, "h": latent[0], "w": latent[1]}, generator=g)


def random_image(side_hw: tuple[int, int], seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side_hw[1], side_hw[0]), Image.Resampling.BICUBIC)


def restore(engines, config, latent, steps, seed, colour_fix: str) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 image, the sampled latent = the last step's denoised estimate)."""
    from supir_rt.pipeline import Pipeline
    from supir_rt.restore_config import RestoreConfig

    cfg = RestoreConfig(num_steps=steps, min_size=8 * min(latent), seed=1234, color_fix_type=colour_fix)
    seen = []
    image = Pipeline(engines, config).run(random_image((8 * latent[0], 8 * latent[1]), seed), cfg, caption="",
                                          callback=seen.append).image
    return image, seen[-1].denoised.clone()


def grey_levels(a: tuple[np.ndarray, torch.Tensor], b: tuple[np.ndarray, torch.Tensor]) -> dict[str, float]:
    d = np.abs(a[0].astype(np.int16) - b[0].astype(np.int16))
    return {"max": int(d.max()), "mean": float(d.mean()), "p99": float(np.percentile(d, 99)),
            "ref_range": int(b[0].max()) - int(b[0].min()), "latent_rel_err": rel_error({"x": a[1]}, {"x": b[1]})}


def wrong_models(model):
    """(label, context manager-free mutator returning an undo) for each wrong variant of the fp32 model."""
    unet = model.model.diffusion_model
    conv = unet.output_blocks[len(unet.output_blocks) // 2][0].in_layers[2]  # a decoder resblock conv
    variants = []
    for frac in PERTURBATIONS:
        def perturb(frac=frac):
            saved = conv.weight.detach().clone()
            g = torch.Generator().manual_seed(99)
            with torch.no_grad():
                conv.weight.add_(frac * saved.std() * torch.randn(saved.shape, generator=g))
            return lambda: conv.weight.data.copy_(saved)
        variants.append((f"one UNet decoder conv + {frac:g} std noise", perturb))
    zca = next(m for m in unet.project_modules if type(m).__name__ == "ZeroCrossAttn")

    def no_cross_attn():
        saved = zca.attn.to_out[0].weight.detach().clone(), zca.attn.to_out[0].bias.detach().clone()
        with torch.no_grad():
            zca.attn.to_out[0].weight.zero_()
            zca.attn.to_out[0].bias.zero_()

        def undo():
            zca.attn.to_out[0].weight.data.copy_(saved[0])
            zca.attn.to_out[0].bias.data.copy_(saved[1])
        return undo
    variants.append(("one ZeroCrossAttn connector off", no_cross_attn))
    return variants


def measure(args) -> dict:
    config = ModelConfig.tiny() if args.model_size == "tiny" else ModelConfig.official()
    latent = tuple(int(v) for v in args.latent.split("x"))
    networks = args.networks.split(",")
    rows: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        model = seeded_model(config, networks + (list(NETWORKS) if args.restore else []), seed)
        ref_engines = engines_for(model, networks, torch.float32)  # fp32 engines share the model's modules
        refs = {}
        for n in networks:
            feed = feed_for(model, n, latent, seed)
            refs[n] = feed, {k: v.clone() for k, v in ref_engines[n].infer(feed).items()}
        if args.restore:
            full = engines_for(model, NETWORKS, torch.float32)
            correct = {fix: restore(full, config, latent, args.steps, seed, fix) for fix in ("none", "wavelet")}
        for precision, dtype in ((p, HALF[p]) for p in args.precisions.split(",")):
            half = engines_for(model, networks, dtype)
            for n in networks:
                t0 = time.perf_counter()
                err = rel_error(half[n].infer(refs[n][0]), refs[n][1])
                rows.append({"seed": seed, "what": n, "variant": precision, "rel_err": err,
                             "seconds": round(time.perf_counter() - t0, 2)})
            if args.restore:
                half_all = engines_for(model, NETWORKS, dtype)
                for fix in ("none", "wavelet"):
                    out = restore(half_all, config, latent, args.steps, seed, fix)
                    rows.append({"seed": seed, "what": f"restore ({fix} colour fix)", "variant": precision,
                                 "grey_levels": grey_levels(out, correct[fix])})
                del half_all
            del half
        if "unet_adaptor" in networks:
            n = "unet_adaptor"
            for label, mutate in wrong_models(model):
                undo = mutate()
                err = rel_error(ref_engines[n].infer(refs[n][0]), refs[n][1])
                rows.append({"seed": seed, "what": n, "variant": f"fp32, wrong: {label}", "rel_err": err})
                if args.restore:
                    for fix in ("none", "wavelet"):
                        out = restore(full, config, latent, args.steps, seed, fix)
                        rows.append({"seed": seed, "what": f"restore ({fix} colour fix)",
                                     "variant": f"fp32, wrong: {label}", "grey_levels": grey_levels(out, correct[fix])})
                undo()
        del model
    return {"model_size": args.model_size, "latent": list(latent), "steps": args.steps, "torch": torch.__version__,
            "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
            "rows": rows}


def table(result: dict) -> str:
    """Worst case over seeds per (what, variant)."""
    worst: dict[tuple[str, str], dict] = {}
    for r in result["rows"]:
        key = (r["what"], r["variant"])
        cur = worst.setdefault(key, {"n": 0, "rel_err": 0.0, "max": 0, "mean": 0.0, "range": 255})
        cur["n"] += 1
        if "rel_err" in r:
            cur["rel_err"] = max(cur["rel_err"], r["rel_err"])
        else:
            g = r["grey_levels"]
            cur["max"], cur["mean"] = max(cur["max"], g["max"]), max(cur["mean"], g["mean"])
            cur["range"] = min(cur["range"], g["ref_range"])
            cur["rel_err"] = max(cur["rel_err"], g["latent_rel_err"])
    lines = [f"{result['model_size']}, latent {result['latent'][0]}x{result['latent'][1]}, {result['steps']} steps, "
             f"torch {result['torch']}; worst over {max(v['n'] for v in worst.values())} seed(s)", "",
             "| what | variant | max \\|out-ref\\|/max \\|ref\\| (restore: of the sampled latent) "
             "| grey levels max (mean) | reference image range |", "|---|---|---|---|---|"]
    for (what, variant), v in worst.items():
        rel = f"{v['rel_err']:.2e}"
        grey, rng = (f"{v['max']} ({v['mean']:.2f})", str(v["range"])) if what not in NETWORKS else ("–", "–")
        lines.append(f"| {what} | {variant} | {rel} | {grey} | {rng} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--latent", default="16x16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--networks", default=",".join(NETWORKS))
    p.add_argument("--precisions", default="fp16,bf16", help="fp16 on a CPU is emulated: minutes per network")
    p.add_argument("--no-restore", dest="restore", action="store_false", help="networks only")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    result = measure(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
