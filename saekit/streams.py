"""Image collections read as streams: WebDataset tar shards and Hugging Face datasets in
streaming mode, for extracting from collections too large to list (or download) first.

A stream is a list of *sources* (one tar shard, one data file of a hub dataset), each read from
the start as a sequence of samples. Sources are the unit of work of a streamed extraction
(`saekit.stream_extract`): each rank and each decode worker reads whole sources of its own, so
nothing is read twice. Both kinds share the small `StreamingImages` surface:

* ``sources``: one stable name per source (a tar path or URL, a data file);
* ``class_names`` / ``wnids``: per class index (``class_names`` None: numbered at the end);
* ``iter_source(i)``: the samples of source ``i`` in order, each a `StreamSample` whose image is
  decoded only when asked (a resumed run passes over finished samples without decoding them);
* ``fingerprint``: what the store identity records (sources and options).

Unreadable images behave as in `saekit.data.open_image`: `StreamSample.image` raises
`UnreadableImageError`, and the extraction skips and lists the sample.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from saekit.data import WNID_PATTERN, UnreadableImageError, _class_names_for, open_image, to_rgb

INSTALL_HINT = "pip install 'saekit[streams]'"
#: Tar member extensions read as the sample's image, first match wins.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


@dataclass(frozen=True)
class StreamSample:
    """One sample of a source: its id, its label, and its image on demand."""

    image_id: str
    """``<source basename>/<key>``: unique in the collection, stable between runs."""
    label: int
    """Class index."""
    decode: Callable[[], Image.Image]
    """Decodes the image as RGB; raises `UnreadableImageError` when it cannot."""

    def image(self) -> Image.Image:
        """The decoded RGB image (`UnreadableImageError` for a corrupt one)."""
        return self.decode()


@runtime_checkable
class StreamingImages(Protocol):
    """What a streamed extraction reads of a collection (see the module docstring)."""

    sources: list[str]
    class_names: list[str] | None
    wnids: list[str] | None

    @property
    def fingerprint(self) -> str: ...

    def iter_source(self, index: int) -> Iterator[StreamSample]: ...


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"Streaming inputs need the `{module}` package: {INSTALL_HINT}.") from err


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _basenames(sources: Sequence[str]) -> list[str]:
    """A short name per source for image ids (the full name where basenames collide)."""
    names = []
    for source in sources:
        last = source.split()[-1] if source.startswith("pipe:") else source
        names.append(last.rstrip("/").split("/")[-1].split("?")[0] or source)
    return names if len(set(names)) == len(names) else list(sources)


def _classes(classes: str | os.PathLike | Sequence[str] | None) -> tuple[list[str] | None, ...]:
    """(class names, wnids) from a classes file (one per line) or list; WordNet ids get names."""
    if classes is None:
        return None, None
    if isinstance(classes, str | os.PathLike):
        path = Path(classes).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Classes file {path} does not exist: give a text file with one class name (or "
                "WordNet id such as n01440764) per line, line k naming label k."
            )
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    classes = list(classes)
    if classes and all(WNID_PATTERN.match(c) for c in classes):
        return _class_names_for(classes), classes
    return classes, None


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Tar shard names from a pattern: brace ranges (``train-{000000..000146}.tar``), ``::``
    separated lists and ``$WDS_`` variables as webdataset expands them, local globs
    (``*.tar``), or a local folder (its ``*.tar`` files). Local shards must exist."""
    wds = _require("webdataset")
    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    shards: list[str] = []
    for url in expanded:
        if _SCHEME.match(url):  # pipe:, http(s):, s3:, ... are read by webdataset's gopen
            shards.append(url)
        elif os.path.isdir(os.path.expanduser(url)):
            shards.extend(sorted(glob.glob(os.path.join(os.path.expanduser(url), "*.tar"))))
        elif glob.has_magic(url):
            shards.extend(sorted(glob.glob(os.path.expanduser(url))))
        else:
            shards.append(os.path.expanduser(url))
    missing = [s for s in shards if not _SCHEME.match(s) and not os.path.isfile(s)]
    if not shards or len(missing) == len(shards):
        raise FileNotFoundError(
            f"No tar shards match {urls!r}. Give existing files as a brace pattern "
            "(/data/train-{000000..000146}.tar), a glob (/data/*.tar) or a folder of .tar files."
        )
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(shards)} tar shards {urls!r} names do not exist "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); fix the pattern's "
            "range or restore the files."
        )
    return shards


