"""The device-tier KV cache of one rank: paged blocks for the layers and KV heads this rank holds.

Blocks are ``[block_size, kv_heads, head_dim]`` (token-major inside a block, which makes appending one token per
sequence a single indexed write); one tensor per K and V of shape ``[layers, blocks, block_size, kv_heads,
head_dim]``. Layers are addressed by their global index. One block more than the allocator hands out is the
scratch block of a CUDA graph's padding rows.
"""
from __future__ import annotations

import torch

from seesaw_ds.kv.blocks import BlockAllocator, leading_pieces, runs
from seesaw_ds.kv.sizing import warm_units


class DeviceKVCache:
    """Paged K/V storage plus the allocator that hands its blocks to sequences."""

    def __init__(self, layers: range, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.layers = layers
        self.block_size = block_size
        self.scratch_block = num_blocks
        """One block past the allocator's, owned by no sequence: the padding rows of a CUDA graph's decode step
        write and read it (seesaw_ds/model/graphs.py)."""
        shape = (len(layers), num_blocks + 1, block_size, num_kv_heads, head_dim)
        # Zeroed off a CPU: the accelerator's padded attention reads whole blocks, slots not yet written
        # included, and masks them; a NaN left in reused device memory would survive the mask (0 * NaN) in
        # the weighted sum of values. On a CPU the kernel reads a slot only after its token was written, so
        # only the first blocks are touched (zeroed), up to sizing.WARM_BYTES: the allocator hands out the
        # lowest blocks first, and a page first written during the run (a swap-in, a decode step's new
        # token) is faulted in beside the forward (decode_only: swap-ins waited 0.6-1.1 s on an untouched
        # tier, 0 on a touched one). The rest stays untouched: zero-filling a whole tier sized from memory
        # took ~8% of a bf16 run (docs/benchmarks.md).
        cpu = torch.device(device).type == "cpu"
        make = torch.empty if cpu else torch.zeros
        self.keys = make(shape, dtype=dtype, device=device)
        self.values = make(shape, dtype=dtype, device=device)
        if cpu:
            block_bytes = 2 * self.keys[:, :1].numel() * self.keys.element_size()
            warm = warm_units(num_blocks, num_blocks, block_bytes)
            self.keys[:, :warm].zero_()
            self.values[:, :warm].zero_()
        self.allocator = BlockAllocator(num_blocks, block_size)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def _local(self, layer: int) -> int:
        return layer - self.layers.start

    def write_slots(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one token per row into cache slot ``slots[n]`` (block * block_size + offset): ``keys``/``values``
        are ``[N, kv_heads, head_dim]``."""
        flat_keys, flat_values = self.flat(layer)
        flat_keys.index_copy_(0, slots, keys.to(flat_keys.dtype))
        flat_values.index_copy_(0, slots, values.to(flat_values.dtype))

    def write_sequence(self, layer: int, seq_id: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a run of tokens of one sequence: ``keys``/``values`` are ``[kv_heads, T, head_dim]``."""
        self._write_span_heads(layer, seq_id, start, keys, values, 0, keys.shape[0])

    def _write_span_heads(self, layer: int, seq_id: int, start: int, keys: torch.Tensor, values: torch.Tensor,
                          head_lo: int, head_hi: int) -> None:
        """Copy tokens ``start .. start+T`` into local heads ``head_lo:head_hi`` span by span (slices, no
        per-token indexing)."""
        flat_keys, flat_values = self.flat(layer)
        done = 0
        for slot, count in self.token_spans(seq_id, start + keys.shape[1]):
            skip = min(count, max(0, start - done))  # spans before `start` are already written
            done_before = done
            done += count
            if skip == count:
                continue
            lo, hi = done_before + skip - start, done - start
            target = slice(slot + skip, slot + count)
            flat_keys[target, head_lo:head_hi] = keys[:, lo:hi].transpose(0, 1).to(flat_keys.device, flat_keys.dtype)
            flat_values[target, head_lo:head_hi] = values[:, lo:hi].transpose(0, 1).to(flat_values.device,
                                                                                      flat_values.dtype)

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V caches as ``[slots, kv_heads, head_dim]`` views (slot = block * block_size + offset)."""
        local = self._local(layer)
        return (self.keys[local].view(-1, *self.keys.shape[-2:]),
                self.values[local].view(-1, *self.values.shape[-2:]))

    def sequence_kv(self, layer: int, spans: list[tuple[int, int]], keys: torch.Tensor | None = None,
                    values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence as ``[kv_heads, length, head_dim]`` from its token spans
        ``[(first_token_slot, count), ...]``: a view of the cache when the sequence is one span, else a
        concatenation of its spans (no padding, nothing of other sequences). ``keys``/``values``: the
        layer's :meth:`flat` views, when the caller already has them."""
        if keys is None or values is None:
            keys, values = self.flat(layer)
        if len(spans) == 1:
            start, count = spans[0]
            return keys[start:start + count].transpose(0, 1), values[start:start + count].transpose(0, 1)
        return (torch.cat([keys[s:s + n] for s, n in spans]).transpose(0, 1),
                torch.cat([values[s:s + n] for s, n in spans]).transpose(0, 1))

    def token_spans(self, seq_id: int, length: int) -> list[tuple[int, int]]:
        """The first ``length`` tokens of a sequence as runs of consecutive token slots."""
        block_runs = [(block * self.block_size, count * self.block_size)
                      for block, count in runs(self.allocator.tables[seq_id])]
        return [(start, take) for start, _, take in leading_pieces(block_runs, length)]

    def read_sequence(self, layer: int, seq_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence's first ``length`` tokens as ``[kv_heads, length, head_dim]``."""
        return self.sequence_kv(layer, self.token_spans(seq_id, length))

    def write_heads(self, layer: int, seq_id: int, keys: torch.Tensor, values: torch.Tensor, head_lo: int,
                    head_hi: int, start: int = 0) -> None:
        """Write tokens ``start..start+T`` of a sequence into local KV heads ``head_lo:head_hi`` (``[heads, T,
        dim]``)."""
        self._write_span_heads(layer, seq_id, start, keys, values, head_lo, head_hi)
