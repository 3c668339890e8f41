"""Linear probes: multinomial logistic regression on any features, and a linear segmentation head.

Classification (paper 003 §3.4, Table 1, Fig. 12): :func:`train_probe` fits a softmax
classifier on raw CLS activations, SAE codes or SAE pre-activation codes with the *same*
optimiser settings for every input (paper 003: "fit with identical training hyper-parameters").
Features are standardised with the training set's statistics so one setting suits inputs of very
different scales. Accuracy can be restricted to a subset of classes: ImageNet-A and -R use 200 of
ImageNet's 1000 classes, so the prediction is the argmax over those 200 logits.

:func:`store_features` reads (features, labels) from an activation store, optionally through an
SAE, so one probe can be scored on any number of stores with :func:`evaluate_probe`.

Segmentation (paper 002 §11): :class:`SegmentationHead` maps every patch vector to class logits,
bilinearly upsamples the logit map to the mask's size and is trained with cross-entropy (AdamW,
constant lr); :func:`mean_iou` scores it.

Written in torch rather than with scikit-learn (not a dependency) so probes run on the GPU,
on SAE codes wider than memory-friendly for sklearn, and on the same tensors as the rest of
saekit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from sae_lens import SAE

    from saekit.activations import Store

ArrayLike = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class ProbeConfig:
    """Optimiser settings, shared by every probe of a comparison."""

    optimizer: str = "lbfgs"
    """``lbfgs`` (full batch, deterministic) or ``adam`` (minibatches, for data beyond memory)."""
    max_iter: int = 200
    """L-BFGS iterations, or Adam epochs."""
    lr: float = 1.0
    """Step size: 1.0 suits L-BFGS with line search; use ~1e-3 for Adam."""
    weight_decay: float = 1e-4
    """L2 penalty coefficient on the weights (not the bias)."""
    batch_size: int = 4096
    """Adam minibatch size (ignored by L-BFGS)."""
    chunk_rows: int = 1 << 18
    """Adam reads the features in blocks of this many rows, one block in memory at a time: each
    epoch visits the blocks in a random order and shuffles the rows within each, so a store's
    memory-mapped layer larger than RAM streams from disk. With at most this many rows the order
    is one permutation of all rows. (L-BFGS is full-batch and reads every row at once.)"""
    standardize: bool = True
    """Z-score each feature with training statistics (constant features are left unscaled)."""
    seed: int = 0
    """Seed for Adam's minibatch order."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(
                f"ProbeConfig.optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}"
            )


class Probe(nn.Module):
    """A trained multinomial logistic regression: standardise, then one linear layer."""

    def __init__(self, d_in: int, n_classes: int, config: ProbeConfig | None = None):
        super().__init__()
        self.config = config or ProbeConfig()
        self.linear = nn.Linear(d_in, n_classes)
        self.register_buffer("mean_D", torch.zeros(d_in))
        self.register_buffer("std_D", torch.ones(d_in))

    @property
    def n_classes(self) -> int:
        """Number of classes the probe scores."""
        return self.linear.out_features

    def forward(self, feats_BD: torch.Tensor) -> torch.Tensor:
        return self.linear((feats_BD - self.mean_D) / self.std_D)

    @torch.no_grad()
    def logits(self, feats_BD: ArrayLike, batch_size: int = 8192) -> torch.Tensor:
        """Class logits ``[B, C]`` (features read in chunks)."""
        _check_width(feats_BD, self.linear.in_features, "probe")
        device = self.linear.weight.device
        out = [
            self(_tensor(feats_BD[i : i + batch_size]).to(device)).cpu()
            for i in range(0, len(feats_BD), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.n_classes)

    def predict(
        self, feats_BD: ArrayLike, class_subset: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Predicted class indices; with ``class_subset`` the argmax is over those classes only."""
        logits = self.logits(feats_BD)
        if class_subset is None:
            return logits.argmax(-1)
        subset = _subset(class_subset, self.n_classes)
        return subset[logits[:, subset].argmax(-1)]

    def accuracy(
        self, feats_BD: ArrayLike, labels_B: ArrayLike, class_subset: Sequence[int] | None = None
    ) -> float:
        """Top-1 accuracy; labels are indices into the probe's full class list."""
        labels = _labels(labels_B, len(feats_BD), self.n_classes)
        return (self.predict(feats_BD, class_subset) == labels).float().mean().item()

    def save(self, path: str | Path) -> None:
        """Weights to ``probe.safetensors`` and settings to ``probe.json`` in folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, path / "probe.safetensors"
        )
        meta = {
            "d_in": self.linear.in_features,
            "n_classes": self.n_classes,
            "config": dataclasses.asdict(self.config),
        }
        (path / "probe.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        """Inverse of :meth:`save` (safetensors only)."""
        path = Path(path)
        meta = json.loads((path / "probe.json").read_text())
        probe = cls(meta["d_in"], meta["n_classes"], ProbeConfig(**meta["config"]))
        probe.load_state_dict(load_file(path / "probe.safetensors"))
        return probe


def train_probe(
    feats_BD: ArrayLike,
    labels_B: ArrayLike,
    *,
    n_classes: int | None = None,
    config: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Probe:
    """Fit a softmax classifier on features ``[B, D]`` (raw activations, codes, pre-activations).

    ``feats_BD`` may be a tensor, an array or a store's memory-mapped layer (``store.cls(layer)``):
    L-BFGS (full batch) reads it whole; Adam streams it in blocks of ``config.chunk_rows`` rows, so
    a layer larger than memory never loads at once."""
    config = config or ProbeConfig()
    n_classes = n_classes or int(np.max(np.asarray(labels_B))) + 1
    labels = _labels(labels_B, len(feats_BD), n_classes)
    blocks = [
        (start, min(start + config.chunk_rows, len(feats_BD)))
        for start in range(0, len(feats_BD), config.chunk_rows)
    ]
    # One block (everything fits) is read once and kept; several are re-read every epoch.
    whole = (
        _tensor(feats_BD).to(device) if config.optimizer == "lbfgs" or len(blocks) <= 1 else None
    )
    probe = Probe(int(feats_BD.shape[1]), n_classes, config).to(device)
    if config.standardize:
        mean_D, std_D = _mean_std(feats_BD, blocks, whole, device)
        probe.mean_D.copy_(mean_D)
        probe.std_D.copy_(torch.where(std_D > 1e-8, std_D, torch.ones_like(std_D)))
    with torch.no_grad():
        probe.linear.weight.zero_()
        probe.linear.bias.zero_()

    def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        penalty = 0.5 * config.weight_decay * probe.linear.weight.pow(2).sum()
        return F.cross_entropy(probe(x), y) + penalty

    if config.optimizer == "lbfgs":
        feats, labels = whole, labels.to(device)
        opt = torch.optim.LBFGS(
            probe.linear.parameters(), lr=config.lr, max_iter=config.max_iter,
            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12,
        )  # fmt: skip
        bar = tqdm(desc="probe (L-BFGS evaluations)", disable=not progress)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = objective(feats, labels)
            loss.backward()
            bar.update(1)
            return loss

        opt.step(closure)
        bar.close()
        return probe.eval()
    opt = torch.optim.Adam(probe.linear.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.max_iter), desc="probe (Adam epochs)", disable=not progress):
        order = torch.randperm(len(blocks), generator=gen) if len(blocks) > 1 else [0]
        for b in order:
            start, stop = blocks[int(b)]
            feats = whole if whole is not None else _tensor(feats_BD[start:stop]).to(device)
            block_labels = labels[start:stop].to(device)
            for idx in torch.randperm(stop - start, generator=gen).split(config.batch_size):
                opt.zero_grad()
                idx = idx.to(device)
                objective(feats[idx], block_labels[idx]).backward()
                opt.step()
    return probe.eval()


def _mean_std(
    feats_BD: ArrayLike,
    blocks: list[tuple[int, int]],
    whole: torch.Tensor | None,
    device: str | torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (unbiased) standard deviation, in one pass over the blocks when the
    features are not in memory (float64 sums, so a million rows lose no precision)."""
    if whole is not None:
        return whole.mean(0), whole.std(0)
    sum_D = sumsq_D = None
    for start, stop in blocks:
        chunk = _tensor(feats_BD[start:stop]).double()
        part, part_sq = chunk.sum(0), chunk.pow(2).sum(0)
        sum_D = part if sum_D is None else sum_D + part
        sumsq_D = part_sq if sumsq_D is None else sumsq_D + part_sq
    n = blocks[-1][1]
    mean_D = sum_D / n
    var_D = ((sumsq_D - n * mean_D.pow(2)) / max(n - 1, 1)).clamp(min=0)
    return mean_D.float().to(device), var_D.sqrt().float().to(device)


def store_features(
    store: Store,
    layer: int,
    *,
    sae: SAE | None = None,
    pre_activation: bool = False,
    batch_size: int = 4096,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of an activation store's CLS tokens at ``layer``.

    Features are the raw activations, or with ``sae`` its codes (``pre_activation=True``: the
    codes before the nonlinearity). Uses only ``store.cls(layer)`` and ``store.labels``.
    """
    acts = store.cls(layer)
    labels = torch.as_tensor(np.asarray(store.labels)).long()
    if sae is None:
        return _tensor(acts), labels
    from saekit.sae import encode_in_batches

    feats = encode_in_batches(
        sae, acts, batch_size=batch_size, pre_activation=pre_activation, progress=progress
    )
    return feats, labels


def evaluate_probe(
    probe: Probe,
    eval_sets: Mapping[str, tuple[ArrayLike, ArrayLike]],
    class_subsets: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy on any number of evaluation sets ``{name: (features, labels)}``.

    ``class_subsets`` restricts named sets to some classes (e.g. ``{"imagenet-a": a_classes}``).
    """
    class_subsets = class_subsets or {}
    return {
        name: probe.accuracy(feats, labels, class_subsets.get(name))
        for name, (feats, labels) in eval_sets.items()
    }


# --- segmentation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentationConfig:
    """Training settings of the linear segmentation head (paper 002 §11)."""

    lr: float = 1e-3
    """AdamW learning rate, constant (the paper applies no schedule)."""
    weight_decay: float = 1e-3
    """AdamW weight decay."""
    epochs: int = 20
    """Passes over the training images."""
    batch_size: int = 32
    """Images per minibatch."""
    ignore_index: int = 255
    """Mask value that marks unlabelled pixels."""
    seed: int = 0
    """Seed for the initialisation and the image order."""


class SegmentationHead(nn.Module):
    """A linear layer applied to every patch, giving a low-resolution logit map."""

    def __init__(self, d_in: int, n_classes: int, grid: tuple[int, int]):
        super().__init__()
        self.linear = nn.Linear(d_in, n_classes)
        self.grid = tuple(grid)

    def patch_logits(self, patches_BPD: torch.Tensor) -> torch.Tensor:
        """Logit map ``[B, C, h, w]`` at patch resolution."""
        h, w = self.grid
        if patches_BPD.shape[1] != h * w:
            raise ValueError(
                f"expected {h * w} patches for grid {self.grid}, got {patches_BPD.shape[1]}"
            )
        logits = self.linear(patches_BPD)  # [B, P, C]
        return logits.transpose(1, 2).reshape(len(patches_BPD), -1, h, w)

    def forward(self, patches_BPD: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits ``[B, C, H, W]`` bilinearly upsampled to the mask size."""
        return F.interpolate(
            self.patch_logits(patches_BPD), size=size, mode="bilinear", align_corners=False
        )

    @torch.no_grad()
    def predict(self, patches_BPD: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Predicted class per pixel, ``[B, H, W]``."""
        return self(patches_BPD, size).argmax(1)


def train_segmentation_head(
    patches_NPD: ArrayLike,
    masks_NHW: ArrayLike,
    grid: tuple[int, int],
    n_classes: int,
    *,
    config: SegmentationConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SegmentationHead:
    """Fit a :class:`SegmentationHead` with pixel-wise cross-entropy on upsampled logits."""
    config = config or SegmentationConfig()
    patches = _tensor(patches_NPD)
    masks = torch.as_tensor(np.asarray(masks_NHW)).long()
    if len(patches) != len(masks):
        raise ValueError(f"{len(patches)} patch sets but {len(masks)} masks")
    torch.manual_seed(config.seed)
    head = SegmentationHead(patches.shape[-1], n_classes, grid).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    size = tuple(masks.shape[1:])
    for _ in tqdm(range(config.epochs), desc="segmentation head", disable=not progress):
        for idx in torch.randperm(len(patches), generator=gen).split(config.batch_size):
            logits = head(patches[idx].to(device), size)
            loss = F.cross_entropy(logits, masks[idx].to(device), ignore_index=config.ignore_index)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def mean_iou(
    pred_NHW: ArrayLike, target_NHW: ArrayLike, n_classes: int, ignore_index: int | None = 255
) -> tuple[float, np.ndarray]:
    """Mean intersection-over-union over classes present in the prediction or the target.

    Returns the mean and the per-class IoU (NaN for classes in neither). Pixels whose target is
    ``ignore_index`` are skipped.
    """
    pred = np.asarray(pred_NHW).ravel()
    target = np.asarray(target_NHW).ravel()
    keep = target != ignore_index if ignore_index is not None else np.ones_like(target, dtype=bool)
    pred, target = pred[keep], target[keep]
    for name, labels in (("prediction", pred), ("target", target)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(
                f"{name} labels must lie in 0..{n_classes - 1} (n_classes={n_classes}), found "
                f"{labels.min()}..{labels.max()}; pass the right n_classes or ignore_index."
            )
    confusion = np.bincount(target * n_classes + pred, minlength=n_classes**2).reshape(
        n_classes, n_classes
    )
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
    return float(np.nanmean(iou)), iou


# --- helpers ---------------------------------------------------------------------------------------


def _tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    # Store arrays are read-only memmaps; torch warns on wrapping those, so copy as float32.
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _check_width(feats: Any, width: int, what: str) -> None:
    if feats.shape[-1] != width:
        raise ValueError(f"features are {feats.shape[-1]} wide but the {what} expects {width}")


def _labels(labels_B: ArrayLike, n: int, n_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels_B)).long().flatten()
    if len(labels) != n:
        raise ValueError(f"{n} feature rows but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}); got {labels.min()}..{labels.max()}")
    return labels


def _subset(class_subset: Sequence[int], n_classes: int) -> torch.Tensor:
    subset = torch.as_tensor(list(class_subset), dtype=torch.long)
    if len(subset) == 0 or subset.min() < 0 or subset.max() >= n_classes:
        raise ValueError(f"class_subset must be non-empty indices in [0, {n_classes})")
    return subset
