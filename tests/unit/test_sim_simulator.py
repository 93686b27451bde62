"""Simulator: drives the engine's own Scheduler, conserves requests and tokens, times steps sensibly."""
from __future__ import annotations

import numpy as np
import pytest

from seesaw_ds.config import SchedulerConfig
from seesaw_ds.distributed.layout import Layout, ModelDims
from seesaw_ds.engine import scheduler as scheduler_module
from seesaw_ds.sim.chunked import time_chunked, trace_chunked, trace_chunked_engine
from seesaw_ds.sim.cost import GIB, CostModel, GpuSpec
from seesaw_ds.sim.simulator import (ConservationError, _check_conservation, simulate_seesaw, time_trace,
                                     trace_seesaw)
from seesaw_ds.sim.workload import Workload, arxiv, constant, from_jsonl, sharegpt

DIMS = ModelDims(num_layers=48, num_heads=64, num_kv_heads=8, head_dim=128, hidden_size=8192,
                 intermediate_size=22016, vocab_size=32000)
A10 = GpuSpec(name="a10", memory_bytes=24 * GIB, hbm_bandwidth=600 * GIB, peak_flops=125e12, interconnect="pcie",
              link_bandwidth=16 * GIB, link_latency=5e-6, host_bandwidth=16 * GIB)


def small(n: int = 60, seed: int = 1) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload("small", rng.integers(20, 400, n), rng.integers(1, 120, n))


@pytest.mark.parametrize("dp_p,dp_d,staging,device", [(1, 1, 3000, 2000), (2, 1, 5000, 1200), (1, 2, 2500, 800),
                                                       (2, 2, 100_000, 50_000)])
def test_every_request_finishes_and_tokens_add_up(dp_p, dp_d, staging, device):
    w = small()
    trace = trace_seesaw(w, SchedulerConfig(max_prefill_tokens=600, max_decode_seqs=16), staging_tokens=staging,
                         device_tokens=device, block_size=16, num_prefill_replicas=dp_p, num_decode_replicas=dp_d)
    assert trace.stats["finished_seqs"] == w.num_requests
    prefill, decode = trace.prefill, ~trace.prefill
    assert trace.work["tokens"][prefill].sum() == w.prompt_tokens          # every prompt prefilled once
    assert trace.work["samples"].sum() == w.output_tokens                   # every output token produced once
    assert trace.work["tokens"][decode].sum() == w.output_tokens - w.num_requests
    assert not trace.work["tokens"][prefill][:, dp_p:].any()                # prefill only on prefill replicas
    assert trace.num_steps == trace.stats["prefill_steps"] + trace.stats["decode_steps"]


def test_the_simulator_calls_the_engines_scheduler(monkeypatch):
    calls = {"schedule": 0, "complete": 0}
    original_schedule, original_complete = scheduler_module.Scheduler.schedule, scheduler_module.Scheduler.complete

    def schedule(self):
        calls["schedule"] += 1
        return original_schedule(self)

    def complete(self, plan, finished):
        calls["complete"] += 1
        return original_complete(self, plan, finished)

    monkeypatch.setattr(scheduler_module.Scheduler, "schedule", schedule)
    monkeypatch.setattr(scheduler_module.Scheduler, "complete", complete)
    trace = trace_seesaw(small(20), SchedulerConfig(), staging_tokens=4000, device_tokens=2000)
    assert calls["complete"] == trace.num_steps and calls["schedule"] == trace.num_steps + 1


def test_conservation_check_catches_a_lost_token():
    w = constant(3, 10, 5)
    stats = dict(finished_seqs=3, prefilled_seqs=3, decoded_tokens=12)
    _check_conservation(w, np.array([5, 5, 5]), stats, 0)
    with pytest.raises(ConservationError, match="request 1 produced 4"):
        _check_conservation(w, np.array([5, 4, 5]), dict(stats, decoded_tokens=11), 0)


def test_static_layout_pays_no_transition_and_switching_pays_reshards():
    w = small(80)
    cost = CostModel(A10, DIMS)
    kwargs = dict(config=SchedulerConfig(max_prefill_tokens=800), staging_tokens=4000, device_tokens=3000)
    static = simulate_seesaw(w, cost, Layout(tp=8), Layout(tp=8), **kwargs)
    seesaw = simulate_seesaw(w, cost, Layout(pp=8), Layout(tp=8), **kwargs)
    assert static.num_transitions == seesaw.num_transitions > 1  # same trace: same phases
    assert static.transition_s == 0.0
    to_decode = (seesaw.num_transitions + 1) // 2
    to_prefill = seesaw.num_transitions - to_decode
    assert seesaw.transition_s == pytest.approx(to_decode * cost.reshard_time(Layout(tp=8))
                                                + to_prefill * cost.reshard_time(Layout(pp=8)))
    assert seesaw.elapsed_s == pytest.approx(sum(seesaw.phase_s.values()))
    # prefill over PCIe: pipeline beats 8-way TP; decode is identical
    assert seesaw.phase_s["prefill"] < static.phase_s["prefill"]
    assert seesaw.phase_s["decode"] == pytest.approx(static.phase_s["decode"])


