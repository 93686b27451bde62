"""Pure rank, shard and allocation math: layouts, shard rows, block and extent allocators, micro-batches."""
from __future__ import annotations

import random

import pytest
import torch

from seesaw_ds.cli import complete_layout_overrides
from seesaw_ds.distributed.layout import (Layout, LayoutError, ModelDims, head_range, kv_head_range, layer_range,
                                   validate_layouts)
from seesaw_ds.kv.blocks import BlockAllocator
from seesaw_ds.kv.staging import ExtentAllocator
from seesaw_ds.model.executor import SeqWork, micro_batches
from seesaw_ds.model.shards import REPLICATED, ShardKind, Split, TensorRole, host_shape, shard_ranges

DIMS = ModelDims(num_layers=5, num_heads=8, num_kv_heads=2, head_dim=16, hidden_size=128,
                 intermediate_size=256, vocab_size=1000)


@pytest.mark.parametrize("layout", [Layout(), Layout(tp=2), Layout(pp=4), Layout(dp=2, tp=2, pp=2)])
def test_coords_round_trip_and_groups_partition_ranks(layout):
    ranks = range(layout.num_ranks)
    assert [layout.instance_rank(*layout.coords(r)) for r in ranks] == list(ranks)
    for groups in (layout.tp_groups(), layout.pp_groups()):
        assert sorted(r for group in groups for r in group) == list(ranks)
    assert all(len(g) == layout.tp for g in layout.tp_groups())
    # TP groups are neighbouring ranks (most likely one node)
    assert all(g == tuple(range(g[0], g[0] + layout.tp)) for g in layout.tp_groups())


@pytest.mark.parametrize("num_layers,pp", [(5, 2), (5, 4), (7, 3), (4, 4), (3, 1)])
def test_layer_ranges_tile_the_model(num_layers, pp):
    ranges = [layer_range(num_layers, pp, i) for i in range(pp)]
    assert [layer for r in ranges for layer in r] == list(range(num_layers))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_head_ranges_and_kv_replication():
    assert [list(head_range(8, 4, i)) for i in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(kv_head_range(2, 4, i)) for i in range(4)] == [[0], [0], [1], [1]]
    assert [list(kv_head_range(4, 2, i)) for i in range(2)] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("prefill,decode,world,fragment", [
    (Layout(tp=3), Layout(tp=3), 3, "parallel.prefill.tp=3 does not divide the model's 8 attention heads"),
    (Layout(pp=6), Layout(tp=2, pp=3), 6, "parallel.prefill.pp=6 exceeds the model's 5 layers"),
    (Layout(pp=2), Layout(tp=4), 4, "must use the same number of ranks"),
    (Layout(pp=2), Layout(tp=2), 3, "does not divide the job's 3 ranks"),
    (Layout(tp=8), Layout(tp=8), 8, None),  # 8 > 2 KV heads, a multiple: replicated
])
def test_validate_layouts_names_the_value(prefill, decode, world, fragment):
    if fragment is None:
        assert validate_layouts(prefill, decode, DIMS, world) == 1
        return
    with pytest.raises(LayoutError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        validate_layouts(prefill, decode, DIMS, world)


def test_instances_count():
    assert validate_layouts(Layout(pp=2), Layout(tp=2), DIMS, 8) == 4


def test_shard_ranges_follow_heads_and_blocks():
    assert host_shape((128, 256), TensorRole(ShardKind.ROW)) == (256, 128)
    assert host_shape((4, 96, 64), TensorRole(ShardKind.ROW)) == (4, 64, 96)  # stacked experts
    q = TensorRole(ShardKind.COLUMN, ((Split.HEADS, 128),))
    assert shard_ranges(q, 128, DIMS, 4, 1) == [range(32, 64)]
    assert shard_ranges(TensorRole(ShardKind.ROW), 128, DIMS, 4, 3) == [range(96, 128)]
    # k_proj of 2 KV heads under tp4: each rank holds one (replicated) head
    k = TensorRole(ShardKind.COLUMN, ((Split.KV_HEADS, 32),))
    assert [shard_ranges(k, 32, DIMS, 4, i) for i in range(4)] == \
        [[range(0, 16)], [range(0, 16)], [range(16, 32)], [range(16, 32)]]
    # a fused [q | k | v] splits per block: rank 1 of tp2 holds q heads 4-7, KV head 1 of k and of v
    qkv = TensorRole(ShardKind.COLUMN, ((Split.HEADS, 128), (Split.KV_HEADS, 32), (Split.KV_HEADS, 32)))
    assert shard_ranges(qkv, 192, DIMS, 2, 1) == [range(64, 128), range(144, 160), range(176, 192)]
    assert shard_ranges(REPLICATED, 7, DIMS, 2, 1) == [range(7)]
    with pytest.raises(ValueError):
        shard_ranges(TensorRole(ShardKind.COLUMN, ((Split.EVEN, 6),)), 6, DIMS, 4, 0)


def test_row_parallel_shard_is_a_view_whose_product_matches():
    weight = torch.randn(6, 8)  # [out, in] as checkpointed
    host = weight.t().contiguous()  # stored transposed
    x = torch.randn(3, 8)
    partial = sum(x[:, r.start:r.stop] @ host[r.start:r.stop] for r in (range(0, 4), range(4, 8)))
    assert torch.allclose(partial, x @ weight.t(), atol=1e-6)
    assert host[0:4].t()._base is host  # a view, no copy


def test_block_allocator_reuses_and_refuses():
    alloc = BlockAllocator(4, 2)
    assert alloc.ensure(1, 3) == [0, 1]
    assert alloc.ensure(1, 4) == [0, 1]
    assert alloc.ensure(2, 4) == [2, 3]
    with pytest.raises(MemoryError):
        alloc.ensure(3, 1)
    alloc.free(1)
    assert alloc.num_free == 2 and alloc.ensure(3, 1) == [0]


def test_extent_allocator_never_fails_while_slots_are_free():
    rng = random.Random(0)
    alloc = ExtentAllocator(100)
    live: dict[int, list] = {}
    for step in range(2000):
        if live and (rng.random() < 0.5 or alloc.capacity - alloc.used < 5):
            alloc.free(live.pop(rng.choice(list(live))))
        else:
            size = rng.randint(1, min(20, alloc.capacity - alloc.used))
            extents = alloc.allocate(size)
            assert sum(length for _, length in extents) == size
            live[step] = extents
        slots = [s for extents in live.values() for start, length in extents for s in range(start, start + length)]
        assert len(slots) == len(set(slots)) == alloc.used
    with pytest.raises(MemoryError):
        alloc.allocate(alloc.capacity - alloc.used + 1)


def test_micro_batches_balance_and_keep_order():
    seqs = [SeqWork(i, 0, [0] * n) for i, n in enumerate([10, 1, 1, 1, 10, 1])]
    batches = micro_batches(seqs, 2, by_tokens=True)
    assert [s.seq_id for b in batches for s in b] == list(range(6))
    assert len(batches) == 2
    assert micro_batches(seqs[:1], 4, by_tokens=False) == [seqs[:1]]
    assert micro_batches([], 2, by_tokens=False) == []


def test_explicit_axes_define_the_phase_layout():
    assert complete_layout_overrides(["parallel.prefill.tp=2"]) == [
        "parallel.prefill.tp=2", "parallel.prefill.dp=1", "parallel.prefill.pp=1"]
    assert complete_layout_overrides(["parallel=tp2", "seed=3"]) == ["parallel=tp2", "seed=3"]
