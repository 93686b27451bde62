"""Cost model against hand-computed cases (no torch, no processes)."""
from __future__ import annotations

import numpy as np
import pytest

from seesaw_ds.distributed.layout import Layout, ModelDims
from seesaw_ds.sim.cost import GIB, CostModel, Efficiency, GpuSpec

IDEAL = Efficiency(flops=1.0, hbm=1.0, link=1.0, host=1.0)
# Llama-2-7B's shape: 32 layers, hidden 4096, 32 heads (no GQA), MLP 11008
LLAMA7B = ModelDims(num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, hidden_size=4096,
                    intermediate_size=11008, vocab_size=32000)
CODELLAMA34B = ModelDims(num_layers=48, num_heads=64, num_kv_heads=8, head_dim=128, hidden_size=8192,
                         intermediate_size=22016, vocab_size=32000)
LAYER_7B = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # q, k, v, o + gate, up, down + two norms


def gpu(**changes) -> GpuSpec:
    fields = dict(name="test", memory_bytes=24 * GIB, hbm_bandwidth=600 * GIB, peak_flops=125e12, interconnect="pcie",
                  link_bandwidth=16 * GIB, link_latency=5e-6, host_bandwidth=16 * GIB)
    fields.update(changes)
    return GpuSpec(**fields)


def test_layer_params_of_a_7b_layer_and_its_tp_shards():
    cost = CostModel(gpu(), LLAMA7B, IDEAL)
    assert cost.layer_params(1) == LAYER_7B
    assert cost.layer_params(2) == pytest.approx((LAYER_7B - 2 * 4096) / 2 + 2 * 4096)


def test_decode_of_a_7b_layer_is_its_weight_bytes_over_hbm_bandwidth():
    cost = CostModel(gpu(), LLAMA7B, IDEAL)
    compute, comm = cost.layer_time(Layout(), tokens=1, pairs=1, kv_read=0)
    weights_s = 2 * LAYER_7B / (600 * GIB)  # fp16 weights streamed once
    assert compute == pytest.approx(weights_s, rel=1e-3)
    assert comm == 0.0
    compute_tp2, _ = cost.layer_time(Layout(tp=2), tokens=1, pairs=1, kv_read=0)
    assert compute_tp2 == pytest.approx(weights_s / 2, rel=2e-3)


def test_prefill_of_many_tokens_is_compute_bound_2_flop_per_param_per_token():
    cost = CostModel(gpu(), LLAMA7B, IDEAL)
    tokens = 8192
    linear_s = 2 * LAYER_7B * tokens / 125e12
    qkvo_s = 2 * tokens * 4 * 4096 / (600 * GIB)  # attention with no pairs still reads Q, K, V and writes O
    compute, _ = cost.layer_time(Layout(), tokens=tokens, pairs=0, kv_read=0)
    assert compute == pytest.approx(linear_s + qkvo_s, rel=1e-6)
    causal = tokens * (tokens + 1) // 2
    with_attention, _ = cost.layer_time(Layout(), tokens=tokens, pairs=causal, kv_read=0)
    # QK^T and PV: 2 * 2 FLOP per (query, key) pair per head dim (d, not the paper's printed d^2)
    assert with_attention - linear_s == pytest.approx(4 * 32 * 128 * causal / 125e12, rel=1e-6)


def test_decode_attention_reads_the_kv_cache():
    cost = CostModel(gpu(), CODELLAMA34B, IDEAL)
    context = 100_000
    compute, _ = cost.layer_time(Layout(), tokens=1, pairs=context + 1, kv_read=context)
    weights_s = 2 * cost.layer_params(1) / (600 * GIB)
    kv_s = 2 * 2 * context * 8 * 128 / (600 * GIB)  # K and V, 8 KV heads of 128, fp16
    assert compute == pytest.approx(weights_s + kv_s, rel=1e-3)


def test_ring_allreduce_formula_and_its_use_per_layer():
    cost = CostModel(gpu(), CODELLAMA34B, Efficiency(link=0.5))
    nbytes = 64 * 2 ** 20
    assert cost.allreduce_time(nbytes, 1) == 0.0
    expected = 2 * 3 / 4 * nbytes / (16 * GIB * 0.5) + 2 * 3 * 5e-6
    assert cost.allreduce_time(nbytes, 4) == pytest.approx(expected)
    tokens = 1000
    _, comm = cost.layer_time(Layout(tp=4), tokens=tokens, pairs=0, kv_read=0)
    assert comm == pytest.approx(2 * cost.allreduce_time(tokens * 8192 * 2, 4))  # after o_proj and down_proj


