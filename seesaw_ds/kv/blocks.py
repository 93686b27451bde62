"""Block allocation for the paged device-tier KV cache: pure bookkeeping, no tensors.

Every rank of a data-parallel replica runs the same allocator on the same sequence of requests, so the
block tables agree across the replica's ranks without being sent; the scheduler counts blocks the same way.

The allocator keeps a sequence's blocks contiguous whenever it can, so attention reads a sequence as one
view of the cache instead of concatenating its pieces at every layer of every step: a new sequence says how
long it may grow (``reserve_tokens``: prompt plus ``max_tokens``), starts in the smallest free run that
holds all of that, and the blocks after its current end stay *reserved* for its growth — other new
sequences start elsewhere while they can. Reservations are soft: they never make an allocation fail, and
the scheduler counts only blocks in use, so capacity is exactly as without them.

Full blocks of a shared prompt prefix (a prefix several requests share, or the prompt of a request's n
samples) are held once (:meth:`BlockAllocator.ensure_shared`): the first sequence with a prefix key lays its
blocks out as usual and the prefix's whole blocks become the key's; a later sequence with the key starts its
table with those blocks (reference-counted, never written again: a sequence writes only past its prompt, and a
shared prefix ends on a block boundary) and gets blocks of its own for the rest. A block returns to the pool
with its last holder. The scheduler still counts every sequence's blocks in full: a bound, never short.

Free blocks are kept as runs, twice (all free blocks; those no sequence reserves), each indexed by start and
by length (Fenwick trees): taking, freeing, reserving a block and placing a new run are O(log n) in the pool.

Also here, as the pure helpers both KV tiers share: ``blocks_for`` (blocks that hold n tokens) and
``leading_pieces`` (where a sequence's first n tokens lie over its runs of slots).
"""
from __future__ import annotations

import heapq


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens (elementwise on a numpy array or tensor of counts)."""
    return -(-num_tokens // block_size)


def leading_pieces(extents, tokens: int) -> list[tuple[int, int, int]]:
    """Where a sequence's first ``tokens`` tokens lie when it is laid out over ``extents`` (``(first_slot,
    length)`` runs of slots, in order): ``(first_slot, offset in the sequence, length)`` of each piece, the
    last one cut short. The one walk over a sequence's runs (staging extents, device block runs)."""
    pieces, done = [], 0
    for start, length in extents:
        take = min(length, tokens - done)
        if take <= 0:
            break
        pieces.append((start, done, take))
        done += take
    return pieces


def runs(table: list[int]) -> list[tuple[int, int]]:
    """A block table as runs of consecutive blocks: ``[(first_block, count), ...]``."""
    result: list[tuple[int, int]] = []
    for block in table:
        if result and result[-1][0] + result[-1][1] == block:
            result[-1] = (result[-1][0], result[-1][1] + 1)
        else:
            result.append((block, 1))
    return result


class _Counts:
    """A Fenwick tree of counts over ``0..size-1``: add at a point, count below an index, find the k-th, each
    in O(log size)."""

    def __init__(self, size: int):
        self.size = size
        self._tree = [0] * (size + 1)
        self._top = 1 << size.bit_length()

    def add(self, index: int, delta: int) -> None:
        index += 1
        while index <= self.size:
            self._tree[index] += delta
            index += index & -index

    def below(self, index: int) -> int:
        """The count at indices ``< index``."""
        total = 0
        while index > 0:
            total += self._tree[index]
            index -= index & -index
        return total

    def kth(self, k: int) -> int:
        """The smallest index whose count up to and including it exceeds ``k`` (the (k+1)-th counted one)."""
        position, step = 0, self._top
        while step:
            nxt = position + step
            if nxt <= self.size and self._tree[nxt] <= k:
                position = nxt
                k -= self._tree[nxt]
            step >>= 1
        return position


