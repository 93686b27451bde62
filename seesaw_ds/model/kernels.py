"""The engine's one hand-written kernel: CPU decode attention over the device-tier cache
(``csrc/decode_attention.cpp``), built once per environment by torch's JIT extension loader.

No installed library reads a paged, token-major KV cache in place on CPU (DeepSpeed's inference kernels
are CUDA-only; torch's SDPA wants one call per sequence and reads the cache head by head at under half of
memory speed here). It reads a float32 or bfloat16 cache and computes in float32. The kernel is optional:
where it cannot be built (no compiler) or does not apply (CUDA, a float16 cache), attention falls back to
SDPA with the same results up to float rounding.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from seesaw_ds.distributed.env import export_extension_dir

log = logging.getLogger("seesaw_ds")

_SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_attention.cpp"
_module = None
_failed: str | None = None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load():
    """The compiled module, building it on first use (a file lock lets one rank build while the others
    wait; a lock left by a killed build is removed with a warning, seesaw_ds/distributed/jit_lock.py);
    None, with one warning, where it cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    from torch.utils.cpp_extension import load as jit_load

    wide = {"avx2", "fma"} <= _cpu_flags()  # one build per instruction set: nodes of a cluster may differ
    flags = ["-O3", "-fopenmp-simd"] + (["-mavx2", "-mfma"] if wide else [])
    export_extension_dir()
    try:
        _module = jit_load(f"seesaw_decode_attention_{'avx2' if wide else 'base'}", [str(_SOURCE)],
                           extra_cflags=flags, verbose=False)
    except Exception as error:  # no compiler, no headers: SDPA still works
        _failed = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        log.warning("seesaw_ds decode-attention kernel unavailable (%s); using torch SDPA", _failed)
    return _module


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """``query`` [N, Hq, D] against slots ``starts[n] .. starts[n]+lengths[n]`` of one layer's flat cache
    ``keys``/``values`` [slots, Hkv, D]; returns [N, Hq, D] in the query's dtype (float32 inside). Call only
    when :func:`applies`."""
    out = _module.decode_attention(query.float().contiguous(), keys, values, starts, lengths, float(scale))
    return out.to(query.dtype)


def applies(keys: torch.Tensor) -> bool:
    """Whether the kernel can run on this cache (CPU, float32 or bfloat16, contiguous, built)."""
    return keys.device.type == "cpu" and keys.dtype in (torch.float32, torch.bfloat16) and keys.is_contiguous() \
        and load() is not None
