"""Where each network's weights live and in which dtype: the memory plan of the PyTorch backend.

SUPIR's networks are not used evenly. The UNet + adaptor (3.9 B parameters, 7.7 GB in fp16) runs
twice per sampler step; the text encoders (0.8 B) run once per distinct prompt; the VAE networks
(0.12 B) run two to four times per image. The plan for a GPU therefore keeps only the UNet + adaptor
resident and gives every other network the device only while it runs (`Offloader`): its weights
live in pinned host memory, are copied in before the call and dropped after it (no copy back: the
weights never change). With SDPA attention that keeps a 1024² restore within 12 GB of VRAM.

Precision (the official split): UNet + adaptor fp16, VAE bf16 (or fp32; never fp16, the SDXL VAE
overflows), text encoders fp16. On a CPU everything stays resident, in fp32 unless asked otherwise.

`build_placed_model` builds the model on the meta device and allocates each part directly where the
plan puts it, in its dtype, so a checkpoint is then streamed tensor by tensor into its final place:
host RAM holds only the offloaded parts (about 1.9 GB for the official model), never a staging copy
of the GPU-resident weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from supir_rt.cuda_runtime import normalize_device

# The model parts (dotted module paths of `SUPIRModel`) each exported network reads. `quant_conv`
# is shared by both encoders; a test checks that these parts are exactly what each network needs.
NETWORK_PARTS: dict[str, tuple[str, ...]] = {
    "dr_encoder": ("first_stage_model.denoise_encoder", "first_stage_model.quant_conv"),
    "vae_encoder": ("first_stage_model.encoder", "first_stage_model.quant_conv"),
    "unet_adaptor": ("model",),
    "vae_decoder": ("first_stage_model.decoder", "first_stage_model.post_quant_conv"),
    "text_encoders": ("conditioner",),
}
VAE_NETWORKS = ("dr_encoder", "vae_encoder", "vae_decoder")
# Network -> what to lower when it runs out of device memory (used in the out-of-memory message).
OOM_ADVICE = {
    "unet_adaptor": "lower the processing size (--upscale / --min-size), sample in tiles, or store the "
                    "UNet weights in fp8 (--fp8-weights, Ada/Hopper GPUs)",
    "text_encoders": "keep offloading on (do not pass --no-offload)",
    "vae_decoder": "lower the processing size (--upscale / --min-size), decode in tiles, keep --vae-dtype bf16 "
                   "and offloading on",
}
OOM_ADVICE["dr_encoder"] = OOM_ADVICE["vae_encoder"] = OOM_ADVICE["vae_decoder"].replace("decode", "encode")


@dataclass(frozen=True)
class NetworkPlacement:
    """One network: the dtype of its weights (and arithmetic), and whether it stays on the device."""

    dtype: torch.dtype
    resident: bool


@dataclass(frozen=True)
class MemoryPlan:
    """Placement of the five networks on one compute ``device``.

    An offloaded network's weights live on the host (pinned when the device is a GPU) and are on the
    device only during its `infer`. Use `MemoryPlan.for_device` for the defaults.
    """

    device: torch.device
    networks: Mapping[str, NetworkPlacement] = field(default_factory=dict)
    # split placement: network -> its own compute device (others use ``device``); see `MemoryPlan.split`
    devices: Mapping[str, torch.device] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # one device object per GPU: an index-less "cuda" never equals the "cuda:0" its tensors report
        object.__setattr__(self, "device", normalize_device(self.device))
        missing = set(NETWORK_PARTS) - set(self.networks)
        if missing:
            raise ValueError(f"memory plan lacks networks {sorted(missing)}")
        shared = {self.networks["dr_encoder"].dtype, self.networks["vae_encoder"].dtype}
        if len(shared) > 1:
            raise ValueError("dr_encoder and vae_encoder share quant_conv: give them the same dtype")

    @classmethod
    def for_device(
        cls, device: str | torch.device, *, diffusion_dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None, text_dtype: torch.dtype | None = None, offload: bool | None = None,
    ) -> MemoryPlan:
        """Defaults: on CUDA UNet + adaptor fp16 resident, VAE bf16 and text encoders fp16 offloaded;
        on a CPU all fp32 and resident. ``offload=False`` keeps every network resident."""
        device = torch.device(device)
        gpu = device.type == "cuda"
        diffusion = diffusion_dtype or (torch.float16 if gpu else torch.float32)
        vae = vae_dtype or (torch.bfloat16 if gpu else torch.float32)
        text = text_dtype or (torch.float16 if gpu else torch.float32)
        if vae == torch.float16:
            raise ValueError("VAE dtype fp16: the SDXL VAE overflows in fp16 (NaN images); use bf16 or fp32")
        away = gpu if offload is None else offload
        nets = {"unet_adaptor": NetworkPlacement(diffusion, True),
                "text_encoders": NetworkPlacement(text, not away)}
        nets.update({name: NetworkPlacement(vae, not away) for name in VAE_NETWORKS})
        return cls(device, nets)

    @classmethod
    def split(cls, devices: tuple[str | torch.device, str | torch.device], *, diffusion_dtype: torch.dtype | None = None,
              vae_dtype: torch.dtype | None = None, text_dtype: torch.dtype | None = None) -> MemoryPlan:
        """Split placement over two devices: the UNet + adaptor on the first, the text encoders, the VAE and
        the DR encoder on the second, all resident (no offloading: each card holds its share for good).
        Dtypes as `for_device` (fp16 UNet, bf16 VAE, fp16 text encoders on CUDA)."""
        first, second = (torch.device(d) for d in devices)
        base = cls.for_device(first, diffusion_dtype=diffusion_dtype, vae_dtype=vae_dtype, text_dtype=text_dtype,
                              offload=False)
        return cls(first, base.networks, {name: second for name in NETWORK_PARTS if name != "unet_adaptor"})

    def device_of(self, network: str) -> torch.device:
        """The device the network computes on."""
        return self.devices.get(network, self.device)

    def home(self, network: str) -> torch.device:
        """Where the network's weights are between calls."""
        return self.device_of(network) if self.networks[network].resident else torch.device("cpu")

    def describe(self) -> dict[str, str]:
        """Network -> "dtype on device" (and "offloaded" when it visits the device only while it runs)."""
        return {name: f"{str(p.dtype).removeprefix('torch.')} on {self.device_of(name)}"
                      + ("" if p.resident else " (offloaded)") for name, p in self.networks.items()}

    def part_placements(self) -> dict[str, tuple[torch.device, torch.dtype]]:
        """Model part -> (home device, dtype); a part shared by two networks must agree."""
        out: dict[str, tuple[torch.device, torch.dtype]] = {}
        for name, parts in NETWORK_PARTS.items():
            want = (self.home(name), self.networks[name].dtype)
            for part in parts:
                if out.setdefault(part, want) != want:
                    raise ValueError(f"{part} is shared by two networks placed differently: {out[part]} vs {want}")
        return out

    def weight_bytes(self, model: nn.Module) -> dict[str, int]:
        """Bytes of weights at rest: ``device`` (resident), ``host`` (offloaded) and ``device_peak``
        (resident + the largest offloaded network while it runs). Works on a meta-device model."""
        sizes = {part: _bytes(model.get_submodule(part), dtype) for part, (_, dtype) in self.part_placements().items()}
        resident = {p for n, parts in NETWORK_PARTS.items() if self.networks[n].resident for p in parts}
        device = sum(sizes[p] for p in resident)
        host = sum(v for p, v in sizes.items() if p not in resident)
        visiting = [sum(sizes[p] for p in parts if p not in resident) for parts in NETWORK_PARTS.values()]
        return {"device": device, "host": host, "device_peak": device + max(visiting)}


