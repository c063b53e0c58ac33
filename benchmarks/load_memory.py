"""Peak memory of loading full-size official checkpoints into an fp16 model (a measurement, not a test).

Writes real-size files in the official layout with random-ish values (an SDXL single-file
`.safetensors` in fp16 and a SUPIR `.ckpt` in fp32, the formats users download), then, in a fresh
process, builds the official model in fp16 and loads both with `supir_rt.load_checkpoints`,
sampling anonymous RSS (the memory the process really owns; file-backed pages from mmap can be
dropped by the kernel) every 50 ms and reading the kernel's peak RSS (VmHWM, which includes mapped
file pages) at the end.

    python benchmarks/load_memory.py --dir /tmp/supir-full   # ~12.2 GB of disk, ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from supir_rt.config import ModelConfig
from supir_rt.model.supir import build_model
from supir_rt.weights import SUPIR_KEY_PREFIXES

_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32"}


def write_safetensors_streaming(shapes: dict[str, tuple[int, ...]], path: Path, dtype: torch.dtype) -> None:
    """Write a .safetensors file tensor by tensor (never the whole dict in memory)."""
    header, offset = {}, 0
    itemsize = torch.tensor([], dtype=dtype).element_size()
    for key, shape in shapes.items():
        n = itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for shape in shapes.values():
            f.write((torch.randn(shape, generator=g) * 0.02).to(dtype).numpy().tobytes())


def write_files(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    meta = build_model(ModelConfig.official(), device="meta")
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    sdxl_path, supir_path = directory / "sd_xl_base_1.0_0.9vae.safetensors", directory / "SUPIR-v0Q.ckpt"
    if not sdxl_path.exists():
        write_safetensors_streaming({k: s for k, s in shapes.items() if not k.startswith(SUPIR_KEY_PREFIXES)},
                                    sdxl_path, torch.float16)
    if not supir_path.exists():
        g = torch.Generator().manual_seed(1)
        sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items() if k.startswith(SUPIR_KEY_PREFIXES)}
        sd["model.control_model.mask_LQ"] = torch.zeros(1, 4, 64, 64)
        torch.save(sd, supir_path)
    return sdxl_path, supir_path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(sdxl: Path, supir: Path) -> dict:
    from supir_rt.weights import load_checkpoints

    peak_anon, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    model = build_model(ModelConfig.official(), dtype=torch.float16, init=False)
    t1 = time.perf_counter()
    load_checkpoints(model, sdxl=sdxl, supir=supir)
    t2 = time.perf_counter()
    done.set()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model_fp16_bytes": params, "peak_rss_anon_bytes": peak_anon[0], "peak_rss_vmhwm_bytes": _status("VmHWM"),
            "build_s": round(t1 - t0, 1), "load_s": round(t2 - t1, 1),
            "sdxl_file_bytes": sdxl.stat().st_size, "supir_file_bytes": supir.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/supir-full"))
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sdxl, supir = args.dir / "sd_xl_base_1.0_0.9vae.safetensors", args.dir / "SUPIR-v0Q.ckpt"
    if args.measure_only:
        print(json.dumps(measure(sdxl, supir)))
        return
    write_files(args.dir)
    # a fresh process, so that writing the files does not count
    out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--measure-only"], check=True,
                         capture_output=True, text=True, env=dict(os.environ))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    gib = {k: (f"{v / 2**30:.2f} GiB" if k.endswith("bytes") else v) for k, v in result.items()}
    print(json.dumps(gib, indent=2))


if __name__ == "__main__":
    main()
