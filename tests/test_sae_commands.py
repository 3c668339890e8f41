"""The train and sweep subcommands: TOML parsing and end-to-end runs on an in-memory store."""

import json

import numpy as np
import pytest
import torch

from saekit.sae import commands, load_sae, load_sweep

SWEEP_TOML = """
store = "unused-by-the-fake"
out = "{out}"
recipe = "olson2025"
epochs = 1
batch_size = 40

[recipe_overrides]
lr = 1e-3

[grid]
layer = [1, 4]
arch = ["relu", "topk"]
expansion = [2]
l1 = [0.5, 10.0]
k = [3]

[[sae]]
layer = 4
arch = "gated"
l1 = 5.0
expansion = 2
"""


class TinyStore:
    def __init__(self):
        rng = np.random.default_rng(0)
        self._cls = {layer: rng.normal(size=(120, 8)).astype(np.float32) for layer in (1, 4)}
        self.manifest = {"model": "tiny", "layers": [1, 4], "d_model": 8, "n_rows": 120}

    def cls(self, layer):
        return self._cls[layer]

    def batches(self, layer, batch_size, *, tokens="cls", seed=0, epoch=0):
        perm = np.random.default_rng([seed, epoch]).permutation(120)
        layers = layer if isinstance(layer, list) else [layer]
        for i in range(0, 120, batch_size):
            rows = {ly: torch.from_numpy(self._cls[ly][perm[i : i + batch_size]]) for ly in layers}
            yield rows if isinstance(layer, list) else rows[layer]


def _parser():
    """The real ``saekit`` parser: the lead's cli.py, which calls ``commands.register``."""
    from saekit.cli import build_parser

    return build_parser()


def test_sweep_file_expands_the_grid(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_TOML.format(out=tmp_path / "out"))
    cfg = commands.load_sweep_config(path)
    # 2 layers × (2 λ for relu + 1 k for topk) + 1 explicit gated
    assert len(cfg.specs) == 7
    labels = sorted(s.label for s in cfg.specs)
    assert "layer01-relu-x2-l1_0.5-olson2025" in labels
    assert "layer04-topk-x2-k3-olson2025" in labels
    assert "layer04-gated-x2-l1_5-olson2025" in labels
    assert all(s.recipe.lr == 1e-3 for s in cfg.specs)
    assert (cfg.epochs, cfg.batch_size) == (1, 40)


def test_sweep_file_errors_name_the_bad_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('store = "s"\nout = "o"\n[grid]\nlayers = [1]\n')
    with pytest.raises(ValueError, match="unknown keys \\['layers'\\]"):
        commands.load_sweep_config(path)
    path.write_text('out = "o"\n[grid]\nlayer = [1]\n')
    with pytest.raises(ValueError, match="missing `store"):
        commands.load_sweep_config(path)


def test_saekit_sweep_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "_open_store", lambda path: TinyStore())
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_TOML.format(out=tmp_path / "out"))
    args = _parser().parse_args(["sweep", str(path)])
    assert args.handler(args) == 0
    saes = load_sweep(tmp_path / "out")
    assert len(saes) == 7
    assert (
        json.loads((tmp_path / "out" / "sweep.json").read_text())["saes"][0]["spec"]["layer"] == 1
    )
    topk = saes["layer04-topk-x2-k3-olson2025"]
    codes = topk.encode(torch.from_numpy(TinyStore().cls(4)))
    assert ((codes != 0).sum(-1) <= 3).all() and topk.cfg.d_in == 8


def test_saekit_train_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "_open_store", lambda path: TinyStore())
    out = tmp_path / "sae"
    argv = [
        "train",
        "--store",
        "x",
        "--layer",
        "4",
        "--arch",
        "topk",
        "--k",
        "2",
        "--expansion",
        "2",
    ]
    argv += ["--recipe", "stevens2025", "--batch-size", "30", "--epochs", "2", "--out", str(out)]
    args = _parser().parse_args(argv)
    assert args.handler(args) == 0
    sae = load_sae(out)
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.d_sae == 16 and sae.cfg.k == 2
    info = sae.cfg.metadata.saekit
    assert info["input_normalization"]["folded"] and info["steps"] == 8
    assert not (out / ".checkpoint" / "checkpoint.safetensors").exists()
