"""The run-folder lock: one run at a time in a run folder.

Two runs in one folder would write the same checkpoints and logs. A run holds an exclusive
``flock`` on ``run_dir/.lock`` while it lives; the file says who holds it (pid, host, start time),
for the message the next run prints.

Why ``flock``: the kernel drops the lock when the holding process dies, however it dies, so a lock
left by a crashed run is no lock at all and nothing needs to guess from pids whether it is stale.
The file stays after the run; only the lock on it counts. On a file system without locks (some
network mounts) the run goes on, with a warning that it is not protected.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import warnings
from pathlib import Path

from .storage import RunFolderError

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked
    fcntl = None

LOCK_FILE = ".lock"
# A new run retries this long before calling the folder busy: another start's lock_holder probe holds a
# shared lock for a moment, which must not read as a run.
ACQUIRE_PATIENCE_S = 0.5
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # the file system does not support flock


class RunFolderInUse(RunFolderError):
    """Another live process runs in this run folder; the message names it (pid, host, since when)."""


def _in_use(run_dir: Path, holder: str) -> RunFolderInUse:
    return RunFolderInUse(f"run folder {run_dir} is in use by another run ({holder}); wait for it to end or stop "
                          "it, or choose another --run-dir")


def _holder_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1024).decode("utf-8", "replace").strip()
    return text or "a process that has not written its name yet"


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """Who holds the lock of ``run_dir`` now ("pid 123 on host, since ..."), or None when no live process
    does. Reads only: creates nothing."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # unreadable: the lock itself will say more when a run tries to take it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(fd)
        except OSError as e:
            if e.errno in _NO_LOCKS:
                return None
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_unlocked(run_dir: str | os.PathLike) -> None:
    """Raise `RunFolderInUse` when a live run holds the lock of ``run_dir``."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise _in_use(Path(run_dir), holder)


class RunLock:
    """An exclusive lock on ``run_dir/.lock``, held from `acquire` to `release` (or the process's end).

    Under ``accelerate launch`` only the main process takes it: the other processes belong to the same run.
    """

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self._fd = run_dir, fd

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> RunLock:
        """Take the lock of ``run_dir`` (created if needed) and write this process's pid and host into it.

        Raises:
            RunFolderInUse: a live process holds it.
        """
        run_dir = Path(run_dir)
        if fcntl is None:
            return cls(run_dir, None)
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + ACQUIRE_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = _holder_text(fd)
                os.close(fd)
                raise _in_use(run_dir, holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_LOCKS:
                    raise
                warnings.warn(f"{run_dir} is on a file system without file locks: a second run started in this "
                              "folder would not be stopped", stacklevel=2)
                return cls(run_dir, None)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode(), 0)
        return cls(run_dir, fd)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (a no-op when not held). The file stays, emptied."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # before unlocking: the next holder writes its own name
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
