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
- **decode** on CUDA is the paged Triton kernel (:mod:`seesaw_ds.model.triton_decode`: the block table read
  on the device, no gather), checked once per process and shape against a direct computation on a small
  random fragmented cache (:func:`decode`); a mismatch, a compile error or no Triton turns it off with one
  warning, and attention.py gathers each sequence's KV into a padded batch and computes grouped scores with
  two batched matmuls instead (:func:`seesaw_ds.model.attention._decode_padded`). The check runs both compiled
  variants a step meets first: one partition (the kernel writes the output; every step up to 512 tokens at
  block size 16) and two partitions with the merge kernel, an empty partition among them; and, where the
  model has a sliding window, a window shorter than its sequences, so that the masking runs (the key keeps
  only whether there is one: a real window, thousands of tokens, would mask nothing in so small a cache).
  Four partitions and more (a power of two each: few) are checked the same way when a step first needs them,
  a failure falling back for that count alone.

Written here rather than taken from FlashInfer or flash-attn because neither is installed where the engine
runs (their wheels are tied to a torch and CUDA build); a paged kernel from either plugs in beside these.
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch

from seesaw_ds.model import triton_decode
from seesaw_ds.model.attention_reference import one_token, prefill_reference

log = logging.getLogger(__name__)

_state: dict[tuple, bool] = {}  # (device type, dtype, Hq, Hkv, D) -> varlen flash verified usable
_decode_state: dict[tuple, bool] = {}  # (device type, dtype, Hq, Hkv, D, block, window?, soft-cap?) -> paged ok


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


def _checked(state: dict, key_of_call: tuple, trial, refusal: str) -> bool:
    """Whether a kernel passed its one check for ``key_of_call``: ``trial() -> (ok, why)`` runs once, any
    exception refusing the kernel; a refusal is one warning (``refusal`` % why), and the result is kept."""
    if key_of_call in state:
        return state[key_of_call]
    try:
        ok, why = trial()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        ok, why = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if not ok:
        log.warning(refusal, why)
    state[key_of_call] = ok
    return ok


def _usable(key_of_call: tuple, device: torch.device, dtype: torch.dtype, n_q: int, n_kv: int, dim: int) -> bool:
    def trial() -> tuple[bool, str]:
        varlen_attn = _varlen()
        if varlen_attn is None:
            return False, "torch has no torch.nn.attention.varlen"
        generator = torch.Generator(device=device).manual_seed(0)
        bounds = [0, 5, 16, 19]
        make = lambda heads: torch.randn(heads, bounds[-1], dim, generator=generator, device=device, dtype=dtype)
        query, key, value = make(n_q), make(n_kv), make(n_kv)
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        got = _call_varlen(varlen_attn, query.transpose(0, 1).contiguous(), key.transpose(0, 1).contiguous(),
                           value.transpose(0, 1).contiguous(), cu, 11, dim ** -0.5).transpose(0, 1)
        want = prefill_reference(query[None], key[None], value[None], bounds, dim ** -0.5, None)[0]
        error = (got.float() - want.float()).abs().max().item()
        return error <= 2e-2, f"it differs from per-prompt SDPA by {error:.3g}"

    return _checked(_state, key_of_call, trial, "seesaw_ds: variable-length flash attention is not used for prefill "
                    "(%s); one SDPA call per prompt instead")


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


def _paged_reference(query, keys, values, tables: list[list[int]], lengths: list[int], block: int, scale: float,
                     window: int | None, softcap: float | None) -> torch.Tensor:
    """One query token per sequence over its slots (read through its block table), in float32."""
    outputs = []
    for row, (table, length) in enumerate(zip(tables, lengths)):
        slots = torch.tensor([b * block + t for b in table for t in range(block)][:length], device=query.device)
        if window:
            slots = slots[-window:]
        k, v = keys[slots].float().transpose(0, 1), values[slots].float().transpose(0, 1)   # [Hkv, L, D]
        outputs.append(one_token(query[row].float()[None, :, None], k, v, scale, softcap)[0, :, 0])
    return torch.stack(outputs)


