"""Extraction interrupted at every file-system step resumes to a byte-identical store.

`fault_injection.FaultInjector` fails the n-th step saekit takes on disk (mkdir, each write,
fsync, rename, manifest replace, lock, cleanup), for every n of a whole extraction; the run is
then repeated without faults and its folder must equal, file for file and byte for byte, the
folder of a run never interrupted. A kill (`Crash`) and a full disk (ENOSPC) are both tried, and
a second kill during the resume. The reported failure (a kill between a shard's rename and the
manifest update) and two extractions into one folder have their own tests.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading

import pytest
from conftest import write_image_folder
from fault_injection import Crash, FaultInjector, count_steps, disk_full, folder_bytes

from saekit.activations import FolderLockedError, StoreWriteError, extract
from saekit.data import ImageFolder
from saekit.durable import LOCK_FILE, folder_lock
from saekit.models import load_encoder

# Two shards of two images (one unreadable, so the skip list is written too), CLS and patches.
SETTINGS = dict(layers=[1], tokens="both", batch_size=2, shard_images=2, progress=False)


@pytest.fixture(scope="module")
def encoder(miniatures):
    return load_encoder(miniatures["vit"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("fault-images") / "data", per_class=1)
    (root / "n01443537" / "broken.png").write_bytes(b"not an image")  # a skip to record too
    return ImageFolder(root)


@pytest.fixture(scope="module")
def reference(encoder, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "store"
    extract(encoder, dataset, out=out, **SETTINGS)
    return folder_bytes(out)


@pytest.fixture(scope="module")
def steps(encoder, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("count") / "store"
    with pytest.MonkeyPatch.context() as monkeypatch:
        return count_steps(monkeypatch, lambda: extract(encoder, dataset, out=out, **SETTINGS))


def test_the_reference_store_is_what_the_faults_must_reproduce(reference, steps):
    assert "manifest.json" in reference and "shard_00001/L1_patch.npy" in reference
    # every kind of step is exercised: writes, fsyncs, renames of shards and of the manifest
    kinds = {step.split()[0] for step in steps}
    assert {"os.mkdir", "os.replace", "os.fsync", "numpy.save", "open", "write"} <= kinds
    assert len(steps) > 50


#: Steps whose failure a finished run may survive: removing the lock file or a probe file.
TOLERATED = {"os.unlink"}


@pytest.mark.parametrize("error", [Crash, disk_full], ids=["kill", "disk-full"])
def test_a_fault_at_every_step_resumes_to_the_identical_store(
    encoder, dataset, reference, steps, error, tmp_path, monkeypatch
):
    failures, survived = [], []
    for n in range(1, len(steps) + 1):
        out = tmp_path / f"run{n}"
        injector = FaultInjector(fail_at=n, error=error).install(monkeypatch)
        try:
            extract(encoder, dataset, out=out, **SETTINGS)
            survived.append(injector.failed)
        except (Crash, OSError):
            pass
        monkeypatch.undo()
        store = extract(encoder, dataset, out=out, **SETTINGS)  # the rerun resumes
        if folder_bytes(out) != reference or store.n_rows != 3:
            failures.append((n, injector.failed))
    assert not failures, f"runs failed at these steps did not resume identically: {failures}"
    assert set(survived) <= TOLERATED, survived


def test_a_second_kill_during_the_resume_still_resumes(
    encoder, dataset, reference, steps, tmp_path, monkeypatch
):
    # first kill: right after shard 0's rename, before the manifest knows it; then a kill at
    # every step of the resume, then a clean rerun
    first = [i + 1 for i, s in enumerate(steps) if s == "os.replace"][2] + 1
    for second in range(1, len(steps) + 1):
        out = tmp_path / f"run{second}"
        FaultInjector(fail_at=first).install(monkeypatch)
        with pytest.raises(Crash):
            extract(encoder, dataset, out=out, **SETTINGS)
        monkeypatch.undo()
        injector = FaultInjector(fail_at=second).install(monkeypatch)
        try:
            extract(encoder, dataset, out=out, **SETTINGS)
        except Crash:
            pass
        monkeypatch.undo()
        extract(encoder, dataset, out=out, **SETTINGS)
        assert folder_bytes(out) == reference, (second, injector.failed)
        if injector.failed is None:  # the resume finished before step `second`
            break
    assert injector.failed is None


def test_kill_between_shard_rename_and_manifest_update_resumes(
    encoder, dataset, reference, steps, tmp_path, monkeypatch
):
    """The reported bug: this state re-extracted the shard, then failed forever renaming
    ``shard_00000.tmp`` onto the existing ``shard_00000`` (Errno 39, Directory not empty)."""
    first_commit = steps.index("os.replace", steps.index("os.mkdir")) + 1
    fsync_after = first_commit + 1  # fsync of the parent, right after the rename
    FaultInjector(fail_at=fsync_after).install(monkeypatch)
    with pytest.raises(Crash):
        extract(encoder, dataset, out=tmp_path / "s", **SETTINGS)
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["shards"] == [] and (tmp_path / "s" / "shard_00000").is_dir()
    calls = []
    original = encoder.forward_pixels
    monkeypatch.setattr(
        encoder, "forward_pixels", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    extract(encoder, dataset, out=tmp_path / "fresh", **SETTINGS)
    fresh = len(calls)
    extract(encoder, dataset, out=tmp_path / "s", **SETTINGS)
    # the committed shard 0 (one forward pass) was adopted, not extracted again
    assert len(calls) - fresh == fresh - 1
    assert folder_bytes(tmp_path / "s") == reference


def test_full_disk_says_what_to_do_and_keeps_finished_shards(
    encoder, dataset, reference, steps, tmp_path, monkeypatch
):
    second_shard = [i + 1 for i, s in enumerate(steps) if s == "os.mkdir"][1]
    FaultInjector(fail_at=second_shard + 1, error=disk_full).install(monkeypatch)  # its 1st file
    with pytest.raises(StoreWriteError, match="Writing shard 1 .*No space left.* rerun"):
        extract(encoder, dataset, out=tmp_path / "s", **SETTINGS)
    monkeypatch.undo()
    assert len(json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"]) == 1
    extract(encoder, dataset, out=tmp_path / "s", **SETTINGS)
    assert folder_bytes(tmp_path / "s") == reference


class _Gate:
    """A dataset whose image 3 waits for a signal (so an extraction can be caught running)."""

    def __init__(self, dataset):
        self.dataset, self.started, self.release = dataset, threading.Event(), threading.Event()
        self.labels, self.image_ids = dataset.labels, dataset.image_ids
        self.class_names, self.wnids = dataset.class_names, dataset.wnids

    def __len__(self):
        return len(self.dataset)

    def load(self, index):
        if index == 3:
            self.started.set()
            self.release.wait(timeout=30)
        return self.dataset.load(index)


def test_two_extractions_into_one_folder_the_second_is_refused(
    encoder, dataset, reference, tmp_path
):
    gated = _Gate(dataset)
    out = tmp_path / "s"
    first = threading.Thread(target=extract, args=(encoder, gated), kwargs={"out": out, **SETTINGS})
    first.start()
    assert gated.started.wait(timeout=30)
    try:
        with pytest.raises(FolderLockedError, match=rf"pid {os.getpid()} .* saekit extract"):
            extract(encoder, dataset, out=out, **SETTINGS)
    finally:
        gated.release.set()
        first.join()
    assert not (out / LOCK_FILE).exists() and folder_bytes(out) == reference
    # once the first is done, the same command returns its store
    assert extract(encoder, dataset, out=out, **SETTINGS).n_rows == 3


def _hold_lock_then_die(folder, ready):
    with folder_lock(folder, "a run that will be killed"):
        ready.set()
        threading.Event().wait(60)


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    holder = context.Process(target=_hold_lock_then_die, args=(tmp_path, ready))
    holder.start()
    assert ready.wait(timeout=30)
    with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
        with folder_lock(tmp_path, "second"):
            pass
    holder.kill()  # SIGKILL: no cleanup runs, the lock file stays on disk
    holder.join()
    assert (tmp_path / LOCK_FILE).exists()
    with folder_lock(tmp_path, "after the kill"):  # the OS released the dead holder's lock
        pass
