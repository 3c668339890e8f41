"""Do two modalities share SAE features? Per-class top sets, overlap and a chance level.

Paper 003 §5.1 (Fig. 6): encode what a model computed while answering about a class in text and
about an image of it with one SAE, average per class into a text profile and an image profile,
keep each profile's top ``K = ceil(f S)`` features, and compare the two sets (overlap, Jaccard).
The paper reads the overlap by eye; `permutation_baseline` adds its chance level, the overlap
of mismatched classes (text of class c against the image of another class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE

from saekit.analysis.multimodal import Responses
from saekit.sae.codes import iter_codes


def class_profiles(sae: SAE, responses: Responses, n_classes: int, chunk: int = 4096) -> np.ndarray:
    """Mean SAE activation per class, [C, S]: mean over a response's tokens, then over the
    class's responses. A class with no responses gets a zero row (and so an empty top set).

    All responses' tokens are encoded in chunks of ``chunk`` rows (`iter_codes`) and summed per
    response, so no [tokens, S] code matrix is held at once."""
    profile_CS = np.zeros((n_classes, sae.cfg.d_sae), dtype=np.float64)
    counts_C = np.zeros(n_classes)
    if not responses.acts:
        return profile_CS
    lengths_R = torch.tensor([len(acts_TD) for acts_TD in responses.acts])
    response_N = torch.repeat_interleave(torch.arange(len(lengths_R)), lengths_R)
    sums_RS = torch.zeros(len(lengths_R), sae.cfg.d_sae, dtype=torch.float64)
    for start, codes_BS in iter_codes(sae, responses.stacked(), chunk):
        rows_B = response_N[start : start + len(codes_BS)]
        sums_RS.index_add_(0, rows_B, codes_BS.double().cpu())
    means_RS = (sums_RS / lengths_R.clamp(min=1)[:, None]).numpy()
    for mean_S, label in zip(means_RS, responses.labels, strict=True):
        profile_CS[label] += mean_S
        counts_C[label] += 1
    return profile_CS / np.maximum(counts_C, 1)[:, None]


def top_set_size(fraction: float, n_features: int) -> int:
    """K = ceil(fraction * S), at least 1: the size of a top set (`top_feature_sets`)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    return max(1, math.ceil(fraction * n_features))


