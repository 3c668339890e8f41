"""Chapter 00: the toy world the mini book runs on, and how the toy ViT's layers separate it.

The chapter is the same under every profile: it always shows the toy world (its planted
hierarchy, samples, shifts and the shipped toy ViT), so `ToyWorldSettings` has no paper
differences. What only this chapter needs lives here: the world described from its own
definition (`world_summary`, `hierarchy_table`), the toy ViT's training record
(`training_record`) and the per-layer linear probes (`layer_probes`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import numpy as np
import pandas as pd

from saekit.activations import Store
from saekit.analysis.probes import train_probe
from saekit.mini.toyworld import GROUPS, LEAVES, MIDS, toyvit_path
from saekit.studies.settings import StudySettings


@dataclasses.dataclass(frozen=True)
class ToyWorldSettings(StudySettings):
    """Chapter 00's parameters. The toy world is the same under every profile, so there are no
    paper differences: ``-p profile paper`` shows the same page."""

    seed: int = 0
    """Seed of the toy world drawn for the sample figure."""
    images_per_class: int = 20
    """Validation images per class whose activations the figures and probes use."""
    encoder: str = "toyvit"
    """Encoder whose layers are shown: the toy ViT trained on the toy world."""
    device: str | None = None
    """Where the probes train; None: "cuda" when available, else "cpu"."""

    PAPER: ClassVar[dict[str, object]] = {}


def world_summary() -> str:
    """The toy world and the toy ViT in one paragraph, read from their definitions (the class
    hierarchy and the shipped ViT's config), so the page says what the code holds."""
    config = json.loads((toyvit_path() / "config.json").read_text())
    return (
        f"The toy world has **{len(LEAVES)} classes** (real ImageNet-1k synsets) under "
        f"**{len(MIDS)} mid-level** and **{len(GROUPS)} top-level** WordNet hypernyms. The toy "
        f"ViT has {config['num_hidden_layers']} layers of width {config['hidden_size']} and "
        f"reads {config['image_size']}×{config['image_size']} images in "
        f"{config['patch_size']}×{config['patch_size']} patches."
    )


def hierarchy_table() -> pd.DataFrame:
    """The planted hierarchy: one row per (group, mid-level synset), its classes joined."""
    rows = [
        {"group": GROUPS[leaf.group].name, "mid": MIDS[leaf.mid].name, "class": leaf.name}
        for leaf in LEAVES
    ]
    return pd.DataFrame(rows).pivot_table(index=["group", "mid"], values="class", aggfunc=", ".join)


def training_record() -> pd.DataFrame:
    """The toy ViT's recorded accuracy (class and group), in-domain and under each shift."""
    record = json.loads((toyvit_path() / "training.json").read_text())
    return pd.DataFrame(record["results"]).T.rename(columns=lambda c: c.replace("_", " "))


def layer_probes(train: Store, val: Store, device: str = "cpu") -> pd.DataFrame:
    """Accuracy of a linear probe per layer (rows) for the class and the planted top-level group
    (columns), trained on ``train``'s CLS activations and scored on ``val``'s."""
    group_of_C = np.array([leaf.group for leaf in LEAVES])
    targets = {"class": lambda y: y, "group": lambda y: group_of_C[y]}
    rows = []
    for layer in val.layers:
        for name, target in targets.items():
            probe = train_probe(np.asarray(train.cls(layer)), target(train.labels), device=device)
            accuracy = probe.accuracy(np.asarray(val.cls(layer)), target(val.labels))
            rows.append({"layer": layer, "target": name, "accuracy": accuracy})
    return pd.DataFrame(rows).pivot(index="layer", columns="target", values="accuracy")
