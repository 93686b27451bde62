"""The GPU's paged decode attention (seesaw_ds/model/triton_decode.py), run on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1`` before Triton is imported: test_triton_decode.py runs this file so): equal
to the per-sequence SDPA reference for every cache dtype, GQA ratio (a group that is no power of two too),
head size, window, soft-cap and block size, with fragmented block tables, split over partitions or not (the
partition count rounded up to a power of two: empty partitions merged in); what the block table holds past a
sequence's blocks is never read; the check a GPU runs before its first use, over both compiled variants."""
from __future__ import annotations

import os

import pytest
import torch

from seesaw_ds.kv.device import DeviceKVCache
from seesaw_ds.model import triton_decode
from seesaw_ds.model.attention import DecodeMeta, _decode_reference

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/unit/test_triton_decode.py"


def _fragmented(n_kv: int, dim: int, dtype, block: int, lengths: list[int], blocks: int = 64):
    cache = DeviceKVCache(range(1), blocks, block, n_kv, dim, dtype, torch.device("cpu"))
    cache.keys.normal_()
    cache.values.normal_()
    for seq in range(len(lengths)):
        cache.allocator.ensure(seq, 1)  # one block each, side by side: growing them fragments their tables
    for seq, length in enumerate(lengths):
        cache.allocator.ensure(seq, length)
    spans = [cache.token_spans(seq, length) for seq, length in enumerate(lengths)]
    meta = DecodeMeta.over(cache, spans, write_blocks=torch.zeros(len(lengths), dtype=torch.long),
                           write_offsets=torch.zeros(len(lengths), dtype=torch.long))
    return cache, meta


def _kernel(query, meta, keys, values, scale, window, softcap, blocks_per_part=triton_decode.BLOCKS_PER_PART):
    return triton_decode.paged_decode_attention(query[:, :, 0], keys, values, meta.block_table, meta.lengths,
                                                meta.max_length, meta.cache.block_size, scale, window, softcap,
                                                blocks_per_part=blocks_per_part)[:, :, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,dim,window,softcap", [((4, 4), 16, None, None), ((6, 2), 16, 5, None),
                                                      ((8, 2), 24, None, 30.0), ((3, 1), 16, 7, 20.0)])
