"""A fake CUDA device on a CPU machine: every CUDA path of supir-rt runs, with real numbers, and a
checker sees each operation's devices and dtypes.

Needs the CUDA build of PyTorch (it imports without a GPU). Inside `FakeCuda()`:

* a tensor "on" ``cuda:N`` is a `FakeCudaTensor`: a wrapper whose device is ``cuda:N`` and whose values
  live in an ordinary CPU tensor (``.elem``). Every aten operation goes through `FakeCuda`'s dispatch
  mode, which runs it on the CPU values and applies CUDA's device rules: an index-less ``"cuda"``
  means the current device (``cuda:0``), tensors of one operation must share a device (a 0-dim CPU
  tensor counts as a scalar, as on CUDA), ``.numpy()`` of a CUDA tensor fails, a copy to the host is a
  host read. Operations on two devices raise as CUDA does;
* the checker records every matmul / convolution / attention (op, device, dtypes; for attention the
  kernel CUDA's SDPA dispatcher would pick) and fails (raises, and records for the test's teardown)
  on mixed dtypes or devices there, and on any host read (``.item()``, ``.tolist()``, ``.cpu()``,
  ``bool(t)``) of a CUDA tensor while `FakeCuda.in_sampler_loop` is set: from the first
  ``unet_adaptor`` engine call until another network runs (the sampler loop);
* pinned host memory is emulated (``pin_memory()`` / ``is_pinned()``), and the functions of
  `supir_rt.cuda_runtime` are replaced: device count and capability, free / cached memory (a
  configurable device: `FakeDevice`), generators (a CPU generator per device), graph capture (a
  recorded call replayed eagerly), ``is_capturing``.

What cannot be traced this way: kernels themselves (inductor's generated code, cuDNN / cuBLAS
algorithm choice), real CUDA graph capture, asynchronous timing, real memory use. See docs/cuda.md.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten
GiB = 2**30

COMPUTE_OPS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
               aten.convolution.default, aten._convolution.default}
# operations whose tensors may live on different devices (copies, and index tensors on the host)
CROSS_DEVICE_OPS = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default,
                    aten._copy_from_and_resize.default, aten.index.Tensor, aten.index_put_.default,
                    aten.index_put.default, aten._index_put_impl_.default, aten.lift_fresh.default,
                    aten.set_.source_Tensor}


class FakeCudaError(AssertionError):
    """What a real GPU run would have done differently (mixed devices / dtypes, a host read in the loop)."""


class FakeCudaTensor(torch.Tensor):
    """A tensor that says it is on ``device`` (cuda:N) and keeps its values in the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=device, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D105
        return f"FakeCudaTensor({self.elem!r}, device='{self.device}')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise FakeCudaError(f"{func} on a fake CUDA tensor outside FakeCuda(): leave tensors inside the block")


@dataclass
class FakeDevice:
    """The fake GPU: what `supir_rt.cuda_runtime` reports about it."""

    name: str = "Fake H100 80GB HBM3"
    total: int = 80 * GiB
    free: int | None = None  # None: total − reserved − context
    allocated: int = 0
    reserved: int = 0
    context: int = GiB // 2  # the CUDA context (about 0.5 GiB on a real card)
    capability: tuple[int, int] = (9, 0)
    peak_allocated: int = 0
    peak_reserved: int = 0

    def mem_get_info(self) -> tuple[int, int]:
        free = self.total - self.reserved - self.context if self.free is None else self.free
        return free, self.total


@dataclass
class Record:
    """One matmul / convolution / attention call as the checker saw it."""

    op: str
    device: str
    dtypes: tuple[str, ...]
    kernel: str = ""  # attention: the SDPA kernel CUDA would choose
    shape: tuple[int, ...] = ()


