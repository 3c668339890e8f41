"""Training recipes from the papers, selectable by name, and the schedules they define.

A :class:`Recipe` holds everything about *how* an SAE is trained (optimiser, schedules, input
normalisation, initialisation, decoder constraints); an :class:`~saekit.sae.architectures.SAESpec`
holds *what* is trained (architecture, width, λ or k, layer). Two recipes come from the papers:

``olson2025`` (paper 000 §3.5, paper 003 §3.3)
    Adam, lr 1e-4 with a 5% linear warm-up and a linear decay to zero over the last 20% of steps,
    λ warmed up linearly over the first 5% of steps, minibatch 64, 3 epochs, expansion 8,
    λ = 10 (the layer sweep). The papers trained with SAELens, so everything the papers leave
    unsaid follows SAELens's trainer: its default initialisation (decoder rows at norm 0.1,
    W_enc = W_decᵀ, zero biases) and its gradient clipping at norm 1. ``olson2025_ood`` is the
    same recipe with λ = 0.5, the value paper 003 reports for its OOD probes (Table 1).

``stevens2025`` (paper 002 §3.2 and §8)
    Inputs have the dataset mean subtracted and are scaled by one dataset-wide constant so their
    average L2 norm is 1 ("normalise activation vectors to unit norm", after Templeton et al.
    2024, who scale by a constant rather than per vector). b_dec starts at the mean of the
    (normalised) data; W_enc and W_dec are kaiming-uniform, b_enc is zero; decoder rows are
    renormalised to unit length after every update and the gradient component parallel to each
    row is removed before it; lr and λ warm up linearly over 500 steps each, then stay constant.
    The paper's table of values was lost in conversion; lr 4e-4 and batch 16384 follow the saev
    code's defaults, expansion 32 is the paper's "24K" features for a 768-wide ViT, and
    λ = 8e-5·√768 ≈ 2.2e-3 is saev's default (per-dimension MSE on inputs of norm √d) rewritten
    for SAELens's loss (summed MSE on unit-norm inputs).

The normalisation is an affine map, so after training it is folded into the SAE's weights with
SAELens's own ``fold_activation_whitening``; a saved SAE therefore encodes *raw* activations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Recipe:
    """How to train an SAE. Frozen and hashable: SAEs with equal recipes train as one group."""

    name: str
    """Name the recipe is registered under (``olson2025``, ``stevens2025``, ...)."""
    lr: float
    """Peak Adam learning rate."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    lr_warmup_fraction: float = 0.0
    """Linear lr warm-up over this fraction of all training steps (added to ``lr_warmup_steps``)."""
    lr_warmup_steps: int = 0
    """Linear lr warm-up over this many steps (added to ``lr_warmup_fraction``)."""
    lr_decay_fraction: float = 0.0
    """Linear lr decay to zero over this final fraction of all training steps."""
    sparsity_warmup_fraction: float = 0.0
    """Linear λ warm-up from 0 over this fraction of all steps (added to ``sparsity_warmup_steps``)."""
    sparsity_warmup_steps: int = 0
    """Linear λ warm-up from 0 over this many steps (added to ``sparsity_warmup_fraction``)."""
    l1: float = 1.0
    """Default sparsity coefficient λ (L1 weight for relu/gated, L0 weight for jumprelu)."""
    k: float = 32
    """Default number of active latents for topk (per input) and batchtopk/matryoshka (average
    per input)."""
    batch_size: int = 64
    """Minibatch size (rows of activations per step)."""
    epochs: int = 1
    """Passes over the activation store."""
    expansion: int = 8
    """Default SAE width as a multiple of the input width (d_sae = expansion · d_in)."""
    max_grad_norm: float | None = None
    """Clip each SAE's gradient to this global L2 norm before the update (None: no clipping)."""
    normalize_inputs: bool = False
    """Subtract the dataset mean and scale inputs by one constant so their mean norm is ``input_norm``."""
    input_norm: float = 1.0
    """Average L2 norm of the normalised inputs (1 = the paper's "unit norm"; √d matches saev's code)."""
    norm_sample_rows: int = 2**17
    """Rows read (from the first epoch's order) to estimate the dataset mean and norm."""
    init: str = "saelens"
    """Weight init: ``saelens`` (SAELens default) or ``kaiming`` (kaiming-uniform W_enc and W_dec)."""
    init_b_dec_to_mean: bool = False
    """Start b_dec at the mean of the (normalised) training inputs instead of zero."""
    unit_norm_decoder: bool = False
    """Renormalise every decoder row (a feature's direction) to unit length after each update."""
    remove_parallel_grads: bool = False
    """Remove the gradient component parallel to each decoder row before each update."""
    dead_feature_window: int = 1000
    """A latent silent for more than this many steps counts as dead (TopK's auxiliary loss uses it)."""
    aux_loss_coefficient: float = 1.0
    """Weight of the TopK/BatchTopK auxiliary loss that revives dead latents (SAELens default)."""

    def __post_init__(self) -> None:
        if self.init not in ("saelens", "kaiming"):
            raise ValueError(f"Recipe.init must be 'saelens' or 'kaiming', got {self.init!r}")
        if not 0 <= self.lr_warmup_fraction + self.lr_decay_fraction <= 1:
            raise ValueError("lr_warmup_fraction + lr_decay_fraction must lie in [0, 1]")

    def lr_warmup(self, total_steps: int) -> int:
        """Number of lr warm-up steps in a run of ``total_steps``."""
        return self.lr_warmup_steps + round(self.lr_warmup_fraction * total_steps)

    def lr_decay(self, total_steps: int) -> int:
        """Number of final lr decay steps in a run of ``total_steps``."""
        return round(self.lr_decay_fraction * total_steps)

    def sparsity_warmup(self, total_steps: int) -> int:
        """Number of λ warm-up steps in a run of ``total_steps``."""
        return self.sparsity_warmup_steps + round(self.sparsity_warmup_fraction * total_steps)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate used by the update at 0-based ``step``."""
        return self.lr * lr_multiplier(
            step, total_steps, self.lr_warmup(total_steps), self.lr_decay(total_steps)
        )

    def sparsity_at(self, step: int, total_steps: int) -> float:
        """Multiplier on λ at 0-based ``step`` (0 at the first step, 1 after the warm-up)."""
        return sparsity_multiplier(step, self.sparsity_warmup(total_steps))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`."""
        fields = dict(fields)
        if "adam_betas" in fields:
            fields["adam_betas"] = tuple(fields["adam_betas"])
        return cls(**fields)


