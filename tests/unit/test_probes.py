"""The timing primitive every calibration uses: a rate is the best batch, and a batch lasts its minimum."""
from __future__ import annotations

import time

from seesaw_ds.probes import best_rate, memcpy_bytes_per_second


def test_best_rate_reports_the_fastest_batch():
    delays = iter([0.0, 0.02, 0.005, 0.01])  # a warm-up call, then one call per batch (min_seconds=0)
    rate = best_rate(lambda: time.sleep(next(delays)), amount=1.0, repeats=3, min_seconds=0.0)
    assert 100 < rate <= 200  # one unit in >= 5 ms at best


def test_a_batch_runs_until_its_minimum_time():
    calls = []
    best_rate(lambda: calls.append(1), amount=1.0, repeats=2, min_seconds=0.01)
    assert len(calls) > 3  # the warm-up, then each batch many calls long


def test_memcpy_rate_is_positive_and_leaves_the_thread_setting():
    import torch

    before = torch.get_num_threads()
    assert memcpy_bytes_per_second(1 << 20, repeats=1, min_seconds=0.0) > 1e6  # any machine copies > 1 MB/s
    assert torch.get_num_threads() == before
