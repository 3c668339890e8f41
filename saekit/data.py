"""Image datasets: ImageNet-style folders, (path, label) lists, and Hugging Face datasets.

Every dataset here has the same small surface, which is all `saekit.activations.extract` needs:
``len(ds)``, ``ds.load(i) -> PIL.Image`` (raises `UnreadableImageError` for a corrupt file),
``ds.labels`` (class index per image), ``ds.image_ids`` (a stable string per image),
``ds.class_names`` and ``ds.wnids`` (WordNet ids per class, or None when the classes have none).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
WNID_PATTERN = re.compile(r"^n\d{8}$")

IMAGEFOLDER_LAYOUT = """Expected an ImageNet-style folder, one sub-folder per class:
    ROOT/n01440764/ILSVRC2012_val_00000293.JPEG
    ROOT/n01443537/...
(class = folder name; WordNet ids such as n01440764 are kept for the ontology study)."""


class UnreadableImageError(OSError):
    """An image file exists but cannot be decoded."""


class ImageDataset(Protocol):
    labels: list[int]
    image_ids: list[str]
    class_names: list[str]
    wnids: list[str] | None

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncation shows up here, not mid-batch) as RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(f"Cannot read image {path}: {err}") from err


def _class_names_for(wnids: Sequence[str]) -> list[str]:
    """Human names for WordNet ids from the shipped ImageNet taxonomy, else the ids."""
    try:
        from saekit.taxonomy import Taxonomy

        taxonomy = Taxonomy.imagenet1k()
        return [taxonomy.name(wnid) if wnid in taxonomy else wnid for wnid in wnids]
    except (ImportError, FileNotFoundError, AttributeError, KeyError):
        return list(wnids)


@dataclass
class ImageList:
    """Images given as explicit (path, label) pairs."""

    paths: list[Path]
    """One file path per image."""
    labels: list[int]
    """Class index per image."""
    class_names: list[str]
    """Name per class index."""
    wnids: list[str] | None = None
    """WordNet noun id per class index, when the classes are WordNet synsets."""

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[tuple[str | os.PathLike, int]],
        class_names: Sequence[str] | None = None,
        wnids: Sequence[str] | None = None,
    ) -> ImageList:
        paths = [Path(path) for path, _ in pairs]
        labels = [int(label) for _, label in pairs]
        n_classes = max(labels, default=-1) + 1
        names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
        if len(names) < n_classes:
            raise ValueError(f"{len(names)} class names given but labels go up to {n_classes - 1}.")
        return cls(paths, labels, names, list(wnids) if wnids is not None else None)

    @property
    def image_ids(self) -> list[str]:
        return [str(path) for path in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return open_image(self.paths[index])


class ImageFolder(ImageList):
    """``root/<class>/*.<image>``; the folder name is the class, and its wnid when it is one."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Data folder {self.root} does not exist.\n{IMAGEFOLDER_LAYOUT}"
            )
        class_dirs = sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        pairs = []
        for label, class_dir in enumerate(class_dirs):
            files = sorted(
                p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            pairs.extend((path, label) for path in files)
        if not pairs:
            raise FileNotFoundError(
                f"Data folder {self.root} holds no images.\n{IMAGEFOLDER_LAYOUT}"
            )
        folder_names = [p.name for p in class_dirs]
        is_wordnet = all(WNID_PATTERN.match(name) for name in folder_names)
        wnids = folder_names if is_wordnet else None
        names = _class_names_for(folder_names) if is_wordnet else folder_names
        super().__init__([p for p, _ in pairs], [label for _, label in pairs], names, wnids)
        self._image_ids = [str(path.relative_to(self.root)) for path in self.paths]

    @property
    def image_ids(self) -> list[str]:
        return self._image_ids

    @classmethod
    def from_pairs(cls, *args, **kwargs):  # noqa: D102 - a folder is read, not listed
        raise TypeError(
            "ImageFolder reads a folder; use ImageList.from_pairs for (path, label) pairs."
        )


class HFImageDataset:
    """A Hugging Face `datasets` image dataset (needs ``pip install saekit[datasets]``)."""

    def __init__(
        self,
        dataset: object,
        image_key: str = "image",
        label_key: str = "label",
        split: str | None = None,
    ) -> None:
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                "Hugging Face datasets support needs `pip install datasets`."
            ) from err
        if isinstance(dataset, str):
            dataset = datasets.load_dataset(dataset, split=split or "train")
        missing = [key for key in (image_key, label_key) if key not in dataset.column_names]
        if missing:
            raise KeyError(
                f"The dataset has no column(s) {missing}; its columns are {dataset.column_names}. "
                "Pass image_key= and label_key=."
            )
        self.dataset = dataset
        self.image_key = image_key
        self.labels = [int(label) for label in dataset[label_key]]
        feature = dataset.features.get(label_key)
        names = getattr(feature, "names", None)
        self.class_names = list(names) if names else [str(c) for c in range(max(self.labels) + 1)]
        self.wnids = (
            list(self.class_names) if all(WNID_PATTERN.match(n) for n in self.class_names) else None
        )
        self.image_ids = [str(i) for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        try:
            return self.dataset[index][self.image_key].convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:
            raise UnreadableImageError(f"Cannot read image {index}: {err}") from err


def load_dataset(spec: str | os.PathLike) -> ImageDataset:
    """A folder path -> `ImageFolder`; anything else is tried as a Hugging Face dataset name."""
    path = Path(spec).expanduser()
    if path.exists() or str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        return ImageFolder(path)
    try:
        return HFImageDataset(str(spec))
    except Exception as err:  # noqa: BLE001 - any failure means "neither a folder nor a dataset"
        raise FileNotFoundError(
            f"{spec!r} is neither a folder (looked in {Path.cwd()}) nor a loadable Hugging Face "
            f"dataset ({type(err).__name__}: {err}).\n{IMAGEFOLDER_LAYOUT}"
        ) from err
