"""Throughput and latency of `supir-rt serve` (Ray Serve) versus concurrency, replicas and batching.

    python benchmarks/serve_throughput.py                      # tiny model: replicas 1,2 x batching off,on x concurrency 1,4,16
    python benchmarks/serve_throughput.py --replicas 1 --concurrency 4 --requests 16 --json out.json

A local Ray instance on 127.0.0.1 (stopped at the end). For each setting the application is deployed,
warmed up with one request per replica, then ``--requests`` requests are sent by ``concurrency`` client
threads (a closed loop: each client sends its next request when the previous answer arrives). Reported:
images per minute (requests / wall time), p50 and p95 latency seen by the client, and the largest batch
a replica ran. All requests use the same settings and image size, so batching can group any of them;
seeds differ per request. Every answer is checked to be a 200 PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import requests
from PIL import Image


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def image_bytes(size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def run_load(url: str, image: bytes, settings: dict, concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    batches: list[int] = []
    counter = iter(range(total))

    def client() -> None:
        for i in counter:
            t0 = time.perf_counter()
            r = requests.post(f"{url}/v1/restore", files={"image": ("in.png", image)},
                              data={"settings": json.dumps({**settings, "seed": i})}, timeout=600)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200 or not r.content.startswith(b"\x89PNG"):
                raise RuntimeError(f"request {i}: {r.status_code} {r.text[:200]}")
            batches.append(int(r.headers["x-supir-batch-size"]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    return {"images_per_min": 60 * total / wall, "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "mean_s": statistics.fmean(latencies), "max_batch": max(batches), "wall_s": wall, "requests": total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--batching", default="off,on", help="off = max_batch_size 1, on = --max-batch-size")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--min-size", type=int, default=128)
    p.add_argument("--size", default="48x40", help="input image WxH")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPU share per replica (0 = CPU; 0.5 puts 2 replicas on one GPU)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from supir_rt.serve.ray_app import APP_NAME, build_app

    w, h = (int(v) for v in args.size.split("x"))
    image = image_bytes((w, h))
    settings = {"num_steps": args.steps, "min_size": args.min_size}
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    rows = []
    ray.init(num_cpus=args.num_cpus, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas in [int(v) for v in args.replicas.split(",")]:
            for batching in args.batching.split(","):
                batch = args.max_batch_size if batching == "on" else 1
                app_args = {"tiny_random": True, "replicas": replicas, "cpus_per_replica": args.num_cpus / replicas / 2,
                            "gpus_per_replica": args.gpus_per_replica,
                            "max_batch_size": batch, "max_ongoing_requests": max(batch, 4), "max_queued_requests": 64}
                serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
                for _ in range(replicas * 2):  # warm-up: first calls of each replica
                    requests.post(f"{url}/v1/restore", files={"image": ("in.png", image)},
                                  data={"settings": json.dumps(settings)}, timeout=600).raise_for_status()
                for concurrency in [int(v) for v in args.concurrency.split(",")]:
                    row = {"replicas": replicas, "batching": batching, "max_batch_size": batch,
                           "concurrency": concurrency, **run_load(url, image, settings, concurrency, args.requests)}
                    rows.append(row)
                    print(f"replicas {replicas}  batching {batching:3}  concurrency {concurrency:2}: "
                          f"{row['images_per_min']:6.1f} images/min  p50 {row['p50_s']:.2f} s  p95 {row['p95_s']:.2f} s  "
                          f"max batch {row['max_batch']}", flush=True)
                serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "command": " ".join(sys.argv),
            "settings": settings, "image": args.size}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
