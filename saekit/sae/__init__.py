"""The SAE engine: SAELens architectures, the papers' recipes, single and sweep training, metrics.

Typical use::

    from saekit.sae import SAESpec, sweep_from_store, load_sae, evaluate

    specs = [SAESpec(arch="relu", layer=layer, recipe="olson2025") for layer in range(12)]
    saes = sweep_from_store(store, specs, out_dir="runs/layer-sweep")
    metrics = evaluate(load_sae("runs/layer-sweep/layer05-relu-x8-l1_10-olson2025"), held_out)

Modules: :mod:`~saekit.sae.architectures` (specs, SAELens classes, load/save),
:mod:`~saekit.sae.recipes` (``olson2025``, ``stevens2025``), :mod:`~saekit.sae.stacked`
(batched losses), :mod:`~saekit.sae.train` (training, checkpoints, stores),
:mod:`~saekit.sae.cache` (train once, load on every equal request), :mod:`~saekit.sae.metrics`, :mod:`~saekit.sae.synthetic` (planted dictionaries) and
:mod:`~saekit.sae.commands` (the CLI).
"""

from saekit.sae.architectures import (
    ARCHITECTURES,
    SAESpec,
    build_training_sae,
    encode_in_batches,
    load_sae,
    save_sae,
    to_inference,
)
from saekit.sae.cache import CacheMismatchError, train_or_load
from saekit.sae.codes import SAEStoreMismatchError, check_sae_matches_store, iter_codes
from saekit.sae.metrics import SAEMetrics, evaluate, frequency_histogram, metrics_table
from saekit.sae.recipes import RECIPES, Recipe, get_recipe
from saekit.sae.synthetic import atom_recovery, planted_dictionary
from saekit.sae.train import (
    NonFiniteActivationsError,
    load_sweep,
    save_sweep,
    sweep,
    sweep_from_store,
    tensor_batches,
    train_from_store,
    train_on_tensor,
    train_sae,
)

__all__ = [
    "ARCHITECTURES",
    "CacheMismatchError",
    "RECIPES",
    "NonFiniteActivationsError",
    "Recipe",
    "SAEMetrics",
    "SAESpec",
    "SAEStoreMismatchError",
    "atom_recovery",
    "build_training_sae",
    "check_sae_matches_store",
    "encode_in_batches",
    "evaluate",
    "frequency_histogram",
    "get_recipe",
    "iter_codes",
    "load_sae",
    "load_sweep",
    "metrics_table",
    "planted_dictionary",
    "save_sae",
    "save_sweep",
    "sweep",
    "sweep_from_store",
    "tensor_batches",
    "to_inference",
    "train_from_store",
    "train_on_tensor",
    "train_or_load",
    "train_sae",
]
