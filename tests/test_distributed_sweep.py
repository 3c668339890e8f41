"""`torchrun -m saekit sweep` with 2 CPU processes (gloo): the SAEs are dealt to the ranks and
gathered into the sweep folder one process writes; a rank's finished share is resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit.activations import extract
from saekit.cli import main
from saekit.data import ImageFolder
from saekit.distributed import Ranks
from saekit.models import load_encoder
from saekit.sae import load_sweep
from saekit.sae.commands import load_sweep_config
from saekit.sae.train import sweep_from_store

SWEEP = """
store = "{store}"
out = "{out}"
recipe = "olson2025"
epochs = 2
batch_size = 4

[grid]
layer = [0, 1]
arch = ["relu", "topk"]
expansion = [2]
l1 = [0.5]
k = [3]
"""


def _torchrun(*argv: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "saekit", *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def store(miniatures, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    encoder = load_encoder(miniatures["dinov2"])
    return extract(encoder, ImageFolder(image_folder), layers=[0, 1], out=out, progress=False)


def _sweep_file(tmp_path, store, name):
    path = tmp_path / f"{name}.toml"
    path.write_text(SWEEP.format(store=store.root, out=tmp_path / name))
    return path


def _weights(folder):
    manifest = json.loads((folder / "sweep.json").read_text())
    names = [entry["name"] for entry in manifest["saes"]]
    return manifest, {n: load_file(folder / n / "sae_weights.safetensors") for n in names}


def test_partitioned_sweep_equals_one_process_and_resumes_a_share(store, tmp_path):
    assert main(["sweep", str(_sweep_file(tmp_path, store, "single"))]) == 0
    manifest, expected = _weights(tmp_path / "single")
    assert len(expected) == 4

    # Rank 1's share (SAEs 1 and 3) finished before a crash: written as rank 1 writes it, with
    # one weight marked so the test can tell a resumed share from a retrained one.
    config = load_sweep_config(_sweep_file(tmp_path, store, "ranks"))
    share_dir = tmp_path / "ranks" / ".checkpoint" / "ranks-2" / "rank-1"
    sweep_from_store(
        store, config.specs[1::2], batch_size=4, epochs=2, seed=0, out_dir=share_dir,
        ranks=Ranks(0, 1),
    )  # fmt: skip
    marked = config.specs[1].label
    weights = load_file(share_dir / marked / "sae_weights.safetensors")
    weights["b_dec"] = weights["b_dec"] + 1.0
    save_file(weights, share_dir / marked / "sae_weights.safetensors")

    _torchrun("sweep", str(_sweep_file(tmp_path, store, "ranks")))
    got_manifest, got = _weights(tmp_path / "ranks")
    assert got_manifest["saes"] == manifest["saes"]
    assert got_manifest["settings"] == manifest["settings"]
    for name, tensors in expected.items():
        for key, value in tensors.items():
            shift = 1.0 if (name, key) == (marked, "b_dec") else 0.0
            torch.testing.assert_close(got[name][key], value + shift, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "ranks" / ".checkpoint").exists()  # shares removed once saved
    assert len(load_sweep(tmp_path / "ranks")) == 4


def test_saekit_train_under_torchrun_is_data_parallel_and_equals_one_process(store, tmp_path):
    argv = ["train", "--store", str(store.root), "--layer", "1", "--arch", "relu", "--l1", "0.5"]
    argv += ["--expansion", "2", "--batch-size", "6", "--epochs", "3"]
    assert main([*argv, "--out", str(tmp_path / "single")]) == 0
    _torchrun(*argv, "--out", str(tmp_path / "ranks"))
    expected = load_file(tmp_path / "single" / "sae_weights.safetensors")
    got = load_file(tmp_path / "ranks" / "sae_weights.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "ranks" / "training.json").read_text())["complete"]
    assert not (tmp_path / "ranks" / ".checkpoint").exists()