def test_replication_scales_work_not_steps():
    w = small(80)
    config = SchedulerConfig(max_prefill_tokens=800, max_decode_seqs=8)
    cost = CostModel(A10, DIMS)
    one = trace_seesaw(w, config, staging_tokens=4000, device_tokens=3000)
    doubled = trace_seesaw(w, config, staging_tokens=4000, device_tokens=3000, replication=2)
    assert doubled.num_requests == 2 * one.num_requests and doubled.output_tokens == 2 * one.output_tokens
    t1 = time_trace(one, cost, Layout(pp=8), Layout(tp=8))
    t2 = time_trace(doubled, cost, Layout(pp=8), Layout(tp=8))
    assert t1.elapsed_s < t2.elapsed_s < 2 * t1.elapsed_s  # decode steps are weight-bound: more work, same reads


def test_lockstep_replicas_wait_for_the_slowest():
    w = small(80)
    trace = trace_seesaw(w, SchedulerConfig(max_prefill_tokens=800), staging_tokens=6000, device_tokens=3000,
                         num_prefill_replicas=2, num_decode_replicas=2)
    cost = CostModel(A10, DIMS)
    free = time_trace(trace, cost, Layout(dp=2, pp=4), Layout(dp=2, tp=4))
    lockstep = time_trace(trace, cost, Layout(dp=2, pp=4), Layout(dp=2, tp=4), dp_lockstep=True)
    assert lockstep.elapsed_s >= free.elapsed_s


def test_chunked_prefill_engine_conserves_tokens_even_when_preempting():
    w = small(60)
    tight = trace_chunked_engine(w, kv_tokens=700, chunk_tokens=64, max_seqs=16)
    assert tight.preemptions > 0  # the small KV cache forces recomputation
    roomy = trace_chunked_engine(w, kv_tokens=100_000, chunk_tokens=512, max_seqs=64)
    for trace in (tight, roomy):
        assert trace.work["samples"].sum() == w.output_tokens
        assert trace.prefill_tokens - trace.recomputed_tokens <= w.prompt_tokens + w.output_tokens
    assert roomy.preemptions == 0 and roomy.prefill_tokens == w.prompt_tokens
    assert roomy.work["tokens"].sum() == w.prompt_tokens + w.output_tokens - w.num_requests
    assert roomy.work["tokens"].max() <= 512


def test_chunked_prefill_layouts_split_requests_and_price_pipelines():
    w = small(64)
    cost = CostModel(A10, DIMS)
    plan = trace_chunked(w, Layout(dp=2, tp=2, pp=2), kv_tokens=20_000, chunk_tokens=512, max_seqs=32)
    assert len(plan.replicas) == 2 and all(len(engines) == 2 for engines in plan.replicas)
    assert sum(e.work["samples"].sum() for engines in plan.replicas for e in engines) == w.output_tokens
    result = time_chunked(plan, cost)
    assert result.elapsed_s > 0 and result.num_transitions == 0
    with pytest.raises(ValueError, match="chunk_tokens"):
        trace_chunked_engine(w, kv_tokens=20_000, chunk_tokens=16, max_seqs=32)


def test_synthetic_workloads_follow_the_papers_filters():
    chat = sharegpt(500, seed=3)
    assert chat.prompt_lens.min() >= 100 and chat.output_lens.min() >= 20 and chat.max_len <= 4096
    assert 0.5 < chat.prompt_lens.mean() / chat.output_lens.mean() < 3  # comparable lengths
    papers = arxiv(200, seed=3)
    assert papers.max_len <= 4096 and papers.prompt_lens.mean() > 1500 and 150 < papers.output_lens.mean() < 350
    assert np.array_equal(sharegpt(50, seed=3).prompt_lens, sharegpt(50, seed=3).prompt_lens)  # seeded


def test_jsonl_workload(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt_tokens": 120, "max_tokens": 30}\n\n{"prompt_token_ids": [1, 2, 3], "max_tokens": 4}\n'
                    '{"custom_id": "x", "body": {"prompt_tokens": 7, "max_tokens": 2}}\n')
    w = from_jsonl(path)
    assert w.prompt_lens.tolist() == [120, 3, 7] and w.output_lens.tolist() == [30, 4, 2]
    path.write_text('{"prompt": "hello", "max_tokens": 3}\n')
    with pytest.raises(ValueError, match="prompt_tokens"):
        from_jsonl(path)
