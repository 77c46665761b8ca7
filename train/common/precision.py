"""Which precision a training run uses: ``mixed_precision: auto | no | bf16`` resolved against the hardware.

``auto`` means bf16 autocast on a GPU that supports it, and on a CPU only where bf16 runs natively *and* faster than
fp32. A CPU without AVX512-BF16 or AMX (AMD Zen 2/3, most laptops) emulates bf16: a 512-square matmul there runs at
~1 GFLOP/s against ~35-120 for fp32, so a bf16 recipe runs for hours instead of minutes. The decision comes from a
sub-second matmul probe (:func:`cpu_matmul_speed`, measured once per process), not from the CPU's name: what
counts is what torch's kernels do on this machine. An explicit ``bf16`` on a CPU that emulates it still runs, after
one warning that gives the measured ratio.
"""
from __future__ import annotations

import functools
import logging
import platform
import time
import warnings
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger("unitok.precision")

PROBE_SIZE = 512  # square matmul: large enough to reach a kernel's peak on 2 cores, small enough to time in < 0.2 s


@dataclass(frozen=True)
class MatmulSpeed:
    """This process's measured CPU matmul throughput (GFLOP/s), on its current thread count."""
    fp32_gflops: float
    bf16_gflops: float

    @property
    def bf16_native(self) -> bool:
        """bf16 pays off: it runs faster than fp32 (native kernels), rather than emulated at a fraction of it."""
        return self.bf16_gflops > self.fp32_gflops

    def describe(self) -> str:
        return f"bf16 {self.bf16_gflops:.1f} GFLOP/s against {self.fp32_gflops:.1f} for fp32"


def _gflops(dtype: torch.dtype, n: int = PROBE_SIZE, budget_s: float = 0.08) -> float:
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    a @ b  # warm-up: kernel selection, packing buffers
    reps, start = 0, time.perf_counter()
    while True:  # at least one timed matmul; an emulated bf16 one takes ~0.3 s, so the probe stays sub-second
        a @ b
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return 2 * n ** 3 * reps / elapsed / 1e9


@functools.cache
def _measured(threads: int) -> MatmulSpeed:
    del threads  # the cache key: the speed scales with torch's thread count, which the probe runs on
    return MatmulSpeed(fp32_gflops=round(_gflops(torch.float32), 1), bf16_gflops=round(_gflops(torch.bfloat16), 1))


def probe() -> MatmulSpeed:
    """fp32 and bf16 512-square matmul GFLOP/s on torch's current thread count, measured once per process (and
    thread count), in well under a second."""
    return _measured(torch.get_num_threads())


_warned: set[str] = set()


def resolve_precision(requested: str, device_type: str | None = None) -> tuple[str, str]:
    """``(precision, why)``: ``"bf16"`` or ``"no"`` for accelerate, and one line that says why it was chosen."""
    if requested not in ("auto", "no", "bf16"):
        raise ValueError(f"mixed_precision must be one of 'auto', 'no', 'bf16', got {requested!r}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "no":
        return "no", "fp32, as the recipe asks (mixed_precision: no)"
    if device_type == "cuda":
        if requested == "bf16":
            return "bf16", "bf16 autocast, as the recipe asks"
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU supports bf16"
        return "no", "auto: this GPU has no bf16, so fp32"
    speed = probe()
    if requested == "bf16":
        if not speed.bf16_native and "bf16" not in _warned:
            _warned.add("bf16")
            warnings.warn(f"mixed_precision: bf16 on a CPU that emulates bf16 ({speed.describe()}: "
                          f"{speed.fp32_gflops / max(speed.bf16_gflops, 1e-9):.0f}x slower); this run will be slow, "
                          f"mixed_precision: auto would choose fp32 here", stacklevel=2)
        return "bf16", f"bf16 autocast, as the recipe asks ({speed.describe()})"
    if speed.bf16_native:
        return "bf16", f"auto: this CPU runs bf16 natively ({speed.describe()})"
    return "no", f"auto: this CPU emulates bf16 ({speed.describe()}), so fp32"


def log_precision(choice: tuple[str, str], what: str) -> str:
    """Log a :func:`resolve_precision` choice and its reason; return accelerate's ``mixed_precision`` value."""
    precision, why = choice
    logger.info("%s precision: %s - %s", what, "bf16 autocast" if precision == "bf16" else "fp32", why)
    return precision


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s model name), or what :mod:`platform` knows elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@dataclass(frozen=True)
class MachineInfo:
    cpu: str
    capability: str  # torch's CPU kernel level (DEFAULT, AVX2, AVX512, ...)
    threads: int
    fp32_gflops: float
    bf16_gflops: float
    bf16_native: bool

    def describe(self) -> str:
        return (f"{self.cpu}; torch {self.capability}, {self.threads} threads; matmul fp32 {self.fp32_gflops:.0f} "
                f"GFLOP/s, bf16 {self.bf16_gflops:.1f} GFLOP/s ({'native' if self.bf16_native else 'emulated'})")

    def to_dict(self) -> dict:
        return asdict(self)


def machine_info() -> MachineInfo:
    speed = probe()
    return MachineInfo(cpu=cpu_model(), capability=torch.backends.cpu.get_cpu_capability(),
                       threads=torch.get_num_threads(), fp32_gflops=speed.fp32_gflops,
                       bf16_gflops=speed.bf16_gflops, bf16_native=speed.bf16_native)


__all__ = ["MatmulSpeed", "MachineInfo", "probe", "resolve_precision",
           "log_precision", "cpu_model", "machine_info"]