class _Runs:
    """A set of blocks kept as maximal runs of consecutive blocks, with O(log n) insert and remove of a block
    and O(log n) queries for the run that best fits a length and for the longest run (lowest start on ties)."""

    def __init__(self, num_blocks: int, full: bool):
        self._length_of: dict[int, int] = {}   # run start -> length
        self._starts = _Counts(num_blocks)     # 1 at every run start: the run holding a block by rank
        self._lengths = _Counts(num_blocks + 1)  # how many runs have each length
        self._by_length: dict[int, list[int]] = {}  # length -> heap of starts (stale entries skipped)
        self.num_runs = 0
        if full:
            self._insert(0, num_blocks)

    def _insert(self, start: int, length: int) -> None:
        self._length_of[start] = length
        self._starts.add(start, 1)
        self._lengths.add(length, 1)
        heapq.heappush(self._by_length.setdefault(length, []), start)
        self.num_runs += 1

    def _delete(self, start: int) -> int:
        length = self._length_of.pop(start)
        self._starts.add(start, -1)
        self._lengths.add(length, -1)
        self.num_runs -= 1
        return length

    def run_of(self, block: int) -> int | None:
        """The start of the run holding ``block``, or None."""
        rank = self._starts.below(block + 1)
        if not rank:
            return None
        start = self._starts.kth(rank - 1)
        return start if start + self._length_of[start] > block else None

    def add(self, block: int) -> None:
        """Put ``block`` (not in the set) in, merging it with the runs on either side."""
        start, length = block, 1
        left = self.run_of(block - 1) if block else None
        if left is not None:
            start, length = left, self._delete(left) + 1
        if block + 1 in self._length_of:
            length += self._delete(block + 1)
        self._insert(start, length)

    def remove(self, block: int) -> None:
        """Take ``block`` (in the set) out, splitting its run."""
        start = self.run_of(block)
        length = self._delete(start)
        if block > start:
            self._insert(start, block - start)
        if start + length > block + 1:
            self._insert(block + 1, start + length - block - 1)

    def _lowest_start(self, length: int) -> int:
        heap = self._by_length[length]
        while self._length_of.get(heap[0]) != length:
            heapq.heappop(heap)
        return heap[0]

    def best_fit(self, want: int) -> int | None:
        """The start of the shortest run of at least ``want`` blocks (the lowest start among equals)."""
        shorter = self._lengths.below(want)
        if shorter == self.num_runs:
            return None
        return self._lowest_start(self._lengths.kth(shorter))

    def longest(self) -> int | None:
        """The start of the longest run (the lowest start among equals), or None when the set is empty."""
        if not self.num_runs:
            return None
        return self._lowest_start(self._lengths.kth(self.num_runs - 1))


