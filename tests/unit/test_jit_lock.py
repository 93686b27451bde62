"""A JIT build killed half-way must not hang later jobs: torch's build lock (``<build dir>/lock``) left by a
dead builder is removed with a warning, a live builder's lock is respected (seesaw_ds/distributed/jit_lock.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from seesaw_ds.distributed import jit_lock
from seesaw_ds.distributed.jit_lock import Owner, RecordingBaton, stale_reason

HERE = Owner("node01", 100, "pid:[4026531836]", 12345)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(path: Path, owner: Owner | None, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(owner.line() + "\n" if owner else "")
    if age_s:
        old = time.time() - age_s
        for entry in path.parent.iterdir():
            os.utime(entry, (old, old))
    return path


def in_thread(function, timeout: float = 20.0):
    """Run ``function`` with a time limit: a hang fails the test instead of the suite."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", function()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function} still waiting after {timeout} s"
    return result["value"]


# -- the rule (pure) ----------------------------------------------------------------------------------------------
def test_owner_record_round_trips():
    assert Owner.parse(HERE.line()) == HERE
    assert Owner.parse("") is None and Owner.parse("garbage") is None


def test_a_local_builder_counts_while_it_runs():
    assert stale_reason(HERE, HERE, lock_age_s=1e6, dir_idle_s=1e6, alive=lambda owner: True) is None
    reason = stale_reason(HERE, HERE, lock_age_s=0, dir_idle_s=0, alive=lambda owner: False)
    assert reason and "pid 100 on node01" in reason and "gone" in reason


def test_a_builder_elsewhere_counts_while_its_heartbeat_does():
    other = Owner("node02", 100, HERE.pid_namespace, 1)
    never = lambda owner: pytest.fail("cannot ask about another host's process")  # noqa: E731
    assert stale_reason(other, HERE, lock_age_s=60, dir_idle_s=1e6, alive=never) is None
    assert "node02" in stale_reason(other, HERE, lock_age_s=3600, dir_idle_s=0, alive=never)
    container = Owner("node01", 100, "pid:[4026532000]", 1)  # same host name, another pid namespace
    assert stale_reason(container, HERE, lock_age_s=60, dir_idle_s=0, alive=never) is None


def test_a_lock_without_a_record_counts_while_its_build_directory_changes():
    assert stale_reason(None, HERE, lock_age_s=1e6, dir_idle_s=60, alive=lambda o: True) is None
    assert "names no builder" in stale_reason(None, HERE, lock_age_s=1e6, dir_idle_s=3600, alive=lambda o: True)


# -- the baton ----------------------------------------------------------------------------------------------------
def test_lock_of_a_killed_builder_is_taken_over(tmp_path, caplog):
    lock = write_lock(tmp_path / "ext" / "lock", Owner(jit_lock.me().host, dead_pid(), jit_lock.me().pid_namespace, 1))
    baton = RecordingBaton(str(lock))
    with caplog.at_level("WARNING", logger="seesaw_ds"):
        assert in_thread(baton.try_acquire) is True
    assert Owner.parse(lock.read_text()) == jit_lock.me()  # the new owner is recorded
    assert "stale JIT build lock" in caplog.text and "is gone" in caplog.text
    baton.release()
    assert not lock.exists()
    assert list(lock.parent.iterdir()) == []  # no ".stale-*" leftovers


def test_old_lock_without_a_record_is_taken_over(tmp_path):
    lock = write_lock(tmp_path / "ext" / "lock", None, age_s=2 * 3600)
    (lock.parent / "build.ninja").write_text("")
    os.utime(lock.parent / "build.ninja", (time.time() - 7200, time.time() - 7200))
    baton = RecordingBaton(str(lock))
    assert in_thread(baton.try_acquire) is True
    baton.release()


def test_fresh_or_live_locks_are_respected(tmp_path):
    fresh = write_lock(tmp_path / "a" / "lock", None)
    assert RecordingBaton(str(fresh)).try_acquire() is False
    live = write_lock(tmp_path / "b" / "lock", jit_lock.me())  # this very process
    assert RecordingBaton(str(live)).try_acquire() is False
    assert fresh.exists() and live.exists()


def test_a_waiter_stops_waiting_when_the_builder_dies(tmp_path, monkeypatch):
    monkeypatch.setattr(jit_lock, "CHECK_EVERY_S", 0.2)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    record = Owner(jit_lock.me().host, builder.pid, jit_lock.me().pid_namespace, jit_lock._start_ticks(builder.pid))
    lock = write_lock(tmp_path / "ext" / "lock", record)
    baton = RecordingBaton(str(lock), wait_seconds=0.05)
    assert baton.try_acquire() is False  # alive: wait for it
    began = time.monotonic()
    in_thread(baton.wait, timeout=30)
    builder.wait()
    assert not lock.exists() and time.monotonic() - began < 15


def test_installed_into_torchs_loader():
    from torch.utils import cpp_extension

    jit_lock.install()
    assert cpp_extension.FileBaton is RecordingBaton


def test_kernel_loads_past_a_stale_lock(tmp_path):
    """The decode kernel's build directory holds a killed builder's lock: load() warns and proceeds. The
    venv's build is copied in when there is one (so nothing compiles), else it is built (~30-50 s here)."""
    from seesaw_ds.model import kernels

    name = f"seesaw_decode_attention_{kernels.isa()}"
    built = Path(sys.prefix) / "torch_extensions" / name
    target = tmp_path / "ext" / name
    if built.is_dir():
        shutil.copytree(built, target, ignore=shutil.ignore_patterns("lock", "lock.*"))
    me = jit_lock.me()
    write_lock(target / "lock", Owner(me.host, dead_pid(), me.pid_namespace, 1))
    code = "from seesaw_ds.model import kernels; print('LOADED', kernels.load() is not None, flush=True)"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "LOADED True" in proc.stdout, proc.stdout + proc.stderr
    assert "stale JIT build lock" in proc.stderr
    assert not (target / "lock").exists()


def test_the_extensions_state_in_words_builds_nothing(monkeypatch):
    """What the GPU check reports: a CUDA-only run should never have asked for the CPU kernels."""
    from types import SimpleNamespace

    from seesaw_ds.model import kernels

    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", None)
    assert kernels.state() == "not loaded" and kernels._module is None
    monkeypatch.setattr(kernels, "_failed", "OSError: no C++ compiler")
    assert kernels.state() == "unavailable (OSError: no C++ compiler)"
    monkeypatch.setattr(kernels, "_module", SimpleNamespace(__name__="seesaw_decode_attention_avx2"))
    assert kernels.state() == "loaded (seesaw_decode_attention_avx2)"
