"""Streamed inputs (saekit.streams, saekit.stream_extract): WebDataset tar shards and Hugging Face
streaming parquet shards extract into the store `extract` writes from the same images listed,
byte for byte; decode workers change nothing; a killed run resumes; the CLI reads `wds:`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import WNIDS
from PIL import Image

from saekit.activations import ActivationStore, StoreMismatchError, extract
from saekit.cli import main as cli_main
from saekit.data import ImageList, load_dataset
from saekit.models import load_encoder
from saekit.stream_extract import CHUNK_STRIDE, _warn_idle
from saekit.streams import HFStreamingImages, StreamSample, WebDatasetImages

SIZES = (6, 6, 4)  # samples per source: 3 sources, 16 samples, one of them corrupt
CORRUPT = 8  # global position of the corrupt sample (source 1, chunk 0, third sample)
KW = dict(layers=[0, 1], tokens="both", batch_size=2, shard_images=3, progress=False)


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (36, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples() -> list[tuple[str, bytes, int]]:
    """(key, image bytes, label) of every sample in order; sample CORRUPT is not an image."""
    out = []
    for n in range(sum(SIZES)):
        data = b"\x89PNG not really" if n == CORRUPT else _png(n)
        out.append((f"img{n:03d}", data, n % 3))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".saekit.lock"
    }


def write_tars(folder: Path, json_labels: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    samples, paths, start = _samples(), [], 0
    for k, size in enumerate(SIZES):
        path = folder / f"data-{k:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for key, data, label in samples[start : start + size]:
                sample = {"__key__": key, "png": data}
                sample.update({"json": {"label": label}} if json_labels else {"cls": label})
                sink.write(sample)
        paths.append(path)
        start += size
    return paths


def write_parquets(folder: Path) -> list[Path]:
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(WNIDS))}
    )
    samples, paths, start = _samples(), [], 0
    for k, size in enumerate(SIZES):
        rows = samples[start : start + size]
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": d, "path": None} for _, d, _ in rows],
             "label": [label for _, _, label in rows]},
            features=features,
        )  # fmt: skip
        paths.append(folder / f"part-{k:05d}.parquet")
        table.to_parquet(str(paths[-1]))
        start += size
    return paths


@pytest.fixture(scope="module")
def encoder(miniatures):
    return load_encoder(miniatures["dinov2"])


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    return write_tars(tmp_path_factory.mktemp("tars"))


@pytest.fixture(scope="module")
def tar_store(encoder, tars, tmp_path_factory):
    out = tmp_path_factory.mktemp("tar-store") / "s"
    pattern = str(tars[0].parent / "data-{000000..000002}.tar")
    return extract(encoder, WebDatasetImages(pattern, classes=list(WNIDS)), out=out, **KW)


def test_tar_store_equals_the_listed_images_store_byte_for_byte(encoder, tar_store, tmp_path):
    """Known answer: the same images as an ImageList in the same order, same shards and batches."""
    pairs = []
    for n, (key, data, label) in enumerate(_samples()):
        path = tmp_path / "files" / f"{n:03d}_{key}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        pairs.append((path, label))
    listed = extract(encoder, ImageList.from_pairs(pairs, wnids=WNIDS), out=tmp_path / "l", **KW)
    for layer in (0, 1):
        for kind in ("cls", "patches"):
            ours, theirs = getattr(tar_store, kind)(layer), getattr(listed, kind)(layer)
            assert np.asarray(ours).tobytes() == np.asarray(theirs).tobytes(), (layer, kind)
    np.testing.assert_array_equal(tar_store.labels, listed.labels)
    np.testing.assert_array_equal(tar_store.rows, listed.rows)  # the corrupt one's place kept
    assert [s["index"] for s in tar_store.skipped] == [s["index"] for s in listed.skipped]


def test_tar_store_has_every_readable_sample_once_with_its_id_and_label(tar_store):
    samples = _samples()
    readable = [n for n in range(len(samples)) if n != CORRUPT]
    names = [f"data-{k:06d}.tar" for k, size in enumerate(SIZES) for _ in range(size)]
    assert tar_store.image_ids == [f"{names[n]}/{samples[n][0]}" for n in readable]
    assert list(tar_store.labels) == [samples[n][2] for n in readable]
    assert tar_store.n_rows == 15 and tar_store.manifest["n_images"] == 16
    (skipped,) = tar_store.skipped
    assert skipped["id"] == "data-000001.tar/img008" and skipped["index"] == CORRUPT
    assert "Cannot read image data-000001.tar/img008" in skipped["error"]
    assert tar_store.wnids == list(WNIDS) and tar_store.class_names[0] == "tench"
    # Shard k of source s is s * CHUNK_STRIDE + k: 2 + 2 + 2 chunks of 3 samples (4 = 3 + 1).
    indices = [s["index"] for s in tar_store.manifest["shards"]]
    assert indices == [c + s * CHUNK_STRIDE for s in range(3) for c in range(2)]
    assert [s["row_offset"] for s in tar_store.manifest["shards"]] == [0, 3, 6, 9, 12, 15]


def test_hf_streaming_parquet_store_equals_the_tar_store(encoder, tar_store, tmp_path):
    files = write_parquets(tmp_path / "pq")
    images = HFStreamingImages("parquet", data_files=[str(f) for f in files])
    assert images.sources == [str(f) for f in files] and images.wnids == list(WNIDS)
    store = extract(encoder, images, out=tmp_path / "s", **KW)
    for layer in (0, 1):
        assert (
            np.asarray(store.patches(layer)).tobytes()
            == np.asarray(tar_store.patches(layer)).tobytes()
        )
    np.testing.assert_array_equal(store.rows, tar_store.rows)
    assert store.image_ids[:2] == ["part-00000.parquet/0", "part-00000.parquet/1"]
    assert store.skipped[0]["id"] == "part-00001.parquet/2"


def test_two_decode_workers_write_the_same_store(encoder, tars, tar_store, tmp_path, recwarn):
    images = WebDatasetImages([str(t) for t in tars], classes=list(WNIDS))
    extract(encoder, images, out=tmp_path / "w2", decode_workers=2, **KW)
    assert _files(tmp_path / "w2") == _files(tar_store.root)
    assert not [w for w in recwarn if "sit idle" in str(w.message)]  # 3 sources, 2 readers


def test_fewer_sources_than_readers_warns_how_to_reshard():
    with pytest.warns(UserWarning, match=r"3 sources for 2 rank\(s\) x 2 .*1 reader\(s\) sit idle"):
        _warn_idle(3, 2, 2)


class KillAt:
    """A stream that dies (like Ctrl-C) when sample `kill_id` is decoded, and counts which
    sources were opened."""

    def __init__(self, images, kill_id: str | None) -> None:
        self.images, self.kill_id, self.opened = images, kill_id, []
        self.sources, self.class_names = images.sources, images.class_names
        self.wnids, self.fingerprint = images.wnids, images.fingerprint

    def iter_source(self, index):
        self.opened.append(index)
        for sample in self.images.iter_source(index):
            if sample.image_id == self.kill_id:
                yield StreamSample(sample.image_id, sample.label, _interrupt)
            else:
                yield sample


def _interrupt():
    raise KeyboardInterrupt


def test_killed_run_resumes_to_the_same_store_and_other_arguments_are_refused(
    encoder, tars, tar_store, tmp_path
):
    images = WebDatasetImages([str(t) for t in tars], classes=list(WNIDS))
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):  # in source 1's second chunk
        extract(encoder, KillAt(images, "data-000001.tar/img010"), out=out, **KW)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1, CHUNK_STRIDE]
    assert not manifest["complete"] and not (out / "image_ids.json").exists()
    with pytest.raises(RuntimeError, match="incomplete"):
        ActivationStore.open(out)
    kept = (out / "shard_00001" / "L1_cls.npy").stat().st_ino

    resumed = KillAt(images, None)
    extract(encoder, resumed, out=out, **KW)
    assert resumed.opened == [1, 2]  # source 0 ended in a committed chunk: not opened again
    assert _files(out) == _files(tar_store.root)
    assert (out / "shard_00001" / "L1_cls.npy").stat().st_ino == kept  # not rewritten
    with pytest.raises(StoreMismatchError, match="shard_images"):
        extract(encoder, images, out=out, **{**KW, "shard_images": 4})
    with pytest.raises(StoreMismatchError, match="dataset"):
        extract(encoder, WebDatasetImages([str(t) for t in tars[:2]]), out=out, **KW)


def test_a_source_rewritten_under_its_name_is_refused_on_resume(encoder, tmp_path):
    """Same name and size (so the same fingerprint), other samples: the resume checks the ids of
    the chunks it passes over and refuses, instead of mixing old and new samples."""
    tars = write_tars(tmp_path / "t")
    images = WebDatasetImages([str(t) for t in tars], classes=list(WNIDS))
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):  # source 1's first chunk committed, then killed
        extract(encoder, KillAt(images, "data-000001.tar/img010"), out=out, **KW)
    size = tars[1].stat().st_size
    with wds.TarWriter(str(tars[1])) as sink:  # keys of the same length: the same tar size
        for key, data, label in _samples()[SIZES[0] : SIZES[0] + SIZES[1]]:
            sink.write({"__key__": key.replace("img", "new"), "png": data, "cls": label})
    assert tars[1].stat().st_size == size
    rewritten = WebDatasetImages([str(t) for t in tars], classes=list(WNIDS))
    assert rewritten.fingerprint == images.fingerprint
    with pytest.raises(StoreMismatchError, match=r"data-000001.tar changed .*new006.*img006"):
        extract(encoder, rewritten, out=out, **KW)


def test_labels_from_json_and_classes_numbered_when_not_given(encoder, tmp_path):
    write_tars(tmp_path / "t", json_labels=True)
    store = extract(encoder, WebDatasetImages(str(tmp_path / "t")), out=tmp_path / "s", **KW)
    assert list(store.labels[:4]) == [0, 1, 2, 0]
    assert store.class_names == ["0", "1", "2"] and store.wnids is None


def test_stream_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="No tar shards match"):
        WebDatasetImages(str(tmp_path / "train-{000..003}.tar"))
    tars = write_tars(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="1 of the 4 tar shards"):
        WebDatasetImages(str(tmp_path / "t" / "data-{000000..000003}.tar"))
    with pytest.raises(ValueError, match="outside the 2 classes"):
        list(WebDatasetImages(str(tars[0]), classes=["a", "b"]).iter_source(0))
    with wds.TarWriter(str(tmp_path / "odd.tar")) as sink:
        sink.write({"__key__": "a", "txt": "no image", "cls": 0})
        sink.write({"__key__": "b", "png": _png(0)})
    with pytest.raises(ValueError, match=r"odd.tar/a has no image member .*image_keys="):
        next(WebDatasetImages(str(tmp_path / "odd.tar")).iter_source(0))
    samples = WebDatasetImages(str(tmp_path / "odd.tar"), image_keys=("png", "txt")).iter_source(0)
    next(samples)
    with pytest.raises(ValueError, match=r"odd.tar/b has no label: no .cls member"):
        next(samples)
    cut = tmp_path / "cut.tar"  # a truncated shard: tarfile's ReadError, not an OSError
    cut.write_bytes(tars[0].read_bytes()[:700])
    with pytest.raises(OSError, match=r"cut.tar failed .*Restore the identical shard"):
        list(WebDatasetImages(str(cut)).iter_source(0))
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WNIDS) + "\n")
    named = WebDatasetImages(str(tars[0]), classes=classes)
    assert named.wnids == list(WNIDS) and named.class_names[1] == "goldfish"


def test_load_dataset_reads_the_prefixes_and_refuses_flags_that_do_not_apply(tmp_path):
    tars = write_tars(tmp_path / "t")
    images = load_dataset(f"wds:{tmp_path}/t/data-{{000000..000002}}.tar")
    assert isinstance(images, WebDatasetImages) and images.sources == [str(t) for t in tars]
    with pytest.raises(ValueError, match="classes= applies to wds:"):
        load_dataset(str(tmp_path / "t"), classes="x.txt")
    with pytest.raises(ValueError, match="streaming=True applies to hf:"):
        load_dataset(f"wds:{tmp_path}/t", streaming=True)
    write_parquets(tmp_path / "pq")
    streamed = load_dataset(f"hf:{tmp_path}/pq", streaming=True)
    assert isinstance(streamed, HFStreamingImages) and len(streamed.sources) == 3


def test_cli_extracts_tar_shards(miniatures, tars, tar_store, tmp_path, capsys):
    classes = tmp_path / "wnids.txt"
    classes.write_text("\n".join(WNIDS))
    pattern = f"wds:{tars[0].parent}/data-{{000000..000002}}.tar"
    args = ["extract", "--model", str(miniatures["dinov2"]), "--data", pattern, "--classes",
            str(classes), "--layers", "0,1", "--tokens", "both", "--batch-size", "2",
            "--shard-images", "3", "--workers", "0", "--out", str(tmp_path / "s")]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "rows=15" in printed and "1 unreadable images were skipped" in printed
    assert _files(tmp_path / "s") == _files(tar_store.root)
    wrong = ["extract", "--model", str(miniatures["dinov2"]), "--data", str(tars[0].parent),
             "--classes", str(classes), "--out", str(tmp_path / "x")]  # fmt: skip
    assert cli_main(wrong) == 2
    assert "--classes applies to WebDataset tar shards" in capsys.readouterr().err
    wrong[4:7] = [pattern, "--streaming"]
    assert cli_main(wrong) == 2
    assert "--streaming applies to Hugging Face datasets" in capsys.readouterr().err


def test_a_kill_at_every_file_system_step_resumes_to_the_identical_store(
    encoder, tmp_path, monkeypatch
):
    """Two sources of 3 samples (one unreadable), 2 per shard: killed at each step of the commit
    protocol (tests/fault_injection.py), the rerun ends with the uninterrupted run's files."""
    from fault_injection import Crash, FaultInjector, count_steps, folder_bytes

    folder = tmp_path / "tars"
    folder.mkdir()
    samples = _samples()[6:12]  # source 1 of write_tars: img008 is the corrupt one
    for k in range(2):
        with wds.TarWriter(str(folder / f"s{k}.tar")) as sink:
            for key, data, label in samples[3 * k : 3 * k + 3]:
                sink.write({"__key__": key, "png": data, "cls": label})
    images = WebDatasetImages(str(folder))
    settings = dict(layers=[1], tokens="cls", batch_size=2, shard_images=2, progress=False)
    steps = count_steps(
        monkeypatch, lambda: extract(encoder, images, out=tmp_path / "ref", **settings)
    )
    reference = folder_bytes(tmp_path / "ref")
    assert "image_ids.json" in reference and len(steps) > 30
    failures = []
    for n in range(1, len(steps) + 1):
        out = tmp_path / f"run{n}"
        injector = FaultInjector(fail_at=n, error=Crash).install(monkeypatch)
        try:
            extract(encoder, images, out=out, **settings)
        except Crash:
            pass
        monkeypatch.undo()
        store = extract(encoder, images, out=out, **settings)
        if folder_bytes(out) != reference or store.n_rows != 5:
            failures.append((n, injector.failed))
    assert not failures, f"runs killed at these steps did not resume identically: {failures}"
