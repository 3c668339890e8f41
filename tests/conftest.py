"""Shared fixtures: miniature encoders and tiny image folders, made once per session."""

from __future__ import annotations

import os

# Tests never reach a hub; failing fast beats five network retries per missing id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

WNIDS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark


def write_image_folder(root: Path, per_class: int = 5, size: int = 36, seed: int = 0) -> Path:
    """Random RGB PNGs under root/<wnid>/ (ImageNet layout)."""
    rng = np.random.default_rng(seed)
    for wnid in WNIDS:
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "data")


@pytest.fixture(scope="session")
def miniatures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from saekit.mini.miniatures import MINIATURE_KINDS, miniature

    root = tmp_path_factory.mktemp("miniatures")
    return {kind: miniature(kind, root / kind) for kind in MINIATURE_KINDS}
