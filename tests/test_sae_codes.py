"""Codes from stores: an SAE is refused on activations it was not trained on, and NaN/Inf rows
are refused (naming them) or excluded (counting them), never ranked or averaged in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saekit.activations import extract
from saekit.analysis.exemplars import scan_store
from saekit.data import ImageFolder
from saekit.models import load_encoder
from saekit.sae import SAESpec, evaluate, get_recipe, train_from_store
from saekit.sae.codes import (
    NonFiniteActivationsError,
    NonFiniteActivationsWarning,
    SAEStoreMismatchError,
    check_sae_matches_store,
    iter_codes,
    merge_top_k,
    sae_provenance,
)
from saekit.sae.synthetic import identity_sae

RECIPE = get_recipe("olson2025", epochs=1, batch_size=5)


@pytest.fixture(scope="module")
def stores(miniatures, image_folder, tmp_path_factory):
    """Two stores of two models with the same shape (DINOv2 miniatures, seeds 0 and 1)."""
    from saekit.mini.miniatures import miniature

    root = tmp_path_factory.mktemp("codes")
    dataset = ImageFolder(image_folder)
    kwargs = dict(layers=[1, 2], tokens="both", progress=False)
    mine = extract(load_encoder(miniatures["dinov2"]), dataset, out=root / "a", **kwargs)
    other_model = load_encoder(miniature("dinov2", root / "seed1", seed=1))
    other = extract(other_model, dataset, out=root / "b", **kwargs)
    cnn = extract(load_encoder(miniatures["resnet"]), dataset, layers=[0], out=root / "c",
                  progress=False)  # fmt: skip
    return mine, other, cnn


@pytest.fixture(scope="module")
def sae(stores):
    mine, _, _ = stores
    spec = SAESpec(arch="relu", layer=1, expansion=2, recipe=RECIPE)
    return train_from_store(mine, spec, progress=False)


def test_the_sae_records_what_it_was_trained_on(sae, stores):
    mine, _, _ = stores
    trained = sae_provenance(sae)
    assert trained["layer"] == 1 and trained["tokens"] == "cls"
    assert trained["model_identity"] == mine.model_identity is not None


def test_an_sae_is_refused_on_another_model_layer_or_token_kind(sae, stores):
    mine, other, cnn = stores
    check_sae_matches_store(sae, mine, 1, "cls")  # what it was trained on: fine
    with pytest.raises(SAEStoreMismatchError, match="trained on model .* weights, config"):
        check_sae_matches_store(sae, other, 1, "cls")
    with pytest.raises(SAEStoreMismatchError, match="trained on layer 1 but is given layer 2"):
        check_sae_matches_store(sae, mine, 2, "cls")
    with pytest.raises(SAEStoreMismatchError, match="trained on cls tokens but is given patch"):
        check_sae_matches_store(sae, mine, 1, "patch")
    with pytest.raises(ValueError, match="expects d_in=32"):
        check_sae_matches_store(sae, cnn, 0, "cls")


def test_scans_check_a_store_array_by_themselves(sae, stores):
    """The reported bug: an SAE of one model's layer was accepted on another model's store of
    the same width. Every scan goes through iter_codes or evaluate, which now refuse it."""
    mine, other, _ = stores
    with pytest.raises(SAEStoreMismatchError, match="trained on model"):
        next(iter_codes(sae, other.cls(1)))
    with pytest.raises(SAEStoreMismatchError, match="layer 2"):
        evaluate(sae, mine.cls(2))
    with pytest.raises(SAEStoreMismatchError, match="trained on model"):
        scan_store(other, sae, 1, rank_by="cls", progress=False)
    assert evaluate(sae, mine.cls(1)).n_rows == 15
    # a plain array carries no provenance: only the width can be checked
    assert evaluate(sae, np.asarray(other.cls(1))).n_rows == 15


def _acts_with_bad_rows():
    acts = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    acts[3, 1] = float("nan")
    acts[8, 0] = float("inf")
    return acts


def test_iter_codes_refuses_nonfinite_rows_naming_them():
    acts = _acts_with_bad_rows()
    acts[3] = 0  # only row 8 is bad: in the third chunk of 3, named by its row in acts
    with pytest.raises(NonFiniteActivationsError, match=r"rows \[8\].*on_nonfinite='zero'"):
        list(iter_codes(identity_sae(4), acts, chunk=3))
    with pytest.raises(NonFiniteActivationsError, match=r"1 activation row.*rows \[3\]"):
        list(iter_codes(identity_sae(4), _acts_with_bad_rows(), chunk=4))


def test_iter_codes_can_give_nonfinite_rows_zero_codes_and_counts_them():
    acts = _acts_with_bad_rows()
    with pytest.warns(NonFiniteActivationsWarning, match=r"2 activation row.*rows \[3, 8\]"):
        codes = torch.cat([c for _, c in iter_codes(identity_sae(4), acts, 4, on_nonfinite="zero")])
    assert (codes[[3, 8]] == 0).all()
    clean = [0, 1, 2, 4, 5, 6, 7, 9]
    torch.testing.assert_close(codes[clean], acts[clean].clamp(min=0))


def test_an_sae_with_nan_weights_is_named():
    sae = identity_sae(4)
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationsError, match="its weights hold NaN"):
        list(iter_codes(sae, torch.ones(3, 4)))


def test_evaluate_refuses_or_skips_nonfinite_rows():
    """The reported bug: after NaN rows reached a store, evaluate returned nan."""
    acts = _acts_with_bad_rows()
    with pytest.raises(NonFiniteActivationsError, match=r"rows \[3, 8\].*on_nonfinite='skip'"):
        evaluate(identity_sae(4), acts)
    skipped = evaluate(identity_sae(4), acts, on_nonfinite="skip", batch_size=3)
    clean = evaluate(identity_sae(4), acts[[0, 1, 2, 4, 5, 6, 7, 9]])
    assert skipped.n_skipped == 2 and skipped.n_rows == clean.n_rows == 8
    assert skipped.mse == pytest.approx(clean.mse) and np.isfinite(skipped.mse)
    assert skipped.l0 == pytest.approx(clean.l0)
    with pytest.raises(NonFiniteActivationsError, match="all 1 evaluation rows"):
        evaluate(identity_sae(4), acts[3:4], on_nonfinite="skip")


def test_merge_top_k_never_ranks_nan_first():
    scores = torch.tensor([[0.5, float("nan"), 2.0, -1.0, float("nan")]])
    values, rows = torch.empty(1, 0), torch.empty(1, 0, dtype=torch.int64)
    for start in range(0, 5, 2):  # in chunks, as a scan does
        chunk = scores[:, start : start + 2]
        values, rows = merge_top_k(values, rows, chunk, torch.arange(start, start + 2), 3)
    assert rows.tolist() == [[2, 0, 3]]
    values, rows = merge_top_k(torch.empty(1, 0), torch.empty(1, 0, dtype=torch.int64),
                               scores, torch.arange(5), 5)  # fmt: skip
    assert rows.tolist() == [[2, 0, 3, 1, 4]]  # the NaN rows last, in row order


def test_the_exemplar_scan_never_ranks_a_nan_row_first(stores, tmp_path):
    """The reported bug: the exemplar scan ranked the NaN row first."""
    import shutil

    from saekit.activations import ActivationStore

    mine, _, _ = stores
    shutil.copytree(mine.root, tmp_path / "s")
    cls = np.load(tmp_path / "s" / "shard_00000" / "L1_cls.npy", mmap_mode="r+")
    cls[4] = np.nan  # a row gone bad on disk
    cls.flush()
    del cls
    broken = ActivationStore.open(tmp_path / "s")
    with pytest.raises(NonFiniteActivationsError, match=r"rows \[4\]"):
        scan_store(broken, identity_sae(32), 1, rank_by="cls", progress=False)
