"""Model checks that passed before: the launcher does not run them again for the same inputs.

The launcher's model checks (``compose.check_before_launch``: the checkpoint's metadata, the layouts against
the model, every parameter's name and shape against transformers' own model on the meta device) import torch
and transformers' modeling code: ~3 of the launcher's ~4.4 CPU seconds on the 2-core AMD EPYC, before any
rank starts, at every launch. Their verdict is a function of the model directory's files, the layouts, the
rank count, ``model.trust_remote_code`` and the code that checks, so a pass is recorded as an empty file named
by a digest of all of these (``$SEESAW_CACHE/passed_checks/``) and a launch with the same digest skips them.

The ranks run the same checks again as they start (``runtime.start``: the checkpoint opened, the layouts
validated, the weights planned against the template), so a record never lets a bad job run: at worst its
error comes from the ranks, as one line. A changed file in the model directory (size or modification time),
another transformers, or any edited source file of seesaw_ds gives another digest.
"""
from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

from seesaw_ds.cache import cache_root

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _stamp(directory: Path, recursive: bool) -> list[tuple[str, int, int]]:
    """(relative path, size, modification time in ns) of the files under ``directory``, sorted."""
    entries = []
    walk = os.walk(directory) if recursive else [(str(directory), [], os.listdir(directory))]
    for root, _, names in walk:
        for name in names:
            path = Path(root) / name
            if path.is_file() and not name.endswith(".pyc"):
                stat = path.stat()
                entries.append((str(path.relative_to(directory)), stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


def check_digest(settings) -> str:
    """The digest of everything the launcher's model checks depend on (``settings`` with a model.path)."""
    model_dir = Path(settings.model.path).expanduser().resolve()
    parallel = settings.parallel
    facts = {
        "model": str(model_dir),
        "files": _stamp(model_dir, recursive=False),
        "trust_remote_code": bool(settings.model.trust_remote_code),
        "layouts": [parallel.auto, *(getattr(getattr(parallel, phase), axis)
                                     for phase in ("prefill", "decode") for axis in ("dp", "tp", "pp"))],
        "nproc": settings.launch.nproc,
        "transformers": metadata.version("transformers"),
        "seesaw_ds": _stamp(PACKAGE_DIR, recursive=True),
    }
    return hashlib.sha256(repr(facts).encode()).hexdigest()


def _record(digest: str) -> Path:
    return cache_root() / "passed_checks" / digest


def passed_before(digest: str) -> bool:
    return _record(digest).is_file()


def remember_pass(digest: str) -> None:
    """Record a pass (best effort: an unwritable cache only means the checks run again next time)."""
    try:
        _record(digest).parent.mkdir(parents=True, exist_ok=True)
        _record(digest).touch()
    except OSError:
        pass
