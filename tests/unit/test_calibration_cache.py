"""parallel=auto measures the machine once and keeps it (seesaw_ds/sim/calibration_cache.py): two starts on
the same machine plan with the same figures and predict the same throughput; parallel.recalibrate measures
again; a change of engine code, model, ranks or dtype is another calibration. The measurement itself is
stood in for by noisy random figures (the real one is the multirank test_auto's)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from seesaw_ds.distributed.layout import ModelDims
from seesaw_ds.sim import calibration_cache
from seesaw_ds.sim.auto import JobFacts, choose
from seesaw_ds.sim.calibrate import Calibration
from seesaw_ds.sim.cost import ComputeProfile
from seesaw_ds.sim.workload import Workload

DIMS = ModelDims(num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, hidden_size=512, intermediate_size=1376,
                 vocab_size=1024)


@pytest.fixture
def noisy_machine(monkeypatch, tmp_path):
    """Every measurement gives different figures (as a loaded machine does); counts the measurements."""
    rng = random.Random(0)
    calls = []

    def measure(*, ranks, dtype, memory_fraction=0.5, model_path=None):
        calls.append(model_path)
        jitter = lambda: rng.uniform(0.6, 1.4)  # noqa: E731
        profile = ComputeProfile(prefill_layer_s=1e-4 * jitter(), prefill_token_s=2e-6 * jitter(),
                                 prefill_pair_s=1e-9, prefill_seq_s=1e-5, decode_layer_s=2e-4 * jitter(),
                                 decode_seq_s=3e-6 * jitter(), decode_kv_token_s=1e-8, head_s=1e-3, head_seq_s=1e-5,
                                 step_s=1e-3, step_token_s=1e-7, step_seq_s=1e-6, threads=1, dtype=dtype)
        return Calibration(device="cpu", name="test cpu", matmul_flops=80e9 * jitter(),
                           memory_bandwidth=12e9 * jitter(), host_bandwidth=12e9, link_bandwidth=2e9 * jitter(),
                           link_latency=1e-5 * jitter(), memory_bytes=4 * 2 ** 30, host_memory_bytes=16 * 2 ** 30,
                           cores=2, ranks=ranks, profile=profile if model_path else None)

    monkeypatch.setattr(calibration_cache, "measure", measure)
    monkeypatch.setattr(calibration_cache, "_memory_now", lambda calibration, fraction: calibration)
    monkeypatch.setenv("SEESAW_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 512}))
    return calls, model


def predicted(calibration: Calibration) -> float:
    workload = Workload("t", np.arange(20, 200, 6, dtype=np.int64), np.full(30, 32, dtype=np.int64))
    return choose(JobFacts(num_ranks=2, dtype_bytes=2), calibration, DIMS, workload).throughput


def test_two_starts_predict_the_same(noisy_machine):
    calls, model = noisy_machine
    first, path, cached = calibration_cache.cached_calibration(ranks=2, dtype="bfloat16", model_path=model)
    assert not cached and path.is_file() and path.parent == calibration_cache.cache_dir()
    again, path_again, cached_again = calibration_cache.cached_calibration(ranks=2, dtype="bfloat16", model_path=model)
    assert cached_again and path_again == path and len(calls) == 1, "the second start measured nothing"
    assert again == first and again.profile == first.profile
    assert predicted(again) == predicted(first)


def test_recalibrate_measures_again_and_replaces_the_kept_figures(noisy_machine):
    calls, model = noisy_machine
    first, path, _ = calibration_cache.cached_calibration(ranks=2, dtype="bfloat16", model_path=model)
    fresh, _, cached = calibration_cache.cached_calibration(ranks=2, dtype="bfloat16", model_path=model, refresh=True)
    assert not cached and len(calls) == 2 and fresh != first
    assert predicted(fresh) != predicted(first), "a noisy machine: a new measurement predicts differently"
    kept, _, cached = calibration_cache.cached_calibration(ranks=2, dtype="bfloat16", model_path=model)
    assert cached and kept == fresh and len(calls) == 2


def test_another_engine_model_or_job_shape_is_measured_anew(noisy_machine, monkeypatch):
    calls, model = noisy_machine
    base = dict(ranks=2, dtype="bfloat16", model_path=model)
    calibration_cache.cached_calibration(**base)
    calibration_cache.cached_calibration(**{**base, "ranks": 4})
    calibration_cache.cached_calibration(**{**base, "dtype": "float32"})
    assert len(calls) == 3
    (model / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    calibration_cache.cached_calibration(**base)
    assert len(calls) == 4, "another model's shapes: the engine profile is timed again"
    monkeypatch.setattr("seesaw_ds.sim.profile.engine_fingerprint", lambda: "changed-engine")
    _, _, cached = calibration_cache.cached_calibration(**base)
    assert not cached and len(calls) == 5, "the engine's code changed: its step is timed again"


def test_an_unreadable_or_foreign_file_is_measured_again(noisy_machine):
    calls, model = noisy_machine
    _, path, _ = calibration_cache.cached_calibration(ranks=2, dtype="bfloat16", model_path=model)
    path.write_text("{not json")
    _, _, cached = calibration_cache.cached_calibration(ranks=2, dtype="bfloat16", model_path=model)
    assert not cached and len(calls) == 2
    document = json.loads(path.read_text())
    document["key"]["cpu"] = "another machine"
    path.write_text(json.dumps(document))
    _, _, cached = calibration_cache.cached_calibration(ranks=2, dtype="bfloat16", model_path=model)
    assert not cached and len(calls) == 3


def test_the_key_names_what_the_figures_depend_on(tmp_path):
    key = calibration_cache.machine_key(ranks=2, dtype="bfloat16", model_path=None)
    assert {"cpu", "cpu_flags", "cpus", "threads_per_rank", "ranks", "dtype", "model_config", "engine",
            "torch"} <= set(key)
    assert key == calibration_cache.machine_key(ranks=2, dtype="bfloat16", model_path=None)