class WebDatasetImages:
    """Tar shards in the WebDataset layout: members ``<key>.<ext>`` grouped into samples by key.

    The image is the first member whose extension is in `image_keys`; the label is the integer
    text of the ``.<label_key>`` member (``.cls``), else the `json_label` key of the ``.json``
    member. `classes` (a file with one name or WordNet id per line, or a list) names label k;
    without it the classes are numbered when the extraction ends. Sample id:
    ``<shard basename>/<key>``. Needs ``pip install 'saekit[streams]'``.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        classes: str | os.PathLike | Sequence[str] | None = None,
        label_key: str = "cls",
        json_label: str = "label",
        image_keys: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.sources = expand_shards(urls)
        self.class_names, self.wnids = _classes(classes)
        self.label_key, self.json_label, self.image_keys = label_key, json_label, tuple(image_keys)
        self._names = _basenames(self.sources)

    @property
    def fingerprint(self) -> str:
        # Local shards' sizes too: a shard rewritten with other samples under the same name
        # would otherwise resume into a store whose finished chunks hold the old ones.
        sizes = [os.path.getsize(url) if os.path.isfile(url) else None for url in self.sources]
        return _digest(
            {"kind": "webdataset", "sources": self.sources, "sizes": sizes,
             "classes": self.class_names, "label": [self.label_key, self.json_label],
             "image_keys": list(self.image_keys)}
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"WebDatasetImages({len(self.sources)} shards, first {self.sources[0]!r})"

    def iter_source(self, index: int) -> Iterator[StreamSample]:
        wds = _require("webdataset")
        url = self.sources[index]
        its = wds.tariterators
        try:
            for raw in its.group_by_keys(its.tar_file_expander(its.url_opener([{"url": url}]))):
                yield self._sample(index, raw)
        except (OSError, EOFError, tarfile.TarError) as err:
            if isinstance(err, UnreadableImageError):
                raise
            raise OSError(
                f"Reading tar shard {url} failed ({err}). Restore the identical shard and rerun "
                "(finished shards are kept), or extract to a new --out folder: the store names "
                "its sources, so removing one is a different store."
            ) from err

    def _sample(self, index: int, raw: dict) -> StreamSample:
        image_id = f"{self._names[index]}/{raw['__key__']}"
        members = sorted(k for k in raw if not k.startswith("__"))
        image_key = next((k for k in self.image_keys if k in raw), None)
        if image_key is None:
            raise ValueError(
                f"Sample {image_id} has no image member (it has {members}); name its image "
                f"extension with image_keys= (looked for {list(self.image_keys)})."
            )
        label = self._label(image_id, raw, members)
        if self.class_names is not None and not 0 <= label < len(self.class_names):
            raise ValueError(
                f"Sample {image_id} has label {label}, outside the {len(self.class_names)} "
                "classes given; give the classes file that matches the shards."
            )
        data = raw[image_key]
        return StreamSample(image_id, label, functools.partial(_decode_bytes, data, image_id))

    def _label(self, image_id: str, raw: dict, members: list[str]) -> int:
        try:
            if self.label_key in raw:
                return int(raw[self.label_key].decode().strip())
            if "json" in raw:
                meta = json.loads(raw["json"])
                if isinstance(meta, dict) and self.json_label in meta:
                    return int(meta[self.json_label])
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"Sample {image_id} has a label that is not an integer ({err})."
            ) from err
        raise ValueError(
            f"Sample {image_id} has no label: no .{self.label_key} member and no "
            f"{self.json_label!r} key in a .json member (members: {members}). Pass label_key= "
            "or json_label= naming where its class index is."
        )


class _NamedBytes(io.BytesIO):
    """Image bytes that PIL's errors name by the sample, not by a memory address (which would
    make the skipped list differ from run to run)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def _decode_bytes(data: bytes, name: str) -> Image.Image:
    return open_image(_NamedBytes(data, name), name=name)


