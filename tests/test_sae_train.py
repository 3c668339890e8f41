"""Training: planted-dictionary recovery, sweep = sequential, resume = uninterrupted, bad input."""

import json

import numpy as np
import pytest
import torch

from saekit.sae import (
    NonFiniteActivationsError,
    SAESpec,
    get_recipe,
    load_sae,
    load_sweep,
    sweep,
    sweep_from_store,
    tensor_batches,
    train_from_store,
    train_on_tensor,
    train_sae,
)
from saekit.sae.checkpoint import CheckpointMismatchError
from saekit.sae.synthetic import atom_recovery, planted_dictionary
from saekit.sae.train import CHECKPOINT_FILE

D = 32


# --- planted dictionary ---------------------------------------------------------------------------

# A CPU-sized version of stevens2025: higher lr, short warm-ups, dead latents after 50 silent steps.
PLANTED_RECIPE = get_recipe(
    "stevens2025",
    lr=1e-2,
    lr_warmup_steps=50,
    sparsity_warmup_steps=50,
    batch_size=128,
    epochs=10,
    norm_sample_rows=4096,
    dead_feature_window=50,
)
PLANTED_SPECS = [
    SAESpec(arch="relu", d_in=D, expansion=4, l1=0.2, recipe=PLANTED_RECIPE),
    SAESpec(arch="topk", d_in=D, expansion=4, k=4, recipe=PLANTED_RECIPE),
    SAESpec(arch="batchtopk", d_in=D, expansion=4, k=4, recipe=PLANTED_RECIPE),
    SAESpec(arch="gated", d_in=D, expansion=4, l1=0.2, recipe=PLANTED_RECIPE),
    SAESpec(arch="jumprelu", d_in=D, expansion=4, l1=0.02, recipe=PLANTED_RECIPE),
]


@pytest.fixture(scope="module")
def planted():
    data = planted_dictionary(n_rows=8192, d_in=D, n_atoms=64, active=3, noise=0.01, seed=0)
    log = []
    saes = sweep(
        PLANTED_SPECS,
        tensor_batches(data.acts_ND, 128),
        64,
        progress=False,
        on_step=log.append,
    )
    return data, dict(zip([s.arch for s in PLANTED_SPECS], saes, strict=True)), log


@pytest.mark.parametrize("arch", [s.arch for s in PLANTED_SPECS])
def test_every_architecture_recovers_the_planted_atoms(planted, arch):
    data, saes, _ = planted
    sae = saes[arch]
    assert atom_recovery(sae.W_dec, data.atoms_AD, threshold=0.9) >= 0.9
    # and it reconstructs raw inputs (the normalisation travels inside the saved weights)
    x = data.acts_ND[:1000]
    fve = 1 - (sae.decode(sae.encode(x)) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fve > 0.85


def test_topk_l0_is_exactly_k(planted):
    data, saes, _ = planted
    codes = saes["topk"].encode(data.acts_ND[:2000])
    assert ((codes != 0).sum(-1) == 4).all()


def test_unit_norm_decoder_survives_training(planted):
    _, saes, _ = planted
    sae = saes["relu"]
    # decoder rows were unit length in the normalised space; folding divided them by one scale
    scale = sae.cfg.metadata.saekit["input_normalization"]["scale"]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((D * 4,), 1 / scale), rtol=1e-4)


def test_trainer_applies_the_schedules_step_by_step(planted):
    _, _, log = planted
    total = len(log)
    assert total == 640 and [r["step"] for r in log] == list(range(total))
    for record in log:
        step = record["step"]
        assert record["lr"]["relu-x4-l1_0.2-stevens2025"] == pytest.approx(
            PLANTED_RECIPE.lr_at(step, total)
        )
        assert record["sparsity"]["relu-x4-l1_0.2-stevens2025"] == pytest.approx(
            0.2 * PLANTED_RECIPE.sparsity_at(step, total)
        )
    assert log[0]["lr"]["relu-x4-l1_0.2-stevens2025"] == pytest.approx(1e-2 / 50)
    assert (
        log[-1]["mse"]["relu-x4-l1_0.2-stevens2025"] < log[0]["mse"]["relu-x4-l1_0.2-stevens2025"]
    )


