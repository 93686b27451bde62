"""The attention extension against the reference path (one torch SDPA / eager call per sequence) on the same
paged cache and packed rows: GQA and MHA, sliding window, soft-cap, head sizes of the vectorized paths
(multiples of 16 for AVX-512, of 8 for AVX2, one and several register chunks) and of the plain loop, sequence
lengths around the 8- and 16-row blocks, sequences of one span and fragmented ones, float32 / bfloat16 /
float16. The build is the one this machine's engine uses (``kernels.isa()``: on an AVX-512 CPU the AVX-512
build, whose head sizes that are not multiples of 16 take its AVX2 loops, and of 8 its plain loop). Builds the
extension once per venv."""
from __future__ import annotations

import random

import pytest
import torch

from seesaw_ds.kv.device import DeviceKVCache
from seesaw_ds.model import kernels
from seesaw_ds.model.attention import DecodeMeta, _decode


def test_kernel_builds_here():
    """This machine has a compiler: the engine must not silently run on the fallback."""
    assert kernels.load() is not None


def test_build_is_the_widest_this_cpu_runs():
    """One build per instruction set, chosen from /proc/cpuinfo: on this machine's CPU the widest it has, and
    within it the widest path each head size allows."""
    module = kernels.load()
    name = kernels.isa()
    assert module.__name__ == f"seesaw_decode_attention_{name}"
    widest = {"avx512bf16": "avx512", "avx512": "avx512", "avx2": "avx2", "base": "portable"}[name]
    assert module.isa() == widest
    assert module.linear_rows_loop() == ("avx512_bf16" if name == "avx512bf16" else "portable")
    assert module.prefill_scores_loop() == ("avx512_bf16" if name == "avx512bf16" else "float32_gemm")
    assert module.path(64) == module.path(128) == module.path(16) == widest
    assert module.path(40) == module.path(72) == ("portable" if name == "base" else "avx2")
    assert module.path(12) == "portable"


