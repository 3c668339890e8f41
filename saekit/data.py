"""Image datasets: ImageNet-style folders, (path, label) lists, and Hugging Face datasets.

Every dataset here has the same small surface, which is all `saekit.activations.extract` needs:
``len(ds)``, ``ds.load(i) -> PIL.Image`` (raises `UnreadableImageError` for a corrupt file),
``ds.labels`` (class index per image), ``ds.image_ids`` (a stable string per image),
``ds.class_names`` and ``ds.wnids`` (WordNet ids per class, or None when the classes have none).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from saekit.streams import StreamingImages

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
WNID_PATTERN = re.compile(r"^n\d{8}$")

IMAGEFOLDER_LAYOUT = """Expected an ImageNet-style folder, one sub-folder per class:
    ROOT/n01440764/ILSVRC2012_val_00000293.JPEG
    ROOT/n01443537/...
(class = folder name; WordNet ids such as n01440764 are kept for the ontology study)."""


class UnreadableImageError(OSError):
    """An image file exists but cannot be decoded."""


class ImageDataset(Protocol):
    """What `saekit.activations.extract` reads of a dataset (see the module docstring)."""

    labels: list[int]
    class_names: list[str]
    wnids: list[str] | None

    @property
    def image_ids(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...


#: 16-bit integer modes PIL opens (grayscale PNG and TIFF).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
#: Modes with an alpha channel (``PA``/``La``/``RGBa`` are palette or premultiplied variants).
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image that looks like ``image``, or `UnreadableImageError` with the reason.

    * 16-bit grayscale (``I;16*``) is rescaled to 8 bits (65535 -> 255); PIL's own conversion
      clips everything above 255 to white.
    * Transparency (alpha channels, palette transparency) is composited over white, as a
      viewer shows the image; dropping alpha would expose whatever colour hides under it.
    * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGB`` convert with PIL.
    * 32-bit integer (``I``) and float (``F``) pixels have no fixed range: refused, since any
      scaling would be a guess.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT:
        wide = np.asarray(image).astype(np.uint32)
        eight = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise UnreadableImageError(
            f"{kind} pixels (PIL mode {mode}) have no fixed range to map to 0-255; save the "
            "image as 8- or 16-bit"
        )
    if mode == "La":
        image = image.convert("LA")
        mode = "LA"
    if mode in _ALPHA or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise UnreadableImageError(f"PIL cannot convert mode {mode} to RGB ({err})") from err


def open_image(path: str | os.PathLike | IO[bytes], name: str | None = None) -> Image.Image:
    """Decode an image fully (so truncation shows up here, not mid-batch) as RGB (`to_rgb`).

    Anything that cannot be read raises `UnreadableImageError` with the reason: corrupt or
    truncated files, unsupported modes, and images over PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``; raise it for files you trust). `path` may be an open binary
    file (the bytes of a tar member, say); `name` is what error messages call it.
    """
    if name is None:
        name = str(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(
            f"Cannot read image {name}: {err} Raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
        ) from err
    except UnreadableImageError as err:
        raise UnreadableImageError(f"Cannot read image {name}: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(f"Cannot read image {name}: {err}") from err


_ACCEPTED_IMAGES = (
    "a PIL image or a list of them, a file path or a list of paths, or a uint8 (0-255) or "
    "float ([0, 1]) tensor [B, 3, H, W] / [3, H, W] (numpy: [B, H, W, 3] / [H, W, 3])"
)


def _array_to_pils(array: np.ndarray, channels_last: bool) -> list[Image.Image]:
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise TypeError(
            f"Cannot read an image array of shape {array.shape}: pass {_ACCEPTED_IMAGES}."
        )
    if not channels_last:
        array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] != 3:
        layout = "[B, H, W, 3]" if channels_last else "[B, 3, H, W]"
        raise TypeError(
            f"Image arrays need 3 (or 1) channels in layout {layout}; got shape {array.shape}."
        )
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and not np.isfinite(array).all():
            raise ValueError("Float images must hold pixel values in [0, 1], not NaN/Inf.")
        if array.size and not (0 <= array.min() and array.max() <= 1):
            raise ValueError(
                "Float images must hold pixel values in [0, 1] (got values in "
                f"[{array.min():.3g}, {array.max():.3g}]); pass uint8 for 0-255 values."
            )
        # A float image is a saved image seen through ToTensor: quantise it back to 8 bits, so
        # every input kind reaches the processor on the same path.
        pixels = np.round(array * 255).astype(np.uint8)
    else:
        raise TypeError(f"Image arrays must be uint8 or float, not {array.dtype}.")
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def as_pil_images(images: Any) -> list[Image.Image]:
    """A batch of RGB PIL images from any input an encoder accepts (`Encoder.__call__`).

    Non-RGB modes are converted faithfully (`saekit.data.to_rgb`: 16-bit rescaled, alpha over
    white); anything else raises one TypeError listing what is accepted.
    """
    # torch is not imported here: an object can only be a tensor once torch is loaded.
    torch = sys.modules.get("torch")
    tensor = torch.Tensor if torch is not None else ()
    if isinstance(images, Image.Image | str | os.PathLike):
        images = [images]
    if isinstance(images, tensor):
        return _array_to_pils(images.detach().cpu().numpy(), channels_last=False)
    if isinstance(images, np.ndarray):
        return _array_to_pils(images, channels_last=True)
    if not isinstance(images, Sequence) or not images:
        raise TypeError(f"Cannot read {type(images).__name__} as images: pass {_ACCEPTED_IMAGES}.")
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            out.append(to_rgb(image))
        elif isinstance(image, str | os.PathLike):
            out.append(open_image(image))
        elif isinstance(image, tensor) or isinstance(image, np.ndarray):
            array = image if isinstance(image, np.ndarray) else image.detach().cpu().numpy()
            out.extend(_array_to_pils(array, channels_last=isinstance(image, np.ndarray)))
        else:
            raise TypeError(
                f"Cannot read a {type(image).__name__} as an image: pass {_ACCEPTED_IMAGES}."
            )
    return out


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
        pairs: list[tuple[Path, int]] = []
        for label, class_dir in enumerate(class_dirs):
            files = sorted(
                p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            pairs.extend((path, label) for path in files)
        if not pairs:
            loose = [p.name for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            found = (
                f" It holds {len(loose)} images directly ({', '.join(sorted(loose)[:3])} ...): "
                "move them into one sub-folder per class."
                if loose
                else ""
            )
            raise FileNotFoundError(
                f"Data folder {self.root} holds no images in class folders.{found}\n"
                f"{IMAGEFOLDER_LAYOUT}"
            )
        used = {label for _, label in pairs}
        empty = [d.name for label, d in enumerate(class_dirs) if label not in used]
        if empty:
            warnings.warn(
                f"{self.root}: class folder(s) {empty[:5]} hold no images (suffixes "
                f"{sorted(IMAGE_SUFFIXES)}); they keep their class index but have no rows.",
                stacklevel=2,
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
        dataset: Any,
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
            return to_rgb(self.dataset[index][self.image_key])
        except Image.DecompressionBombError as err:
            raise UnreadableImageError(f"Cannot read image {index}: {err}") from err
        except (OSError, ValueError, SyntaxError) as err:
            raise UnreadableImageError(f"Cannot read image {index}: {err}") from err


#: Prefixes of `load_dataset` specs that name streams or hub datasets rather than folders.
WDS_PREFIX, HF_PREFIX = "wds:", "hf:"


def load_dataset(
    spec: str | os.PathLike,
    *,
    split: str | None = None,
    streaming: bool = False,
    classes: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> ImageDataset | StreamingImages:
    """The images `spec` names, for `saekit.activations.extract`:

    * an existing folder -> `ImageFolder` (also any path-like spec: ``./x``, ``/x``, ``a/b/c``);
    * ``wds:PATTERN`` -> `saekit.streams.WebDatasetImages`, tar shards read as a stream
      (`classes`: a file naming label k on line k);
    * ``hf:NAME`` -> a Hugging Face dataset: streamed (`saekit.streams.HFStreamingImages`)
      with ``streaming=True``, else loaded (`HFImageDataset`); `split`, `image_key` and
      `label_key` choose what is read;
    * anything else is tried as a Hugging Face dataset name (random access).

    Returns an `ImageDataset` or, for streams, a `saekit.streams.StreamingImages`.
    """
    text = str(spec)
    path = Path(spec).expanduser()
    is_wds = text.startswith(WDS_PREFIX) and not path.exists()
    is_hf = text.startswith(HF_PREFIX) and not path.exists()
    if classes is not None and not is_wds:
        raise ValueError(f"classes= applies to wds: tar shards, not to {text!r}.")
    if streaming and not is_hf:
        raise ValueError(
            f"streaming=True applies to hf: datasets, not to {text!r} (wds: shards always stream)."
        )
    if is_wds:
        from saekit.streams import WebDatasetImages

        return WebDatasetImages(text[len(WDS_PREFIX) :], classes=classes)
    if is_hf:
        name = text[len(HF_PREFIX) :]
        if streaming:
            from saekit.streams import HFStreamingImages

            return HFStreamingImages(name, split or "train", image_key, label_key)
        return HFImageDataset(name, image_key, label_key, split)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return ImageFolder(path)
    try:
        return HFImageDataset(text, image_key, label_key, split)
    except Exception as err:  # noqa: BLE001 - any failure means "neither a folder nor a dataset"
        raise FileNotFoundError(
            f"{spec!r} is neither a folder (looked in {Path.cwd()}) nor a loadable Hugging Face "
            f"dataset ({type(err).__name__}: {err}).\n{IMAGEFOLDER_LAYOUT}"
        ) from err


class DecodedBatches:
    """Batches of a dataset decoded and preprocessed, for DataLoader worker processes.

    A map-style dataset (``__len__``/``__getitem__``). Item ``i`` reads the images of ``batches[i]`` (dataset indices), runs `processor` (a
    model's image processor) on those that could be read, and returns ``(kept indices,
    [(index, error)] of the unreadable ones, pixel_values [B, 3, H, W] or None)``. Run by
    ``DataLoader(..., batch_size=None, num_workers=N)``, decoding leaves the process that feeds
    the model.
    """

    def __init__(self, dataset: ImageDataset, processor: Any, batches: Sequence[Sequence[int]]):
        self.dataset, self.processor, self.batches = dataset, processor, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[list[int], list[tuple[int, str]], Any]:
        kept, images, errors = [], [], []
        for index in self.batches[i]:
            try:
                images.append(self.dataset.load(index))
                kept.append(index)
            except (UnreadableImageError, OSError) as err:
                errors.append((index, str(err)))
        if not images:
            return kept, errors, None
        pixels = self.processor(images=as_pil_images(images), return_tensors="pt")
        return kept, errors, pixels["pixel_values"]
