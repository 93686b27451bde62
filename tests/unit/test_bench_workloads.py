"""The benchmark's workload generators, flag translation and report arithmetic (pure: no engine, no torch)."""
from __future__ import annotations

import json
import math

import pytest

from seesaw_ds.bench import cli, workloads
from seesaw_ds.bench.profile import _bucket, markdown, summarize
from seesaw_ds.bench.report import (ModelShape, Target, fraction_of_roofline, markdown_table, ratio_matrix,
                                    roofline_seconds, throughput, throughput_line, workload_flops)

RANGE = (7, 1024)


def test_random_workload_is_seeded_and_within_ranges():
    make = lambda seed: workloads.random_workload(128, input_len=(20, 500), output_len=(128, 128), token_range=RANGE,
                                                  max_model_len=2048, seed=seed)
    first, again, other = make(0), make(0), make(1)
    assert first.prompts == again.prompts and first.output_lens == again.output_lens
    assert first.prompts != other.prompts
    assert first.num_requests == 128
    assert all(20 <= len(p) <= 500 for p in first.prompts)
    assert first.output_lens == [128] * 128
    assert all(RANGE[0] <= t < RANGE[1] for p in first.prompts for t in p)
    lengths = first.prompt_lens
    assert max(lengths) - min(lengths) > 300, "lengths spread over the range"
    assert first.num_prompt_tokens == sum(lengths) and first.num_output_tokens == 128 * 128


def test_random_workload_rejects_bad_ranges():
    with pytest.raises(ValueError, match="exceed the model"):
        workloads.random_workload(4, input_len=(20, 2000), output_len=(128, 128), token_range=RANGE,
                                  max_model_len=2048)
    with pytest.raises(ValueError, match="input_len"):
        workloads.random_workload(4, input_len=(50, 20), output_len=(1, 1), token_range=RANGE, max_model_len=2048)
    with pytest.raises(ValueError, match="num_prompts"):
        workloads.random_workload(0, input_len=(1, 2), output_len=(1, 1), token_range=RANGE, max_model_len=2048)


@pytest.mark.parametrize("kind", ["sharegpt_like", "arxiv_like"])
def test_distribution_presets_fit_the_model_and_are_seeded(kind):
    make = lambda seed: workloads.make_workload(kind, num_prompts=200, seed=seed, token_range=RANGE,
                                                max_model_len=2048)
    first = make(3)
    assert first.prompts == make(3).prompts and first.output_lens == make(3).output_lens
    assert first.name == kind
    assert all(p + o <= 2048 for p, o in zip(first.prompt_lens, first.output_lens))
    assert len(set(first.prompt_lens)) > 50, "lengths vary"


