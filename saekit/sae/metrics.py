"""SAE quality on held-out activations: MSE, variance explained, L1, L0, dead and dense latents.

Definitions (papers 000 §3.4, 003 §3.2, 002 Table 1):

* MSE = mean over rows of ‖x − x̂‖² / d (paper 003 Eq. 6: averaged over dimensions);
* fraction of variance explained = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²;
* L1 = mean ‖z‖₁, L0 = mean number of non-zero latents per input;
* dead = latents never active on the evaluation set; dense = latents active on more than 1% of
  inputs (paper 002's "Dense" column);
* the activation-frequency histogram is over log10 of each latent's firing frequency.

By default errors are measured on the raw activations the SAE encodes. SAEs trained with input
normalisation (stevens2025) can also be scored in the normalised space they were trained in
(``normalized=True``), which is the space paper 002's MSE column refers to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from saekit.sae.codes import check_width, read_rows


@dataclass
class SAEMetrics:
    """One SAE scored on one evaluation set."""

    mse: float
    """Mean over rows of the squared reconstruction error averaged over dimensions."""
    explained_variance: float
    """Fraction of the activations' variance the reconstruction explains."""
    l1: float
    """Mean L1 norm of the codes."""
    l0: float
    """Mean number of active latents per input."""
    n_dead: int
    """Latents never active on the evaluation set."""
    n_dense: int
    """Latents active on more than ``dense_threshold`` of the inputs."""
    frequencies: np.ndarray
    """Per-latent firing frequency on the evaluation set, [S]."""
    n_rows: int
    """Number of evaluation inputs."""

    def row(self) -> dict[str, float]:
        """The paper 002 table row: MSE | L0 | Dead | Dense."""
        return {"MSE": self.mse, "L0": self.l0, "Dead": self.n_dead, "Dense": self.n_dense}


@torch.no_grad()
def evaluate(
    sae: SAE,
    acts_ND: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 4096,
    dense_threshold: float = 0.01,
    normalized: bool = False,
    progress: bool = False,
) -> SAEMetrics:
    """Score ``sae`` on raw activations ``[N, D]`` (a tensor or a memmap, read in chunks)."""
    check_width(sae, acts_ND.shape[-1])
    n = len(acts_ND)
    if n == 0:
        raise ValueError("no evaluation activations")
    scale = _normalization_scale(sae) if normalized else 1.0
    device = sae.W_dec.device
    sq_err = l1 = l0 = 0.0
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    x_sum = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    x_sq = 0.0
    for start in tqdm(range(0, n, batch_size), desc="evaluating", disable=not progress):
        x = read_rows(acts_ND, start, start + batch_size)
        x = x.to(device, torch.float32)
        codes = sae.encode(x)
        err = (sae.decode(codes) - x).double() * scale
        sq_err += err.pow(2).sum().item()
        active = codes != 0
        l0 += active.sum().item()
        l1 += codes.abs().double().sum().item()
        counts += active.sum(0).double().cpu()
        xs = x.double() * scale
        x_sum += xs.sum(0).cpu()
        x_sq += xs.pow(2).sum().item()
    total_var = x_sq - x_sum.pow(2).sum().item() / n
    freqs = (counts / n).numpy()
    return SAEMetrics(
        mse=sq_err / (n * sae.cfg.d_in),
        explained_variance=1 - sq_err / total_var if total_var > 0 else float("nan"),
        l1=l1 / n,
        l0=l0 / n,
        n_dead=int((counts == 0).sum()),
        n_dense=int((freqs > dense_threshold).sum()),
        frequencies=freqs,
        n_rows=n,
    )


def _normalization_scale(sae: SAE) -> float:
    info = (sae.cfg.metadata.get("saekit") or {}).get("input_normalization", {})
    if not info.get("folded"):
        raise ValueError("this SAE was trained without input normalisation; use normalized=False")
    return float(info["scale"])


def frequency_histogram(
    frequencies: np.ndarray, bins: int | np.ndarray = 40, floor: float = 1e-7
) -> tuple[np.ndarray, np.ndarray]:
    """Counts and bin edges of log10 firing frequency; dead latents sit at log10(``floor``)."""
    logs = np.log10(np.maximum(np.asarray(frequencies, dtype=np.float64), floor))
    return np.histogram(logs, bins=bins)


def metrics_table(results: Mapping[str, SAEMetrics]) -> pd.DataFrame:
    """A paper 002 style table, one row per SAE: MSE | L0 | Dead | Dense."""
    return pd.DataFrame({name: m.row() for name, m in results.items()}).T.astype(
        {"MSE": float, "L0": float, "Dead": int, "Dense": int}
    )
