"""Sparse probing: can a class be read off a handful of SAE features?

For each class c, the k features whose mean activation on c's images exceeds their mean on all
other images by the most (mean difference, on the training set) feed a one-vs-rest logistic
probe (`saekit.analysis.probes.train_probe`), trained on the class's images and as many other
images drawn with a fixed seed, and scored by balanced accuracy (the mean of the true-positive
and true-negative rates: one class against the rest is unbalanced) on held-out images. The same
is done on the model's neurons (the raw activation dimensions), so "the SAE's features are more
monosemantic than the neurons" becomes a measured difference at each k (SAEBench's sparse
probing, applied to image classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from saekit.analysis.probes import ProbeConfig, train_probe

DEFAULT_KS = (1, 2, 5, 20)


def top_features_by_mean_difference(
    feats_ND: torch.Tensor, labels_N: np.ndarray, label: int, k: int
) -> torch.Tensor:
    """The ``k`` columns whose mean on rows of ``label`` exceeds their mean elsewhere the most."""
    inside_N = torch.as_tensor(np.asarray(labels_N) == label)
    if not inside_N.any() or inside_N.all():
        raise ValueError(f"class {label} needs images both inside and outside it")
    diff_F = feats_ND[inside_N].mean(0) - feats_ND[~inside_N].mean(0)
    return torch.sort(diff_F, descending=True, stable=True).indices[:k]


def balanced_accuracy(predicted_N: torch.Tensor, truth_N: torch.Tensor) -> float:
    """Mean of the true-positive and true-negative rates of a binary prediction."""
    rates = [
        (predicted_N[truth_N == value] == value).float().mean().item()
        for value in (0, 1)
        if (truth_N == value).any()
    ]
    return float(np.mean(rates))


def one_vs_rest_accuracy(
    train_ND: torch.Tensor,
    train_labels_N: np.ndarray,
    eval_ND: torch.Tensor,
    eval_labels_N: np.ndarray,
    label: int,
    columns: torch.Tensor,
    *,
    seed: int = 0,
    config: ProbeConfig | None = None,
) -> float:
    """Balanced accuracy of a one-vs-rest probe for ``label`` on ``columns`` of the features."""
    train_labels_N, eval_labels_N = np.asarray(train_labels_N), np.asarray(eval_labels_N)
    positive = np.flatnonzero(train_labels_N == label)
    negative = np.flatnonzero(train_labels_N != label)
    rng = np.random.default_rng([seed, label])
    negative = rng.choice(negative, size=min(len(negative), len(positive)), replace=False)
    rows = np.concatenate([positive, negative])
    target = (train_labels_N[rows] == label).astype(np.int64)
    probe = train_probe(train_ND[rows][:, columns], target, n_classes=2, config=config)
    truth = torch.as_tensor(eval_labels_N == label).long()
    return balanced_accuracy(probe.predict(eval_ND[:, columns]), truth)


def sparse_probing(
    train_ND: torch.Tensor,
    train_labels_N: np.ndarray,
    eval_ND: torch.Tensor,
    eval_labels_N: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    classes: Sequence[int] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Balanced accuracy per class (rows) and k (columns) of one-vs-rest probes on the top-k
    features by mean difference. ``classes`` defaults to every label present in both sets."""
    train_labels_N, eval_labels_N = np.asarray(train_labels_N), np.asarray(eval_labels_N)
    if classes is None:
        classes = sorted(set(train_labels_N.tolist()) & set(eval_labels_N.tolist()))
    table = {}
    for label in classes:
        row = {}
        for k in ks:
            columns = top_features_by_mean_difference(train_ND, train_labels_N, label, k)
            row[k] = one_vs_rest_accuracy(
                train_ND, train_labels_N, eval_ND, eval_labels_N, label, columns, seed=seed
            )
        table[label] = row
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.index.name, frame.columns.name = "class", "k"
    return frame


def mean_sparse_probing(
    train_ND: torch.Tensor,
    train_labels_N: np.ndarray,
    eval_ND: torch.Tensor,
    eval_labels_N: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
) -> pd.Series:
    """Mean balanced accuracy over classes at each k (the k no larger than the width)."""
    ks_here = [k for k in ks if k <= train_ND.shape[1]]
    per_class = sparse_probing(
        train_ND, train_labels_N, eval_ND, eval_labels_N, ks=ks_here, seed=seed
    )
    return per_class.mean(axis=0)


def sparse_probing_summary(
    codes: tuple[torch.Tensor, torch.Tensor],
    neurons: tuple[torch.Tensor, torch.Tensor] | pd.Series,
    train_labels_N: np.ndarray,
    eval_labels_N: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
) -> pd.DataFrame:
    """`mean_sparse_probing` for SAE features and for neurons: rows ``SAE features`` and
    ``neurons``, one column per k. ``codes`` and ``neurons`` are ``(train, eval)`` feature
    matrices of the same images; ``neurons`` may instead be the neuron row computed before
    (it is the same for every SAE on one layer)."""
    rows = {"SAE features": mean_sparse_probing(*codes[:1], train_labels_N, codes[1],
                                                eval_labels_N, ks=ks, seed=seed)}  # fmt: skip
    if isinstance(neurons, pd.Series):
        rows["neurons"] = neurons
    else:
        rows["neurons"] = mean_sparse_probing(
            neurons[0], train_labels_N, neurons[1], eval_labels_N, ks=ks, seed=seed
        )
    frame = pd.DataFrame(rows).T
    frame.columns.name = "k"
    return frame
