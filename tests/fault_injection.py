"""Break saekit's writers at any file-system step, to prove every interrupted run resumes.

Every change saekit's long-running writers make on disk goes through `saekit.durable` (and, for
SAE files, safetensors' ``save_file`` and SAELens's save). `FaultInjector` swaps the modules
those helpers call (``os``, ``shutil``, ``numpy``, ``open``, ``save_file``, ``save_sae``) for
proxies that count each mutating call and fail the n-th one:

* ``Crash`` (a BaseException nothing in saekit catches) stands for a kill: the run stops right
  there, half-written files included (a failing write writes half its bytes first);
* ``OSError(ENOSPC)`` stands for a full disk.

Not a test module: the fault suites (tests/test_faults_*.py) import it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import saekit.durable
import saekit.sae.checkpoint
import saekit.sae.train


class Crash(BaseException):
    """A simulated kill (not an Exception: nothing in saekit may catch and survive it)."""


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected)")


#: os functions that change the disk (or durability); each call is one step.
OS_STEPS = ("mkdir", "replace", "rename", "fsync", "unlink", "rmdir", "write", "ftruncate")


class _Proxy:
    """A module stand-in whose listed functions count as steps; the rest pass through."""

    def __init__(self, module: Any, names: tuple[str, ...], injector: FaultInjector) -> None:
        self._module, self._names, self._injector = module, names, injector

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._module, name)
        if name not in self._names:
            return target
        return self._injector.wrap(f"{self._module.__name__}.{name}", target)


class _FaultyFile(io.IOBase):
    """A file opened for writing whose every ``write`` is a step; a failing one writes half."""

    def __init__(self, handle: Any, injector: FaultInjector, path: str) -> None:
        self._handle, self._injector, self._path = handle, injector, path

    def write(self, data: Any) -> int:
        injector = self._injector
        if injector.next_fails():
            view = memoryview(data) if not isinstance(data, str) else data
            self._handle.write(view[: len(view) // 2])
            self._handle.flush()
            injector.fail(f"write {Path(self._path).name}")
        injector.steps.append(f"write {Path(self._path).name}")
        return self._handle.write(data)

    def flush(self) -> None:
        if not self._handle.closed:
            self._handle.flush()

    def fileno(self) -> int:
        return self._handle.fileno()

    def close(self) -> None:
        super().close()  # flushes first
        self._handle.close()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._handle.tell()


class FaultInjector:
    """Count saekit's file-system steps; with ``fail_at=n`` the n-th step (1-based) fails.

    ``error`` builds the exception (default `Crash`). After a run, ``steps`` lists every step
    seen (what the failure tables name) and ``failed`` the one that failed.
    """

    def __init__(self, fail_at: int | None = None, error: Callable[[], BaseException] = Crash):
        self.fail_at, self.error = fail_at, error
        self.steps: list[str] = []
        self.failed: str | None = None

    def next_fails(self) -> bool:
        return self.fail_at is not None and len(self.steps) + 1 == self.fail_at

    def fail(self, name: str) -> None:
        self.steps.append(name)
        self.failed = name
        raise self.error()

    def step(self, name: str, before_failing: Callable[[], Any] | None = None) -> None:
        if self.next_fails():
            if before_failing is not None:
                before_failing()
            self.fail(name)
        self.steps.append(name)

    def wrap(
        self,
        name: str,
        target: Callable[..., Any],
        partial: Callable[..., Any] | None = None,
    ) -> Callable[..., Any]:
        """``target`` as a step; ``partial(*args)`` leaves half-done debris when it fails."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.step(name, (lambda: partial(*args)) if partial is not None else None)
            # fsync is a step, but a real one costs ~10 ms: what a kill in-process can show is
            # the order of steps, not what the disk's cache would lose.
            return None if name == "os.fsync" else target(*args, **kwargs)

        return wrapped

    def _open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 - wrapped and returned
        if not any(flag in mode for flag in "wax+"):
            return handle
        self.step(f"open {Path(file).name}")
        return _FaultyFile(handle, self, str(file))

    def install(self, monkeypatch: Any) -> FaultInjector:
        """Route saekit's writers through this injector for the rest of the test."""
        durable = saekit.durable
        monkeypatch.setattr(durable, "os", _Proxy(os, OS_STEPS, self))
        monkeypatch.setattr(durable, "shutil", _Proxy(shutil, ("rmtree",), self))
        monkeypatch.setattr(durable, "np", _Proxy(np, ("save",), self))
        monkeypatch.setattr(durable, "open", self._open, raising=False)
        checkpoint, train = saekit.sae.checkpoint, saekit.sae.train
        monkeypatch.setattr(
            checkpoint, "save_file", self.wrap("save_file", checkpoint.save_file, _half_file)
        )
        monkeypatch.setattr(train, "save_sae", self.wrap("save_sae", train.save_sae, _half_sae))
        return self


def _half_file(tensors: Any, path: str, *args: Any, **kwargs: Any) -> None:
    Path(path).write_bytes(b"\x00" * 7)  # a truncated safetensors file


def _half_sae(sae: Any, path: Any) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "cfg.json").write_text('{"d_in": ')  # SAELens killed mid-save


def count_steps(monkeypatch: Any, run: Callable[[], Any]) -> list[str]:
    """Every file-system step ``run`` takes, in order (nothing fails)."""
    injector = FaultInjector().install(monkeypatch)
    run()
    monkeypatch.undo()
    return injector.steps


def folder_bytes(root: Path) -> dict[str, str]:
    """{relative path: sha256 of its bytes} for every file under ``root``."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
