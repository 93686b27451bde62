"""The device-tier block allocator: sequences that say how far they may grow stay one contiguous run (so
decode attention reads a view, never a concatenation), and reservations never cost capacity."""
from __future__ import annotations

import random

import pytest

from seesaw_ds.kv.blocks import BlockAllocator, blocks_for, leading_pieces, runs


def grow_batch(alloc: BlockAllocator, prompts: list[int], new_tokens: int, reserve: bool) -> None:
    """Swap a batch in (prompt-length KV each), then decode ``new_tokens`` steps in lockstep."""
    for seq_id, length in enumerate(prompts):
        alloc.ensure(seq_id, length, reserve_tokens=length + new_tokens if reserve else 0)
    for step in range(1, new_tokens + 1):
        for seq_id, length in enumerate(prompts):
            alloc.ensure(seq_id, length + step)


def test_without_reservations_a_lockstep_batch_fragments():
    """The failure the reservations exist for: packed neighbours take each other's next block."""
    rng = random.Random(0)
    prompts = [rng.randint(20, 500) for _ in range(64)]
    alloc = BlockAllocator(4096, 16)
    grow_batch(alloc, prompts, 128, reserve=False)
    assert min(len(runs(alloc.tables[s])) for s in range(64)) > 1


def test_reserved_growth_keeps_every_sequence_one_run():
    rng = random.Random(0)
    prompts = [rng.randint(20, 500) for _ in range(64)]
    alloc = BlockAllocator(4096, 16)
    grow_batch(alloc, prompts, 128, reserve=True)
    assert all(len(runs(alloc.tables[s])) == 1 for s in range(64))
    assert all(len(alloc.tables[s]) == blocks_for(p + 128, 16) for s, p in enumerate(prompts))


def test_a_new_sequence_does_not_start_in_another_reservation():
    alloc = BlockAllocator(64, 4)
    alloc.ensure(0, 4, reserve_tokens=8)          # blocks 0-1 (1 reserved)
    alloc.ensure(1, 4 * 60)                       # takes the rest except block 1
    alloc.free(1)
    alloc.ensure(2, 4, reserve_tokens=4)          # must not start in 0's reservation
    assert alloc.tables[2] != [1]


@pytest.mark.parametrize("seed", range(5))
def test_reservations_never_refuse_a_free_block(seed):
    """Random swap-ins, growth and frees in a tight pool: an allocation fails exactly when the blocks it
    needs exceed the free ones, tables never overlap, and freeing everything gives every block back."""
    rng = random.Random(seed)
    alloc = BlockAllocator(97, 4)
    lengths: dict[int, int] = {}
    next_id = 0
    for _ in range(3000):
        action = rng.random()
        if lengths and action < 0.3:
            seq_id = rng.choice(list(lengths))
            del lengths[seq_id]
            alloc.free(seq_id)
            continue
        if lengths and action < 0.8:
            seq_id = rng.choice(list(lengths))
            target, reserve = lengths[seq_id] + rng.randint(1, 6), 0
        else:
            seq_id, next_id = next_id, next_id + 1
            target = rng.randint(1, 60)
            reserve = target + rng.randint(0, 80)
        needed = blocks_for(target, 4) - len(alloc.tables.get(seq_id, []))
        if needed > alloc.num_free:
            with pytest.raises(MemoryError):
                alloc.ensure(seq_id, target, reserve_tokens=reserve)
            assert seq_id in lengths or seq_id not in alloc.tables
            continue
        alloc.ensure(seq_id, target, reserve_tokens=reserve)
        lengths[seq_id] = target
        used = [block for table in alloc.tables.values() for block in table]
        assert len(used) == len(set(used)) and len(used) + alloc.num_free == 97
    for seq_id in list(lengths):
        alloc.free(seq_id)
    assert alloc.num_free == 97 and not any(alloc._reserve_count)