def lr_multiplier(step: int, total_steps: int, warmup: int, decay: int) -> float:
    """Linear warm-up then constant then linear decay, as SAELens's ``constant`` schedule.

    Step ``t`` (0-based) gets ``(t + 1) / warmup`` during the warm-up (never a zero step), 1 in the
    middle, and ``(total - t) / decay`` over the last ``decay`` steps (so the last step gets
    ``1 / decay``). Where warm-up and decay overlap (very short runs) the smaller value wins.
    """
    factor = 1.0
    if warmup > 0 and step < warmup:
        factor = (step + 1) / warmup
    if decay > 0 and step >= total_steps - decay:
        factor = min(factor, (total_steps - step) / decay)
    return factor


def sparsity_multiplier(step: int, warmup: int) -> float:
    """Linear warm-up of λ from 0: ``step / warmup`` until ``warmup``, then 1 (SAELens convention)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    return 1.0


_OLSON2025 = Recipe(
    name="olson2025",
    lr=1e-4,
    lr_warmup_fraction=0.05,
    lr_decay_fraction=0.20,
    sparsity_warmup_fraction=0.05,
    l1=10.0,
    batch_size=64,
    epochs=3,
    expansion=8,
    max_grad_norm=1.0,
)

RECIPES: dict[str, Recipe] = {
    "olson2025": _OLSON2025,
    # Paper 003's OOD study: the same recipe with λ = 0.5.
    "olson2025_ood": dataclasses.replace(_OLSON2025, name="olson2025_ood", l1=0.5),
    "stevens2025": Recipe(
        name="stevens2025",
        lr=4e-4,
        lr_warmup_steps=500,
        sparsity_warmup_steps=500,
        l1=8e-5 * 768**0.5,
        batch_size=16384,
        epochs=1,
        expansion=32,
        normalize_inputs=True,
        input_norm=1.0,
        init="kaiming",
        init_b_dec_to_mean=True,
        unit_norm_decoder=True,
        remove_parallel_grads=True,
    ),
}


def get_recipe(recipe: str | Recipe, **overrides: Any) -> Recipe:
    """Look a recipe up by name (or take one as is) and replace any fields given as keywords."""
    if isinstance(recipe, Recipe):
        base = recipe
    else:
        try:
            base = RECIPES[recipe]
        except KeyError:
            raise ValueError(
                f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)} "
                "or pass a saekit.sae.Recipe"
            ) from None
    if not overrides:
        return base
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise ValueError(f"unknown recipe fields {sorted(unknown)}; valid: {_field_names()}")
    return dataclasses.replace(base, **overrides)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe)]


# --- decoder constraints (stevens2025) ------------------------------------------------------


@torch.no_grad()
def remove_parallel_grad_(W_dec: torch.Tensor) -> None:
    """Project each decoder row's gradient onto the row's orthogonal complement, in place.

    Works on any leading dimensions (``[S, D]`` or stacked ``[n, S, D]``). The component along
    the row would only change the row's length, which the renormalisation undoes anyway; removing
    it keeps Adam's moment estimates about directions alone (Bricken et al. 2023).
    """
    if W_dec.grad is None:
        return
    rows = W_dec.data
    coeff = (W_dec.grad * rows).sum(-1, keepdim=True) / rows.pow(2).sum(-1, keepdim=True).clamp_min(
        1e-12
    )
    W_dec.grad.sub_(coeff * rows)


@torch.no_grad()
def renormalize_decoder_(W_dec: torch.Tensor) -> None:
    """Scale every decoder row (``[..., S, D]``, a feature's direction) to unit L2 norm, in place."""
    W_dec.data.div_(W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-12))


