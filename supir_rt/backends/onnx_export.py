"""Export the reference networks to ONNX, one graph per `NetworkSpec`, each with a manifest.

Names, dynamic axes and tracing inputs all come from `specs.py`; the traced modules are
the same positional wrappers the PyTorch backend runs (`modules.py`), so both backends compute the
same thing. Choices, by measurement on a 2-core CPU machine:
* exporter: TorchScript (`dynamo=False`), 13x faster than the dynamo exporter on an SDXL-like UNet
  with the same accuracy; `exporter="dynamo"` is kept for torch versions that drop it;
* precision: ``fp32`` graphs for CPUs; ``fp16`` graphs for GPUs, where the UNet+adaptor and the text
  encoders compute in fp16 and **the VAE networks stay fp32** (the SDXL VAE overflows in fp16);
  graph inputs and outputs are fp32 in both, as the spec says (casts sit inside the graph);
* files above 2 GB keep their weights in one ``<name>.onnx.data`` file beside the graph;
* clean-up: the exporter's constant folding, then ONNX shape inference; optionally ONNX Runtime's
  offline optimiser at the provider-independent "basic" level.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from supir_rt.backends.manifest import (
    PRECISIONS, ArtifactError, Manifest, check_manifest, config_fingerprint, file_sha256, manifest_path,
    onnx_name, spec_to_json, tensors_sha256,
)
from supir_rt.backends.modules import NETWORK_MODULES
from supir_rt.backends.specs import NETWORKS, NetworkSpec, network_specs
from supir_rt.model.supir import SUPIRModel

log = logging.getLogger(__name__)

OPSET = 17
Exporter = Literal["torchscript", "dynamo"]
# Networks that compute in fp32 whatever the precision asked for: the SDXL VAE overflows in fp16.
FP32_ALWAYS = frozenset({"dr_encoder", "vae_encoder", "vae_decoder"})
# Symbol values of the tracing inputs: small, non-square, batch 1 (CFG batch 2).
TRACE_DIMS = {"B": 1, "h": 8, "w": 16}
_ONNX_DTYPES = {torch.float32: 1, torch.int64: 7, torch.float16: 10}  # onnx.TensorProto elem types


def compute_dtype(network: str, precision: str) -> torch.dtype:
    """The dtype a network's weights and arithmetic use in an artifact of this precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    return torch.float32 if precision == "fp32" or network in FP32_ALWAYS else torch.float16


class Fp32IO(nn.Module):
    """Graph I/O stays fp32 (the spec's dtype) around a network computing in another float dtype."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, *args: torch.Tensor):
        args = tuple(a.to(self.dtype) if a.is_floating_point() and a.dtype != self.dtype else a for a in args)
        out = self.inner(*args)
        if self.dtype == torch.float32:
            return out
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def export_module(model: SUPIRModel, network: str, precision: str) -> nn.Module:
    """The positional module for `network`, in the precision's compute dtype, fp32 at its I/O.

    The model is never modified: a network whose weights are in another dtype is copied and cast.
    """
    module = NETWORK_MODULES[network](model).eval()
    dtype = compute_dtype(network, precision)
    if next(module.parameters()).dtype != dtype:
        module = copy.deepcopy(module).to(dtype)
    return Fp32IO(module, dtype).eval()


def export_all(
    model: SUPIRModel, out_dir: str | Path, *, precision: str = "fp32", networks: Sequence[str] | None = None,
    progress: bool = True, source: Mapping[str, Any] | None = None, exporter: Exporter = "torchscript",
    optimize: bool = False, reuse: bool = False, trace_dims: Mapping[str, int] = TRACE_DIMS,
) -> Path:
    """Export `networks` (default: all five) of `model` to `out_dir`; returns `out_dir`.

    `source` describes where the weights came from (recorded in the manifests; default: an in-memory
    model). With `reuse=True` a network whose artifact already matches this model (config, spec,
    precision, weights hash, file hashes) is not exported again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = network_specs(model.config)
    names = list(NETWORKS if networks is None else networks)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown networks {unknown}; choose from {list(NETWORKS)}")
    bar = _progress(names, progress)
    for name in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(f"export {name}")
        export_network(model, name, out_dir, precision=precision, source=source, exporter=exporter,
                       optimize=optimize, reuse=reuse, trace_dims=trace_dims, spec=specs[name])
    return out_dir


