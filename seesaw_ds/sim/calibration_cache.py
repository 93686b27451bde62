"""The machine's calibration measured once and kept on disk, so that every ``parallel=auto`` start on the same
machine plans with the same figures (and predicts the same throughput).

:func:`cached_calibration` returns the calibration stored under ``$SEESAW_CACHE/calibration/`` (default
``~/.cache/seesaw_ds``) for this machine and job shape, measuring it (:func:`~seesaw_ds.sim.calibrate.measure`)
only when there is none or when asked to (``parallel.recalibrate=true``). A stored calibration is found by a
key of everything its figures depend on (:func:`machine_key`): the CPU (model, instruction-set flags, the
CPUs this process may use) or GPUs, the ranks and the threads each gets, the dtype, the model's shapes
(its config.json) for the engine profile, the engine's code (:func:`~seesaw_ds.sim.profile.engine_fingerprint`:
a change to the model code measures again) and torch's version. The memory figures are not kept: they are
what is free now, read again at every start.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict, replace
from pathlib import Path

from seesaw_ds.cache import cache_root
from seesaw_ds.cpu_features import cpu_flags, cpu_model_name
from seesaw_ds.sim.calibrate import Calibration, measure, rank_threads
from seesaw_ds.sim.cost import ComputeProfile

log = logging.getLogger("seesaw_ds")

FORMAT = 2
"""Version of the stored file; a file of another version is measured again (2: the matmul and memcpy figures
with the threads a rank runs, not one)."""


def cache_dir() -> Path:
    """Where calibrations are kept: ``$SEESAW_CACHE/calibration``, else ``~/.cache/seesaw_ds/calibration``."""
    return cache_root() / "calibration"


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def machine_key(*, ranks: int, dtype: str, model_path: str | Path | None) -> dict:
    """Everything a calibration's figures depend on (plain values; equal keys mean reusable figures)."""
    import torch

    from seesaw_ds.sim.profile import engine_fingerprint

    name = cpu_model_name() or platform.processor() or "cpu"
    flags = " ".join(sorted(cpu_flags() or ()))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"format": FORMAT, "cpu": name, "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "cpus": len(cpus), "gpus": gpus, "ranks": ranks, "threads_per_rank": rank_threads(len(cpus), ranks),
            "dtype": dtype, "model_config": _file_digest(Path(model_path) / "config.json") if model_path else None,
            "engine": engine_fingerprint(), "torch": torch.__version__}


def key_file(key: dict, directory: Path | None = None) -> Path:
    """The file a calibration of ``key`` is kept in."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (directory or cache_dir()) / f"{digest}.json"


def load(path: Path, key: dict) -> Calibration | None:
    """The calibration stored at ``path`` for ``key``; None when there is none, it is for another key or it
    cannot be read (a warning: it is measured again)."""
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
        if document.get("key") != key:
            return None
        figures = dict(document["calibration"])
        profile = figures.pop("profile", None)
        return Calibration(**figures, profile=ComputeProfile.from_json(profile) if profile else None)
    except (OSError, ValueError, TypeError, KeyError) as error:
        log.warning("planner: the cached calibration %s cannot be read (%s); measuring again", path, error)
        return None


def store(path: Path, key: dict, calibration: Calibration) -> None:
    """Keep ``calibration`` for ``key`` at ``path`` (written whole: a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"key": key, "calibration": asdict(calibration)}, indent=2) + "\n")
    os.replace(temporary, path)


def _memory_now(calibration: Calibration, memory_fraction: float) -> Calibration:
    """``calibration`` with its memory figures read again (what is free now)."""
    from seesaw_ds.sim.calibrate import _available_host_bytes

    host = _available_host_bytes()
    if calibration.device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device("cuda", 0))
        return replace(calibration, memory_bytes=free * memory_fraction, host_memory_bytes=host)
    return replace(calibration, memory_bytes=host * memory_fraction / max(1, calibration.ranks),
                   host_memory_bytes=host)


def cached_calibration(*, ranks: int, dtype: str, model_path: str | Path | None = None,
                       memory_fraction: float = 0.5, refresh: bool = False,
                       directory: Path | None = None) -> tuple[Calibration, Path, bool]:
    """(calibration, its file, whether it came from the file): the stored calibration of this machine and job
    shape, measured and stored first when there is none or ``refresh`` is set. A cache that cannot be
    written is a warning (the measured figures are still used)."""
    key = machine_key(ranks=ranks, dtype=dtype, model_path=model_path)
    path = key_file(key, directory)
    cached = None if refresh else load(path, key)
    if cached is not None:
        return _memory_now(cached, memory_fraction), path, True
    calibration = measure(ranks=ranks, dtype=dtype, memory_fraction=memory_fraction,
                          model_path=str(model_path) if model_path is not None else None)
    if model_path is not None and calibration.device == "cpu" and calibration.profile is None:
        return calibration, path, False  # the engine profile failed (warned): not kept, tried again next start
    try:
        store(path, key, calibration)
    except OSError as error:
        log.warning("planner: cannot keep the calibration in %s (%s); the next start measures again", path, error)
    return calibration, path, False
