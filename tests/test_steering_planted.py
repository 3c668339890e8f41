"""Chapter 06's planted-truth check (saekit.studies.steering_planted) on the toy pipeline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from saekit.analysis import steering as st
from saekit.studies import steering as study
from saekit.studies import steering_planted as planted

needs_toy = pytest.mark.skipif(
    not (study.TOY_PIPELINE / "model_index.json").is_file(),
    reason="toy text-to-image pipeline not built; run `python -m saekit.mini.toy_t2i`",
)


def test_planted_features_keep_pure_factor_features_of_rendered_factors():
    descriptive = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3, 4, 5],
            "n_active": [50, 80, 40, 30, 90, 0],
            "top_words": [
                ["fish", "fish", "fish", "a"],  # fish, purity 0.75
                ["fish", "fish", "fish", "fish"],  # fish, purer and more active: kept
                ["red", "striped", "red", "dog"],  # style 0 via two words, purity 0.75
                ["coarse", "coarse", "coarse"],  # frequency is not rendered: left out
                ["bird", "on", "a", "plain"],  # purity 0.25: left out
                ["dog", "dog"],  # never fires: left out
            ],
        }
    )
    table = planted.planted_features(descriptive)
    assert table.feature.tolist() == [1, 2]
    assert table.set_index("feature").loc[2, ["factor", "value_name", "word"]].tolist() == [
        "style",
        "red/striped",
        "red",
    ]
    both = planted.planted_features(descriptive, per_value=2)
    assert both.feature.tolist() == [1, 0, 2]
    with_frequency = planted.planted_features(descriptive, factors=("frequency",))
    assert with_frequency.feature.tolist() == [3]
    assert planted.names_value(["a", "Striped"], "style", 0)
    assert not planted.names_value(["a", "striped"], "style", 1)


def test_summary_reads_its_numbers_from_the_table():
    table = pd.DataFrame(
        {
            "factor": ["group", "group", "style"],
            "original": [0.1, 0.3, 0.0],
            "steered": [0.7, 0.5, 0.1],
            "random direction": [0.1, 0.6, 0.2],
            "random feature": [0.2, 0.1, 0.0],
        }
    )
    text = planted.planted_summary(table, 2.0)
    assert "λ = 2" in text and "**group** features (2): 20% unsteered, **60% steered**" in text
    assert "beats both controls for 1 of 2" in text and "**style** features (1)" in text
    assert "nothing to check" in planted.planted_summary(table.iloc[:0], 2.0)


@needs_toy
def test_steering_along_a_direction_is_add_mode_steering():
    torch.set_num_threads(1)
    pipe = st.load_pipeline(study.TOY_PIPELINE)
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=pipe.text_encoder.config.hidden_size, d_sae=16))
    prompts = ["a red fish", "a photo of a blue bird"]
    config = st.GenerationConfig(num_inference_steps=3)
    reference = st.generate(pipe, prompts, sae, 5, 4.0, seed=1, config=config)
    mine = planted.generate_along(pipe, prompts, sae.W_dec[5].detach() * 3, 4.0, 1, config=config)
    batched = planted.generate_along_each(
        pipe, prompts, torch.stack([sae.W_dec[2], sae.W_dec[5]]).detach(), 4.0, 1, config=config
    )
    for a, b, c in zip(reference, mine, batched[1], strict=True):
        a, b, c = (np.asarray(x, dtype=np.int16) for x in (a, b, c))
        assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() <= 1
    unsteered = st.generate(pipe, prompts, seed=1, config=config)
    assert any(
        np.abs(np.asarray(u, dtype=np.int16) - np.asarray(s, dtype=np.int16)).mean() > 1
        for u, s in zip(unsteered, batched[0], strict=True)
    )
