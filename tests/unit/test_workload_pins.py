"""The synthetic workloads, pinned: the planner's (sim/workload.py) and the benchmark's (bench/workloads.py)
give these exact requests for these seeds, so a refactor of where the lengths are drawn cannot change what a
benchmark runs or what the planner plans for (the digests were taken from the code before the two generators
shared one home, commit 534e95b).

Each pin is the SHA-256 (first 16 hex digits) of the requests as JSON (prompts or prompt lengths, then output
lengths), with the first few lengths spelled out so a failure shows what moved.
"""
from __future__ import annotations

import hashlib
import json

import pytest

from seesaw_ds.bench import workloads as bench
from seesaw_ds.sim import workload as sim
from seesaw_ds.sim.presets import load_workload

CORPUS = "The river ran quietly. Clara baked bread before dawn. People talked about the weather. " * 3


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def sim_pin(workload: sim.Workload) -> tuple[str, list[int], list[int]]:
    prompts, outputs = workload.prompt_lens.tolist(), workload.output_lens.tolist()
    return digest(prompts, outputs), prompts[:4], outputs[:4]


def bench_pin(workload: bench.Workload) -> tuple[str, list[int], list[int]]:
    return digest(workload.prompts, workload.output_lens), workload.prompt_lens[:4], workload.output_lens[:4]


def chat_template(messages: list[dict]) -> list[int]:
    return [ord(c) for m in messages for c in f"<{m['role']}>{m['content']}</{m['role']}>"]


SIM_PINS = {
    "sharegpt(64, seed=3)": (lambda: sim.sharegpt(64, seed=3),
                             ("d231f85faded5bec", [2309, 456, 170, 191], [437, 1228, 224, 258])),
    "arxiv(32, seed=1)": (lambda: sim.arxiv(32, seed=1),
                          ("da72899219b14c2c", [3445, 3424, 1781, 3586], [194, 225, 293, 272])),
    "planner preset sharegpt": (lambda: load_workload("sharegpt"),
                                ("b9d11f2daf6a9556", [340, 263, 569, 333], [423, 71, 242, 23])),
    "planner preset arxiv": (lambda: load_workload("arxiv"),
                             ("606f3a23c02ba54d", [3155, 2846, 3876, 3129], [284, 215, 193, 155])),
}

BENCH_PINS = {
    "random": (lambda: bench.random_workload(16, input_len=(20, 500), output_len=(1, 128), token_range=(7, 1024),
                                             max_model_len=2048, seed=0),
               ("03b352bbc32cda7f", [452, 408, 40, 281], [99, 108, 67, 125])),
    "sharegpt_like": (lambda: bench.make_workload("sharegpt_like", num_prompts=24, seed=3, token_range=(7, 1024),
                                                  max_model_len=2048),
                      ("dfca064b3efe4a9c", [196, 70, 137, 139], [512, 112, 419, 223])),
    "arxiv_like, a short context": (lambda: bench.make_workload("arxiv_like", num_prompts=24, seed=1,
                                                                token_range=(7, 1024), max_model_len=1024),
                                    ("2b2d711bb0b3a5ce", [703, 387, 921, 930], [321, 132, 103, 94])),
    "chat": (lambda: bench.make_workload("chat", num_prompts=12, seed=0, token_range=(0, 10), max_model_len=2048,
                                         input_len=(61, 558), output_len=(64, 256), apply_chat_template=chat_template,
                                         corpus=CORPUS),
             ("c3ac2ccd2a8a3bca", [495, 195, 532, 367], [162, 194, 141, 119])),
    "shared_prefix": (lambda: bench.make_workload("shared_prefix", num_prompts=8, seed=2, token_range=(0, 10),
                                                  max_model_len=2048, input_len=(20, 80), output_len=(8, 16),
                                                  apply_chat_template=chat_template, corpus=CORPUS, prefix_len=300),
                      ("8e023c7e8e10f5e6", [376, 326, 367, 360], [8, 13, 12, 11])),
    "decode_only (chat, last 16)": (lambda: bench.make_workload("chat", num_prompts=6, seed=0, token_range=(0, 10),
                                                                max_model_len=2048, input_len=(61, 558),
                                                                output_len=(256, 256),
                                                                apply_chat_template=chat_template, corpus=CORPUS,
                                                                prompt_tail=16),
                                    ("b63309caf8137222", [16, 16, 16, 16], [256, 256, 256, 256])),
}


@pytest.mark.parametrize("name", list(SIM_PINS))
def test_planner_workloads_are_the_pinned_ones(name):
    make, pinned = SIM_PINS[name]
    assert sim_pin(make()) == pinned


@pytest.mark.parametrize("name", list(BENCH_PINS))
def test_benchmark_workloads_are_the_pinned_ones(name):
    make, pinned = BENCH_PINS[name]
    assert bench_pin(make()) == pinned


def test_a_benchmark_workload_gives_the_planner_its_token_counts():
    """launch/validate_planner.py plans for the requests it runs: the same counts, request by request."""
    workload = BENCH_PINS["sharegpt_like"][0]()
    counts = workload.lengths()
    assert isinstance(counts, sim.Workload) and counts.name == "sharegpt_like"
    assert counts.prompt_lens.tolist() == [len(p) for p in workload.prompts]
    assert counts.output_lens.tolist() == workload.output_lens
    assert counts.prompt_tokens == workload.num_prompt_tokens and counts.output_tokens == workload.num_output_tokens