@dataclass
class FakeCuda:
    """Context manager: the fake CUDA device(s) and the checker (see the module docstring)."""

    devices: int = 1
    device: FakeDevice = field(default_factory=FakeDevice)
    records: list[Record] = field(default_factory=list)
    host_reads: list[str] = field(default_factory=list)  # host reads of CUDA tensors (all, with where)
    violations: list[str] = field(default_factory=list)
    in_sampler_loop: bool = False
    watch_loop: bool = True  # False: no sampler-loop tracking (scripts that call the UNet engine directly)
    raise_on_violation: bool = True
    capturing: bool = False
    captures: int = 0
    copies_to_device: list[tuple[bool, bool, int]] = field(default_factory=list)  # (pinned, non_blocking, bytes)

    def __post_init__(self) -> None:
        self._pinned: set[int] = set()
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeCuda:
        import supir_rt.backends as backends
        import supir_rt.cuda_runtime as rt
        import supir_rt.backends.tiled_vae as vae_tiling

        if torch.version.cuda is None:
            raise RuntimeError("the fake-CUDA layer needs the CUDA build of PyTorch (it imports without a GPU)")
        s = self._stack
        patch = _Patcher()
        s.callback(patch.undo)
        # the C++ side asks torch.cuda._lazy_init before creating CUDA tensors: nothing to initialise
        patch(torch.cuda, "_lazy_init", lambda: None)
        # Module.to() must replace parameters (a wrapper cannot take `.data` of another tensor type)
        flag = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        s.callback(torch.__future__.set_overwrite_module_params_on_conversion, flag)
        dev = self.device
        patch(rt, "is_available", lambda: True)
        patch(rt, "device_count", lambda: self.devices)
        patch(rt, "current_device", lambda: 0)
        patch(rt, "capability", lambda device: dev.capability)
        patch(rt, "device_name", lambda device: dev.name)
        patch(rt, "mem_get_info", lambda device: dev.mem_get_info())
        patch(rt, "memory_stats", lambda device: (dev.allocated, dev.reserved))
        patch(rt, "reset_peak_memory", lambda device: None)
        patch(rt, "peak_memory", lambda device: (dev.peak_allocated, dev.peak_reserved))
        patch(rt, "synchronize", lambda device: None)
        patch(rt, "empty_cache", lambda: None)
        patch(rt, "generator", self._generator)
        patch(rt, "is_capturing", lambda: self.capturing)
        patch(rt, "capture_graph", self._capture_graph)
        # the sampler loop: from the first unet_adaptor call until another network runs
        patch(backends.EngineBase, "infer", self._watch(backends.EngineBase.infer))
        patch(vae_tiling.TiledVAEEngine, "infer", self._watch(vae_tiling.TiledVAEEngine.infer))
        s.enter_context(_DispatchMode(self))
        s.enter_context(_FunctionMode(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self.in_sampler_loop = False
        self._stack.close()

    # --------------------------------------------------------------------------------- replacements

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        # the values differ from a real CUDA generator's (Philox); the draws and their device are traced
        return torch.Generator("cpu").manual_seed(seed)

    def _capture_graph(self, fn: Callable, static: list[torch.Tensor]):
        """A "capture": one call with `capturing` set; replay reruns ``fn`` on the static inputs and
        writes into the captured outputs (what a real replay does)."""
        fn(*static)  # the warm-up call on the side stream
        self.capturing = True
        try:
            out = fn(*static)
        finally:
            self.capturing = False
        self.captures += 1
        outs = out if isinstance(out, tuple) else (out,)

        def replay() -> None:
            again = fn(*static)
            for o, n in zip(outs, again if isinstance(again, tuple) else (again,)):
                o.copy_(n)

        return replay, out

    def _watch(self, infer: Callable) -> Callable:
        fake = self

        def watched(engine, feed, **kwargs):  # kwargs: `Engine.infer`'s check_inputs
            fake.in_sampler_loop = fake.watch_loop and getattr(getattr(engine, "spec", None), "name", "") == "unet_adaptor"
            return infer(engine, feed, **kwargs)

        return watched

    # ------------------------------------------------------------------------------------ the checks

    def fail(self, message: str) -> None:
        self.violations.append(message)
        if self.raise_on_violation:
            raise FakeCudaError(message)

    def host_read(self, what: str, t: torch.Tensor) -> None:
        where = _caller()
        self.host_reads.append(f"{what} of {tuple(t.shape)} {t.dtype} at {where}")
        if self.in_sampler_loop:
            self.fail(f"host read ({what}) of a CUDA tensor {tuple(t.shape)} inside the sampler loop at {where}: "
                      "a GPU sync per step")

    def compute(self, op: str, tensors: list[torch.Tensor], kernel: str = "") -> None:
        devices = {str(t.device) for t in tensors}
        dtypes = tuple(str(t.dtype).replace("torch.", "") for t in tensors)
        self.records.append(Record(op, "/".join(sorted(devices)), dtypes, kernel, tuple(tensors[0].shape)))
        if len(devices) > 1:
            self.fail(f"{op} on mixed devices {sorted(devices)} at {_caller()}")
        if len(set(dtypes)) > 1:
            self.fail(f"{op} on mixed dtypes {dtypes} at {_caller()}")

    def check_index(self, device: torch.device) -> None:
        if device.index is not None and device.index >= self.devices:
            raise RuntimeError(f"CUDA error: invalid device ordinal ({device}; {self.devices} fake GPU(s))")

    def is_pinned(self, t: torch.Tensor) -> bool:
        return not isinstance(t, FakeCudaTensor) and t.untyped_storage().data_ptr() in self._pinned

    def cuda_records(self, op_prefix: str = "") -> list[Record]:
        return [r for r in self.records if r.op.startswith(op_prefix) and r.device.startswith("cuda")]

    def cpu_records(self) -> list[Record]:
        return [r for r in self.records if r.device == "cpu"]


class _Patcher:
    def __init__(self) -> None:
        self.saved: list[tuple[object, str, object]] = []

    def __call__(self, owner: object, name: str, value: object) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def undo(self) -> None:
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)


def _caller() -> str:
    """The innermost supir_rt frame of the current stack (where the operation came from)."""
    for frame in reversed(traceback.extract_stack()):
        if "/supir_rt/" in frame.filename or "/benchmarks/" in frame.filename:
            return f"{frame.filename.rsplit('/supir_rt/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "?"


def _is_cuda(device: object) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _cuda0(device: object) -> object:
    """An index-less CUDA device as CUDA resolves it: the current device, cuda:0."""
    if isinstance(device, (str, torch.device)):
        try:
            d = torch.device(device)
        except (RuntimeError, TypeError):
            return device
        if d.type == "cuda" and d.index is None:
            return torch.device("cuda", 0)
    return device


# functions with a ``device`` argument that make no tensor on it
_HOST_VALUES = {torch.Tensor.tolist: None, torch.Tensor.__float__: float, torch.Tensor.__int__: int,
                torch.Tensor.__index__: int}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_NOT_FACTORIES = {torch.Tensor.to, torch._C.TensorBase.to, torch._C._nn._parse_to}


class _FunctionMode(TorchFunctionMode):
    """Python-level calls: index-less "cuda" arguments resolved (PyTorch would ask the driver for the
    current device), ``Tensor.cuda()``, and attention (whose C++ kernel choice would need CUDA)."""

    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.device:
            return func(*args, **kwargs)
        if func in (torch.Tensor.cuda, torch._C.TensorBase.cuda):
            device = args[1] if len(args) > 1 else kwargs.get("device")
            index = device if isinstance(device, int) else 0 if device is None else torch.device(device).index or 0
            return args[0].to(torch.device("cuda", index), non_blocking=kwargs.get("non_blocking", False))
        if func in _HOST_VALUES and isinstance(args[0], FakeCudaTensor):  # through .cpu() / .item(): recorded
            return args[0].cpu().tolist() if func is torch.Tensor.tolist else _HOST_VALUES[func](args[0].item())
        if func is torch.Tensor.__invert__ and isinstance(args[0], FakeCudaTensor):  # PyTorch selects the device
            return torch.bitwise_not(args[0])
        if getattr(func, "__name__", "").endswith("_like") and args and isinstance(args[0], FakeCudaTensor) \
                and kwargs.get("device") is None:  # PyTorch would select the input's device in the driver
            return FakeCudaTensor(func(args[0].elem, *args[1:], **kwargs), args[0].device)
        if func is torch.Tensor.copy_ and isinstance(args[1], torch.Tensor) and (
                isinstance(args[0], FakeCudaTensor) or isinstance(args[1], FakeCudaTensor)):
            # `Tensor.copy_` selects the destination's device in the driver before it dispatches (also on one
            # device, e.g. into a CUDA graph's static buffers)
            return self._copy(*args, **kwargs)
        if func in _INDEXING and isinstance(args[0], FakeCudaTensor):
            return self._index(func, *args)
        args = tuple(_cuda0(a) for a in args)
        kwargs = {k: _cuda0(v) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        device = kwargs.get("device")
        if func is torch.as_tensor and isinstance(args[0], torch.Tensor):  # a tensor: a move, if any
            return args[0].to(device=device or args[0].device, dtype=kwargs.get("dtype") or args[0].dtype)
        if func not in _NOT_FACTORIES and isinstance(device, torch.device) and device.type == "cuda":
            # a factory on an explicit CUDA index would make PyTorch select that device in the driver:
            # made on the host and wrapped instead
            self.fake.check_index(device)
            out = func(*args, **{**kwargs, "device": torch.device("cpu")})
            return tree_map(lambda t: FakeCudaTensor(t, device) if type(t) is torch.Tensor else t, out)
        return func(*args, **kwargs)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False):
        if isinstance(src, FakeCudaTensor) and not isinstance(dst, FakeCudaTensor):
            self.fake.host_read("copy to the host", src)
        if isinstance(dst, FakeCudaTensor) and not isinstance(src, FakeCudaTensor):
            self.fake.copies_to_device.append((self.fake.is_pinned(src), non_blocking, src.numel() * src.element_size()))
        if isinstance(dst, FakeCudaTensor) and isinstance(src, FakeCudaTensor):
            self.fake.check_index(dst.device)
        (dst.elem if isinstance(dst, FakeCudaTensor) else dst).copy_(src.elem if isinstance(src, FakeCudaTensor) else src)
        return dst

    def _index(self, func, t: FakeCudaTensor, index, *value):
        """``t[index]`` / ``t[index] = value`` (PyTorch's indexing would select the device in the driver): on
        the values, the result a view of them; devices checked as CUDA does (index tensors may be on the
        host, a value must be on t's device or a scalar)."""
        def plain(x):
            if isinstance(x, FakeCudaTensor):
                if x.device != t.device:
                    raise RuntimeError(f"indexing a tensor on {t.device} with one on {x.device}")
                return x.elem
            return x

        index = tree_map(plain, index) if isinstance(index, tuple) else plain(index)
        if func is torch.Tensor.__setitem__:
            (v,) = value
            if isinstance(v, torch.Tensor) and not isinstance(v, FakeCudaTensor) and v.dim() > 0:
                self.fake.copies_to_device.append((self.fake.is_pinned(v), False, v.numel() * v.element_size()))
            t.elem[index] = plain(v)
            return None
        return FakeCudaTensor(t.elem[index], t.device)

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
        tensors = [t for t in (q, k, v, attn_mask) if t is not None]
        self.fake.compute("scaled_dot_product_attention", tensors, kernel=_sdpa_kernel(q, k, v, attn_mask))
        device = q.device
        plain = [t.elem if isinstance(t, FakeCudaTensor) else t for t in (q, k, v, attn_mask)]
        out = _in_fp32(F.scaled_dot_product_attention, plain[:3], dict(
            attn_mask=plain[3], dropout_p=dropout_p, is_causal=is_causal, scale=scale, **rest))
        return FakeCudaTensor(out, device) if device.type == "cuda" else out


def _sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str:
    """The kernel PyTorch's CUDA SDPA would take (the eligibility rules of ``sdp_utils.cpp`` that matter
    here): flash for fp16/bf16 with head dim <= 256, else memory-efficient for head dim % 8 == 0; both
    need the last dimension contiguous (stride 1) and no mask for flash. Otherwise the math kernel,
    which stores the tokens x tokens scores."""
    if q.device.type != "cuda":
        return "cpu"
    head = q.shape[-1]
    dense = all(t.stride(-1) == 1 for t in (q, k, v))
    if dense and mask is None and q.dtype in (torch.float16, torch.bfloat16) and head <= 256 and head % 8 == 0:
        return "flash"
    if dense and head % 8 == 0:
        return "efficient"
    return "math"


class _DispatchMode(TorchDispatchMode):
    """Every aten operation: run on the CPU values with CUDA's device rules (module docstring)."""

    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        fake = self.fake
        if func is aten.is_pinned.default:
            return fake.is_pinned(args[0])
        if func is aten._pin_memory.default:
            if isinstance(args[0], FakeCudaTensor):
                raise RuntimeError("cannot pin 'CUDA' memory: only dense CPU tensors can be pinned")
            out = args[0].clone()
            fake._pinned.add(out.untyped_storage().data_ptr())
            return out
        inputs: list[torch.Tensor] = []

        def unwrap(t):
            if isinstance(t, torch.Tensor):
                inputs.append(t)
                return t.elem if isinstance(t, FakeCudaTensor) else t
            return t

        plain_args, plain_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        target = kwargs.get("device")
        # a device given positionally (``t.to(device, dtype)`` reaches here as ``aten.to.device``)
        at = next((i for i, a in enumerate(args) if isinstance(a, torch.device)), None) if target is None else None
        if at is not None:
            target = args[at]
        plain_kwargs.pop("pin_memory", None)
        if target is not None:
            target = torch.device(_cuda0(target))
            if target.type == "cuda":
                fake.check_index(target)
                if at is None:
                    plain_kwargs["device"] = torch.device("cpu")
                else:
                    plain_args = (*plain_args[:at], torch.device("cpu"), *plain_args[at + 1:])
        out_device = target if target is not None else self._common_device(func, inputs)
        if func is aten._local_scalar_dense.default and isinstance(args[0], FakeCudaTensor):
            fake.host_read(".item()", args[0])
        moves = (aten._to_copy.default, aten.to.device)
        if func in moves and isinstance(args[0], FakeCudaTensor) and out_device.type == "cpu":
            fake.host_read("copy to the host", args[0])
        if func in moves and not isinstance(args[0], FakeCudaTensor) and out_device.type == "cuda":
            fake.copies_to_device.append((fake.is_pinned(args[0]), bool(kwargs.get("non_blocking")),
                                          args[0].numel() * args[0].element_size()))
        if func in COMPUTE_OPS:
            fake.compute(func.__name__, [t for t in inputs if t.dim() > 0])
            out = _in_fp32(func, plain_args, plain_kwargs)
        else:
            out = func(*plain_args, **plain_kwargs)
        if out_device.type != "cuda":
            return out
        return tree_map(lambda t: FakeCudaTensor(t, out_device) if isinstance(t, torch.Tensor) else t, out)

    def _common_device(self, func, inputs: list[torch.Tensor]) -> torch.device:
        cuda = {t.device for t in inputs if t.device.type == "cuda"}
        if not cuda:
            return torch.device("cpu")
        if func in CROSS_DEVICE_OPS:  # the destination (self) decides
            return inputs[0].device
        host = [t for t in inputs if t.device.type == "cpu" and t.dim() > 0]
        if len(cuda) > 1 or host:
            found = sorted({str(t.device) for t in inputs if t.device.type == "cuda" or t.dim() > 0})
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{found[0]} and {found[-1]}! ({func} at {_caller()})")
        return next(iter(cuda))


def _in_fp32(func, args, kwargs):
    """A matmul / convolution / attention on fp16 or bf16 values computed in fp32 and rounded once to the
    input dtype, as CUDA's kernels accumulate (and 10-100x faster than the CPU's half-precision kernels)."""
    dtype = next((t.dtype for t in args if isinstance(t, torch.Tensor)), None)
    if dtype not in (torch.float16, torch.bfloat16):
        return func(*args, **kwargs)
    up = lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == dtype else t  # noqa: E731
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    func(*tree_map(up, list(args)), **tree_map(up, kwargs)))


@contextlib.contextmanager
def fake_cuda(**kwargs) -> Iterator[FakeCuda]:
    with FakeCuda(**kwargs) as fake:
        yield fake


def to_fake(t: torch.Tensor, device: str = "cuda:0") -> torch.Tensor:
    """A CPU tensor's values as a fake CUDA tensor (for building inputs in a test)."""
    return FakeCudaTensor(t, torch.device(device))
