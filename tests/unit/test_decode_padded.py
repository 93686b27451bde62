"""The decode path where the CPU kernel does not apply (an accelerator's tensors, or no compiler): every
sequence's KV gathered into one padded batch and grouped attention (two batched matmuls) per layer, equal to
the per-sequence reference for every dtype, GQA ratio, window and soft-cap, with fragmented block tables."""
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


def test_padded_index_lists_every_sequences_slots_in_order():
    """The vectorized padded index equals each sequence's runs written out one by one."""
    generator = torch.Generator().manual_seed(3)
    spans, next_free = [], 0
    for _ in range(9):
        runs = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            count = int(torch.randint(1, 7, (1,), generator=generator))
            next_free += int(torch.randint(0, 4, (1,), generator=generator))
            runs.append((next_free, count))
            next_free += count
        spans.append(runs)
    meta = DecodeMeta.over(None, spans, write_blocks=torch.zeros(9, dtype=torch.long),
                           write_offsets=torch.zeros(9, dtype=torch.long))
    slots, valid = meta.padded(torch.device("cpu"))
    for row, runs in enumerate(spans):
        want = [first + i for first, count in runs for i in range(count)]
        assert valid[row].sum().item() == len(want)
        assert slots[row, :len(want)].tolist() == want
        assert not valid[row, len(want):].any()
