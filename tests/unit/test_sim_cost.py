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


# -- the engine's measured compute profile (seesaw_ds/sim/profile.py fits it) -------------------------------
from seesaw_ds.sim.cost import ComputeProfile  # noqa: E402
from seesaw_ds.sim.profile import child_environment, fit_profile, nonnegative_lstsq  # noqa: E402

SMOL = ModelDims(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536,
                 vocab_size=49152)
PROFILE = dict(prefill_layer_s=1e-3, prefill_token_s=2e-5, prefill_pair_s=1e-8, prefill_seq_s=3e-4,
               decode_layer_s=2e-3, decode_seq_s=5e-5, decode_kv_token_s=1e-7, head_s=7e-3, head_seq_s=4e-4,
               step_s=5e-4, step_token_s=1e-6, step_seq_s=2e-5)


def test_profile_prices_a_layer_by_its_phase_and_tp_shares_only_the_per_unit_work():
    profile = ComputeProfile(**PROFILE)
    prefill = profile.layer_time(True, tokens=300, pairs=20_000, kv_read=0, seqs=2)
    assert prefill == pytest.approx(1e-3 + 300 * 2e-5 + 20_000 * 1e-8 + 2 * 3e-4)
    decode = profile.layer_time(False, tokens=64, pairs=64 * 400, kv_read=64 * 399, seqs=64)
    assert decode == pytest.approx(2e-3 + 64 * 5e-5 + 64 * 399 * 1e-7)
    assert profile.layer_time(False, 64, 0, 64 * 399, 64, tp=2) == pytest.approx(2e-3 + (decode - 2e-3) / 2)
    mixed = profile.layer_time(np.array([True, False]), np.array([300, 64]), np.array([20_000, 0]),
                               np.array([0, 64 * 399]), np.array([2, 64]))
    assert mixed == pytest.approx([float(prefill), float(decode)])
    assert ComputeProfile.from_json({**profile.to_json(), "unknown": 1}) == profile
    with pytest.raises(ValueError, match="head_s=-1"):
        ComputeProfile(**{**PROFILE, "head_s": -1.0})


def test_with_a_profile_a_step_is_layers_plus_rest_on_every_stage_and_the_head_on_the_last():
    profile = ComputeProfile(**PROFILE)
    cost = CostModel(gpu(), SMOL, IDEAL, profile=profile)
    compute, _ = cost.stage_time(Layout(), tokens=64, pairs=64 * 200, kv_read=64 * 199, samples=64, prefill=False)
    layer = profile.layer_time(False, 64, 64 * 200, 64 * 199, 64)
    assert compute == pytest.approx(30 * layer + profile.rest_time(64, 64) + profile.head_time(64))
    # pp2: 15 layers per stage; the slowest is the last (it also runs the head)
    compute_pp, _ = cost.stage_time(Layout(pp=2), tokens=64, pairs=64 * 200, kv_read=64 * 199, samples=64,
                                    prefill=False)
    assert compute_pp == pytest.approx(15 * layer + profile.rest_time(64, 64) + profile.head_time(64))
    # without the phase, a micro-batch whose tokens attend to cached keys counts as decode
    assert cost.layer_time(Layout(), 64, 64 * 200, 64 * 199)[0] == pytest.approx(layer)


def test_engine_prefill_micro_batches_multiply_the_fixed_costs_of_a_pipelined_step():
    profile = ComputeProfile(**PROFILE)
    one = CostModel(gpu(), SMOL, IDEAL, profile=profile)
    eight = CostModel(gpu(), SMOL, IDEAL, profile=profile, prefill_micro_batches=8)
    work = dict(seqs=32, tokens=32 * 300, pairs=32 * 300 * 301 // 2, kv_read=0, samples=32)
    total_one, _ = one.step_time(Layout(pp=2), **work, streaming=True, pipeline="synchronous")
    total_eight, _ = eight.step_time(Layout(pp=2), **work, streaming=True, pipeline="synchronous")
    per = {k: v / 16 for k, v in work.items() if k != "seqs"}
    stage, comm = eight.stage_time(Layout(pp=2), **per, prefill=True)
    assert total_eight == pytest.approx(17 * (stage + comm))  # 16 micro-batches through 2 stages
    assert total_eight != pytest.approx(total_one)
    # decode keeps pp micro-batches; one rank ignores the setting
    decode = dict(seqs=32, tokens=32, pairs=32 * 300, kv_read=32 * 299, samples=32)
    assert eight.step_time(Layout(pp=2), **decode, streaming=False, pipeline="synchronous")[0] == pytest.approx(
        one.step_time(Layout(pp=2), **decode, streaming=False, pipeline="synchronous")[0])
    assert eight.step_time(Layout(), **work, streaming=True)[0] == pytest.approx(
        one.step_time(Layout(), **work, streaming=True)[0])
    with pytest.raises(ValueError, match="prefill_micro_batches=0"):
        CostModel(gpu(), SMOL, IDEAL, prefill_micro_batches=0)


def synthetic_samples(truth: ComputeProfile, layers: int = 2) -> list[dict]:
    """Timed steps as the engine would give them if its costs were exactly ``truth``."""
    out = []
    for phase, seqs, length in [("prefill", 1, 32), ("prefill", 1, 512), ("prefill", 4, 64), ("prefill", 8, 256),
                                ("prefill", 16, 96), ("decode", 1, 64), ("decode", 32, 128), ("decode", 64, 512),
                                ("decode", 128, 256)]:
        tokens = seqs * (length if phase == "prefill" else 1)
        pairs = seqs * length * (length + 1) // 2 if phase == "prefill" else seqs * (length + 1)
        kv_read = 0 if phase == "prefill" else seqs * length
        layer = float(truth.layer_time(phase == "prefill", tokens, pairs, kv_read, seqs))
        out.append({"phase": phase, "seqs": seqs, "tokens": tokens, "pairs": pairs, "kv_read": kv_read,
                    "layers_s": layers * layer, "head_s": float(truth.head_time(seqs)) - 1e-4,
                    "sample_s": 1e-4, "rest_s": float(truth.rest_time(tokens, seqs))})
    return out


def test_fit_recovers_the_coefficients_of_exact_timings():
    truth = ComputeProfile(**PROFILE)
    fitted = fit_profile(synthetic_samples(truth), threads=1, dtype="bfloat16")
    for name, value in PROFILE.items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_fit_keeps_every_coefficient_nonnegative_and_needs_enough_points():
    # y = 2 + 3x exactly, plus a feature that would take a negative weight
    x = np.arange(1.0, 7.0)
    features = np.stack([np.ones_like(x), x, np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])], axis=1)
    target = 2 + 3 * x - 0.01 * features[:, 2]
    coef = nonnegative_lstsq(features, target)
    assert (coef >= 0).all() and coef[2] == 0.0 and coef[1] == pytest.approx(3.0, rel=0.01)
    with pytest.raises(ValueError, match=">= 4 prefill"):
        fit_profile(synthetic_samples(ComputeProfile(**PROFILE))[3:], threads=1, dtype="bfloat16")


def test_profile_child_is_no_mpi_rank():
    env = child_environment({"PMI_RANK": "0", "PMI_FD": "5", "OMPI_COMM_WORLD_RANK": "1", "HYDRA_CONTROL_FD": "7",
                             "PATH": "/bin", "SLURM_JOB_ID": "3", "OMP_NUM_THREADS": "8"}, threads=1)
    assert env == {"PATH": "/bin", "SLURM_JOB_ID": "3", "OMP_NUM_THREADS": "1"}
