"""The decode path where the CPU kernel does not apply (an accelerator's tensors, or no compiler): every
sequence's KV gathered into one padded batch and one masked SDPA call per layer, equal to the per-sequence
reference for every dtype, GQA ratio, window and soft-cap, with fragmented block tables."""
from __future__ import annotations

from types import SimpleNamespace

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
    reference = _decode_reference(SimpleNamespace(layer_idx=0), query, meta, keys, values, 0.25, window, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(padded, reference, atol=tolerance, rtol=tolerance)
