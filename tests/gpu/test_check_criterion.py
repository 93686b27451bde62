"""The GPU check's criterion (tests/gpu/check.py, ``Reference.judge``), on the CPU with the check's tiny model and
prompts: the float32 model's own greedy paths and logits pass, transformers' greedy bf16 passes (what a bf16
computation of the same model scores), and a path with one token far below the float32 top, or logits off by
more than the stated tolerance at one place, fail."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from seesaw_ds.model.tiny import make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check  # noqa: E402  (tests/gpu/check.py, a script beside this file)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("criterion") / "tiny", "llama", num_layers=5)
    prompts = check._prompts(check.STEP_PROMPT_LENGTHS, seed=11)
    return check.Reference(model_dir, prompts, check.MAX_TOKENS, torch.device("cpu"))


def test_float32_paths_and_transformers_bf16_pass(reference):
    own = reference.judge(reference.paths, reference.forced(reference.paths))
    assert own["ok"] and own["max_logits_error"] == 0 and own["worst_margin"] < 1e-3, own
    assert own["fp32_prefix"] == (len(reference.paths) * check.MAX_TOKENS,) * 2 + (len(reference.paths),)
    bf16 = reference.transformers_bf16
    assert bf16["ok"], bf16
    assert bf16["max_logits_error"] > 0.1 * check.LOGITS_TOLERANCE, "bf16 really differs from float32"


def test_a_token_far_off_the_top_or_logits_beyond_the_tolerance_fail(reference):
    paths = [list(path) for path in reference.paths]
    forced = reference.forced(paths)
    paths[2][5] = int(forced[2][5].argmin())  # the float32 model's least likely token at one step
    wrong = reference.judge(paths)
    assert not wrong["ok"] and wrong["off_top"] >= 1 and wrong["worst_margin"] > 2 * check.LOGITS_TOLERANCE, wrong
    logits = reference.forced(reference.paths)
    logits[1][3, 7] += 1.01 * check.LOGITS_TOLERANCE
    assert not reference.judge(reference.paths, logits)["ok"]
    logits[1][3, 7] -= 0.02 * check.LOGITS_TOLERANCE
    assert reference.judge(reference.paths, logits)["ok"]


def test_the_report_written_after_a_part_keeps_it_and_says_what_was_not_reached(tmp_path):
    """The check rewrites the page after every part: a run stopped by its time limit leaves what it measured, the
    failed part's reason, and the parts it never reached, with the hand-written part below the marker kept."""
    header = {"device": "NVIDIA H100", "when": "2026-12-07 10:00", "torch": "2.11.0", "cuda": "13.0",
              "transformers": "5.17.0", "deepspeed": "0.19.8", "python": "3.12", "mpi": "mpi4py",
              "accelerator": "cuda", "total_s": 61.0, "parts": "job 50 s, steps 11 s",
              "attention": "paged Triton; the CPU kernels' extension: not loaded"}
    page = tmp_path / "gpu.md"
    page.write_text(f"old figures\n{check.KEPT}\nwhat was learnt\n")
    check.write_report(page, header, {"job": "RuntimeError: capture failed", "steps": "ValueError: off"}, False)
    text = page.read_text()
    assert "old figures" not in text and text.endswith(f"{check.KEPT}\nwhat was learnt\n")
    assert "- **FAILED**: RuntimeError: capture failed" in text and "- **FAILED**: ValueError: off" in text
    assert text.count("**not reached**") == 3 and "extension: not loaded" in text
