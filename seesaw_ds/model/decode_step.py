"""A decode step's inputs in persistent buffers, filled by one copy per step and read by the forward as views.

A decode step needs, per sequence: the token it feeds, its position, the cache slot its new K/V go to, its
KV length after this token and its block table. :class:`DecodeBuffers` holds them in one int64 tensor laid out
``[token ids | positions | write slots | lengths]`` (``max_seqs`` each) then the block table (``max_seqs`` rows
of ``max_blocks``), allocated once per executor and pipeline micro-batch and sized to
``scheduler.max_decode_seqs`` rows of a ``model.max_model_len`` sequence's blocks (capped by the device tier),
so that the storage a step reads stays the same from step to step: what a CUDA graph captures (issue 23).

:meth:`DecodeBuffers.fill` writes a step into the host side (numpy views: the per-sequence Python of a step is
here, before the forward, and nowhere inside it) and, on an accelerator, sends the used prefix over in one
non-blocking copy from pinned memory; on a CPU the host buffer is the device's and there is no copy. The forward
then needs no ``.item()``, ``.tolist()`` or blocking copy: the one size the accelerator's padded attention
needs (the longest sequence of the step) is known on the host and travels as a Python int.

Where sizes were not given (tests, benchmarks), the buffers start at the first step's size and grow by
doubling, reallocating: a job passes both, and then they never grow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seesaw_ds.kv.blocks import blocks_for

FIELDS = 4
"""The per-sequence vectors before the block table: token ids, positions, write slots, lengths."""


@dataclass(frozen=True)
class DecodeStep:
    """One step's views of the buffers (``N`` sequences): each a slice of the same persistent storage."""

    token_ids: torch.Tensor     # [N] long
    positions: torch.Tensor     # [N] long: the fed token's position (the KV tokens before it)
    write_slots: torch.Tensor   # [N] long: the cache slot (block * block_size + offset) its K/V go to
    lengths: torch.Tensor       # [N] long: KV tokens after this step's (positions + 1)
    block_table: torch.Tensor   # [N, max_blocks] long: row n's first blocks_for(lengths[n]) entries are its blocks
    max_length: int             # the longest ``lengths`` entry, known on the host


class DecodeBuffers:
    """Persistent decode-step inputs on ``device`` for up to ``max_seqs`` sequences of ``max_blocks`` blocks."""

    MIN_ROWS = 64
    """Rows when ``scheduler.max_decode_seqs`` was not given (grown by doubling)."""
    MIN_BLOCKS = 64
    """Block-table width when ``model.max_model_len`` was not given (grown by doubling)."""

    def __init__(self, device: torch.device, block_size: int, max_seqs: int, max_blocks: int, streams=None):
        self.device = device
        self.block_size = block_size
        self._streams = streams  # backends' Streams of the device (None or disabled on a CPU)
        self._copied = None      # the event of the last host-to-device copy (accelerators only)
        self.reallocations = -1
        """Times the buffers were reallocated to grow (0 when sized up front and never outgrown)."""
        self._allocate(max_seqs, max_blocks)

    def _allocate(self, max_seqs: int, max_blocks: int) -> None:
        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        size = FIELDS * max_seqs + max_seqs * max_blocks
        on_host = self.device.type == "cpu"
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=not on_host and torch.cuda.is_available())
        self.storage = self.host if on_host else torch.zeros(size, dtype=torch.long, device=self.device)
        flat = self.host.numpy()
        self._vectors = flat[:FIELDS * max_seqs].reshape(FIELDS, max_seqs)
        self._table = flat[FIELDS * max_seqs:].reshape(max_seqs, max_blocks)
        self.reallocations += 1

    def _fit(self, seqs: int, blocks: int) -> None:
        if seqs <= self.max_seqs and blocks <= self.max_blocks:
            return
        self._wait_for_copy()
        grow = lambda have, need: have if need <= have else max(need, 2 * have)
        self._allocate(grow(self.max_seqs, seqs), grow(self.max_blocks, blocks))

    def _wait_for_copy(self) -> None:
        """The host side is about to change: the last copy out of it must be done (accelerators only; by then
        it nearly always is, the step after it having returned its logits)."""
        if self._copied is not None:
            self._streams.synchronize(self._copied)
            self._copied = None

    def fill(self, token_ids: list[int], positions: list[int], tables: list[list[int]], rows: int | None = None,
             pad_block: int = 0) -> DecodeStep:
        """Write one step: sequence n feeds ``token_ids[n]`` at ``positions[n]``, its KV in blocks
        ``tables[n]`` (which hold at least ``positions[n] + 1`` tokens); returns the step's views.

        ``rows`` (a CUDA graph's bucket, at least the sequences): the step has that many rows, those past the
        sequences padding that feed token 0 at position 0 and write and read block ``pad_block`` alone (a block
        no sequence owns)."""
        n = len(token_ids)
        rows = n if rows is None else rows
        lengths = np.asarray(positions, dtype=np.int64) + 1
        needed = blocks_for(lengths, self.block_size)
        widest = int(needed.max())
        self._fit(rows, widest)
        self._wait_for_copy()
        vectors, table = self._vectors, self._table
        vectors[0, :n] = token_ids
        vectors[1, :n] = lengths - 1
        vectors[3, :n] = lengths
        for row, (blocks, count) in enumerate(zip(tables, needed.tolist())):
            table[row, :count] = blocks[:count]
        last = lengths - 1
        vectors[2, :n] = table[np.arange(n), last // self.block_size] * self.block_size + last % self.block_size
        if rows > n:
            vectors[:, n:rows] = ((0,), (0,), (pad_block * self.block_size,), (1,))
            table[n:rows, 0] = pad_block
        storage = self.storage
        if storage is not self.host:
            used = FIELDS * self.max_seqs + rows * self.max_blocks
            storage[:used].copy_(self.host[:used], non_blocking=True)
            if self._streams is not None:
                self._copied = self._streams.record(self._streams.current())
        per_seq = storage[:FIELDS * self.max_seqs].view(FIELDS, self.max_seqs)
        block_table = storage[FIELDS * self.max_seqs:].view(self.max_seqs, self.max_blocks)
        return DecodeStep(token_ids=per_seq[0, :rows], positions=per_seq[1, :rows], write_slots=per_seq[2, :rows],
                          lengths=per_seq[3, :rows], block_table=block_table[:rows],
                          max_length=int(lengths.max()))


def table_width(max_model_len: int | None, block_size: int, device_blocks: int) -> int | None:
    """Blocks per block-table row: a ``max_model_len`` sequence's, at most the device tier's (None: unknown)."""
    if max_model_len is None:
        return None
    return max(1, min(blocks_for(max_model_len, block_size), device_blocks))
