"""Where the search's merge buffers live, decided before any weight is read.

`DeltaStack` holds the proxy (the model's parameters as one flat buffer), a copy of the base and
K prepared deltas. `memory_plan` counts their bytes from the parameter count and dtypes and puts
the base and the deltas either

- on the `device`, beside the proxy: each proxy is built in place at device memory bandwidth;
- in `host` memory (page-locked when the proxy is on CUDA): each proxy is built by streaming
  chunks of the base and the deltas to the device, at host-to-device bandwidth.

`merge.delta_device: auto` takes the device when everything fits there, else the host. Counted:
on the device, the model as loaded plus the proxy buffer while the parameters are re-pointed
(2 proxies), then the proxy, the base and the deltas (device mode) or the proxy and two staging
chunks (host mode), plus the TIES family's K x chunk scratch; a tenth of the free memory is kept
for evaluation's activations (`EVAL_RESERVE`). On a CPU device host mode shares the one pool of
memory and never fits where device mode does not. When nothing fits, ModelError says in one line
what would (bfloat16 deltas, fewer components, a larger device, more host memory, host mode).

The seconds per proxy build are the memory-traffic floor: bytes read and written over a copy's
bandwidth, measured on the device in a fraction of a second (`measure_bandwidths`) or, where not
measured, the documented defaults `DEFAULT_BANDWIDTHS`. The TIES family's sign election is
compute-bound and takes longer than this floor (see the README's merge benchmark).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from demix import device_memory
from demix.errors import ModelError
from demix.merge.methods import MergeMethod, make_method
from demix.merge.methods.base import DEFAULT_CHUNK

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
EVAL_RESERVE = 0.10  # share of free memory left to evaluation (activations, logits, allocator)
GB = 1e9
MEASURE_BYTES = 32 * 2**20  # the copy `measure_bandwidths` times (a few ms on any device)


@dataclass(frozen=True)
class Bandwidths:
    """Bytes per second. `device`: memory traffic (bytes read plus bytes written) of a copy on
    the proxy's device; `host_to_device`: a copy from page-locked host memory to the device (on
    a CPU device, a copy between two buffers); `source`: "measured" or "default"."""

    device: float
    host_to_device: float
    source: str = "default"


# Defaults where nothing is measured: an A100 80GB copies at about 1.7 TB/s of traffic and an
# H100 SXM at about 2.6 (of 2.0 and 3.35 nominal); PCIe 4.0 x16 moves about 25 GB/s from pinned
# memory; a server CPU's copy traffic is tens of GB/s, a small VM's about 10.
DEFAULT_BANDWIDTHS = {
    "cuda": Bandwidths(2.0e12, 2.5e10),
    "cpu": Bandwidths(1.0e10, 1.0e10),
}


def dtype_bytes(dtype) -> tuple[str, int]:
    """(name, bytes per entry) of a dtype given as a name or a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ModelError(f"merge buffers cannot be {name}; use one of {sorted(DTYPE_BYTES)}")
    return name, DTYPE_BYTES[name]


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


def _seconds(s: float) -> str:
    return f"{s:.2g} s" if s < 1 else f"{s:.1f} s"


