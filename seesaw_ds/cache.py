"""Where seesaw_ds keeps files across jobs on a node: ``$SEESAW_CACHE``, else ``~/.cache/seesaw_ds``.

Fetched and converted models, the machine calibration and inductor's compiled kernels live under it (each in a
folder of its own, named by its owner); this is the one place that reads the variable.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SEESAW_CACHE`` where set, else ``~/.cache/seesaw_ds`` (not created here)."""
    return Path(os.environ.get("SEESAW_CACHE") or Path.home() / ".cache" / "seesaw_ds")
