"""SEESAW_FAULT parsing and arming (seesaw_ds/faults.py): pure, no processes are killed."""
from __future__ import annotations

import pytest

from seesaw_ds import faults


def test_parse_valid_values():
    assert faults.parse("transition:3@rank1", world_size=2) == faults.Fault("transition", 3, 1)
    assert faults.parse("output:1") == faults.Fault("output", 1, None)


@pytest.mark.parametrize("spec, message", [
    ("transition", "is malformed"), ("transition:3@r1", "is malformed"), ("output:-1", "is malformed"),
    ("write:2", "unknown fault point 'write'"), ("output:0", "N=0 must be >= 1"),
    ("output:1@rank2", "rank 2 does not exist in a job of 2 ranks"),
])
def test_parse_rejects_malformed_values(spec, message):
    with pytest.raises(ValueError, match="SEESAW_FAULT"):
        faults.parse(spec, world_size=2)
    assert message in faults.configure(0, 2, {"SEESAW_FAULT": spec})


def test_armed_only_on_the_named_rank_and_fires_on_the_nth_arrival(monkeypatch):
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, signum: kills.append(signum))
    assert faults.configure(0, 2, {"SEESAW_FAULT": "transition:2@rank1"}) is None
    for _ in range(3):
        faults.fault_point("transition")
    assert kills == []  # rank 0 is not the target
    assert faults.configure(1, 2, {"SEESAW_FAULT": "transition:2@rank1"}) is None
    written = []
    faults.fault_point("output")
    faults.fault_point("transition", lambda: written.append(1))
    assert kills == [] and written == []
    faults.fault_point("transition", lambda: written.append(2))
    assert written == [2] and kills == [faults.signal.SIGKILL]
    faults.fault_point("transition")
    assert len(kills) == 1  # only the N-th arrival
    assert faults.configure(1, 2, {}) is None
    faults.fault_point("transition")
    assert len(kills) == 1