def _rate(bytes_per_s: float) -> str:
    return (
        f"{bytes_per_s / 1e12:.2f} TB/s" if bytes_per_s >= 1e12 else f"{bytes_per_s / GB:.0f} GB/s"
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Where the base and the deltas live (`delta_device`: "device" or "host"), the bytes that
    needs on the device (at its peak) and in host memory, and the estimated build time."""

    delta_device: str
    device: str
    k: int
    param_dtype: str
    delta_dtype: str
    proxy_bytes: int  # the proxy, and the base copy (same dtype)
    delta_bytes: int  # one delta
    device_bytes: int
    host_bytes: int
    free_bytes: int | None
    host_free_bytes: int | None
    seconds_per_build: float
    bandwidths: Bandwidths
    weighted_sum: bool

    @property
    def line(self) -> str:
        """The plan in one line, for the log."""
        cuda = self.device.startswith("cuda")
        stored = (
            f"base {_gb(self.proxy_bytes)} {self.param_dtype} and {self.k} deltas x "
            f"{_gb(self.delta_bytes)} {self.delta_dtype}"
        )
        if self.delta_device == "host":
            where = (
                f"{stored} in {'pinned ' if cuda else ''}host memory"
                f"{_of(self.host_bytes, self.host_free_bytes, 'available')}, proxy "
                f"{_gb(self.proxy_bytes)} on {self.device}{_of(self.device_bytes, self.free_bytes, 'free')}"
            )
            rate = f"{_rate(self.bandwidths.host_to_device)} host-to-device"
        else:
            where = (
                f"{stored} on {self.device} beside the proxy"
                f"{_of(self.device_bytes, self.free_bytes, 'free')}"
            )
            rate = f"{_rate(self.bandwidths.device)} device copy"
        bound = "about" if self.weighted_sum else "at least"  # the sign election costs more
        return (
            f"merge memory plan: {where}; {bound} {_seconds(self.seconds_per_build)} per proxy "
            f"build at {rate} ({self.bandwidths.source})"
        )


def _of(needed: int, free: int | None, what: str) -> str:
    if free is None:
        return f" ({_gb(needed)}, free memory unknown)"
    return f" ({_gb(needed)} of {_gb(free)} {what})"


def _usable(free: int | None) -> float:
    return math.inf if free is None else free * (1 - EVAL_RESERVE)


@dataclass(frozen=True)
class _Budget:
    """The bytes a placement needs, against the memory there is."""

    n: int  # parameters
    p: int  # bytes per proxy (and base) entry
    d: int  # bytes per delta entry
    k: int
    weighted: bool
    chunk: int
    free: int | None
    host_free: int | None
    cuda: bool

    def needs(self, where: str, k: int | None = None, d: int | None = None) -> tuple[int, int]:
        """(peak device bytes, host bytes) with the base and deltas `where`."""
        k, d = k or self.k, d or self.d
        proxy, deltas, chunk = self.n * self.p, k * self.n * d, min(self.chunk, self.n)
        scratch = 0 if self.weighted else 5 * k * chunk * 4  # the sign election's temporaries
        if where == "device":  # the model as loaded + the proxy buffer, then base and deltas
            return 2 * proxy + deltas + scratch, 0
        staging = 2 * chunk * (self.p + k * d)
        return max(2 * proxy, proxy + staging + scratch), proxy + deltas

    def fits(self, where: str, k: int | None = None, d: int | None = None) -> bool:
        device_bytes, host_bytes = self.needs(where, k, d)
        if not self.cuda:  # a CPU device: the "device" and the host are the same memory
            return device_bytes + host_bytes <= _usable(self.free)
        return device_bytes <= _usable(self.free) and host_bytes <= _usable(self.host_free)


def memory_plan(
    n_params: int,
    param_dtype,
    k: int,
    method: MergeMethod | str = "linear",
    delta_dtype=None,
    device: str = "cpu",
    free_bytes: int | None = None,
    host_free_bytes: int | None = None,
    bandwidths: Bandwidths | None = None,
    delta_device: str = "auto",
    chunk: int = DEFAULT_CHUNK,
) -> MemoryPlan:
    """Where the base and the k deltas of an n_params model should live on `device` ("cpu",
    "cuda:0"), given the free bytes there and in host memory (None: unknown, assumed enough).

    `delta_device`: "auto" (the device when it fits, else the host), "device" or "host".
    Raises ModelError, in one line naming what would fit, when the choice does not fit.
    """
    method = make_method(method)
    param_name, p = dtype_bytes(param_dtype)
    delta_name, d = dtype_bytes(delta_dtype or param_dtype)
    cuda = device.startswith("cuda")
    bandwidths = bandwidths or DEFAULT_BANDWIDTHS["cuda" if cuda else "cpu"]
    budget = _Budget(
        n_params, p, d, k, method.weighted_sum, chunk, free_bytes, host_free_bytes, cuda
    )
    modes = ("device", "host") if delta_device == "auto" else (delta_device,)
    where = next((w for w in modes if budget.fits(w)), None)
    if where is None:
        raise ModelError(_does_not_fit(budget, modes, device, param_name, delta_name))
    device_bytes, host_bytes = budget.needs(where)
    proxy, deltas = n_params * p, k * n_params * d
    transfer = (proxy + deltas) / bandwidths.host_to_device
    merging = (2 * proxy + deltas) / bandwidths.device  # read the base and deltas, write the proxy
    if where == "device":
        seconds = merging
    else:  # streamed: on CUDA the copies overlap the merging, on a CPU they take turns
        seconds = max(transfer, merging) if cuda else transfer + merging
    return MemoryPlan(
        delta_device=where,
        device=device,
        k=k,
        param_dtype=param_name,
        delta_dtype=delta_name,
        proxy_bytes=proxy,
        delta_bytes=n_params * d,
        device_bytes=device_bytes,
        host_bytes=host_bytes,
        free_bytes=free_bytes,
        host_free_bytes=host_free_bytes,
        seconds_per_build=seconds,
        bandwidths=bandwidths,
        weighted_sum=method.weighted_sum,
    )


def _does_not_fit(
    budget: _Budget, modes: tuple[str, ...], device: str, param_name: str, delta_name: str
) -> str:
    """The one-line refusal: what was needed, what was free, and every change that would fit."""
    on_device, _ = budget.needs("device")
    _, in_host = budget.needs("host")
    free = "unknown" if budget.free is None else _gb(budget.free)
    said = (
        f"merge memory plan: the proxy, the base and {budget.k} deltas of a "
        f"{budget.n / 1e9:.2f}B-parameter model ({param_name}, deltas {delta_name}) need "
        f"{_gb(on_device)} on {device} ({free} free, {EVAL_RESERVE:.0%} of it kept for evaluation)"
    )
    host_mode = budget.cuda and "host" in modes
    if host_mode:
        said += (
            f", or {_gb(in_host)} of host memory ({_gb(budget.host_free or 0)} available) "
            "with the deltas there"
        )
    options = []
    if delta_name != "bfloat16" and any(budget.fits(w, d=2) for w in modes):
        options.append("merge.delta_dtype: bfloat16")
    fewer = [j for j in range(budget.k - 1, 0, -1) if any(budget.fits(w, k=j) for w in modes)]
    if fewer:
        options.append(f"at most {fewer[0]} component{'s' if fewer[0] > 1 else ''}")
    if budget.cuda and "host" not in modes and budget.fits("host"):
        options.append("merge.delta_device: host (or auto)")
    options.append(f"a device with {_gb(on_device / (1 - EVAL_RESERVE))} free")
    if host_mode:
        options.append(f"{_gb(in_host / (1 - EVAL_RESERVE))} of available host memory")
    return f"{said}; would fit: {'; '.join(options)}"


# ------------------------------------------------------------------ measured inputs (torch)


def device_name(device) -> str:
    """ "cuda:0" for a CUDA device given without index, the device as written otherwise."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def measure_bandwidths(device, nbytes: int = MEASURE_BYTES, repeats: int = 3) -> Bandwidths:
    """Copy bandwidths measured on `device` with a `nbytes` buffer (well under 0.5 s): device
    copy traffic (2 x bytes / s) and host-to-device from page-locked memory."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)

    def timed(copy) -> float:
        copy()  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            copy()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats

    on_device = timed(lambda: dst.copy_(src))
    to_device = timed(lambda: dst.copy_(host, non_blocking=True))
    return Bandwidths(2 * nbytes / on_device, nbytes / to_device, "measured")


def parameter_count(base: str | Path) -> int:
    """Entries of the base's floating-point tensors, from its safetensors headers alone."""
    from demix.checkpoint import tensor_shapes

    return sum(
        math.prod(shape)
        for shape, dtype in tensor_shapes(Path(base)).values()
        if dtype in ("F64", "F32", "F16", "BF16")
    )


def plan_for(
    base: str | Path,
    k: int,
    method: MergeMethod | str,
    param_dtype,
    delta_dtype,
    device,
    delta_device: str = "auto",
) -> MemoryPlan:
    """The memory plan of `k` components of the model folder `base` on `device`: its size from
    the safetensors headers, free memory and bandwidths measured now. No weight is read."""
    return memory_plan(
        parameter_count(base),
        param_dtype,
        k,
        method,
        delta_dtype,
        device_name(device),
        *device_memory.free_memory(device),
        bandwidths=measure_bandwidths(device),
        delta_device=delta_device,
    )
