"""The engine's one hand-written extension (``csrc/decode_attention.cpp``), built once per environment by
torch's JIT extension loader: the attention of a whole step in one call per layer.

- ``decode_attention``: CPU decode attention over the paged, token-major device-tier cache, each sequence's
  KV a list of slot runs (its block table), with sliding window and soft-cap; float32, bfloat16 or float16
  cache, float32 arithmetic. No installed library reads such a cache in place on CPU: DeepSpeed's inference
  kernels are CUDA-only, torch's SDPA wants one call per sequence and reads the cache head by head at under
  half of memory speed here, and FlexAttention on CPU needs a torch.compile of each new shape (measured:
  seconds per shape, and a decode batch changes shape every step).
- ``prefill_attention``: the packed ragged prefill row, one call per layer; inside, torch's fused SDPA per
  prompt (ATen, so it also runs on CUDA tensors), the eager formula where a soft-cap is set.

The extension is optional: where it cannot be built (no compiler), attention falls back to one SDPA call per
sequence with the same results up to float rounding, after one warning.
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

    wide = {"avx2", "fma", "f16c"} <= _cpu_flags()  # one build per instruction set: nodes may differ
    flags = ["-O3", "-fopenmp-simd"] + (["-mavx2", "-mfma", "-mf16c"] if wide else [])
    export_extension_dir()
    try:
        _module = jit_load(f"seesaw_decode_attention_{'avx2' if wide else 'base'}", [str(_SOURCE)],
                           extra_cflags=flags, verbose=False)
    except Exception as error:  # no compiler, no headers: SDPA still works
        _failed = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        log.warning("seesaw_ds decode-attention kernel unavailable (%s); using torch SDPA", _failed)
    return _module


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, runs: "SpanRuns",
                     scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """``query`` [N, Hq, D] against each sequence's KV runs in one layer's flat cache ``keys``/``values``
    [slots, Hkv, D] (``runs``: :class:`SpanRuns`); only the last ``window`` tokens when set, scores
    soft-capped when ``softcap`` is set. Returns [N, Hq, D] in the query's dtype (float32 inside). Call only
    when :func:`applies`."""
    out = _module.decode_attention(query.float().contiguous(), keys, values, runs.offsets, runs.first, runs.count,
                                   float(scale), int(window or 0), float(softcap or 0.0))
    return out.to(query.dtype)


def prefill_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor,
                      scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention within each prompt of a packed row: ``query`` [Hq, T, D], ``keys``/``values``
    [Hkv, T, D], prompt i at ``cu_seqlens[i]:cu_seqlens[i+1]`` (int64, CPU). Returns [Hq, T, D]. Call only
    when :func:`built`."""
    return _module.prefill_attention(query, keys, values, cu_seqlens, float(scale), int(window or 0),
                                     float(softcap or 0.0))


class SpanRuns:
    """Each sequence's KV as runs of consecutive cache slots, flattened for the kernel: sequence n owns runs
    ``offsets[n]:offsets[n+1]`` of (``first``, ``count``). Built once per step, used by every layer."""

    __slots__ = ("offsets", "first", "count")

    def __init__(self, spans: list[list[tuple[int, int]]]):
        flat = [run for runs in spans for run in runs]
        bounds = [0]
        for runs in spans:
            bounds.append(bounds[-1] + len(runs))
        self.offsets = torch.tensor(bounds, dtype=torch.long)
        pairs = torch.tensor(flat, dtype=torch.long).reshape(-1, 2)
        self.first = pairs[:, 0].contiguous()
        self.count = pairs[:, 1].contiguous()


def built() -> bool:
    """Whether the extension is available (built here, or loadable)."""
    return load() is not None


def applies(keys: torch.Tensor) -> bool:
    """Whether the decode kernel can run on this cache (CPU, float32/bfloat16/float16, contiguous, built)."""
    return keys.device.type == "cpu" and keys.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and keys.is_contiguous() and load() is not None
