"""Chapter 02's scoring of representations on labelled sets: linear probes and reconstruction.

Every evaluation set is labelled in the training set's class order by wnid (or class name): an
ImageNet-A folder holds 200 class folders, so its own label 0 is not ImageNet's 0. Rows of a
class the training set lacks are left out and counted (`LabelledActs.left_out`); each set is
scored on the training classes it holds (`scored_classes`): the prediction is the argmax over
those classes' logits, as paper 003 does for ImageNet-A and -R, and `scoring_table` says how many
classes and rows each set was scored on.

`probe_table` fits one linear probe per representation with identical settings (the raw
embedding x, the SAE codes z, and the SAE's pre-activation codes, paper 003 Fig. 12) and scores
it on every set; `reconstruction_table` gives MSE = ‖x − x̂‖² / d (Eq. 6), L0 and L1 of every
SAE on in-domain, near-OOD and far-OOD sets.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from saekit.activations import Store
from saekit.analysis.probes import Probe, train_probe
from saekit.sae import encode_in_batches, evaluate

#: Evaluation split -> its column in Table 1 (paper order: Val, V2, S(ketch), A, R).
TABLE1_COLUMNS = {"val": "Val", "v2": "V2", "sketch": "S", "hard": "A", "rendition": "R"}
#: The shifted sets with ImageNet's label space (ImageNet-V2, -Sketch, -A, -R).
SHIFTS = ("v2", "sketch", "hard", "rendition")
#: Split -> the domain its reconstruction error counts toward.
DOMAINS = {
    "val": "in-domain",
    **dict.fromkeys(SHIFTS, "near-OOD"),
    "far_ood": "far-OOD",
}
DOMAIN_ORDER = ("in-domain", "near-OOD", "far-OOD")
#: The mini profile's stand-ins for ImageNet-A and -R, which cover 200 of ImageNet's 1000
#: classes: the toy world renders every class in every shift, so these two are scored on every
#: other class (indices 0, 2, 4, ...) to keep the paper's restriction in miniature.
MINI_SUBSET_SPLITS = ("hard", "rendition")
#: Representation names in the probe table.
RAW, CODES, PRE = "raw", "codes", "pre-activation"
#: Evaluation sets in Table 1's order, and every split a run extracts.
EVAL_SPLITS = ("val", *SHIFTS)
SPLITS = ("train", *EVAL_SPLITS, "far_ood")

# --- labelled activations -----------------------------------------------------------------------


@dataclass
class LabelledActs:
    """One evaluation set's activations with labels in a shared class order."""

    acts_ND: Any
    """Activations [N, D]: an array, tensor or a store's memory-mapped array (read in chunks)."""
    labels_N: np.ndarray
    """Class index of each row, in the order of ``classes``."""
    classes: list[str] = field(default_factory=list)
    """Class keys (wnids, else class names) that the labels index."""
    left_out: dict[str, int] = field(default_factory=dict)
    """Rows left out because their class is not among ``classes`` (the training classes):
    class key -> number of rows."""

    def __post_init__(self) -> None:
        self.labels_N = np.asarray(self.labels_N, dtype=np.int64)
        if len(self.labels_N) != len(self.acts_ND):
            raise ValueError(f"{len(self.acts_ND)} activation rows but {len(self.labels_N)} labels")

    def per_class(self, n: int | None, seed: int = 0) -> LabelledActs:
        """At most `n` rows of every class, drawn without replacement with `seed`, in store
        order (the paper profile's SAE codes of all 1.2M training images would not fit in memory).
        ``n=None`` keeps every row."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"per_class needs n >= 1 (or None for every row), got {n}")
        rng = np.random.default_rng(seed)
        keep = []
        for label in np.unique(self.labels_N):
            rows = np.flatnonzero(self.labels_N == label)
            keep.append(rows if len(rows) <= n else rng.choice(rows, n, replace=False))
        index = np.sort(np.concatenate(keep))
        return LabelledActs(self.acts_ND[index], self.labels_N[index], list(self.classes))

    @property
    def present(self) -> list[int]:
        """Indices (into ``classes``) of the classes this set has rows of."""
        return np.unique(self.labels_N).tolist()

    @classmethod
    def from_store(
        cls, store: Store, layer: int | None = None, classes: Sequence[str] | None = None
    ) -> LabelledActs:
        """CLS activations of `layer` (default: the store's last) with labels mapped into
        `classes` (default: the store's own order). Rows of a store class missing from `classes`
        are left out (the probe could never predict them) and counted in ``left_out``."""
        layer = store.layers[-1] if layer is None else layer
        keys = list(store.wnids or store.class_names)
        labels = np.asarray(store.labels, dtype=np.int64)
        if classes is None:
            return cls(store.cls(layer), labels, keys)
        index = {key: i for i, key in enumerate(classes)}
        mapped = np.asarray([index.get(key, -1) for key in keys], dtype=np.int64)[labels]
        keep = mapped >= 0
        left_out = {
            keys[label]: int(count)
            for label, count in zip(*np.unique(labels[~keep], return_counts=True), strict=True)
        }
        acts = store.cls(layer)
        if left_out:
            acts = acts[np.flatnonzero(keep)]
        return cls(acts, mapped[keep], list(classes), left_out)


def scored_classes(
    evals: Mapping[str, LabelledActs], profile: str = "paper"
) -> dict[str, list[int] | None]:
    """The training classes each evaluation set is scored on: those it has rows of, so the
    prediction is the argmax over the logits of the classes the set and the training set share
    (ImageNet-A and -R hold 200 of ImageNet's 1000; a training folder may hold fewer than a
    shifted set). None where a set has every training class (the argmax over all logits).

    In the mini profile the ImageNet-A/-R stand-ins (`MINI_SUBSET_SPLITS`) are further restricted
    to every other class. A set sharing no class with the training set is refused."""
    out: dict[str, list[int] | None] = {}
    for split, data in evals.items():
        n_classes = len(data.classes)
        present = set(data.present)
        if profile == "mini" and split in MINI_SUBSET_SPLITS:
            present &= set(range(0, n_classes, 2))
        if not present:
            raise ValueError(
                f"evaluation set {split!r} shares no class with the training set (it holds "
                f"{sorted(data.left_out)[:5]}...); give a folder whose class folders (wnids) are "
                "among the training folder's"
            )
        out[split] = None if len(present) == n_classes else sorted(present)
    return out


def scoring_table(
    evals: Mapping[str, LabelledActs], subsets: Mapping[str, Sequence[int] | None]
) -> pd.DataFrame:
    """Per evaluation set: the classes it holds, how many of them the training set lacks (their
    rows are left out), the classes scored and the rows scored."""
    rows = {}
    for split, data in evals.items():
        subset = subsets.get(split)
        scored = (
            np.isin(data.labels_N, subset)
            if subset is not None
            else np.ones_like(data.labels_N, bool)
        )
        rows[split] = {
            "classes in the set": len(data.present) + len(data.left_out),
            "not in training": len(data.left_out),
            "classes scored": len(subset) if subset is not None else len(data.classes),
            "rows scored": int(scored.sum()),
            "rows left out": int(sum(data.left_out.values()) + (~scored).sum()),
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("split")


# --- 2. linear probes -----------------------------------------------------------------------------


def _features(data: LabelledActs, sae: SAE | None, kind: str) -> torch.Tensor:
    if sae is None:
        return torch.as_tensor(np.asarray(data.acts_ND, dtype=np.float32))
    return encode_in_batches(sae, data.acts_ND, pre_activation=kind == PRE)


def probe_accuracy(
    probe: Probe, feats_ND: torch.Tensor, labels_N: np.ndarray, subset: Sequence[int] | None
) -> tuple[float, int]:
    """Top-1 accuracy and the number of rows scored; with `subset`, only rows of those classes,
    predicted by the argmax over the subset's logits."""
    labels = torch.as_tensor(labels_N)
    if subset is not None:
        keep = torch.isin(labels, torch.as_tensor(list(subset)))
        feats_ND, labels = feats_ND[keep], labels[keep]
    if len(labels) == 0:
        raise ValueError(f"no rows of the scored classes {list(subset or [])[:10]} in this set")
    accuracy = probe.accuracy(
        feats_ND, labels, class_subset=None if subset is None else list(subset)
    )
    return float(accuracy), len(labels)


def probe_table(
    saes: Mapping[str, SAE],
    train: LabelledActs,
    evals: Mapping[str, LabelledActs],
    *,
    class_subsets: Mapping[str, Sequence[int]] | None = None,
    pre_activation: bool = True,
    encoder: str = "",
    progress: bool = True,
    **probe_kwargs: Any,
) -> pd.DataFrame:
    """Accuracy of a linear probe on the raw embedding and on each SAE's codes (and pre-activation
    codes), fit on `train` with identical settings (``probe_kwargs`` go to
    `saekit.analysis.probes.train_probe`), scored on every set in `evals`.

    Long format, one row per (representation, evaluation set): encoder, sae ("raw" for the
    embedding), input (raw | codes | pre-activation), split, accuracy, n_rows, n_classes.
    """
    class_subsets = class_subsets or {}
    for split, data in evals.items():
        if data.classes != train.classes:
            raise ValueError(
                f"evaluation set {split!r} is labelled in another class order than the training "
                "set; build it with LabelledActs.from_store(store, classes=train.classes)"
            )
    jobs: list[tuple[str, SAE | None, str]] = [(RAW, None, RAW)]
    for name, sae in saes.items():
        jobs.append((name, sae, CODES))
        if pre_activation:
            jobs.append((name, sae, PRE))
    rows = []
    for name, sae, kind in tqdm(jobs, desc="linear probes", disable=not progress):
        probe = train_probe(
            _features(train, sae, kind),
            train.labels_N,
            n_classes=len(train.classes),
            **probe_kwargs,
        )
        for split, data in evals.items():
            subset = class_subsets.get(split)
            accuracy, n_rows = probe_accuracy(
                probe, _features(data, sae, kind), data.labels_N, subset
            )
            rows.append(
                {
                    "encoder": encoder,
                    "sae": name,
                    "input": kind,
                    "split": split,
                    "accuracy": accuracy,
                    "n_rows": n_rows,
                    "n_classes": len(subset) if subset is not None else len(train.classes),
                }
            )
    return pd.DataFrame(rows)


# --- 3. reconstruction ------------------------------------------------------------------------------


def reconstruction_table(
    saes: Mapping[str, SAE],
    sets: Mapping[str, LabelledActs | torch.Tensor | np.ndarray],
    *,
    domains: Mapping[str, str] = DOMAINS,
    encoder: str = "",
    progress: bool = True,
) -> pd.DataFrame:
    """MSE (Eq. 6), variance explained, L0 and L1 of every SAE on every set (`saekit.sae.evaluate`).

    `sets` maps a split name to `LabelledActs` or bare activations [N, D]; `domains` says which
    domain each split counts toward. One row per (SAE, split).
    """
    unknown = [split for split in sets if split not in domains]
    if unknown:
        raise KeyError(f"no domain for split(s) {unknown}; pass domains={{split: 'near-OOD', ...}}")
    rows = []
    pairs = list(itertools.product(saes.items(), sets.items()))
    for (name, sae), (split, data) in tqdm(pairs, desc="reconstruction", disable=not progress):
        acts = data.acts_ND if isinstance(data, LabelledActs) else data
        m = evaluate(sae, acts)
        rows.append(
            {
                "encoder": encoder,
                "sae": name,
                "split": split,
                "domain": domains[split],
                "mse": m.mse,
                "explained_variance": m.explained_variance,
                "l0": m.l0,
                "l1": m.l1,
                "n_rows": m.n_rows,
            }
        )
    return pd.DataFrame(rows)


def domain_summary(recon: pd.DataFrame) -> pd.DataFrame:
    """Mean MSE per SAE and domain (splits of a domain weigh equally), with the OOD/in-domain ratios."""
    mse = recon.pivot_table(index="sae", columns="domain", values="mse", aggfunc="mean", sort=False)
    mse = mse[[d for d in DOMAIN_ORDER if d in mse.columns]]
    mse.columns.name = None
    for domain in ("near-OOD", "far-OOD"):
        if domain in mse and "in-domain" in mse:
            mse[f"{domain} ÷ in-domain"] = mse[domain] / mse["in-domain"]
    return mse
