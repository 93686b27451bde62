"""The device-tier block allocator as it was before its free lists became O(log n) (seesaw_ds/kv/blocks.py at
c4503f5, verbatim but for the class name): a list of free blocks, scanned into runs at every placement. The
unit tests run both on the same random work and require the same tables."""
from __future__ import annotations

import bisect

from seesaw_ds.kv.blocks import blocks_for


class ReferenceAllocator:
    """A fixed pool of ``num_blocks`` blocks of ``block_size`` tokens, handed out per sequence."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks))  # sorted
        self.tables: dict[int, list[int]] = {}
        self._reserved: dict[int, range] = {}       # seq_id -> blocks kept for its growth
        self._goal: dict[int, int] = {}             # seq_id -> blocks it may reach (from reserve_tokens)
        self._reserve_count = [0] * num_blocks      # how many sequences reserve each block
        self._refs: dict[int, int] = {}             # shared blocks -> holders (absent: one)
        self._shared: dict[object, list] = {}       # prefix key -> [its blocks, holders]
        self._key_of: dict[int, object] = {}        # seq_id -> the prefix key its table starts with

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _is_free(self, block: int) -> bool:
        index = bisect.bisect_left(self._free, block)
        return index < len(self._free) and self._free[index] == block

    def _free_runs(self, skip_reserved: bool) -> list[tuple[int, int]]:
        """Free blocks as runs ``(start, length)``; with ``skip_reserved``, reserved blocks break runs."""
        result: list[tuple[int, int]] = []
        for block in self._free:
            if skip_reserved and self._reserve_count[block]:
                continue
            if result and result[-1][0] + result[-1][1] == block:
                result[-1] = (result[-1][0], result[-1][1] + 1)
            else:
                result.append((block, 1))
        return result

    def _place(self, want: int) -> int:
        """Where a run of ``want`` blocks should start: the smallest unreserved free run that holds it, else
        the largest unreserved run, else (everything free is reserved) the largest free run."""
        candidates = self._free_runs(skip_reserved=True) or self._free_runs(skip_reserved=False)
        fitting = [run for run in candidates if run[1] >= want]
        if fitting:
            return min(fitting, key=lambda run: (run[1], run[0]))[0]
        return max(candidates, key=lambda run: (run[1], -run[0]))[0]

    def _reserve(self, seq_id: int, blocks: range) -> None:
        self._unreserve(seq_id)
        self._reserved[seq_id] = blocks
        for block in blocks:
            self._reserve_count[block] += 1

    def _unreserve(self, seq_id: int) -> None:
        for block in self._reserved.pop(seq_id, ()):
            self._reserve_count[block] -= 1

    def _take(self, block: int) -> int:
        self._free.pop(bisect.bisect_left(self._free, block))
        return block

    def ensure(self, seq_id: int, num_tokens: int, reserve_tokens: int = 0) -> list[int]:
        """Grow ``seq_id``'s block table to hold ``num_tokens`` tokens; returns the table.

        ``reserve_tokens`` (the length the sequence may reach) places a new run so that it can grow in
        place, and keeps the blocks up to that length for it while other sequences can go elsewhere.
        """
        total = blocks_for(num_tokens, self.block_size)
        needed = total - len(self.tables.get(seq_id, ()))
        if needed > len(self._free):
            raise MemoryError(f"device KV tier exhausted: sequence {seq_id} needs {needed} more blocks, "
                              f"{len(self._free)} of {self.num_blocks} free")
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
                bisect.insort(self._free, block)