def weight_bytes_per_device(plan: MemoryPlan, model: nn.Module) -> dict[torch.device, int]:
    """Bytes of resident weights on each compute device of the plan (works on a meta-device model)."""
    out: dict[torch.device, int] = {}
    for part, (home, dtype) in plan.part_placements().items():
        if home.type != "cpu" or plan.device.type == "cpu":
            out[home] = out.get(home, 0) + _bytes(model.get_submodule(part), dtype)
    return out


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in (*module.parameters(), *module.buffers()))


def place_model(model: nn.Module, plan: MemoryPlan, *, pin: bool | None = None) -> nn.Module:
    """Cast and move each part of an already-built model to its home in the plan (in place)."""
    pin = plan.device.type == "cuda" if pin is None else pin
    for part, (home, dtype) in plan.part_placements().items():
        module = model.get_submodule(part)
        module.to(device=home, dtype=dtype)
        if pin and home.type == "cpu":
            pin_host_memory(module)
    return model


def build_placed_model(config, plan: MemoryPlan, *, init: bool = True, pin: bool | None = None) -> nn.Module:
    """`build_model`, but each part allocated directly at its home in the plan and in its dtype.

    Nothing is ever materialised twice: the module tree is built on the meta device, each part cast
    there, then allocated where it will live. ``init=False`` leaves the weights uninitialised for
    `supir_rt.weights.load_checkpoints`, which streams each tensor into its place; ``init=True`` draws
    PyTorch's default random init (seed with torch.manual_seed).
    """
    from supir_rt.model.supir import SUPIRModel, initialise_random

    pin = plan.device.type == "cuda" if pin is None else pin
    with torch.device("meta"):
        model = SUPIRModel(config)
    for part, (home, dtype) in plan.part_placements().items():
        module = model.get_submodule(part)
        module.to(dtype)
        if home.type != "meta":
            module.to_empty(device=home)
            if init:
                initialise_random(module)
            if pin and home.type == "cpu":
                pin_host_memory(module)
    return model.eval().requires_grad_(False)


