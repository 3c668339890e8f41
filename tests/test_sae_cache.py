"""The one SAE cache: equal requests share a folder, unequal ones never do, nothing half-written."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_sae_train import _store

from saekit.sae import SAESpec, get_recipe, sweep_from_store, train_on_tensor
from saekit.sae import cache as sae_cache
from saekit.sae.cache import CacheMismatchError, make_request, train_or_load


def _weights(sae):
    return {name: p.detach().clone() for name, p in sae.state_dict().items()}


RECIPE = get_recipe("olson2025", epochs=2, batch_size=32)


def _specs():
    return [
        SAESpec(arch="relu", layer=2, expansion=2, l1=1.0, recipe=RECIPE),
        SAESpec(arch="topk", layer=5, expansion=2, k=3, recipe=RECIPE),
    ]


def _count_sweeps(monkeypatch):
    calls = []
    real = sae_cache.sweep_from_store

    def counting(store, specs, **kwargs):
        calls.append([spec.label for spec in specs])
        return real(store, specs, **kwargs)

    monkeypatch.setattr(sae_cache, "sweep_from_store", counting)
    return calls


def test_second_equal_request_is_a_cache_hit_with_identical_weights(tmp_path, monkeypatch):
    store = _store()
    calls = _count_sweeps(monkeypatch)
    first = train_or_load(_specs(), store, root=tmp_path, progress=False)
    again = train_or_load(_specs(), store, root=tmp_path, progress=False)
    assert len(calls) == 1 and list(first) == list(again)
    for name in first:
        for key, value in _weights(first[name]).items():
            torch.testing.assert_close(_weights(again[name])[key], value)


def test_one_spec_of_an_earlier_sweep_is_a_hit_and_a_new_one_trains_alone(tmp_path, monkeypatch):
    store = _store()
    calls = _count_sweeps(monkeypatch)
    train_or_load(_specs(), store, root=tmp_path, progress=False)
    single = train_or_load(_specs()[1], store, root=tmp_path, progress=False)
    assert len(calls) == 1 and single.cfg.d_sae == 32
    other = dataclasses.replace(_specs()[0], seed=7)
    train_or_load([_specs()[0], other], store, root=tmp_path, progress=False)
    assert calls[1] == [make_request(other, store).spec.label]


def test_cached_sae_equals_a_direct_sweep(tmp_path):
    store = _store()
    cached = train_or_load(_specs(), store, root=tmp_path, progress=False, seed=3)
    direct = sweep_from_store(store, _specs(), seed=3, epochs=2, batch_size=32, progress=False)
    for sae, (name, hit) in zip(direct, cached.items(), strict=True):
        assert sae.cfg.metadata.saekit["name"] == name
        torch.testing.assert_close(hit.W_dec, sae.W_dec)


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": 1},
        {"batch_size": 16},
        {"seed": 1},
        {"tokens": "patch"},
    ],
)
def test_everything_that_sets_the_weights_changes_the_folder(change):
    store = _store()
    base = make_request(_specs()[0], store)
    assert make_request(_specs()[0], store, **change).key != base.key


def test_another_batch_order_changes_the_folder(monkeypatch):
    store = _store()
    base = make_request(_specs()[0], store)
    monkeypatch.setattr(sae_cache, "BATCH_ORDER", "some-other-order/2")
    assert make_request(_specs()[0], store).key != base.key


def test_another_store_or_another_lambda_changes_the_folder():
    store = _store()
    base = make_request(_specs()[0], store)
    other_model = _store()
    other_model.manifest["model"] = "another-vit"
    assert make_request(_specs()[0], other_model).key != base.key
    assert make_request(dataclasses.replace(_specs()[0], l1=2.0), store).key != base.key
    # the device an SAE trains on is not part of what it is
    assert make_request(_specs()[0], store).folder("r") == base.folder("r")


def test_folder_that_disagrees_with_its_name_is_refused(tmp_path):
    store = _store()
    train_or_load(_specs()[0], store, root=tmp_path, progress=False)
    request = make_request(_specs()[0], store)
    saved = request.folder(tmp_path) / sae_cache.REQUEST_FILE
    tampered = json.loads(saved.read_text()) | {"epochs": 99}
    saved.write_text(json.dumps(tampered))
    with pytest.raises(CacheMismatchError, match="Delete the folder"):
        train_or_load(_specs()[0], store, root=tmp_path, progress=False)


def test_interrupted_save_leaves_no_folder_a_later_run_trusts(tmp_path, monkeypatch):
    store = _store()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sae_cache.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        train_or_load(_specs()[0], store, root=tmp_path, progress=False)
    monkeypatch.undo()
    assert sae_cache.cached(make_request(_specs()[0], store), tmp_path) is None
    sae = train_or_load(_specs()[0], store, root=tmp_path, progress=False)
    assert sae_cache.cached(make_request(_specs()[0], store), tmp_path) is not None
    assert sae.cfg.d_in == 16


def test_in_memory_rows_are_keyed_by_their_content(tmp_path):
    rows = torch.from_numpy(np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32))
    spec = SAESpec(arch="relu", expansion=2, l1=1.0, recipe=RECIPE)
    first = train_or_load(spec, rows, root=tmp_path, progress=False)
    direct = train_on_tensor(spec, rows, batch_size=32, epochs=2, progress=False)
    torch.testing.assert_close(first.W_dec, direct.W_dec)
    changed = rows.clone()
    changed[0, 0] += 1.0
    assert make_request(spec, changed).key != make_request(spec, rows).key
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1
