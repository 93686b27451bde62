"""The lean decode step (issue 22 item 2): persistent step buffers filled once per step and kept across steps,
no host sync inside the forward (kernel and padded paths), and rotary embeddings read from position-indexed
tables equal to what transformers' rotary modules compute per call."""
from __future__ import annotations

import pytest
import torch

import tiny_families as tf
from seesaw_ds.model import kernels
from seesaw_ds.model.decode_step import DecodeBuffers, table_width
from seesaw_ds.model.rope import SequenceRope

CPU = torch.device("cpu")


def _check(step, tokens, positions, tables, block_size):
    assert step.token_ids.tolist() == tokens and step.positions.tolist() == positions
    assert step.lengths.tolist() == [p + 1 for p in positions] and step.max_length == max(positions) + 1
    for row, (position, table) in enumerate(zip(positions, tables)):
        count = position // block_size + 1
        assert step.block_table[row, :count].tolist() == table[:count]
        assert step.write_slots[row].item() == table[position // block_size] * block_size + position % block_size


def test_buffers_keep_their_storage_from_step_to_step():
    buffers = DecodeBuffers(CPU, block_size=4, max_seqs=8, max_blocks=6)
    first = buffers.fill([11, 12, 13], [0, 5, 17], [[3], [7, 9], [1, 2, 4, 8, 5]])
    _check(first, [11, 12, 13], [0, 5, 17], [[3], [7, 9], [1, 2, 4, 8, 5]], 4)
    pointers = (first.token_ids.data_ptr(), first.block_table.data_ptr(), first.write_slots.data_ptr())
    second = buffers.fill([21, 22], [6, 2], [[7, 9, 10], [0]])  # fewer sequences, other tables
    _check(second, [21, 22], [6, 2], [[7, 9, 10], [0]], 4)
    assert (second.token_ids.data_ptr(), second.block_table.data_ptr(), second.write_slots.data_ptr()) == pointers
    assert buffers.reallocations == 0


def test_unsized_buffers_grow_by_doubling_and_stay_right():
    buffers = DecodeBuffers(CPU, block_size=2, max_seqs=2, max_blocks=2)
    tables = [list(range(10 * i, 10 * i + 6)) for i in range(5)]
    step = buffers.fill([1, 2, 3, 4, 5], [10, 3, 0, 7, 11], tables)
    _check(step, [1, 2, 3, 4, 5], [10, 3, 0, 7, 11], tables, 2)
    assert buffers.reallocations == 1 and (buffers.max_seqs, buffers.max_blocks) == (5, 6)


def test_table_width_is_a_max_model_len_sequence_capped_by_the_tier():
    assert table_width(100, 16, 1000) == 7 and table_width(100_000, 16, 50) == 50 and table_width(None, 16, 9) is None


ROPE_CASES = ["llama3", "llama2", "gemma3", "phi3", "qwen3", "granite", "olmo2"]  # olmo2: float32 cos/sin


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_equal_the_module_called_on_the_positions(case, dtype):
    """Position-independent rope types (default, llama3, linear, per layer type): the table lookup gives the
    module's own values, bit for bit, for decode rows and packed prefill rows, also past the first table."""
    from seesaw_ds.model.template import build_template

    config = tf.make_config(case)
    rotary = type(build_template(config).model.rotary_emb)(config=config)
    layer_types = sorted(set(getattr(config, "layer_types", None) or [None])) if case == "gemma3" else [None]
    rope = SequenceRope(rotary, per_sequence=False)
    hidden = torch.zeros(1, 1, 8, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    decode = torch.randint(0, 500, (7, 1), generator=generator)
    packed = torch.cat([torch.arange(0, 9), torch.arange(300, 330), torch.arange(3)])[None, :]
    for layer_type in layer_types:
        for positions, segments in ((packed, [0, 9, 39, 42]), (decode, list(range(8)))):
            call = (hidden, positions) if layer_type is None else (hidden, positions, layer_type)
            want = rotary(*call)
            got = rope(hidden, positions, segments, layer_type, max_position=int(positions.max()))
            assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    table = rope.table(hidden, 1, layer_types[0])[0]
    assert table.shape[0] == 660  # 330 positions, then doubled
    for _ in range(3):  # covered positions: the same table, whatever dtype the module returns
        rope(hidden, decode, list(range(8)), layer_types[0], max_position=int(decode.max()))
    assert rope.table(hidden, 1, layer_types[0])[0] is table


def _no_host_sync(monkeypatch):
    """Every Python-level way a tensor's value reaches the host raises from now on (on a GPU each is a sync)."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} inside the decode forward")
        return method
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def _decode_steps(executor, monkeypatch, steps: int = 4):
    """Prefill test_compiled's prompts, then greedy decode steps, each forward with host reads refused; returns
    the tokens, the last logits and the step buffers' storage pointers seen."""
    from unit.test_compiled import PROMPTS

    from seesaw_ds.model.executor import ForwardPlan, SeqWork

    _, logits = executor.forward(ForwardPlan("prefill", [SeqWork(i, 0, p) for i, p in enumerate(PROMPTS)],
                                             sink="device"))
    lengths, tokens, seen = [len(p) for p in PROMPTS], [], set()
    for _ in range(steps):
        tokens.append(logits.argmax(-1).tolist())
        work = [SeqWork(i, 0, [tokens[-1][i]], start=lengths[i]) for i in range(len(PROMPTS))]
        with monkeypatch.context() as patched:
            _no_host_sync(patched)
            _, logits = executor.forward(ForwardPlan("decode", work))
        seen.add(executor.step_buffers().storage.data_ptr())
        lengths = [n + 1 for n in lengths]
    return tokens, logits, seen


def test_decode_forward_reuses_its_buffers_and_reads_nothing_back(family_models, one_torch_thread, monkeypatch):
    """A job-sized executor's decode steps: the step buffers are made once and every step reads the same
    storage; the forward (inputs, layers, attention, head) never reads a tensor's value on the host, on the
    CPU kernel's path and on the padded path an accelerator takes; both give the same tokens and logits."""
    from unit.test_compiled import _executor

    results = {}
    for path in ("kernel", "padded"):
        with monkeypatch.context() as patched:
            if path == "padded":
                patched.setattr(kernels, "applies", lambda keys: False)
            executor = _executor(family_models["llama3"], "float32", False)
            executor.max_decode_seqs, executor.max_model_len = 8, 512
            executor.step_buffers()  # made here, where a job's executor makes them on its first decode step
            tokens, logits, seen = _decode_steps(executor, monkeypatch)
        buffers = executor.step_buffers()
        assert len(seen) == 1 and buffers.reallocations == 0 and buffers.max_seqs == 8
        assert buffers.max_blocks == table_width(512, executor.block_size, executor.device_blocks)
        results[path] = tokens, logits
    assert results["kernel"][0] == results["padded"][0]
    torch.testing.assert_close(results["kernel"][1], results["padded"][1], atol=1e-4, rtol=1e-4)


def test_padding_rows_of_a_graph_bucket_read_and_write_the_scratch_block_alone():
    buffers = DecodeBuffers(CPU, block_size=4, max_seqs=8, max_blocks=6)
    step = buffers.fill([11, 12, 13], [0, 5, 17], [[3], [7, 9], [1, 2, 4, 8, 5]], rows=6, pad_block=40)
    assert step.token_ids.tolist() == [11, 12, 13, 0, 0, 0] and step.positions.tolist() == [0, 5, 17, 0, 0, 0]
    assert step.lengths.tolist() == [1, 6, 18, 1, 1, 1] and step.max_length == 18  # the real rows' longest
    assert step.write_slots.tolist()[3:] == [160] * 3 and step.block_table[3:, 0].tolist() == [40] * 3
    assert step.write_slots.tolist()[:3] == [12, 9 * 4 + 1, 5 * 4 + 1]
    fewer = buffers.fill([21], [2], [[0]], rows=2, pad_block=40)  # the same storage, rows re-padded
    assert fewer.token_ids.tolist() == [21, 0] and fewer.lengths.tolist() == [3, 1]
    assert fewer.token_ids.data_ptr() == step.token_ids.data_ptr() and buffers.reallocations == 0