def pin_host_memory(module: nn.Module) -> None:
    """Page-lock a host module's tensors so that copies to the GPU are fast and asynchronous."""
    for t in (*module.parameters(), *module.buffers()):
        if not t.is_pinned():
            t.data = t.data.pin_memory()


class Offloader:
    """Gives a network's weights the device only while it runs.

    `on_device()` puts a device copy of each host tensor in its module (copied asynchronously from
    pinned memory) and on exit puts the host tensors back, dropping the device copies into PyTorch's
    allocator cache for the next network. Nothing is copied back: inference never changes weights.
    The move replaces the modules' parameters and buffers (``Tensor.to``, not ``.data =``), so the
    copies are ordinary tensor operations that a tracer sees. A resident network gets an `Offloader`
    whose context does nothing.
    """

    def __init__(self, modules: list[nn.Module], device: torch.device, *, resident: bool, name: str = "",
                 log: list[tuple[str, str]] | None = None,
                 transfer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.modules, self.device, self.resident, self.name = modules, normalize_device(device), resident, name
        self.log = [] if log is None else log  # (name, "on" | "off") per move, in order: diagnostics, tests
        self.transfer = transfer or (lambda t: t.to(self.device, non_blocking=True))

    def _slots(self) -> Iterator[tuple[dict, str]]:
        """(the module's parameter or buffer table, name) of every tensor the modules hold."""
        for m in self.modules:
            for sub in m.modules():
                for table in (sub._parameters, sub._buffers):
                    yield from ((table, name) for name, t in table.items() if t is not None)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        if self.resident:
            yield
            return
        host: list[tuple[dict, str, torch.Tensor]] = []
        copies: dict[int, torch.Tensor] = {}  # a tensor held by two modules is copied once
        try:  # also undoes a partial move (the GPU ran out of memory while copying in)
            for table, name in self._slots():
                h = table[name]
                host.append((table, name, h))
                if id(h) not in copies:
                    moved = self.transfer(h)
                    copies[id(h)] = nn.Parameter(moved, requires_grad=False) if isinstance(h, nn.Parameter) else moved
                table[name] = copies[id(h)]
            self.log.append((self.name, "on"))
            yield
        finally:
            for table, name, h in host:
                table[name] = h
            self.log.append((self.name, "off"))


def offloaders(model: nn.Module, plan: MemoryPlan, log: list[tuple[str, str]] | None = None) -> dict[str, Offloader]:
    """One `Offloader` per network, over the parts of ``model`` that network reads (sharing ``log``)."""
    log = [] if log is None else log
    return {name: Offloader([model.get_submodule(p) for p in parts], plan.device_of(name),
                            resident=plan.networks[name].resident, name=name, log=log)
            for name, parts in NETWORK_PARTS.items()}


def plan_from_model(model: nn.Module) -> MemoryPlan:
    """The plan a built model already follows: each network in the dtype of its weights, resident
    if they are on the model's compute device (the non-CPU device if there is one)."""
    first = {name: next(model.get_submodule(parts[0]).parameters()) for name, parts in NETWORK_PARTS.items()}
    device = next((p.device for p in first.values() if p.device.type != "cpu"), torch.device("cpu"))
    return MemoryPlan(device, {name: NetworkPlacement(p.dtype, p.device == device) for name, p in first.items()})


__all__ = [
    "MemoryPlan", "NETWORK_PARTS", "NetworkPlacement", "OOM_ADVICE", "Offloader", "build_placed_model",
    "offloaders", "pin_host_memory", "place_model", "plan_from_model", "weight_bytes_per_device",
]
