"""The device-tier KV cache of one rank: paged blocks for the layers and KV heads this rank holds.

Blocks are ``[block_size, kv_heads, head_dim]`` (token-major inside a block, which makes appending one token
per sequence a single indexed write); one tensor per K and V of shape
``[layers, blocks, block_size, kv_heads, head_dim]``. Layers are addressed by their global index.
"""
from __future__ import annotations

import torch

from seesaw_ds.kv.blocks import BlockAllocator, runs


class DeviceKVCache:
    """Paged K/V storage plus the allocator that hands its blocks to sequences."""

    def __init__(self, layers: range, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.layers = layers
        self.block_size = block_size
        shape = (len(layers), num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks, block_size)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def _local(self, layer: int) -> int:
        return layer - self.layers.start

    def slots(self, seq_id: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of token positions ``start .. start+count`` of a sequence (blocks must exist)."""
        table = torch.tensor(self.allocator.tables[seq_id], dtype=torch.long)
        positions = torch.arange(start, start + count)
        return table[positions // self.block_size].to(self.keys.device), (positions % self.block_size).to(
            self.keys.device)

    def write_tokens(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor) -> None:
        """Write one token per row: ``keys``/``values`` are ``[N, kv_heads, head_dim]``."""
        local = self._local(layer)
        self.keys[local, blocks, offsets] = keys.to(self.keys.dtype)
        self.values[local, blocks, offsets] = values.to(self.values.dtype)

    def write_sequence(self, layer: int, seq_id: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a run of tokens of one sequence: ``keys``/``values`` are ``[kv_heads, T, head_dim]``."""
        blocks, offsets = self.slots(seq_id, start, keys.shape[1])
        self.write_tokens(layer, blocks, offsets, keys.transpose(0, 1), values.transpose(0, 1))

    def sequence_kv(self, layer: int, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence as ``[kv_heads, length, head_dim]`` from its token spans
        ``[(first_token_slot, count), ...]``: a view of the cache when the sequence is one span, else a
        concatenation of its spans (no padding, nothing of other sequences)."""
        local = self._local(layer)
        keys = self.keys[local].view(-1, *self.keys.shape[-2:])
        values = self.values[local].view(-1, *self.values.shape[-2:])
        if len(spans) == 1:
            start, count = spans[0]
            return keys[start:start + count].transpose(0, 1), values[start:start + count].transpose(0, 1)
        return (torch.cat([keys[s:s + n] for s, n in spans]).transpose(0, 1),
                torch.cat([values[s:s + n] for s, n in spans]).transpose(0, 1))

    def token_spans(self, seq_id: int, length: int) -> list[tuple[int, int]]:
        """The first ``length`` tokens of a sequence as runs of consecutive token slots."""
        spans, remaining = [], length
        for block, count in runs(self.allocator.tables[seq_id]):
            take = min(remaining, count * self.block_size)
            if take <= 0:
                break
            spans.append((block * self.block_size, take))
            remaining -= take
        return spans

    def read_sequence(self, layer: int, seq_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence's first ``length`` tokens as ``[kv_heads, length, head_dim]``."""
        blocks, offsets = self.slots(seq_id, 0, length)
        local = self._local(layer)
        return (self.keys[local, blocks, offsets].transpose(0, 1),
                self.values[local, blocks, offsets].transpose(0, 1))

    def write_heads(self, layer: int, seq_id: int, keys: torch.Tensor, values: torch.Tensor, head_lo: int,
                    head_hi: int) -> None:
        """Write tokens ``0..T`` of a sequence into local KV heads ``head_lo:head_hi`` (``[heads, T, dim]``)."""
        blocks, offsets = self.slots(seq_id, 0, keys.shape[1])
        local = self._local(layer)
        self.keys[local, blocks, offsets, head_lo:head_hi] = keys.transpose(0, 1).to(self.keys.device,
                                                                                     self.keys.dtype)
        self.values[local, blocks, offsets, head_lo:head_hi] = values.transpose(0, 1).to(self.values.device,
                                                                                         self.values.dtype)
