"""Writing to disk so that a crash loses at most the unit in flight.

Every long-running writer in saekit (activation extraction, SAE training) goes through the few
helpers here, so the whole commit protocol is one place to read and one place a test can break:

* `save_array`, `write_json_atomic`: a file is written, flushed and fsync'd; JSON goes to a
  ``.tmp`` beside it and is renamed over the old one, so a reader sees the old or the new file,
  never half of one.
* `commit_dir`: a folder is filled under a temporary name and renamed into place only once
  every file in it is on disk (the rename is the commit).
* `folder_lock`: one writer per output folder. A second process gets `FolderLockedError`
  naming the first; the lock is an OS file lock, so a killed process never leaves a stale one.
* `check_writable`: an output folder is created and probed before any work starts, so a
  read-only or full folder is found in the first second, not after an hour of work.

All file-system changes the writers make go through these functions (and `make_dir`,
`remove_tree`), which is what lets the fault-injection tests break every step.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:  # POSIX: an advisory lock the OS drops when the holder dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".saekit.lock"
PROBE_PREFIX = ".saekit-probe-"


class FolderLockedError(RuntimeError):
    """Another process is writing into the same output folder."""


class OutputNotWritableError(PermissionError):
    """An output folder cannot be created or written."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (new files, renames) durable; a no-op where the OS has no
    directory fsync (Windows)."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike) -> None:
    """Create one folder (its parent must exist)."""
    os.mkdir(path)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder and everything in it."""
    shutil.rmtree(path)


def remove_file(path: str | os.PathLike) -> None:
    """Delete a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` that reaches the disk before returning."""
    with open(path, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())


def write_text_durably(path: str | os.PathLike, text: str) -> None:
    """Write a text file and fsync it."""
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file another library wrote (safetensors, SAELens) to the disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def replace_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename ``source`` over ``target`` (atomic on one file system) and make it durable."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Replace ``path`` with ``payload`` as JSON: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_text_durably(tmp, json.dumps(payload, indent=1))
    replace_durably(tmp, path)


def commit_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a fully written folder into place (the commit) and make the rename durable."""
    fsync_dir(staging)
    replace_durably(staging, final)


def check_writable(folder: str | os.PathLike, what: str = "output") -> Path:
    """Create ``folder`` (and its parents) and prove a file can be written in it.

    Raises `OutputNotWritableError` saying what to do; returns the folder.
    """
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{PROBE_PREFIX}*"):  # left by a run killed mid-probe
            with contextlib.suppress(OSError):
                os.unlink(stale)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
        try:
            os.write(fd, b"saekit")
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
    except OSError as err:
        raise OutputNotWritableError(
            f"Cannot write the {what} folder {folder}: {err.strerror or err}. Choose a writable "
            "folder (e.g. another --out) or fix its permissions / free some space, then rerun."
        ) from err
    return folder


def _describe_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` while a block writes into it.

    The lock file ``.saekit.lock`` records who holds it (pid, host, ``what``, since when) for
    the message a second writer gets. With ``fcntl`` the lock is the OS's, released even when
    the holder is killed; elsewhere the file's existence is the lock.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    note = (
        f"pid {os.getpid()} on {socket.gethostname()}, {what}, since "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}"
    )
    busy = (
        f"{folder} is being written by another saekit run ({{holder}}). Wait for it to finish "
        "or choose another output folder; two writers would corrupt it."
    )
    if fcntl is None:  # pragma: no cover - Windows
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            raise FolderLockedError(
                busy.format(holder=_describe_holder(path))
                + f" If no such run is alive, delete {path}."
            ) from None
    else:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderLockedError(busy.format(holder=_describe_holder(path))) from None
            # A holder that was releasing may have unlinked the file we opened: lock the new one.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    try:
        if os.fstat(fd).st_size:  # a killed holder's note (truncating always makes close slow)
            os.ftruncate(fd, 0)
        os.write(fd, note.encode())
        yield path
    finally:
        try:
            with contextlib.suppress(OSError):
                os.unlink(path)
        finally:
            os.close(fd)
