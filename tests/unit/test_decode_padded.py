"""The decode path where the CPU kernel does not apply (an accelerator's tensors, or no compiler): every
sequence's KV gathered into one padded batch and grouped attention (two batched matmuls) per layer, equal to
the per-sequence reference for every dtype, GQA ratio, window and soft-cap, with fragmented block tables; what
the gather reads past a sequence's tokens is masked."""
from __future__ import annotations


import pytest
import torch

from seesaw_ds.kv.device import DeviceKVCache
from seesaw_ds.model.attention import DecodeMeta, _decode_padded, _decode_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,window,softcap", [((4, 4), None, None), ((6, 2), 5, None), ((8, 2), None, 30.0),
                                                  ((3, 1), 7, 20.0)])
def test_padded_decode_equals_one_sdpa_per_sequence(dtype, heads, window, softcap):
    torch.manual_seed(1)
    n_q, n_kv = heads
    cache = DeviceKVCache(range(1), 40, 4, n_kv, 16, dtype, torch.device("cpu"))
    cache.keys.normal_()
    cache.values.normal_()
    lengths = [1, 6, 13, 9]
    for seq in range(len(lengths)):
        cache.allocator.ensure(seq, 1)  # one block each, side by side: growing them fragments their tables
    for seq, length in enumerate(lengths):
        cache.allocator.ensure(seq, length)
    spans = [cache.token_spans(seq, length) for seq, length in enumerate(lengths)]
    assert any(len(s) > 1 for s in spans)
    meta = DecodeMeta.over(cache, spans, write_blocks=torch.zeros(4, dtype=torch.long),
                           write_offsets=torch.zeros(4, dtype=torch.long))
    query = torch.randn(len(lengths), n_q, 1, 16, dtype=dtype)
    keys, values = cache.flat(0)
    padded = _decode_padded(query, meta, keys, values, 0.25, window, softcap)
    reference = _decode_reference(0, query, meta, keys, values, 0.25, window, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(padded, reference, atol=tolerance, rtol=tolerance)


def test_padded_decode_reads_only_each_sequences_own_blocks():
    """The block table's entries past a sequence's blocks (stale entries of the step buffers: other sequences'
    blocks) are read by the gather but masked: what those blocks hold changes nothing."""
    torch.manual_seed(2)
    cache = DeviceKVCache(range(1), 40, 4, 2, 16, torch.float32, torch.device("cpu"))
    cache.keys.normal_()
    cache.values.normal_()
    lengths = [2, 11, 5]
    for seq, length in enumerate(lengths):
        cache.allocator.ensure(seq, length)
    spans = [cache.token_spans(seq, length) for seq, length in enumerate(lengths)]
    meta = DecodeMeta.over(cache, spans, write_blocks=torch.zeros(3, dtype=torch.long),
                           write_offsets=torch.zeros(3, dtype=torch.long))
    query = torch.randn(3, 4, 1, 16)
    keys, values = cache.flat(0)
    want = _decode_reference(0, query, meta, keys, values, 0.25, None)
    used = {block for table in cache.allocator.tables.values() for block in table}
    spare = [block for block in range(40) if block not in used]
    for row, length in enumerate(lengths):  # rows past their blocks point at other blocks, full of large values
        meta.block_table[row, -(-length // 4):] = spare[row]
        keys.view(-1, 4, 2, 16)[spare[row]] = 1e4
        values.view(-1, 4, 2, 16)[spare[row]] = -1e4
    torch.testing.assert_close(_decode_padded(query, meta, keys, values, 0.25, None), want, atol=1e-5, rtol=1e-5)