@pytest.mark.parametrize("blocks_per_part", [2, 32])
def test_triton_decode_equals_one_sdpa_per_sequence(dtype, heads, dim, window, softcap, blocks_per_part):
    torch.manual_seed(1)
    n_q, n_kv = heads
    lengths = [1, 6, 13, 9, 21]
    cache, meta = _fragmented(n_kv, dim, dtype, 4, lengths)
    assert any(len(cache.token_spans(seq, length)) > 1 for seq, length in enumerate(lengths))
    query = torch.randn(len(lengths), n_q, 1, dim, dtype=dtype)
    keys, values = cache.flat(0)
    got = _kernel(query, meta, keys, values, 0.25, window, softcap, blocks_per_part)
    want = _decode_reference(0, query, meta, keys, values, 0.25, window, softcap)
    assert got.dtype == dtype and got.shape == want.shape
    # float32 sums in another order; the interpreter rounds to bf16/fp16 by truncation (a GPU to nearest)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_triton_decode_at_the_default_block_size_over_partitions():
    """Block size 16, a head size of 64 and sequences of up to 300 tokens: several partitions of 4 blocks, one
    sequence shorter than a partition (the others' later partitions are empty for it)."""
    torch.manual_seed(3)
    lengths = [300, 17, 64, 129]
    cache, meta = _fragmented(2, 64, torch.float32, 16, lengths, blocks=48)
    query = torch.randn(len(lengths), 8, 1, 64)
    keys, values = cache.flat(0)
    want = _decode_reference(0, query, meta, keys, values, 0.125, None, None)
    assert triton_decode.partitions(meta.max_length, 16, 4) == 5
    assert triton_decode.launch_partitions(meta.max_length, 16, 4) == 8   # 3 empty for every sequence
    torch.testing.assert_close(_kernel(query, meta, keys, values, 0.125, None, None, 4), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_over_a_partition_count_rounded_up_with_a_window(dtype):
    """3 partitions of the longest sequence's blocks launched as 4: the last is empty for every sequence, and
    the window leaves the longest one's first partition empty too (every block of it before the window)."""
    torch.manual_seed(6)
    lengths = [190, 1, 70]
    cache, meta = _fragmented(2, 32, dtype, 16, lengths, blocks=24)
    query = torch.randn(len(lengths), 4, 1, 32, dtype=dtype)
    keys, values = cache.flat(0)
    assert triton_decode.partitions(meta.max_length, 16, 4) == 3
    assert triton_decode.launch_partitions(meta.max_length, 16, 4) == 4
    want = _decode_reference(0, query, meta, keys, values, 0.2, 100, 25.0)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(_kernel(query, meta, keys, values, 0.2, 100, 25.0, 4), want, atol=tolerance,
                               rtol=tolerance)


def test_triton_decode_reads_only_each_sequences_own_blocks():
    """The block table's entries past a sequence's blocks (stale entries of the step buffers) point at blocks
    full of huge values: the output is unchanged."""
    torch.manual_seed(2)
    lengths = [2, 11, 5]
    cache, meta = _fragmented(2, 16, torch.float32, 4, lengths, blocks=40)
    query = torch.randn(3, 4, 1, 16)
    keys, values = cache.flat(0)
    want = _decode_reference(0, query, meta, keys, values, 0.25, None)
    used = {block for table in cache.allocator.tables.values() for block in table}
    spare = [block for block in range(40) if block not in used]
    for row, length in enumerate(lengths):
        meta.block_table[row, -(-length // 4):] = spare[row]
        keys.view(-1, 4, 2, 16)[spare[row]] = 1e4
        values.view(-1, 4, 2, 16)[spare[row]] = -1e4
    torch.testing.assert_close(_kernel(query, meta, keys, values, 0.25, None, None), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_kernel(query, meta, keys, values, 0.25, None, None, 1), want, atol=1e-5, rtol=1e-5)


def test_triton_decode_refuses_what_it_cannot_serve():
    query = torch.randn(2, 6, 16)
    keys = torch.randn(8, 4, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        triton_decode.paged_decode_attention(query, keys, keys, torch.zeros(2, 2, dtype=torch.long),
                                             torch.ones(2, dtype=torch.long), 1, 4, 0.25)
    assert not triton_decode.applies(query)  # a CPU tensor: the CPU kernel or the padded path serve it


@pytest.mark.parametrize("window,softcap", [(None, None), (5, 30.0), (4096, None)])
def test_the_first_use_check_accepts_the_kernel_and_its_reference_agrees(window, softcap):
    """device_attention checks the kernel once per shape before a GPU decode uses it (one partition and two,
    a long window shortened to mask within the check's sequences); here (CPU tensors, the interpreter) the same
    check, and its direct reference equal to the per-sequence SDPA reference."""
    from seesaw_ds.model import device_attention

    query = torch.randn(3, 6, 16)
    device_attention._decode_state.clear()
    assert device_attention._decode_usable(("cpu",), query, 2, 4, window, softcap)
    assert device_attention._decode_usable(("cpu",), query, 2, 4, window, softcap, parts=8)  # 4 with blocks, 4 empty
    torch.manual_seed(4)
    lengths = [1, 6, 13]
    cache, meta = _fragmented(2, 16, torch.float32, 4, lengths, blocks=20)
    keys, values = cache.flat(0)
    tables = [row[:-(-length // 4)] for row, length in zip(meta.block_table.tolist(), lengths)]
    got = device_attention._paged_reference(query, keys, values, tables, lengths, 4, 0.25, window, softcap)
    want = _decode_reference(0, query[:, :, None], meta, keys, values, 0.25, window, softcap)[:, :, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_kernel_that_fails_its_check_is_refused_once_with_a_warning(monkeypatch, caplog):
    from seesaw_ds.model import device_attention

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nmore lines")

    monkeypatch.setattr(triton_decode, "paged_decode_attention", broken)
    device_attention._decode_state.clear()
    query = torch.randn(3, 4, 16)
    assert not device_attention._decode_usable(("cpu", "broken"), query, 2, 4, None, None)
    assert not device_attention._decode_usable(("cpu", "broken"), query, 2, 4, None, None)
    warnings = [r.getMessage() for r in caplog.records if "paged Triton decode kernel" in r.getMessage()]
    assert warnings == ["seesaw_ds: the paged Triton decode kernel is not used (RuntimeError: PassManager::run "
                        "failed); decode gathers each sequence's KV into a padded batch instead"]
