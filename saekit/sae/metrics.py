"""SAE quality on held-out activations: MSE, variance explained, L1, L0, dead and dense latents.

Definitions (papers 000 §3.4, 003 §3.2, 002 Table 1):

* MSE = mean over rows of ‖x − x̂‖² / d (paper 003 Eq. 6: averaged over dimensions);
* fraction of variance explained = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²;
* L1 = mean ‖z‖₁, L0 = mean number of non-zero latents per input;
* dead = latents never active on the evaluation set; dense = latents active on more than 1% of
  inputs (paper 002's "Dense" column);
* the activation-frequency histogram is over log10 of each latent's firing frequency.

Rows holding NaN/Inf would turn every number into ``nan``: `evaluate` refuses them by default
(naming the rows) or, with ``on_nonfinite="skip"``, leaves them out and counts them
(``SAEMetrics.n_skipped``). A store's array is checked against the SAE's metadata first (model,
layer, token kind; `saekit.sae.codes.check_sae_matches_acts`).

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

from saekit.sae.codes import (
    NonFiniteActivationsError,
    check_sae_matches_acts,
    nonfinite_rows,
    read_rows,
)


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
    """Number of evaluation inputs scored."""
    n_skipped: int = 0
    """Inputs left out because they held NaN/Inf (``on_nonfinite="skip"``)."""

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
    on_nonfinite: str = "raise",
) -> SAEMetrics:
    """Score ``sae`` on raw activations ``[N, D]`` (a tensor or a memmap, read in chunks).

    Rows holding NaN/Inf raise `NonFiniteActivationsError` (``on_nonfinite="raise"``) or are
    left out and counted in ``n_skipped`` (``"skip"``).
    """
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', not {on_nonfinite!r}")
    check_sae_matches_acts(sae, acts_ND)
    if len(acts_ND) == 0:
        raise ValueError("no evaluation activations")
    scale = _normalization_scale(sae) if normalized else 1.0
    device = sae.W_dec.device
    sq_err = l1 = l0 = 0.0
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    x_sum = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    x_sq = 0.0
    n = 0
    skipped: list[int] = []
    for start in tqdm(range(0, len(acts_ND), batch_size), desc="evaluating", disable=not progress):
        x = read_rows(acts_ND, start, start + batch_size)
        bad = nonfinite_rows(x)
        if len(bad):
            rows = (bad + start).tolist()
            if on_nonfinite == "raise":
                raise NonFiniteActivationsError(
                    f"{len(rows)} evaluation row(s) hold NaN/Inf (rows {rows[:10]}); drop them "
                    "or pass on_nonfinite='skip' to leave them out."
                )
            skipped.extend(rows)
            keep = torch.ones(len(x), dtype=torch.bool)
            keep[bad] = False
            x = x[keep]
        if not len(x):
            continue
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
        n += len(x)
    if n == 0:
        raise NonFiniteActivationsError(
            f"all {len(acts_ND)} evaluation rows hold NaN/Inf: nothing to score"
        )
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
        n_skipped=len(skipped),
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