def _decode_usable(key_of_call: tuple, query: torch.Tensor, n_kv: int, block: int, window, softcap,
                   parts: int = 1) -> bool:
    """Whether the Triton kernel passed its check for ``key_of_call``: with ``parts`` 1 (a shape's first call)
    the one-partition variant and the two-partition one; with more (a power of two), that count's variant, each
    count once, after the shape's first check passed."""
    def trial() -> tuple[bool, str]:
        if not triton_decode.available():
            return False, "Triton cannot be imported"
        device, dtype, (n_q, dim) = query.device, query.dtype, query.shape[1:]
        generator = torch.Generator(device=device).manual_seed(0)
        blocks = 12
        keys = torch.randn(blocks * block, n_kv, dim, generator=generator, device=device, dtype=dtype)
        values = torch.randn(blocks * block, n_kv, dim, generator=generator, device=device, dtype=dtype)
        tables, lengths = [[3, 0, 7], [5], [1, 9, 2, 11]], [2 * block + 1, 1, 4 * block]   # fragmented, ragged
        sample = torch.randn(len(lengths), n_q, dim, generator=generator, device=device, dtype=dtype)
        table = torch.tensor([t + [0] * (4 - len(t)) for t in tables], device=device)
        lengths_on_device = torch.tensor(lengths, device=device)
        # a window shorter than the sequences (a real one would mask nothing here): the last sequence skips whole
        # blocks and masks part of the next
        shown = min(window, block + 3) if window else None
        want = _paged_reference(sample, keys, values, tables, lengths, block, dim ** -0.5, shown, softcap)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        # (blocks a partition, the longest length the launch is sized for): one partition (every step whose
        # longest sequence fits in BLOCKS_PER_PART blocks) and two, merged; or ``parts`` of one block each, the
        # sequences' blocks in the first four, the rest empty (as in a graphed step sized for its buffers)
        variants = ([(triton_decode.BLOCKS_PER_PART, max(lengths)), (2, max(lengths))] if parts == 1
                    else [(1, parts * block)])
        for blocks_per_part, max_length in variants:
            got = triton_decode.paged_decode_attention(sample, keys, values, table, lengths_on_device, max_length,
                                                       block, dim ** -0.5, shown, softcap,
                                                       blocks_per_part=blocks_per_part)
            error = (got.float() - want).abs().max().item()
            if not error <= tolerance:
                launched = triton_decode.launch_partitions(max_length, block, blocks_per_part)
                return False, f"it differs from a direct computation by {error:.3g} over {launched} partition(s)"
        return True, ""

    refusal = ("seesaw_ds: the paged Triton decode kernel is not used (%s); decode gathers each sequence's KV into "
               "a padded batch instead")
    if parts <= 2:
        return _checked(_decode_state, key_of_call, trial, refusal)
    return (_decode_usable(key_of_call, query, n_kv, block, window, softcap)
            and _checked(_decode_state, key_of_call + (parts,), trial, refusal + f" where it would launch {parts} "
                         "partitions"))


def decode(query: torch.Tensor, flat_keys: torch.Tensor, flat_values: torch.Tensor, block_table: torch.Tensor,
           lengths: torch.Tensor, max_length: int, block_size: int, scaling: float, window: int | None,
           softcap: float | None) -> torch.Tensor | None:
    """One query token per sequence over the paged cache on CUDA, one kernel (two over long sequences):
    ``query`` [N, Hq, D], the cache views [slots, Hkv, D]; returns [N, Hq, D], or None where the paged kernel
    does not apply (not CUDA, no Triton, or its first check failed: the caller gathers a padded batch)."""
    if not triton_decode.applies(query):
        return None
    n_kv = flat_keys.shape[1]
    key_of_call = (query.device.type, query.dtype, query.shape[1], n_kv, query.shape[-1], block_size,
                   bool(window), bool(softcap))
    parts = triton_decode.launch_partitions(max_length, block_size)
    if query.shape[1] % n_kv or not _decode_usable(key_of_call, query, n_kv, block_size, window, softcap, parts):
        return None
    return triton_decode.paged_decode_attention(query, flat_keys, flat_values, block_table, lengths, max_length,
                                                block_size, scaling, window, softcap)


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
    paged = sorted({ok for key, ok in _decode_state.items() if key[0] == device.type})
    decode = {(): "decode a padded gather and grouped matmuls", (False,): "decode a padded gather and grouped matmuls "
              "(the paged Triton kernel refused)", (True,): "decode the paged Triton kernel",
              (False, True): "decode the paged Triton kernel for some shapes"}[tuple(paged)]
    return f"{prefill}; {decode}; {cudnn}"
