"""The SAE architectures, as SAELens classes, and what one SAE to train looks like (`SAESpec`).

Every SAE saekit trains is a SAELens SAE: training builds SAELens ``*TrainingSAE`` objects (so
their initialisation and configs are SAELens's), and a finished SAE is the SAELens inference
class (``StandardSAE``, ``TopKSAE``, ``GatedSAE``, ``JumpReLUSAE``) saved as SAELens saves it,
``cfg.json`` + ``sae_weights.safetensors``. ``sae_lens.SAE.load_from_disk`` reads saekit's SAEs
and :func:`load_sae` reads SAELens's.

Architectures (paper 003 §2.1, Eq. 1-5):

========== ============================================ ========================== =========
name       encoder                                      sparsity                   SAELens
========== ============================================ ========================== =========
relu       z = ReLU(W_enc (x − b_dec) + b_enc)          λ‖z ⊙ ‖W_dec‖‖₁             standard
topk       z = TopK(W_enc (x − b_dec) + b_enc)          exactly k active           topk
batchtopk  top k·B pre-activations over the batch        k active on average        batchtopk
gated      1[π_gate > 0] ⊙ ReLU(π_mag) (Eq. 5)           λ‖ReLU(π_gate)‖₁ + aux     gated
jumprelu   z ⊙ 1[z > θ], θ learned                       λ‖z‖₀ (straight-through)   jumprelu
matryoshka batchtopk codes; every prefix of the          k active on average        matryoshka
           dictionary also reconstructs x                                          _batchtopk
========== ============================================ ========================== =========

Matryoshka SAEs (Bussmann et al. 2025; SAELens's MatryoshkaBatchTopK, saev's default) add one
reconstruction loss per nested prefix of the dictionary, so early latents learn general
features that later ones refine rather than absorb. saekit nests ``MATRYOSHKA_LEVELS`` prefixes
of ``d_sae / 8, d_sae / 4, d_sae / 2`` and the whole dictionary (a fixed ladder, so a spec needs
no extra field); like batchtopk, a trained one saves as a jumprelu SAE.

SAELens subtracts b_dec from the input before encoding (``apply_b_dec_to_input``), a
reparametrisation of Eq. 1's b_enc that the papers' SAELens runs shared. A trained batchtopk SAE
is saved as a jumprelu SAE with one global threshold, as SAELens does.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.registry import get_sae_class

from saekit.sae.codes import iter_codes
from saekit.sae.recipes import Recipe, get_recipe, renormalize_decoder_

#: saekit architecture name -> (SAELens training class, its config class).
ARCHITECTURES: dict[str, tuple[type[TrainingSAE], type[Any]]] = {
    "relu": (StandardTrainingSAE, StandardTrainingSAEConfig),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
    "matryoshka": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
}
#: Other names accepted for an architecture (SAELens calls the ReLU SAE "standard").
ARCH_ALIASES = {"standard": "relu", "l1": "relu", "matryoshka_batchtopk": "matryoshka"}
#: Architectures whose sparsity is set by k rather than by λ.
K_ARCHS = ("topk", "batchtopk", "matryoshka")
#: Nested prefixes of a Matryoshka SAE: d_sae // 2**j for j = levels-1, ..., 0.
MATRYOSHKA_LEVELS = 4


def matryoshka_widths(d_sae: int, levels: int = MATRYOSHKA_LEVELS) -> list[int]:
    """The nested prefix widths of a Matryoshka SAE, smallest first, ending at ``d_sae``."""
    widths = sorted({max(1, d_sae >> j) for j in range(levels)})
    return widths


SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"


def canonical_arch(arch: str) -> str:
    """saekit's name for an architecture, accepting SAELens's names too."""
    name = ARCH_ALIASES.get(arch.lower(), arch.lower())
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unknown SAE architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    return name


@dataclass(frozen=True)
class SAESpec:
    """One SAE to train: what it is. How it is trained lives in its recipe."""

    arch: str = "relu"
    """Architecture: relu, topk, batchtopk, gated, jumprelu or matryoshka (SAELens's "standard"
    = relu; matryoshka = SAELens's matryoshka_batchtopk)."""
    d_in: int | None = None
    """Input width; the store helpers fill it from the store (must match the activations)."""
    expansion: int | None = None
    """SAE width as a multiple of d_in (None: the recipe's default)."""
    l1: float | None = None
    """Sparsity coefficient λ: L1 weight for relu/gated, L0 weight for jumprelu (None: recipe's)."""
    k: float | None = None
    """Active latents for topk (per input) or batchtopk/matryoshka (average per input) (None:
    recipe's)."""
    layer: int | str | None = None
    """Which activations to train on: a key of the batches' dict, or a store layer."""
    recipe: str | Recipe = "olson2025"
    """Training recipe, by name or as a Recipe."""
    seed: int = 0
    """Seed for the weight initialisation."""
    name: str | None = None
    """Folder name when saved (None: built from the fields, see ``label``)."""

    def resolved(self) -> SAESpec:
        """The spec with the recipe looked up and every default filled in."""
        recipe = get_recipe(self.recipe)
        arch = canonical_arch(self.arch)
        # A sparsity setting of the other kind would be silently ignored: refuse it.
        if arch in K_ARCHS and self.l1 is not None:
            raise ValueError(
                f"l1 (λ = {self.l1}) does not apply to a {arch} SAE, whose sparsity is k active "
                "latents: drop l1 (--l1) and set k, or choose relu, gated or jumprelu"
            )
        if arch not in K_ARCHS and self.k is not None:
            raise ValueError(
                f"k = {self.k} does not apply to a {arch} SAE, whose sparsity is the coefficient "
                "λ: drop k (--k) and set l1, or choose topk or batchtopk"
            )
        expansion = self.expansion if self.expansion is not None else recipe.expansion
        if arch in K_ARCHS:
            k = self.k if self.k is not None else recipe.k
            l1 = None
            if arch == "topk" and float(k) != int(k):
                raise ValueError(f"topk needs a whole number k, got {k}")
        else:
            l1 = self.l1 if self.l1 is not None else recipe.l1
            k = None
        return dataclasses.replace(self, arch=arch, expansion=expansion, l1=l1, k=k, recipe=recipe)

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        if self.d_in is None or self.expansion is None:
            raise ValueError("d_sae needs d_in and expansion; call resolved() and set d_in")
        return self.d_in * self.expansion

    @property
    def label(self) -> str:
        """A readable folder name, e.g. ``layer05-relu-x8-l1_10-olson2025`` (``name`` if set)."""
        if self.name:
            return self.name
        spec = self.resolved()
        layer = f"layer{spec.layer:02d}" if isinstance(spec.layer, int) else f"{spec.layer}"
        sparsity = f"k{_num(spec.k)}" if spec.arch in K_ARCHS else f"l1_{_num(spec.l1)}"
        parts = [layer] if spec.layer is not None else []
        parts += [spec.arch, f"x{spec.expansion}", sparsity]
        recipe = spec.recipe.name if isinstance(spec.recipe, Recipe) else spec.recipe
        parts += [recipe] + ([f"seed{spec.seed}"] if spec.seed else [])
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a Recipe object becomes its dict)."""
        out = dataclasses.asdict(self)
        if isinstance(self.recipe, Recipe):
            out["recipe"] = self.recipe.to_dict()
        return out

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SAESpec:
        """Inverse of :meth:`to_dict`."""
        fields = dict(fields)
        if isinstance(fields.get("recipe"), dict):
            fields["recipe"] = Recipe.from_dict(fields["recipe"])
        return cls(**fields)


def _num(x: float | None) -> str:
    return f"{x:g}".replace("+", "")


def build_training_sae(spec: SAESpec, device: str | torch.device = "cpu") -> TrainingSAE:
    """A freshly initialised SAELens training SAE for a resolved spec, seeded by ``spec.seed``.

    The init is SAELens's own (recipe ``init="saelens"``) or kaiming-uniform W_enc and W_dec
    with zero b_enc (``init="kaiming"``, stevens2025); b_dec is zero here and set to the data
    mean by the trainer when the recipe asks for it.
    """
    spec = spec.resolved()
    recipe: Recipe = spec.recipe  # type: ignore[assignment]
    if spec.d_in is None:
        raise ValueError("SAESpec.d_in is not set; give the activations' width (d_model)")
    if spec.arch in K_ARCHS and not 0 < spec.k <= spec.d_sae:  # type: ignore[operator]
        raise ValueError(
            f"k={spec.k} must lie in (0, d_sae={spec.d_sae}]; lower k or widen the SAE"
        )
    sae_cls, cfg_cls = ARCHITECTURES[spec.arch]
    kwargs: dict[str, Any] = {
        "d_in": spec.d_in,
        "d_sae": spec.d_sae,
        "dtype": "float32",
        "device": str(device),
        "decoder_init_norm": 0.1 if recipe.init == "saelens" else None,
    }
    if spec.arch in ("relu", "gated"):
        kwargs["l1_coefficient"] = float(spec.l1)  # type: ignore[arg-type]
    elif spec.arch == "jumprelu":
        kwargs["l0_coefficient"] = float(spec.l1)  # type: ignore[arg-type]
    else:
        kwargs["k"] = int(spec.k) if spec.arch == "topk" else float(spec.k)  # type: ignore[arg-type]
        kwargs["aux_loss_coefficient"] = recipe.aux_loss_coefficient
    if spec.arch == "matryoshka":
        kwargs["matryoshka_widths"] = matryoshka_widths(spec.d_sae)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        sae = sae_cls(cfg_cls(**kwargs))
        if recipe.init == "kaiming":
            with torch.no_grad():
                torch.nn.init.kaiming_uniform_(sae.W_enc)
                torch.nn.init.kaiming_uniform_(sae.W_dec)
    if recipe.unit_norm_decoder:
        renormalize_decoder_(sae.W_dec)
    return sae


def to_inference(training_sae: TrainingSAE) -> SAE:
    """The SAELens inference SAE a training SAE saves as (e.g. batchtopk -> jumprelu)."""
    cfg_dict = copy.deepcopy(training_sae.cfg).get_inference_sae_cfg_dict()
    sae_cls, cfg_cls = get_sae_class(cfg_dict["architecture"])
    cfg = cfg_cls.from_dict({**cfg_dict, "device": str(training_sae.W_dec.device)})
    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    return build_on_meta(sae_cls, cfg, state).eval()


def build_on_meta(sae_cls: type[SAE], cfg: Any, state: dict[str, torch.Tensor]) -> SAE:
    """Construct ``sae_cls(cfg)`` without a throw-away random init, then adopt ``state``.

    The same trick SAELens's ``load_from_disk`` uses: build on the meta device, assign weights.
    """
    device = cfg.device
    cfg.device = "meta"
    sae = sae_cls(cfg)
    sae.cfg.device = device
    sae.load_state_dict(state, assign=True)
    return sae.to(device=device)


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Save as SAELens does (``cfg.json`` + ``sae_weights.safetensors``); returns the folder."""
    if isinstance(sae, TrainingSAE):
        sae = to_inference(sae)
    path = Path(path)
    sae.save_model(path)
    return path


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """Load an SAE saved by saekit or SAELens (safetensors only; pickles are refused)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE folder at {path}")
    missing = [f for f in (SAE_CFG_FILE, SAE_WEIGHTS_FILE) if not (path / f).exists()]
    if missing:
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{path} is not a SAELens SAE folder: missing {missing} (found {found}). "
            "saekit loads weights from safetensors only; re-save pickled weights with "
            "saekit.sae.save_sae or sae_lens's save_model."
        )
    sae = SAE.load_from_disk(path, device=device)
    sae.eval()
    return sae


@torch.no_grad()
def encode_in_batches(
    sae: SAE,
    acts_ND: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 4096,
    pre_activation: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Codes ``[N, S]`` for raw activations ``[N, D]``, read in chunks (memmaps stay on disk).

    ``pre_activation=True`` returns what SAELens exposes at ``hook_sae_acts_pre`` instead: the
    encoder output before the sparsifying nonlinearity (paper 003 Fig. 12, "skip the activation
    function"; for gated SAEs the magnitude path).
    """
    chunks = [
        codes.cpu()
        for _, codes in iter_codes(
            sae, acts_ND, batch_size, pre_activation=pre_activation, progress=progress
        )
    ]
    if not chunks:
        return torch.zeros(0, sae.cfg.d_sae)
    return torch.cat(chunks)
