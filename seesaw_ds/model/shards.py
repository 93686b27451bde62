"""Pure shard math: which rows of which host tensor a rank of a layout holds.

The host copy keeps every tensor so that each rank's shard, under any TP degree, is a contiguous block
of rows:

- column-parallel linears (q/k/v/gate/up: split along the output features) are stored as checkpointed,
  ``[out, in]``; a shard is a range of rows;
- row-parallel linears (o/down: split along the input features) are stored transposed, ``[in, out]``; a
  shard is again a range of rows, and the layer uses its transpose view (no copy);
- everything else is replicated.

So switching layouts never re-lays out memory: a shard is a view, on the CPU free, on a GPU one
contiguous host-to-device copy.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from seesaw_ds.distributed.layout import ModelDims, head_range, kv_head_range

LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class ShardKind(enum.Enum):
    """How a tensor is split across TP ranks."""

    REPLICATED = "replicated"
    COLUMN = "column"        # split along output features: stored [out, in], shard = row range
    ROW = "row"              # split along input features: stored [in, out], shard = row range
    KV_COLUMN = "kv_column"  # k/v projections: split by KV head, replicated when tp > num_kv_heads


@dataclass(frozen=True)
class TensorRole:
    """Where a checkpoint tensor belongs: its layer (None for embeddings/norm/head), module and kind."""

    layer: int | None
    module: str
    param: str
    kind: ShardKind


def classify(name: str, row_parallel: frozenset[str]) -> TensorRole:
    """The role of checkpoint tensor ``name`` given AutoTP's row-parallel module names."""
    match = LAYER_PARAM.match(name)
    if not match:
        module, _, param = name.rpartition(".")
        return TensorRole(None, module, param, ShardKind.REPLICATED)
    layer, module, param = int(match.group(1)), match.group(2), match.group(3)
    if module in row_parallel:
        kind = ShardKind.ROW if param == "weight" else ShardKind.REPLICATED
    elif module.endswith(("k_proj", "v_proj")):
        kind = ShardKind.KV_COLUMN
    elif module.rsplit(".", 1)[-1].endswith("proj"):
        kind = ShardKind.COLUMN
    else:
        kind = ShardKind.REPLICATED
    return TensorRole(layer, module, param, kind)


def host_shape(shape: tuple[int, ...], kind: ShardKind) -> tuple[int, ...]:
    """Shape of a tensor in the host copy (row-parallel weights are stored transposed)."""
    if kind is ShardKind.ROW:
        return (shape[1], shape[0])
    return tuple(shape)


def shard_rows(kind: ShardKind, num_rows: int, dims: ModelDims, tp: int, tp_index: int, module: str) -> range:
    """Rows of the host tensor that TP rank ``tp_index`` of ``tp`` holds."""
    if kind is ShardKind.REPLICATED or tp == 1:
        return range(num_rows)
    if kind is ShardKind.KV_COLUMN:
        heads = kv_head_range(dims.num_kv_heads, tp, tp_index)
        per_head = num_rows // dims.num_kv_heads
        return range(heads.start * per_head, heads.stop * per_head)
    if module.endswith("q_proj") or (kind is ShardKind.ROW and module.endswith("o_proj")):
        heads = head_range(dims.num_heads, tp, tp_index)
        per_head = num_rows // dims.num_heads
        return range(heads.start * per_head, heads.stop * per_head)
    if num_rows % tp:
        raise ValueError(f"{module}: {num_rows} rows cannot be split evenly over tp={tp}")
    per_rank = num_rows // tp
    return range(tp_index * per_rank, (tp_index + 1) * per_rank)
