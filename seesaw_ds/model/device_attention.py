"""Attention on an accelerator: torch's own fused kernels, chosen so that no call pays a per-shape set-up.

Measured on an H200 (torch 2.11, ``tests/gpu/profile_decode.py``): with torch's default SDPA choice a masked
decode call and a causal prefill call went to cuDNN's fused attention, which builds a cuDNN graph for every
new shape. A decode step's keys grow by one token each step, so every call built one: 6.6-17 ms of host time
per call against 8 us on the device, and a decode step of an 8-layer Llama-3-8B-shaped model took 50 ms
instead of 2. So:

- :func:`configure` turns cuDNN's SDPA off on the accelerator (flash and memory-efficient attention remain,
  neither of which is set up per shape);
- **prefill** is one call per layer through torch's variable-length flash attention
  (``torch.nn.attention.varlen.varlen_attn``: the packed row, ``cu_seqlens``, GQA, causal) where the torch
  in use has it, the dtype is half or bfloat16 and the call needs neither a window nor a soft-cap. Its use is
  checked once per process against per-prompt SDPA on a small random batch of the same heads and head size;
  a mismatch or error turns it off with one warning, and the caller's per-prompt loop runs instead.
- **decode** needs no kernel of its own here: attention.py gathers each sequence's KV into a padded batch
  and computes grouped scores with two batched matmuls (:func:`seesaw_ds.model.attention._decode_padded`).

Written here rather than taken from FlashInfer or flash-attn because neither is installed where the engine
runs (their wheels are tied to a torch and CUDA build); a paged kernel from either plugs in beside these.
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch

from seesaw_ds.model.attention_reference import prefill_reference

log = logging.getLogger(__name__)

_state: dict[tuple, bool] = {}  # (device type, dtype, Hq, Hkv, D) -> varlen flash verified usable


def configure(device: torch.device) -> None:
    """Set the accelerator's SDPA choices for the engine's shapes (see the module docstring); no-op on a CPU."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _keywords(varlen_attn) -> frozenset[str]:
    """The keywords this torch's ``varlen_attn`` takes (read once, not on every layer's call)."""
    return frozenset(inspect.signature(varlen_attn).parameters)


def _call_varlen(varlen_attn, query, key, value, cu, max_len: int, scaling: float) -> torch.Tensor:
    """``varlen_attn`` on [T, H, D] tensors, causal, over whichever keywords this torch's version takes."""
    params = _keywords(varlen_attn)
    kwargs = {"scale": scaling}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = query.shape[1] != key.shape[1]
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    return varlen_attn(query, key, value, cu, cu, max_len, max_len, **kwargs)


def _usable(key_of_call: tuple, device: torch.device, dtype: torch.dtype, n_q: int, n_kv: int, dim: int) -> bool:
    if key_of_call in _state:
        return _state[key_of_call]
    varlen_attn = _varlen()
    ok, why = False, "torch has no torch.nn.attention.varlen"
    if varlen_attn is not None:
        generator = torch.Generator(device=device).manual_seed(0)
        bounds = [0, 5, 16, 19]
        make = lambda heads: torch.randn(heads, bounds[-1], dim, generator=generator, device=device, dtype=dtype)
        query, key, value = make(n_q), make(n_kv), make(n_kv)
        try:
            cu = torch.tensor(bounds, dtype=torch.int32, device=device)
            got = _call_varlen(varlen_attn, query.transpose(0, 1).contiguous(), key.transpose(0, 1).contiguous(),
                               value.transpose(0, 1).contiguous(), cu, 11, dim ** -0.5).transpose(0, 1)
            want = prefill_reference(query[None], key[None], value[None], bounds, dim ** -0.5, None)[0]
            error = (got.float() - want.float()).abs().max().item()
            ok, why = error <= 2e-2, f"it differs from per-prompt SDPA by {error:.3g}"
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
            why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if not ok:
        log.warning("seesaw_ds: variable-length flash attention is not used for prefill (%s); one SDPA call per "
                    "prompt instead", why)
    _state[key_of_call] = ok
    return ok


def prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: list[int], scaling: float,
            window: int | None, softcap: float | None, cache: dict) -> torch.Tensor | None:
    """Causal attention within each prompt of a packed row on an accelerator, one call: ``query`` [Hq, T, D],
    ``key``/``value`` [Hkv, T, D]; returns [Hq, T, D], or None where the varlen kernel does not apply (the
    caller then runs one SDPA call per prompt). ``cache`` (the batch's metadata) keeps the device copy of
    ``cu_seqlens`` across layers."""
    if window or softcap or query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] > 256:
        return None
    n_q, n_kv, dim = query.shape[0], key.shape[0], query.shape[-1]
    if n_q % n_kv or not _usable((query.device.type, query.dtype, n_q, n_kv, dim), query.device, query.dtype,
                                 n_q, n_kv, dim):
        return None
    if "cu" not in cache:
        cache["cu"] = torch.tensor(cu_seqlens, dtype=torch.int32).to(query.device, non_blocking=True)
        cache["max"] = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    out = _call_varlen(_varlen(), query.transpose(0, 1).contiguous(), key.transpose(0, 1).contiguous(),
                       value.transpose(0, 1).contiguous(), cache["cu"], cache["max"], scaling)
    return out.transpose(0, 1)


def describe(device: torch.device) -> str:
    """What attention ran on ``device`` in this process, in words (for reports)."""
    if device.type == "cpu":
        return "the CPU kernels (seesaw_ds/model/kernels.py)"
    used = sorted({ok for key, ok in _state.items() if key[0] == device.type})
    prefill = {(): "prefill not run", (False,): "prefill one SDPA call per prompt (varlen flash refused)",
               (True,): "prefill through varlen flash attention",
               (False, True): "prefill through varlen flash attention for some shapes"}[tuple(used)]
    cudnn_off = device.type == "cuda" and not torch.backends.cuda.cudnn_sdp_enabled()
    cudnn = "cuDNN SDPA off" if cudnn_off else "SDPA defaults"
    return f"{prefill}; decode a padded gather and grouped matmuls; {cudnn}"
