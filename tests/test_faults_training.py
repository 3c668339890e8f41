"""SAE training interrupted at every file-system step resumes to byte-identical SAE folders.

The same method as tests/test_faults_store.py (`fault_injection.FaultInjector`): a sweep into an
output folder and ``saekit train``'s single-SAE folder are failed at each step they take on disk
(claiming the folder, each checkpoint, each SAE's save and rename, the manifest, the cleanup),
then rerun; the folder must equal, byte for byte, that of an uninterrupted run. Also: a rerun
with other settings is refused unless ``overwrite``, and so is a checkpoint of another data seed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fault_injection import Crash, FaultInjector, count_steps, disk_full, folder_bytes

from saekit.durable import FolderLockedError, folder_lock
from saekit.sae import SAESpec, get_recipe, load_sweep
from saekit.sae.checkpoint import CHECKPOINT_FILE, CheckpointMismatchError
from saekit.sae.train import OutputExistsError, sweep_from_store, train_to_folder

RECIPE = get_recipe("olson2025", lr=1e-3, epochs=2, batch_size=20)
SPECS = [
    SAESpec(arch="relu", layer=1, expansion=2, l1=0.5, recipe=RECIPE),
    SAESpec(arch="topk", layer=2, expansion=2, k=2, recipe=RECIPE),
]
TRAIN = dict(checkpoint_every=2, progress=False)


class TinyStore:
    """The store contract in memory: two layers of 60 CLS rows, with a manifest identity."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._cls = {ly: rng.normal(size=(60, 8)).astype(np.float32) for ly in (1, 2)}
        identity = {"model": {"weights": f"w{seed}"}, "layers": [1, 2], "dataset": "d"}
        self.manifest = {"model": "tiny", "layers": [1, 2], "d_model": 8, "identity": identity}
        self.root = "memory"

    def cls(self, layer):
        return self._cls[layer]

    def batches(self, layer, batch_size, *, tokens="cls", seed=0, epoch=0):
        layers = layer if isinstance(layer, list) else [layer]
        perm = np.random.default_rng([seed, epoch]).permutation(60)
        for i in range(0, 60, batch_size):
            rows = {ly: torch.from_numpy(self._cls[ly][perm[i : i + batch_size]]) for ly in layers}
            yield rows if isinstance(layer, list) else rows[layer]


def _sweep(out, **kwargs):
    return sweep_from_store(TinyStore(), SPECS, out_dir=out, **TRAIN, **kwargs)


def _train(out, **kwargs):
    return train_to_folder(TinyStore(), SPECS[0], out, **TRAIN, **kwargs)


RUNS = {"sweep": _sweep, "train": _train}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory):
    """(name, runner, reference folder bytes, steps of an uninterrupted run)."""
    runner = RUNS[request.param]
    out = tmp_path_factory.mktemp("reference") / "out"
    runner(out)
    reference = folder_bytes(out)
    with pytest.MonkeyPatch.context() as monkeypatch:
        steps = count_steps(monkeypatch, lambda: runner(tmp_path_factory.mktemp("count") / "o"))
    return request.param, runner, reference, steps


def test_the_reference_run_writes_every_kind_of_step(run):
    name, _, reference, steps = run
    kinds = {step.split()[0] for step in steps}
    assert {"save_file", "save_sae", "os.replace", "os.fsync", "os.unlink"} <= kinds
    assert sum(s == "save_file" for s in steps) == 3  # checkpoints at steps 2 and 4, and the end
    if name == "sweep":
        assert set(reference) >= {"sweep.json", "layer01-relu-x2-l1_0.5-olson2025/cfg.json"}
    else:
        assert set(reference) >= {"training.json", "cfg.json", "sae_weights.safetensors"}


