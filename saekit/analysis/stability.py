"""Dictionary stability: do two SAEs trained with different seeds learn the same atoms?

Each SAE's decoder rows are unit-normalised atoms ``W_dec [S, D]``. The two dictionaries are
matched one-to-one so that the total cosine similarity of matched pairs is largest (the
Hungarian algorithm, `scipy.optimize.linear_sum_assignment`, as overcomplete does); stability is
the mean matched cosine and the share of atoms whose match is above a threshold (0.9). A
dictionary matched against itself scores exactly 1; two random dictionaries in D dimensions
score about ``sqrt(2 log S / D)``, far below 0.9 for any useful width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of two dictionaries' atoms."""

    rows_a: np.ndarray
    """Atom indices of dictionary A, ``[M]`` (M = min of the two widths)."""
    rows_b: np.ndarray
    """The atom of dictionary B matched to each, ``[M]``."""
    cosine_M: np.ndarray
    """Cosine similarity of each matched pair, ``[M]``."""

    def mean_cosine(self) -> float:
        """Mean cosine of the matched pairs."""
        return float(self.cosine_M.mean())

    def share_above(self, threshold: float = 0.9) -> float:
        """Share of matched pairs whose cosine exceeds ``threshold``."""
        return float((self.cosine_M > threshold).mean())


def _unit_rows(weights_SD: torch.Tensor | np.ndarray) -> np.ndarray:
    rows = torch.as_tensor(weights_SD).detach().double().cpu().numpy()
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def match_atoms(
    atoms_a_SD: torch.Tensor | np.ndarray, atoms_b_SD: torch.Tensor | np.ndarray
) -> Matching:
    """Match the atoms (rows) of two dictionaries of the same width D by the largest total cosine."""
    a_SD, b_SD = _unit_rows(atoms_a_SD), _unit_rows(atoms_b_SD)
    if a_SD.shape[1] != b_SD.shape[1]:
        raise ValueError(
            f"dictionaries of different widths: {a_SD.shape[1]} and {b_SD.shape[1]} dimensions; "
            "compare SAEs trained on the same layer"
        )
    cosine_SS = a_SD @ b_SD.T
    rows_a, rows_b = linear_sum_assignment(cosine_SS, maximize=True)
    return Matching(rows_a, rows_b, cosine_SS[rows_a, rows_b])


def stability(sae_a: torch.nn.Module, sae_b: torch.nn.Module) -> Matching:
    """`match_atoms` on two SAEs' decoder rows."""
    return match_atoms(sae_a.W_dec, sae_b.W_dec)
