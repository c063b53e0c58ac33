"""Cost curve of tiling: time and peak memory (RSS, CPU) of a restore versus output size, untiled and
tiled, and the tiled VAE's distance to the untiled one. A measurement script, not a timed test.

    python benchmarks/tiling_cost.py                      # everything below, ~30-60 min on 2 busy CPU cores
    python benchmarks/tiling_cost.py --sizes 512,1024 --official-sizes 512 --skip-full

Every case runs in its own subprocess so that its peak RSS is its own: ``rss_peak_mb`` is the
process's maximum resident set, ``rss_model_mb`` the resident set after building the model (before
the measured call), and ``rss_delta_mb`` their difference, the working memory of the call.

Cases:
* ``restore``: `Restorer.tiny_random` restoring a random image to S×S px (upscale from S/4), 1 step,
  ``--tiling off`` (untiled), ``on`` with the exact tiled VAE (default budget: the free RAM decides how
  many tiles stay in memory between passes) and ``on`` with the official tiled VAE. Default sampler
  tiles (1024/512 px), VAE tiles 512 px.
* ``vae``: the VAE alone (tiny, or the official SDXL architecture with random weights) encoding an S×S
  image or decoding an (S/8)² latent, untiled / exact / official, with relative L2 distances to untiled;
  the tiny decoder also with no tile kept between passes (the bounded-memory schedule) at growing S.

Results: JSON (``--out``), a markdown table on stdout, and a plot (``--plot``, needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# child: one case
# --------------------------------------------------------------------------------------------------


def run_restore_case(size: int, mode: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from supir_rt.api import Restorer
    from supir_rt.restore_config import RestoreConfig

    restorer = Restorer.tiny_random()
    image = Image.fromarray((np.random.default_rng(0).random((size // 4, size // 4, 3)) * 255).astype(np.uint8))
    options = dict(num_steps=1, upscale=4.0, min_size=64, color_fix_type="adain")
    if mode == "untiled":
        config = RestoreConfig(tiling="off", **options)
    elif mode == "exact":  # the default budget (free RAM) decides how many VAE tiles stay between passes
        config = RestoreConfig(tiling="on", vae_tiling="exact", **options)
    else:
        config = RestoreConfig(tiling="on", vae_tiling="official", **options)
    before = _rss_mb()
    start = time.perf_counter()
    with torch.inference_mode():
        restored = restorer.restore(image, config)
    seconds = time.perf_counter() - start
    peak = _rss_mb()
    return {"case": "restore", "model": "tiny", "size": size, "mode": mode, "seconds": round(seconds, 2),
            "rss_model_mb": round(before), "rss_peak_mb": round(peak), "rss_delta_mb": round(peak - before),
            "tiling": restored.metadata["tiling"], "threads": torch.get_num_threads()}


def run_vae_case(size: int, mode: str, part: str, out_file: str, model: str, tile: int, keep: int) -> dict:
    import torch

    from supir_rt.tiling import vae as vae_tiling
    from supir_rt.config import ModelConfig
    from supir_rt.model.supir import initialise_random
    from supir_rt.model.vae import AutoencoderKL

    torch.manual_seed(0)
    cfg = (ModelConfig.tiny() if model == "tiny" else ModelConfig.official()).first_stage_config
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    vae = vae.to_empty(device="cpu")
    initialise_random(vae)
    vae.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    if part == "encoder":
        x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        run = (lambda: vae.encoder(x)) if mode == "untiled" else (
            lambda: vae_tiling.tiled_encode(vae.encoder, x, tile_px=tile, mode=mode, keep=keep))
    else:
        x = torch.randn(1, 4, size // 8, size // 8, generator=g)
        run = (lambda: vae.decoder(x)) if mode == "untiled" else (
            lambda: vae_tiling.tiled_decode(vae.decoder, x, tile_px=tile, mode=mode, keep=keep))
    before = _rss_mb()
    start = time.perf_counter()
    with torch.inference_mode():
        out = run()
    seconds = time.perf_counter() - start
    peak = _rss_mb()
    torch.save(out, out_file)
    return {"case": "vae", "model": model, "part": part, "size": size, "mode": mode, "tile_px": tile, "keep": keep,
            "seconds": round(seconds, 2), "rss_model_mb": round(before), "rss_peak_mb": round(peak),
            "rss_delta_mb": round(peak - before)}


def child(spec: dict) -> None:
    if spec["case"] == "restore":
        result = run_restore_case(spec["size"], spec["mode"])
    else:
        result = run_vae_case(spec["size"], spec["mode"], spec["part"], spec["out_file"], spec["model"],
                              spec["tile"], spec["keep"])
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------------


def spawn(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {**spec, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="512,1024,2048", help="output sides (px) for untiled and exact tiled restores")
    ap.add_argument("--official-sizes", default="512,1024,2048,4096", help="output sides for the official-VAE tiled restore")
    ap.add_argument("--vae-sizes", default="256", help="image sides for the official-architecture VAE distances")
    ap.add_argument("--bounded-sizes", default="256,512", help="image sides for the tiny decoder, no tile kept")
    ap.add_argument("--skip-full", action="store_true", help="skip the official-architecture VAE cases")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tiling_cost.json")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    results = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for size in sorted(set(sizes) | {int(s) for s in args.official_sizes.split(",") if s}):
        modes = (["untiled", "exact"] if size in sizes else []) + (
            ["official"] if str(size) in args.official_sizes.split(",") else [])
        for mode in modes:
            r = spawn({"case": "restore", "size": size, "mode": mode}, args.timeout)
            print(json.dumps(r), flush=True)
            results.append(r)
    with tempfile.TemporaryDirectory() as tmp:
        # bounded-memory schedule (no tile kept): tiny decoder, 128 px tiles, growing image
        for size in (int(v) for v in args.bounded_sizes.split(",") if v):
            for mode in ("untiled", "exact"):
                r = spawn({"case": "vae", "model": "tiny", "part": "decoder", "size": size, "mode": mode, "tile": 128,
                           "keep": 0, "out_file": str(Path(tmp) / "x.pt")}, args.timeout)
                print(json.dumps(r), flush=True)
                results.append(r)
        # distances: official architecture, random weights; exact keeps all tiles (same result, less time)
        for size in ([] if args.skip_full else [int(v) for v in args.vae_sizes.split(",") if v]):
            for part, tile in (("encoder", 128), ("decoder", 64)):
                outs, rows = {}, []
                for mode in ("untiled", "exact", "official"):
                    f = str(Path(tmp) / f"{part}-{size}-{mode}.pt")
                    r = spawn({"case": "vae", "model": "official", "part": part, "size": size, "mode": mode,
                               "tile": tile, "keep": 10**6, "out_file": f}, args.timeout)
                    if "error" not in r:
                        outs[mode] = f
                    rows.append(r)
                if "untiled" in outs:
                    import torch

                    ref = torch.load(outs["untiled"])
                    for r in rows:
                        if r.get("mode") in outs and r["mode"] != "untiled":
                            r["rel_l2_to_untiled"] = float((torch.load(outs[r["mode"]]) - ref).norm() / ref.norm())
                for r in rows:
                    print(json.dumps(r), flush=True)
                results.extend(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    if args.plot:
        plot(results, args.plot)


def table(results: list[dict]) -> str:
    lines = ["| case | size (px) | mode | time (s) | peak RSS (MB) | RSS over model (MB) | rel. L2 to untiled |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        name = r["case"] + ("" if r["case"] == "restore" else
                            f" {r.get('model')} {r.get('part')} (tile {r.get('tile_px')}, kept {min(r.get('keep', 0), 99)})")
        dist = r.get("rel_l2_to_untiled")
        if "error" in r:
            lines.append(f"| {name} | {r['size']} | {r['mode']} | {r['error']} | | | |")
            continue
        lines.append(f"| {name} | {r['size']} | {r['mode']} | {r['seconds']} | {r['rss_peak_mb']} | {r['rss_delta_mb']} "
                     f"| {'' if dist is None else f'{dist:.2e}'} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80)
    for mode, style in (("untiled", "o-"), ("exact", "s-"), ("official", "^-")):
        rows = sorted((r for r in results if r["case"] == "restore" and r["mode"] == mode and "error" not in r),
                      key=lambda r: r["size"])
        if rows:
            xs = [r["size"] for r in rows]
            ax_t.plot(xs, [r["seconds"] for r in rows], style, label=mode)
            ax_m.plot(xs, [r["rss_delta_mb"] for r in rows], style, label=mode)
    for ax, title in ((ax_t, "restore time (s), tiny, 1 step"), (ax_m, "working RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("output side (px)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
