"""What this machine computes natively: whether bf16 GEMMs run in hardware, which `mixed_precision: auto` reads.

A CPU with AMX (Intel Sapphire Rapids and later) or AVX-512 BF16 (also AMD Zen 4) multiplies bf16 matrices several
times faster than float32 ones; one without them emulates bf16, and there a bf16 GEMM ran at about 3 GFLOP/s, far
slower than float32. A GPU computes bf16 natively when torch says so (compute capability 8.0 and later)."""

from __future__ import annotations

import functools
from pathlib import Path

CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The first processor's `name` field in /proc/cpuinfo (Linux), stripped; None where there is none."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first processor's feature flags (cpuinfo's `flags` line); empty where there is none."""
    return frozenset((cpuinfo_field("flags", cpuinfo) or "").split())


@functools.cache
def native_bf16() -> bool:
    """Whether the device the stages train on (CUDA when there is one, else the CPU) computes bf16 in hardware."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(CPU_BF16_FLAGS & cpu_flags())
