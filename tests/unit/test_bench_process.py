"""A bench peer that outlives its time is killed with everything it started (seesaw_ds/bench/process.py): a
timed-out vLLM once left its engine workers spinning through every later run of the session."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from seesaw_ds.bench import process

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie is dead, waiting for its new parent to reap it


def test_a_timeout_kills_the_peers_grandchildren_too(tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "w") as log:
        with pytest.raises(subprocess.TimeoutExpired):
            process.call([sys.executable, "-c", PARENT], stdout=log, timeout=3)
    grandchild = int(out.read_text().split()[0])
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_a_finished_peer_returns_its_exit_code():
    assert process.call([sys.executable, "-c", "raise SystemExit(3)"], timeout=60) == 3
