"""CUDA graphs of the decode step (seesaw_ds/model/graphs.py, issue 23 item 2), on the CPU: the buckets, when
graphs apply, the capture bookkeeping (captured once per bucket, replayed, captured again when what they read
moves, dropped after a replay that does not reproduce its warm-up, kept under ``auto`` only where faster),
and whole decode steps through :class:`ReplayFake`, which runs the captured step again at every replay: a size
or tensor taken at capture time instead of from the step buffers would show as other logits than eager's."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from one_rank import PROMPTS, executor as one_rank_executor, generate
from seesaw_ds.model import graphs
from seesaw_ds.model.graphs import DecodeGraphs, ReplayFake, bucket_for, buckets

CPU = torch.device("cpu")


@pytest.mark.parametrize("max_seqs,want", [
    (1, [1]), (3, [1, 2, 3]), (4, [1, 2, 4]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 20]),
    (33, [1, 2, 4, 8, 16, 24, 32, 33]),
])
def test_buckets_are_vllms_sizes_up_to_the_step_buffers_rows(max_seqs, want):
    assert buckets(max_seqs) == want


def test_a_step_runs_the_smallest_bucket_that_holds_it():
    sizes = buckets(20)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 20, 21)] == [1, 2, 4, 8, 8, 16, 20, 20, None]
    assert len(buckets(256)) == 3 + 32 and buckets(256)[-1] == 256


@pytest.mark.parametrize("mode", ["auto", "true", "false", True, "TRUE"])
def test_graphs_are_off_on_a_cpu_and_as_asked_on_cuda(mode):
    assert graphs.resolve(mode, CPU) == "false"
    assert graphs.resolve(mode, torch.device("cuda")) == {True: "true"}.get(mode, str(mode).lower())


def test_a_bad_mode_names_the_value():
    with pytest.raises(ValueError, match="model.cuda_graphs='often'"):
        graphs.resolve("often", CPU)


class Counter:
    """A step body: returns its call count's row (a fresh tensor each call)."""

    def __init__(self):
        self.calls = 0
        self.value = torch.zeros(3)

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.value.clone()


def test_a_bucket_is_captured_once_then_replayed():
    fake = ReplayFake()
    decode = DecodeGraphs("true", [1, 2, 4], fake)
    body = Counter()
    first = decode.run(4, body)
    assert fake.captures == 1 and decode.captures == 1 and decode.capture_seconds > 0
    body.value += 7                                           # the step buffers now hold another step
    again = decode.run(4, body)
    assert again is first and again.tolist() == [7.0] * 3     # the captured output, rewritten by the replay
    assert fake.captures == 1 and decode.replays == 1


def test_graphs_are_captured_again_when_what_they_read_moves():
    fake, generation = ReplayFake(), [0]
    decode = DecodeGraphs("true", [1, 2, 4], fake)
    decode.run(2, Counter(), lambda: generation[0])
    decode.run(4, Counter(), lambda: generation[0])
    decode.run(2, Counter(), lambda: generation[0])
    assert fake.captures == 2
    generation[0] += 1                                        # weights re-placed, a table grown, buffers grown
    decode.run(2, Counter(), lambda: generation[0])
    decode.run(4, Counter(), lambda: generation[0])
    assert fake.captures == 4
    decode.drop()                                             # a layout switch
    decode.run(4, Counter(), lambda: generation[0])
    assert fake.captures == 5


def test_a_capture_whose_warm_up_grows_a_table_keeps_only_its_own_graph():
    fake, generation = ReplayFake(), [0]
    decode = DecodeGraphs("true", [1, 2, 4], fake)
    decode.run(1, Counter(), lambda: generation[0])

    def growing():                                            # its first call grows what graphs read
        generation[0] = 1
        return torch.zeros(2)
    decode.run(2, growing, lambda: generation[0])
    decode.run(2, growing, lambda: generation[0])             # kept: captured after the growth
    decode.run(1, Counter(), lambda: generation[0])           # captured before it: captured again
    assert fake.captures == 3


class Corrupting(ReplayFake):
    """A graph that reads stale memory: its replays give other numbers than the step."""

    def replay(self, graph, output):
        output.copy_(graph() + 1.0)


def test_a_replay_that_does_not_reproduce_its_warm_up_turns_graphs_off(caplog):
    decode = DecodeGraphs("true", [1, 2, 4], Corrupting())
    body = Counter()
    with caplog.at_level(logging.WARNING):
        out = decode.run(2, body)
    assert out.tolist() == [0.0] * 3                          # the eager step's result, not the graph's
    assert decode.disabled and decode.bucket(2) is None and decode.bucket(1) is None
    assert sum("did not reproduce its eager step" in r.getMessage() for r in caplog.records) == 1


class Refusing(ReplayFake):
    """A capture that fails as CUDA's does on a host sync inside the step."""

    def capture(self, body):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")


