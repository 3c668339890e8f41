"""Chapter 07's planted-truth check (saekit.studies.llava_planted) with known answers."""

from __future__ import annotations

import numpy as np
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from saekit.analysis.multimodal import Responses
from saekit.mini.toyworld import GROUP_OF_CLASS, LEAVES, WNIDS
from saekit.studies import llava_planted as planted


def _identity_sae(d: int) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_factor_values_follow_the_taxonomy():
    wnids = [WNIDS[c] for c in (0, 9, 20)]
    assert planted.factor_values(wnids, "class").tolist() == [0, 1, 2]
    assert planted.factor_values(wnids, "group").tolist() == [GROUP_OF_CLASS[c] for c in (0, 9, 20)]
    assert planted.factor_values(wnids, "style").tolist() == [LEAVES[c].style for c in (0, 9, 20)]
    assert planted.has_planted_truth(wnids)
    assert not planted.has_planted_truth(["n99999999"]) and not planted.has_planted_truth(None)


def test_overlap_is_found_at_the_level_the_features_encode():
    # Two dog and two bird classes; every answer fires one feature, its shape family's, in both
    # modalities: families are told apart, classes within a family are not.
    dogs = [c for c in range(30) if GROUP_OF_CLASS[c] == 0][:2]
    birds = [c for c in range(30) if GROUP_OF_CLASS[c] == 1][:2]
    wnids = [WNIDS[c] for c in dogs + birds]
    acts = [torch.eye(8)[[GROUP_OF_CLASS[c]]] for c in dogs + birds]
    labels = np.arange(4)
    text = Responses(acts, ["x"] * 4, labels, 0)
    image = Responses([a.clone() for a in acts], ["x"] * 4, labels, 0)
    table = planted.planted_overlap(_identity_sae(8), text, image, wnids, 1 / 8, 200, 0)
    by_level = table.set_index("level")
    assert by_level.loc["group", "values"] == 2
    assert by_level.loc["group", "matched Jaccard"] == 1.0
    assert by_level.loc["group", "null mean"] == 0.0 and by_level.loc["group", "p"] < 0.01
    # A mismatched pairing inside a family shares the feature too: classes do not beat chance.
    assert by_level.loc["class", "matched Jaccard"] == 1.0 and by_level.loc["class", "p"] > 0.05
    summary = planted.planted_summary(table)
    assert "by group (2 values): matched Jaccard 1.000 against 0.000" in summary
    assert "by class (4 values)" in summary and "**not** above chance" in summary


def test_answer_scores_read_the_factors_back():
    wnids = [WNIDS[0], WNIDS[9]]
    texts = ["a coarse dotted green fish", "a coarse dotted green fish"]
    responses = Responses([torch.zeros(1, 2)] * 2, texts, np.array([0, 1]), 0)
    scores = planted.answer_scores(responses, wnids)
    assert scores["n"] == 2
    assert scores["group_accuracy"] == (0.5 if GROUP_OF_CLASS[9] != GROUP_OF_CLASS[0] else 1.0)