def test_presets_have_their_shape():
    sharegpt = workloads.make_workload("sharegpt_like", num_prompts=400, seed=0, token_range=RANGE,
                                       max_model_len=4096)
    arxiv = workloads.make_workload("arxiv_like", num_prompts=400, seed=0, token_range=RANGE, max_model_len=4096)
    median = lambda values: sorted(values)[len(values) // 2]
    assert 120 <= median(sharegpt.prompt_lens) <= 260
    assert 140 <= median(sharegpt.output_lens) <= 260
    assert 900 <= median(arxiv.prompt_lens) <= 1500, "summarisation: long prompts"
    assert median(arxiv.output_lens) < median(arxiv.prompt_lens) / 4, "and short outputs"


def test_length_distribution_clips_and_constant():
    import random

    rng = random.Random(0)
    dist = workloads.LengthDistribution(100, 3.0, 10, 200)
    draws = [dist.draw(rng) for _ in range(500)]
    assert min(draws) == 10 and max(draws) == 200
    assert workloads.LengthDistribution(64, 0.0, 1, 100).draw(rng) == 64


def test_jsonl_workload(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join([json.dumps({"prompt_token_ids": [5, 6, 7], "max_tokens": 4}),
                               json.dumps({"prompt": "hi there", "output_len": 2}),
                               "", json.dumps({"prompt_token_ids": [9]})]) + "\n")
    tokenize = lambda text: [len(word) for word in text.split()]
    workload = workloads.make_workload("jsonl", num_prompts=10, seed=0, token_range=RANGE, max_model_len=64,
                                       output_len=(1, 16), path=str(path), tokenize=tokenize)
    assert workload.prompts == [[5, 6, 7], [2, 5], [9]]
    assert workload.output_lens == [4, 2, 16]
    first_two = workloads.jsonl_workload(path, num_prompts=2, default_output_len=8, max_model_len=64,
                                         tokenize=tokenize)
    assert first_two.num_requests == 2
    with pytest.raises(ValueError, match="positions"):
        workloads.jsonl_workload(path, num_prompts=None, default_output_len=100, max_model_len=16,
                                 tokenize=tokenize)
    with pytest.raises(ValueError, match="does not exist"):
        workloads.make_workload("jsonl", num_prompts=1, seed=0, token_range=RANGE, max_model_len=64,
                                path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="workload.path"):
        workloads.make_workload("jsonl", num_prompts=1, seed=0, token_range=RANGE, max_model_len=64)
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.make_workload("nope", num_prompts=1, seed=0, token_range=RANGE, max_model_len=64)


def test_workload_request_lines_and_round_trip(tmp_path):
    workload = workloads.Workload("t", [[8, 9], [10]], [3, 1])
    lines = list(workload.request_lines())
    assert lines[0] == {"custom_id": "bench-0", "prompt_token_ids": [8, 9], "max_tokens": 3, "temperature": 0.0,
                        "ignore_eos": True}
    path = workload.write_jsonl(tmp_path / "in.jsonl")
    assert [json.loads(line)["custom_id"] for line in path.read_text().splitlines()] == ["bench-0", "bench-1"]
    back = workloads.Workload.from_json(json.loads(json.dumps(workload.to_json())))
    assert back == workload
    with pytest.raises(ValueError):
        workloads.Workload("bad", [[1]], [0])


def test_token_id_range_avoids_special_tokens():
    assert workloads.token_id_range(1024, [0, 1, 2, 3, 4, 5, 6]) == (7, 1024)
    assert workloads.token_id_range(1000, [998, 999]) == (0, 998)
    assert workloads.token_id_range(100, [50]) == (0, 50)
    assert workloads.token_id_range(100, []) == (0, 100)
    with pytest.raises(ValueError):
        workloads.token_id_range(2, [0, 1])


def test_vllm_style_flags_become_overrides():
    argv = ["--peers", "seesaw,vllm", "--num-prompts=16", "--input-len", "64", "--output-len", "8",
            "--dataset-name", "sharegpt_like", "x.y=1", "--output-json", "o.json"]
    assert cli.translate(argv) == ["workload=sharegpt_like", "bench.peers=[seesaw,vllm]", "bench.num_prompts=16",
                                   "workload.input_len_min=64", "workload.input_len_max=64",
                                   "workload.output_len_min=8", "workload.output_len_max=8", "x.y=1",
                                   "bench.output_json=o.json"]
    assert cli.translate(["--dataset-path", "p.jsonl"]) == ["workload=jsonl", "workload.path=p.jsonl"]
    with pytest.raises(ValueError, match="needs a value"):
        cli.translate(["--seed"])


BENCH_SHAPE = ModelShape(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4, head_dim=64,
                         intermediate_size=1376, vocab_size=1024)


def test_model_shape_counts_the_benchmark_model():
    config = {"num_hidden_layers": 8, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 1376, "vocab_size": 1024}
    shape = ModelShape.from_hf_config(config)
    assert shape == BENCH_SHAPE
    assert shape.layer_params == 2_899_968  # counted by hand: q, o 262,144 each; k, v 131,072 each; MLP 2,113,536
    # The whole model (the built checkpoint's manifest says 24,257,024) = layers + head + embedding + norms.
    norms = (2 * 8 + 1) * 512
    assert shape.layer_params * 8 + 2 * shape.head_params + norms == 24_257_024


def test_workload_flops_by_hand():
    shape = ModelShape(num_layers=2, hidden_size=4, num_heads=2, num_kv_heads=1, head_dim=2, intermediate_size=8,
                       vocab_size=10)
    flops = workload_flops(shape, [3], [2])
    # Counted by hand: a layer holds 144 weights (q, o 16 each; k, v 8 each; MLP 96) and the head 40; 4 tokens
    # pass 2 layers (3 prompt + 1 fed-back output) and 2 rows the head: 2 x (144 x 2 x 4 + 40 x 2) = 2,464.
    # Attention: 10 causal (query, key) pairs (1+2+3+4), 2 layers, 2 heads of 2 dims, 4 FLOPs each: 320.
    assert flops == {"linear": 2_464.0, "attention": 320.0, "total": 2_784.0}
    # one more output token: one more row through the layers and the head (656) and 5 more pairs (160)
    assert workload_flops(shape, [3], [3])["total"] == 3_600.0
    with pytest.raises(ValueError):
        workload_flops(shape, [1, 2], [1])


def test_standard_workload_roofline_magnitude():
    workload = workloads.random_workload(128, input_len=(20, 500), output_len=(128, 128), token_range=RANGE,
                                         max_model_len=2048, seed=0)
    flops = workload_flops(BENCH_SHAPE, workload.prompt_lens, workload.output_lens)
    tokens = workload.num_prompt_tokens + workload.num_output_tokens
    assert 2 * 23.7e6 * tokens * 0.95 < flops["linear"] < 2 * 23.7e6 * tokens * 1.05
    assert 0.01 < flops["attention"] / flops["total"] < 0.2
    seconds = roofline_seconds(flops["total"], 168.0)
    assert 10 < seconds < 20, "~2.4 TFLOP at 2 x 84 GFLOP/s"


def test_throughput_keys_and_line():
    metrics = throughput(10.0, 128, 33000, 16384)
    assert metrics == {"elapsed_time": 10.0, "num_requests": 128, "total_num_tokens": 49384,
                       "requests_per_second": 12.8, "tokens_per_second": 4938.4, "output_tokens_per_second": 1638.4}
    assert throughput_line(metrics) == ("Throughput: 12.80 requests/s, 4938.40 total tokens/s, "
                                        "1638.40 output tokens/s")
    with pytest.raises(ValueError):
        throughput(0.0, 1, 1, 1)


def test_roofline_fraction_and_ratios():
    assert fraction_of_roofline(20.0, 10.0) == 0.5
    with pytest.raises(ValueError):
        roofline_seconds(1.0, 0.0)
    ratios = ratio_matrix({"a": 300.0, "b": 100.0, "dead": None})
    assert ratios["a"]["b"] == 3.0 and ratios["b"]["a"] == pytest.approx(1 / 3) and ratios["a"]["a"] == 1.0
    assert "dead" not in ratios


def test_targets_met_missed_and_unknown():
    rates = {"seesaw": 300.0, "vllm": 250.0, "transformers": 100.0}
    fractions = {"seesaw": 0.4}
    met = Target("seesaw", "transformers", 2.0).evaluate(rates, fractions)
    assert met["met"] and met["measured"] == 3.0 and met["margin"] == pytest.approx(0.5)
    missed = Target("seesaw", "vllm", 1.5).evaluate(rates, fractions)
    assert missed["met"] is False and missed["margin"] == pytest.approx(1.2 / 1.5 - 1)
    roof = Target("seesaw", "roofline", 0.5).evaluate(rates, fractions)
    assert roof["met"] is False and roof["measured"] == 0.4
    assert Target("seesaw", "absent", 1.0).evaluate(rates, fractions)["met"] is None


def test_parse_target():
    from seesaw_ds.bench.runner import parse_target

    assert parse_target("seesaw>=1.5*vllm") == Target("seesaw", "vllm", 1.5)
    assert parse_target(" tp2 >= 0.5 * roofline ") == Target("tp2", "roofline", 0.5)
    with pytest.raises(ValueError, match="peer>=factor"):
        parse_target("seesaw > vllm")


def test_markdown_table():
    table = markdown_table([{"peer": "a", "x": 1.234, "n": None}], [("peer", "peer", ""), ("x", "X", ".1f"),
                                                                    ("n", "N", "d")])
    assert table.splitlines() == ["| peer | X | N |", "|---|---:|---:|", "| a | 1.2 | – |"]


def test_profile_buckets_and_summary(tmp_path):
    assert _bucket(["run_job (e.py:1)", "LinearAllreduce.forward (l.py:2)", "inference_all_reduce (c.py:3)"]) == \
        "tp all-reduce"
    assert _bucket(["run_job (e.py:1)", "_decode (a.py:2)", "DeviceKVCache.gather (d.py:3)"]) == \
        "kv gather (decode)"
    assert _bucket(["run_job (e.py:1)", "LinearLayer.forward (l.py:2)"]) == "linear matmuls"
    assert _bucket(["run_job (e.py:1)"]) == "step control (bcast/gather, leader)"
    raw = tmp_path / "p.raw"
    raw.write_text('process 1:"mpiexec";process 7:"python run.py";main (r.py:1);run_job (e.py:2);'
                   'LinearLayer.forward (l.py:3) 100\n'
                   'process 1:"mpiexec";process 7:"python run.py";main (r.py:1);import (x.py:1) 50\n'
                   'process 1:"mpiexec";process 8:"python run.py";run_job (e.py:2) 25\n')
    summary = summarize(raw, rate=50)
    assert summary["7"]["seconds"] == 2.0 and summary["7"]["buckets"] == {"linear matmuls": 2.0}
    assert summary["8"]["buckets"] == {"step control (bcast/gather, leader)": 0.5}
    assert "linear matmuls" in markdown(summary) and not math.isnan(summary["8"]["seconds"])


def test_cores_gflops_is_the_better_of_threads_and_ranks():
    from seesaw_ds.bench.runner import cores_gflops, merge_measures

    assert cores_gflops({"1": 80.0, "2": 150.0}) == {"1": 80.0, "2": 160.0}
    assert cores_gflops({"1": 30.0, "2": 70.0}) == {"1": 30.0, "2": 70.0}
    merged = merge_measures({"matmul_gflops": {"1": 10.0, "2": 15.0}, "memcpy_gbps": 5.0},
                            {"matmul_gflops": {"1": 12.0, "2": 14.0}, "memcpy_gbps": 4.0})
    assert merged["matmul_gflops_best"] == {"1": 12.0, "2": 15.0}
    assert merged["matmul_gflops_cores"] == {"1": 12.0, "2": 24.0}
    assert merged["memcpy_gbps_best"] == 5.0


def test_chat_workload_is_real_text_in_the_template_at_drawn_lengths():
    """Prompts of the chat preset: the template around an instruction and corpus text, each templated prompt
    within [min, max] tokens (a word of slack above the drawn target), the same ids for the same seed."""
    from seesaw_ds.bench.workloads import CHAT_INSTRUCTIONS, chat_workload

    corpus = "The river ran quietly. Clara baked bread before dawn. People talked about the weather. " * 3
    template = lambda messages: [ord(c) for c in f"<user>{messages[0]['content']}</user><assistant>"]
    make = lambda seed: chat_workload(40, input_len=(60, 300), output_len=(128, 128), apply_chat_template=template,
                                      corpus=corpus, max_model_len=2048, seed=seed)
    workload = make(0)
    assert workload.name == "chat" and workload.output_lens == [128] * 40
    texts = ["".join(map(chr, prompt)) for prompt in workload.prompts]
    assert all(t.startswith("<user>") and t.endswith("</user><assistant>") for t in texts)
    assert all(any(t[len("<user>"):].startswith(i) for i in CHAT_INSTRUCTIONS) for t in texts)
    assert all(60 <= len(p) <= 300 + 20 for p in workload.prompts)
    assert len({len(p) for p in workload.prompts}) > 10
    assert make(0).prompts == workload.prompts and make(1).prompts != workload.prompts
    with pytest.raises(ValueError, match="exceed the model"):
        chat_workload(1, input_len=(60, 2000), output_len=(128, 128), apply_chat_template=template, corpus=corpus,
                      max_model_len=2048)


def test_shared_prefix_workload_shares_one_long_system_message():
    """The prefix-sharing preset: every prompt starts with the same templated system message of about
    prefix_len tokens, then its own user passage of about input_len more."""
    import os

    from seesaw_ds.bench.workloads import make_workload

    corpus = "The river ran quietly. Clara baked bread before dawn. People talked about the weather. " * 3
    template = lambda messages: [ord(c) for m in messages for c in f"<{m['role']}>{m['content']}</{m['role']}>"]
    workload = make_workload("shared_prefix", num_prompts=12, seed=0, token_range=(0, 10), max_model_len=2048,
                             input_len=(40, 40), output_len=(32, 32), apply_chat_template=template, corpus=corpus,
                             prefix_len=300)
    shared = os.path.commonprefix([tuple(p) for p in workload.prompts])
    assert workload.name == "shared_prefix" and workload.output_lens == [32] * 12
    assert 300 <= len(shared) <= 300 + 20 and "".join(map(chr, shared)).startswith("<system>")
    assert all(40 - 10 <= len(p) - len(shared) <= 40 + 30 for p in workload.prompts)  # "<user>" is shared too
    assert len({tuple(p[len(shared):]) for p in workload.prompts}) > 1
    with pytest.raises(ValueError, match="exceed the model"):
        make_workload("shared_prefix", num_prompts=1, seed=0, token_range=(0, 10), max_model_len=200,
                      input_len=(40, 40), output_len=(32, 32), apply_chat_template=template, corpus=corpus,
                      prefix_len=300)


def test_agreement_counts_tokens_before_the_first_difference():
    from seesaw_ds.bench.peers import PeerResult, agreement

    ref = PeerResult("ref", "transformers", "ok", token_prefixes={"0": [1, 2, 3, 4], "1": [5, 6, 7]})
    same = PeerResult("same", "seesaw", "ok", token_prefixes={"0": [1, 2, 3, 4], "1": [5, 6, 7]})
    early = PeerResult("early", "vllm", "ok", token_prefixes={"0": [1, 9, 3, 4], "1": [8, 6, 7]})
    failed = PeerResult("failed", "vllm", "failed")
    shares = agreement([ref, same, early, failed], "ref")
    assert shares == {"ref": 3.5, "same": 3.5, "early": 0.5}
    assert agreement([same], "ref") == {}


def test_cut_prompts_keeps_each_prompts_last_tokens():
    workload = workloads.Workload("chat", [list(range(40)), [7, 8, 9]], [4, 4])
    cut = workloads.cut_prompts(workload, 16)
    assert cut.prompts == [list(range(24, 40)), [7, 8, 9]] and cut.output_lens == [4, 4]
    assert cut.name == "chat_last16" and workload.prompts[0] == list(range(40)), "the original is left alone"
    with pytest.raises(ValueError, match="prompt_tail=0"):
        workloads.cut_prompts(workload, 0)


def _compose_preset(name: str):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from seesaw_ds.bench.config import register, to_settings

    register()
    conf = Path(__file__).resolve().parents[2] / "conf" / "bench"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        return to_settings(compose(config_name="config", overrides=[f"workload={name}"]))


@pytest.mark.parametrize("preset, num_prompts, output_len, prompt_tail", [
    ("standard", 128, 128, None), ("prefill_only", 128, 1, None), ("decode_only", 128, 256, 16),
    ("batch1", 1, 256, None)])
def test_issue22_presets_have_their_shape(preset, num_prompts, output_len, prompt_tail):
    """The bench presets beside the standard run (conf/bench/workload/): prefill only (1 output token),
    decode only (prompts cut to 16 tokens, 256 out), batch-1 latency (one prompt, 256 out): the standard run's
    chat prompts otherwise, seesaw_auto against vllm_2cores with the fp32 reference."""
    settings = _compose_preset(preset)
    spec = settings.workload
    assert spec.kind == "chat" and (spec.input_len_min, spec.input_len_max) == (61, 558)
    assert (spec.output_len_min, spec.output_len_max) == (output_len, output_len) and spec.prompt_tail == prompt_tail
    assert settings.bench.num_prompts == num_prompts
    if preset != "standard":
        assert settings.bench.peers[:2] == ["seesaw_auto", "vllm_2cores"]
        assert settings.bench.reference == "transformers_fp32" in settings.bench.peers
        assert settings.bench.targets == ["seesaw_auto>=1.0*vllm_2cores"]
    corpus = "The river ran quietly. Clara baked bread before dawn. People talked about the weather. " * 3
    template = lambda messages: [ord(c) for c in f"<system>helper</system><user>{messages[0]['content']}</user>>"]
    workload = workloads.make_workload(spec.kind, num_prompts=num_prompts, seed=0, token_range=(0, 10),
                                       max_model_len=2048, input_len=(spec.input_len_min, spec.input_len_max),
                                       output_len=(spec.output_len_min, spec.output_len_max),
                                       apply_chat_template=template, corpus=corpus, prompt_tail=spec.prompt_tail)
    assert workload.num_requests == num_prompts and workload.output_lens == [output_len] * num_prompts
    if prompt_tail:
        assert all(len(p) == prompt_tail for p in workload.prompts)
        assert all("".join(map(chr, p)).endswith("</user>>") for p in workload.prompts), "the prompt's own end"
        assert len({tuple(p) for p in workload.prompts}) > 10, "not one shared header"
    else:
        assert all(61 <= len(p) <= 558 + 20 for p in workload.prompts)
