"""A peer's process and everything it starts, ended together: the bench runs each peer in a session of its own
and, when the peer outlives its time (or the bench is interrupted), kills the whole process group.

Why: ``subprocess.call(..., timeout=...)`` kills only the direct child. vLLM's engine core and workers are its
grandchildren; a timed-out vLLM left them spinning on both cores for the rest of the session (measured
2026-12-07: two orphaned ``VLLM::Worker`` processes took 50-140% of a core each through the next runs and a CI
run), so every later figure of that bench was slowed.
"""
from __future__ import annotations

import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (it leads it: started with ``start_new_session``) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def call(command: list[str], *, timeout: float | None, **kwargs) -> int:
    """``subprocess.call`` in a session of its own; on a timeout (``subprocess.TimeoutExpired``, re-raised) or
    any interruption the command and every process it started are killed first."""
    proc = subprocess.Popen(command, start_new_session=True, **kwargs)
    try:
        return proc.wait(timeout=timeout)
    except BaseException:
        kill_group(proc)
        raise
