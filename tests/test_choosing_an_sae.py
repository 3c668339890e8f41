"""Chapter 08's study code (saekit.studies.choosing_an_sae): settings, shared requests, verdict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from saekit.runner import chapter_parameters
from saekit.sae.cache import make_request
from saekit.studies import choosing_an_sae as study
from saekit.studies.ood import OODSettings

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "08_choosing_an_sae.py"


def test_settings_fields_are_exactly_the_chapters_parameters():
    declared = chapter_parameters(NOTEBOOK)
    assert list(declared) == [f.name for f in dataclasses.fields(study.ChoosingSettings)]
    for name in study.ChoosingSettings.PAPER:
        assert declared[name] is None, name
    mini = study.ChoosingSettings.for_profile("mini")
    for name, value in declared.items():
        if value is not None:
            assert getattr(mini, name) == (tuple(value) if isinstance(value, list) else value)


class _Store:
    """The manifest part of a store that a request reads."""

    def __init__(self):
        self.manifest = {"identity": {"model": "toy", "n": 1800}, "layers": [5],
                         "widths": {"5": 64}, "d_model": 64}  # fmt: skip


def test_relu_topk_and_gated_are_chapter_02s_requests():
    store = _Store()
    ood = OODSettings.for_profile("mini")
    chapter02 = {make_request(s, store, seed=ood.seed).key
                 for s in ood.grid.specs(layer=5, recipe=ood.recipe)}  # fmt: skip
    mine = study.ChoosingSettings.for_profile("mini")
    requests = {s.arch: make_request(s, store, seed=mine.seed).key for s in mine.specs(5, mine.seed)}
    assert {requests["relu"], requests["topk"], requests["gated"]} <= chapter02
    assert requests["matryoshka"] not in chapter02
    twins = {make_request(s, store).key for s in mine.specs(5, mine.seed + 1)}
    assert not twins & set(requests.values())  # a twin is another SAE


def test_verdict_picks_the_best_in_each_direction():
    table = pd.DataFrame(
        {"explained variance": [0.9, 0.95], "dead": [3, 0], "mean absorption": [0.2, 0.4],
         "sparse probe k=1": [0.7, 0.8], "neuron probe k=1": [0.75, 0.75]},
        index=["a", "b"],
    )  # fmt: skip
    verdicts = study.verdict(table)
    assert verdicts.loc["explained variance", "best"] == "b"
    assert verdicts.loc["dead", "best"] == "b"
    assert verdicts.loc["mean absorption", "best"] == "a"
    assert "1 of 2 SAEs" in study.verdict_text(table, verdicts)


@torch.no_grad()
def test_model_head_is_the_toy_vits_own_classifier():
    from saekit.mini.toyworld import toyvit_path
    from saekit.models import load_encoder

    encoder = load_encoder(toyvit_path())
    head = study.model_head(encoder)
    classifier = transformers.ViTForImageClassification.from_pretrained(toyvit_path()).eval()
    pixels = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    last = encoder.n_layers - 1
    ours = head(encoder.forward_pixels(pixels, layers=[last]).cls[last])
    np.testing.assert_allclose(ours.numpy(), classifier(pixel_values=pixels).logits.numpy(),
                               atol=1e-5)  # fmt: skip


def test_an_encoder_without_a_classifier_has_no_model_head(miniatures):
    from saekit.models import load_encoder

    assert study.model_head(load_encoder(miniatures["dinov2"])) is None


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        study.ChoosingSettings.for_profile("mini", archs=["nope"]).specs(5, 0)[0].resolved()
