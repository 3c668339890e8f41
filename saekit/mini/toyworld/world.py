"""`ToyWorld`: any number of labelled, masked toy images, deterministic per (seed, index).

Image ``index`` of a split has label ``index % N_CLASSES``, so the first ``k * N_CLASSES``
images hold exactly ``k`` per class. Each image draws its own random generator from
``(seed, stream, index)``, so image 10 000 costs no more than image 0 and any slice can be
regenerated alone; sketch, rendition and hard images reuse the in-domain scene of the same
index and draw their shift's randomness from a further stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from saekit.mini.toyworld import shifts
from saekit.mini.toyworld.render import PART_NAMES, Nuisance, render_clean, sample_scene
from saekit.mini.toyworld.taxonomy import LEAVES, N_CLASSES, WNIDS

SPLITS = {"train": 0, "val": 1, "test": 2}
"""Split name -> random stream; the splits never share a scene."""
_V2_STREAM = 100
_SHIFT_STREAM = {shift: 10 + i for i, shift in enumerate(shifts.SHIFTS)}
_FAR_OOD_STREAM = 1000


@dataclass
class ToyImage:
    """One generated image with its ground truth."""

    image: Image.Image
    """RGB image, ``size`` x ``size``."""
    label: int
    """Class index (into ``taxonomy.LEAVES``); -1 for far-OOD noise."""
    wnid: str | None
    """The class's ImageNet wnid; None for far-OOD noise."""
    mask: np.ndarray
    """uint8 [H, W], same size as the image; values index ``PART_NAMES`` (0 = background)."""
    parts: tuple[str, ...]
    """Names of the parts visible in this mask, background excluded."""

    @property
    def group(self) -> int:
        """Top-level (shape family) index; -1 for far-OOD noise."""
        return LEAVES[self.label].group if self.label >= 0 else -1


class ToyWorld:
    """The planted-hierarchy image generator.

    >>> world = ToyWorld(seed=0)
    >>> batch = world.sample(60, split="val", shift="sketch")
    >>> batch[0].image.size, batch[0].wnid, batch[0].parts
    ((48, 48), 'n01484850', ('body', 'tail', 'fin'))
    """

    def __init__(self, seed: int = 0, size: int = 48, nuisance: Nuisance | None = None) -> None:
        if not 32 <= size <= 64:
            raise ValueError(f"size must be between 32 and 64 pixels (got {size}).")
        self.seed = seed
        self.size = size
        self.nuisance = nuisance or Nuisance()

    def _check(self, split: str, shift: str | None) -> None:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {sorted(SPLITS)}.")
        if shift is not None and shift not in shifts.SHIFTS:
            raise ValueError(f"Unknown shift {shift!r}; choose None or one of {shifts.SHIFTS}.")

    def render_arrays(
        self, index: int, split: str = "train", shift: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Image ``index`` as (uint8 [H, W, 3], uint8 mask [H, W], label) without PIL."""
        self._check(split, shift)
        label = index % N_CLASSES
        stream = SPLITS[split]
        nuisance = self.nuisance
        if shift == "v2":
            stream, nuisance = stream + _V2_STREAM, shifts.V2_NUISANCE
        rng = np.random.default_rng([self.seed, stream, index])
        scene = sample_scene(rng, label, nuisance)
        if shift in (None, "v2"):
            image, mask = render_clean(scene, self.size, rng)
            return image, mask, label
        shift_rng = np.random.default_rng([self.seed, stream, index, _SHIFT_STREAM[shift]])
        if shift == "sketch":
            image, mask = shifts.render_sketch(scene, self.size)
        elif shift == "rendition":
            image, mask = shifts.render_rendition(scene, self.size, shift_rng)
        else:
            image, mask = shifts.render_hard(scene, self.size, shift_rng)
        return image, mask, label

    def render(self, index: int, split: str = "train", shift: str | None = None) -> ToyImage:
        """Image number `index` of a split, optionally under a shift."""
        image, mask, label = self.render_arrays(index, split, shift)
        return _toy_image(image, mask, label)

    def sample(
        self, n: int, split: str = "train", shift: str | None = None, start: int = 0
    ) -> list[ToyImage]:
        """Images ``start .. start + n - 1`` of a split (labels cycle through the classes)."""
        self._check(split, shift)
        indices = range(start, start + n)
        desc = f"toy world {split}" + (f"/{shift}" if shift else "")
        return [self.render(i, split, shift) for i in tqdm(indices, desc=desc, disable=n < 2000)]

    def sample_arrays(
        self, n: int, split: str = "train", shift: str | None = None, start: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like `sample` but stacked: (uint8 [B, H, W, 3], uint8 masks [B, H, W], labels [B])."""
        self._check(split, shift)
        desc = f"toy world {split}" + (f"/{shift}" if shift else "")
        rows = [
            self.render_arrays(i, split, shift)
            for i in tqdm(range(start, start + n), desc=desc, disable=n < 2000)
        ]
        images, masks, labels = zip(*rows, strict=True)
        return np.stack(images), np.stack(masks), np.array(labels)

    def far_ood(self, n: int, start: int = 0) -> list[ToyImage]:
        """Noise textures of no class (label -1, all-background mask) for far-OOD studies."""
        out = []
        for index in range(start, start + n):
            rng = np.random.default_rng([self.seed, _FAR_OOD_STREAM, index])
            image = shifts.far_ood_image(self.size, rng)
            out.append(_toy_image(image, np.zeros((self.size, self.size), np.uint8), -1))
        return out


def _toy_image(image: np.ndarray, mask: np.ndarray, label: int) -> ToyImage:
    present = tuple(PART_NAMES[i] for i in np.unique(mask) if i > 0)
    wnid = WNIDS[label] if label >= 0 else None
    return ToyImage(Image.fromarray(image, "RGB"), label, wnid, mask, present)


def far_ood(n: int, seed: int = 0, size: int = 48) -> list[ToyImage]:
    """``n`` far-OOD noise textures (see `ToyWorld.far_ood`)."""
    return ToyWorld(seed, size).far_ood(n)
