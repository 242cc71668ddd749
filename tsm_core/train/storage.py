"""Failed writes in words: a full disk, a read-only file system or no permission.

Every writer a run uses reports these differently:

* Python's ``open``/``write``, PIL (images) and ``json`` raise ``OSError`` with an ``errno``;
* safetensors raises ``SafetensorError("Error while serializing: I/O error: No space left on device
  (os error 28)")``: the errno is only in the message;
* ``torch.save`` reports a full disk as ``RuntimeError("[enforce fail at inline_container.cc] ...")``
  with no errno at all.

`describe_write_failure` reads the errno where there is one (attribute, then message) and lets it
decide; only an error without one is put down to the disk by looking at the folder (read-only flag,
free space, write permission). `check_output_path` lets a command-line tool find an unwritable output
before it does hours of work.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

# Below this much free space, a failed write that carries no errno is put down to a full disk.
LOW_SPACE_BYTES = 64 * 2**20
WRITE_PROBE_PREFIX = ".tmp_write_probe_"  # a ".tmp_" name: a killed probe is cleaned like other temp files

_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")  # how Rust's io::Error (safetensors) prints an errno
_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM)


class RunFolderError(OSError):
    """The run folder cannot be written (read-only, no permission, no space left); the message says
    which, and how to go on. The CLIs print it as one ``error:`` line."""


def write_errno(error: BaseException) -> int | None:
    """The errno behind a failed write: the exception's own, one printed in its message (safetensors),
    or that of the exception it was raised from; None when there is none (torch.save's RuntimeError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "errno", None)
        if isinstance(code, int):
            return code
        found = _OS_ERROR_IN_MESSAGE.search(str(error))
        if found:
            return int(found.group(1))
        error = error.__cause__ or error.__context__
    return None


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent: where to ask the file system about ``folder``."""
    return folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))


def _free_bytes(probe: Path) -> int | None:
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _mounted_read_only(probe: Path) -> bool:
    try:
        return bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
        return False


def describe_write_failure(error: BaseException, folder: Path) -> str | None:
    """Words for a failed write into ``folder``: a full disk, a read-only file system or no permission;
    None when it is none of those (a bug: keep the traceback).

    The errno decides when there is one (ENOSPC/EDQUOT: full, EROFS: read-only, EACCES/EPERM: no
    permission; any other errno: not the disk's state). Only an ``OSError``/``RuntimeError``/
    ``SafetensorError`` without an errno is judged by the folder: a read-only mount, less than
    `LOW_SPACE_BYTES` free, or no write permission.
    """
    folder = Path(folder)
    probe = _existing(folder)
    code = write_errno(error)
    if code is None:
        if not _may_be_a_write_failure(error):
            return None
        if _mounted_read_only(probe):
            code = errno.EROFS
        else:
            free = _free_bytes(probe)
            if free is not None and free < LOW_SPACE_BYTES:
                code = errno.ENOSPC
            elif not os.access(probe, os.W_OK):
                code = errno.EACCES
    if code in _FULL:
        free = _free_bytes(probe)
        room = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        return f"no space left on the device of {folder}{room}"
    if code == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if code in _DENIED:
        return f"{folder} is not writable (permission denied)"
    return None


def _may_be_a_write_failure(error: BaseException) -> bool:
    # torch.save's RuntimeError and safetensors' error carry no errno when the disk fills; a ValueError
    # or KeyError never comes from the disk, whatever the free space.
    return isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError"


def probe_write(folder: Path, size: int = 4096) -> None:
    """Create ``folder`` and write (then delete) one small file there; raises the ``OSError`` of the
    first thing that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{WRITE_PROBE_PREFIX}{os.getpid()}"
    probe.write_bytes(b"\0" * size)
    probe.unlink()


def check_output_path(path: str | os.PathLike, flag: str, directory: bool = False) -> None:
    """Make sure a tool can write its output ``path`` (a file, or a folder with ``directory``), before the
    work that produces it.

    Creates the missing parent folders (the tool would create them anyway) and writes one small
    probe file next to the output.

    Raises:
        ValueError: ``path`` cannot be written; the message names ``flag`` (e.g. ``--json``), the path and
            why (full, read-only, no permission, or the OS's words).
    """
    path = Path(path)
    folder = path if directory else path.parent
    try:
        blocking = next((p for p in path.parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{blocking} is a file, not a folder", str(path))
        if path.is_dir() and not directory:
            raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        probe_write(folder)
    except OSError as e:
        why = describe_write_failure(e, folder) or (e.strerror or str(e))
        raise ValueError(f"{flag} {path} cannot be written: {why}; choose another path") from e
