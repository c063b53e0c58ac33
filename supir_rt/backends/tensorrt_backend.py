"""The TensorRT backend: an Engine over a serialized TensorRT plan, torch CUDA tensors as bindings.

Plans are built by ``python export/build_engines.py --trt`` (export/build_trt.py) and found by name:
``<network>_<precision>_<profile>_sm<cc>_trt<version>.plan``; the manifest beside each must match the
spec, config, precision, TensorRT version and this GPU's compute capability. `tensorrt` is imported
lazily: without it (or without a GPU) the backend is registered but unavailable, with the reason.

Per call: inputs are bound in place when they are contiguous CUDA tensors of the spec dtype (copied
otherwise), input shapes are set on the context, outputs go to torch tensors this engine owns
(reused while shapes stay the same, valid until the next `infer`), and the plan runs on torch's
current stream, so ordering with torch work needs no extra synchronisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from supir_rt.backends import EngineBase, register_backend
from supir_rt.backends.manifest import check_manifest, plan_name
from supir_rt.backends.specs import DEFAULT_RANGES, NETWORKS, DimRange, NetworkSpec, network_specs
from supir_rt.config import ModelConfig


def _tensorrt_unavailable() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"tensorrt cannot be imported ({err})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


class TrtEngine(EngineBase):
    backend = "tensorrt"

    def __init__(self, plan: Path, spec: NetworkSpec, *, validate: bool = True) -> None:
        import tensorrt as trt

        super().__init__(spec, torch.device("cuda", torch.cuda.current_device()), validate=validate)
        self.path = Path(plan)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.path} (built with another version or GPU?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        want = self.spec.input_names + self.spec.output_names
        if sorted(names) != sorted(want):
            raise RuntimeError(f"{self.path}: plan tensors {names} differ from the {spec.name} spec {want}")
        self.context = self.engine.create_execution_context()

    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dims = self.spec.infer_dims(feed)
        staged = self._staged_inputs(feed)  # converted inputs must outlive the run (we synchronise before returning)
        for s, t in staged:
            self.context.set_input_shape(s.name, tuple(t.shape))
            self.context.set_tensor_address(s.name, t.data_ptr())
        outputs = self._output_buffers(dims)
        for name, buf in outputs.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed for shapes "
                               f"{ {n: tuple(t.shape) for n, t in feed.items()} }")
        stream.synchronize()
        return outputs

    def close(self) -> None:
        self.context = self.engine = self._runtime = None
        super().close()


def open_tensorrt_engines(*, config: ModelConfig, artifact_dir: str | Path, precision: str = "fp16",
                          ranges: Mapping[str, DimRange] = DEFAULT_RANGES, validate: bool = True,
                          networks=None, verify_hash: bool = True, **_: object) -> dict[str, TrtEngine]:
    """Engines for `networks` (default all) from the plans in `artifact_dir` built for this GPU."""
    import tensorrt as trt

    specs = network_specs(config)
    cc = torch.cuda.get_device_capability()
    engines: dict[str, TrtEngine] = {}
    try:
        for name in networks or NETWORKS:
            plan = Path(artifact_dir) / plan_name(name, precision, ranges, cc, trt.__version__)
            check_manifest(plan, spec=specs[name], config=config, precision=precision, kind="tensorrt",
                           verify_hash=verify_hash,
                           extra={"tensorrt": trt.__version__, "compute_capability": f"{cc[0]}.{cc[1]}"})
            engines[name] = TrtEngine(plan, specs[name], validate=validate)
    except BaseException:
        for e in engines.values():
            e.close()
        raise
    return engines


register_backend("tensorrt", _tensorrt_unavailable, open_tensorrt_engines)
