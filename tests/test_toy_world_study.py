"""Chapter 00's study code (saekit.studies.toy_world): profile-independent settings, the world
described from its definition, per-layer probes on planted activations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from saekit.mini.toyworld import GROUPS, LEAVES, MIDS, N_CLASSES, toyvit_path
from saekit.runner import chapter_parameters
from saekit.studies import toy_world as study

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "00_toy_world.py"


def test_settings_are_the_chapters_parameters_and_the_same_under_every_profile():
    declared = chapter_parameters(NOTEBOOK)
    assert list(declared) == [f.name for f in dataclasses.fields(study.ToyWorldSettings)]
    mini = study.ToyWorldSettings.for_profile("mini", device="cpu")
    paper = study.ToyWorldSettings.for_profile("paper", device="cpu")
    assert paper == mini.replace(profile="paper")
    # The notebook never asks for a paper-only folder parameter.
    assert not [name for name in declared if name.startswith("imagenet_")]


def test_world_summary_and_hierarchy_come_from_the_definitions():
    config = json.loads((toyvit_path() / "config.json").read_text())
    summary = study.world_summary()
    assert f"**{len(LEAVES)} classes**" in summary and f"**{len(MIDS)} mid-level**" in summary
    assert f"**{len(GROUPS)} top-level**" in summary
    assert f"{config['num_hidden_layers']} layers of width {config['hidden_size']}" in summary
    table = study.hierarchy_table()
    assert len(table) == len(MIDS)
    assert sum(len(classes.split(", ")) for classes in table["class"]) == N_CLASSES
    record = study.training_record()
    assert "val" in record.index and {"accuracy", "group accuracy"} <= set(record.columns)


@dataclasses.dataclass
class PlantedStore:
    """A two-layer store: layer 0 is noise, layer 1 a one-hot code of the planted group."""

    labels: np.ndarray
    seed: int

    @property
    def layers(self) -> list[int]:
        return [0, 1]

    def cls(self, layer: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        noise_ND = rng.normal(size=(len(self.labels), 8)).astype(np.float32)
        if layer == 0:
            return noise_ND
        group_N = np.array([LEAVES[c].group for c in self.labels])
        return np.eye(len(GROUPS), 8, dtype=np.float32)[group_N] * 5 + 0.1 * noise_ND


def test_layer_probes_find_the_planted_layer():
    labels_N = np.repeat(np.arange(N_CLASSES), 6)
    accuracy = study.layer_probes(
        PlantedStore(labels_N, seed=0), PlantedStore(labels_N, seed=1), "cpu"
    )
    assert accuracy.index.tolist() == [0, 1] and accuracy.columns.tolist() == ["class", "group"]
    assert accuracy.loc[1, "group"] == 1.0  # the group is linearly readable at layer 1
    assert accuracy.loc[0, "group"] < 0.5  # held-out noise: near the 1 in 5 of chance
    # Layer 1 knows the group only: within a group the class is a guess among its members.
    assert accuracy.loc[1, "class"] == pytest.approx(len(GROUPS) / N_CLASSES, abs=0.1)
