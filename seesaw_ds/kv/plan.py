"""KV re-shard planning: which (layers, KV heads) rectangle of one sequence's KV moves from which source rank
to which destination rank when an instance switches from one layout to another.

Prefill KV is staged in host memory head-major, ``[layer, k|v, kv_head, token, head_dim]``; each rank of the
source layout writes its own rectangle, each rank of the destination layout pulls its own. Both rectangles
are plain ``(layers, kv_heads)`` ranges, so a plan is the list of their non-empty intersections.

Pure: no torch, no processes; the shard math comes from :mod:`seesaw_ds.distributed.layout`.
"""
from __future__ import annotations

from dataclasses import dataclass

from seesaw_ds.distributed.layout import Layout, ModelDims, kv_head_range, layer_range, validate_layout


@dataclass(frozen=True)
class KVPiece:
    """One rectangle of a sequence's KV, copied from the staging area by one reader."""

    layers: range
    """Global decoder-layer indices (contiguous, step 1)."""
    kv_heads: range
    """Global KV-head indices (contiguous, step 1)."""
    src_rank: int
    """Instance rank that wrote this piece into staging, under the source layout."""
    dst_rank: int
    """Instance rank that reads this piece, under the destination layout."""


def kv_writes(layout: Layout, dims: ModelDims, instance_rank: int) -> tuple[range, range] | None:
    """``(layers, kv_heads)`` that ``instance_rank`` writes to staging for a sequence it processed under
    ``layout``, or ``None`` when it writes nothing.

    With KV-head replication (``tp > num_kv_heads``) only the first rank of each replica set writes, so every
    (layer, head) of a sequence is written exactly once.
    """
    _check_layout("layout", layout, dims)
    _check_rank(layout, instance_rank)
    _, pp_index, tp_index = layout.coords(instance_rank)
    if layout.tp > dims.num_kv_heads and tp_index % (layout.tp // dims.num_kv_heads):
        return None
    return _rectangle(layout, dims, pp_index, tp_index)


def kv_reads(layout: Layout, dims: ModelDims, instance_rank: int) -> tuple[range, range]:
    """``(layers, kv_heads)`` that ``instance_rank`` holds in its device tier under ``layout``; every replica
    of a replicated KV head reads that head."""
    _check_layout("layout", layout, dims)
    _check_rank(layout, instance_rank)
    _, pp_index, tp_index = layout.coords(instance_rank)
    return _rectangle(layout, dims, pp_index, tp_index)


def plan_kv_reshard(src: Layout, src_replica: int, dst: Layout, dst_replica: int,
                    dims: ModelDims) -> list[KVPiece]:
    """Every piece moved for one sequence written by data-parallel replica ``src_replica`` of ``src`` and
    read by replica ``dst_replica`` of ``dst``, sorted by ``(dst_rank, layers.start, kv_heads.start)``.

    The pieces of one ``dst_rank`` tile its :func:`kv_reads` rectangle exactly, because the writers of a
    replica partition the whole (layer, head) grid.
    """
    _check_layout("src", src, dims)
    _check_layout("dst", dst, dims)
    _check_replica("src_replica", src_replica, src)
    _check_replica("dst_replica", dst_replica, dst)
    writers = [(rank, rect) for rank in src.replica_ranks(src_replica)
               if (rect := kv_writes(src, dims, rank)) is not None]
    pieces = []
    for dst_rank in dst.replica_ranks(dst_replica):
        read_layers, read_heads = kv_reads(dst, dims, dst_rank)
        for src_rank, (write_layers, write_heads) in writers:
            layers = _intersect(read_layers, write_layers)
            heads = _intersect(read_heads, write_heads)
            if layers and heads:
                pieces.append(KVPiece(layers, heads, src_rank, dst_rank))
    pieces.sort(key=lambda p: (p.dst_rank, p.layers.start, p.kv_heads.start))
    return pieces


def reads_own_writes(layout: Layout, dims: ModelDims, node_of) -> bool:
    """Can every rank of ``layout`` read the KV its own replica wrote under ``layout`` from its node's staging
    area (each writer of a (layer, head) it holds on its node)? Needed to reuse a cached prompt prefix as a
    prefill's context; ``node_of(instance_rank)`` is the rank's node."""
    return all(node_of(piece.src_rank) == node_of(piece.dst_rank)
               for replica in range(layout.dp)
               for piece in plan_kv_reshard(layout, replica, layout, replica, dims))


def prefix_homes(layout: Layout, dims: ModelDims, node_of) -> list[int]:
    """For each replica of ``layout``, the first replica whose written KV it reads from its node's staging area
    wherever it needs it, and whose ranks read its own alike (every (layer, head) piece held on the same node
    by both): replicas with one home share the prefixes either of them caches (on one node, all of them).
    ``node_of(instance_rank)`` is the rank's node; pure."""
    def local(a: int, b: int) -> bool:
        return all(node_of(piece.src_rank) == node_of(piece.dst_rank)
                   for piece in plan_kv_reshard(layout, a, layout, b, dims))
    return [next(h for h in range(r + 1) if h == r or (local(h, r) and local(r, h))) for r in range(layout.dp)]


def pieces_for(pieces: list[KVPiece], *, src_rank: int | None = None,
               dst_rank: int | None = None) -> list[KVPiece]:
    """The pieces written by ``src_rank`` and/or read by ``dst_rank`` (``None`` matches any), in order."""
    return [p for p in pieces
            if (src_rank is None or p.src_rank == src_rank) and (dst_rank is None or p.dst_rank == dst_rank)]


def _rectangle(layout: Layout, dims: ModelDims, pp_index: int, tp_index: int) -> tuple[range, range]:
    return (layer_range(dims.num_layers, layout.pp, pp_index),
            kv_head_range(dims.num_kv_heads, layout.tp, tp_index))


def _intersect(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


def _check_layout(name: str, layout: Layout, dims: ModelDims) -> None:
    # validate_layout divides by these, so a zero would surface as a ZeroDivisionError instead of a message.
    if dims.num_layers < 1 or dims.num_kv_heads < 1:
        raise ValueError(f"ModelDims(num_layers={dims.num_layers}, num_kv_heads={dims.num_kv_heads}): "
                         f"both must be at least 1")
    validate_layout(name, layout, dims)


def _check_rank(layout: Layout, instance_rank: int) -> None:
    if not isinstance(instance_rank, int) or not 0 <= instance_rank < layout.num_ranks:
        raise ValueError(f"instance_rank={instance_rank!r} is outside a {layout} instance; "
                         f"use 0 <= instance_rank < {layout.num_ranks}")


def _check_replica(name: str, replica: int, layout: Layout) -> None:
    if not isinstance(replica, int) or not 0 <= replica < layout.dp:
        raise ValueError(f"{name}={replica!r} is not a data-parallel replica of {layout} (dp={layout.dp}); "
                         f"use 0 <= {name} < {layout.dp}")
