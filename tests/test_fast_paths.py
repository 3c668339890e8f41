"""The GPU fast paths of SAE training, checked on a CPU: batches assembled off the training thread
(same batches, same order, within the memory budget), a float16 store cast to float32 by the
trainer (the same values as the old host cast), the ``pin_memory`` rule, and ``compile=True``
(equal to eager)."""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch

from saekit.sae import SAESpec, get_recipe, sweep, sweep_from_store, tensor_batches, trainer
from saekit.sae.inputs import prepare_inputs
from saekit.sae.train import _batch_options
from saekit.store_iterator import BACKGROUND_BYTES, StoreBatches, plan_window

SHARDS = (37, 0, 5, 64, 13)  # an empty shard and shards not a multiple of the block


def _write(root, layers=(0, 1), width=6, shards=SHARDS, dtype="float16", seed=0):
    """Per-shard .npy files; column 0 of every row is its global row index (exact in float16
    below 2048), column 1 its layer, the rest noise."""
    files, start = {ly: [] for ly in layers}, 0
    rng = np.random.default_rng(seed)
    for shard, n in enumerate(shards):
        folder = root / f"shard_{shard:05d}"
        folder.mkdir(parents=True)
        for ly in layers:
            array = rng.normal(size=(n, width))
            array[:, 0], array[:, 1] = np.arange(start, start + n), ly
            np.save(folder / f"L{ly}.npy", array.astype(dtype))
            files[ly].append(folder / f"L{ly}.npy")
        start += n
    return files, start


def _reference_order(shards, batch_size, seed, epoch, block_rows, window_rows):
    """The block shuffle the store iterator documents, written out plainly: blocks permuted by
    (seed, epoch), grouped into windows, each window's rows plus the previous leftover
    permuted and cut into batches. Returns each batch's global row ids."""
    blocks, start = [], 0
    for n in shards:
        blocks += [(start + lo, start + min(lo + block_rows, n)) for lo in range(0, n, block_rows)]
        start += n
    rng = np.random.default_rng([seed, epoch])
    windows, rows = [[]], 0
    for b in rng.permutation(len(blocks)):
        lo, hi = blocks[b]
        if rows + hi - lo > window_rows:
            windows, rows = [*windows, []], 0
        windows[-1].append((lo, hi))
        rows += hi - lo
    batches, carried = [], np.zeros(0, np.int64)
    for i, window in enumerate(windows):
        ids = np.concatenate([carried] + [np.arange(lo, hi) for lo, hi in window])
        ids = ids[rng.permutation(len(ids))]
        n_full = len(ids) // batch_size * batch_size
        batches += [ids[s : s + batch_size] for s in range(0, n_full, batch_size)]
        carried = ids[n_full:]
        if i + 1 == len(windows) and len(carried):
            batches.append(carried)
    return batches


# --- off-thread assembly ----------------------------------------------------------------------


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, None])
def test_batches_keep_the_documented_order_and_values(tmp_path, background, dtype):
    """Assembled off the thread or not, in float32 or the store's float16: the batches are the
    block shuffle the iterator has always produced (BATCH_ORDER "block-shuffle/1"), every row
    once, layers aligned, values those of the file."""
    files, n = _write(tmp_path)
    for window_rows, epoch in [(8, 0), (20, 1), (4096, 0)]:
        expected = _reference_order(SHARDS, 7, 3, epoch, 4, window_rows)
        got = list(StoreBatches(files, 7, seed=3, epoch=epoch, block_rows=4,
                                window_rows=window_rows, as_dict=True, dtype=dtype,
                                background=background))  # fmt: skip
        assert len(got) == len(expected)
        stored = {ly: np.concatenate([np.load(p) for p in files[ly]]) for ly in files}
        for batch, ids in zip(got, expected, strict=True):
            for ly in files:
                assert batch[ly].dtype == (torch.float32 if dtype else torch.float16)
                np.testing.assert_array_equal(
                    batch[ly].numpy(), stored[ly][ids].astype(batch[ly].numpy().dtype)
                )


