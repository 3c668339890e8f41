"""Architectures: batched losses equal SAELens's, SAELens round trips, folding, loading rules."""

import copy

import pytest
import sae_lens
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import TrainStepInput

from saekit.sae import (
    SAESpec,
    build_training_sae,
    encode_in_batches,
    load_sae,
    save_sae,
    to_inference,
)
from saekit.sae.recipes import InputNormalizer
from saekit.sae.stacked import StackedSAEs

ARCHS = ["relu", "topk", "batchtopk", "gated", "jumprelu", "matryoshka"]
D = 16


def _members(arch):
    """Two SAEs of one architecture with different λ / k and perturbed (non-trivial) weights."""
    k_arch = arch in ("topk", "batchtopk", "matryoshka")
    specs = [
        SAESpec(arch=arch, d_in=D, expansion=4, seed=seed, **({"k": k} if k_arch else {"l1": l1}))
        for seed, l1, k in ((1, 0.3, 5), (2, 0.7, 3))
    ]
    saes = [build_training_sae(s) for s in specs]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sae in saes:
            for p in sae.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return specs, saes


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_losses_and_gradients_equal_saelens(arch):
    specs, saes = _members(arch)
    stacked = StackedSAEs(copy.deepcopy(saes))
    torch.manual_seed(1)
    x = torch.randn(2, 32, D)
    dead = torch.zeros(2, 64, dtype=torch.bool)
    dead[0, :40] = True  # more dead latents than TopK's k_aux = D // 2 ...
    dead[1, 10:14] = True  # ... and fewer
    warmup = 0.5
    out = stacked.forward_loss(x, warmup, dead)
    out.loss_n.sum().backward()
    for i, (spec, sae) in enumerate(zip(specs, saes, strict=True)):
        coef = {"relu": "l1", "gated": "l1", "jumprelu": "l0"}.get(arch)
        step_input = TrainStepInput(
            sae_in=x[i],
            coefficients={coef: warmup * spec.l1} if coef else {},
            dead_neuron_mask=dead[i],
            n_training_steps=0,
            is_logging_step=False,
        )
        theirs = sae.training_forward_pass(step_input)
        theirs.loss.backward()
        assert out.loss_n[i].item() == pytest.approx(theirs.loss.item(), rel=1e-5)
        assert torch.allclose(out.codes_nBS[i], theirs.feature_acts, atol=1e-6)
        for name, p in sae.named_parameters():
            assert torch.allclose(stacked.get_parameter(name).grad[i], p.grad, atol=1e-6), name
        if arch in ("batchtopk", "matryoshka"):  # the running threshold is updated as SAELens does
            assert stacked.topk_threshold[i].item() == pytest.approx(sae.topk_threshold.item())


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_round_trip_both_ways(arch, tmp_path):
    _, saes = _members(arch)
    sae = to_inference(saes[0])
    x = torch.randn(50, D)
    codes = sae.encode(x)
    # saekit saves -> SAELens loads
    save_sae(sae, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    assert type(theirs) is type(sae)
    assert torch.equal(theirs.encode(x), codes)
    # SAELens saves (its own training SAE's inference export) -> saekit loads
    saes[0].save_inference_model(tmp_path / "native")
    ours = load_sae(tmp_path / "native")
    assert torch.equal(ours.encode(x), codes)
    assert torch.allclose(ours.decode(codes), sae.decode(codes))


def test_batchtopk_saves_as_jumprelu_with_its_running_threshold():
    _, saes = _members("batchtopk")
    saes[0].topk_threshold.fill_(0.25)
    sae = to_inference(saes[0])
    assert isinstance(sae, sae_lens.JumpReLUSAE)
    assert torch.allclose(sae.threshold, torch.full((64,), 0.25))


def test_topk_encodes_exactly_k_latents():
    _, saes = _members("topk")
    sae = to_inference(saes[1])  # k = 3
    codes = sae.encode(torch.randn(200, D) + 1.0)
    assert ((codes != 0).sum(-1) == 3).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_normalisation_encodes_raw_inputs(arch):
    _, saes = _members(arch)
    trained_on_normalised = to_inference(saes[0])
    torch.manual_seed(2)
    raw = torch.randn(40, D) * 3 + 5
    norm = InputNormalizer.fit(raw)
    folded = copy.deepcopy(trained_on_normalised)
    norm.fold_into(folded)
    expected = trained_on_normalised.encode(norm(raw))
    assert torch.allclose(folded.encode(raw), expected, atol=1e-4)
    decoded = trained_on_normalised.decode(expected) / norm.scale + norm.mean_D
    assert torch.allclose(folded.decode(expected), decoded, atol=1e-4)


def test_pre_activation_codes_skip_the_nonlinearity():
    cfg = StandardSAEConfig(d_in=4, d_sae=6)
    sae = StandardSAE(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(9, 4)
    pre = encode_in_batches(sae, x, batch_size=4, pre_activation=True)
    assert torch.allclose(pre, (x - sae.b_dec) @ sae.W_enc + sae.b_enc, atol=1e-6)
    assert (pre < 0).any()
    assert torch.allclose(
        encode_in_batches(sae, x.numpy(), batch_size=4), torch.relu(pre), atol=1e-6
    )
    with pytest.raises(ValueError, match="d_in=4"):
        encode_in_batches(sae, torch.randn(3, 5))


def test_load_refuses_pickles_and_says_why(tmp_path):
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "sae.pt")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_sae(tmp_path)


def test_bad_specs_are_reported():
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SAESpec(arch="sigmoid", d_in=4).resolved()
    with pytest.raises(ValueError, match="whole number"):
        SAESpec(arch="topk", d_in=4, k=2.5).resolved()
    assert SAESpec(arch="standard", d_in=4).resolved().arch == "relu"
    with pytest.raises(ValueError, match="d_sae=8"):
        build_training_sae(SAESpec(arch="topk", d_in=4, expansion=2, k=9))
    # A sparsity setting of the other kind would be ignored: it is refused instead.
    with pytest.raises(ValueError, match="k = 8 does not apply to a relu SAE"):
        SAESpec(arch="relu", d_in=4, k=8).resolved()
    with pytest.raises(ValueError, match="does not apply to a topk SAE"):
        SAESpec(arch="topk", d_in=4, l1=3.0).resolved()
    with pytest.raises(ValueError, match="does not apply to a batchtopk SAE"):
        _ = SAESpec(arch="batchtopk", d_in=4, l1=3.0).label
    resolved = SAESpec(arch="topk", d_in=4, k=2).resolved()
    assert resolved.resolved() == resolved  # resolving twice is harmless


def test_unsupported_saelens_options_are_refused():
    sae = build_training_sae(SAESpec(arch="jumprelu", d_in=4, expansion=2))
    sae.cfg.jumprelu_sparsity_loss_mode = "tanh"
    with pytest.raises(NotImplementedError, match="SAETrainer"):
        StackedSAEs([sae])


def test_no_dead_latents_means_no_auxiliary_loss_and_still_saelens_loss():
    specs, saes = _members("topk")
    stacked = StackedSAEs(copy.deepcopy(saes))
    x = torch.randn(2, 32, D, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(2, 64, dtype=torch.bool)
    hidden_pre, dec_norm = stacked._topk_pre(x)
    aux = stacked._topk_aux(x, torch.zeros_like(x), hidden_pre, dec_norm, dead)
    assert torch.equal(aux, torch.zeros(2))
    out = stacked.forward_loss(x, 1.0, dead)
    for i, sae in enumerate(saes):
        step = TrainStepInput(sae_in=x[i], coefficients={}, dead_neuron_mask=dead[i],
                              n_training_steps=0, is_logging_step=False)  # fmt: skip
        assert out.loss_n[i].item() == pytest.approx(sae.training_forward_pass(step).loss.item())


def test_matryoshka_prefixes_reconstruct_alone_where_batchtopk_prefixes_do_not():
    """The defining property: every nested prefix is trained to reconstruct, so the first
    eighth of a Matryoshka dictionary explains far more than the first eighth of a plain
    BatchTopK one trained on the same planted data in the same sweep."""
    from saekit.sae import get_recipe, sweep, tensor_batches
    from saekit.sae.architectures import matryoshka_widths
    from saekit.sae.synthetic import atom_recovery, planted_dictionary

    assert matryoshka_widths(128) == [16, 32, 64, 128]
    width = 32
    data = planted_dictionary(n_rows=8192, d_in=width, n_atoms=64, active=3, noise=0.01, seed=0)
    recipe = get_recipe("stevens2025", lr=1e-2, lr_warmup_steps=50, sparsity_warmup_steps=50,
                        batch_size=128, epochs=10, norm_sample_rows=4096,
                        dead_feature_window=50)  # fmt: skip
    specs = [SAESpec(arch=a, d_in=width, expansion=4, k=4, recipe=recipe)
             for a in ("batchtopk", "matryoshka")]  # fmt: skip
    plain, nested = sweep(specs, tensor_batches(data.acts_ND, 128), 64, progress=False)
    assert isinstance(nested, sae_lens.JumpReLUSAE)  # saved as SAELens saves a Matryoshka SAE
    x = data.acts_ND[:2000]
    total = (x - x.mean(0)).pow(2).sum()

    def explained(sae, prefix):
        with torch.no_grad():
            codes = sae.encode(x)
            codes[:, prefix:] = 0
            return float(1 - (sae.decode(codes) - x).pow(2).sum() / total)

    assert explained(nested, 128) > 0.85 and atom_recovery(nested.W_dec, data.atoms_AD) >= 0.5
    assert explained(nested, 16) > 2 * explained(plain, 16)
    assert explained(nested, 32) > 2 * explained(plain, 32)


@pytest.mark.parametrize("arch", ["relu", "topk", "gated"])
def test_bf16_autocast_trains_float32_weights_to_float32_quality(arch):
    """autocast='bfloat16' runs the stacked forward and backward in bf16 (the custom autograd
    functions cast by hand) and leaves float32 weights of the same quality."""
    from saekit.sae import get_recipe, sweep, tensor_batches
    from saekit.sae.synthetic import atom_recovery, planted_dictionary

    data = planted_dictionary(n_rows=8192, d_in=32, n_atoms=64, active=3, noise=0.01, seed=0)
    recipe = get_recipe("stevens2025", lr=1e-2, lr_warmup_steps=50, sparsity_warmup_steps=50,
                        batch_size=128, epochs=10, norm_sample_rows=4096,
                        dead_feature_window=50)  # fmt: skip
    sparsity = {"k": 4} if arch == "topk" else {"l1": 0.2}
    spec = SAESpec(arch=arch, d_in=32, expansion=4, recipe=recipe, **sparsity)
    x = data.acts_ND[:2000]
    total = (x - x.mean(0)).pow(2).sum()
    explained = {}
    for precision in (None, "bfloat16"):
        (sae,) = sweep([spec], tensor_batches(data.acts_ND, 128), 64, progress=False,
                       autocast=precision)  # fmt: skip
        assert sae.W_dec.dtype == torch.float32
        with torch.no_grad():
            explained[precision] = float(1 - (sae.decode(sae.encode(x)) - x).pow(2).sum() / total)
        assert atom_recovery(sae.W_dec, data.atoms_AD) >= 0.9
    assert abs(explained["bfloat16"] - explained[None]) < 0.01


def test_stacked_encoder_runs_in_bf16_under_autocast():
    specs, saes = _members("relu")
    stacked = StackedSAEs(copy.deepcopy(saes))
    x = torch.randn(2, 16, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stacked.forward_loss(x, 1.0, torch.zeros(2, 64, dtype=torch.bool))
    assert out.codes_nBS.dtype == torch.bfloat16
    out.loss_n.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in stacked.parameters())
