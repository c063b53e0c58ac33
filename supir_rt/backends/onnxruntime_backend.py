"""The ONNX Runtime backend: an Engine over an ORT session, with IO binding to torch tensors.

Inputs are bound by pointer to the torch tensors `EngineBase.conform_inputs` hands over (the caller's
own tensors when they are already contiguous, of the spec dtype and on the engine's device; a converted
copy otherwise), and outputs are written by ORT into torch tensors this engine allocates from the
spec's output shapes (reused while the shapes stay the same), so ORT makes no numpy copy on the way
in or out. As the protocol says, returned tensors belong to the engine until its next `infer`.

Providers: the CPU execution provider by default (2 intra-op threads, spinning off: measured best
on a 2-core machine, also when another process shares the cores); the CUDA and
TensorRT execution providers when onnxruntime-gpu and a GPU are present ("onnxruntime-cuda").
Artifacts are checked against their manifests before a session is created (`manifest.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from supir_rt.backends.base import EngineBase
from supir_rt.backends.registry import register_backend
from supir_rt.backends.manifest import PRECISIONS, check_manifest, onnx_name
from supir_rt.backends.specs import NETWORKS, NetworkSpec, network_specs
from supir_rt.config import ModelConfig

log = logging.getLogger(__name__)

CPU_PROVIDERS = ("CPUExecutionProvider",)
CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
DEFAULT_THREADS = 2
_NUMPY_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


def session_options(threads: int = DEFAULT_THREADS):
    """Intra-op threads `threads`, one inter-op thread, spinning off, all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OrtEngine(EngineBase):
    """One network over one `onnxruntime.InferenceSession`."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, spec: NetworkSpec, *, providers: Sequence[Any] = CPU_PROVIDERS,
                 threads: int = DEFAULT_THREADS, validate: bool = True) -> None:
        import onnxruntime as ort

        providers = list(providers)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        on_gpu = names[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        super().__init__(spec, torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu",
                         validate=validate)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=providers)
        self._check_session_io()
        self._ort_device = ("cuda", self.device.index or 0) if on_gpu else ("cpu", 0)

    def _check_session_io(self) -> None:
        got = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if got != (self.spec.input_names, self.spec.output_names):
            raise RuntimeError(f"{self.path}: session I/O {got} differs from the {self.spec.name} spec "
                               f"{(self.spec.input_names, self.spec.output_names)}")

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dims = self.spec.infer_dims(feed)
        binding = self.session.io_binding()
        for s in self.spec.inputs:  # conformed by infer(), which keeps any converted copy alive
            t = feed[s.name]
            binding.bind_input(s.name, *self._ort_device, _NUMPY_TYPES[s.dtype], tuple(t.shape), t.data_ptr())
        outputs = self._output_buffers(dims)
        for s in self.spec.outputs:
            buf = outputs[s.name]
            binding.bind_output(s.name, *self._ort_device, _NUMPY_TYPES[s.dtype], tuple(buf.shape), buf.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        self.session.run_with_iobinding(binding)
        return outputs

    def close(self) -> None:
        self.session = None
        super().close()


def open_onnxruntime_engines(
    *, config: ModelConfig, artifact_dir: str | Path, precision: str = "fp32", providers: Sequence[Any] | None = None,
    validate: bool = True, networks: Sequence[str] | None = None, threads: int = DEFAULT_THREADS,
    verify_hash: bool = True, **_: object,
) -> dict[str, OrtEngine]:
    """Engines for `networks` (default: all) from ``artifact_dir/<network>_<precision>.onnx``.

    Each artifact's manifest must match `config`'s spec and `precision` (see `check_manifest`);
    unknown keyword arguments (e.g. `model=` meant for the torch backend) are ignored.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: ONNX artifacts are built as {' or '.join(PRECISIONS)}")
    specs = network_specs(config)
    artifact_dir = Path(artifact_dir)
    providers = CPU_PROVIDERS if providers is None else providers
    engines: dict[str, OrtEngine] = {}
    try:
        for name in NETWORKS if networks is None else networks:
            path = artifact_dir / onnx_name(name, precision)
            check_manifest(path, spec=specs[name], config=config, precision=precision, verify_hash=verify_hash)
            engines[name] = OrtEngine(path, specs[name], providers=providers, threads=threads, validate=validate)
    except BaseException:
        for e in engines.values():
            e.close()
        raise
    return engines


def open_onnxruntime_cuda_engines(*, precision: str = "fp16", providers: Sequence[Any] | None = None,
                                  **kwargs: Any) -> dict[str, OrtEngine]:
    """The same over the CUDA execution provider (fp16 graphs by default)."""
    return open_onnxruntime_engines(precision=precision, providers=providers or CUDA_PROVIDERS, **kwargs)


def _ort_unavailable() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return f"onnxruntime is not installed ({err}); pip install 'supir-rt[onnx]'"
    return None


def _ort_cuda_unavailable() -> str | None:
    if (reason := _ort_unavailable()) is not None:
        return reason
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this onnxruntime has no CUDA execution provider (providers: {ort.get_available_providers()}); "
                "install onnxruntime-gpu")
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


register_backend("onnxruntime", _ort_unavailable, open_onnxruntime_engines)
register_backend("onnxruntime-cuda", _ort_cuda_unavailable, open_onnxruntime_cuda_engines)
