"""The CPU decode-attention kernel against torch SDPA on the same paged cache: GQA and MHA, sliding window,
head sizes of the vectorized path (multiples of 8, one and two register chunks) and of the plain loop,
sequence lengths around the 8-row blocks, sequences of one span (the kernel) and of several (SDPA's
fallback). Builds the kernel once per venv."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from seesaw_ds.kv.device import DeviceKVCache
from seesaw_ds.model import kernels
from seesaw_ds.model.attention import DecodeMeta, _decode


def test_kernel_builds_here():
    """This machine has a compiler: the engine must not silently run on the fallback."""
    assert kernels.load() is not None


def filled_cache(lengths: list[int], kv_heads: int, reserve: bool, head_dim: int = 32,
                 dtype: torch.dtype = torch.float32) -> DeviceKVCache:
    torch.manual_seed(0)
    cache = DeviceKVCache(range(3, 4), num_blocks=4096, block_size=4, num_kv_heads=kv_heads, head_dim=head_dim,
                          dtype=dtype, device=torch.device("cpu"))
    for step in range(max(lengths)):  # grow in lockstep, as decode does (fragments without reservations)
        for seq_id, length in enumerate(lengths):
            if step < length:
                cache.allocator.ensure(seq_id, step + 1, reserve_tokens=length if reserve else 0)
    cache.keys.normal_()
    cache.values.normal_()
    return cache


@pytest.mark.parametrize("heads,kv_heads,window,head_dim", [
    (8, 2, None, 32), (4, 4, None, 32), (8, 2, 7, 32),  # GQA, MHA, sliding window
    (4, 2, None, 128),  # two 64-float chunks of the value sum
    (4, 2, None, 12),  # not a multiple of 8: the plain loop
])
def test_kernel_matches_sdpa(heads, kv_heads, window, head_dim):
    rng = random.Random(heads + kv_heads + head_dim)
    # 1..17 around the 8-row blocks and their tails; a few long ones run the prefetch ahead and its stop
    lengths = [1, 7, 8, 9, 16, 17] + [rng.randint(1, 60) for _ in range(8)] + [rng.randint(100, 300) for _ in range(3)]
    cache = filled_cache(lengths, kv_heads, reserve=True, head_dim=head_dim)
    spans = [cache.token_spans(seq_id, length) for seq_id, length in enumerate(lengths)]
    assert all(len(runs) == 1 for runs in spans)
    query = torch.randn(len(lengths), heads, 1, head_dim)
    module = SimpleNamespace(layer_idx=3)
    # the new token's K/V are written first; write back what is already there so the cache stays as filled
    last = [runs[0][0] + runs[0][1] - 1 for runs in spans]
    blocks = torch.tensor([slot // 4 for slot in last])
    offsets = torch.tensor([slot % 4 for slot in last])
    flat_keys, flat_values = cache.flat(3)
    key, value = flat_keys[last][:, :, None], flat_values[last][:, :, None]
    fields = dict(write_blocks=blocks, write_offsets=offsets)
    fast = _decode(module, query, key, value, DecodeMeta.over(cache, spans, **fields), None, window)
    reference = _decode(module, query, key, value, DecodeMeta(cache=cache, spans=spans, **fields), None, window)
    assert fast.shape == reference.shape == (len(lengths), heads, 1, head_dim)
    assert torch.allclose(fast, reference, atol=1e-5), (fast - reference).abs().max()


def test_fragmented_sequences_take_the_fallback():
    lengths = [9, 14, 5]
    cache = filled_cache(lengths, 2, reserve=False)
    spans = [cache.token_spans(seq_id, length) for seq_id, length in enumerate(lengths)]
    assert any(len(runs) > 1 for runs in spans)
    assert DecodeMeta.over(cache, spans, write_blocks=None, write_offsets=None).starts is None


@pytest.mark.parametrize("heads,kv_heads,window,head_dim", [(9, 3, None, 64), (8, 2, 7, 32), (4, 2, None, 12)])
def test_bfloat16_cache_matches_float32_attention(heads, kv_heads, window, head_dim):
    """A bfloat16 cache (what a bf16 job decodes from) is read by the kernel in one call for the batch and
    widened to float32: the result equals float32 attention over the same (bf16-valued) cache, rounded once."""
    lengths = [1, 8, 9, 17, 40, 130]
    cache = filled_cache(lengths, kv_heads, reserve=True, head_dim=head_dim, dtype=torch.bfloat16)
    spans = [cache.token_spans(seq_id, length) for seq_id, length in enumerate(lengths)]
    query = torch.randn(len(lengths), heads, 1, head_dim).to(torch.bfloat16)
    last = [runs[0][0] + runs[0][1] - 1 for runs in spans]
    flat_keys, flat_values = cache.flat(3)
    key, value = flat_keys[last][:, :, None], flat_values[last][:, :, None]
    meta = DecodeMeta.over(cache, spans, write_blocks=torch.tensor([slot // 4 for slot in last]),
                           write_offsets=torch.tensor([slot % 4 for slot in last]))
    assert meta.starts is not None and kernels.applies(flat_keys)
    fast = _decode(SimpleNamespace(layer_idx=3), query, key, value, meta, head_dim ** -0.5, window)
    assert fast.dtype == torch.bfloat16
    for index, runs in enumerate(spans):
        start, length = runs[0]
        keys = flat_keys[start:start + length].float().transpose(0, 1)
        values = flat_values[start:start + length].float().transpose(0, 1)
        if window:
            keys, values = keys[:, -window:], values[:, -window:]
        want = torch.nn.functional.scaled_dot_product_attention(query[index:index + 1].float(), keys[None],
                                                                values[None], enable_gqa=heads != kv_heads)
        assert torch.allclose(fast[index].float(), want[0], atol=8e-3, rtol=8e-3), \
            (fast[index].float() - want[0]).abs().max()