def top_feature_sets(profile_CS: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """Each class's top `fraction` of features by activation, as a boolean [C, S] mask.

    K = ceil(fraction * S), at least 1. Features that never fire (activation <= 0) are left out
    even when a class has fewer than K active ones, so silence cannot count as overlap.
    """
    profile_CS = np.asarray(profile_CS, dtype=np.float64)
    k = top_set_size(fraction, profile_CS.shape[1])
    order_CS = np.argsort(-profile_CS, axis=1, kind="stable")
    sets_CS = np.zeros(profile_CS.shape, dtype=bool)
    np.put_along_axis(sets_CS, order_CS[:, :k], True, axis=1)
    return sets_CS & (profile_CS > 0)


def overlap_size(a_CS: np.ndarray, b_CS: np.ndarray) -> np.ndarray:
    """Features shared by row c of both masks, [C]."""
    return (np.asarray(a_CS, bool) & np.asarray(b_CS, bool)).sum(axis=1)


def jaccard(a_CS: np.ndarray, b_CS: np.ndarray) -> np.ndarray:
    """Jaccard index |A ∩ B| / |A ∪ B| of row c of both masks, [C]; 0 when both are empty."""
    a_CS, b_CS = np.asarray(a_CS, bool), np.asarray(b_CS, bool)
    union_C = (a_CS | b_CS).sum(axis=1)
    return np.where(union_C > 0, overlap_size(a_CS, b_CS) / np.maximum(union_C, 1), 0.0)


def jaccard_matrix(a_CS: np.ndarray, b_CS: np.ndarray) -> np.ndarray:
    """Jaccard index of every pair (A_i, B_j), [C, C]; the diagonal holds the matched classes."""
    a_CS, b_CS = np.asarray(a_CS, np.int64), np.asarray(b_CS, np.int64)
    inter_CC = a_CS @ b_CS.T
    union_CC = a_CS.sum(1)[:, None] + b_CS.sum(1)[None, :] - inter_CC
    return np.where(union_CC > 0, inter_CC / np.maximum(union_CC, 1), 0.0)


def random_derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (every class mismatched).

    Rejection sampling: about e draws on average; numpy and scipy have no derangement sampler.
    """
    if n < 2:
        raise ValueError("A mismatched pairing needs at least 2 classes.")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


@dataclass
class PermutationBaseline:
    """Matched-class Jaccard against mismatched-class pairings."""

    observed: float
    """Mean Jaccard over classes, text of class c against image of class c."""
    null: np.ndarray = field(repr=False)
    """Mean Jaccard under each random mismatched pairing, [n_permutations]."""
    expected_chance: float
    """Exact expectation of the null: mean Jaccard over all pairs of different classes."""
    p_value: float
    """(1 + #null >= observed) / (1 + n_permutations), one-sided."""

    @property
    def null_mean(self) -> float:
        """Mean of the null distribution."""
        return float(self.null.mean())


def permutation_baseline(
    text_CS: np.ndarray, image_CS: np.ndarray, n_permutations: int = 1000, seed: int = 0
) -> PermutationBaseline:
    """Chance level of text/image overlap: pair each class's text set with another class's
    image set (a random derangement), many times, and compare with the matched pairing."""
    j_CC = jaccard_matrix(text_CS, image_CS)
    n = j_CC.shape[0]
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    null = np.array([j_CC[rows, random_derangement(n, rng)].mean() for _ in range(n_permutations)])
    observed = float(np.diag(j_CC).mean())
    off_diagonal = ~np.eye(n, dtype=bool)
    # Ties count against the observed value, so identical sets everywhere give p = 1.
    p_value = (1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations)
    return PermutationBaseline(observed, null, float(j_CC[off_diagonal].mean()), float(p_value))


def overlap_table(
    text_CS: np.ndarray, image_CS: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Per class: set sizes, overlap, Jaccard, and the class's own chance Jaccard (its text set
    against every other class's image set)."""
    j_CC = jaccard_matrix(text_CS, image_CS)
    n = len(class_names)
    chance_C = (j_CC.sum(axis=1) - np.diag(j_CC)) / max(n - 1, 1)
    return pd.DataFrame(
        {
            "class": list(class_names),
            "n_text": np.asarray(text_CS, bool).sum(axis=1),
            "n_image": np.asarray(image_CS, bool).sum(axis=1),
            "overlap": overlap_size(text_CS, image_CS),
            "jaccard": np.diag(j_CC),
            "chance_jaccard": chance_C,
        }
    )


def overlap_heatmap_frame(
    text_CS: np.ndarray, image_CS: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Fig. 6 as a table: two rows per class (text, image), one column per feature in any top
    set, ordered by the first class that selects it. A cell is 0 when the feature is not in
    that row's set, 1 when it is in this modality's set only, 2 when both modalities of the
    class select it."""
    text_CS, image_CS = np.asarray(text_CS, bool), np.asarray(image_CS, bool)
    either_CS = text_CS | image_CS
    features = []
    for c in range(either_CS.shape[0]):
        features += [int(f) for f in np.flatnonzero(either_CS[c]) if f not in features]
    both_CS = text_CS & image_CS
    rows, index = [], []
    for c, name in enumerate(class_names):
        for modality, sets_CS in (("text", text_CS), ("image", image_CS)):
            rows.append(sets_CS[c, features].astype(int) + both_CS[c, features])
            index.append((name, modality))
    return pd.DataFrame(
        np.array(rows).reshape(len(index), len(features)),
        index=pd.MultiIndex.from_tuples(index, names=["class", "modality"]),
        columns=pd.Index(features, name="feature"),
    )
