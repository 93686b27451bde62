"""Whether this CPU multiplies bfloat16 natively, and the one warning a bf16 job gets where it does not.

A bf16 job runs on any x86 CPU: where the CPU lacks AVX-512 BF16 and AMX, oneDNN emulates bf16 matmuls
through fp32 (converting as it goes), often slower than fp32 itself. That is not an error -- the job still
runs and its results are right -- but the user should know what it costs, so global rank 0 prints one
warning at start-up with the measured bf16 and fp32 matmul rates (:func:`bf16_warning`). The decision is
a pure function of the CPU flags (:func:`lacks_native_bf16`), testable with made-up flags.
"""
from __future__ import annotations

from typing import Callable, Iterable

from seesaw_ds.cpu_features import cpu_flags

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of x86 instructions that multiply bf16 natively (AVX-512 BF16, AMX)."""


def lacks_native_bf16(dtype: str, flags: Iterable[str] | None) -> bool:
    """True for a bfloat16 job on an x86 CPU (``flags`` known) without AVX-512 BF16 or AMX (pure)."""
    return dtype.removeprefix("torch.") == "bfloat16" and flags is not None and not NATIVE_BF16_FLAGS & set(flags)


def bf16_message(bf16_flops: float, fp32_flops: float, widened: bool = False) -> str:
    """The warning's text for measured bf16 and fp32 matmul rates (FLOP/s, one core); ``widened``: the
    stage's linears run on float32 copies of the weights here (backends.deepspeed.widens_bf16) (pure)."""
    ratio = bf16_flops / fp32_flops if fp32_flops > 0 else float("nan")
    head = (f"model.dtype=bfloat16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): "
            f"bf16 matmuls are emulated, measured {bf16_flops / 1e9:.0f} GFLOP/s against {fp32_flops / 1e9:.0f} "
            f"GFLOP/s in fp32 per core ({ratio:.2f}x); ")
    if widened:
        return head + ("the linears run on the weights widened to float32 (model.cpu_prepack=true: a copy per "
                       "layout, twice the weight bytes), the rest in bf16; model.dtype=float32 may still be faster")
    return head + "the job runs, but model.dtype=float32 may be faster here (twice the memory for weights and KV)"


_CPUINFO = object()  # bf16_warning's default: this CPU's flags (None stands for a CPU without x86 flags)


def bf16_warning(dtype: str, flags: Iterable[str] | None | object = _CPUINFO,
                 rate: Callable[[str], float] | None = None, widened: bool = False) -> str | None:
    """The warning for a ``dtype`` job on this CPU (None when there is nothing to say). ``flags`` default
    to /proc/cpuinfo's (None: unknown, no x86 flags); ``rate(dtype)`` (FLOP/s) defaults to the planner's
    calibration matmul, and runs only when the warning is due (two short timings, ~0.1 s)."""
    flags = cpu_flags() if flags is _CPUINFO else flags
    if not lacks_native_bf16(dtype, flags):
        return None
    if rate is None:
        from seesaw_ds.sim.calibrate import matmul_rate

        rate = matmul_rate
    return bf16_message(rate("bfloat16"), rate("float32"), widened)