# --- input normalisation (stevens2025) -------------------------------------------------------


@dataclass
class InputNormalizer:
    """``x ↦ (x − mean) · scale``: the dataset-wide affine map the stevens2025 recipe trains on."""

    mean_D: torch.Tensor
    """Dataset mean activation, shape [D]."""
    scale: float
    """Constant that brings the centred inputs' average L2 norm to the recipe's ``input_norm``."""

    @classmethod
    def identity(cls, d_in: int) -> InputNormalizer:
        """The map that leaves inputs unchanged."""
        return cls(torch.zeros(d_in), 1.0)

    @classmethod
    def fit(cls, sample_ND: torch.Tensor, input_norm: float = 1.0) -> InputNormalizer:
        """Estimate the mean and scale from a sample of raw activations (float64 accumulation)."""
        sample = sample_ND.double()
        mean = sample.mean(0)
        mean_norm = (sample - mean).norm(dim=-1).mean().item()
        if mean_norm == 0:
            raise ValueError(
                "every sampled activation equals the mean; cannot normalise to unit norm"
            )
        return cls(mean.float(), input_norm / mean_norm)

    def __call__(self, x_BD: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0 and not self.mean_D.any():
            return x_BD
        return (x_BD - self.mean_D.to(x_BD.device, x_BD.dtype)) * self.scale

    def fold_into(self, sae: Any) -> None:
        """Make a SAELens inference SAE trained on normalised inputs take raw ones, in place.

        Uses SAELens's ``fold_activation_whitening`` with the whitening matrix ``scale · I``:
        afterwards ``sae.encode(x)`` equals the old ``sae.encode(self(x))`` and ``sae.decode``
        returns raw-space reconstructions.
        """
        eye = torch.eye(len(self.mean_D), dtype=torch.float64)
        sae.fold_activation_whitening(self.mean_D.double(), eye * self.scale, eye / self.scale)
