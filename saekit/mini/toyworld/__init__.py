"""A planted-hierarchy image world and the miniature ViT trained on it.

CI can only run miniature models, and a random-weight model has no hierarchy to find. The toy
world's truth is known instead: 30 ImageNet-1k classes under 10 mid-level and 5 top-level
WordNet synsets (``taxonomy``), drawn so that each level owns a visual factor (shape family,
style, pattern frequency) on top of nuisances (``render``), with domain shifts that keep the
labels (``shifts``), segmentation masks, an ImageNet-style export (``export``), and a small
ViT trained on it (``train``; weights shipped in ``saekit/mini/assets/toyvit``).

>>> from saekit.mini.toyworld import ToyWorld, toyvit_path
>>> images = ToyWorld(seed=0).sample(30, split="val", shift="rendition")
>>> from saekit.models import load_encoder
>>> encoder = load_encoder(toyvit_path())
"""

from __future__ import annotations

from pathlib import Path

from saekit.mini.toyworld.export import export_imagefolder, masks_root
from saekit.mini.toyworld.render import PART_NAMES, Nuisance
from saekit.mini.toyworld.shifts import SHIFTS
from saekit.mini.toyworld.taxonomy import (
    CLASS_NAMES,
    GROUP_OF_CLASS,
    GROUPS,
    LEAVES,
    MID_OF_CLASS,
    MIDS,
    N_CLASSES,
    WNIDS,
)
from saekit.mini.toyworld.world import SPLITS, ToyImage, ToyWorld, far_ood

_TOYVIT = Path(__file__).resolve().parent.parent / "assets" / "toyvit"


def toyvit_path() -> Path:
    """Folder of the shipped toy ViT (``from_pretrained``-ready, with its processor)."""
    if not (_TOYVIT / "config.json").is_file():
        raise FileNotFoundError(
            f"The toy ViT is missing from {_TOYVIT}; rebuild it with "
            "`python -m saekit.mini.toyworld.train` from the repository root."
        )
    return _TOYVIT


__all__ = [
    "CLASS_NAMES",
    "GROUPS",
    "GROUP_OF_CLASS",
    "LEAVES",
    "MIDS",
    "MID_OF_CLASS",
    "N_CLASSES",
    "Nuisance",
    "PART_NAMES",
    "SHIFTS",
    "SPLITS",
    "ToyImage",
    "ToyWorld",
    "WNIDS",
    "export_imagefolder",
    "far_ood",
    "masks_root",
    "toyvit_path",
]
