"""Pure shard math: which slices of which host tensor a TP rank of a layout holds.

A :class:`TensorRole` (made by :mod:`seesaw_ds.model.families` from transformers' TP plan) says how a
tensor splits. The host copy keeps every tensor so that a rank's piece of each *block* is a contiguous
range along one dimension, the *shard dimension* (-2 for matrices and stacked expert matrices, 0 for
vectors):

- column-parallel tensors (split along output features: q/k/v, gate/up, packed expert gate/up, their
  biases, OLMo-2's q/k norm weights) are stored as checkpointed, ``[..., out, in]``;
- row-parallel tensors (split along input features: o/down, expert down) are stored with their last two
  dimensions swapped, ``[..., in, out]``, so a shard is again a range along dimension -2 and the layer
  uses its transpose view (no copy);
- everything else is replicated.

A tensor may hold several *blocks* along its shard dimension (Phi-3's fused ``qkv_proj`` is
``[q | k | v]``, a packed ``gate_up_proj`` is ``[gate | up]``): each block is split on its own — q by
query heads, k and v by KV heads (replicated when tp exceeds them), the rest evenly — and a rank's shard
is the list of its ranges, one per block. One range is a view; several are the sub-blocks a fused
module computes side by side. Switching layouts never re-lays out memory.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from seesaw_ds.distributed.layout import ModelDims, head_range, kv_head_range


class ShardKind(enum.Enum):
    """How a tensor is split across TP ranks."""

    REPLICATED = "replicated"
    COLUMN = "column"  # split along output features: stored as checkpointed
    ROW = "row"        # split along input features: stored with the last two dimensions swapped


class Split(enum.Enum):
    """How one block of a tensor's shard dimension divides over TP ranks."""

    HEADS = "heads"        # by query head (head_dim rows each)
    KV_HEADS = "kv_heads"  # by KV head; replicated on tp / num_kv_heads ranks when tp exceeds them
    EVEN = "even"          # equal contiguous parts (tp must divide the block)


@dataclass(frozen=True)
class TensorRole:
    """How one host tensor shards: its kind and the blocks (split, size) along its shard dimension."""

    kind: ShardKind
    blocks: tuple[tuple[Split, int], ...] = ()

    @property
    def transposed(self) -> bool:
        """Whether the host copy swaps the tensor's last two dimensions."""
        return self.kind is ShardKind.ROW


REPLICATED = TensorRole(ShardKind.REPLICATED)


def host_shape(shape: tuple[int, ...], role: TensorRole) -> tuple[int, ...]:
    """Shape of a tensor in the host copy (row-parallel tensors have their last two dimensions swapped)."""
    if role.transposed and len(shape) >= 2:
        return (*shape[:-2], shape[-1], shape[-2])
    return tuple(shape)


def shard_dim(ndim: int) -> int:
    """The host dimension a shard is taken along: -2 for matrices and expert stacks, 0 for vectors."""
    return 0 if ndim == 1 else ndim - 2


def block_range(split: Split, size: int, dims: ModelDims, tp: int, tp_index: int) -> range:
    """The part of one block of ``size`` rows that TP rank ``tp_index`` of ``tp`` holds (offsets in the block)."""
    if tp == 1:
        return range(size)
    if split is Split.KV_HEADS:
        heads, count = kv_head_range(dims.num_kv_heads, tp, tp_index), dims.num_kv_heads
    elif split is Split.HEADS:
        heads, count = head_range(dims.num_heads, tp, tp_index), dims.num_heads
    else:
        if size % tp:
            raise ValueError(f"a block of {size} rows cannot be split evenly over tp={tp}")
        per_rank = size // tp
        return range(tp_index * per_rank, (tp_index + 1) * per_rank)
    per_head = size // count
    return range(heads.start * per_head, heads.stop * per_head)


def shard_ranges(role: TensorRole, size: int, dims: ModelDims, tp: int, tp_index: int) -> list[range]:
    """Ranges of the host tensor's shard dimension (``size`` long) that a TP rank holds, one per block."""
    if role.kind is ShardKind.REPLICATED:
        return [range(size)]
    blocks = role.blocks or ((Split.EVEN, size),)
    if sum(block for _, block in blocks) != size:
        raise ValueError(f"blocks {blocks} do not add up to the tensor's {size} rows")
    ranges, offset = [], 0
    for split, block in blocks:
        part = block_range(split, block, dims, tp, tp_index)
        ranges.append(range(offset + part.start, offset + part.stop))
        offset += block
    return ranges
