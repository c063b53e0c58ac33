"""What tile-parallel sampling over Ray costs, and a projected scaling table (issue 22).

Not a timed test: a script that measures, on this machine, with the tiny model (random weights):

1. the per-step time of one tiled step run locally, on 1 Ray actor and on 2 Ray actors (the same tile
   batches: the same ``TiledDenoiser.denoise_batch`` on the same weights; 3x3 tiles of 32² latent by default, so
   that the tiny model on a CPU takes minutes, not hours), and the Ray round trip of one full-size
   (128² latent, 256 KiB) tile batch alone (an echo actor returning the batch's bytes);
2. the bytes that travel per step at 2K / 4K / 8K output with the default 1024-px tiles (stride 512):
   per batch the x tiles and σ's out and the denoised tiles back; once per restore the text
   conditioning and the control-latent crops (by reference, once per node);
3. a projected scaling table for 1-8 GPUs at 4K, **a model**: per step
   ``ceil(tiles / N) · (t_tile + t_round_trip + t_transfer) + t_blend``, with t_tile the per-tile time
   (``--tile-ms``, e.g. one real UNet call on a 128² latent with its CFG pair on your GPU; default: the
   tiny model's measured time here), t_round_trip the measured Ray overhead per batch, t_transfer the
   bytes of one batch over ``--gbit`` Gbit/s, t_blend the measured driver-side blend.

    python benchmarks/scale_cost.py [--rounds 3] [--tile-ms 250] [--gbit 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import platform
import statistics
import time

import torch

LATENT = 8  # image px per latent px
TILE, STRIDE = 128, 64  # latent px: the official 1024/512-px tiles
CHANNELS = 4


def tiles_at(side_px: int) -> int:
    side = side_px // LATENT
    per_axis = math.ceil(max(side - TILE, 0) / STRIDE) + 1
    return per_axis * per_axis


def bytes_per_step(side_px: int, *, images: int = 1, tile_batch: int = 1) -> dict[str, int]:
    """What travels per sampler step (both directions) and once per restore, in bytes (float32)."""
    tiles = tiles_at(side_px)
    tile = images * CHANNELS * TILE * TILE * 4
    batches = math.ceil(tiles / tile_batch)
    sigmas = 2 * images * tile_batch * 4 * batches  # σ̂ and σ per tile
    text = 2 * images * (77 * 2048 + 2816) * 4  # positive + negative, the official model's sizes
    # once per restore and node: the text conditioning (one object for all batches of a size) and the
    # control-latent tiles as the network sees them, [lq, lq] per batch
    return {"tiles": tiles, "to_workers": tiles * tile + sigmas, "from_workers": tiles * tile,
            "once_per_restore": text + 2 * tiles * tile}


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(rounds: int, latent_side: int, tile: int, stride: int) -> dict[str, float]:
    import ray

    from supir_rt import Restorer
    from supir_rt.denoiser import ControlScale, EpsDenoiser, LinearCFG
    from supir_rt.schedule import legacy_ddpm_sigmas
    from supir_rt.stages import engine_network, prepare_condition
    from supir_rt.tile_workers import TilePool, WorkerRecipe
    from supir_rt.tiling import TiledDenoiser, TileGrid, gather

    torch.set_num_threads(1)  # as each Ray actor runs (1 CPU each)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=200 * 2**20,
             log_to_driver=False)
    try:
        with Restorer.tiny_random(seed=0) as r:
            g = torch.Generator().manual_seed(0)
            control = torch.randn(1, CHANNELS, latent_side, latent_side, generator=g)
            cond, uncond = prepare_condition(r.pipeline.embed("a"), r.pipeline.embed("b"), control)
            table = legacy_ddpm_sigmas()
            cfg, cs = LinearCFG.constant(4.0), ControlScale(1.0)
            grid = TileGrid.build(latent_side, latent_side, tile, stride, "cpu")
            network = EpsDenoiser(engine_network(r.engines["unet_adaptor"]), table)
            local = TiledDenoiser(network, cond, uncond, cfg, cs, grid)
            x = torch.randn_like(control)
            sigma = torch.full((1,), 5.0)
            x_tiles = [gather(x, b) for b in local.batches]

            def run_local():
                return [local.denoise_batch(j, xt, sigma, sigma) for j, xt in enumerate(x_tiles)]

            def blend(outs):
                acc = torch.zeros_like(x)
                for batch, d in zip(local.batches, outs):
                    for a, b, c, e in batch:
                        acc[..., a:b, c:e] += d * grid.weights
                return acc / grid.count

            outs = run_local()
            t_local = _median_time(run_local, rounds)
            t_blend = _median_time(lambda: blend(outs), rounds)
            result = {"tiles": len(x_tiles), "latent_side": latent_side, "tile": tile, "local_step_s": t_local,
                      "tile_s": t_local / len(x_tiles), "blend_s": t_blend}
            for workers in (1, 2):
                with TilePool(WorkerRecipe("tiny_random", {"seed": 0}), workers) as pool:
                    sharded = pool.bind(local)
                    got = sharded.run_tiles(x_tiles, sigma, sigma)  # warm-up (and the set-up objects travel)
                    assert all(torch.equal(a, b) for a, b in zip(got, outs)), "workers differ from the local run"
                    result[f"ray{workers}_step_s"] = _median_time(lambda: sharded.run_tiles(x_tiles, sigma, sigma),
                                                                   rounds)

            @ray.remote(num_cpus=1)
            class Echo:
                def run(self, x, s1, s2):
                    return x.clone()

            echo = Echo.remote()
            full = [(torch.randn(1, CHANNELS, TILE, TILE, generator=g), sigma, sigma) for _ in x_tiles]  # 1024-px tiles
            ray.get(echo.run.remote(*full[0]))
            t_echo = _median_time(lambda: ray.get([echo.run.remote(*b) for b in full]), rounds)
            result["round_trip_per_batch_s"] = t_echo / len(full)
            result["pickled_tile_bytes"] = len(pickle.dumps(full[0][0]))
    finally:
        ray.shutdown()
    return result


def projection(measured: dict[str, float], tile_s: float, gbit: float, side_px: int = 4096) -> list[dict[str, float]]:
    step = bytes_per_step(side_px)
    tiles = step["tiles"]
    per_batch_bytes = (step["to_workers"] + step["from_workers"]) / tiles
    t_transfer = per_batch_bytes * 8 / (gbit * 1e9)
    overhead = measured["round_trip_per_batch_s"]
    rows = []
    base = tiles * tile_s + measured["blend_s"]  # one GPU, in process: no round trip
    for n in range(1, 9):
        t = math.ceil(tiles / n) * (tile_s + overhead + t_transfer) + measured["blend_s"]
        rows.append({"gpus": n, "step_s": t, "speedup": base / t, "efficiency": base / t / n})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latent", type=int, default=64, help="latent side of the measured step (default 64: 3x3 tiles)")
    ap.add_argument("--tile", type=int, default=32, help="measured tile side in latent px (the tiny model on CPU: "
                                                          "small tiles keep the run to minutes; the round trip is "
                                                          "measured with full 128² tiles)")
    ap.add_argument("--tile-ms", type=float, default=None, help="per-tile time for the projection (default: measured)")
    ap.add_argument("--gbit", type=float, default=10.0, help="network bandwidth between driver and workers")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    m = measure(args.rounds, args.latent, args.tile, args.tile // 2)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"tiled step, {m['tiles']} tiles of {m['tile']}² latent (tiny model): local {m['local_step_s']:.3f} s, "
          f"1 actor {m['ray1_step_s']:.3f} s, 2 actors {m['ray2_step_s']:.3f} s; per tile {m['tile_s'] * 1e3:.1f} ms")
    print(f"Ray round trip per batch (echo, {m['pickled_tile_bytes'] / 2**10:.0f} KiB each way): "
          f"{m['round_trip_per_batch_s'] * 1e3:.2f} ms; blend {m['blend_s'] * 1e3:.2f} ms per step")
    print("| output | tiles/step | to workers / step | from workers / step | once per restore |")
    print("|---|---|---|---|---|")
    for side in (2048, 4096, 8192):
        b = bytes_per_step(side)
        print(f"| {side}² | {b['tiles']} | {b['to_workers'] / 2**20:.1f} MiB | {b['from_workers'] / 2**20:.1f} MiB | "
              f"{b['once_per_restore'] / 2**20:.1f} MiB |")
    tile_s = args.tile_ms / 1e3 if args.tile_ms else m["tile_s"]
    print(f"MODEL, 4096² ({tiles_at(4096)} tiles/step), t_tile {tile_s * 1e3:.1f} ms, round trip "
          f"{m['round_trip_per_batch_s'] * 1e3:.2f} ms, {args.gbit:g} Gbit/s:")
    print("| GPUs | s/step | speedup | efficiency |")
    print("|---|---|---|---|")
    rows = projection(m, tile_s, args.gbit)
    for row in rows:
        print(f"| {row['gpus']} | {row['step_s']:.3f} | {row['speedup']:.2f}x | {row['efficiency']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": m, "projection": rows, "tile_s": tile_s, "gbit": args.gbit}, f, indent=2)


if __name__ == "__main__":
    main()