def test_isa_from_cpu_flags():
    avx2 = {"avx2", "fma", "f16c"}
    assert kernels.isa(avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}) == "avx512bf16"
    assert kernels.isa(avx2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}) == "avx512"
    assert kernels.isa(avx2 | {"avx512f", "avx512bw"}) == "avx2"  # no VL/DQ: not the AVX-512 build
    assert kernels.isa(avx2) == "avx2"
    assert kernels.isa({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2"}) == "base"  # no FMA/F16C
    assert kernels.isa(set()) == "base"
    assert "-mavx512f" in kernels.compile_flags("avx512") and "-mavx2" in kernels.compile_flags("avx512")
    assert not any("avx512" in flag for flag in kernels.compile_flags("avx2"))
    assert "-mavx512bf16" in kernels.compile_flags("avx512bf16") and "-mavx512bf16" not in kernels.compile_flags("avx512")


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
    layer = 3
    # the new token's K/V are written first; write back what is already there so the cache stays as filled
    last = [runs[0][0] + runs[0][1] - 1 for runs in spans]
    blocks = torch.tensor([slot // 4 for slot in last])
    offsets = torch.tensor([slot % 4 for slot in last])
    flat_keys, flat_values = cache.flat(3)
    key, value = flat_keys[last][:, :, None], flat_values[last][:, :, None]
    fields = dict(write_blocks=blocks, write_offsets=offsets)
    fast = _decode(layer, query, key, value, DecodeMeta.over(cache, spans, **fields), None, window)
    reference = _decode(layer, query, key, value, DecodeMeta.over(cache, spans, reference=True, **fields), None,
                        window)
    assert fast.shape == reference.shape == (len(lengths), heads, 1, head_dim)
    assert torch.allclose(fast, reference, atol=1e-5), (fast - reference).abs().max()


def _last_slots(spans):
    return [runs[-1][0] + runs[-1][1] - 1 for runs in spans]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,window,softcap,head_dim", [
    (8, 2, None, None, 32), (9, 3, 5, None, 64), (4, 4, None, 30.0, 16), (8, 2, 11, 2.5, 32), (4, 2, 6, 3.0, 12),
])
def test_kernel_reads_fragmented_block_tables(dtype, heads, kv_heads, window, softcap, head_dim):
    """Sequences grown in lockstep without reservations hold many separate blocks: the kernel walks every
    run of each (no gather, no contiguous-KV assumption), the window crossing run boundaries."""
    rng = random.Random(heads * 7 + head_dim)
    lengths = [1, 3, 4, 5, 9, 14, 33] + [rng.randint(1, 90) for _ in range(6)]
    cache = filled_cache(lengths, kv_heads, reserve=False, head_dim=head_dim, dtype=dtype)
    spans = [cache.token_spans(seq_id, length) for seq_id, length in enumerate(lengths)]
    assert sum(len(runs) > 1 for runs in spans) >= 6
    last = _last_slots(spans)
    flat_keys, flat_values = cache.flat(3)
    key, value = flat_keys[last][:, :, None], flat_values[last][:, :, None]
    query = torch.randn(len(lengths), heads, 1, head_dim).to(dtype)
    fields = dict(write_blocks=torch.tensor([slot // 4 for slot in last]),
                  write_offsets=torch.tensor([slot % 4 for slot in last]))
    layer = 3
    meta = DecodeMeta.over(cache, spans, **fields)
    assert kernels.applies(flat_keys)
    fast = _decode(layer, query, key, value, meta, head_dim ** -0.5, window, softcap)
    # reference in float32 over the same (rounded) cache values
    reference = _decode(layer, query.float(), key.float(), value.float(),
                        DecodeMeta.over(_as_float(cache), spans, reference=True, **fields), head_dim ** -0.5, window,
                        softcap)
    assert fast.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert torch.allclose(fast.float(), reference, atol=tolerance, rtol=tolerance), \
        (fast.float() - reference).abs().max()


def _as_float(cache: DeviceKVCache) -> DeviceKVCache:
    copy = DeviceKVCache(cache.layers, cache.scratch_block, cache.block_size, cache.keys.shape[3], cache.keys.shape[4],
                         torch.float32, torch.device("cpu"))
    copy.allocator = cache.allocator
    copy.keys.copy_(cache.keys)
    copy.values.copy_(cache.values)
    return copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,window,softcap,head_dim", [
    (8, 2, None, None, 32), (9, 3, 7, None, 64), (4, 4, None, 20.0, 16), (8, 2, 5, 2.5, 32),
])
def test_packed_prefill_one_call_matches_per_prompt_reference(dtype, heads, kv_heads, window, softcap, head_dim):
    from seesaw_ds.model.attention import PrefillMeta, _prefill
    from seesaw_ds.model.attention_reference import prefill_reference as _prefill_reference

    bounds, q, k, v = _packed_row([1, 7, 8, 19, 3, 40], heads, kv_heads, head_dim, dtype)
    total = bounds[-1]
    sunk = []
    meta = PrefillMeta(cu_seqlens=bounds, sink=lambda layer, keys, values: sunk.append((layer, keys.shape)))
    assert kernels.built()
    out = _prefill(2, q, k, v, meta, head_dim ** -0.5, window, softcap)
    want = _prefill_reference(q, k, v, bounds, head_dim ** -0.5, window, softcap)
    assert sunk == [(2, (kv_heads, total, head_dim))]
    assert out.shape == want.shape and out.dtype == dtype
    exact = lambda: _prefill_reference(q.double(), k.double(), v.double(), bounds, head_dim ** -0.5, window, softcap)
    _assert_as_exact(out, want, exact, softcap)


def _packed_row(lengths: list[int], heads: int, kv_heads: int, head_dim: int, dtype):
    """A packed prefill row of prompts of ``lengths``: its bounds and random q, k, v [1, heads, T, head_dim]."""
    torch.manual_seed(heads + head_dim)
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    make = lambda n: torch.randn(1, n, bounds[-1], head_dim).to(dtype)  # noqa: E731
    return bounds, make(heads), make(kv_heads), make(kv_heads)


def _assert_as_exact(out: torch.Tensor, want: torch.Tensor, exact, softcap) -> None:
    """``out`` equals the reference ``want`` (float32: up to float rounding); where the kernel computes in float32
    GEMMs (causal rows without soft-cap, kernels.PREFILL_BLOCK_ROWS) and the dtype is narrower, it is at least
    as close to the exact attention (``exact()``, float64) as the reference, or within the dtype's epsilon."""
    if softcap is None and kernels.PREFILL_BLOCK_ROWS and out.dtype != torch.float32:
        truth = exact()
        error = (out.double() - truth).abs().max()
        limit = max((want.double() - truth).abs().max(), torch.finfo(out.dtype).eps * truth.abs().max())
        assert error <= limit, (error, limit)
        return
    assert torch.equal(out, want) or torch.allclose(out.float(), want.float(), atol=1e-5), \
        (out.float() - want.float()).abs().max()


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (8, 2, 32)])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_bfloat16_prefill_scores_as_exact_as_float32_gemms(heads, kv_heads, head_dim, with_prefix):
    """bfloat16 prompts, head sizes of whole 32-element pairs: on the AVX512_BF16 build the scores are VDPBF16PS
    sums of exact products (tiles of 32 keys, 8 query rows at a time, blocks of kernels.PREFILL_BLOCK_ROWS rows),
    the softmax over each row's own keys. Lengths around the tiles and blocks, q and k strided as the engine's
    projections give them ([T, H, D] transposed), over cached prefixes too: the bf16 output is as close to
    float64 attention as the float32 GEMM path's (the same inputs widened) and as SDPA's, within bf16's
    epsilon."""
    from seesaw_ds.model.attention_reference import prefill_reference

    lengths = [1, 7, 8, 9, 31, 32, 33, 64, 65, 100, 257]
    done = [0, 3, 0, 40, 0, 1, 0, 32, 0, 0, 70] if with_prefix else [0] * len(lengths)
    torch.manual_seed(heads + head_dim)
    bounds = torch.tensor([0] + lengths).cumsum(0)
    total = int(bounds[-1])
    make = lambda n: torch.randn(total, n, head_dim).to(torch.bfloat16).transpose(0, 1)  # noqa: E731
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    assert q.stride(1) == heads * head_dim
    area = torch.randn(2, kv_heads, 80, head_dim).to(torch.bfloat16)
    contexts = [(area[0, :, 5:5 + n], area[1, :, 5:5 + n]) if n else None for n in done]
    scale = head_dim ** -0.5
    got = kernels.prefill_attention(q, k, v, bounds, scale, contexts=contexts)
    widened = kernels.prefill_attention(q.float(), k.float(), v.float(), bounds, scale,
                                        contexts=[(c[0].float(), c[1].float()) if c else None for c in contexts])
    sdpa = prefill_reference(q[None], k[None], v[None], bounds.tolist(), scale, None, None, contexts)[0]
    exact = prefill_reference(q[None].double(), k[None].double(), v[None].double(), bounds.tolist(), scale, None,
                              None, [(c[0].double(), c[1].double()) if c else None for c in contexts])[0]
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    error = (got.double() - exact).abs().max()
    # the float32 path's output rounded to bf16, and SDPA's: the errors a bf16 result of either has
    limit = max((widened.to(torch.bfloat16).double() - exact).abs().max(), (sdpa.double() - exact).abs().max())
    assert error <= limit, (error, limit)
    assert (got.float() - widened).abs().max() <= torch.finfo(torch.bfloat16).eps * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,window,softcap,head_dim", [
    (9, 3, None, None, 64), (8, 2, 6, None, 32), (4, 4, None, 20.0, 16), (8, 2, 5, 2.5, 32),
])
def test_packed_prefill_over_cached_prefixes_is_one_call_matching_the_reference(dtype, heads, kv_heads, window,
                                                                                 softcap, head_dim):
    """Prompts over a cached prefix (their rows from position P on, the prefix's K/V read per layer) go through
    the same one call per layer as the others, beside prompts without one, and give the reference's rows."""
    from seesaw_ds.model.attention import PrefillMeta, _prefill
    from seesaw_ds.model.attention_reference import prefill_reference as _prefill_reference

    lengths, done = [5, 7, 19, 3, 40], [12, 0, 30, 1, 0]
    bounds, q, k, v = _packed_row(lengths, heads, kv_heads, head_dim, dtype)
    area = torch.randn(2, kv_heads, 64, head_dim).to(dtype)  # prefixes as staged: views of a larger area
    contexts = [(area[0, :, 2:2 + n], area[1, :, 2:2 + n]) if n else None for n in done]
    reads = []

    def reader(context):
        def read(layer):
            reads.append(layer)
            return context
        return read
    meta = PrefillMeta(cu_seqlens=bounds, sink=lambda *args: None,
                       contexts=[reader(c) if c is not None else None for c in contexts])
    assert kernels.built()
    calls = []
    inner = kernels._module

    class Counting:
        def prefill_attention(self, *args):
            calls.append(len(args[7]))  # one context (or an empty one) per prompt
            return inner.prefill_attention(*args)
    kernels._module = Counting()
    try:
        out = _prefill(4, q, k, v, meta, head_dim ** -0.5, window, softcap)
    finally:
        kernels._module = inner
    want = _prefill_reference(q, k, v, bounds, head_dim ** -0.5, window, softcap, contexts)
    assert calls == [len(lengths)] and reads == [4, 4, 4]
    assert out.shape == want.shape and out.dtype == dtype
    exact = lambda: _prefill_reference(q.double(), k.double(), v.double(), bounds, head_dim ** -0.5, window, softcap,
                                       [(c[0].double(), c[1].double()) if c is not None else None for c in contexts])
    _assert_as_exact(out, want, exact, softcap)


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
    assert kernels.applies(flat_keys)
    fast = _decode(3, query, key, value, meta, head_dim ** -0.5, window)
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


