"""Write the toy world to disk as an ImageNet-style folder, so ImageNet loaders read it as is.

Layout (``root`` is yours to choose)::

    root/<wnid>/<split>_<index>.png          RGB images, one folder per class
    root_masks/<wnid>/<split>_<index>.png    masks, same names; pixel value i = PART_NAMES[i]
    root/toyworld.json                       what produced the folder (seed, split, shift, ...)

Masks live in a sibling folder, not inside ``root``, so a loader that treats every
sub-folder of ``root`` as a class never mistakes them for one. ``shift="far_ood"`` writes
noise textures of no class into a single folder, ``root/far_ood/``, as many as the classed
sets hold (``n_per_class * N_CLASSES``), with all-background masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from saekit.masks import masks_root
from saekit.mini.toyworld.render import PART_NAMES
from saekit.mini.toyworld.shifts import SHIFTS
from saekit.mini.toyworld.taxonomy import CLASS_NAMES, N_CLASSES, WNIDS
from saekit.mini.toyworld.world import SPLITS, ToyWorld

FAR_OOD_FOLDER = "far_ood"
"""The one folder far-OOD noise is exported into (it has no class)."""


def export_imagefolder(
    root: str | Path,
    n_per_class: int,
    split: str = "val",
    shift: str | None = None,
    seed: int = 0,
    size: int = 48,
) -> Path:
    """Render ``n_per_class`` images of every class into ``root/<wnid>/*.png`` (+ masks); return root.

    `shift` is None (in-domain), one of ``SHIFTS``, or ``"far_ood"`` (see the module docstring).

    Images are the split's first ``n_per_class * N_CLASSES`` indices, so two exports with the
    same arguments are byte-identical and a larger export extends a smaller one.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1 (got {n_per_class}).")
    if shift not in (None, *SHIFTS, FAR_OOD_FOLDER):
        raise ValueError(f"Unknown shift {shift!r}; choose None, one of {SHIFTS} or 'far_ood'.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {sorted(SPLITS)}.")
    root, mask_dir = Path(root), masks_root(root)
    world = ToyWorld(seed, size)
    far = shift == FAR_OOD_FOLDER
    folders = [FAR_OOD_FOLDER] if far else WNIDS
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (mask_dir / folder).mkdir(parents=True, exist_ok=True)
    n = n_per_class * N_CLASSES
    desc = f"export {split}" + (f"/{shift}" if shift else "")
    for index in tqdm(range(n), desc=desc, disable=n < 500):
        if far:
            toy = world.far_ood(1, start=index)[0]
            image, mask, folder = np.asarray(toy.image), toy.mask, FAR_OOD_FOLDER
        else:
            image, mask, label = world.render_arrays(index, split, shift)
            folder = WNIDS[label]
        name = f"{split}_{index:06d}.png"
        Image.fromarray(image, "RGB").save(root / folder / name)
        Image.fromarray(mask, "L").save(mask_dir / folder / name)
    manifest = {
        "produced_by": "saekit.mini.toyworld.export_imagefolder",
        "seed": seed,
        "size": size,
        "split": split,
        "shift": shift,
        "n_per_class": n_per_class,
        "wnids": None if far else WNIDS,
        "class_names": [FAR_OOD_FOLDER] if far else CLASS_NAMES,
        "masks": str(mask_dir.name),
        "part_names": list(PART_NAMES),
    }
    (root / "toyworld.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root
