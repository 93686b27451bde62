"""Block allocation for the paged device-tier KV cache: pure bookkeeping, no tensors.

Every rank of a data-parallel replica runs the same allocator on the same sequence of requests, so the
block tables agree across the replica's ranks without being sent; the scheduler counts blocks the same way.

The allocator keeps a sequence's blocks contiguous whenever it can — a new sequence starts at the largest
free run, and growth takes the block right after its last one — so attention can read most sequences as
one view of the cache instead of gathering blocks.
"""
from __future__ import annotations

import bisect


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def runs(table: list[int]) -> list[tuple[int, int]]:
    """A block table as runs of consecutive blocks: ``[(first_block, count), ...]``."""
    result: list[tuple[int, int]] = []
    for block in table:
        if result and result[-1][0] + result[-1][1] == block:
            result[-1] = (result[-1][0], result[-1][1] + 1)
        else:
            result.append((block, 1))
    return result


class BlockAllocator:
    """A fixed pool of ``num_blocks`` blocks of ``block_size`` tokens, handed out per sequence."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks))  # sorted
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _is_free(self, block: int) -> bool:
        index = bisect.bisect_left(self._free, block)
        return index < len(self._free) and self._free[index] == block

    def _largest_run_start(self) -> int:
        best_start, best_len, start, length = self._free[0], 0, self._free[0], 0
        previous = None
        for block in self._free:
            if previous is not None and block == previous + 1:
                length += 1
            else:
                start, length = block, 1
            if length > best_len:
                best_start, best_len = start, length
            previous = block
        return best_start

    def _take(self, block: int) -> int:
        self._free.pop(bisect.bisect_left(self._free, block))
        return block

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow ``seq_id``'s block table to hold ``num_tokens`` tokens; returns the table."""
        table = self.tables.setdefault(seq_id, [])
        needed = blocks_for(num_tokens, self.block_size) - len(table)
        if needed > len(self._free):
            raise MemoryError(f"device KV tier exhausted: sequence {seq_id} needs {needed} more blocks, "
                              f"{len(self._free)} of {self.num_blocks} free")
        for _ in range(max(0, needed)):
            if table and self._is_free(table[-1] + 1):
                table.append(self._take(table[-1] + 1))
            else:
                table.append(self._take(self._largest_run_start()))
        return table

    def free(self, seq_id: int) -> None:
        """Return ``seq_id``'s blocks to the pool (no-op for an unknown sequence)."""
        for block in self.tables.pop(seq_id, []):
            bisect.insort(self._free, block)
