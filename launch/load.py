"""Load check: rank 0's peak RSS against input size (synthetic inputs, max_tokens=1).

    python launch/load.py                              1k, 10k and 100k lines, default tiny model
    python launch/load.py --sizes 2000,20000 -- model.path=/models/x parallel=single launch.nproc=1

Prints one line per job and a markdown table (docs/reliability.md, "Load"). See seesaw_ds/bench/load.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from seesaw_ds.bench.load import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
