"""Recipes: schedules against their definitions and SAELens's schedulers, constraints, init."""

import math

import pytest
import torch
from sae_lens.training.optim import CoefficientScheduler, get_lr_scheduler

from saekit.sae import SAESpec, build_training_sae, get_recipe, sweep
from saekit.sae.recipes import (
    InputNormalizer,
    lr_multiplier,
    remove_parallel_grad_,
    renormalize_decoder_,
)


def test_olson2025_numbers_from_the_papers():
    recipe = get_recipe("olson2025")
    total = 1000
    assert (recipe.lr, recipe.batch_size, recipe.epochs, recipe.expansion, recipe.l1) == (
        1e-4,
        64,
        3,
        8,
        10.0,
    )
    assert get_recipe("olson2025_ood").l1 == 0.5
    # 5% linear warm-up, 20% linear decay to zero at the end, 5% λ warm-up.
    assert recipe.lr_at(0, total) == pytest.approx(1e-4 / 50)
    assert recipe.lr_at(24, total) == pytest.approx(1e-4 * 25 / 50)
    assert recipe.lr_at(49, total) == pytest.approx(1e-4)
    assert recipe.lr_at(500, total) == pytest.approx(1e-4)
    assert recipe.lr_at(800, total) == pytest.approx(1e-4)
    assert recipe.lr_at(900, total) == pytest.approx(1e-4 * 100 / 200)
    assert recipe.lr_at(999, total) == pytest.approx(1e-4 / 200)
    assert recipe.sparsity_at(0, total) == 0.0
    assert recipe.sparsity_at(25, total) == pytest.approx(0.5)
    assert recipe.sparsity_at(50, total) == 1.0
    assert recipe.sparsity_at(999, total) == 1.0


def test_stevens2025_warms_up_over_500_steps_then_stays_constant():
    recipe = get_recipe("stevens2025")
    total = 5000
    assert recipe.lr_at(0, total) == pytest.approx(recipe.lr / 500)
    assert recipe.lr_at(249, total) == pytest.approx(recipe.lr / 2)
    assert [recipe.lr_at(s, total) for s in (499, 2000, total - 1)] == [recipe.lr] * 3
    assert recipe.sparsity_at(250, total) == pytest.approx(0.5)
    assert recipe.sparsity_at(500, total) == 1.0
    assert recipe.normalize_inputs and recipe.unit_norm_decoder and recipe.remove_parallel_grads


@pytest.mark.parametrize(
    "name,total", [("olson2025", 400), ("olson2025", 97), ("stevens2025", 1200)]
)
def test_lr_schedule_equals_saelens_scheduler_step_by_step(name, total):
    recipe = get_recipe(name)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=recipe.lr)
    sched = get_lr_scheduler(
        "constant",
        optimizer=opt,
        training_steps=total,
        lr=recipe.lr,
        warm_up_steps=recipe.lr_warmup(total),
        decay_steps=recipe.lr_decay(total),
        lr_end=recipe.lr,
        num_cycles=1,
    )
    ours = [recipe.lr_at(step, total) for step in range(total)]
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name,total", [("olson2025", 400), ("stevens2025", 1200)])
def test_sparsity_schedule_equals_saelens_coefficient_scheduler(name, total):
    recipe = get_recipe(name)
    sched = CoefficientScheduler(warm_up_steps=recipe.sparsity_warmup(total), final_value=recipe.l1)
    theirs = []
    for _ in range(total):
        theirs.append(sched.value)
        sched.step()
    ours = [recipe.l1 * recipe.sparsity_at(step, total) for step in range(total)]
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_warmup_and_decay_overlap_takes_the_smaller_factor():
    # 4 steps with 3 warm-up and 3 decay steps: min((t+1)/3, (4-t)/3)
    assert [lr_multiplier(t, 4, 3, 3) for t in range(4)] == pytest.approx(
        [1 / 3, 2 / 3, 2 / 3, 1 / 3]
    )


def test_remove_parallel_grad_leaves_only_the_orthogonal_part():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(3, 5, 7))
    grad = torch.randn(3, 5, 7)
    W.grad = grad.clone()
    remove_parallel_grad_(W)
    assert (W.grad * W.data).sum(-1).abs().max() < 1e-5
    # adding back the parallel part restores the original gradient
    unit = W.data / W.data.norm(dim=-1, keepdim=True)
    parallel = (grad * unit).sum(-1, keepdim=True) * unit
    assert torch.allclose(W.grad + parallel, grad, atol=1e-5)


def test_renormalize_decoder_gives_unit_rows_and_keeps_directions():
    W = torch.nn.Parameter(torch.randn(2, 6, 4) * 3)
    before = W.data.clone()
    renormalize_decoder_(W)
    assert torch.allclose(W.data.norm(dim=-1), torch.ones(2, 6), atol=1e-6)
    assert torch.allclose(W.data * before.norm(dim=-1, keepdim=True), before, atol=1e-5)


def test_input_normalizer_centres_and_scales_to_the_target_norm():
    torch.manual_seed(0)
    x = torch.randn(500, 8) * 4 + 10
    for target in (1.0, math.sqrt(8)):
        norm = InputNormalizer.fit(x, target)
        y = norm(x)
        assert y.mean(0).abs().max() < 1e-4
        assert y.norm(dim=1).mean().item() == pytest.approx(target, rel=1e-5)


def test_stevens_init_is_kaiming_uniform_with_unit_decoder_rows():
    spec = SAESpec(arch="relu", d_in=16, expansion=8, recipe="stevens2025", seed=3)
    sae = build_training_sae(spec)
    bound = math.sqrt(6 / 128)  # kaiming_uniform_ on W_enc [D, S]: fan_in = S
    assert sae.W_enc.abs().max() <= bound
    assert sae.W_enc.abs().max() > 0.9 * bound
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-6)
    assert not torch.allclose(sae.W_enc, sae.W_dec.T)  # independent draws, unlike SAELens's init
    assert (sae.b_enc == 0).all()
    again = build_training_sae(spec)
    assert torch.equal(sae.W_enc, again.W_enc)  # seeded


def test_olson_init_is_saelens_default():
    sae = build_training_sae(SAESpec(arch="relu", d_in=16, expansion=4, recipe="olson2025"))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((64,), 0.1), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_b_dec_starts_at_the_data_mean():
    torch.manual_seed(0)
    x = torch.randn(256, 8) + torch.arange(8.0)
    # lr 0: nothing moves, so the saved SAE shows the initial b_dec (normalisation folded back).
    recipe = get_recipe("stevens2025", lr=0.0, norm_sample_rows=256, batch_size=64)
    spec = SAESpec(arch="relu", d_in=8, expansion=2, recipe=recipe)
    sae = sweep([spec], lambda epoch: x.split(64), 4, epochs=1, progress=False)[0]
    assert torch.allclose(sae.b_dec, x.mean(0), atol=1e-4)


def test_unknown_recipe_and_fields_are_reported():
    with pytest.raises(ValueError, match="stevens2025"):
        get_recipe("olsen2025")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        get_recipe("olson2025", learning_rate=1.0)
