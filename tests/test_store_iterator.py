"""The bounded-memory store iterator: every row once per epoch, deterministic for a seed,
layers aligned, memory within the byte budget whatever the store's size."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

from saekit.store_iterator import NpyRows, StoreBatches, plan_window

SHARD_ROWS = (37, 0, 5, 64, 13)  # an empty shard and shards not a multiple of the block


def _write_store(root, layers=(0, 1), width=6, shard_rows=SHARD_ROWS, tokens=1, dtype="float16"):
    """Per-shard .npy files whose rows carry their global row index in column 0 and their
    layer in column 1, so a batch says exactly which rows it holds."""
    files = {ly: [] for ly in layers}
    start = 0
    for shard, n in enumerate(shard_rows):
        folder = root / f"shard_{shard:05d}"
        folder.mkdir(parents=True)
        ids = np.arange(start, start + n * tokens).reshape(n, tokens)
        for ly in layers:
            array = np.random.default_rng(shard).normal(size=(n, tokens, width))
            array[..., 0], array[..., 1] = ids, ly
            path = folder / f"L{ly}.npy"
            np.save(path, array.astype(dtype) if tokens > 1 else array[:, 0].astype(dtype))
            files[ly].append(path)
        start += n * tokens
    return files, start


def _ids(batches, layer=None):
    picked = [b if layer is None else b[layer] for b in batches]
    return np.concatenate([b[:, 0].numpy() for b in picked]).astype(np.int64)


@pytest.mark.parametrize("window_rows", [8, 20, 4096])
def test_every_row_once_per_epoch_and_deterministic(tmp_path, window_rows):
    files, n = _write_store(tmp_path, dtype="float32")
    orders = []
    for epoch in range(2):
        source = StoreBatches(
            files, 7, seed=3, epoch=epoch, block_rows=4, window_rows=window_rows, as_dict=True
        )
        batches = list(source)
        assert [len(b[0]) for b in batches[:-1]] == [7] * (len(batches) - 1)  # carry-over
        ids = _ids(batches, 0)
        assert sorted(ids) == list(range(n))
        np.testing.assert_array_equal(ids, _ids(batches, 1))  # layers stay aligned
        assert all((b[1][:, 1] == 1).all() and (b[0][:, 1] == 0).all() for b in batches)
        again = StoreBatches(
            files, 7, seed=3, epoch=epoch, block_rows=4, window_rows=window_rows, as_dict=True
        )
        np.testing.assert_array_equal(_ids(list(again), 0), ids)
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1])  # each epoch reshuffles
    other_seed = StoreBatches(files, 7, seed=4, epoch=0, block_rows=4, window_rows=window_rows)
    assert not np.array_equal(_ids(list(other_seed)), orders[0])


def test_unshuffled_is_store_order_and_drop_last(tmp_path):
    files, n = _write_store(tmp_path, layers=(2,))
    ids = _ids(StoreBatches(files, 5, seed=0, epoch=0, shuffle=False, block_rows=3, window_rows=9))
    np.testing.assert_array_equal(ids, np.arange(n))
    dropped = list(StoreBatches(files, 5, seed=0, epoch=0, block_rows=3, drop_last=True))
    assert all(len(b) == 5 for b in dropped) and len(dropped) == n // 5


def test_shuffle_mixes_the_whole_store(tmp_path):
    """Blocks come from anywhere in the store: the first window is not the first shard."""
    files, n = _write_store(tmp_path, layers=(0,), shard_rows=(100,) * 8)
    first = _ids([next(iter(StoreBatches(files, 64, seed=0, epoch=0, block_rows=8,
                                         window_rows=64)))])  # fmt: skip
    assert len(np.unique(first // 100)) >= 4  # drawn from at least half of the shards


def test_patch_rows_are_flattened(tmp_path):
    files, n = _write_store(tmp_path, layers=(0,), shard_rows=(3, 4), tokens=5)
    assert n == 35
    assert NpyRows.open(files[0][1]).n_rows == 20
    assert sorted(_ids(StoreBatches(files, 4, seed=0, epoch=0, block_rows=6))) == list(range(n))


def test_memory_stays_within_the_budget(tmp_path):
    """A store 16x the budget is iterated holding at most the budget (numpy's allocations
    are traced), and the window grows with the budget, not with the store."""
    width, budget = 256, 2 << 20
    files, n = _write_store(tmp_path, layers=(0, 1, 2), width=width, shard_rows=(3000,) * 10)
    store_bytes = n * width * 2 * 3
    assert store_bytes > 16 * budget
    source = StoreBatches(files, 64, seed=0, epoch=0, budget=budget, block_rows=32)
    window, readahead = plan_window(3 * width * 2, 3 * width * 4, 64, budget, 32, 8)
    assert source.window_rows == window > budget // (3 * width * 2) // 2
    assert source.readahead_blocks == readahead >= 1
    tracemalloc.start()
    try:
        seen = sum(len(b) for b in source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == n
    assert peak < budget * 1.1, f"peak {peak / 2**20:.2f} MiB for a {budget / 2**20} MiB budget"


def test_small_budget_says_what_to_do_and_reader_stops_early(tmp_path):
    files, _ = _write_store(tmp_path, layers=(0,), width=64, shard_rows=(500,) * 4)
    with pytest.raises(ValueError, match="raise budget"):
        StoreBatches(files, 64, seed=0, epoch=0, budget=4096)
    before = threading.active_count()
    source = iter(StoreBatches(files, 8, seed=0, epoch=0, block_rows=4, window_rows=16))
    next(source)
    source.close()  # abandoning the epoch ends the background reader
    assert threading.active_count() == before


def test_truncated_shard_is_an_error(tmp_path):
    files, _ = _write_store(tmp_path, layers=(0,), shard_rows=(40,))
    path = files[0][0]
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(OSError, match="truncated"):
        list(StoreBatches(files, 8, seed=0, epoch=0))


def test_one_layer_read_alone_comes_in_the_order_of_a_read_of_every_layer(
    miniatures, image_folder, tmp_path
):
    """The window is planned from every layer of the store, so an SAE trained on one layer in a
    run of its own sees the batches it would see in a sweep of all layers (the SAE cache
    treats the two as one request)."""
    from saekit.activations import extract
    from saekit.data import ImageFolder
    from saekit.models import load_encoder
    from saekit.store_iterator import READAHEAD_BLOCKS

    store = extract(load_encoder(miniatures["vit"]), ImageFolder(image_folder), layers="all",
                    tokens="cls", out=tmp_path / "store", dtype="float32")  # fmt: skip
    options = dict(seed=1, epoch=0, budget=12_000, block_rows=2)
    all_bytes = sum(store.width(ly) for ly in store.layers) * 4
    window, _ = plan_window(all_bytes, all_bytes, 4, 12_000, 2, READAHEAD_BLOCKS)
    assert window < store.n_rows  # the window, not the whole store, is shuffled
    together = list(store.batches(store.layers, 4, **options))
    for layer in store.layers:
        alone = list(store.batches(layer, 4, **options))
        assert len(alone) == len(together)
        for single, joint in zip(alone, together, strict=True):
            np.testing.assert_array_equal(single.numpy(), joint[layer].numpy())
