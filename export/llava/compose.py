"""Build one ONNX graph from many small ones, streaming their weights into one external-data file.

``trace_template`` exports a torch module with ``export_params=False``: its parameters become graph
inputs, so the traced graph holds no weights and one template serves every decoder layer.
``fill`` turns those inputs into initializers holding a given layer's weights, ``quantize`` replaces
its MatMuls by ORT's block-wise ``MatMulNBits`` (int4 / int8), and ``Composer.add`` appends the
result to the composite graph under a name prefix, writing each initializer's bytes to the shared
``.data`` file at once. Peak memory is therefore about one layer, whatever the model size.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import ModelProto, TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

OPSET = 17
ALIGN = 4096  # page-aligned external data lets ORT memory-map it


def trace_template(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> ModelProto:
    """TorchScript-export ``module`` with its parameters/buffers as extra graph inputs (no weights)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            export_params=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
            opset_version=OPSET,
        )
    return onnx.load_from_string(buf.getvalue())


def fill(template: ModelProto, weights: Mapping[str, np.ndarray]) -> ModelProto:
    """A copy of ``template`` whose weight inputs are initializers with the given values."""
    model = ModelProto()
    model.CopyFrom(template)
    graph = model.graph
    keep = [i for i in graph.input if i.name not in weights]
    missing = set(weights) - {i.name for i in graph.input}
    if missing:
        raise ValueError(f"weights {sorted(missing)} are not inputs of the traced graph (merged or folded by the exporter)")
    del graph.input[:]
    graph.input.extend(keep)
    for name, array in weights.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return model


def quantize(model: ModelProto, bits: int, block_size: int, accuracy_level: int | None) -> ModelProto:
    """Replace every MatMul with a constant weight by a symmetric block-wise ``MatMulNBits``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)
    try:
        q = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level
        )
        q.process()
    finally:
        quant_logger.setLevel(level)
    return q.model.model


def to_fp16_weights(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()}


class Composer:
    """Accumulates sub-graphs into one model; initializers go to ``<onnx name>.data`` as they arrive."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data_name = self.path.name + ".data"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data = open(self.path.parent / self.data_name, "wb")
        self._offset = 0
        self.graph = onnx.GraphProto(name=self.path.stem)
        self.opsets: dict[str, int] = {}
        self.ir_version = 8

    def _externalize(self, tensor: TensorProto) -> None:
        if not tensor.HasField("raw_data"):
            array = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        raw = tensor.raw_data
        if len(raw) < 1024:  # small constants stay inline
            return
        pad = (-self._offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(raw)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(self._offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += len(raw)

    def add_initializer(self, name: str, array: np.ndarray) -> None:
        """A constant shared by several sub-graphs (wired to ``name``)."""
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self._externalize(tensor)
        self.graph.initializer.append(tensor)

    def add(self, model: ModelProto, prefix: str, wiring: Mapping[str, str]) -> None:
        """Append ``model``; its graph inputs/outputs are renamed by ``wiring``, all else is prefixed."""
        graph = model.graph
        for value in list(graph.input) + list(graph.output):
            if value.name not in wiring:
                raise ValueError(f"{prefix}: graph input/output {value.name!r} is not wired")

        def name(n: str) -> str:
            if not n:
                return n
            return wiring.get(n, prefix + n)

        for tensor in graph.initializer:
            t = TensorProto()
            t.CopyFrom(tensor)
            t.name = name(tensor.name)
            self._externalize(t)
            self.graph.initializer.append(t)
        for node in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"{prefix}: node {node.name} has a subgraph; not supported by the composer")
            n = self.graph.node.add()
            n.CopyFrom(node)
            n.name = prefix + (node.name or node.op_type)
            del n.input[:]
            n.input.extend(name(i) for i in node.input)
            del n.output[:]
            n.output.extend(name(o) for o in node.output)
        self.ir_version = max(self.ir_version, model.ir_version)
        for opset in model.opset_import:
            self.opsets[opset.domain] = max(self.opsets.get(opset.domain, 0), opset.version)

    def finish(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto]) -> Path:
        self._data.close()
        self.graph.input.extend(inputs)
        self.graph.output.extend(outputs)
        model = helper.make_model(
            self.graph,
            opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(self.opsets.items())],
            producer_name="supir-rt export_llava",
        )
        model.ir_version = self.ir_version
        onnx.save_model(model, str(self.path))
        return self.path
