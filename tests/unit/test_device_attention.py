"""The accelerator's prefill backend (seesaw_ds/model/device_attention.py) and when it is used: the
variable-length call is taken only after it matched per-prompt SDPA once, with this torch's keywords; a
wrong or failing one is refused with one warning and the per-prompt loop runs; CPU tensors never reach it."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from seesaw_ds.model import attention, attention_reference, device_attention


def _fake_varlen(causal: bool = True):
    """A varlen_attn stand-in on the CPU with this torch's public keywords: [T, H, D] in and out."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False, **_):
        bounds = cu_seq_q.tolist()
        out = [F.scaled_dot_product_attention(query[a:b].transpose(0, 1)[None], key[a:b].transpose(0, 1)[None],
                                              value[a:b].transpose(0, 1)[None], scale=scale, enable_gqa=enable_gqa,
                                              is_causal=causal and tuple(window_size) == (-1, 0))[0].transpose(0, 1)
               for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(out)
    return varlen_attn


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(device_attention, "_state", {})


def _packed(n_q=6, n_kv=2, dim=16, bounds=(0, 4, 13, 20), dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(5)
    make = lambda heads: torch.randn(heads, bounds[-1], dim, generator=generator, dtype=dtype)
    return make(n_q), make(n_kv), make(n_kv), list(bounds)


def test_a_matching_varlen_call_is_used(monkeypatch):
    monkeypatch.setattr(device_attention, "_varlen", lambda: _fake_varlen())
    query, key, value, bounds = _packed()
    cache: dict = {}
    out = device_attention.prefill(query, key, value, bounds, 0.25, None, None, cache)
    assert out is not None and "cu" in cache
    want = attention_reference.prefill_reference(query[None], key[None], value[None], bounds, 0.25, None)[0]
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_a_wrong_or_failing_varlen_call_is_refused_once_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(device_attention, "_varlen", lambda: _fake_varlen(causal=False))
    query, key, value, bounds = _packed()
    with caplog.at_level(logging.WARNING, logger=device_attention.__name__):
        assert device_attention.prefill(query, key, value, bounds, 0.25, None, None, {}) is None
        assert device_attention.prefill(query, key, value, bounds, 0.25, None, None, {}) is None
    warnings = [r for r in caplog.records if "not used for prefill" in r.getMessage()]
    assert len(warnings) == 1 and "differs from per-prompt SDPA" in warnings[0].getMessage()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(device_attention, "_state", {})
    monkeypatch.setattr(device_attention, "_varlen", lambda: broken)
    assert device_attention.prefill(query, key, value, bounds, 0.25, None, None, {}) is None


def test_torch_varlen_on_the_cpu_is_refused_not_raised():
    """The real torch function (CUDA-only where it exists): the check turns it down instead of failing."""
    query, key, value, bounds = _packed()
    assert device_attention.prefill(query, key, value, bounds, 0.25, None, None, {}) is None


@pytest.mark.parametrize("window,softcap,dtype", [(4, None, torch.bfloat16), (None, 30.0, torch.bfloat16),
                                                  (None, None, torch.float32)])
def test_windows_soft_caps_and_float32_take_the_per_prompt_loop(monkeypatch, window, softcap, dtype):
    calls = []
    monkeypatch.setattr(device_attention, "_varlen", lambda: calls.append(1) or _fake_varlen())
    query, key, value, bounds = _packed(dtype=dtype)
    assert device_attention.prefill(query, key, value, bounds, 0.25, window, softcap, {}) is None
    assert not calls


def test_cpu_tensors_never_reach_the_accelerator_backend(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("device_attention.prefill called with CPU tensors")
    monkeypatch.setattr(device_attention, "prefill", forbidden)
    query, key, value, bounds = _packed(dtype=torch.float32)
    sunk = []
    meta = attention.PrefillMeta(cu_seqlens=bounds, sink=lambda layer, k, v: sunk.append(layer))
    layer = 0
    out = attention._prefill(layer, query[None], key[None], value[None], meta, 0.25, None)
    want = attention_reference.prefill_reference(query[None], key[None], value[None], bounds, 0.25, None)
    torch.testing.assert_close(out, want)
    assert sunk == [0]


def test_configure_leaves_the_cpu_alone():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    device_attention.configure(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def _paged_stand_in(calls: list, broken_parts: int | None = None, ignores_window: bool = False):
    """A stand-in for triton_decode.paged_decode_attention that records each call's launch partition count and
    window and answers with the direct reference: wrong where it launches ``broken_parts`` partitions, or
    computed without the window (``ignores_window``)."""
    from seesaw_ds.model import triton_decode

    def paged(query, keys, values, table, lengths, max_length, block, scale, window=None, softcap=None, *,
              blocks_per_part=triton_decode.BLOCKS_PER_PART):
        parts = triton_decode.launch_partitions(max_length, block, blocks_per_part)
        calls.append((parts, window, max(lengths.tolist())))
        lengths = lengths.tolist()
        tables = [row[:-(-length // block)] for row, length in zip(table.tolist(), lengths)]
        out = device_attention._paged_reference(query, keys, values, tables, lengths, block, scale,
                                                None if ignores_window else window, softcap).to(query.dtype)
        return out + 1 if parts == broken_parts else out
    return paged


def _decode_check(monkeypatch, paged, window, softcap=None, block=16, parts=1, state=None):
    from seesaw_ds.model import triton_decode

    monkeypatch.setattr(device_attention, "_decode_state", {} if state is None else state)
    monkeypatch.setattr(triton_decode, "available", lambda: True)
    monkeypatch.setattr(triton_decode, "paged_decode_attention", paged)
    query = torch.randn(3, 6, 16)
    return device_attention._decode_usable(("cpu", window, softcap), query, 2, block, window, softcap, parts)


@pytest.mark.parametrize("window,softcap", [(None, None), (4096, None), (8, 50.0)])
def test_the_decode_check_runs_one_partition_and_several_and_a_window_that_masks(monkeypatch, window, softcap):
    """The first-use check launches the single-partition variant (the kernel stores the output: every step of
    up to 512 tokens) and a multi-partition one (the merge kernel); with a sliding window, one shorter than its
    sequences, however long the model's (the key keeps only whether there is a window)."""
    calls = []
    assert _decode_check(monkeypatch, _paged_stand_in(calls), window, softcap)
    assert sorted(parts for parts, _, _ in calls) == [1, 2]
    for _, shown, longest in calls:
        if window is None:
            assert shown is None
        else:
            assert 0 < shown <= window and shown < longest


@pytest.mark.parametrize("broken_parts", [1, 2])
def test_a_kernel_wrong_in_either_partition_variant_is_refused(monkeypatch, caplog, broken_parts):
    with caplog.at_level(logging.WARNING, logger=device_attention.__name__):
        assert not _decode_check(monkeypatch, _paged_stand_in([], broken_parts=broken_parts), None)
    warnings = [r.getMessage() for r in caplog.records if "paged Triton decode kernel" in r.getMessage()]
    assert len(warnings) == 1 and f"over {broken_parts} partition(s)" in warnings[0]


def test_a_kernel_that_ignores_a_long_window_is_refused(monkeypatch):
    """A window of 4096 tokens masks nothing in the check's sequences (4 blocks at most): the check shortens it."""
    assert not _decode_check(monkeypatch, _paged_stand_in([], ignores_window=True), 4096)
    assert _decode_check(monkeypatch, _paged_stand_in([], ignores_window=True), None)


def test_a_larger_partition_count_is_checked_once_before_its_first_step(monkeypatch):
    """A graphed step is sized for its buffers (a long span, most partitions empty): its count, 8 here, is
    checked when first met, after the shape's own check, and then kept."""
    calls, state = [], {}
    assert _decode_check(monkeypatch, _paged_stand_in(calls), None, parts=8, state=state)
    assert sorted(parts for parts, _, _ in calls) == [1, 2, 8]
    assert _decode_check(monkeypatch, _paged_stand_in(calls), None, parts=8, state=state)
    assert _decode_check(monkeypatch, _paged_stand_in(calls), None, parts=2, state=state)
    assert len(calls) == 3                                   # nothing checked twice


def test_a_kernel_wrong_only_at_a_larger_count_falls_back_for_that_count_alone(monkeypatch, caplog):
    state = {}
    with caplog.at_level(logging.WARNING, logger=device_attention.__name__):
        assert not _decode_check(monkeypatch, _paged_stand_in([], broken_parts=16), None, parts=16, state=state)
        assert _decode_check(monkeypatch, _paged_stand_in([], broken_parts=16), None, parts=1, state=state)
        assert _decode_check(monkeypatch, _paged_stand_in([], broken_parts=16), None, parts=4, state=state)
    warnings = [r.getMessage() for r in caplog.records if "paged Triton decode kernel" in r.getMessage()]
    assert len(warnings) == 1 and "over 16 partition(s)" in warnings[0] and "launch 16 partitions" in warnings[0]