def test_nvlink_makes_tp_communication_cheap():
    pcie = CostModel(gpu(link_latency=0.0), CODELLAMA34B)
    nvlink = CostModel(gpu(interconnect="nvlink", link_bandwidth=600 * GIB, link_latency=0.0), CODELLAMA34B)
    _, comm_pcie = pcie.layer_time(Layout(tp=8), tokens=4096, pairs=0, kv_read=0)
    _, comm_nvlink = nvlink.layer_time(Layout(tp=8), tokens=4096, pairs=0, kv_read=0)
    assert comm_pcie / comm_nvlink == pytest.approx(600 / 16)


def test_kv_bytes_per_token_and_stage_imbalance():
    cost = CostModel(gpu(), CODELLAMA34B)
    assert cost.kv_bytes_per_token() == 192 * 1024  # 48 layers x 8 KV heads x 128 x K,V x fp16
    assert cost.kv_bytes_per_token(Layout(tp=4, pp=2)) == 192 * 1024 / 8
    assert [s[0] for s in CostModel(gpu(), ModelDims(10, 8, 8, 16, 128, 256, 100)).stages(4)] == [3, 3, 2, 2]
    # tp beyond the KV heads replicates them: a 16-way TP rank still holds one whole KV head
    assert cost.kv_heads_per_gpu(16) == 1


def test_memory_feasibility_edges():
    dims = CODELLAMA34B
    cost = CostModel(gpu(), dims, memory_utilization=1.0)
    weights = cost.weight_bytes_per_gpu(Layout(tp=8))
    assert weights == pytest.approx(cost.model_bytes() / 8, rel=0.01)
    plan = cost.memory(Layout(tp=8), workspace_tokens=0)
    per_token = cost.kv_bytes_per_token(Layout(tp=8))
    assert plan.kv_tokens == int((24 * GIB - weights - cost.workspace_bytes(Layout(tp=8), 0)) // per_token)
    # exactly enough memory for the weights, the workspace and 1000 tokens of KV
    exact = weights + cost.workspace_bytes(Layout(tp=8), 0) + 1000 * per_token
    assert CostModel(gpu(memory_bytes=exact), dims, memory_utilization=1.0).memory(
        Layout(tp=8), workspace_tokens=0).kv_tokens == 1000
    # the whole 34B model does not fit one 24 GiB GPU
    assert cost.memory(Layout()).kv_tokens == 0
    # a switching pair keeps the larger shard: dp2 prefill doubles the weights per GPU, shrinking decode's KV
    alone = cost.memory(Layout(tp=8)).kv_tokens
    paired = cost.memory(Layout(tp=8), also=Layout(dp=2, pp=4)).kv_tokens
    assert 0 < paired < alone / 2


def test_pipeline_modes_of_a_step():
    cost = CostModel(gpu(), CODELLAMA34B)
    layout = Layout(pp=4)
    args = dict(seqs=8, tokens=8, pairs=8000, kv_read=7992, samples=8)
    compute, comm = cost.stage_time(layout, 2, 2000, 1998, 2)  # one of 4 micro-batches
    stage = compute + comm
    decode_overlapped, _ = cost.step_time(layout, **args, streaming=False)
    assert decode_overlapped == pytest.approx(4 * stage)  # each micro-batch crosses every stage once per token
    prefill_overlapped, _ = cost.step_time(layout, **args, streaming=True)
    assert prefill_overlapped == pytest.approx(4 * stage)
    synchronous, _ = cost.step_time(layout, **args, streaming=True, pipeline="synchronous")
    assert synchronous == pytest.approx((4 + 3) * stage)  # fill and drain every step
    one_seq, _ = cost.step_time(layout, seqs=1, tokens=3000, pairs=4_501_500, kv_read=0, samples=1, streaming=True)
    assert one_seq == pytest.approx(sum(cost.stage_time(layout, 3000, 4_501_500, 0, 1)))
    assert cost.step_time(layout, seqs=0, tokens=0, pairs=0, kv_read=0, samples=0, streaming=False)[0] == 0.0


def test_reshard_and_swap_go_over_the_host_link():
    cost = CostModel(gpu(), CODELLAMA34B, IDEAL)
    layout = Layout(tp=4, pp=2)
    assert cost.reshard_time(layout) == pytest.approx(cost.weight_bytes_per_gpu(layout) / (16 * GIB))
    assert cost.swap_time(np.array([1000.0]), layout)[0] == pytest.approx(1000 * 192 * 1024 / 8 / (16 * GIB))


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="efficiency.flops"):
        Efficiency(flops=0.0)
    with pytest.raises(ValueError, match="pipeline"):
        CostModel(gpu(), CODELLAMA34B).step_time(Layout(), 1, 1, 1, 0, 1, streaming=True, pipeline="async")