def test_batches_are_assembled_on_the_background_thread(tmp_path, monkeypatch):
    files, _ = _write(tmp_path, layers=(0,))
    builders = []
    original = StoreBatches._batch

    def recording(self, window, picked):
        builders.append(threading.current_thread().name)
        return original(self, window, picked)

    monkeypatch.setattr(StoreBatches, "_batch", recording)
    list(StoreBatches(files, 8, seed=0, epoch=0, background=True))
    assert builders and set(builders) == {"saekit-store-assembler"}
    builders.clear()
    list(StoreBatches(files, 8, seed=0, epoch=0, background=False))
    assert set(builders) == {threading.current_thread().name}


def test_by_default_only_large_batches_are_assembled_off_the_thread(tmp_path):
    """A hand-over between threads costs more than gathering a small batch: by default a batch
    goes to the background thread from BACKGROUND_BYTES (counted in the batches' dtype) on."""
    files, _ = _write(tmp_path, layers=(0, 1), width=64, shards=(10,))
    f32_rows = BACKGROUND_BYTES // (2 * 64 * 4)  # rows of a float32 batch that size
    assert StoreBatches(files, f32_rows, seed=0, epoch=0).background
    assert not StoreBatches(files, f32_rows - 1, seed=0, epoch=0).background
    assert not StoreBatches(files, f32_rows, seed=0, epoch=0, dtype=None).background  # float16
    assert StoreBatches(files, 2 * f32_rows, seed=0, epoch=0, dtype=None).background
    assert StoreBatches(files, 8, seed=0, epoch=0, background=True).background


@pytest.mark.parametrize(("dtype", "ahead"), [(np.float32, 1), (None, 2)])
def test_assembly_runs_at_most_the_planned_batches_ahead(tmp_path, monkeypatch, dtype, ahead):
    """While the caller holds a batch, the assembler builds at most `ahead` more: one float32
    batch, or two float16 ones (the bytes plan_window sets aside for one float32 batch)."""
    files, _ = _write(tmp_path, layers=(0,), shards=(200,))
    built = []
    original = StoreBatches._batch
    monkeypatch.setattr(
        StoreBatches, "_batch", lambda self, w, p: built.append(1) or original(self, w, p)
    )
    source = StoreBatches(files, 8, seed=0, epoch=0, dtype=dtype, background=True)
    assert source.ahead == ahead
    stream = iter(source)
    next(stream)
    time.sleep(0.5)  # ample time to run further ahead, were it allowed to
    assert len(built) == 1 + ahead
    stream.close()


