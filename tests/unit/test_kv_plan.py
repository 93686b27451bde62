"""KV re-shard plan tests: write a value-encoded global KV by the source layout, read it back through the plan
by the destination layout, and compare with a direct slice. Pure numpy, no processes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from seesaw_ds.distributed.layout import Layout, LayoutError, ModelDims, validate_layout
from seesaw_ds.kv.plan import (KVPiece, kv_reads, kv_writes, pieces_for, plan_kv_reshard, prefix_homes,
                               reads_own_writes)

NUM_TOKENS = 3
HEAD_DIM = 2


def dims(num_layers: int, num_heads: int, num_kv_heads: int) -> ModelDims:
    return ModelDims(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=HEAD_DIM,
                     hidden_size=num_heads * HEAD_DIM, intermediate_size=4, vocab_size=16)


# Uneven layer counts, every KV-head count from MQA to MHA; num_heads divisible by every tp up to 8.
DIMS = [dims(3, 8, 1), dims(5, 8, 2), dims(7, 16, 4), dims(8, 8, 8), dims(11, 16, 2)]


def layouts_of(num_ranks: int) -> list[Layout]:
    """Every (dp, tp, pp) with dp * tp * pp == num_ranks."""
    return [Layout(dp=dp, tp=tp, pp=num_ranks // (dp * tp))
            for dp in range(1, num_ranks + 1) for tp in range(1, num_ranks + 1)
            if num_ranks % (dp * tp) == 0]


def is_valid(layout: Layout, model: ModelDims) -> bool:
    try:
        validate_layout("test", layout, model)
    except LayoutError:
        return False
    return True


LAYOUT_PAIRS = [(src, dst) for n in (1, 2, 4, 8) for src, dst in itertools.product(layouts_of(n), repeat=2)]
CASES = [pytest.param(src, dst, model, id=f"{src}->{dst}-L{model.num_layers}kv{model.num_kv_heads}")
         for src, dst in LAYOUT_PAIRS for model in DIMS if is_valid(src, model) and is_valid(dst, model)]


def global_kv(model: ModelDims) -> np.ndarray:
    """``[layer, k|v, kv_head, token, head_dim]`` with ``layer*1e6 + kv*1e5 + head*1e3 + token``."""
    layer, kv, head, token, _ = np.indices((model.num_layers, 2, model.num_kv_heads, NUM_TOKENS, HEAD_DIM))
    return (layer * 1e6 + kv * 1e5 + head * 1e3 + token).astype(np.float64)


def region(layers: range, heads: range) -> tuple[slice, slice, slice]:
    return slice(layers.start, layers.stop), slice(None), slice(heads.start, heads.stop)


def stage(src: Layout, src_replica: int, model: ModelDims, kv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each rank of one source replica writes its slice; returns the staging area and the writer of each
    element. Asserts every element is written exactly once."""
    staging = np.full_like(kv, np.nan)
    writer = np.full(kv.shape, -1)
    write_count = np.zeros(kv.shape, dtype=np.int64)
    for rank in src.replica_ranks(src_replica):
        rect = kv_writes(src, model, rank)
        if rect is None:
            continue
        where = region(*rect)
        staging[where] = kv[where]
        writer[where] = rank
        write_count[where] += 1
    assert (write_count == 1).all(), "some (layer, head) written zero or several times"
    return staging, writer


def assemble(pieces: list[KVPiece], dst_rank: int, reads: tuple[range, range], staging: np.ndarray,
             writer: np.ndarray) -> np.ndarray:
    """Build a destination rank's slice from staging, touching staging only through its pieces."""
    read_layers, read_heads = reads
    out = np.full((len(read_layers), 2, len(read_heads), NUM_TOKENS, HEAD_DIM), np.nan)
    cover = np.zeros(out.shape, dtype=np.int64)
    for piece in pieces_for(pieces, dst_rank=dst_rank):
        assert piece.layers.step == 1 and piece.kv_heads.step == 1
        assert len(piece.layers) and len(piece.kv_heads), f"empty piece {piece}"
        assert piece.layers.start >= read_layers.start and piece.layers.stop <= read_layers.stop
        assert piece.kv_heads.start >= read_heads.start and piece.kv_heads.stop <= read_heads.stop
        assert (writer[region(piece.layers, piece.kv_heads)] == piece.src_rank).all(), \
            f"{piece} names a source rank that did not write it"
        local = region(range(piece.layers.start - read_layers.start, piece.layers.stop - read_layers.start),
                       range(piece.kv_heads.start - read_heads.start, piece.kv_heads.stop - read_heads.start))
        out[local] = staging[region(piece.layers, piece.kv_heads)]
        cover[local] += 1
    assert (cover == 1).all(), f"pieces of dst rank {dst_rank} leave a gap or overlap"
    return out


