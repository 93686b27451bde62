"""The compiled forward: a stage's decoder layers under ``torch.compile`` (inductor), on a CPU and CUDA alike.

transformers' decoder layers run op by op in eager mode: per layer two RMSNorms of seven or eight tensor
operations, rotary embedding, activations, casts, residual adds, each its own kernel and its own trip through
the dispatcher. Inductor fuses those into a few generated loops around the matmuls. The layers stay
transformers' own; attention is :func:`seesaw_ds.model.attention.attention_op`, a ``torch.library`` operator
that the graph keeps whole, so the graph does not break at attention.

What is compiled is one decoder layer's call (:class:`CompiledLayers` wraps the stage's per-layer function):
the layers of a stage have the same code and shapes, their weights are graph inputs, so one graph serves
them all and compile time does not grow with depth (a whole 30-layer stage as one graph took ~7 minutes to
compile on the 2-core machine; a stage's graphs of one layer 15-45 s cold, ~7 s from the disk cache). Sizes are
dynamic (``dynamic=True``): one graph serves every decode batch size, one every packed prefill length; a
size of 1 is specialised, so a stage makes at most three graphs (a decode batch of one, larger decode
batches, prefill rows). Compiled artefacts go to inductor's on-disk cache under ``$SEESAW_CACHE``
(:func:`cache_dir`), so a second job on the same node starts warm.

Nothing here is hand-written compilation: it is ``torch.compile`` with the cache directory, the counting of
compile seconds (the calls during which Dynamo made a new graph) and the decision of when to use it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from seesaw_ds import cpu_features
from seesaw_ds.cache import cache_root

MODES = ("auto", "true", "false")
"""``model.compile``: ``true`` compile, ``false`` eager, ``auto`` compile where it measures faster
(:func:`resolve`)."""


def cache_dir() -> Path:
    """Where inductor keeps compiled kernels across jobs: ``$TORCHINDUCTOR_CACHE_DIR`` when the user set it,
    else ``$SEESAW_CACHE/inductor`` (default ``~/.cache/seesaw_ds/inductor``)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return cache_root() / "inductor"


def resolve(mode: str | bool, device: torch.device, dtype: torch.dtype, cpu_flags: set[str] | None = None) -> bool:
    """Whether to compile: ``mode`` is ``model.compile``; ``cpu_flags`` the CPU's (read when None).

    ``auto`` compiles bf16/fp16 stages where compiling measured faster and the elementwise work it fuses is
    a real share of a step: on an accelerator (a step there is launch-bound: ~450 kernel launches for 8
    layers on the H200, docs/gpu.md) and on a CPU with AMX, whose matmuls are fast enough that the unfused
    elementwise ops weigh (transformers' SmolLM2 body in bf16: 1.27-1.43x compiled, DESIGN.md). On a CPU
    without AMX the bf16 matmuls are ~85% of a step and compiling measured 1.00-1.04x per step for 10-60 s
    of compilation (docs/benchmarks.md), so ``auto`` stays eager there; float32 stays eager everywhere."""
    mode = {True: "true", False: "false"}.get(mode, str(mode).lower())
    if mode not in MODES:
        raise ValueError(f"model.compile={mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "true"
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    if device.type != "cpu":
        return True
    flags = cpu_features.cpu_flags() if cpu_flags is None else cpu_flags
    return bool(flags) and "amx_bf16" in flags


RECOMPILE_LIMIT = 64
"""Graphs Dynamo keeps for the one compiled function (its default, 8, is two layouts of a Gemma stage)."""


class CompiledLayers:
    """``body`` (a stage's layer loop) under ``torch.compile``, with the seconds spent compiling counted."""

    def __init__(self, body: Callable):
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
        # Every stage of the process compiles the same function (one layer's call): its graphs (<= 3 shapes
        # per stage and kind of layer, e.g. Gemma's sliding and global layers) all count against Dynamo's
        # per-function limit, past which it silently runs eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._compiled = torch.compile(body, dynamic=True)
        self.compile_seconds = 0.0
        """Seconds of the calls that compiled a new graph (cache loads included)."""
        self.graphs = 0
        """Graphs this stage compiled so far."""

    def __call__(self, *args, **kwargs):
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        began = time.perf_counter()
        out = self._compiled(*args, **kwargs)
        made = counters["stats"]["unique_graphs"] - before
        if made:
            self.graphs += made
            self.compile_seconds += time.perf_counter() - began
        return out
