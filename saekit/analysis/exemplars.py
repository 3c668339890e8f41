"""Exemplars: the images a feature fires on most, found in one pass over a store (paper 002).

A patch SAE (paper 002 §3) reads one layer's patch tokens. Each of its features gets

* a name, MODEL-WIDTH/INDEX such as ``DINOv2-24K/9823`` (:func:`feature_name`);
* its top-K exemplar images, found by :func:`scan_store` in ONE streaming pass over an
  activation store. Images are ranked by the feature's maximum patch activation, its mean over
  the patches, or its activation on the CLS token. The pass keeps a running ``[S, K]`` top-k,
  per-feature counters and per-class sums, never the codes of the whole store;
* facts (:func:`feature_facts`): how often it fires (per token and per image), its largest
  activation, the classes it fires on most, and the ontology label of the classes it fires on
  reliably (LCH and coverage from :mod:`saekit.analysis.ontology`).

Drawing them (exemplar grids with patch heat maps, the model's view of an image) is
`saekit.analysis.exemplar_plots`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE

from saekit.activations import Store
from saekit.analysis.ontology import ClassSetRule, ClassStats, class_stats, feature_table
from saekit.sae.codes import device_dtype, iter_codes, merge_top_k
from saekit.taxonomy import Taxonomy

NO_CLASS_SET = "no class set"
"""The ontology label of a feature that fires reliably on no class (an empty C_k)."""

RANK_BY = ("max", "mean", "cls")
"""How exemplars are ranked: max patch activation, mean over patches, or the CLS activation."""

#: transformers / saekit family name -> the label papers use in feature names. Looked up in this
#: order, so "toyvit" (the toy world's ViT) is tried before "vit".
MODEL_LABELS = {
    "toyvit": "ToyViT",
    "dinov2": "DINOv2",
    "clip": "CLIP",
    "vit": "ViT",
    "resnet": "ResNet",
}


# --------------------------------------------------------------------------- names


def width_label(d_sae: int) -> str:
    """SAE width as papers write it: 24576 -> '24K', 16000 -> '16K', 384 -> '384'."""
    if d_sae >= 1024 and d_sae % 1024 == 0:
        return f"{d_sae // 1024}K"
    if d_sae >= 1000 and d_sae % 1000 == 0:
        return f"{d_sae // 1000}K"
    return str(d_sae)


def model_label(family_or_id: str) -> str:
    """'dinov2' or 'facebook/dinov2-base' -> 'DINOv2'; unknown names are returned unchanged, and
    so are names that already start with a label ('ToyViT-L3', to tell two layers apart)."""
    if str(family_or_id).startswith(tuple(MODEL_LABELS.values())):
        return str(family_or_id)
    lowered = str(family_or_id).lower()
    for family, label in MODEL_LABELS.items():
        if family in lowered:
            return label
    return str(family_or_id)


def _store_model_label(manifest: dict) -> str:
    """The label of the model a store was made from: its id or path first (the toy ViT's folder
    says "toyvit" where its family says only "vit"), else its family."""
    from_id = model_label(manifest["model"])
    if from_id != manifest["model"]:
        return from_id
    return model_label(manifest.get("family") or manifest["model"])


def feature_name(model: str, d_sae: int, index: int) -> str:
    """Paper 002's MODEL-WIDTH/INDEX name, e.g. ``feature_name("DINOv2", 24576, 9823)`` ->
    'DINOv2-24K/9823'. ``model`` may also be a family ('dinov2') or a hub id."""
    if not 0 <= index < d_sae:
        raise IndexError(f"feature {index} is out of range for an SAE of width {d_sae}")
    return f"{model_label(model)}-{width_label(d_sae)}/{index}"


# --------------------------------------------------------------------------- the scan


@dataclass
class ExemplarScan:
    """What one streaming pass over a store learned about every feature of an SAE."""

    layer: int
    """Store layer the SAE reads."""
    rank_by: str
    """Image score the exemplars are ranked by: 'max', 'mean' (over patches) or 'cls'."""
    model: str
    """Model label for feature names (e.g. 'DINOv2')."""
    d_sae: int
    """SAE width S."""
    top_values_SK: np.ndarray
    """Image scores of each feature's top-K images, best first (ties: lower store row first)."""
    top_rows_SK: np.ndarray
    """Store rows of those images."""
    token_freq_S: np.ndarray
    """Fraction of tokens (patches, or CLS tokens for 'cls') on which the feature fires."""
    image_freq_S: np.ndarray
    """Fraction of images on which it fires on at least one scored token."""
    max_act_S: np.ndarray
    """Largest activation on any scored token."""
    class_stats: ClassStats
    """Per-class firing fractions and mean image scores (`saekit.analysis.ontology.class_stats`)."""
    class_names: list[str]
    """Name of each class index of the store."""
    wnids: list[str] | None
    """WordNet id of each class index, when the store's classes are synsets."""
    n_images: int
    """Images scanned."""

    @property
    def k(self) -> int:
        """Exemplars kept per feature."""
        return self.top_rows_SK.shape[1]

    def name(self, feature: int) -> str:
        """The feature's MODEL-WIDTH/INDEX name."""
        return feature_name(self.model, self.d_sae, feature)

    def exemplars(self, feature: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(store rows, scores) of the feature's top images on which it fires at all."""
        values = self.top_values_SK[feature, :k]
        keep = values > 0
        return self.top_rows_SK[feature, :k][keep], values[keep]


def scan_store(
    store: Store,
    sae: SAE,
    layer: int,
    *,
    k: int = 16,
    rank_by: str = "max",
    model: str | None = None,
    tokens_per_chunk: int = 4096,
    progress: bool = True,
) -> ExemplarScan:
    """One streaming pass over a store: every feature's top-``k`` images and its facts.

    ``rank_by`` is 'max' or 'mean' (the feature's patch activations of an image, reduced) or
    'cls' (its activation on the image's CLS token; the SAE then reads CLS tokens). Images are
    read in chunks of about ``tokens_per_chunk`` tokens, so memory stays at one chunk's codes
    (``tokens_per_chunk x S`` floats) plus the ``[S, k]`` running top-k. ``model`` labels the
    feature names (default: from the store's model family).
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, not {rank_by!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    manifest = store.manifest
    kind = "cls" if rank_by == "cls" else "patch"
    if kind not in manifest["tokens"]:
        hint = "--tokens both" if kind == "patch" else "--tokens cls (or both)"
        raise ValueError(
            f"rank_by={rank_by!r} needs {kind} tokens, but the store at {store.root} holds "
            f"{manifest['tokens']}; extract them with {hint}, or rank by "
            f"{'cls' if kind == 'patch' else 'max'}."
        )
    acts = store.cls(layer) if kind == "cls" else store.patches(layer)
    n_images = len(acts)
    if n_images == 0:
        raise ValueError(f"the store at {store.root} holds no images")
    tokens_per_image = 1 if kind == "cls" else int(acts.shape[1])
    chunk = max(1, tokens_per_chunk // tokens_per_image)
    d_sae = int(sae.cfg.d_sae)
    k = min(k, n_images)
    device, _ = device_dtype(sae)
    labels_N = np.asarray(store.labels)

    top_values = torch.empty(d_sae, 0, device=device)
    top_rows = torch.empty(d_sae, 0, dtype=torch.int64, device=device)
    fired_tokens_S = torch.zeros(d_sae, dtype=torch.float64, device=device)
    fired_images_S = torch.zeros(d_sae, dtype=torch.float64, device=device)
    max_act_S = torch.zeros(d_sae, device=device)

    def image_scores() -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        # class_stats consumes these (score, label) batches; the other accumulators are updated
        # on the way, so the store is read once for everything.
        nonlocal top_values, top_rows
        chunks = iter_codes(sae, acts, chunk, progress=progress, desc=f"exemplars L{layer}")
        for start, codes in chunks:  # [b, S] for CLS, [b, P, S] for patches
            stop = start + len(codes)
            if kind == "cls":
                score_bS, fires_bS = codes, codes > 0
                fired_tokens_S.add_(fires_bS.sum(0))
                max_act_S.copy_(torch.maximum(max_act_S, codes.amax(0)))
            else:
                peak_bS = codes.amax(1)
                score_bS = peak_bS if rank_by == "max" else codes.mean(1)
                fires_bS = peak_bS > 0
                fired_tokens_S.add_((codes > 0).sum((0, 1)))
                max_act_S.copy_(torch.maximum(max_act_S, peak_bS.amax(0)))
            fired_images_S.add_(fires_bS.sum(0))
            rows_b = torch.arange(start, stop, device=device)
            top_values, top_rows = merge_top_k(top_values, top_rows, score_bS.T, rows_b, k)
            yield score_bS.cpu(), labels_N[start:stop]

    stats = class_stats(image_scores(), None, len(store.class_names))
    return ExemplarScan(
        layer=layer,
        rank_by=rank_by,
        model=model or _store_model_label(manifest),
        d_sae=d_sae,
        top_values_SK=top_values.cpu().numpy(),
        top_rows_SK=top_rows.cpu().numpy(),
        token_freq_S=(fired_tokens_S / (n_images * tokens_per_image)).cpu().numpy(),
        image_freq_S=(fired_images_S / n_images).cpu().numpy(),
        max_act_S=max_act_S.cpu().numpy(),
        class_stats=stats,
        class_names=list(store.class_names),
        wnids=list(store.wnids) if store.wnids else None,
        n_images=n_images,
    )


# --------------------------------------------------------------------------- facts


def select_features(
    scan: ExemplarScan,
    n: int,
    *,
    min_image_freq: float = 0.0,
    max_image_freq: float = 0.5,
    max_token_freq: float = 1.0,
) -> list[int]:
    """Up to ``n`` features worth browsing, strongest first: paper 002 §9 sorts by sparsity and
    maximum activation, so dead features and dense ones are dropped and the rest ranked by max
    activation. Dense means firing on more than ``max_image_freq`` of the images or on more
    than ``max_token_freq`` of the tokens (patches); for a patch SAE the token rate is the
    sparsity the paper counts, since a feature firing on one patch of every image is sparse."""
    freq = scan.image_freq_S
    keep = (
        (freq > min_image_freq)
        & (freq <= max_image_freq)
        & (scan.token_freq_S <= max_token_freq)
        & (scan.max_act_S > 0)
    )
    candidates = np.flatnonzero(keep)
    order = np.argsort(-scan.max_act_S[candidates], kind="stable")
    return candidates[order][:n].tolist()


def feature_facts(
    scan: ExemplarScan,
    features: Sequence[int] | None = None,
    *,
    taxonomy: Taxonomy | str | None = "auto",
    n_top_classes: int = 3,
    rule: ClassSetRule | None = None,
) -> pd.DataFrame:
    """One row per feature (index = feature): name, token_freq, image_freq, max_act,
    top_classes (the classes with the highest mean image score, as 'name (score)'), n_classes
    and ontology (the LCH of the classes the feature fires on by ``rule``, e.g. 'elasmobranch
    (coverage 1.00, 5 classes)', or `NO_CLASS_SET` when it fires reliably on none).
    ``taxonomy='auto'`` builds one from the store's wnids when it has them; pass None to skip
    the ontology column's work (it stays None)."""
    features = list(range(scan.d_sae)) if features is None else [int(f) for f in features]
    stats = scan.class_stats
    mean_FC = stats.mean_act_SC[features]
    top_FT = np.argsort(-mean_FC, axis=1, kind="stable")[:, :n_top_classes]
    top_classes = [
        ", ".join(
            f"{scan.class_names[c]} ({mean_FC[i, c]:.3g})" for c in top_FT[i] if mean_FC[i, c] > 0
        )
        for i in range(len(features))
    ]
    sets_FC = (rule or ClassSetRule()).apply(stats)[features]
    frame = pd.DataFrame(
        {
            "name": [scan.name(f) for f in features],
            "token_freq": scan.token_freq_S[features],
            "image_freq": scan.image_freq_S[features],
            "max_act": scan.max_act_S[features],
            "top_classes": top_classes,
            "n_classes": sets_FC.sum(1),
            "ontology": None,
        },
        index=pd.Index(features, name="feature"),
    )
    if taxonomy == "auto":
        taxonomy = Taxonomy.from_wnids(scan.wnids) if scan.wnids else None
    if taxonomy is not None:
        if scan.wnids is None:
            raise ValueError(
                "an ontology label needs the store's classes as WordNet ids (store.wnids is "
                "None); pass taxonomy=None to skip it"
            )
        if list(taxonomy.leaves) != list(scan.wnids):
            raise ValueError(
                "the taxonomy's leaf classes are not the store's classes in class-index order; "
                "build it with Taxonomy.from_wnids(store.wnids)"
            )
        # Every feature gets a label: the LCH of its class set, or that it has none (a
        # feature firing reliably on no class; an empty table must not reach pandas' apply,
        # which would turn it into a float frame).
        frame["ontology"] = NO_CLASS_SET
        table = feature_table(sets_FC, taxonomy, progress=False) if features else pd.DataFrame()
        for row in table.itertuples(index=False):
            lch = row.lch_name if isinstance(row.lch_name, str) else "no common hypernym"
            plural = "es" if row.n_classes != 1 else ""
            frame.iloc[int(row.feature), frame.columns.get_loc("ontology")] = (
                f"{lch} (coverage {row.coverage:.2f}, {row.n_classes} class{plural})"
            )
    return frame