@pytest.mark.parametrize("src, dst, model", CASES)
def test_plan_moves_every_rank_its_slice(src: Layout, dst: Layout, model: ModelDims):
    kv = global_kv(model)
    for src_replica, dst_replica in itertools.product(range(src.dp), range(dst.dp)):
        staging, writer = stage(src, src_replica, model, kv)
        plan = plan_kv_reshard(src, src_replica, dst, dst_replica, model)
        assert plan == sorted(plan, key=lambda p: (p.dst_rank, p.layers.start, p.kv_heads.start))
        assert {p.src_rank for p in plan} <= set(src.replica_ranks(src_replica))
        assert {p.dst_rank for p in plan} == set(dst.replica_ranks(dst_replica))
        for dst_rank in dst.replica_ranks(dst_replica):
            reads = kv_reads(dst, model, dst_rank)
            got = assemble(plan, dst_rank, reads, staging, writer)
            np.testing.assert_array_equal(got, kv[region(*reads)])


def test_named_layout_pairs_are_covered():
    named = [(Layout(pp=2), Layout(tp=2)), (Layout(tp=2), Layout(pp=2)), (Layout(dp=2), Layout(tp=2)),
             (Layout(tp=2), Layout(dp=2)), (Layout(pp=4), Layout(tp=4)), (Layout(pp=4), Layout(tp=2, pp=2)),
             (Layout(tp=2, pp=2), Layout(tp=4)), (Layout(dp=2, pp=2), Layout(dp=2, tp=2))]
    covered = {(case.values[0], case.values[1]) for case in CASES}
    assert set(named) <= covered
    replicated = {(case.values[0].tp, case.values[2].num_kv_heads) for case in CASES
                  if case.values[0].tp > case.values[2].num_kv_heads}
    assert {(2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (8, 4)} <= replicated


def test_pp2_to_tp2_pieces():
    model = dims(4, 4, 2)
    plan = plan_kv_reshard(Layout(pp=2), 0, Layout(tp=2), 0, model)
    assert plan == [KVPiece(range(0, 2), range(0, 1), 0, 0), KVPiece(range(2, 4), range(0, 1), 1, 0),
                    KVPiece(range(0, 2), range(1, 2), 0, 1), KVPiece(range(2, 4), range(1, 2), 1, 1)]
    assert pieces_for(plan, src_rank=1) == [plan[1], plan[3]]
    assert pieces_for(plan, src_rank=1, dst_rank=0) == [plan[1]]


def test_uneven_layers_give_first_stage_the_extra_layer():
    model = dims(5, 4, 2)
    assert kv_writes(Layout(pp=2), model, 0) == (range(0, 3), range(0, 2))
    assert kv_reads(Layout(pp=2), model, 1) == (range(3, 5), range(0, 2))


def test_replicated_heads_written_once_read_by_every_replica():
    model = dims(2, 8, 2)  # tp=4: ranks 0,1 share head 0; ranks 2,3 share head 1
    layout = Layout(tp=4)
    assert [kv_writes(layout, model, r) for r in range(4)] == [(range(0, 2), range(0, 1)), None,
                                                              (range(0, 2), range(1, 2)), None]
    assert [kv_reads(layout, model, r)[1] for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    plan = plan_kv_reshard(layout, 0, layout, 0, model)
    assert [(p.src_rank, p.dst_rank) for p in plan] == [(0, 0), (0, 1), (2, 2), (2, 3)]


@pytest.mark.parametrize("src, dst", [(Layout(dp=2, tp=2), Layout(dp=2, pp=2)), (Layout(dp=4), Layout(dp=2, tp=2)),
                                      (Layout(dp=2, pp=2, tp=2), Layout(dp=4, tp=2))])
def test_replicas_select_their_own_ranks(src: Layout, dst: Layout):
    model = dims(4, 8, 2)
    base = plan_kv_reshard(src, 0, dst, 0, model)
    src_size, dst_size = src.num_ranks // src.dp, dst.num_ranks // dst.dp
    for src_replica, dst_replica in itertools.product(range(src.dp), range(dst.dp)):
        plan = plan_kv_reshard(src, src_replica, dst, dst_replica, model)
        assert {p.src_rank for p in plan} == set(src.replica_ranks(src_replica))
        assert {p.dst_rank for p in plan} == set(dst.replica_ranks(dst_replica))
        shifted = [KVPiece(p.layers, p.kv_heads, p.src_rank + src_replica * src_size,
                           p.dst_rank + dst_replica * dst_size) for p in base]
        assert plan == shifted


def test_dp2_tp2_replica1_to_dp2_pp2_replica0():
    model = dims(4, 4, 2)
    plan = plan_kv_reshard(Layout(dp=2, tp=2), 1, Layout(dp=2, pp=2), 0, model)
    assert plan == [KVPiece(range(0, 2), range(0, 1), 2, 0), KVPiece(range(0, 2), range(1, 2), 3, 0),
                    KVPiece(range(2, 4), range(0, 1), 2, 1), KVPiece(range(2, 4), range(1, 2), 3, 1)]


@pytest.mark.parametrize("src_replica, dst_replica", [(2, 0), (-1, 0), (0, 1), (0, -1)])
def test_replica_out_of_range_raises(src_replica: int, dst_replica: int):
    with pytest.raises(ValueError, match="replica"):
        plan_kv_reshard(Layout(dp=2), src_replica, Layout(tp=2), dst_replica, dims(4, 4, 2))


def test_bad_rank_and_bad_layout_raise():
    model = dims(4, 4, 2)
    with pytest.raises(ValueError, match="instance_rank=2"):
        kv_writes(Layout(tp=2), model, 2)
    with pytest.raises(ValueError, match="instance_rank=-1"):
        kv_reads(Layout(tp=2), model, -1)
    with pytest.raises(ValueError, match="tp=3"):
        plan_kv_reshard(Layout(tp=3), 0, Layout(pp=3), 0, model)
    with pytest.raises(ValueError, match="pp=8"):
        kv_reads(Layout(pp=8), model, 0)
    with pytest.raises(ValueError, match="num_kv_heads=0"):
        kv_reads(Layout(), dims(4, 4, 0), 0)


def test_a_replica_reads_its_own_staged_kv_only_where_its_writers_share_its_node():
    """A cached prompt prefix is read back by the prefill ranks from their node's staging area: fine when
    each rank's writers are on its node, refused when a TP group (with replicated KV heads) spans nodes."""
    model = dims(4, 8, 2)
    assert reads_own_writes(Layout(dp=2, pp=2), model, lambda rank: rank // 2)  # each replica on a node
    assert reads_own_writes(Layout(pp=2, tp=2), model, lambda rank: rank // 2)  # a stage per node
    # tp4 over 2 KV heads: ranks 1 and 3 read heads written by ranks 0 and 2; rank 1 sits on another node
    assert not reads_own_writes(Layout(tp=4), model, lambda rank: rank % 2)


def test_replicas_share_a_prefix_home_where_they_read_each_others_staged_kv():
    """Prefill replicas whose ranks hold every (layer, head) piece on the same node as each other's read what
    the other wrote from their node's staging area: one home, one prefix cache between them."""
    model = dims(4, 8, 2)
    assert prefix_homes(Layout(dp=2), model, lambda rank: 0) == [0, 0]  # one node
    assert prefix_homes(Layout(dp=4, tp=2), model, lambda rank: 0) == [0, 0, 0, 0]
    assert prefix_homes(Layout(dp=2), model, lambda rank: rank) == [0, 1]  # a replica per node
    assert prefix_homes(Layout(dp=4), model, lambda rank: rank // 2) == [0, 0, 2, 2]  # two replicas per node
    # dp2 x pp2 over two nodes, stage 0 of both replicas on node 0: replica 1's stages sit where replica 0's do
    assert prefix_homes(Layout(dp=2, pp=2), model, lambda rank: rank % 2) == [0, 0]
    # ... and each replica on a node of its own: apart
    assert prefix_homes(Layout(dp=2, pp=2), model, lambda rank: rank // 2) == [0, 1]
    assert prefix_homes(Layout(), model, lambda rank: 0) == [0]
