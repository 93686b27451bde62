"""Shared fixtures for the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def engine_tokenizer():
    """The project's tiny byte-level BPE tokenizer (eos, chat template).

    Uses `seesaw_ds.model.tiny.build_tokenizer` (the tokenizer `make_tiny_model` writes) rather than a whole
    checkpoint: building the model takes seconds that tokenizer-only tests do not need. A package that fails
    to import fails every test that asks for it: there is no stand-in.
    """
    from seesaw_ds.model.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: far too small to gain from threads, and on a shared 2-core box spinning
    OpenMP workers made generation ten times slower. Restores the setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
