"""CUDA graphs of the decode step (seesaw_ds/model/graphs.py, issue 23 item 2), on the CPU: the buckets, when
graphs apply, the capture bookkeeping (captured once per bucket, replayed, captured again when what they read
moves, dropped after a replay that does not reproduce its warm-up, kept under ``auto`` only where faster),
and whole decode steps through :class:`ReplayFake`, which runs the captured step again at every replay: a size
or tensor taken at capture time instead of from the step buffers would show as other logits than eager's."""
from __future__ import annotations

import logging
import math
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


class Peers:
    """``agree`` as a tensor-parallel group would answer: this rank's flags OR-ed with the other rank's, one
    list of them per call (``None``: all False)."""

    def __init__(self, *others):
        self.others = list(others)
        self.calls = []

    def __call__(self, flags):
        self.calls.append(list(flags))
        other = self.others.pop(0) if self.others else None
        return [mine or (other is not None and theirs) for mine, theirs in zip(flags, other or flags)]


def test_a_capture_that_failed_on_another_rank_turns_graphs_off_here_without_a_replay(caplog):
    fake = ReplayFake()
    decode = DecodeGraphs("true", [1, 2, 4], fake)
    with caplog.at_level(logging.WARNING):
        out = decode.run(2, Counter(), agree=Peers([True]))
    assert out.tolist() == [0.0] * 3 and decode.disabled and fake.replays == 0  # no collective left unpaired
    assert "failed (on another rank of its tensor-parallel group)" in caplog.records[0].getMessage()


def test_a_replay_that_differed_on_another_rank_turns_graphs_off_here(caplog):
    decode = DecodeGraphs("true", [1, 2, 4], ReplayFake())
    with caplog.at_level(logging.WARNING):
        decode.run(2, Counter(), agree=Peers(None, [True, False]))
    assert decode.disabled and "did not reproduce its eager step (on another rank" in caplog.records[0].getMessage()


@pytest.mark.parametrize("mode,kept", [("auto", False), ("true", True)])
def test_a_replay_slower_on_another_rank_counts_for_both_under_auto(mode, kept):
    decode = DecodeGraphs(mode, [1, 2, 4], ReplayFake())
    peers = Peers(None, [False, True])
    decode.run(4, Counter(), agree=peers)
    assert decode.verdicts == {4: kept} and decode.disabled is None
    assert [len(flags) for flags in peers.calls] == [1, 2]  # capture failed?, then differed? and slower?


class FreshGraphs(ReplayFake):
    """Each capture returns a graph object of its own, so a test can see when the last reference goes."""

    class Graph:
        def __init__(self, body):
            self.body = body

        def __call__(self):
            return self.body()

    def capture(self, body):
        graph, output = super().capture(body)
        return FreshGraphs.Graph(graph), output


def test_a_graph_measured_slower_lives_until_its_pool_is_dropped():
    """torch refuses a capture into a pool whose graphs were all freed while some of its blocks stayed: every
    graph of the current pool is kept until the pool goes."""
    import gc
    import weakref

    decode = DecodeGraphs("auto", [1, 2, 4], FreshGraphs())
    captured = []
    backend_capture = decode.graphs.capture

    def capture(body):
        graph, output = backend_capture(body)
        captured.append(weakref.ref(graph))
        return graph, output
    decode.graphs.capture = capture
    decode.run(4, Counter(), agree=Peers(None, [False, True]))  # slower on the other rank: not replayed here
    gc.collect()
    assert decode.verdicts == {4: False} and captured[0]() is not None
    decode.drop()
    gc.collect()
    assert captured[0]() is None


def test_a_rows_difference_is_judged_on_its_own_scale():
    reference = torch.tensor([[1000.0, 0.5, 0.0], [0.5, 0.25, 0.5]])
    off = reference.clone()
    off[1, 1] += 0.5                                         # half the scale of row 1: far off, small beside row 0
    assert graphs.row_difference(reference, reference) == 0.0
    assert graphs.row_difference(off, reference) == pytest.approx(0.5)
    assert math.isnan(graphs.row_difference(off * float("nan"), reference))  # which `not <= 1e-2` refuses


def test_a_capture_that_fails_puts_the_stream_and_the_allocator_back(monkeypatch):
    """``torch.cuda.graph`` ends the capture before it restores the stream; an invalidated capture raises there.
    CudaGraphs.capture puts the step's stream back, stops routing allocations to the pool, and lets the error
    go on, its first line the cause's (the CUDA calls are stood in for: there is no GPU here)."""
    calls = []

    class Capture:
        def __init__(self, graph, pool, capture_error_mode):
            calls.append(("capture", pool, capture_error_mode))

        def __enter__(self):
            calls.append("stream switched")

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 7))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "the step's stream")
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: calls.append(("set_stream", stream)))
    monkeypatch.setattr(torch.cuda.memory, "_cuda_endAllocateToPool",
                        lambda device, pool: calls.append(("end pool", device, pool)), raising=False)

    def body():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    backend = graphs.CudaGraphs(torch.device("cuda", 0))
    with pytest.raises(RuntimeError) as raised:
        backend.capture(body)
    assert calls == [("capture", (0, 7), "thread_local"), "stream switched", ("set_stream", "the step's stream"),
                     ("end pool", 0, (0, 7))]
    assert backend._pool is None
    assert graphs._first_line(raised.value) == "CUDA error: operation not permitted when stream is capturing"


def test_gemmas_embedding_scale_is_a_number_not_a_host_tensor(family_models, one_torch_thread):
    """A 0-d host tensor would be copied to the device at every step: a blocking copy no graph can capture."""
    executor = one_rank_executor(family_models["gemma2"], "bfloat16", max_decode_seqs=8)
    scale = executor.stages["decode"].embed.scale
    hidden = executor.stages["decode"].embed.weight.shape[1]
    assert type(scale) is float and scale == float(torch.tensor(hidden ** 0.5).to(torch.bfloat16))


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
    # one capture per bucket, each replayed twice (checked, then timed), then a replay per later step
    assert fake.captures == 3 and fake.replays == 2 * 3 + len(BATCHES) - 3
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
