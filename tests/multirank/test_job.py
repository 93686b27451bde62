"""The whole job on real ranks: prefill under one layout, decode under another, KV through the host
staging area (small enough for several prefill/decode cycles) and a device tier small enough to evict;
greedy outputs token-exact against plain transformers, every custom_id answered once."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, run_command

pytestmark = pytest.mark.dist
MAX_TOKENS = 12
RUN = str(REPO / "launch" / "run.py")


def greedy_workload(model_dir: Path, out_dir: Path, lengths, seed: int, low: int = 3):
    """Prompts of the given lengths as token ids (an input file in ``out_dir``) and transformers' greedy
    continuation of each, run alone: {custom_id: tokens}."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(low, 500, (n,), generator=generator).tolist() for n in lengths]
    path = out_dir / "input.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"req-{i}", "prompt_token_ids": p}) + "\n"
                            for i, p in enumerate(prompts)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = {}
    for i, prompt in enumerate(prompts):
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        expected[f"req-{i}"] = out[0, len(prompt):].tolist()
    return path, expected


@pytest.fixture(scope="module")
def workload(job_workload):
    """12 prompts of uneven length as token ids, and transformers' greedy continuation of each
    (tests/multirank/conftest.py)."""
    return job_workload


@pytest.fixture(scope="module")
def two_rank_job(workload, tmp_path_factory):
    """``two_rank_job(*overrides)``: the workload's 2-rank job with these overrides, run once per module
    however many tests check it (the default pp2 -> tp2 job serves the layout pair and the huge-page check;
    prefill_first with huge pages off serves the policy and the huge-page check)."""
    model_dir, input_path, _ = workload
    done = {}

    def run(*overrides: str):
        if overrides not in done:
            done[overrides] = run_job(model_dir, input_path, tmp_path_factory.mktemp("job"), 2, *overrides)
        return done[overrides]
    return run


def run_job(model_dir: Path, input_path: Path, out_dir: Path, nproc: int, *overrides: str, timeout: float = 600,
            env: dict | None = None):
    output = out_dir / "out.jsonl"
    args = [sys.executable, RUN, f"model.path={model_dir}", f"io.input={input_path}", f"io.output={output}",
            f"launch.nproc={nproc}", f"sampling.max_tokens={MAX_TOKENS}", "sampling.temperature=0",
            "sampling.ignore_eos=true", "kv.host_tokens=80", "kv.device_tokens=64", "kv.block_size=4",
            "scheduler.max_prefill_tokens=48", f"+run_dir={out_dir}", *overrides]
    proc = run_command(args, timeout=timeout, cwd=out_dir, env=env)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    metrics = json.loads((out_dir / "out.metrics.json").read_text())
    return proc, records, metrics


def layout_args(prefill: str, decode: str) -> list[str]:
    def parse(spec: str) -> dict[str, int]:
        values = {"dp": 1, "tp": 1, "pp": 1}
        for part in spec.split("."):
            values[part[:2]] = int(part[2:])
        return values
    args = []
    for phase, spec in (("prefill", prefill), ("decode", decode)):
        args += [f"parallel.{phase}.{axis}={value}" for axis, value in parse(spec).items()]
    return args


def check_outputs(records, expected) -> None:
    ids = [r["custom_id"] for r in records]
    assert sorted(ids) == sorted(expected), "every custom_id exactly once"
    for record in records:
        assert record["token_ids"] == expected[record["custom_id"]], record["custom_id"]
        assert record["finish_reason"] == "length"
        assert record["usage"]["completion_tokens"] == MAX_TOKENS


CASES_2 = [("pp2", "tp2"), ("tp2", "pp2"), ("dp2", "tp2"), ("tp2", "dp2")]
CASES_4 = [("pp4", "tp4"), ("pp4", "tp2.pp2"), ("tp2.pp2", "tp4"), ("dp2.pp2", "dp2.tp2")]


@pytest.mark.parametrize("prefill,decode", CASES_2)
def test_layout_pairs_two_ranks(workload, two_rank_job, prefill, decode):
    _, _, expected = workload
    _, records, metrics = two_rank_job(*layout_args(prefill, decode))
    check_outputs(records, expected)
    assert metrics["num_transitions"] >= 4, "a small staging area makes several prefill/decode cycles"
    assert metrics["scheduler"]["evictions"] > 0, "a small device tier makes sequences swap back out"
    assert metrics["kv"]["swap_in_bytes"] > 0 and metrics["kv"]["swap_out_bytes"] > 0


@pytest.mark.parametrize("prefill,decode", CASES_4)
def test_layout_pairs_four_ranks(workload, tmp_path, prefill, decode):
    model_dir, input_path, expected = workload
    _, records, metrics = run_job(model_dir, input_path, tmp_path, 4, *layout_args(prefill, decode), timeout=900)
    check_outputs(records, expected)
    assert metrics["num_transitions"] >= 4
    assert metrics["scheduler"]["evictions"] > 0