def test_a_failed_capture_turns_graphs_off_and_the_eager_step_stands(caplog):
    decode = DecodeGraphs("auto", [1, 2, 4], Refusing())
    body = Counter()
    body.value += 3
    with caplog.at_level(logging.WARNING):
        out = decode.run(4, body)
    assert out.tolist() == [3.0] * 3 and decode.bucket(1) is None
    assert [r.getMessage() for r in caplog.records] == [
        "seesaw_ds: capturing the decode step's graph of 4 rows failed (CUDA error: operation not permitted when "
        "stream is capturing); decode steps run eagerly (model.cuda_graphs=false silences this)"]


class SlowReplay(ReplayFake):
    def replay(self, graph, output):
        time.sleep(0.05)
        super().replay(graph, output)


def test_auto_keeps_a_graph_only_where_its_replay_was_faster():
    auto = DecodeGraphs("auto", [1, 2, 4], SlowReplay())
    auto.run(4, Counter())
    assert auto.verdicts == {4: False} and auto.bucket(3) is None and auto.bucket(2) == 2
    forced = DecodeGraphs("true", [1, 2, 4], SlowReplay())
    forced.run(4, Counter())
    assert forced.verdicts == {4: True} and forced.bucket(3) == 4


def _steps(executor, batches) -> list[torch.Tensor]:
    """A prefill of PROMPTS, then one decode step per entry of ``batches`` (the sequences it runs), greedy."""
    from seesaw_ds.model.executor import ForwardPlan, SeqWork

    _, logits = executor.forward(ForwardPlan("prefill", [SeqWork(i, 0, p) for i, p in enumerate(PROMPTS)],
                                             sink="device"))
    tokens = dict(enumerate(logits.argmax(-1).tolist()))
    lengths = {i: len(p) for i, p in enumerate(PROMPTS)}
    out = [logits]
    for seqs in batches:
        work = [SeqWork(i, 0, [tokens[i]], start=lengths[i]) for i in seqs]
        ids, logits = executor.forward(ForwardPlan("decode", work))
        assert ids == list(seqs)
        out.append(logits)
        for i, token in zip(ids, logits.argmax(-1).tolist()):
            tokens[i], lengths[i] = token, lengths[i] + 1
    return out


#: 3 sequences (bucket 4: one padding row), 2 (bucket 2), then sequence 2 alone (bucket 1), then 3 again
BATCHES = [(0, 1, 2)] * 3 + [(0, 2)] * 2 + [(2,)] * 2 + [(0, 1, 2)] * 2


@pytest.mark.parametrize("case", ["llama3", "gemma2"])
def test_graphed_decode_steps_give_eager_logits_and_tokens(family_models, one_torch_thread, case):
    """Llama; Gemma 2 (sliding-window and global layers, soft-caps): float32, within 1e-4, the same tokens."""
    eager = _steps(one_rank_executor(family_models[case], "float32", max_decode_seqs=8), BATCHES)
    fake = ReplayFake()
    graphed_executor = one_rank_executor(family_models[case], "float32", max_decode_seqs=8, cuda_graphs="true",
                                         graph_backend=fake)
    graphed = _steps(graphed_executor, BATCHES)
    assert fake.captures == 3 and fake.replays == 3 + len(BATCHES) - 3  # one capture (and its check) per bucket
    assert graphed_executor.graphs.disabled is None
    for want, got in zip(eager, graphed):
        assert (want - got).abs().max().item() <= 1e-4
        assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_graphs_leave_the_sequences_cache_as_eager_steps_do(family_models, one_torch_thread):
    """The padding rows write the scratch block only: every sequence's cached K/V after graphed steps equal
    the eager steps' (bf16, the model's dtype)."""
    runs = {}
    for name, options in {"eager": {}, "graphed": {"cuda_graphs": "true", "graph_backend": ReplayFake()}}.items():
        executor = one_rank_executor(family_models["llama3"], "bfloat16", max_decode_seqs=8, **options)
        _steps(executor, BATCHES)
        cache = executor.cache()
        lengths = {i: len(prompt) + sum(i in b for b in BATCHES) for i, prompt in enumerate(PROMPTS)}
        runs[name] = [cache.read_sequence(layer, i, lengths[i]) for layer in cache.layers for i in lengths]
    for (want_k, want_v), (got_k, got_v) in zip(runs["eager"], runs["graphed"]):
        assert torch.equal(want_k, got_k) and torch.equal(want_v, got_v)


@pytest.mark.parametrize("case,reason", [("qwen2_moe", "experts"), ("phi3_longrope", "rotary embedding")])
def test_families_graphs_cannot_capture_run_eagerly_and_say_why(family_models, one_torch_thread, case, reason):
    fake = ReplayFake()
    executor = one_rank_executor(family_models[case], "float32", max_decode_seqs=8, cuda_graphs="true",
                                 graph_backend=fake)
    assert reason in executor.stages["decode"].graph_refusal()
    eager = generate(one_rank_executor(family_models[case], "float32", max_decode_seqs=8), steps=2)
    for want, got in zip(eager, generate(executor, steps=2)):
        assert torch.equal(want, got)
    assert fake.captures == 0
