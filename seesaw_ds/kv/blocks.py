"""Block allocation for the paged device-tier KV cache: pure bookkeeping, no tensors.

Every rank of a data-parallel replica runs the same allocator on the same sequence of requests, so the
block tables agree across the replica's ranks without being sent; the scheduler counts blocks the same way.
"""
from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """A fixed pool of ``num_blocks`` blocks of ``block_size`` tokens, handed out per sequence."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out the lowest index first
        self.tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow ``seq_id``'s block table to hold ``num_tokens`` tokens; returns the table."""
        table = self.tables.setdefault(seq_id, [])
        needed = blocks_for(num_tokens, self.block_size) - len(table)
        if needed > len(self._free):
            raise MemoryError(f"device KV tier exhausted: sequence {seq_id} needs {needed} more blocks, "
                              f"{len(self._free)} of {self.num_blocks} free")
        for _ in range(max(0, needed)):
            table.append(self._free.pop())
        return table

    def free(self, seq_id: int) -> None:
        """Return ``seq_id``'s blocks to the pool (no-op for an unknown sequence)."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self._free.append(block)
