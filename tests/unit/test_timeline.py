"""The leader's step timeline stays a fixed size however long the job runs (seesaw_ds.engine.leader)."""
from __future__ import annotations

from seesaw_ds.engine.leader import StepRecord, append_bounded


def test_timeline_is_bounded_and_keeps_the_totals():
    timeline: list[StepRecord] = []
    for step in range(10_000):
        phase = "prefill" if step < 3_000 else "decode"
        append_bounded(timeline, StepRecord(float(step), phase, 4 if phase == "prefill" else 8, 10, step, 0.5),
                       limit=64)
    assert 32 <= len(timeline) < 64
    assert sum(r.steps for r in timeline) == 10_000
    assert sum(r.tokens for r in timeline) == 100_000 and sum(r.seconds for r in timeline) == 5_000
    assert timeline[0].time == 0.0 and timeline[-1].staging_tokens == 9_999
    assert [r.time for r in timeline] == sorted(r.time for r in timeline)
    assert {r.steps for r in timeline[:-1]} == {256}  # a uniform resolution, only the last one filling up
    assert timeline[0].phase == "prefill" and timeline[0].batch_size == 4
    assert timeline[-1].phase == "decode" and timeline[-1].batch_size == 8
    total_seqs = sum(r.batch_size * r.steps for r in timeline)
    assert total_seqs == 3_000 * 4 + 7_000 * 8


def test_the_picture_is_drawn_and_a_missing_matplotlib_only_warns(tmp_path, monkeypatch, caplog):
    """A finished job writes its timeline PNG; where matplotlib is missing (a cluster's own Python), one warning
    and no picture instead of a failed job after every answer was written."""
    import sys
    from types import SimpleNamespace

    from seesaw_ds.engine.engine import _plot_timeline

    records = [StepRecord(0.0, "prefill", 4, 40, 40, 0.5), StepRecord(0.5, "decode", 4, 4, 44, 0.1)]
    leader = SimpleNamespace(stats=SimpleNamespace(timeline=records), extents=SimpleNamespace(capacity=100))
    drawn = tmp_path / "drawn.timeline.png"
    _plot_timeline(leader, drawn)
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    missing = tmp_path / "missing.timeline.png"
    with caplog.at_level("WARNING", logger="seesaw_ds"):
        _plot_timeline(leader, missing)
    assert not missing.exists()
    assert "matplotlib is not installed (pip install matplotlib)" in caplog.text and str(missing) in caplog.text
