"""The launcher's model checks run once per model files, layouts, ranks and code (seesaw_ds/cli/passed_checks.py):
a pass is recorded, a launch with the same inputs skips the checks (and the torch and transformers imports
they need), anything else checks again, and a failed check records nothing."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO
from seesaw_ds.cli.compose import check_before_launch, compose_settings
from seesaw_ds.cli.passed_checks import check_digest, passed_before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from seesaw_ds.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("passed") / "llama", "llama", num_layers=2)


def settings_for(model_dir, *overrides):
    return compose_settings([f"model.path={model_dir}", "launch.nproc=2", "parallel=seesaw_pp2_tp2", *overrides])[0]


def test_digest_follows_every_input(model_dir, tmp_path):
    base = check_digest(settings_for(model_dir))
    assert check_digest(settings_for(model_dir)) == base
    assert check_digest(settings_for(model_dir, "parallel=tp2")) != base
    assert check_digest(settings_for(model_dir, "launch.nproc=4", "parallel.decode.tp=4")) != base
    assert check_digest(settings_for(model_dir, "model.trust_remote_code=true")) != base
    config = model_dir / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        assert check_digest(settings_for(model_dir)) != base, "a touched model file checks again"
    finally:
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_pass_is_recorded_and_then_skips_the_checks(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SEESAW_CACHE", str(tmp_path / "cache"))
    settings = settings_for(model_dir)
    assert not passed_before(check_digest(settings))
    script = ("import sys; from seesaw_ds.cli.compose import check_before_launch, compose_settings; "
              f"s = compose_settings(['model.path={model_dir}', 'launch.nproc=2', 'parallel=seesaw_pp2_tp2'])[0]; "
              "check_before_launch(s); print('template imported:', 'seesaw_ds.model.template' in sys.modules)")
    env = dict(os.environ, SEESAW_CACHE=str(tmp_path / "cache"))
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert "template imported: True" in first.stdout, first.stderr[-2000:]
    assert passed_before(check_digest(settings))
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert "template imported: False" in second.stdout, second.stderr[-2000:]


def test_a_failed_check_records_nothing(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SEESAW_CACHE", str(tmp_path / "cache"))
    bad = settings_for(model_dir, "parallel.prefill.pp=4", "parallel.decode.tp=4", "launch.nproc=4")
    with pytest.raises(ValueError, match="pp=4 exceeds the model's 2 layers"):
        check_before_launch(bad)
    assert not passed_before(check_digest(bad))
    with pytest.raises(ValueError, match="pp=4 exceeds the model's 2 layers"):
        check_before_launch(bad)
