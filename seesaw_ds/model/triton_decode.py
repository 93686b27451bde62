"""Paged decode attention on a GPU: a Triton kernel that reads each sequence's block table itself.

One new query token per sequence attends over that sequence's KV in the paged device-tier cache
(``flat_keys`` / ``flat_values``: ``[slots, kv_heads, head_dim]``, block ``b`` holding slots
``b * block_size ...``). The padded path it replaces (:func:`seesaw_ds.model.attention._decode_padded`)
gathers every sequence's blocks into a batch as wide as the longest sequence, so it reads the KV twice and
pays for the padding; this kernel reads each valid token's K and V once, straight from its block.

- One program per (sequence, KV head, partition of the sequence's blocks): the query heads of a KV head are
  taken together (GQA without repeating K/V); scores, softmax and the weighted sum in float32 with an online
  softmax over the blocks (flash-decoding). A sliding window skips whole blocks before it and masks the rest;
  a soft-cap (Gemma 2) is ``cap * tanh(s / cap)`` before the mask, as transformers' eager attention.
- Long sequences are split over partitions of :data:`BLOCKS_PER_PART` blocks so that a small batch still fills
  the GPU; a second kernel merges the partitions' (max, sum, weighted sum) into the output. One partition
  writes the output directly.
- The partition count is a compile-time constant of both kernels, so it is launched rounded up to a power of
  two (:func:`launch_partitions`): the extra partitions hold no blocks, store (-inf, 0, 0) and weigh 0 in the
  merge. A decode whose longest sequence grows then compiles a new variant only when the count doubles (log2
  variants, not one per 512 tokens); :mod:`seesaw_ds.model.device_attention` checks the single-partition one
  and a multi-partition one before first use, and each larger count before the first step that launches it.
- Every shape the kernel sees is an argument: the grid depends only on the batch size and the partitions
  (``max_length`` is known on the host), so nothing here synchronises with the device.

Why Triton and not torch's flash path with per-sequence lengths: torch's flash decode entry points take
contiguous per-sequence KV (``seqused_k`` over a padded batch), not a block table, so they need the gather this
kernel removes; FlashInfer and flash-attn's paged kernels are not installed where the engine runs (their wheels
are tied to a torch and CUDA build), while Triton ships inside the CUDA torch wheel. On a CPU the same kernel
runs under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported, which is why the tests run
it in a process of its own): how they check it against the per-sequence SDPA reference without a GPU. The
interpreter rounds float32 -> bfloat16 by truncation where a GPU rounds to nearest, so the tests compare within
a bf16 ulp rather than bit for bit.
"""
from __future__ import annotations

import functools
import math

import torch

BLOCKS_PER_PART = 32
"""Cache blocks one program reads before its partial result is merged (512 tokens at the default block size 16)."""


def available() -> bool:
    """Whether Triton can be imported (it ships inside the CUDA torch wheel; on a CPU it comes with xgrammar)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def applies(query: torch.Tensor) -> bool:
    """Whether this kernel serves a decode step over ``query`` (a CUDA tensor, Triton importable)."""
    return query.device.type == "cuda" and available()


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@functools.cache
def _kernels():
    """The two kernels: compiled by Triton, or run by its interpreter on CPU tensors where ``TRITON_INTERPRET=1``
    was set before Triton was first imported (the tests)."""
    import triton

    from seesaw_ds.model import triton_decode_kernels as source

    return triton.jit(source.attend), triton.jit(source.merge)


def partitions(max_length: int, block_size: int, blocks_per_part: int = BLOCKS_PER_PART) -> int:
    """Partitions the longest sequence's blocks are split into (1: the kernel writes the output itself)."""
    blocks = -(-max_length // block_size)
    return max(1, -(-blocks // blocks_per_part))


def launch_partitions(max_length: int, block_size: int, blocks_per_part: int = BLOCKS_PER_PART) -> int:
    """Partitions the kernels are launched (and compiled) with: :func:`partitions` rounded up to a power of two,
    so that a growing sequence compiles a new variant only when the count doubles; the partitions past the
    longest sequence's blocks are empty (their (-inf, 0, 0) weighs 0 in the merge). 1 only where one partition
    holds every block: the only case in which the kernel writes the output itself."""
    return _pow2(partitions(max_length, block_size, blocks_per_part))


def paged_decode_attention(query: torch.Tensor, flat_keys: torch.Tensor, flat_values: torch.Tensor,
                           block_table: torch.Tensor, lengths: torch.Tensor, max_length: int, block_size: int,
                           scale: float, window: int | None = None, softcap: float | None = None, *,
                           blocks_per_part: int = BLOCKS_PER_PART) -> torch.Tensor:
    """Attention of one query token per sequence over its cached KV: ``query`` ``[N, Hq, D]`` (any strides
    with a unit last one), the cache views ``[slots, Hkv, D]`` (contiguous), ``block_table`` ``[N, >= blocks]``
    and ``lengths`` ``[N]`` (integers on the query's device; each length counts the new token, already written),
    ``max_length`` the longest of ``lengths`` as the host knows it. Returns ``[N, Hq, D]`` in the query's dtype."""
    n, heads, dim = query.shape
    kv_heads = flat_keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if query.stride(2) != 1 or not flat_keys.is_contiguous() or not flat_values.is_contiguous():
        raise ValueError("paged_decode_attention needs a unit last stride on the query and contiguous cache views")
    out = torch.empty((n, heads, dim), dtype=query.dtype, device=query.device)
    if n == 0:
        return out
    parts = launch_partitions(max_length, block_size, blocks_per_part)   # a power of two: few compiled variants
    attend, merge = _kernels()
    group = heads // kv_heads
    if parts > 1:
        part_max = torch.empty((n * heads * parts,), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((n * heads * parts, dim), dtype=torch.float32, device=query.device)
    else:
        part_max = part_sum = part_acc = out   # not read: the kernel writes the output itself
    table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    attend[(n, kv_heads, parts)](
        query, flat_keys, flat_values, table, lengths, out, part_max, part_sum, part_acc,
        query.stride(0), query.stride(1), table.stride(0), out.stride(0), out.stride(1),
        float(scale), float(softcap or 0.0), int(window or 0), blocks_per_part,
        KV_HEADS=kv_heads, GROUP=group, GROUP_P=_pow2(group), HEAD_DIM=dim, DIM_P=_pow2(dim),
        BLOCK=block_size, BLOCK_P=_pow2(block_size), PARTS=parts, SOFTCAP=bool(softcap), WINDOW=bool(window))
    if parts > 1:
        merge[(n, heads)](out, part_max, part_sum, part_acc, out.stride(0), out.stride(1),
                          HEADS=heads, HEAD_DIM=dim, DIM_P=_pow2(dim), PARTS=parts, PARTS_P=_pow2(parts))
    return out
