"""Synthetic activations with a planted sparse dictionary, and how well an SAE recovers it.

Each row is a sum of a few of ``n_atoms`` random unit vectors ("atoms") with positive
magnitudes, plus small Gaussian noise: the generative model SAEs assume. A trained SAE recovers
an atom when some decoder row points the same way (cosine ≥ 0.9 by default). Tests and the book
use this to check that every architecture can find a known ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import StandardSAE, StandardSAEConfig


@dataclass
class PlantedDictionary:
    """Synthetic activations and the dictionary that generated them."""

    acts_ND: torch.Tensor
    """The activations, [N, D]."""
    atoms_AD: torch.Tensor
    """The planted unit-norm atoms, [A, D]."""
    support_NK: torch.Tensor
    """Which atoms each row uses, [N, K]."""


def planted_dictionary(
    n_rows: int = 8192,
    d_in: int = 32,
    n_atoms: int = 64,
    active: int = 3,
    magnitude: tuple[float, float] = (0.5, 1.5),
    noise: float = 0.01,
    seed: int = 0,
) -> PlantedDictionary:
    """Rows = sum of ``active`` distinct random atoms with magnitudes ~ U(``magnitude``) + noise."""
    if active > n_atoms:
        raise ValueError(f"active={active} exceeds n_atoms={n_atoms}")
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    support = torch.rand(n_rows, n_atoms, generator=gen).argsort(dim=1)[:, :active]
    low, high = magnitude
    mags = low + (high - low) * torch.rand(n_rows, active, generator=gen)
    acts = torch.einsum("nk,nkd->nd", mags, atoms[support])
    acts += noise * torch.randn(n_rows, d_in, generator=gen)
    return PlantedDictionary(acts, atoms, support)


@torch.no_grad()
def atom_recovery(W_dec_SD: torch.Tensor, atoms_AD: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of atoms whose best-matching decoder row has cosine similarity ≥ ``threshold``."""
    rows = W_dec_SD / W_dec_SD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    atoms = atoms_AD / atoms_AD.norm(dim=1, keepdim=True)
    best_A = (atoms.to(rows) @ rows.T).max(dim=1).values
    return (best_A >= threshold).float().mean().item()


def identity_sae(width: int) -> StandardSAE:
    """A ReLU SAE whose codes are the input's positive part (feature i is dimension i): identity
    encoder and decoder, zero biases, so a test can plant exact codes."""
    sae = StandardSAE(StandardSAEConfig(d_in=width, d_sae=width))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(width))
        sae.W_dec.copy_(torch.eye(width))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae
