"""Chapter 07's planted-truth check: do the features text and image answers share line up with
the toy world's planted classes?

The toy LLaVA describes a toy image by its planted factors ("a coarse dotted green fish") and
answers "What is a great white shark?" the same way, so an image of a fish and the word "fish"
should share SAE features. The chapter's overlap test (top sets per class, Jaccard of matched
text and image sets against mismatched pairings) is repeated with the classes pooled by each
planted factor: shape family (the top of the hierarchy) and style; a factor whose matched
overlap beats the permutation null is one the answers' shared features carry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from saekit.analysis import modality_overlap as mo
from saekit.analysis.multimodal import Responses
from saekit.mini import toy_eval
from saekit.mini.toyworld import WNIDS
from saekit.mini.toyworld import captions as cap
from saekit.mini.toyworld.taxonomy import class_index

if TYPE_CHECKING:
    from sae_lens import SAE

_VALUE_NAMES = {
    "group": cap.GROUP_WORDS,
    "style": tuple(f"{c}/{t}" for c, t in zip(cap.COLOR_WORDS, cap.TEXTURE_WORDS, strict=True)),
}


def has_planted_truth(wnids: Sequence[str] | None) -> bool:
    """Whether the dataset's classes are toy-world classes (whose factors are known)."""
    return bool(wnids) and all(w in WNIDS for w in wnids)


def factor_values(class_wnids: Sequence[str], factor: str) -> np.ndarray:
    """Per study class, its value of a planted factor ("class": the class itself), [C]."""
    if factor == "class":
        return np.arange(len(class_wnids))
    return np.array([getattr(cap.factors(class_index(w)), factor) for w in class_wnids])


def _pooled(responses: Responses, values_C: np.ndarray) -> tuple[Responses, int, np.ndarray]:
    """`responses` relabelled from study class to factor value (values renumbered 0..V-1)."""
    present_V, codes_C = np.unique(values_C, return_inverse=True)
    relabelled = dataclasses.replace(responses, labels=codes_C[np.asarray(responses.labels)])
    return relabelled, len(present_V), present_V


def planted_overlap(
    sae: SAE,
    text: Responses,
    image: Responses,
    class_wnids: Sequence[str],
    top_fraction: float,
    n_permutations: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The overlap test per planted level: study classes, shape families, styles.

    One row per level: how many values the study's classes cover, the matched mean Jaccard of
    text and image top sets, the mean and 95th percentile of the mismatched-pairing null, and
    the one-sided p-value (`saekit.analysis.modality_overlap.permutation_baseline`)."""
    rows = []
    for factor in ("class", "group", "style"):
        values_C = factor_values(class_wnids, factor)
        pooled_text, n_values, present = _pooled(text, values_C)
        pooled_image, _, _ = _pooled(image, values_C)
        if n_values < 2:
            continue
        text_VS = mo.top_feature_sets(mo.class_profiles(sae, pooled_text, n_values), top_fraction)
        image_VS = mo.top_feature_sets(mo.class_profiles(sae, pooled_image, n_values), top_fraction)
        baseline = mo.permutation_baseline(text_VS, image_VS, n_permutations, seed)
        names = ", ".join(_VALUE_NAMES[factor][v] for v in present) if factor != "class" else ""
        rows.append(
            {
                "level": factor,
                "values": n_values,
                "matched Jaccard": baseline.observed,
                "null mean": baseline.null_mean,
                "null 95%": float(np.quantile(baseline.null, 0.95)),
                "p": baseline.p_value,
                "values covered": names,
            }
        )
    return pd.DataFrame(rows)


def planted_summary(table: pd.DataFrame) -> str:
    """The check in one sentence per level, from `planted_overlap`'s table."""
    if table.empty:
        return "The study's classes cover fewer than two values of every planted factor."
    parts = []
    for _, row in table.iterrows():
        verdict = "above" if row["p"] < 0.05 else "**not** above"
        parts.append(
            f"by {row['level']} ({row['values']} values): matched Jaccard "
            f"{row['matched Jaccard']:.3f} against {row['null mean']:.3f} for mismatched "
            f"pairings, p = {row['p']:.3g}, {verdict} chance"
        )
    return "Text and image answers share top features " + "; ".join(parts) + "."


def answer_scores(responses: Responses, class_wnids: Sequence[str]) -> dict[str, float]:
    """How often the answers name their class's planted factors (shape family, style,
    frequency), per factor: `saekit.mini.toy_eval.score_captions` on toy-world labels."""
    labels = [class_index(class_wnids[c]) for c in responses.labels]
    return toy_eval.score_captions(responses.texts, labels)