def export_network(
    model: SUPIRModel, network: str, out_dir: Path, *, precision: str = "fp32",
    source: Mapping[str, Any] | None = None, exporter: Exporter = "torchscript", optimize: bool = False,
    reuse: bool = False, trace_dims: Mapping[str, int] = TRACE_DIMS, spec: NetworkSpec | None = None,
) -> Path:
    """Export one network; writes ``<network>_<precision>.onnx`` (+ ``.onnx.data``) and its manifest."""
    spec = spec or network_specs(model.config)[network]
    module = export_module(model, network, precision)
    weights = tensors_sha256(module.state_dict().items())
    target = Path(out_dir) / onnx_name(network, precision)
    if reuse and _matches(target, spec, model, precision, weights):
        log.info("%s: up to date, not exported again", target)
        return target
    for stale in (target, manifest_path(target), target.with_name(target.name + ".data")):
        stale.unlink(missing_ok=True)

    feed = spec.sample_inputs(trace_dims, generator=torch.Generator().manual_seed(0))
    args = tuple(feed[n] for n in spec.input_names)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{network}_") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _trace_to_onnx(module, args, raw, spec, exporter)
        t1 = time.perf_counter()
        cleaned = Path(tmp) / "clean.onnx"
        _clean_up(raw, cleaned, optimize=optimize)
        _move_graph(cleaned, target, spec)
    del module
    check_graph_io(target, spec)
    files = [target] + ([target.with_name(target.name + ".data")]
                        if target.with_name(target.name + ".data").exists() else [])
    import onnx

    man = Manifest(
        network=network, kind="onnx", precision=precision, config_name=model.config.name,
        config_fingerprint=config_fingerprint(model.config), spec=spec_to_json(spec),
        files={f.name: file_sha256(f) for f in files}, weights_sha256=weights,
        source=dict(source or {"kind": "in-memory model"}),
        tools={"torch": torch.__version__, "onnx": onnx.__version__, "exporter": exporter, **_ort_version()},
        build={"opset": OPSET, "compute_dtype": str(compute_dtype(network, precision)).removeprefix("torch."),
               "io_dtype": "float32", "optimized": optimize, "trace_dims": dict(trace_dims),
               "export_s": round(t1 - t0, 1), "total_s": round(time.perf_counter() - t0, 1)},
    )
    man.write(manifest_path(target))
    log.info("%s: exported in %.1f s (%s)", target, time.perf_counter() - t0,
             ", ".join(f"{f.name} {f.stat().st_size / 2**20:.1f} MiB" for f in files))
    return target


def _matches(target: Path, spec: NetworkSpec, model: SUPIRModel, precision: str, weights: str) -> bool:
    try:
        man = check_manifest(target, spec=spec, config=model.config, precision=precision)
    except ArtifactError:
        return False
    return man.weights_sha256 == weights


def _trace_to_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, spec: NetworkSpec,
                   exporter: Exporter) -> None:
    kwargs: dict[str, Any] = dict(input_names=spec.input_names, output_names=spec.output_names,
                                  dynamic_axes=spec.dynamic_axes(), opset_version=OPSET)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        # Known and harmless here: a strided Slice is left unfolded (still correct, just not folded), and
        # advanced indexing only ever sees non-negative indices (the argmax that picks CLIP's EOT).
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")  # its logging set-up
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), dynamo=False, do_constant_folding=True, **kwargs)
        elif exporter == "dynamo":
            prog = torch.onnx.export(module, args, dynamo=True, external_data=True, **kwargs)
            prog.save(str(path), external_data=True)
        else:
            raise ValueError(f"exporter {exporter!r}: choose 'torchscript' or 'dynamo'")


def _clean_up(src: Path, dst: Path, *, optimize: bool) -> None:
    """ONNX shape inference (file to file, works above 2 GB); optionally ORT's basic offline passes."""
    import onnx

    onnx.shape_inference.infer_shapes_path(str(src), str(dst))
    if optimize:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opt = dst.with_name("opt.onnx")
        so.optimized_model_filepath = str(opt)
        if _has_external_data(dst):
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
        opt.replace(dst)


def _has_external_data(path: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def _move_graph(src: Path, target: Path, spec: NetworkSpec) -> None:
    """Write the graph to `target` with the spec's I/O shapes declared; any external weights (the
    exporter writes one file per tensor above 2 GB) are streamed, one tensor at a time, into a single
    ``<target>.data``."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    _declare_io(model.graph, spec)
    external = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not external:
        onnx.save_model(model, str(target))
        return
    data = target.with_name(target.name + ".data")
    offset = 0
    with open(data, "wb") as out:
        for t in external:
            info = {e.key: e.value for e in t.external_data}
            with open(src.parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                blob = f.read(int(info["length"])) if "length" in info else f.read()
            pad = -offset % 4096  # page-aligned so ONNX Runtime can memory-map the weights
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
            offset += len(blob)
    onnx.save_model(model, str(target))


def _declare_io(graph, spec: NetworkSpec) -> None:
    """Graph inputs/outputs carry exactly the spec's dims: fixed sizes as values, symbols by name
    (the tracer leaves some fixed output sizes symbolic, e.g. channels after a cast)."""
    for values, tensors in ((graph.input, spec.inputs), (graph.output, spec.outputs)):
        for v, t in zip(values, tensors):
            if v.name != t.name or len(v.type.tensor_type.shape.dim) != len(t.shape):
                continue  # reported by check_graph_io
            for d, want in zip(v.type.tensor_type.shape.dim, t.shape):
                if isinstance(want, int):
                    d.dim_value = want
                else:
                    d.dim_param = want


def _all_tensors(model) -> Iterable:
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def check_graph_io(path: Path, spec: NetworkSpec) -> None:
    """The graph's input/output names, element types and (symbolic) dims are exactly the spec's."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    problems = []
    for kind, values, tensors in (("input", graph.input, spec.inputs), ("output", graph.output, spec.outputs)):
        if [v.name for v in values] != [t.name for t in tensors]:
            problems.append(f"{kind} names {[v.name for v in values]}, spec {[t.name for t in tensors]}")
            continue
        for v, t in zip(values, tensors):
            tt = v.type.tensor_type
            dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in tt.shape.dim)
            if tt.elem_type != _ONNX_DTYPES[t.dtype] or dims != tuple(t.shape):
                problems.append(f"{kind} {v.name}: elem_type {tt.elem_type} dims {dims}, spec {t.dtype} {t.shape}")
    if problems:
        raise ArtifactError(f"{path}: exported graph does not match the {spec.name} spec: " + "; ".join(problems))


def _ort_version() -> dict[str, str]:
    try:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}
    except ImportError:
        return {}


def _progress(items: list[str], enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="network")
