"""Which floating-point precision pays on the device a process runs on.

bfloat16 halves memory traffic everywhere, but it is only *fast* where the hardware multiplies it
natively: CUDA GPUs from Ampere on, and CPUs with AMX-BF16 or AVX512-BF16. Elsewhere (this
project's own 2-core CI machines differ: some have AMX, some only AVX512) PyTorch emulates it
and a bf16 matmul runs several times *slower* than float32. So ``auto``, the default of
``policy.dtype`` and ``train.precision``, is resolved where the model is loaded (in the Ray actor,
on its node), never on the driver: a cluster may mix both kinds of machine.

Quality: bf16 keeps float32's range and 8 bits of mantissa. Generation and scoring tolerate that
(``benchmarks/precision.py`` measures greedy agreement and log-prob error); training keeps float32
master weights under bf16 autocast, and the losses upcast to float32 before they reduce.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Precision = Literal["auto", "fp32", "bf16"]
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AMX-BF16 or AVX512-BF16)."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        if any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name)):
            return True
    except RuntimeError:  # a torch build without the CPU capability probes
        pass
    return bool(set(_cpu_flags()) & set(CPU_BF16_FLAGS))


def _cpu_flags() -> list[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def bf16_is_fast(device: str = "cpu") -> bool:
    """Whether bfloat16 compute is native (fast) on ``device`` ("cpu" or "cuda[:N]")."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """A model dtype with ``auto`` resolved: bfloat16 where it is fast on ``device``, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if bf16_is_fast(device) else "float32"


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """A training precision with ``auto`` resolved: bf16 autocast where it is fast, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_is_fast(device) else "fp32"


def describe(device: str = "cpu") -> str:
    """One line for logs and benchmark headers: what ``auto`` resolves to here, and why."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return f"{name}: bf16 {'native' if bf16_is_fast(device) else 'emulated'}"
    found = sorted(set(_cpu_flags()) & set(CPU_BF16_FLAGS))
    native = cpu_has_native_bf16()
    return f"CPU ({', '.join(found) or 'no AMX-BF16/AVX512-BF16'}): bf16 {'native' if native else 'emulated'}"