def _scattered_runs(rng: random.Random, lengths: list[int]) -> tuple[list[list[tuple[int, int]]], int]:
    """Each sequence as runs of 1-20 slots with gaps between them (a fragmented block table); the cache size."""
    spans, slot = [], 0
    for length in lengths:
        runs, left = [], length
        while left:
            count = min(left, rng.randint(1, 20))
            runs.append((slot + rng.randint(0, 3), count))
            slot = runs[-1][0] + count
            left -= count
        spans.append(runs)
    return spans, slot + 4


def _reference(query, keys, values, spans, scale, window, softcap):
    """Attention in float64 over each sequence's slots (of the same, possibly rounded, cache values)."""
    group = query.shape[1] // keys.shape[1]
    out = []
    for index, runs in enumerate(spans):
        slots = torch.cat([torch.arange(first, first + count) for first, count in runs])[-window if window else 0:]
        k = keys[slots].double().transpose(0, 1).repeat_interleave(group, 0)
        v = values[slots].double().transpose(0, 1).repeat_interleave(group, 0)
        scores = torch.einsum("hd,htd->ht", query[index].double(), k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out.append(torch.einsum("ht,htd->hd", torch.softmax(scores, -1), v))
    return torch.stack(out).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 16, 80, 40, 12])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 2), (10, 2), (14, 2)])
