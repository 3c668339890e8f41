"""Classical baselines on the sparsity-fidelity plane: PCA and k-means.

An SAE with L0 active latents per input is only worth its parameters if it reconstructs better
than what classical methods achieve with the same budget:

- PCA with the top-k components: every input uses k coefficients (L0 = k); at full rank the
  reconstruction is exact.
- k-means with k centroids, one active per input (L0 = 1): each input is replaced by its nearest
  centroid (vector quantisation).

Both report normalised MSE, ``NMSE = Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (= 1 − explained variance), the
quantity SAE Pareto fronts plot against L0. Fit on one set of activations, score on another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _matrix(acts_ND: torch.Tensor | np.ndarray) -> torch.Tensor:
    if torch.is_tensor(acts_ND):
        return acts_ND.detach().double().cpu()
    # a store's memory-mapped array reads as numpy through slicing
    return torch.from_numpy(np.array(acts_ND[:], dtype=np.float64))


def nmse(acts_ND: torch.Tensor, recon_ND: torch.Tensor) -> float:
    """``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` over all rows."""
    total = (acts_ND - acts_ND.mean(0)).pow(2).sum()
    return float((acts_ND - recon_ND).pow(2).sum() / total) if total > 0 else float("nan")


@dataclass(frozen=True)
class PCABasis:
    """Principal directions of a fitted set of activations."""

    mean_D: torch.Tensor
    """Mean of the fitted activations."""
    components_KD: torch.Tensor
    """Principal directions, strongest first (rows are orthonormal)."""

    def reconstruct(self, acts_ND: torch.Tensor | np.ndarray, k: int) -> torch.Tensor:
        """Projection of ``acts_ND`` onto the top-``k`` components (plus the mean)."""
        x_ND = _matrix(acts_ND) - self.mean_D
        basis_KD = self.components_KD[:k]
        return x_ND @ basis_KD.T @ basis_KD + self.mean_D


def fit_pca(acts_ND: torch.Tensor | np.ndarray) -> PCABasis:
    """All principal directions of ``acts_ND`` (an SVD of the centred matrix)."""
    x_ND = _matrix(acts_ND)
    mean_D = x_ND.mean(0)
    _, _, v_DD = torch.linalg.svd(x_ND - mean_D, full_matrices=False)
    return PCABasis(mean_D, v_DD)


def kmeans(
    acts_ND: torch.Tensor | np.ndarray, k: int, *, iters: int = 50, seed: int = 0
) -> torch.Tensor:
    """Centroids ``[k, D]`` from Lloyd's algorithm with k-means++ seeding (deterministic under
    ``seed``). Written here rather than taken from scikit-learn, which the project does not
    depend on; at these sizes a few dozen vectorised iterations converge."""
    x_ND = _matrix(acts_ND)
    if not 1 <= k <= len(x_ND):
        raise ValueError(f"k must be between 1 and the number of rows ({len(x_ND)}), got {k}")
    generator = torch.Generator().manual_seed(seed)
    centroids = [x_ND[torch.randint(len(x_ND), (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        dist_N = torch.cdist(x_ND, torch.stack(centroids)).pow(2).min(1).values
        probs_N = dist_N / dist_N.sum() if dist_N.sum() > 0 else torch.full_like(dist_N, 1.0)
        centroids.append(x_ND[torch.multinomial(probs_N, 1, generator=generator)].squeeze(0))
    centroids_KD = torch.stack(centroids)
    for _ in range(iters):
        assign_N = torch.cdist(x_ND, centroids_KD).argmin(1)
        sums_KD = torch.zeros_like(centroids_KD).index_add_(0, assign_N, x_ND)
        counts_K = torch.bincount(assign_N, minlength=k).unsqueeze(1)
        updated = torch.where(counts_K > 0, sums_KD / counts_K.clamp_min(1), centroids_KD)
        if torch.equal(updated, centroids_KD):
            break
        centroids_KD = updated
    return centroids_KD


def quantize(acts_ND: torch.Tensor | np.ndarray, centroids_KD: torch.Tensor) -> torch.Tensor:
    """Each row replaced by its nearest centroid."""
    x_ND = _matrix(acts_ND)
    return centroids_KD[torch.cdist(x_ND, centroids_KD).argmin(1)]


def baseline_front(
    fit_ND: torch.Tensor | np.ndarray,
    eval_ND: torch.Tensor | np.ndarray,
    ks: Sequence[int],
    *,
    seed: int = 0,
) -> list[dict[str, float | str]]:
    """Rows ``{"method", "k", "L0", "NMSE"}`` for PCA with ``k`` components (L0 = k) and k-means
    with ``k`` centroids (L0 = 1), fitted on ``fit_ND`` and scored on ``eval_ND``."""
    eval_x = _matrix(eval_ND)
    basis = fit_pca(fit_ND)
    rows: list[dict[str, float | str]] = []
    for k in ks:
        if k <= basis.components_KD.shape[0]:
            recon = basis.reconstruct(eval_x, k)
            rows.append({"method": "PCA", "k": k, "L0": float(k), "NMSE": nmse(eval_x, recon)})
        if k <= len(fit_ND):
            centroids = kmeans(fit_ND, k, seed=seed)
            recon = quantize(eval_x, centroids)
            rows.append({"method": "k-means", "k": k, "L0": 1.0, "NMSE": nmse(eval_x, recon)})
    return rows