# --- sweep = sequential, resume = uninterrupted -----------------------------------------------------


def _two_layer_data(n=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {3: torch.randn(n, 16, generator=gen) + 1.0, 7: 2 * torch.randn(n, 16, generator=gen)}


def _layer_batches(data, batch_size=32):
    def batches(epoch):
        perm = torch.randperm(512, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 512, batch_size):
            yield {layer: x[perm[i : i + batch_size]] for layer, x in data.items()}

    return batches


SWEEP_STEVENS = get_recipe(
    "stevens2025", lr=3e-3, lr_warmup_steps=5, sparsity_warmup_steps=5, norm_sample_rows=256,
    dead_feature_window=4, batch_size=32, epochs=2,
)  # fmt: skip
SWEEP_OLSON = get_recipe("olson2025", lr=3e-3, batch_size=32, epochs=2)
SWEEP_SPECS = [
    SAESpec(arch="relu", d_in=16, expansion=2, l1=0.1, layer=3, recipe=SWEEP_STEVENS, seed=1),
    SAESpec(arch="relu", d_in=16, expansion=2, l1=0.5, layer=7, recipe=SWEEP_STEVENS, seed=2),
    SAESpec(arch="topk", d_in=16, expansion=2, k=2, layer=3, recipe=SWEEP_STEVENS),
    SAESpec(arch="topk", d_in=16, expansion=2, k=5, layer=7, recipe=SWEEP_STEVENS),
    SAESpec(arch="batchtopk", d_in=16, expansion=2, k=3, layer=7, recipe=SWEEP_STEVENS),
    SAESpec(arch="gated", d_in=16, expansion=4, l1=0.05, layer=3, recipe=SWEEP_OLSON),
    SAESpec(arch="relu", d_in=16, expansion=2, l1=2.0, layer=7, recipe=SWEEP_OLSON),
    SAESpec(arch="jumprelu", d_in=16, expansion=2, l1=0.01, layer=3, recipe=SWEEP_OLSON),
]


def _weights(sae):
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_sweep_equals_training_each_sae_alone():
    data = _two_layer_data()
    together = sweep(SWEEP_SPECS, _layer_batches(data), 16, progress=False)
    for spec, sae in zip(SWEEP_SPECS, together, strict=True):
        alone = train_sae(spec, _layer_batches(data), 16, progress=False)
        for name, value in _weights(alone).items():
            assert torch.allclose(_weights(sae)[name], value, rtol=1e-5, atol=1e-6), (
                spec.label,
                name,
            )


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    data = _two_layer_data()
    specs = SWEEP_SPECS[:3] + SWEEP_SPECS[5:7]
    reference = sweep(specs, _layer_batches(data), 16, progress=False)

    class Interrupted(Exception):
        pass

    def dying(epoch):
        for i, batch in enumerate(_layer_batches(data)(epoch)):
            if epoch == 1 and i == 9:
                raise Interrupted
            yield batch

    with pytest.raises(Interrupted):
        sweep(specs, dying, 16, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    saved = tmp_path / CHECKPOINT_FILE
    assert saved.exists() and not list(tmp_path.glob("*.tmp"))
    steps = []
    resumed = sweep(
        specs, _layer_batches(data), 16, checkpoint_dir=tmp_path, checkpoint_every=5,
        progress=False, on_step=lambda record: steps.append(record["step"]),
    )  # fmt: skip
    assert steps == list(range(25, 32))  # picked up at the last checkpoint (step 25), not at 0
    for a, b in zip(reference, resumed, strict=True):
        for name, value in _weights(a).items():
            assert torch.allclose(_weights(b)[name], value, rtol=1e-6, atol=1e-7), name


def test_a_checkpoint_of_another_sweep_is_not_resumed(tmp_path):
    data = _two_layer_data()
    sweep(
        SWEEP_SPECS[:1],
        _layer_batches(data),
        16,
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        progress=False,
    )
    with pytest.raises(CheckpointMismatchError, match="other settings .the list of SAEs"):
        sweep(SWEEP_SPECS[1:2], _layer_batches(data), 16, checkpoint_dir=tmp_path, progress=False)


def test_a_checkpoint_is_resumed_only_under_the_run_settings_it_recorded(tmp_path):
    data = _two_layer_data()
    kwargs = dict(checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    first = sweep(SWEEP_SPECS[:1], _layer_batches(data), 16, run={"data_seed": 0}, **kwargs)
    with pytest.raises(CheckpointMismatchError, match="data_seed: checkpoint 0, this run 1"):
        sweep(SWEEP_SPECS[:1], _layer_batches(data), 16, run={"data_seed": 1}, **kwargs)
    with pytest.raises(CheckpointMismatchError, match="epochs: checkpoint 2, this run 3"):
        sweep(SWEEP_SPECS[:1], _layer_batches(data), 16, epochs=3, run={"data_seed": 0}, **kwargs)
    # The same run resumes from the finished state (no step is retrained) to the same weights.
    steps = []
    again = sweep(
        SWEEP_SPECS[:1], _layer_batches(data), 16, run={"data_seed": 0},
        on_step=lambda record: steps.append(record["step"]), **kwargs,
    )  # fmt: skip
    assert steps == [] and torch.equal(again[0].W_dec, first[0].W_dec)


# --- bad input -------------------------------------------------------------------------------------


def test_nan_is_reported_with_its_row_and_never_trained_on():
    x = torch.randn(64, 8)
    x[37, 2] = float("nan")
    spec = SAESpec(arch="relu", d_in=8, expansion=2, recipe=get_recipe("olson2025", epochs=1))
    with pytest.raises(NonFiniteActivationsError, match=r"batch 2, rows \[5\]"):
        train_sae(spec, lambda epoch: x.split(16), 4, progress=False)
    x[37, 2] = float("inf")
    with pytest.raises(NonFiniteActivationsError, match="NaN/Inf"):
        train_sae(spec, lambda epoch: x.split(16), 4, progress=False)


def test_strided_nan_check_names_the_batch_and_keeps_checkpoints_clean(tmp_path):
    """Checked every 4 steps (no device sync per step), a NaN in batch 6 is still reported with
    its batch and row, and no checkpoint holding weights trained on it is written."""
    x = torch.randn(160, 8)
    x[6 * 16 + 3, 1] = float("nan")
    spec = SAESpec(arch="relu", d_in=8, expansion=2, recipe=get_recipe("olson2025", epochs=1))
    seen = []
    with pytest.raises(NonFiniteActivationsError, match=r"epoch 0, batch 6, rows \[3\]"):
        sweep(
            [spec], lambda epoch: x.split(16), 10, progress=False, finite_check_every=4,
            checkpoint_dir=tmp_path, checkpoint_every=7, on_step=lambda r: seen.append(r["step"]),
        )  # fmt: skip
    assert seen == list(range(7))  # trained on up to the stride's end, then stopped
    assert not (tmp_path / CHECKPOINT_FILE).exists()  # step 7's checkpoint was checked first


def test_width_mismatch_is_a_clear_error():
    spec = SAESpec(arch="relu", d_in=8, expansion=2, recipe=get_recipe("olson2025", epochs=1))
    with pytest.raises(ValueError, match="expects d_in=8 .* 12 wide"):
        train_sae(spec, lambda epoch: torch.randn(32, 12).split(16), 2, progress=False)


def test_wrong_steps_per_epoch_is_a_clear_error():
    spec = SAESpec(arch="relu", d_in=8, expansion=2, recipe=get_recipe("olson2025", epochs=1))
    with pytest.raises(ValueError, match="steps_per_epoch is 5"):
        train_sae(spec, lambda epoch: torch.randn(64, 8).split(16), 5, progress=False)
    with pytest.raises(ValueError, match="more than 3"):
        train_sae(spec, lambda epoch: torch.randn(64, 8).split(16), 3, progress=False)


# --- activation stores -------------------------------------------------------------------------------


class TinyStore:
    """The activation-store contract, in memory: two layers of CLS tokens."""

    def __init__(self, cls_by_layer, model="tiny-vit"):
        self._cls = cls_by_layer
        n, d = next(iter(cls_by_layer.values())).shape
        self.manifest = {"model": model, "layers": list(cls_by_layer), "d_model": d, "n_rows": n}
        self.reads = 0

    def cls(self, layer):
        return self._cls[layer]

    def batches(self, layer, batch_size, *, tokens="cls", seed=0, epoch=0):
        """Like the real store: one layer gives tensors, a list of layers gives dicts."""
        assert tokens == "cls"
        layers = layer if isinstance(layer, list) else [layer]
        perm = np.random.default_rng([seed, epoch]).permutation(len(self._cls[layers[0]]))
        for i in range(0, len(perm), batch_size):
            self.reads += 1
            rows = {ly: torch.from_numpy(self._cls[ly][perm[i : i + batch_size]]) for ly in layers}
            yield rows if isinstance(layer, list) else rows[layer]


def _store(n=300, d=16):
    rng = np.random.default_rng(0)
    return TinyStore(
        {
            2: rng.normal(size=(n, d)).astype(np.float32),
            5: rng.normal(size=(n, d)).astype(np.float32),
        }
    )


def test_sweep_from_store_saves_every_sae_with_a_manifest(tmp_path):
    store = _store()
    recipe = get_recipe("olson2025", lr=1e-3, epochs=2)
    specs = [
        SAESpec(arch="relu", layer=2, recipe=recipe, expansion=2),
        SAESpec(arch="topk", layer=5, k=3, recipe=recipe, expansion=2),
    ]
    saes = sweep_from_store(store, specs, batch_size=50, out_dir=tmp_path, progress=False)
    assert store.reads == 2 * 6  # both layers read together, each batch once per epoch
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert [e["name"] for e in manifest["saes"]] == [
        "layer02-relu-x2-l1_10-olson2025",
        "layer05-topk-x2-k3-olson2025",
    ]
    loaded = load_sweep(tmp_path)
    x = torch.from_numpy(store.cls(5)[:20])
    assert torch.equal(loaded["layer05-topk-x2-k3-olson2025"].encode(x), saes[1].encode(x))
    assert saes[0].cfg.metadata.saekit["model"] == "tiny-vit"
    assert not (tmp_path / ".checkpoint" / CHECKPOINT_FILE).exists()
    # the same SAE trained alone from the store ends identical
    alone = train_from_store(store, specs[0], batch_size=50, progress=False)
    assert torch.allclose(alone.W_dec, saes[0].W_dec, atol=1e-6)
    assert load_sae(tmp_path / "layer02-relu-x2-l1_10-olson2025").cfg.d_in == 16


def test_store_errors_name_the_layer_width_and_rows():
    store = _store()
    with pytest.raises(ValueError, match="expects d_in=32 .* layer 2 is 16 wide"):
        train_from_store(store, SAESpec(layer=2, d_in=32), progress=False)
    with pytest.raises(ValueError, match=r"layers \[2, 5\]"):
        train_from_store(store, SAESpec(layer=9), progress=False)
    store.cls(5)[[17, 230], 3] = np.nan
    with pytest.raises(NonFiniteActivationsError, match=r"layer 5 .* \[17, 230\]"):
        train_from_store(store, SAESpec(layer=5), progress=False)


def test_training_on_a_real_miniature_store(miniatures, image_folder, tmp_path):
    from saekit.activations import extract
    from saekit.data import ImageFolder
    from saekit.models import load_encoder

    store = extract(
        load_encoder(miniatures["dinov2"]), ImageFolder(image_folder), layers="0,2",
        tokens="both", out=tmp_path / "store", batch_size=8, shard_images=6, progress=False,
    )  # fmt: skip
    recipe = get_recipe("stevens2025", lr=1e-3, batch_size=4, epochs=2, lr_warmup_steps=2)
    specs = [
        SAESpec(arch="relu", layer=0, expansion=2, recipe=recipe),
        SAESpec(arch="topk", layer=2, k=4, expansion=2, recipe=recipe),
    ]
    saes = sweep_from_store(store, specs, out_dir=tmp_path / "saes", progress=False)
    assert [sae.cfg.d_in for sae in saes] == [32, 32]
    assert saes[1].cfg.metadata.saekit["steps"] == 2 * 4  # 15 images, batch 4
    # one layer read alone gives the same rows in the same order as in the two-layer sweep
    alone = train_from_store(store, specs[1], progress=False)
    assert torch.allclose(alone.W_dec, saes[1].W_dec, atol=1e-6)
    # patch tokens: one row per (image, patch)
    patch = train_from_store(
        store, SAESpec(arch="relu", layer=0, recipe=recipe), tokens="patch", batch_size=40,
        epochs=1, progress=False,
    )  # fmt: skip
    assert patch.cfg.metadata.saekit["steps"] == 6  # 15 images x 16 patches / 40
    x = torch.from_numpy(np.asarray(store.cls(0), dtype=np.float32))
    assert load_sweep(tmp_path / "saes")[specs[0].resolved().label].encode(x).shape == (15, 64)


def test_tensor_batches_visit_every_row_once_per_epoch_reproducibly():
    acts_ND = torch.arange(23.0)[:, None].repeat(1, 3)
    batches = tensor_batches(acts_ND, batch_size=5, seed=1)
    epoch0 = list(batches(0))
    assert [len(b) for b in epoch0] == [5, 5, 5, 5, 3]
    rows0 = torch.cat(epoch0)[:, 0]
    assert sorted(rows0.tolist()) == list(range(23))
    assert torch.equal(torch.cat(list(batches(0)))[:, 0], rows0)  # same epoch, same order
    assert not torch.equal(torch.cat(list(batches(1)))[:, 0], rows0)  # next epoch reshuffles
    # (seed, epoch) pairs do not collide the way seed + epoch would.
    other = torch.cat(list(tensor_batches(acts_ND, 5, seed=0)(2)))[:, 0]
    assert not torch.equal(other, rows0)


def test_train_on_tensor_checks_its_input():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        train_on_tensor(SAESpec(arch="relu"), torch.zeros(5))


def test_threads_follow_the_step_size_and_are_restored():
    from saekit.distributed import threads_for

    assert threads_for([(128, 1024)], 64, cores=2) == 1  # the mini book's SAE: 0.1 GFLOP a step
    assert threads_for([(768, 6144)], 4096, cores=2) == 2  # paper size: 232 GFLOP a step
    assert threads_for([(768, 6144)] * 12, 128, cores=16) == 16  # a 12-SAE paper sweep
    before = torch.get_num_threads()
    seen = []
    spec = SAESpec(arch="relu", d_in=8, expansion=2, recipe=get_recipe("olson2025", epochs=1))
    x = torch.randn(64, 8)
    sweep([spec], lambda epoch: x.split(16), 4, progress=False, threads=3,
          on_step=lambda r: seen.append(torch.get_num_threads()))  # fmt: skip
    assert seen == [3] * 4 and torch.get_num_threads() == before
