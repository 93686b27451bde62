"""Attention soft-capping (Gemma 2) on both paths against a direct computation, and the refusal of keyword
arguments the attention function does not implement."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from seesaw_ds.model.attention import DecodeMeta, PrefillMeta, _decode, seesaw_attention
from unit.test_decode_attention import filled_cache


def _reference(q, k, v, scale, cap, window=None):
    """q [Hq, Tq, D] at the last Tq positions of k/v [Hkv, Tk, D]; causal, optional window, soft-capped."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = torch.tanh(q @ k.transpose(1, 2) * scale / cap) * cap
    tq, tk = q.shape[1], k.shape[1]
    qpos = torch.arange(tk - tq, tk)[:, None]
    kpos = torch.arange(tk)[None, :]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


@pytest.mark.parametrize("window", [None, 4])
def test_prefill_softcap_matches_direct_computation(window):
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 9, 1], 4, 2, 16
    total = sum(lengths)
    q, k, v = torch.randn(1, heads, total, dim), torch.randn(1, kv_heads, total, dim), torch.randn(1, kv_heads, total, dim)
    bounds = [0, 5, 14, 15]
    meta = PrefillMeta(cu_seqlens=bounds, sink=lambda *args: None)
    out, _ = seesaw_attention(SimpleNamespace(layer_idx=0), q, k, v, None, scaling=0.3, sliding_window=window,
                              softcap=2.0, seesaw=meta)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        want = _reference(q[0, :, lo:hi], k[0, :, lo:hi], v[0, :, lo:hi], 0.3, 2.0, window)
        assert torch.allclose(out[0, lo:hi].transpose(0, 1), want, atol=1e-5)


def test_decode_softcap_matches_direct_computation():
    lengths = [9, 14, 5]
    cache = filled_cache(lengths, 2, reserve=True, head_dim=16)
    spans = [cache.token_spans(seq_id, length) for seq_id, length in enumerate(lengths)]
    last = [runs[0][0] + runs[0][1] - 1 for runs in spans]
    flat_keys, flat_values = cache.flat(3)
    key, value = flat_keys[last][:, :, None], flat_values[last][:, :, None]
    query = torch.randn(len(lengths), 4, 1, 16)
    meta = DecodeMeta.over(cache, spans, write_blocks=torch.tensor([s // 4 for s in last]),
                           write_offsets=torch.tensor([s % 4 for s in last]))
    out = _decode(3, query, key, value, meta, 0.25, None, softcap=3.0)
    for index, runs in enumerate(spans):
        start, length = runs[0]
        keys = flat_keys[start:start + length].transpose(0, 1)
        values = flat_values[start:start + length].transpose(0, 1)
        want = _reference(query[index], keys, values, 0.25, 3.0)
        assert torch.allclose(out[index], want, atol=1e-5)


def test_unimplemented_keyword_is_refused():
    q = torch.randn(1, 2, 3, 8)
    meta = PrefillMeta(cu_seqlens=[0, 3], sink=lambda *args: None)
    with pytest.raises(NotImplementedError, match="s_aux"):
        seesaw_attention(SimpleNamespace(layer_idx=0), q, q, q, None, seesaw=meta, s_aux=torch.zeros(2))
    out, _ = seesaw_attention(SimpleNamespace(layer_idx=0), q, q, q, None, seesaw=meta, position_ids=None)
    assert out.shape == (1, 3, 2, 8)


@pytest.mark.parametrize("window,softcap,heads", [(None, None, (4, 2)), (6, None, (4, 4)), (None, 30.0, (6, 2)),
                                                  (5, 20.0, (4, 1))])
def test_prefill_over_a_cached_prefix_equals_the_whole_prompt(window, softcap, heads):
    """A prompt's suffix attending over its prefix's K/V (kept from an earlier step) gives the rows the whole
    prompt gives, beside a prompt computed whole in the same batch."""
    from seesaw_ds.model.attention_reference import prefill_reference as _prefill_reference

    torch.manual_seed(0)
    n_q, n_kv = heads
    whole, other, done = 21, 9, 12
    q = torch.randn(1, n_q, whole + other, 16)
    k, v = torch.randn(1, n_kv, whole + other, 16), torch.randn(1, n_kv, whole + other, 16)
    reference = _prefill_reference(q, k, v, [0, whole, whole + other], 0.25, window, softcap)
    keep = torch.cat([torch.arange(done, whole), torch.arange(whole, whole + other)])
    contexts = [(k[0, :, :done], v[0, :, :done]), None]
    out = _prefill_reference(q[:, :, keep], k[:, :, keep], v[:, :, keep], [0, whole - done, whole - done + other],
                             0.25, window, softcap, contexts)
    torch.testing.assert_close(out, reference[:, :, keep], atol=1e-5, rtol=1e-5)