def test_pp2_to_tp2_across_nodes(workload, across_nodes_job):
    """Two ranks posing as two nodes: KV written on one 'node' reaches the other point-to-point (the run
    test_host_groups.py checks the routes of: tests/multirank/conftest.py)."""
    _, _, expected = workload
    _, records, metrics = across_nodes_job
    check_outputs(records, expected)
    assert metrics["kv"]["remote_bytes"] > 0, "pieces written on the other node must travel point-to-point"


def test_compiled_job_under_a_layout_switch(workload, two_rank_job):
    """model.compile=true (float32): the decoder layers under torch.compile through prefill pp2 -> decode tp2
    (the row-parallel all-reduce inside the compiled layer), staging and evictions; transformers' tokens."""
    _, _, expected = workload
    _, records, metrics = two_rank_job(*layout_args("pp2", "tp2"), "model.compile=true")
    check_outputs(records, expected)
    assert metrics["compile_seconds"] > 0
    assert metrics["num_transitions"] >= 4 and metrics["scheduler"]["evictions"] > 0


#: The prefill_first job also has huge pages off (test_ranks_use_huge_pages_unless_turned_off reads it).
POLICY_EXTRA = {"prefill_first": ("launch.hugepages=false",), "decode_first": ()}


@pytest.mark.parametrize("policy", ["prefill_first", "decode_first"])
def test_other_policies(workload, two_rank_job, policy):
    _, _, expected = workload
    _, records, metrics = two_rank_job(*layout_args("pp2", "tp2"), f"scheduler.policy={policy}",
                                       *POLICY_EXTRA[policy])
    check_outputs(records, expected)


def test_ranks_use_huge_pages_unless_turned_off(workload, two_rank_job):
    """launch.hugepages (on by default) starts the ranks with glibc's transparent-huge-page tunable: rank 0
    holds memory on huge pages at the end of the job where the kernel allows THP, and none when the setting
    is off and the kernel gives them only on request (madvise). Outputs are the same either way. (The jobs
    are the default pp2 -> tp2 one and the prefill_first one, which has the setting off.)"""
    from seesaw_ds.distributed.env import transparent_hugepages_mode

    _, _, expected = workload
    metrics = {}
    runs = {"true": layout_args("pp2", "tp2"),
            "false": [*layout_args("pp2", "tp2"), "scheduler.policy=prefill_first", *POLICY_EXTRA["prefill_first"]]}
    for setting, overrides in runs.items():
        _, records, metrics[setting] = two_rank_job(*overrides)
        check_outputs(records, expected)
    mode = transparent_hugepages_mode()
    if mode in ("always", "madvise"):
        assert metrics["true"]["hugepage_bytes_rank0"] > 0, (mode, metrics["true"]["hugepage_bytes_rank0"])
    if mode in ("madvise", "never"):
        assert metrics["false"]["hugepage_bytes_rank0"] == 0, (mode, metrics["false"]["hugepage_bytes_rank0"])


FAMILY_JOBS = [("gemma2", "pp2", "tp2"), ("gemma3", "pp2", "tp2"), ("mixtral_per_expert", "pp2", "tp2"),
               ("qwen2_moe", "pp2", "tp2"), ("phi3", "pp2", "tp2"), ("olmo2", "pp2", "tp2"), ("granite", "pp2", "tp2"),
               ("llama_dynamic", "pp2", "tp2"), ("gemma3", "tp2", "pp2"), ("qwen3_moe", "dp2", "tp2")]
EXTRA = {"llama_dynamic": ["model.max_model_len=64"]}  # dynamic rope serves past its 20 positions


@pytest.mark.parametrize("case,prefill,decode", FAMILY_JOBS)
def test_family_through_the_whole_job(family_models, tmp_path, case, prefill, decode):
    """A whole job per family: KV written under the prefill layout, staged in host memory, read under the
    decode layout, with evictions; greedy tokens identical to transformers."""
    input_path, expected = greedy_workload(family_models[case], tmp_path, (5, 21, 9, 17, 3, 14, 11, 19), seed=11,
                                           low=8)
    _, records, metrics = run_job(family_models[case], input_path, tmp_path, 2, *layout_args(prefill, decode),
                                  *EXTRA.get(case, []))
    check_outputs(records, expected)
    assert metrics["num_transitions"] >= 2


@pytest.mark.parametrize("case", ["qwen2", "olmo2"])
def test_bf16_prepacked_projections_as_the_views(family_models, tmp_path, case):
    """bf16 (oneDNN-prepacked linears) under prefill pp2 -> decode tp2 with staging and evictions: the same
    greedy tokens as the unpacked views (``model.cpu_prepack=false``). Qwen2: q/k/v biases; OLMo-2: q/k norms
    over all heads after the projections."""
    input_path, _ = greedy_workload(family_models[case], tmp_path, (5, 21, 9, 17, 3, 14), seed=13, low=8)
    tokens = {}
    for prepack in ("true", "false"):
        out_dir = tmp_path / f"prepack-{prepack}"
        out_dir.mkdir()
        _, records, _ = run_job(family_models[case], input_path, out_dir, 2, *layout_args("pp2", "tp2"),
                                "model.dtype=bfloat16", f"model.cpu_prepack={prepack}")
        tokens[prepack] = {r["custom_id"]: r["token_ids"] for r in records}
    assert len(tokens["true"]) == 6 and tokens["true"] == tokens["false"]