def test_kernel_paths_match_float64_reference(dtype, head_dim, heads, kv_heads):
    """``kernels.decode_attention`` called directly, float32 query and output, against float64 attention over the
    same cache values: GQA 1 (16-row score blocks), 3 (one sub-group of three heads), 4 (four), 5 (three + two)
    and 7 (three + four); head sizes of one (16), four (64), eight (128) and 4 + 1 (80) 16-float vectors on the
    AVX-512 path, 40 on the AVX2 loops, 12 on the plain loop; lengths around the 8- and 16-row blocks and long
    enough for the prefetch to run ahead; fragmented runs; window and soft-cap. The cache dtype only rounds the
    values: the arithmetic is float32 on every path, so the tolerance is float32's."""
    rng = random.Random(heads * 1000 + head_dim)
    torch.manual_seed(head_dim + heads)
    lengths = [1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 257]
    spans, slots = _scattered_runs(rng, lengths)
    keys = torch.randn(slots, kv_heads, head_dim).to(dtype)
    values = torch.randn(slots, kv_heads, head_dim).to(dtype)
    query = torch.randn(len(lengths), heads, head_dim)
    runs = kernels.SpanRuns(spans)
    assert kernels.applies(keys)
    for window, softcap in [(None, None), (21, None), (None, 2.5), (5, 30.0)]:
        got = kernels.decode_attention(query, keys, values, runs, head_dim ** -0.5, window, softcap)
        want = _reference(query, keys, values, spans, head_dim ** -0.5, window, softcap)
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, atol=2e-5, rtol=2e-5), (window, softcap, (got - want).abs().max())


def test_kernel_threads_give_the_same_result():
    """Sequences are spread over torch's intra-op threads, each computed by one thread in the same order:
    one thread and two give the same bits."""
    rng = random.Random(5)
    lengths = [rng.randint(1, 400) for _ in range(24)]
    spans, slots = _scattered_runs(rng, lengths)
    keys = torch.randn(slots, 3, 64).to(torch.bfloat16)
    values = torch.randn(slots, 3, 64).to(torch.bfloat16)
    query = torch.randn(len(lengths), 9, 64)
    runs = kernels.SpanRuns(spans)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.decode_attention(query, keys, values, runs, 0.125)
        torch.set_num_threads(2)
        two = kernels.decode_attention(query, keys, values, runs, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
