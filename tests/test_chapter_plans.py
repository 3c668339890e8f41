"""Every chapter that trains states its resources: its study's needs make a plan in both
profiles (mini against the toy ViT; paper, where the configs are not cached, names what it can)."""

from __future__ import annotations

import pytest

from saekit.book import Chapter
from saekit.studies import choosing_an_sae, layer_sweep, llava, ontology, ood, steering

STUDIES = {
    "01": (layer_sweep.LayerSweepSettings, layer_sweep.resource_needs),
    "02": (ood.OODSettings, ood.resource_needs),
    "03": (ontology.OntologySettings, ontology.resource_needs),
    "06": (steering.SteeringSettings, steering.resource_needs),
    "07": (llava.LlavaSettings, llava.resource_needs),
    "08": (choosing_an_sae.ChoosingSettings, lambda s: s.resource_needs()),
}


@pytest.mark.parametrize("chapter", sorted(STUDIES))
def test_mini_plans_count_what_the_chapter_trains(chapter, tmp_path):
    settings_cls, needs_of = STUDIES[chapter]
    settings = settings_cls.for_profile("mini", device="cpu")
    needs = needs_of(settings)
    plan = Chapter(profile="mini", params={}, workdir=tmp_path).plan(**needs)
    n_specs = sum(
        len(need.specs) if isinstance(need.specs, tuple) else 1 for need in needs["saes"]
    )
    assert len(plan.saes) >= n_specs > 0  # a per-layer need plans one SAE per layer
    assert len(plan.stores) == len(needs.get("stores", []))


def test_layer_sweep_plan_has_one_sae_per_layer_and_lambda(tmp_path):
    settings = layer_sweep.LayerSweepSettings.for_profile("mini")
    plan = Chapter(profile="mini", params={}, workdir=tmp_path).plan(
        **layer_sweep.resource_needs(settings)
    )
    n_lambdas = len({settings.lam, *settings.lambda_sweep})
    assert len(plan.saes) == 6 * n_lambdas  # the toy ViT has 6 layers
