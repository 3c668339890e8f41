"""The activation store: shapes, resumption, corrupt images, shuffled batches, refusals."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from saekit.activations import (
    ActivationStore,
    OutputNotEmptyError,
    ShardedArray,
    StoreMismatchError,
    extract,
)
from saekit.cli import main as cli_main
from saekit.data import ImageFolder, ImageList
from saekit.durable import OutputNotWritableError
from saekit.models import load_encoder


class KillAfter:
    """A dataset that dies (like Ctrl-C) when image `kill_at` is read, once."""

    def __init__(self, dataset, kill_at: int) -> None:
        self.dataset, self.kill_at, self.killed = dataset, kill_at, False
        self.labels, self.image_ids = dataset.labels, dataset.image_ids
        self.class_names, self.wnids = dataset.class_names, dataset.wnids

    def __len__(self):
        return len(self.dataset)

    def load(self, index):
        if index == self.kill_at and not self.killed:
            self.killed = True
            raise KeyboardInterrupt
        return self.dataset.load(index)


def _store_arrays(store: ActivationStore) -> dict[str, np.ndarray]:
    arrays = {"labels": store.labels, "rows": store.rows}
    for layer in store.layers:
        arrays[f"cls{layer}"] = np.asarray(store.cls(layer))
        if "patch" in store.manifest["tokens"]:
            arrays[f"patch{layer}"] = np.asarray(store.patches(layer))
    return arrays


@pytest.fixture(scope="module")
def encoder(miniatures):
    return load_encoder(miniatures["dinov2"])


def test_extract_shapes_labels_and_ids(encoder, image_folder, tmp_path):
    dataset = ImageFolder(image_folder)
    assert dataset.wnids == ["n01440764", "n01443537", "n01484850"]
    store = extract(
        encoder,
        dataset,
        layers="0,2",
        tokens="both",
        out=tmp_path / "s",
        batch_size=4,
        shard_images=4,
        progress=False,
    )
    assert store.layers == [0, 2]
    assert store.cls(2).shape == (15, 32) and store.patches(0).shape == (15, 16, 32)
    assert store.grid(0) == (4, 4)
    assert list(store.labels) == [0] * 5 + [1] * 5 + [2] * 5
    assert store.image_ids[5] == "n01443537/n01443537_0.png"
    # Stored float16 rows equal a fresh forward pass on the same image.
    fresh = encoder([dataset.load(7)], layers=[2]).cls[2][0].numpy()
    np.testing.assert_allclose(store.cls(2)[7].astype(np.float32), fresh, rtol=1e-2, atol=1e-2)


def test_multi_layer_store_equals_single_layer_stores(encoder, image_folder, tmp_path):
    dataset = ImageFolder(image_folder)
    both = extract(
        encoder, dataset, layers=[0, 1], out=tmp_path / "both", dtype="float32", progress=False
    )
    for layer in (0, 1):
        alone = extract(
            encoder,
            dataset,
            layers=[layer],
            out=tmp_path / f"L{layer}",
            dtype="float32",
            progress=False,
        )
        np.testing.assert_array_equal(np.asarray(both.cls(layer)), np.asarray(alone.cls(layer)))


def test_killed_then_resumed_equals_uninterrupted(encoder, image_folder, tmp_path):
    dataset = ImageFolder(image_folder)
    kwargs = dict(layers="all", tokens="both", batch_size=2, shard_images=4, progress=False)
    reference = extract(encoder, dataset, out=tmp_path / "ref", **kwargs)

    flaky = KillAfter(dataset, kill_at=9)  # dies inside the third shard
    with pytest.raises(KeyboardInterrupt):
        extract(encoder, flaky, out=tmp_path / "run", **kwargs)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1] and not manifest["complete"]
    with pytest.raises(RuntimeError, match="incomplete"):
        ActivationStore.open(tmp_path / "run")
    finished = (tmp_path / "run" / "shard_00000" / "L0_cls.npy").stat().st_mtime_ns
    (tmp_path / "run" / "shard_00002.tmp").mkdir()  # debris of a shard being written

    resumed = extract(encoder, flaky, out=tmp_path / "run", **kwargs)
    assert (tmp_path / "run" / "shard_00000" / "L0_cls.npy").stat().st_mtime_ns == finished
    assert not list((tmp_path / "run").glob("*.tmp"))
    ref_arrays, run_arrays = _store_arrays(reference), _store_arrays(resumed)
    assert ref_arrays.keys() == run_arrays.keys()
    for name in ref_arrays:
        np.testing.assert_array_equal(ref_arrays[name], run_arrays[name], err_msg=name)


def test_identical_rerun_returns_existing_store_and_different_one_refuses(
    encoder, image_folder, tmp_path
):
    dataset = ImageFolder(image_folder)
    first = extract(encoder, dataset, layers=[1], out=tmp_path / "s", progress=False)
    stamp = (tmp_path / "s" / "shard_00000" / "L1_cls.npy").stat().st_mtime_ns
    again = extract(encoder, dataset, layers=[1], out=tmp_path / "s", progress=False)
    assert again.n_rows == first.n_rows
    assert (tmp_path / "s" / "shard_00000" / "L1_cls.npy").stat().st_mtime_ns == stamp
    with pytest.raises(StoreMismatchError, match="layers"):
        extract(encoder, dataset, layers=[0], out=tmp_path / "s", progress=False)


def test_corrupt_images_are_skipped_counted_and_listed(encoder, image_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "n01443537" / "broken.png").write_bytes(b"\x89PNG not really")
    truncated = (data / "n01484850" / "n01484850_0.png").read_bytes()
    (data / "n01484850" / "n01484850_0.png").write_bytes(truncated[: len(truncated) // 2])
    store = extract(encoder, ImageFolder(data), layers=[0], out=tmp_path / "s", progress=False)
    assert store.n_rows == 14  # 16 files, 2 unreadable
    assert sorted(s["id"] for s in store.skipped) == [
        "n01443537/broken.png",
        "n01484850/n01484850_0.png",
    ]
    assert "n01443537/broken.png" not in store.image_ids
    assert list(store.labels).count(2) == 4


def test_unreadable_last_shard_keeps_grids_and_all_unreadable_is_an_error(encoder, tmp_path):
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", per_class=2)
    last = sorted((data / "n01484850").iterdir())
    for path in last:
        path.write_bytes(b"broken")  # the last shard (2 images) cannot be read at all
    store = extract(
        encoder,
        ImageFolder(data),
        layers=[0],
        tokens="patch",
        out=tmp_path / "s",
        shard_images=2,
        batch_size=2,
        progress=False,
    )
    assert store.grid(0) == (4, 4) and store.n_rows == 4
    for path in data.rglob("*.png"):
        path.write_bytes(b"broken")
    with pytest.raises(ValueError, match="None of the 6 images could be read"):
        extract(encoder, ImageFolder(data), layers=[0], out=tmp_path / "t", progress=False)


def test_cnn_stages_of_different_sizes_cannot_share_patch_batches(
    miniatures, image_folder, tmp_path
):
    store = extract(
        load_encoder(miniatures["resnet"]),
        ImageFolder(image_folder),
        layers=[0, 1],
        tokens="patch",
        out=tmp_path / "s",
        progress=False,
    )
    assert store.patches(0).shape[1] == 4 * store.patches(1).shape[1]
    with pytest.raises(ValueError, match="different numbers of patch tokens"):
        next(store.batches([0, 1], 8, tokens="patch"))
    assert (
        sum(len(b) for b in store.batches(1, 8, tokens="patch")) == 15 * store.patches(1).shape[1]
    )


def test_resuming_with_another_batch_size_says_why_it_refuses(encoder, image_folder, tmp_path):
    extract(
        encoder,
        ImageFolder(image_folder),
        layers=[0],
        out=tmp_path / "s",
        batch_size=3,
        progress=False,
    )
    with pytest.raises(StoreMismatchError, match="first run's batch size"):
        extract(
            encoder,
            ImageFolder(image_folder),
            layers=[0],
            out=tmp_path / "s",
            batch_size=4,
            progress=False,
        )


def test_batches_yield_every_row_once_per_epoch(encoder, image_folder, tmp_path):
    store = extract(
        encoder,
        ImageFolder(image_folder),
        layers=[0, 1],
        tokens="both",
        out=tmp_path / "s",
        dtype="float32",
        shard_images=4,
        batch_size=4,
        progress=False,
    )
    reference = np.asarray(store.cls(1))
    # A window smaller than the store forces carry-over between windows.
    epochs = []
    for epoch in range(2):
        batches = list(store.batches(1, 3, seed=0, epoch=epoch, block_rows=2, window_rows=5))
        rows = np.concatenate([b.numpy() for b in batches])
        assert rows.shape == reference.shape
        # Each stored row appears exactly once.
        matches = (rows[:, None, :] == reference[None, :, :]).all(-1)
        assert (matches.sum(0) == 1).all() and (matches.sum(1) == 1).all()
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])  # the epoch reshuffles
    again = store.batches(1, 3, seed=0, epoch=0, block_rows=2, window_rows=5)
    again = np.concatenate([b.numpy() for b in again])
    np.testing.assert_array_equal(again, epochs[0])  # and is deterministic

    # Several layers come out with the same row order.
    for batch in store.batches([0, 1], 4, seed=3):
        i0 = [(np.asarray(store.cls(0)) == r).all(-1).argmax() for r in batch[0].numpy()]
        i1 = [(reference == r).all(-1).argmax() for r in batch[1].numpy()]
        assert i0 == i1
    # Patch tokens are one row per (image, patch).
    patch_rows = sum(len(b) for b in store.batches(0, 7, tokens="patch"))
    assert patch_rows == 15 * 16
    with pytest.raises(ValueError, match="'cls' or 'patch'"):
        next(store.batches(0, 7, tokens="patches"))


SHARD_SIZES = (4, 0, 1, 5, 3)  # an empty shard and a one-row shard among them


def _sharded():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3, 2)) for n in SHARD_SIZES]
    return ShardedArray(parts), np.concatenate(parts)


def test_sharded_rows_at_every_shard_boundary_and_negative_index():
    array, whole = _sharded()
    assert array.shape == whole.shape and len(array) == 13
    for row in range(-len(whole), len(whole)):  # every row, so every boundary, both signs
        np.testing.assert_array_equal(array[row], whole[row], err_msg=str(row))
        np.testing.assert_array_equal(array[np.int64(row)], whole[row])
    for row in (13, -14, 100):
        with pytest.raises(IndexError, match="out of range"):
            array[row]


def test_sharded_slices_fancy_and_boolean_indices_equal_numpy():
    array, whole = _sharded()
    bounds = [None, -14, -13, -5, -1, 0, 1, 3, 4, 5, 9, 10, 12, 13, 20]
    for start, stop, step in itertools.product(bounds, bounds, [None, 1, 2, 3, -1, -2]):
        key = slice(start, stop, step)
        np.testing.assert_array_equal(array[key], whole[key], err_msg=str(key))
    rng = np.random.default_rng(1)
    keys = [
        [12, 0, 4, 4, -1, -13],
        np.array([[0, 9], [4, -5]]),
        rng.integers(-13, 13, size=30),
        [],
        np.array([], dtype=np.int64),
        whole[:, 0, 0] > 0,
        (slice(3, 6), 1),
        ([0, 9], 1),
        ([0, 9], [1, 2]),
        ([1, 2], slice(None), [0, 1]),
        (np.array([[0, 9], [4, 5]]), slice(None), 1),
        (-2, Ellipsis, 1),
        (Ellipsis, 0),
        (slice(1, 9, 3), [0, 2], 1),
    ]
    for key in keys:
        np.testing.assert_array_equal(array[key], whole[key], err_msg=str(key))
        assert array[key].shape == whole[key].shape, key
    np.testing.assert_array_equal(np.asarray(array), whole)
    np.testing.assert_array_equal(np.asarray(array, dtype=np.float32), whole.astype(np.float32))
    for bad in ([13], [0, -14], np.ones(5, bool), True, [0.5]):
        with pytest.raises(IndexError):
            array[bad]


def test_open_refuses_a_store_made_for_something_else(encoder, image_folder, tmp_path):
    extract(encoder, ImageFolder(image_folder), layers=[1], out=tmp_path / "s", progress=False)
    with pytest.raises(StoreMismatchError, match="activations of"):
        ActivationStore.open(tmp_path / "s", model="facebook/dinov2-giant")
    with pytest.raises(StoreMismatchError, match="layers"):
        ActivationStore.open(tmp_path / "s", layers=[0])
    with pytest.raises(StoreMismatchError, match="tokens"):
        ActivationStore.open(tmp_path / "s", tokens="patch")
    with pytest.raises(KeyError, match="holds"):
        ActivationStore.open(tmp_path / "s").cls(2)
    with pytest.raises(FileNotFoundError, match="saekit extract"):
        ActivationStore.open(tmp_path / "nothing")


def test_missing_or_empty_data_folder_explains_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="ROOT/n01440764"):
        ImageFolder(tmp_path / "absent")
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageFolder(tmp_path / "empty")


def test_a_missing_relative_folder_is_not_looked_up_as_a_hub_dataset(tmp_path, monkeypatch):
    from saekit.data import load_dataset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_dataset("imgs_missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("imgs/val/train")
    with pytest.raises(TypeError, match="ImageList.from_pairs"):
        ImageFolder.from_pairs([])


def test_image_list_and_plain_class_names(image_folder):
    pairs = [
        (image_folder / "n01440764" / "n01440764_0.png", 1),
        (image_folder / "n01443537" / "n01443537_1.png", 0),
    ]
    dataset = ImageList.from_pairs(pairs, class_names=["fish", "other fish"])
    assert len(dataset) == 2 and dataset.labels == [1, 0] and dataset.wnids is None
    assert dataset.load(1).mode == "RGB"
    with pytest.raises(ValueError, match="class names"):
        ImageList.from_pairs(pairs, class_names=["only one"])


def test_cli_extract(miniatures, image_folder, tmp_path, capsys):
    code = cli_main(
        [
            "extract",
            "--model",
            str(miniatures["vit"]),
            "--data",
            str(image_folder),
            "--layers",
            "0,2",
            "--tokens",
            "patch",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert code == 0 and "rows=15" in capsys.readouterr().out
    store = ActivationStore.open(tmp_path / "s", layers=[0, 2], tokens="patch")
    assert store.patches(2).shape == (15, 16, 32)


# --- identity, output folders, layer lists, provenance --------------------------------------------


def test_resuming_with_another_spelling_of_the_model_path(
    miniatures, image_folder, tmp_path, monkeypatch
):
    """The reported bug: a store was tied to how the model path was spelled."""
    dataset = ImageFolder(image_folder)
    kwargs = dict(layers=[1], batch_size=2, shard_images=4, progress=False)
    reference = extract(load_encoder(miniatures["dinov2"]), dataset, out=tmp_path / "ref", **kwargs)
    monkeypatch.chdir(miniatures["dinov2"].parent)
    with pytest.raises(KeyboardInterrupt):
        extract(load_encoder("dinov2"), KillAfter(dataset, 9), out=tmp_path / "s", **kwargs)
    monkeypatch.chdir(tmp_path)
    spelled = str(miniatures["dinov2"]) + "/"  # absolute, with a trailing slash, another cwd
    store = extract(load_encoder(spelled), dataset, out=tmp_path / "s", **kwargs)
    np.testing.assert_array_equal(np.asarray(store.cls(1)), np.asarray(reference.cls(1)))
    assert ActivationStore.open(tmp_path / "s", model=spelled).n_rows == 15
    assert ActivationStore.open(tmp_path / "s", model=load_encoder(spelled)).n_rows == 15


def test_another_model_of_the_same_shape_is_refused(encoder, image_folder, tmp_path):
    from saekit.mini.miniatures import miniature

    other = load_encoder(miniature("dinov2", tmp_path / "seed1", seed=1))
    dataset = ImageFolder(image_folder)
    extract(encoder, dataset, layers=[1], out=tmp_path / "s", progress=False)
    with pytest.raises(StoreMismatchError, match=r"different model \(the model's weights differ"):
        extract(other, dataset, layers=[1], out=tmp_path / "s", progress=False)
    with pytest.raises(StoreMismatchError, match="holds activations of"):
        ActivationStore.open(tmp_path / "s", model=other)


def test_output_folders_are_checked_before_any_work(encoder, image_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(encoder, "forward_pixels", lambda *a, **k: calls.append(1))
    dataset = ImageFolder(image_folder)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputNotEmptyError, match=r"not empty \(thesis.tex\)"):
        extract(encoder, dataset, out=tmp_path / "mine", progress=False)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputNotWritableError, match="Cannot write .*a-file/store"):
        extract(encoder, dataset, out=tmp_path / "a-file" / "store", progress=False)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", read_only)  # as root, chmod would not stop writes
    with pytest.raises(OutputNotWritableError, match="Permission denied. Choose a writable"):
        extract(encoder, dataset, out=tmp_path / "ro", progress=False)
    assert calls == []  # refused before a single forward pass
    for layers in ("", [], "1-x"):
        with pytest.raises((ValueError, TypeError)):
            extract(encoder, dataset, layers=layers, out=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_duplicate_and_unsorted_layer_lists_make_the_same_store(encoder, image_folder, tmp_path):
    dataset = ImageFolder(image_folder)
    store = extract(encoder, dataset, layers=[2, 0, 2, -1], out=tmp_path / "s", progress=False)
    assert store.layers == [0, 2]
    stamp = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    again = extract(encoder, dataset, layers="0,2", out=tmp_path / "s", progress=False)
    assert again.layers == [0, 2]
    assert (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == stamp  # nothing redone


def test_store_arrays_say_where_they_come_from(encoder, image_folder, tmp_path):
    store = extract(
        encoder, ImageFolder(image_folder), layers=[1], tokens="both", out=tmp_path / "s",
        progress=False,
    )  # fmt: skip
    provenance = store.patches(1).provenance
    assert provenance["layer"] == 1 and provenance["tokens"] == "patch"
    assert provenance["model_identity"] == encoder.identity == store.model_identity


def test_a_listed_shard_whose_folder_vanished_is_extracted_again(encoder, image_folder, tmp_path):
    dataset = ImageFolder(image_folder)
    kwargs = dict(layers=[1], batch_size=2, shard_images=4, progress=False)
    reference = extract(encoder, dataset, out=tmp_path / "ref", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        extract(encoder, KillAfter(dataset, 9), out=tmp_path / "s", **kwargs)
    shutil.rmtree(tmp_path / "s" / "shard_00001")
    with pytest.warns(UserWarning, match="shard 1 is listed in the manifest but its folder"):
        store = extract(encoder, dataset, out=tmp_path / "s", **kwargs)
    np.testing.assert_array_equal(np.asarray(store.cls(1)), np.asarray(reference.cls(1)))
    assert store.skipped == reference.skipped


def test_decode_workers_write_the_same_store(encoder, image_folder, tmp_path):
    """Decoding and preprocessing in 2 DataLoader processes gives the threads' store byte for
    byte, unreadable images skipped and listed the same way."""
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "n01443537" / "broken.png").write_bytes(b"\x89PNG not really")
    (data / "n01443537" / "zz_broken.png").write_bytes(b"broken")
    files = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        extract(encoder, ImageFolder(data), layers=[0, 1], tokens="both", out=out,
                batch_size=3, shard_images=6, decode_workers=workers, progress=False)  # fmt: skip
        files[workers] = {
            p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
        }
    assert len(json.loads(files[2][Path("manifest.json")])["skipped"]) == 2  # both listed
    assert files[2] == files[0]
