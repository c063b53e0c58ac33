"""The PyTorch CUDA path measured on one GPU: one phase per call, one table at the end.

Run through ``bash benchmarks/gpu_check.sh`` (which time-boxes each phase); by hand:

    python benchmarks/cuda_check.py --phase step --out DIR [--dry-run | --fake-cuda] [--budget 60]
    python benchmarks/cuda_check.py --table DIR [--dry-run | --fake-cuda]

Phases (each writes ``DIR/<phase>.json`` after every row, so a phase cut short keeps what it finished):
* ``step``      one CFG step at 1024² (the ``unet_adaptor`` call on the CFG pair, batch 2, plus the
                denoiser arithmetic around it), eager fp16, channels-last and contiguous;
* ``compiled``  the same step with ``torch.compile`` (inductor, the backend's default mode): the first
                call (the compilation) is a row of its own, written as soon as it returns, then the
                timed compiled step, then the compiled call replayed from a CUDA graph;
* ``vae``       VAE encoder and decoder at 1024², bf16 and fp32 (eager);
* ``restore``   a whole 50-step 1024² restore, eager fp16 with the memory plan (VAE and text encoders
                offloaded); ``restore-compiled`` the same with compile + CUDA graphs.

Weights are random (the official architecture, PyTorch's default init): latency and memory do not
depend on their values. FLOPs per call are counted with ``FlopCounterMode`` on meta tensors; the
fraction of the card's dense fp16 peak is FLOPs / time / peak. ``--dry-run``: the tiny configuration
on the CPU at latent 16x16, 2 steps, compile with dynamo's "eager" backend: checks the script end to
end without a GPU (numbers meaningless). ``--fake-cuda`` (with the CUDA build of PyTorch, no GPU): the
same tiny run on the fake CUDA device of ``tests/fake_cuda`` (every CUDA path of the phases traced, the
device checks of that layer on; no timing: the table says "fake"), so CI proves the script itself runs.

Memory per row: peak allocated and peak reserved by PyTorch, and what the driver reports in use after
the row (``mem_get_info``: other processes and the CUDA context, about 0.5 GiB, included); the 12 GB
verdict is on the driver's figure, which is what a 12 GB card must hold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from supir_rt import cuda_runtime  # noqa: E402
from supir_rt.backends import open_engines  # noqa: E402
from supir_rt.backends.modules import NETWORK_MODULES  # noqa: E402
from supir_rt.backends.placement import NETWORK_PARTS, MemoryPlan, build_placed_model  # noqa: E402
from supir_rt.backends.specs import network_specs  # noqa: E402
from supir_rt.backends.torch_backend import TorchOptions  # noqa: E402
from supir_rt.config import ModelConfig  # noqa: E402

PHASES = ("step", "compiled", "vae", "restore", "restore-compiled")
CFG_STEP_TFLOP_ANCHOR = 20.28  # one CFG step at 1024², counted on the official SUPIR modules
VRAM_TARGET_GIB = 12.0 * 1e9 / 2**30  # "12 GB"
ROW_ORDER = (
    "CFG step, eager fp16 (channels-last)", "CFG step, eager fp8 weights", "CFG step, eager fp16 (contiguous)",
    "CFG step, compile (first call)", "CFG step, compiled",
    "CFG step, compiled + CUDA graphs", "VAE encode, bf16", "VAE encode, fp32", "VAE decode, bf16",
    "VAE decode, fp32", "restore, eager fp16, offload", "restore, compiled + CUDA graphs, offload",
)


class Setup:
    def __init__(self, dry_run: bool, fake: bool = False) -> None:
        self.dry_run, self.fake = dry_run, fake
        small = dry_run or fake
        self.config = ModelConfig.tiny() if small else ModelConfig.official()
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.latent = 16 if small else 128  # 1024 px
        self.steps = 2 if small else 50
        self.warmup, self.rounds = (1, 1) if fake else (1, 2) if dry_run else (3, 10)
        self.compile_backend = "eager" if small else "inductor"

    def plan(self, **kw) -> MemoryPlan:
        if self.dry_run:
            kw.setdefault("diffusion_dtype", torch.bfloat16)  # exercise the dtype split on the CPU too
        return MemoryPlan.for_device(self.device, **kw)


class Results:
    """Rows of one phase, rewritten to disk after every row."""

    def __init__(self, path: Path, setup: Setup) -> None:
        self.path, self.rows = path, []
        self.meta = {"device": _device_name(setup.device), "torch": torch.__version__, "dry_run": setup.dry_run,
                     "fake_cuda": setup.fake, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        self.save()

    def add(self, **row) -> None:
        self.rows.append(row)
        self.save()
        print(json.dumps(row), flush=True)

    def save(self) -> None:
        self.path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))


def _device_name(device: torch.device) -> str:
    return cuda_runtime.device_name(device) if device.type == "cuda" else "CPU (dry run)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        cuda_runtime.synchronize(device)


@contextlib.contextmanager
def _peak(device: torch.device, out: dict):
    """Peak allocated / reserved by PyTorch over the block, and what the driver sees in use at its end
    (PyTorch's cache, the CUDA context and any other process included)."""
    if device.type == "cuda":
        cuda_runtime.synchronize(device)
        cuda_runtime.reset_peak_memory(device)
    yield
    if device.type == "cuda":
        cuda_runtime.synchronize(device)
        allocated, reserved = cuda_runtime.peak_memory(device)
        free, total = cuda_runtime.mem_get_info(device)
        out.update(peak_gib=allocated / 2**30, reserved_gib=reserved / 2**30, driver_used_gib=(total - free) / 2**30)


def _time(fn, device: torch.device, warmup: int, rounds: int, deadline: float) -> dict:
    """First call (s), then the median of up to ``rounds`` timed calls (ms) after ``warmup`` calls."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        if times and time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"first_s": first, "ms": statistics.median(times), "rounds": len(times)}


def count_tflop(config: ModelConfig, network: str, dims: dict[str, int]) -> float:
    """FLOPs of one call on meta tensors (2 x MAC for conv / matmul / attention), in TFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    from supir_rt.model.supir import build_model

    model = build_model(config, device="meta")
    feed = {k: v.to("meta") for k, v in network_specs(config)[network].sample_inputs(dims).items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        NETWORK_MODULES[network](model)(*feed.values())
    return counter.get_total_flops() / 1e12


def _open(setup: Setup, networks: tuple[str, ...], plan: MemoryPlan, options: TorchOptions | None = None):
    """Only the parts these networks read are allocated (random init); the rest stays on meta."""
    from supir_rt.model.supir import SUPIRModel, initialise_random

    with torch.device("meta"):
        model = SUPIRModel(setup.config)
    torch.manual_seed(0)
    for part, (home, dtype) in plan.part_placements().items():
        if any(part in NETWORK_PARTS[n] for n in networks):
            module = model.get_submodule(part).to(dtype).to_empty(device=home)
            initialise_random(module)
    model.eval().requires_grad_(False)
    return open_engines("torch", model=model, plan=plan, options=options, networks=networks)


def _denoiser_step(setup: Setup, engine):
    """One step's denoiser call as the sampler makes it: CFG pair through the engine + arithmetic."""
    from supir_rt.denoiser import ControlScale, EpsDenoiser, GuidedDenoiser, LinearCFG
    from supir_rt.pipeline import engine_network
    from supir_rt.schedule import legacy_ddpm_sigmas

    spec = network_specs(setup.config)["unet_adaptor"]
    g = torch.Generator().manual_seed(0)
    feed = spec.sample_inputs({"B": 1, "h": setup.latent, "w": setup.latent}, generator=g, device=setup.device)
    cond = {"crossattn": feed["context"][:1], "vector": feed["vector"][:1], "control": feed["lq_latent"][:1]}
    table = legacy_ddpm_sigmas(setup.config.denoiser_config).to(setup.device)
    denoiser = GuidedDenoiser(EpsDenoiser(engine_network(engine), table), cond, cond, LinearCFG(1.0, 4.0),
                              ControlScale(1.0))
    x = feed["x_in"][:1].clone()
    sigma = torch.full((1,), 3.0, device=setup.device)
    return lambda: denoiser(x, sigma, sigma)


def phase_step(setup: Setup, res: Results, deadline: float) -> None:
    tflop = count_tflop(setup.config, "unet_adaptor", {"B": 1, "h": setup.latent, "w": setup.latent})
    for label, channels_last in (("channels-last", True), ("contiguous", False)):
        if time.monotonic() > deadline:
            return
        engines = _open(setup, ("unet_adaptor",), setup.plan(), TorchOptions(channels_last=channels_last))
        step = _denoiser_step(setup, engines["unet_adaptor"])
        row = {"row": f"CFG step, eager fp16 ({label})", "tflop": tflop, "precision": "fp16"}
        with _peak(setup.device, row):
            row.update(_time(step, setup.device, setup.warmup, setup.rounds, deadline))
        res.add(**row)
        if channels_last and time.monotonic() < deadline:
            _fp8_row(setup, res, deadline, engines["unet_adaptor"], step, tflop)
        del engines, step
        _release(setup.device)


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        cuda_runtime.empty_cache()


def _fp8_row(setup: Setup, res: Results, deadline: float, engine, step, tflop: float) -> None:
    """The same step with the UNet + adaptor weights stored in fp8 (e4m3, per-channel scale)."""
    from supir_rt.backends.fp8 import fp8_unsupported_reason, quantize_fp8_

    reason = fp8_unsupported_reason(setup.device)
    if reason:
        res.add(row="CFG step, eager fp8 weights", note=reason)
        return
    feed = network_specs(setup.config)["unet_adaptor"].sample_inputs(
        {"B": 1, "h": setup.latent, "w": setup.latent}, generator=torch.Generator().manual_seed(5), device=setup.device)
    ref = engine.infer(feed)["eps"].clone()
    quantize_fp8_(engine.module.inner.model)  # the resident ControlWrapper, in place
    if setup.device.type == "cuda":
        cuda_runtime.empty_cache()
    out = engine.infer(feed)["eps"]
    row = {"row": "CFG step, eager fp8 weights", "tflop": tflop, "precision": "fp8 storage, fp16 math",
           "rel_err": float((out - ref).float().norm() / ref.float().norm()), "ref": "fp16",
           "max_abs_err": float((out - ref).abs().max())}
    with _peak(setup.device, row):
        row.update(_time(step, setup.device, setup.warmup, setup.rounds, deadline))
    res.add(**row)


def phase_compiled(setup: Setup, res: Results, deadline: float) -> None:
    tflop = count_tflop(setup.config, "unet_adaptor", {"B": 1, "h": setup.latent, "w": setup.latent})
    options = TorchOptions(compile=True, compile_backend=setup.compile_backend, cuda_graphs=True)
    engines = _open(setup, ("unet_adaptor",), setup.plan(), options)
    engine = engines["unet_adaptor"]
    graphs, engine.graphs = engine.graphs, None  # first compiled alone, then with the graphs
    step = _denoiser_step(setup, engine)
    feed = network_specs(setup.config)["unet_adaptor"].sample_inputs(
        {"B": 1, "h": setup.latent, "w": setup.latent}, generator=torch.Generator().manual_seed(5), device=setup.device)
    eager = engine.module(*engine.conform_inputs(feed).values())[0].clone()  # the same network, not compiled

    def parity(row: dict) -> None:
        out = engine.infer(feed)["eps"]
        row.update(rel_err=float((out - eager).float().norm() / eager.float().norm()), ref="eager",
                   max_abs_err=float((out - eager).abs().max()))

    # the first call compiles (minutes for the official UNet): its own row, on disk before the timed calls
    first = {"row": "CFG step, compile (first call)", "tflop": tflop, "precision": "fp16", "mode": options.compile_mode}
    with _peak(setup.device, first):
        t0 = time.perf_counter()
        step()
        _sync(setup.device)
        first["first_s"] = time.perf_counter() - t0
    first["compile_failed"] = bool(getattr(engine.call, "failed", False))
    res.add(**first)
    if time.monotonic() > deadline:
        return
    row = {"row": "CFG step, compiled", "tflop": tflop, "precision": "fp16", "mode": options.compile_mode}
    with _peak(setup.device, row):
        row.update(_time(step, setup.device, setup.warmup, setup.rounds, deadline))
    row["first_s"] = first["first_s"]
    row["compile_failed"] = bool(getattr(engine.call, "failed", False))
    parity(row)
    res.add(**row)
    if time.monotonic() > deadline:
        return
    if graphs is None:  # no CUDA (dry run): the option warns and runs without graphs
        from supir_rt.backends.torch_backend import CUDAGraphCall

        graphs = CUDAGraphCall(engine.call, "unet_adaptor", engine.dtype, channels_last=engine.channels_last)
    engine.graphs = graphs
    row = {"row": "CFG step, compiled + CUDA graphs", "tflop": tflop, "precision": "fp16"}
    with _peak(setup.device, row):
        row.update(_time(step, setup.device, setup.warmup + 3, setup.rounds, deadline))
    row["graph_replays"], row["graph_failed"] = graphs.replays, graphs.failed
    parity(row)
    res.add(**row)


def phase_vae(setup: Setup, res: Results, deadline: float) -> None:
    specs = network_specs(setup.config)
    n = setup.latent
    for network, label, dims in (("vae_encoder", "encode", {"B": 1, "h": n, "w": n}),
                                 ("vae_decoder", "decode", {"B": 1, "h": n, "w": n})):
        tflop = count_tflop(setup.config, network, dims)
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            if time.monotonic() > deadline:
                return
            plan = setup.plan(vae_dtype=dtype, offload=False)
            engine = _open(setup, (network,), plan)[network]
            feed = specs[network].sample_inputs(dims, generator=torch.Generator().manual_seed(0), device=setup.device)
            row = {"row": f"VAE {label}, {name}", "tflop": tflop, "precision": name}
            with _peak(setup.device, row):
                row.update(_time(lambda: engine.infer(feed), setup.device, 1, 3, deadline))
            out = next(iter(engine.infer(feed).values()))
            row["finite"] = bool(torch.isfinite(out).all())
            res.add(**row)
            del engine
            _release(setup.device)


def _restore(setup: Setup, res: Results, deadline: float, *, compiled: bool) -> None:
    import numpy as np
    from PIL import Image

    import supir_rt.pipeline as pipeline_module
    from supir_rt.api import Restorer
    from supir_rt.restore_config import RestoreConfig

    plan = setup.plan()
    options = TorchOptions(compile=compiled, compile_backend=setup.compile_backend, cuda_graphs=compiled or None)
    torch.manual_seed(0)
    model = build_placed_model(setup.config, plan)
    restorer = Restorer(open_engines("torch", model=model, plan=plan, options=options), setup.config)
    size = setup.latent * 8
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    sampling = []
    real_sample = pipeline_module.sample

    def timed_sample(*args, **kwargs):
        _sync(setup.device)
        t0 = time.perf_counter()
        out = real_sample(*args, **kwargs)
        _sync(setup.device)
        sampling.append(time.perf_counter() - t0)
        return out

    pipeline_module.sample = timed_sample
    try:
        warm = RestoreConfig(num_steps=4, min_size=size, seed=1)  # compile, graph capture, cuDNN, allocator
        t0 = time.perf_counter()
        restorer.restore(image, warm)
        first = time.perf_counter() - t0
        if time.monotonic() > deadline:
            res.add(row=_restore_label(compiled), note=f"warm-up restore took {first:.0f} s; no time left")
            return
        row = {"row": _restore_label(compiled), "precision": "fp16 / VAE bf16 / text fp16", "steps": setup.steps,
               "first_s": first}
        with _peak(setup.device, row):
            t0 = time.perf_counter()
            restorer.restore(image, RestoreConfig(num_steps=setup.steps, min_size=size, seed=1))
            row["total_s"] = time.perf_counter() - t0
        row["ms"] = sampling[-1] / setup.steps * 1e3  # per step, sampling only
        row["tflop"] = count_tflop(setup.config, "unet_adaptor", {"B": 1, "h": setup.latent, "w": setup.latent})
        res.add(**row)
    finally:
        pipeline_module.sample = real_sample


def _restore_label(compiled: bool) -> str:
    return "restore, compiled + CUDA graphs, offload" if compiled else "restore, eager fp16, offload"


def phase_restore(setup: Setup, res: Results, deadline: float) -> None:
    _restore(setup, res, deadline, compiled=False)


def phase_restore_compiled(setup: Setup, res: Results, deadline: float) -> None:
    _restore(setup, res, deadline, compiled=True)


# -------------------------------------------------------------------------------------------- table


def table(out_dir: Path, dry_run: bool) -> str:
    from report import gpu_peak_tflops

    rows, meta, missing = {}, {}, []
    for phase in PHASES:
        path = out_dir / f"{phase}.json"
        if not path.exists():
            missing.append(phase)
            continue
        doc = json.loads(path.read_text())
        meta = meta or doc["meta"]
        for r in doc["rows"]:
            rows[r["row"]] = r
    device = meta.get("device", "?")
    fake = bool(meta.get("fake_cuda"))
    peak = None if fake else gpu_peak_tflops(device, "fp16")
    lines = [
        f"supir-rt PyTorch CUDA path: {device}, torch {meta.get('torch', '?')}, {meta.get('date', '?')}"
        + (" (DRY RUN: tiny model on the CPU, numbers meaningless)" if dry_run else "")
        + (" (FAKE CUDA: tiny model on the fake device of tests/fake_cuda, every path run, nothing timed)"
           if fake else ""),
        "",
        "| measurement (1024², batch 1) | ms | first call s | peak VRAM GiB (reserved; driver) | TFLOP/call | TFLOPS "
        "| % of fp16 peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in ROW_ORDER:
        r = rows.get(label)
        if r is None:
            lines.append(f"| {label} | not measured (phase cut short or skipped) | | | | | |")
            continue
        if "ms" not in r and "first_s" not in r:
            lines.append(f"| {label} | {r.get('note', 'no timing')} | | | | | |")
            continue
        ms, tflop = r.get("ms"), r.get("tflop")
        tflops = tflop / (ms / 1e3) if tflop and ms and not fake else None
        flags = [text for key, bad, text in (("compile_failed", True, "compile FAILED, eager fallback"),
                                             ("graph_failed", True, "graph capture FAILED"),
                                             ("finite", False, "NON-FINITE output")) if r.get(key) is bad]
        if "rel_err" in r:
            flags.append(f"eps vs {r.get('ref', 'fp16')}: rel. L2 {r['rel_err']:.2%}, max abs {r['max_abs_err']:.3g}")
        name = label + (f" ({', '.join(flags)})" if flags else "")
        if fake:
            timing = "fake" + (f"; whole restore, {r['steps']} steps" if "total_s" in r else "")
            first = "fake"
        else:
            timing = "" if ms is None else f"{ms:.1f}" + (
                f" per step; whole restore {r['total_s']:.2f} s, {r['steps']} steps" if "total_s" in r else "")
            first = f"{r.get('first_s', float('nan')):.1f}"
        mem = "n/a"
        if "peak_gib" in r:
            mem = f"{r['peak_gib']:.2f} ({r['reserved_gib']:.2f}" + (
                f"; {r['driver_used_gib']:.2f})" if "driver_used_gib" in r else ")")
        lines.append(" | ".join([
            f"| {name}", timing, first, mem, f"{tflop:.3g}" if tflop else "n/a", f"{tflops:.0f}" if tflops else "n/a",
            f"{100 * tflops / peak:.0f} %" if tflops and peak else "n/a",
        ]) + " |")
    lines.append("")
    lines.append(f"Dense fp16 tensor peak used: {peak or 'unknown for this device'} TFLOPS. FLOP floor of one CFG "
                 f"step at 1024²: {CFG_STEP_TFLOP_ANCHOR} TFLOP (= {CFG_STEP_TFLOP_ANCHOR / peak * 1e3:.1f} ms at peak)."
                 if peak else f"FLOP floor of one CFG step at 1024²: {CFG_STEP_TFLOP_ANCHOR} TFLOP.")
    lines.append("Targets: compiled CFG step >= 40 % of the fp16 peak; restore peak VRAM <= 12 GB "
                 f"({VRAM_TARGET_GIB:.2f} GiB), judged on what the driver reports in use (PyTorch's cache and the "
                 "CUDA context included). % of peak = TFLOP per call / time / peak (VAE rows: the fp32 rows "
                 "run at TF32 or fp32 rates, so their % is against a peak they cannot reach).")
    best = [r for k, r in rows.items() if k.startswith("CFG step, compiled") and "ms" in r]
    if best and peak:
        top = max(r["tflop"] / (r["ms"] / 1e3) / peak for r in best)
        lines.append(f"Compiled CFG step: {top:.0%} of the fp16 peak: target (40 %) {'MET' if top >= 0.4 else 'NOT met'}.")
    restored = [r for k, r in rows.items() if k.startswith("restore") and "peak_gib" in r]
    for r in restored:
        gb = r["peak_gib"] * 2**30 / 1e9
        text = f"{r['row']}: peak {gb:.1f} GB allocated ({r['reserved_gib'] * 2**30 / 1e9:.1f} GB reserved"
        used = gb
        if "driver_used_gib" in r:  # the figure a 12 GB card must hold
            used = r["driver_used_gib"] * 2**30 / 1e9
            text += f", {used:.1f} GB in use per the driver"
        verdict = "not judged (fake device: nothing measured)" if fake else "MET" if used <= 12 else "NOT met"
        lines.append(text + f"): target (12 GB) {verdict}.")
    if missing:
        lines.append(f"Phases with no result file: {', '.join(missing)}.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=PHASES)
    ap.add_argument("--table", type=Path, help="print the table of the results in this folder")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds this phase may spend before it stops adding rows")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script, not the GPU")
    ap.add_argument("--fake-cuda", action="store_true",
                    help="tiny model on the fake CUDA device of tests/fake_cuda (CUDA build of torch, no GPU)")
    args = ap.parse_args()
    if args.table:
        print(table(args.table, args.dry_run))  # a --fake-cuda run says so in its results' meta
        return 0
    if not args.phase or not args.out:
        ap.error("give --phase and --out, or --table")
    if args.fake_cuda and torch.version.cuda is None:
        print(f"cuda_check: --fake-cuda needs the CUDA build of PyTorch (this is {torch.__version__}); "
              "get one with: bash .ci/fake_cuda_env.sh", file=sys.stderr)
        return 2
    if not (args.dry_run or args.fake_cuda) and not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU here; use --dry-run or --fake-cuda to check the script on a CPU", file=sys.stderr)
        return 2
    fake = contextlib.nullcontext()
    if args.fake_cuda:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fake_cuda"))
        from fake_cuda import FakeCuda

        fake = FakeCuda(watch_loop=False)  # the phases read outputs between direct UNet calls (parity)
    with fake:
        setup = Setup(args.dry_run, fake=args.fake_cuda)
        args.out.mkdir(parents=True, exist_ok=True)
        res = Results(args.out / f"{args.phase}.json", setup)
        deadline = time.monotonic() + args.budget
        with torch.no_grad():
            globals()["phase_" + args.phase.replace("-", "_")](setup, res, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
