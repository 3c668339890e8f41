"""Hierarchical feature absorption against the WordNet hierarchy.

In language-model SAEs a general feature ("starts with S") often stays silent on some of its
instances because a more specific feature ("short") fires there instead and has absorbed the
general direction (Chanin et al., SAEBench). With image classes placed in WordNet the same test
needs no hand-made concepts: for a parent synset covering several classes (dog over terrier,
retriever, ...):

1. the **parent feature** is the one whose firing best matches "the image is of a class under the
   parent" (largest F1 over the labelled images);
2. for each child class under it, the **child feature** is the one, other than the parent
   feature, whose firing best matches "the image is of this child" (largest F1);
3. **absorption** of the child is the share of its images on which the parent feature stays
   silent while the child feature fires.

A hierarchical SAE has low absorption: its parent feature fires on every child. The toy world's
planted hierarchy gives known answers; tests plant an absorbed child on purpose.

Codes are streamed twice (`saekit.sae.codes.iter_codes`): once for per-class firing counts, once
for the joint firing of the chosen feature pairs, so memory never holds ``[N, S]`` codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE

from saekit.sae.codes import iter_codes
from saekit.taxonomy import Taxonomy


def class_fire_counts(
    sae: SAE, acts_ND: torch.Tensor | np.ndarray, labels_N: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(``fires_SC``: images of class c on which feature s fires, ``n_images_C``)."""
    labels_N = np.asarray(labels_N)
    fires_CS = None
    for start, codes_BS in iter_codes(sae, acts_ND):
        labels_B = torch.as_tensor(labels_N[start : start + len(codes_BS)], dtype=torch.long)
        one_hot_BC = torch.nn.functional.one_hot(labels_B, n_classes).double()
        part_CS = one_hot_BC.T @ (codes_BS > 0).double().cpu()
        fires_CS = part_CS if fires_CS is None else fires_CS + part_CS
    if fires_CS is None:
        raise ValueError("no activations to score")
    return fires_CS.T.numpy(), np.bincount(labels_N, minlength=n_classes)


def best_f1_feature(
    fires_SC: np.ndarray, n_images_C: np.ndarray, classes: Sequence[int], exclude: int = -1
) -> tuple[int, float]:
    """The feature whose firing best matches membership in ``classes`` (F1), and its F1."""
    inside = np.zeros(len(n_images_C), dtype=bool)
    inside[list(classes)] = True
    true_pos_S = fires_SC[:, inside].sum(1)
    fired_S = fires_SC.sum(1)
    positives = n_images_C[inside].sum()
    f1_S = 2 * true_pos_S / np.maximum(fired_S + positives, 1)
    if 0 <= exclude < len(f1_S):
        f1_S[exclude] = -1.0
    best = int(np.argmax(f1_S))
    return best, float(f1_S[best])


def parent_child_pairs(taxonomy: Taxonomy, min_children: int = 2) -> list[tuple[str, list[int]]]:
    """(parent wnid, its child classes by index) for every synset above at least
    ``min_children`` classes but not above all of them (the root covers everything and is no
    concept to absorb)."""
    index = {wnid: i for i, wnid in enumerate(taxonomy.leaves)}
    pairs = []
    for synset in taxonomy.synsets:
        children = [index[w] for w in taxonomy.leaf_set(synset)]
        if min_children <= len(children) < len(taxonomy.leaves):
            pairs.append((synset, children))
    return pairs


def absorption_table(
    sae: SAE,
    acts_ND: torch.Tensor | np.ndarray,
    labels_N: np.ndarray,
    taxonomy: Taxonomy,
    *,
    min_children: int = 2,
) -> pd.DataFrame:
    """One row per (parent synset, child class): the parent feature and its F1, the child
    feature and its F1, the parent feature's recall on the child's images, and the absorption
    (share of the child's images with the parent feature silent and the child feature firing)."""
    labels_N = np.asarray(labels_N)
    n_classes = len(taxonomy.leaves)
    fires_SC, n_images_C = class_fire_counts(sae, acts_ND, labels_N, n_classes)
    plan = []
    for parent, children in parent_child_pairs(taxonomy, min_children):
        parent_feature, parent_f1 = best_f1_feature(fires_SC, n_images_C, children)
        for child in children:
            child_feature, child_f1 = best_f1_feature(
                fires_SC, n_images_C, [child], exclude=parent_feature
            )
            plan.append((parent, parent_feature, parent_f1, child, child_feature, child_f1))
    if not plan:
        return pd.DataFrame()
    parent_features = torch.tensor([p[1] for p in plan])
    child_features = torch.tensor([p[4] for p in plan])
    child_labels = torch.tensor([p[3] for p in plan])
    absorbed_P = torch.zeros(len(plan), dtype=torch.float64)
    for start, codes_BS in iter_codes(sae, acts_ND):
        codes_BS = codes_BS.cpu()
        labels_B = torch.as_tensor(labels_N[start : start + len(codes_BS)], dtype=torch.long)
        is_child_BP = labels_B[:, None] == child_labels[None, :]
        silent_BP = codes_BS[:, parent_features] <= 0
        fires_BP = codes_BS[:, child_features] > 0
        absorbed_P += (is_child_BP & silent_BP & fires_BP).sum(0).double()
    rows = []
    for (parent, pf, pf1, child, cf, cf1), absorbed in zip(plan, absorbed_P.tolist(), strict=True):
        n_child = max(int(n_images_C[child]), 1)
        rows.append(
            {
                "parent": taxonomy.name(parent),
                "child": taxonomy.name(taxonomy.leaves[child]),
                "parent_feature": pf,
                "parent_f1": pf1,
                "child_feature": cf,
                "child_f1": cf1,
                "parent_recall": float(fires_SC[pf, child]) / n_child,
                "absorption": absorbed / n_child,
            }
        )
    return pd.DataFrame(rows)