@pytest.mark.parametrize("error", [Crash, disk_full], ids=["kill", "disk-full"])
def test_a_fault_at_every_step_resumes_to_identical_saes(run, error, tmp_path, monkeypatch):
    name, runner, reference, steps = run
    failures = []
    for n in range(1, len(steps) + 1):
        out = tmp_path / f"run{n}"
        injector = FaultInjector(fail_at=n, error=error).install(monkeypatch)
        try:
            runner(out)
        except (Crash, OSError):
            pass
        monkeypatch.undo()
        runner(out)
        if folder_bytes(out) != reference:
            failures.append((n, injector.failed))
    assert not failures, f"{name} runs failed at these steps did not resume identically: {failures}"


def test_rerunning_a_finished_sweep_loads_it_and_other_settings_are_refused(tmp_path):
    first = _sweep(tmp_path / "out")
    stamp = (tmp_path / "out" / "sweep.json").stat().st_mtime_ns
    again = _sweep(tmp_path / "out")  # loaded, not retrained
    assert (tmp_path / "out" / "sweep.json").stat().st_mtime_ns == stamp
    assert torch.equal(again[1].W_dec, first[1].W_dec)
    with pytest.raises(OutputExistsError, match=r"data_seed: 0 there, 1 now.*--overwrite"):
        _sweep(tmp_path / "out", seed=1)
    lam = [SAESpec(arch="relu", layer=1, expansion=2, l1=5.0, recipe=RECIPE)]
    with pytest.raises(OutputExistsError, match="the SAEs"):
        sweep_from_store(TinyStore(), lam, out_dir=tmp_path / "out", **TRAIN)
    with pytest.raises(OutputExistsError, match="batch_size: 20 there, 30 now"):
        _sweep(tmp_path / "out", batch_size=30)
    with pytest.raises(OutputExistsError, match=r"data \(another store\)"):
        sweep_from_store(TinyStore(seed=1), SPECS, out_dir=tmp_path / "out", **TRAIN)
    # --overwrite replaces the old SAEs (and only them)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    sweep_from_store(TinyStore(), lam, out_dir=tmp_path / "out", overwrite=True, **TRAIN)
    assert sorted(load_sweep(tmp_path / "out")) == ["layer01-relu-x2-l1_5-olson2025"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "layer01-relu-x2-l1_5-olson2025",
        "notes.txt",
        "sweep.json",
    ]


def test_a_folder_of_other_files_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").write_text("precious")
    with pytest.raises(OutputExistsError, match=r"not empty \(results.csv\)"):
        _train(tmp_path / "out")
    sae, trained = _train(tmp_path / "out", overwrite=True)
    assert trained and (tmp_path / "out" / "results.csv").read_text() == "precious"
    again, trained = _train(tmp_path / "out")
    assert not trained and torch.equal(again.W_dec, sae.W_dec)
    with pytest.raises(OutputExistsError, match="epochs: 2 there, 3 now"):
        _train(tmp_path / "out", epochs=3)


def test_a_checkpoint_of_another_data_seed_is_not_resumed(tmp_path, monkeypatch):
    """The reported bug: a checkpoint resumed under another --data-seed and recorded it."""
    steps = count_steps(monkeypatch, lambda: _sweep(tmp_path / "count"))
    FaultInjector(fail_at=steps.index("save_sae") + 1).install(monkeypatch)
    with pytest.raises(Crash):
        _sweep(tmp_path / "out")
    monkeypatch.undo()
    assert (tmp_path / "out" / ".checkpoint" / CHECKPOINT_FILE).exists()
    # the folder's manifest already names the first seed ...
    with pytest.raises(OutputExistsError, match="data_seed: 0 there, 1 now"):
        _sweep(tmp_path / "out", seed=1)
    # ... and the checkpoint itself refuses another seed, whoever asks
    (tmp_path / "out" / "sweep.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="data_seed: checkpoint 0, this run 1"):
        _sweep(tmp_path / "out", seed=1)


def test_the_output_folder_is_locked_and_checked_before_training(tmp_path, monkeypatch):
    with folder_lock(tmp_path / "out", "another sweep"):
        with pytest.raises(FolderLockedError, match="another sweep"):
            _sweep(tmp_path / "out")
    manifest = tmp_path / "out" / "sweep.json"
    assert not manifest.exists()
    _sweep(tmp_path / "out")
    assert json.loads(manifest.read_text())["complete"] is True
