"""JIT extension builds that survive a killed builder (DeepSpeed's ops, the decode-attention kernel).

torch.utils.cpp_extension lets one process build an extension while the others wait, through a ``lock``
file in the build directory (``FileBaton``: created with O_EXCL, removed when the build ends); a waiter
polls until the file is gone, forever. A builder killed half-way (a job cancelled during start-up, a lost
node) leaves the file behind, and on a shared file system every later job then hangs at start-up.

:func:`install` swaps in :class:`RecordingBaton`, which

- writes its owner into the lock (host, pid, pid namespace, the process's start time) and refreshes the
  lock's mtime every ``HEARTBEAT_S`` while it builds;
- before taking the lock, and every few seconds while waiting for it, removes a stale one with a one-line
  warning: one whose owner ran on this host (same pid namespace) and is gone; one whose owner ran elsewhere
  and has not refreshed it for ``RECORDED_STALE_S``; one with no owner record (an older torch, a build
  outside seesaw_ds) when nothing in its build directory changed for ``UNRECORDED_STALE_S``.

A waiter that removes a stale lock goes on to load what is there; torch's loader raises if the dead builder
left no module (the decode kernel then falls back to SDPA), and the next job builds it again.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from torch.utils.file_baton import FileBaton

log = logging.getLogger("seesaw_ds")

HEARTBEAT_S = 30.0
#: A recorded lock from another host is stale after this long without a heartbeat.
RECORDED_STALE_S = 300.0
#: A lock without an owner record is stale when its build directory has been idle this long
#: (SEESAW_JIT_LOCK_STALE_S overrides; a CUDA op can take minutes to compile one file).
UNRECORDED_STALE_S = 900.0
#: How often a waiter looks at the lock's owner.
CHECK_EVERY_S = 5.0


@dataclass(frozen=True)
class Owner:
    """Who holds a lock: enough to tell, on its own host, whether it still runs."""

    host: str
    pid: int
    pid_namespace: str
    start_ticks: int | None

    def line(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "pidns": self.pid_namespace,
                           "start": self.start_ticks})

    @staticmethod
    def parse(text: str) -> "Owner | None":
        try:
            record = json.loads(text)
            return Owner(str(record["host"]), int(record["pid"]), str(record["pidns"]),
                         None if record.get("start") is None else int(record["start"]))
        except (ValueError, KeyError, TypeError):
            return None


def _start_ticks(pid: int) -> int | None:
    """A running process's start time in clock ticks since boot (/proc/PID/stat field 22); None when it is
    gone or a zombie (dead, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def me() -> Owner:
    """This process as a lock owner."""
    return Owner(socket.gethostname(), os.getpid(), _pid_namespace(), _start_ticks(os.getpid()))


def owner_alive(owner: Owner) -> bool:
    """Whether ``owner`` (a process of this host and pid namespace) still runs: same pid, same start."""
    ticks = _start_ticks(owner.pid)
    return ticks is not None and (owner.start_ticks is None or ticks == owner.start_ticks)


def stale_reason(owner: Owner | None, here: Owner, *, lock_age_s: float, dir_idle_s: float, alive,
                 recorded_stale_s: float = RECORDED_STALE_S,
                 unrecorded_stale_s: float = UNRECORDED_STALE_S) -> str | None:
    """Why a lock is stale, or None while its builder may still run (pure: ``alive(owner)`` answers for a
    process of this host; ``lock_age_s`` is the time since the lock's last heartbeat, ``dir_idle_s`` since
    anything in the build directory changed)."""
    if owner is not None and owner.host == here.host and owner.pid_namespace == here.pid_namespace:
        if alive(owner):
            return None
        return f"its builder (pid {owner.pid} on {owner.host}) is gone"
    if owner is not None:
        if lock_age_s > recorded_stale_s:
            return (f"its builder (pid {owner.pid} on {owner.host}) has not refreshed it for "
                    f"{lock_age_s / 60:.0f} min")
        return None
    if dir_idle_s > unrecorded_stale_s:
        return f"it names no builder and nothing in its build directory changed for {dir_idle_s / 60:.0f} min"
    return None


def _unrecorded_limit() -> float:
    try:
        return float(os.environ.get("SEESAW_JIT_LOCK_STALE_S", UNRECORDED_STALE_S))
    except ValueError:
        return UNRECORDED_STALE_S


def check_stale(lock_path: str) -> bool:
    """Remove ``lock_path`` with a one-line warning when it is stale; True when it was removed here."""
    path = Path(lock_path)
    try:
        before = path.stat()
        text = path.read_text(errors="replace")
    except OSError:
        return False
    now = time.time()
    try:
        newest = max((entry.stat().st_mtime for entry in path.parent.iterdir()), default=before.st_mtime)
    except OSError:
        newest = before.st_mtime
    reason = stale_reason(Owner.parse(text), me(), lock_age_s=now - before.st_mtime, dir_idle_s=now - newest,
                          alive=owner_alive, unrecorded_stale_s=_unrecorded_limit())
    if reason is None or not _remove_if_same(path, before.st_ino):
        return False
    log.warning("seesaw_ds: removed a stale JIT build lock %s (%s); building here", lock_path, reason)
    return True


def _remove_if_same(path: Path, inode: int) -> bool:
    """Remove the lock judged stale, not a fresh one another process took meanwhile: move it aside, check it
    is the same file, put it back when it is not."""
    aside = path.with_name(f"{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:
        return False  # another process removed it first
    if os.stat(aside).st_ino != inode:
        try:
            os.link(aside, path)
        except OSError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


class RecordingBaton(FileBaton):
    """torch's FileBaton that records its owner, keeps a heartbeat and clears stale locks (see the module)."""

    def try_acquire(self) -> bool:
        for attempt in range(2):
            try:
                self.fd = os.open(self.lock_file_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if attempt == 0 and check_stale(self.lock_file_path):
                    continue
                return False
            os.write(self.fd, (me().line() + "\n").encode())
            self._beating = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._beating,), daemon=True,
                             name="seesaw-jit-lock").start()
            return True
        return False

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.lock_file_path)
            except OSError:
                return

    def wait(self) -> None:
        last_check = time.monotonic()
        while os.path.exists(self.lock_file_path):
            time.sleep(self.wait_seconds)
            if time.monotonic() - last_check >= CHECK_EVERY_S:
                last_check = time.monotonic()
                if check_stale(self.lock_file_path):
                    return

    def release(self) -> None:
        beating = getattr(self, "_beating", None)
        if beating is not None:
            beating.set()
        super().release()


def install() -> None:
    """Make torch's JIT builds (and DeepSpeed's, which go through them) use :class:`RecordingBaton`."""
    from torch.utils import cpp_extension

    if getattr(cpp_extension, "FileBaton", None) is not RecordingBaton:
        cpp_extension.FileBaton = RecordingBaton