class BlockAllocator:
    """A fixed pool of ``num_blocks`` blocks of ``block_size`` tokens, handed out per sequence."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_blocks = bytearray(b"\x01") * num_blocks  # 1 where a block is free
        self._free = _Runs(num_blocks, full=True)    # every free block, as runs
        self._open = _Runs(num_blocks, full=True)    # the free blocks no sequence reserves, as runs
        self._num_free = num_blocks
        self.tables: dict[int, list[int]] = {}
        self._reserved: dict[int, range] = {}       # seq_id -> blocks kept for its growth
        self._goal: dict[int, int] = {}             # seq_id -> blocks it may reach (from reserve_tokens)
        self._reserve_count = [0] * num_blocks      # how many sequences reserve each block
        self._refs: dict[int, int] = {}             # shared blocks -> holders (absent: one)
        self._shared: dict[object, list] = {}       # prefix key -> [its blocks, holders]
        self._key_of: dict[int, object] = {}        # seq_id -> the prefix key its table starts with

    @property
    def num_free(self) -> int:
        return self._num_free

    def _is_free(self, block: int) -> bool:
        return block < self.num_blocks and bool(self._free_blocks[block])

    def _place(self, want: int) -> int:
        """Where a run of ``want`` blocks should start: the smallest unreserved free run that holds it (the
        lowest among equals), else the largest unreserved run; when everything free is reserved, the same
        choice among all free runs. O(log n): runs are kept by length."""
        runs = self._open if self._open.num_runs else self._free
        start = runs.best_fit(want)
        return start if start is not None else runs.longest()

    def _reserve(self, seq_id: int, blocks: range) -> None:
        self._unreserve(seq_id)
        self._reserved[seq_id] = blocks
        for block in blocks:
            self._reserve_count[block] += 1
            if self._reserve_count[block] == 1 and self._free_blocks[block]:
                self._open.remove(block)

    def _unreserve(self, seq_id: int) -> None:
        for block in self._reserved.pop(seq_id, ()):
            self._reserve_count[block] -= 1
            if not self._reserve_count[block] and self._free_blocks[block]:
                self._open.add(block)

    def _take(self, block: int) -> int:
        """Mark a free block used (O(log n))."""
        self._free_blocks[block] = 0
        self._num_free -= 1
        self._free.remove(block)
        if not self._reserve_count[block]:
            self._open.remove(block)
        return block

    def _give_back(self, block: int) -> None:
        """Mark a used block free (O(log n))."""
        self._free_blocks[block] = 1
        self._num_free += 1
        self._free.add(block)
        if not self._reserve_count[block]:
            self._open.add(block)

    def ensure(self, seq_id: int, num_tokens: int, reserve_tokens: int = 0) -> list[int]:
        """Grow ``seq_id``'s block table to hold ``num_tokens`` tokens; returns the table.

        ``reserve_tokens`` (the length the sequence may reach) places a new run so that it can grow in
        place, and keeps the blocks up to that length for it while other sequences can go elsewhere.
        """
        total = blocks_for(num_tokens, self.block_size)
        needed = total - len(self.tables.get(seq_id, ()))
        if needed > self._num_free:
            raise MemoryError(f"device KV tier exhausted: sequence {seq_id} needs {needed} more blocks, "
                              f"{self._num_free} of {self.num_blocks} free")
        table = self.tables.setdefault(seq_id, [])
        goal = self._goal[seq_id] = max(self._goal.get(seq_id, 0), blocks_for(reserve_tokens, self.block_size))
        for _ in range(max(0, needed)):
            if table and self._is_free(table[-1] + 1):
                table.append(self._take(table[-1] + 1))
                continue
            want = max(total, goal) - len(table)
            start = self._place(want)
            table.append(self._take(start))
            self._reserve(seq_id, range(start + 1, min(start + want, self.num_blocks)))
        return table

    def ensure_shared(self, seq_id: int, num_tokens: int, key: object, prefix_tokens: int,
                      reserve_tokens: int = 0) -> int:
        """:meth:`ensure` for a new sequence whose first ``prefix_tokens`` tokens are the prefix ``key``: its
        table starts with the key's blocks when they are resident (returns the tokens already there, which
        need no copy), else its own first whole blocks become the key's (returns 0)."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks; a shared prefix starts a new table")
        whole = min(prefix_tokens, num_tokens) // self.block_size
        if whole == 0:
            self.ensure(seq_id, num_tokens, reserve_tokens)
            return 0
        entry = self._shared.get(key)
        if entry is None:
            table = self.ensure(seq_id, num_tokens, reserve_tokens)
            self._shared[key] = [table[:whole], 1]
            self._key_of[seq_id] = key
            return 0
        blocks = entry[0]
        self.tables[seq_id] = list(blocks)
        for block in blocks:
            self._refs[block] = self._refs.get(block, 1) + 1
        entry[1] += 1
        self._key_of[seq_id] = key
        self.ensure(seq_id, num_tokens, reserve_tokens)
        return len(blocks) * self.block_size

    def free(self, seq_id: int) -> None:
        """Return ``seq_id``'s blocks to the pool (no-op for an unknown sequence); a shared block returns
        with its last holder."""
        self._unreserve(seq_id)
        self._goal.pop(seq_id, None)
        key = self._key_of.pop(seq_id, None)
        if key is not None:
            entry = self._shared[key]
            entry[1] -= 1
            if not entry[1]:
                del self._shared[key]
        for block in self.tables.pop(seq_id, []):
            holders = self._refs.pop(block, 1) - 1
            if holders:
                self._refs[block] = holders
            else:
                self._give_back(block)
