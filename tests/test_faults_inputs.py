"""A table of bad inputs, each with its expected skip or error.

Images of every kind go through a real extraction: each is either converted faithfully (its row
equals the encoding of what the image looks like) or skipped and listed in the manifest with the
reason. Folders, stores, SAEs and output folders that cannot be used each raise an error that
says what to do. (Interrupted runs and full disks: tests/test_faults_store.py and
tests/test_faults_training.py.)
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.activations import OutputNotEmptyError, extract
from saekit.data import ImageFolder, load_dataset, to_rgb
from saekit.durable import FolderLockedError, OutputNotWritableError, folder_lock
from saekit.models import load_encoder
from saekit.sae import NonFiniteActivationsError, SAESpec, evaluate, get_recipe, train_on_tensor
from saekit.sae.codes import SAEStoreMismatchError, iter_codes
from saekit.sae.synthetic import identity_sae
from saekit.sae.train import OutputExistsError, sweep_from_store


def _pixels(mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (36, 40), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, (36, 40), dtype=np.uint8)))
        return rgba
    if mode == "P":
        palette = rgb.convert("P")
        palette.info["transparency"] = 0
        return palette
    return rgb.convert(mode)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


#: name -> (file bytes, None when the image is kept, else the reason it is skipped)
IMAGES = {
    "gray16.png": (lambda: _encoded(_pixels("I;16"), "PNG"), None),
    "rgba.png": (lambda: _encoded(_pixels("RGBA"), "PNG"), None),
    "palette.png": (lambda: _encoded(_pixels("P"), "PNG"), None),
    "la.png": (lambda: _encoded(_pixels("LA"), "PNG"), None),
    "cmyk.jpg": (lambda: _encoded(_pixels("CMYK"), "JPEG"), None),
    "bilevel.png": (lambda: _encoded(_pixels("1"), "PNG"), None),
    "gray.png": (lambda: _encoded(_pixels("L"), "PNG"), None),
    "float.tif": (lambda: _encoded(_pixels("F"), "TIFF"), "floating-point pixels .* no fixed"),
    "int32.tif": (lambda: _encoded(_pixels("I"), "TIFF"), "32-bit integer pixels .* no fixed"),
    "bomb.png": (
        lambda: _encoded(Image.new("RGB", (100, 80)), "PNG"),
        "decompression bomb.*MAX_IMAGE_PIXELS",
    ),
    "truncated.png": (lambda: _encoded(_pixels("RGB"), "PNG")[:300], "truncated|broken|not enough"),
    "empty.png": (lambda: b"", "cannot identify image file"),
    "text.png": (lambda: b"just some text", "cannot identify image file"),
}


@pytest.fixture
def bad_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 100 x 80 is a bomb, 36 x 40 is not
    root = tmp_path / "data"
    (root / "n01440764").mkdir(parents=True)
    (root / "n01443537").mkdir()
    for name, (content, _) in IMAGES.items():
        (root / "n01440764" / name).write_bytes(content())
    Image.fromarray(np.full((36, 40, 3), 90, np.uint8)).save(root / "n01443537" / "ok.png")
    return root


def test_every_image_kind_is_converted_faithfully_or_skipped_with_its_reason(
    bad_folder, miniatures, tmp_path
):
    encoder = load_encoder(miniatures["dinov2"])
    dataset = ImageFolder(bad_folder)
    store = extract(encoder, dataset, layers=[1], dtype="float32", out=tmp_path / "s",
                    batch_size=4, progress=False)  # fmt: skip
    skipped = {entry["id"].split("/")[1]: entry["error"] for entry in store.skipped}
    expected_skips = {name for name, (_, reason) in IMAGES.items() if reason is not None}
    assert set(skipped) == expected_skips
    for name, (_, reason) in IMAGES.items():
        if reason is not None:
            assert re.search(reason, skipped[name]), (name, skipped[name])
            assert f"n01440764/{name}" not in store.image_ids
            continue
        row = store.image_ids.index(f"n01440764/{name}")
        with Image.open(bad_folder / "n01440764" / name) as image:
            image.load()
            looks_like = to_rgb(image)
        expected = encoder([looks_like], layers=[1]).cls[1][0].numpy()
        np.testing.assert_allclose(store.cls(1)[row], expected, atol=1e-5, err_msg=name)
    # the 16-bit image's row is not that of PIL's own conversion (which made it 99.5% white)
    with Image.open(bad_folder / "n01440764" / "gray16.png") as image:
        washed_out = encoder([image.convert("RGB")], layers=[1]).cls[1][0].numpy()
    row = store.image_ids.index("n01440764/gray16.png")
    assert not np.allclose(store.cls(1)[row], washed_out, atol=1e-2)


FOLDERS = {
    "missing": (lambda root: None, FileNotFoundError, "(?s)does not exist.*ROOT/n01440764"),
    "empty": (lambda root: root.mkdir(), FileNotFoundError, "holds no images in class folders"),
    "empty class folders": (
        lambda root: (root / "cats").mkdir(parents=True),
        FileNotFoundError,
        "holds no images",
    ),
    "images without class folders": (
        lambda root: (root.mkdir(), Image.new("RGB", (4, 4)).save(root / "a.png")),
        FileNotFoundError,
        "holds 1 images directly .*one sub-folder per class",
    ),
}


@pytest.mark.parametrize("case", sorted(FOLDERS))
def test_unusable_data_folders_say_what_is_expected(case, tmp_path):
    make, error, message = FOLDERS[case]
    make(tmp_path / "data")
    with pytest.raises(error, match=message):
        load_dataset(str(tmp_path / "data"))


def test_a_class_folder_without_images_is_named(tmp_path):
    (tmp_path / "data" / "dogs").mkdir(parents=True)
    (tmp_path / "data" / "cats").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "cats" / "a.png")
    with pytest.warns(UserWarning, match=r"\['dogs'\] hold no images"):
        dataset = ImageFolder(tmp_path / "data")
    assert dataset.class_names == ["cats", "dogs"] and dataset.labels == [0]


class _Store:
    """A store-like object: 40 CLS rows of width 8 on layer 3, model identity ``m``."""

    def __init__(self, model="m", nan_row=None):
        rng = np.random.default_rng(0)
        self.acts = rng.normal(size=(40, 8)).astype(np.float32)
        if nan_row is not None:
            self.acts[nan_row, 2] = np.nan
        self.manifest = {
            "model": model, "layers": [3], "d_model": 8,
            "identity": {"model": {"weights": model}, "layers": [3]},
        }  # fmt: skip
        self.root = f"store-of-{model}"

    def cls(self, layer):
        return self.acts

    def batches(self, layer, batch_size, *, tokens="cls", seed=0, epoch=0):
        for i in range(0, 40, batch_size):
            yield torch.from_numpy(self.acts[i : i + batch_size])


def _sae_of(store):
    spec = SAESpec(layer=3, expansion=2, recipe=get_recipe("olson2025", epochs=1, batch_size=8))
    return sweep_from_store(store, [spec], progress=False)[0]


def _held(tmp_path):
    with folder_lock(tmp_path / "busy", "a first extraction"):
        extract("unused", [1], out=tmp_path / "busy")  # type: ignore[arg-type]


def _not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    return sweep_from_store(_Store(), [SAESpec(layer=3)], out_dir=tmp_path / "file" / "out")


def _foreign(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").write_text("")
    return sweep_from_store(_Store(), [SAESpec(layer=3)], out_dir=tmp_path / "out")


#: name -> (what to run, expected error, message)
MISUSE = {
    "SAE of another width": (
        lambda tmp: list(iter_codes(identity_sae(16), _Store().cls(3))),
        ValueError,
        "activations are 8 wide but the SAE expects d_in=16",
    ),
    "SAE of another model, same width": (
        lambda tmp: _check(_sae_of(_Store("m")), _Store("other")),
        SAEStoreMismatchError,
        "trained on model 'm' but the store at store-of-other holds 'other'",
    ),
    "NaN rows, training": (
        lambda tmp: _sae_of(_Store(nan_row=17)),
        NonFiniteActivationsError,
        r"layer 3 of the store has NaN/Inf in 1 image row\(s\) \(first: \[17\]\)",
    ),
    "NaN rows, in-memory training": (
        lambda tmp: train_on_tensor(SAESpec(), torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])),
        NonFiniteActivationsError,
        "NaN/Inf in activations",
    ),
    "NaN rows, codes": (
        lambda tmp: list(iter_codes(identity_sae(8), _Store(nan_row=5).cls(3))),
        NonFiniteActivationsError,
        r"rows \[5\]",
    ),
    "NaN rows, metrics": (
        lambda tmp: evaluate(identity_sae(8), _Store(nan_row=5).cls(3)),
        NonFiniteActivationsError,
        r"rows \[5\]",
    ),
    "a second writer": (_held, FolderLockedError, "being written by another saekit run"),
    "unwritable output": (_not_writable, OutputNotWritableError, "Cannot write the SAE folder"),
    "output holding other files": (_foreign, OutputExistsError, r"not empty \(results.csv\)"),
    "store output holding other files": (
        lambda tmp: (
            (tmp / "o").mkdir(),
            (tmp / "o" / "x.txt").write_text(""),
            extract("unused", [1], out=tmp / "o"),  # type: ignore[arg-type]
        ),
        OutputNotEmptyError,
        r"not empty \(x.txt\) and holds no activation store",
    ),
}


def _check(sae, store):
    from saekit.sae.codes import check_sae_matches_store

    check_sae_matches_store(sae, store, 3, "cls")


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_misuse_is_refused_with_what_to_do(case, tmp_path, monkeypatch):
    import saekit.activations

    # extract would load a model named "unused": stand one in, the refusal comes first
    monkeypatch.setattr(saekit.activations, "load_encoder", lambda name: _FakeEncoder())
    run, error, message = MISUSE[case]
    with pytest.raises(error, match=message):
        run(tmp_path)


class _FakeEncoder:
    def resolve_layers(self, layers):
        return [0]
