"""Fixtures shared by every test tier: tiny models built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO


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
    """The project's default tiny model (what `bash slurm/run.sh` serves), built once into .cache/."""
    from seesaw_ds.model.tiny import ensure_default_model

    return ensure_default_model(REPO / ".cache")
