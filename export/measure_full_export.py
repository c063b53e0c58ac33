"""Measure exporting the full official architecture (random weights) on this machine: time, peak
RSS, file sizes, and that the exported graphs' I/O is the spec's. A script run once, not a test.

    python export/measure_full_export.py --out /tmp/supir_full --precision fp16 [--networks unet_adaptor]
    python export/measure_full_export.py --out /tmp/supir_full --run-ort       # then time one ORT call
    python export/measure_full_export.py --out /tmp/supir_tiny --compare tiny  # ORT CPU vs torch CPU

The model is built in fp16 on the meta device and only the parts the requested networks read are
allocated (the UNet + adaptor alone is 7.6 GB in fp16); VAE networks are cast to fp32 by the exporter.
Run one network per process to keep peak memory low; the JSON record is appended to ``--record``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from supir_rt.backends.manifest import Manifest, manifest_path  # noqa: E402
from supir_rt.backends.modules import OWNER_MODULES  # noqa: E402
from supir_rt.backends.onnx_export import check_graph_io, export_network  # noqa: E402
from supir_rt.backends.specs import NETWORKS, network_specs  # noqa: E402
from supir_rt.config import ModelConfig  # noqa: E402

log = logging.getLogger("measure_full_export")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


# The part of SUPIRModel each exported network reads; the rest stays on the meta device (no memory).
NEEDS = OWNER_MODULES


def export_full(out: Path, precision: str, networks: list[str]) -> dict:
    from supir_rt.model.supir import initialise_random, build_model  # the same random init as build_model

    config = ModelConfig.official()
    record: dict = {"precision": precision, "torch_threads": torch.get_num_threads(), "networks": {}}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(config, device="meta", dtype=torch.float16)
    for attr in sorted({NEEDS[n] for n in networks}):  # allocate only what the exported networks use
        setattr(model, attr, getattr(model, attr).to_empty(device="cpu"))
        initialise_random(getattr(model, attr))
    record["build_model_s"] = round(time.perf_counter() - t0, 1)
    record["rss_after_build_gib"] = round(rss_gib(), 2)
    log.info("model built in %.0f s, RSS %.1f GiB", record["build_model_s"], rss_gib())
    specs = network_specs(config)
    for name in networks:
        t = time.perf_counter()
        path = export_network(model, name, out, precision=precision, source={"kind": "random-init", "seed": 0})
        check_graph_io(path, specs[name])
        man = Manifest.read(manifest_path(path))
        files = {f: (out / f).stat().st_size for f in man.files}
        record["networks"][name] = {
            "seconds": round(time.perf_counter() - t, 1), "peak_rss_gib_so_far": round(peak_rss_gib(), 2),
            "rss_after_gib": round(rss_gib(), 2), "files_bytes": files, "graph_io_matches_spec": True,
            "compute_dtype": man.build["compute_dtype"],
        }
        log.info("%s: %s", name, record["networks"][name])
        gc.collect()
    record["total_s"] = round(time.perf_counter() - t0, 1)
    record["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return record


def run_ort(out: Path, precision: str, networks: list[str], dims: dict[str, int]) -> dict:
    """Open each exported graph alone (fresh session) and time one call at `dims`."""
    from supir_rt.backends.onnxruntime_backend import open_onnxruntime_engines

    config, res = ModelConfig.official(), {}
    for name in networks:
        t = time.perf_counter()
        engine = open_onnxruntime_engines(config=config, artifact_dir=out, precision=precision, networks=[name])[name]
        load_s = time.perf_counter() - t
        feed = engine.spec.sample_inputs(dims, generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        outs = engine.infer(feed)
        run_s = time.perf_counter() - t
        res[name] = {"load_s": round(load_s, 1), "first_call_s": round(run_s, 2), "dims": dims,
                     "finite": all(bool(torch.isfinite(o).all()) for o in outs.values()),
                     "peak_rss_gib_so_far": round(peak_rss_gib(), 2)}
        log.info("%s: %s", name, res[name])
        engine.close()
        del engine, outs
        gc.collect()
    return res


def compare_cpu(config: ModelConfig, out: Path, networks: list[str], latents: list[tuple[int, int]],
                rounds: int) -> list[dict]:
    """ORT CPU (fp32 graphs, 2 threads, spinning off) vs PyTorch CPU eager fp32, per network and latent:
    parity first (max abs difference), then the median of `rounds` timed calls of each, interleaved
    so that both see the same background load."""
    import statistics

    from supir_rt.backends.modules import NETWORK_MODULES
    from supir_rt.backends.onnx_export import export_all
    from supir_rt.backends.onnxruntime_backend import open_onnxruntime_engines
    from supir_rt.backends.torch_backend import TorchEngine
    from supir_rt.model.supir import initialise_random, build_model

    torch.manual_seed(0)
    model = build_model(config, device="meta")
    for attr in sorted({NEEDS[n] for n in networks}):
        setattr(model, attr, getattr(model, attr).to_empty(device="cpu"))
        initialise_random(getattr(model, attr))
    export_all(model, out, networks=networks, reuse=True, source={"kind": "random-init", "seed": 0})
    specs = network_specs(config)
    rows = []
    for name in networks:
        ref = TorchEngine(NETWORK_MODULES[name](model), specs[name], "cpu", torch.float32)
        ort = open_onnxruntime_engines(config=config, artifact_dir=out, networks=[name])[name]
        for h, w in latents if name != "text_encoders" else latents[:1]:
            feed = specs[name].sample_inputs({"B": 1, "h": h, "w": w}, generator=torch.Generator().manual_seed(0))
            want = {k: v.clone() for k, v in ref.infer(feed).items()}
            got = ort.infer(feed)
            err = max(float((got[k] - want[k]).abs().max()) for k in want)
            times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
            for _ in range(rounds):
                for label, engine in (("torch", ref), ("onnxruntime", ort)):
                    t = time.perf_counter()
                    engine.infer(feed)
                    times[label].append(time.perf_counter() - t)
            row = {"config": config.name, "network": name, "latent": [h, w] if name != "text_encoders" else None,
                   "batch": 2 if name == "unet_adaptor" else 1, "max_abs_diff": err, "rounds": rounds,
                   **{f"{k}_ms": round(1000 * statistics.median(v), 1) for k, v in times.items()},
                   "load": os.getloadavg()[0]}
            row["speedup"] = round(row["torch_ms"] / row["onnxruntime_ms"], 2)
            log.info("%s", row)
            rows.append(row)
        ort.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    p.add_argument("--run-ort", action="store_true", help="time one ORT call per exported graph instead")
    p.add_argument("--latent", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    p.add_argument("--compare", choices=("tiny", "official"),
                   help="time ORT CPU vs PyTorch CPU (fp32) per network for this configuration instead")
    p.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="square latent sides for --compare")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--record", type=Path, help="append the JSON record to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        config = ModelConfig.tiny() if args.compare == "tiny" else ModelConfig.official()
        rec = {"compare": compare_cpu(config, args.out, args.networks, [(n, n) for n in args.latents], args.rounds),
               "torch_threads": torch.get_num_threads(), "ort_threads": 2}
    elif args.run_ort:
        rec = {"run_ort": run_ort(args.out, args.precision, args.networks,
                                  {"B": 1, "h": args.latent[0], "w": args.latent[1]})}
    else:
        rec = {"export": export_full(args.out, args.precision, args.networks)}
    rec["machine"] = {"cpus": len(os.sched_getaffinity(0)), "load": os.getloadavg()}
    print(json.dumps(rec, indent=2))
    if args.record:
        with open(args.record, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