def test_a_shared_prefix_is_held_once_and_freed_with_its_last_holder():
    alloc = BlockAllocator(num_blocks=32, block_size=4)
    assert alloc.ensure_shared(1, 14, "sys", 8, reserve_tokens=20) == 0  # first holder: lays out its own
    first = alloc.tables[1]
    assert alloc.ensure_shared(2, 11, "sys", 8, reserve_tokens=16) == 8  # starts with the prefix's 2 blocks
    assert alloc.tables[2][:2] == first[:2] and not set(alloc.tables[2][2:]) & set(first)
    assert alloc.num_free == 32 - len(first) - 1
    alloc.free(1)  # the prefix blocks stay with holder 2; holder 1's own blocks return
    assert alloc.num_free == 32 - 3 and set(alloc.tables[2][:2]) == set(first[:2])
    assert alloc.ensure_shared(3, 9, "sys", 8) == 8 and alloc.tables[3][:2] == first[:2]
    alloc.ensure(3, 13)  # grows past its prompt in blocks of its own
    assert not set(alloc.tables[3][2:]) & set(alloc.tables[2])
    alloc.free(2)
    alloc.free(3)
    assert alloc.num_free == 32
    assert alloc.ensure_shared(4, 9, "sys", 8) == 0  # nobody holds it any more: laid out (and copied) again


def test_a_prefix_shorter_than_a_block_is_not_shared_and_tables_must_be_new():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    assert alloc.ensure_shared(1, 6, "k", 3) == 0 and alloc.ensure_shared(2, 6, "k", 3) == 0
    assert not set(alloc.tables[1]) & set(alloc.tables[2])
    with pytest.raises(ValueError, match="already holds blocks"):
        alloc.ensure_shared(1, 8, "k", 4)


def test_leading_pieces_cover_the_first_tokens_in_order():
    # a 9-token sequence staged as 5 slots at 20 and 4 at 40: its first 7 tokens are 5 at 20 and 2 at 40
    assert leading_pieces([(20, 5), (40, 4)], 7) == [(20, 0, 5), (40, 5, 2)]
    assert leading_pieces([(20, 5), (40, 4)], 9) == [(20, 0, 5), (40, 5, 4)]
    assert leading_pieces([(20, 5), (40, 4)], 3) == [(20, 0, 3)]
    assert leading_pieces([(20, 5)], 0) == []


def test_blocks_for_rounds_up_to_whole_blocks():
    assert [blocks_for(tokens, 16) for tokens in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


@pytest.mark.parametrize("seed", range(4))
def test_same_tables_as_the_list_allocator_it_replaced(seed):
    """Random swap-ins (with and without reserved growth and shared prefixes), growth and frees: the run-based
    allocator hands out exactly the blocks the former list-scanning one did, step by step."""
    from blocks_reference import ReferenceAllocator

    rng = random.Random(seed)
    new, old = BlockAllocator(211, 4), ReferenceAllocator(211, 4)
    lengths: dict[int, int] = {}
    for seq_id in range(4000):
        action = rng.random()
        if lengths and action < 0.3:
            gone = rng.choice(list(lengths))
            del lengths[gone]
            new.free(gone)
            old.free(gone)
            continue
        if lengths and action < 0.75:
            grow = rng.choice(list(lengths))
            target, reserve, key = lengths[grow] + rng.randint(1, 9), 0, None
        else:
            grow, target = seq_id + 10_000, rng.randint(1, 70)
            reserve = target + rng.choice([0, rng.randint(1, 90)])
            key = rng.choice([None, "a", "b"])
        results = []
        for alloc in (new, old):
            try:
                if key is not None:
                    results.append(alloc.ensure_shared(grow, target, key, 8, reserve_tokens=reserve))
                else:
                    results.append(alloc.ensure(grow, target, reserve_tokens=reserve))
            except MemoryError:
                results.append("full")
        assert results[0] == results[1] and new.tables == old.tables and new.num_free == len(old._free)
        if results[0] != "full":
            lengths[grow] = target


def test_a_large_pool_places_and_frees_without_scanning_it():
    """A million blocks, thousands of sequences: each placement and free touches O(log n) state, so this
    takes ~3 s of CPU here (the list allocator it replaced scanned every free block at each new sequence: 113 s
    for the first 300 sequences). Timed in this thread's CPU time, which other processes on the machine do not
    stretch (wall time took 24 s under a load average of 12)."""
    import time

    alloc = BlockAllocator(1_000_000, 16)
    began = time.thread_time()
    for seq_id in range(3000):
        alloc.ensure(seq_id, 16 * 20, reserve_tokens=16 * 40)
        if seq_id % 3 == 2:
            alloc.free(seq_id - 1)
    for seq_id in range(0, 3000, 3):
        alloc.ensure(seq_id, 16 * 30)
    elapsed = time.thread_time() - began
    assert all(len(runs(alloc.tables[s])) == 1 for s in range(0, 3000, 3))  # grew in place, into its reservation
    assert alloc.num_free == 1_000_000 - sum(map(len, alloc.tables.values()))
    assert elapsed < 20, elapsed
