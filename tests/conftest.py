"""Fixtures shared by every test tier: tiny models built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints of each family with 5 (uneven) layers, 4 heads and 2 KV heads."""
    from seesaw_ds.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {family: make_tiny_model(root / family, family, num_layers=5) for family in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The project's default tiny model (what `bash slurm/run.sh` serves), built once into .cache/."""
    from seesaw_ds.model.tiny import ensure_default_model

    return ensure_default_model(REPO / ".cache")