@pytest.mark.parametrize("dtype", [np.float32, None])
def test_batches_in_flight_stay_within_the_budget(tmp_path, dtype):
    """Batches large against the budget: the window, the read-ahead and the batches assembled
    ahead stay within it (numpy's allocations are traced, in every thread), besides the batch
    the caller holds (its own). One float32 batch more in flight would break it."""
    width, budget, batch = 256, 2 << 20, 256
    files, n = _write(tmp_path, layers=(0, 1, 2), width=width, shards=(1500,) * 8)
    source = StoreBatches(files, batch, seed=0, epoch=0, budget=budget, block_rows=32,
                          dtype=dtype, as_dict=True, background=True)  # fmt: skip
    window, _ = plan_window(3 * width * 2, 3 * width * 4, batch, budget, 32, 8)
    assert source.window_rows == window
    held = batch * 3 * width * (4 if dtype else 2)  # the caller's batch
    tracemalloc.start()
    try:
        stream = iter(source)
        seen = len(next(stream)[0])
        time.sleep(0.3)  # the assembler runs as far ahead as it may
        seen += sum(len(b[0]) for b in stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == n
    limit = budget * 1.1 + held
    assert peak < limit, f"peak {peak / 2**20:.2f} MiB, limit {limit / 2**20:.2f} MiB"


def test_an_error_in_the_reader_reaches_the_caller_and_threads_end(tmp_path):
    files, _ = _write(tmp_path, layers=(0,), shards=(40,))
    path = files[0][0]
    path.write_bytes(path.read_bytes()[:-30])
    before = threading.active_count()
    with pytest.raises(OSError, match="truncated"):
        list(StoreBatches(files, 8, seed=0, epoch=0, background=True))
    assert threading.active_count() == before


# --- float16 to the device, pin_memory ---------------------------------------------------------


def test_a_float16_batch_becomes_the_float32_input_the_host_cast_gave():
    """The trainer casts a float16 batch itself (on the device); on a CPU its inputs are
    exactly the float32 values the store iterator's numpy cast used to hand over."""
    rows = np.random.default_rng(0).normal(scale=30, size=(64, 12)).astype(np.float16)
    recipe = get_recipe("stevens2025")  # normalises its inputs: the cast feeds the normaliser
    spec = SAESpec(arch="relu", d_in=12, expansion=2, l1=1.0, recipe=recipe).resolved()
    from saekit.sae.inputs import fit_inputs

    normalizers, _ = fit_inputs([spec], lambda epoch: [torch.from_numpy(rows.astype(np.float32))])
    cpu = torch.device("cpu")
    new = prepare_inputs(torch.from_numpy(rows), [spec], normalizers, cpu, 0, 0)
    old = prepare_inputs(torch.from_numpy(rows.astype(np.float32)), [spec], normalizers, cpu, 0, 0)
    assert new[0].dtype == torch.float32
    assert torch.equal(new[0], old[0])


class NpyStore:
    """The store contract over per-shard .npy files, its ``batches`` optionally taking the
    fast-path keywords (``dtype``, ``pin_memory``) as `ActivationStore.batches` does."""

    def __init__(self, files, n, fast):
        self.files, self.fast, self.seen = files, fast, []
        self.manifest = {"model": "npy", "layers": list(files), "d_model": 6, "n_rows": n}
        self.root = None

    def cls(self, layer):
        return np.concatenate([np.load(p) for p in self.files[layer]])

    def _batches(self, layer, batch_size, *, seed, epoch, **fast):
        layers = layer if isinstance(layer, list) else [layer]
        for batch in StoreBatches({ly: self.files[ly] for ly in layers}, batch_size, seed=seed,
                                  epoch=epoch, block_rows=8, window_rows=40,
                                  as_dict=isinstance(layer, list), **fast):  # fmt: skip
            self.seen.append(batch if torch.is_tensor(batch) else next(iter(batch.values())))
            yield batch

    def batches(self, layer, batch_size, *, tokens="cls", seed=0, epoch=0, **fast):
        assert tokens == "cls" and (self.fast or not fast)
        return self._batches(layer, batch_size, seed=seed, epoch=epoch, **fast)


def _fast_store(files, n):
    store = NpyStore(files, n, fast=True)

    def batches(layer, batch_size, *, tokens="cls", seed=0, epoch=0, dtype=np.float32,
                pin_memory=False):  # fmt: skip
        return NpyStore.batches(store, layer, batch_size, tokens=tokens, seed=seed, epoch=epoch,
                                dtype=dtype, pin_memory=pin_memory)  # fmt: skip

    store.batches = batches
    return store


def test_sweep_on_a_float16_store_equals_the_float32_batches_of_before(tmp_path):
    """A store that takes ``dtype`` hands the trainer its float16 batches; the SAEs trained on
    them equal, bit for bit, those trained on the float32 batches a store without it gives."""
    files, n = _write(tmp_path, width=6, shards=(50, 30, 45))
    recipe = get_recipe("stevens2025", batch_size=16, epochs=2, norm_sample_rows=64)
    sparsity = {"relu": {"l1": 0.5}, "topk": {"k": 3}}
    specs = [SAESpec(arch=a, layer=ly, expansion=2, recipe=recipe, **sparsity[a])
             for a in sparsity for ly in (0, 1)]  # fmt: skip
    fast, plain = _fast_store(files, n), NpyStore(files, n, fast=False)
    new = sweep_from_store(fast, specs, progress=False)
    old = sweep_from_store(plain, specs, progress=False)
    assert {b.dtype for b in fast.seen} == {torch.float16}
    assert {b.dtype for b in plain.seen} == {torch.float32}
    for a, b in zip(new, old, strict=True):
        for name, tensor in a.state_dict().items():
            assert torch.equal(tensor, b.state_dict()[name]), name


def test_pin_memory_follows_the_device_and_needs_cuda(tmp_path):
    files, n = _write(tmp_path, layers=(0,))
    store = _fast_store(files, n)
    assert _batch_options(store, "cpu", None) == {"dtype": None}  # pinned only for CUDA
    assert _batch_options(store, "cpu", False) == {"dtype": None}
    assert _batch_options(NpyStore(files, n, fast=False), "cpu", None) == {}
    if not torch.cuda.is_available():  # torch itself refuses to train there, in its own words
        assert _batch_options(store, "cuda", None) == {"dtype": None}
    if torch.cuda.is_available():
        assert _batch_options(store, "cuda", None) == {"dtype": None, "pin_memory": True}
        batch = next(iter(StoreBatches(files, 8, seed=0, epoch=0, pin_memory=True)))
        assert batch.is_pinned()
        return
    with pytest.raises(ValueError, match="needs CUDA.*pass pin_memory=None"):
        _batch_options(store, "cpu", True)
    with pytest.raises(ValueError, match="needs CUDA.*pass pin_memory=False"):
        StoreBatches(files, 8, seed=0, epoch=0, pin_memory=True)
    spec = SAESpec(arch="relu", expansion=2, l1=1.0, recipe=get_recipe("olson2025", epochs=1))
    with pytest.raises(ValueError, match="needs CUDA"):
        sweep_from_store(store, [spec], pin_memory=True, progress=False)


# --- torch.compile -------------------------------------------------------------------------------

COMPILE_SPECS = [
    SAESpec(arch="relu", d_in=8, expansion=4, l1=0.5, recipe=get_recipe("stevens2025")),
    SAESpec(arch="topk", d_in=8, expansion=4, k=3, recipe=get_recipe("stevens2025")),
    SAESpec(arch="jumprelu", d_in=8, expansion=4, l1=0.05, recipe=get_recipe("stevens2025")),
]


def _train_tiny(**kwargs):
    """Two epochs of 100 rows in batches of 32 (a short last batch: a second shape)."""
    rows = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    return sweep(COMPILE_SPECS, tensor_batches(rows, 32), 4, epochs=2, progress=False, **kwargs)


def _states_close(a_saes, b_saes, atol):
    for a, b in zip(a_saes, b_saes, strict=True):
        for name, tensor in a.state_dict().items():
            torch.testing.assert_close(tensor, b.state_dict()[name], atol=atol, rtol=0, msg=name)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # compiled versions of other tests do not count toward the limit
    yield
    torch._dynamo.reset()


def test_compiled_training_equals_eager(monkeypatch, fresh_dynamo):
    """compile=True traces every group's forward and loss (and AOTAutograd its backward); with
    the "aot_eager" backend (the same graphs, eager kernels; inductor is run by
    benchmarks/fast_paths.py, too slow for this suite) the SAEs equal eager training."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(trainer, "_COMPILE_BACKEND", counter)
    compiled = _train_tiny(compile=True)
    assert counter.frame_count >= len(COMPILE_SPECS)  # each group really was compiled
    _states_close(compiled, _train_tiny(), atol=1e-6)


def test_a_failed_compilation_warns_and_trains_eagerly(monkeypatch, fresh_dynamo):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(trainer, "_COMPILE_BACKEND", no_compiler)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no C\\+\\+ compiler.*eagerly"):
        fallback = _train_tiny(compile=True)
    _states_close(fallback, _train_tiny(), atol=0)


def test_a_recompilation_that_fails_later_falls_back_to_eager(monkeypatch, fresh_dynamo):
    """The short last batch is a new shape and compiles again; when only that compilation fails
    the run warns and goes on eagerly (before: the error stopped training)."""
    from torch._dynamo.backends.common import aot_autograd  # noqa: F401 - loads the backends
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")
    calls = []

    def first_shape_only(graph, example_inputs):
        calls.append(len(calls))
        if len(calls) > len({(s.arch, s.d_in, s.d_sae) for s in COMPILE_SPECS}):
            raise RuntimeError("cannot compile this shape")
        return aot_eager(graph, example_inputs)

    monkeypatch.setattr(trainer, "_COMPILE_BACKEND", first_shape_only)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*cannot compile this shape"):
        fallback = _train_tiny(compile=True)
    assert len(calls) > 1
    _states_close(fallback, _train_tiny(), atol=1e-6)
