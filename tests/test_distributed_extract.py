"""`torchrun -m saekit extract` with 2 CPU processes (gloo) writes the store one process
writes, byte for byte, and a rerun after losing shards of both ranks redoes only those."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saekit.cli import main

ARGS = ["--layers", "0,1", "--tokens", "both", "--batch-size", "2", "--shard-images", "2"]


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "saekit", *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".saekit.lock"
    }


@pytest.fixture(scope="module")
def single(miniatures, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "store"
    model, data = str(miniatures["dinov2"]), str(image_folder)
    assert main(["extract", "--model", model, "--data", data, "--out", str(out), *ARGS]) == 0
    return model, data, out


def test_two_ranks_write_the_single_process_store_and_resume_their_parts(single, tmp_path):
    model, data, reference = single
    out = tmp_path / "store"
    _torchrun("extract", "--model", model, "--data", data, "--out", str(out), *ARGS)
    expected = _files(reference)
    assert len([n for n in expected if n.endswith("shard.json")]) == 8  # 15 images, 2 a shard
    assert _files(out) == expected

    # Lose shards of both ranks (1 is rank 1's, 2 and 6 rank 0's) as a killed run would,
    # with the manifest not yet complete; the rerun redoes only those.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] not in (1, 2, 6)]
    manifest["complete"] = False
    del manifest["n_rows"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for index in (1, 2):
        shutil.rmtree(out / f"shard_{index:05d}")
    (out / "shard_00006").rename(out / "shard_00006.tmp")  # unfinished
    kept = (out / "shard_00003" / "L1_cls.npy").stat().st_ino
    result = _torchrun("extract", "--model", model, "--data", data, "--out", str(out), *ARGS)
    assert _files(out) == expected
    assert (out / "shard_00003" / "L1_cls.npy").stat().st_ino == kept  # not rewritten
    assert "ActivationStore(" in result.stdout  # rank 0 reports the store, once
    assert result.stdout.count("ActivationStore(") == 1