def _decode_value(value: Any, name: str) -> Image.Image:
    """An image column's value (undecoded ``{"bytes", "path"}``, bytes or PIL) as RGB."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _decode_bytes(value["bytes"], name)
        if value.get("path"):
            return _decode_path(value["path"], name)
    if isinstance(value, bytes):
        return _decode_bytes(value, name)
    raise UnreadableImageError(f"Cannot read image {name}: no image data ({type(value).__name__})")


def _decode_path(path: str, name: str) -> Image.Image:
    """An image a dataset row names by path only: a local file, or a remote one (``hf://``,
    https) opened as `datasets` opens it (its ``xopen``, with the user's token)."""
    if "://" not in path:
        return open_image(path, name=name)
    from datasets.utils.file_utils import xopen

    try:
        with xopen(path, "rb") as stream:
            data = stream.read()
    except (OSError, ValueError) as err:
        raise UnreadableImageError(f"Cannot read image {name} from {path}: {err}") from err
    return _decode_bytes(data, name)


class HFStreamingImages:
    """A Hugging Face dataset read in streaming mode (``datasets.load_dataset(path, split=...,
    streaming=True, **load_kwargs)``): nothing is downloaded first. Its sources are the stream's
    data shards (``IterableDataset.num_shards``; for parquet, one per file), each read with
    ``.shard(num_shards=n, index=i)``; images are decoded here, so a corrupt one is skipped.
    Sample id: ``<data file basename>/<row in the file>``. Class names come from the label
    column's ``ClassLabel`` (else numbered when the extraction ends).
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_key: str = "image",
        label_key: str = "label",
        **load_kwargs: Any,
    ) -> None:
        datasets = _require("datasets")
        stream = datasets.load_dataset(path, split=split, streaming=True, **load_kwargs)
        features = stream.features
        if features is not None:
            missing = [k for k in (image_key, label_key) if k not in features]
            if missing:
                raise KeyError(
                    f"{path} ({split}) has no column(s) {missing}; its columns are "
                    f"{list(features)}. Pass image_key= and label_key= (--image-key/--label-key)."
                )
            if isinstance(features[image_key], datasets.Image):
                stream = stream.cast_column(image_key, datasets.Image(decode=False))
        label_feature = features[label_key] if features is not None else None
        names = list(getattr(label_feature, "names", None) or [])
        self.class_names: list[str] | None = names or None
        wordnet = bool(names) and all(WNID_PATTERN.match(n) for n in names)
        self.wnids: list[str] | None = names if wordnet else None
        self.stream, self.path, self.split = stream, path, split
        self.image_key, self.label_key, self.load_kwargs = image_key, label_key, load_kwargs
        n = stream.num_shards
        # The data files, when the stream's reader lists one per shard (parquet, arrow, ...).
        files = getattr(getattr(stream, "_ex_iterable", None), "kwargs", {}).get("files")
        if isinstance(files, list) and len(files) == n:
            self.sources = [str(f) for f in files]
        else:
            self.sources = [f"{path}:{split}:{i:05d}-of-{n:05d}" for i in range(n)]
        self._names = _basenames(self.sources)

    @property
    def fingerprint(self) -> str:
        return _digest(
            {"kind": "hf-streaming", "path": self.path, "split": self.split,
             "load_kwargs": repr(sorted(self.load_kwargs.items())), "sources": self.sources,
             "keys": [self.image_key, self.label_key]}
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"HFStreamingImages({self.path!r}, split={self.split!r}, {len(self.sources)} shards)"

    def iter_source(self, index: int) -> Iterator[StreamSample]:
        shard = self.stream.shard(num_shards=len(self.sources), index=index)
        # .iter, not iteration: in a DataLoader worker, iterating an IterableDataset splits it
        # again among the workers, while this source is already this worker's alone.
        rows = (
            (label, value)
            for columns in shard.iter(batch_size=64)
            for label, value in zip(columns[self.label_key], columns[self.image_key], strict=True)
        )
        for row_index, (label, value) in enumerate(rows):
            image_id = f"{self._names[index]}/{row_index}"
            if label is None or int(label) < 0:
                raise ValueError(
                    f"Row {image_id} of {self.path} ({self.split}) has no label ({label!r}); "
                    "extract a labelled split."
                )
            yield StreamSample(
                image_id, int(label), functools.partial(_decode_value, value, image_id)
            )
