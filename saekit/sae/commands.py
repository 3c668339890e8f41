"""The bodies of ``saekit train`` and ``saekit sweep``, and the sweep file parser.

The argument parsers live in `saekit.cli` (built without importing torch, so ``saekit -h`` is
instant); their handlers call :func:`run_train` and :func:`run_sweep` here.

``saekit train --store DIR --layer L --arch topk --k 32 --expansion 8 --recipe stevens2025 --out DIR``
trains one SAE and saves it, SAELens style, into ``--out`` (`saekit.sae.train.train_to_folder`).

``saekit sweep SWEEP.toml`` trains every SAE the file lists in one pass over the store (read
with tomllib; the format is `saekit.cli.SWEEP_FORMAT`, shown by ``saekit sweep -h``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.sae.architectures import K_ARCHS, SAESpec, canonical_arch
from saekit.sae.recipes import get_recipe

#: Keys allowed in a sweep file's ``[grid]`` table.
GRID_KEYS = ("layer", "arch", "expansion", "l1", "k", "seed", "recipe")
#: Top-level keys allowed in a sweep file (besides the tables ``grid``, ``sae``, ``recipe_overrides``).
TOP_KEYS = (
    "store",
    "out",
    "recipe",
    "tokens",
    "batch_size",
    "epochs",
    "data_seed",
    "checkpoint_every",
    "device",
)


@dataclass
class SweepConfig:
    """A parsed sweep file."""

    store: str
    """Activation store folder."""
    out: str
    """Output folder: one sub-folder per SAE plus ``sweep.json``."""
    specs: list[SAESpec] = field(default_factory=list)
    """The SAEs to train."""
    tokens: str = "cls"
    """Train on CLS tokens (``cls``) or on patch tokens (``patch``)."""
    batch_size: int | None = None
    """Minibatch size (None: the recipes')."""
    epochs: int | None = None
    """Passes over the store (None: the recipes')."""
    data_seed: int = 0
    """Seed of the store's shuffling."""
    checkpoint_every: int = 1000
    """Steps between checkpoints."""
    device: str = "cpu"
    """Torch device to train on."""


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Parse a sweep TOML file (format: `saekit.cli.SWEEP_FORMAT`) into a :class:`SweepConfig`."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    raw = tomllib.loads(path.read_text())
    unknown = set(raw) - set(TOP_KEYS) - {"grid", "sae", "recipe_overrides"}
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {sorted(unknown)}; allowed: {list(TOP_KEYS)} and tables grid, sae, recipe_overrides"
        )
    for key in ("store", "out"):
        if key not in raw:
            raise ValueError(f'{path}: missing `{key} = "..."`')
    base = raw.get("recipe", "olson2025")
    overrides = raw.get("recipe_overrides", {})

    def recipe_of(name: str) -> Any:
        return get_recipe(name, **overrides)

    spec_fields = {f.name for f in dataclasses.fields(SAESpec)}
    specs = [
        _spec(dict(zip(keys, values, strict=True)), recipe_of, base)
        for keys, values in _grid_points(raw.get("grid", {}), path)
    ]
    for entry in raw.get("sae", []):
        bad = set(entry) - spec_fields
        if bad:
            raise ValueError(
                f"{path}: [[sae]] has unknown fields {sorted(bad)}; valid: {sorted(spec_fields)}"
            )
        specs.append(_spec(entry, recipe_of, base))
    if not specs:
        raise ValueError(f"{path}: no SAEs: add a [grid] table or [[sae]] entries")
    kwargs = {k: raw[k] for k in TOP_KEYS if k in raw and k not in ("store", "out", "recipe")}
    return SweepConfig(store=raw["store"], out=raw["out"], specs=specs, **kwargs)


def _grid_points(grid: dict[str, Any], path: Path) -> list[tuple[tuple[str, ...], tuple[Any, ...]]]:
    bad = set(grid) - set(GRID_KEYS)
    if bad:
        raise ValueError(f"{path}: [grid] has unknown keys {sorted(bad)}; valid: {list(GRID_KEYS)}")
    if not grid:
        return []
    lists = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
    archs = lists.pop("arch", ["relu"])
    sparsity = {"l1": lists.pop("l1", [None]), "k": lists.pop("k", [None])}
    points = []
    for arch in archs:
        key = "k" if canonical_arch(arch) in K_ARCHS else "l1"
        axes = {"arch": [arch], key: sparsity[key], **lists}
        for values in itertools.product(*axes.values()):
            points.append((tuple(axes), values))
    return points


def _spec(fields: dict[str, Any], recipe_of: Any, base: str) -> SAESpec:
    fields = dict(fields)
    fields["recipe"] = recipe_of(fields.get("recipe", base))
    return SAESpec(**{k: v for k, v in fields.items() if v is not None})


# --- command bodies ---------------------------------------------------------------------------


def _open_store(path: str) -> Any:
    from saekit.activations import ActivationStore

    return ActivationStore.open(path)


def run_train(args: argparse.Namespace) -> int:
    """Body of ``saekit train``."""
    from saekit import distributed
    from saekit.sae.train import train_to_folder

    recipe = get_recipe(args.recipe, **({"lr": args.lr} if args.lr is not None else {}))
    spec = SAESpec(
        arch=args.arch,
        expansion=args.expansion,
        l1=args.l1,
        k=args.k,
        layer=args.layer,
        recipe=recipe,
        seed=args.seed,
    )
    spec.resolved()  # a spec that cannot be trained fails before the store is opened
    # Under torchrun the SAE is trained data-parallel on every rank (saekit.distributed).
    ranks = distributed.init_from_env(args.device)
    try:
        sae, trained = train_to_folder(
            _open_store(args.store),
            spec,
            args.out,
            overwrite=args.overwrite,
            tokens=args.tokens,
            batch_size=args.batch_size,
            epochs=args.epochs,
            seed=args.data_seed,
            checkpoint_every=args.checkpoint_every,
            device=distributed.rank_device(args.device, ranks),
        )
    finally:
        distributed.shutdown()
    if not ranks.is_main:
        return 0
    name = sae.cfg.metadata.saekit["name"]
    if trained:
        print(f"saved {name} to {args.out}")
    else:
        print(f"{args.out} already holds {name} trained with these settings; nothing to do")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """Body of ``saekit sweep``."""
    from saekit import distributed
    from saekit.sae.train import SWEEP_MANIFEST, sweep_from_store

    cfg = load_sweep_config(args.config)
    manifest = Path(cfg.out) / SWEEP_MANIFEST
    before = manifest.read_bytes() if manifest.exists() else None
    # Under torchrun each rank trains its share of the SAEs (saekit.distributed).
    ranks = distributed.init_from_env(cfg.device)
    try:
        sweep_from_store(
            _open_store(cfg.store),
            cfg.specs,
            tokens=cfg.tokens,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            seed=cfg.data_seed,
            out_dir=cfg.out,
            checkpoint_every=cfg.checkpoint_every,
            device=distributed.rank_device(cfg.device, ranks),
            overwrite=getattr(args, "overwrite", False),
        )
    finally:
        distributed.shutdown()
    if not ranks.is_main:
        return 0
    # A finished sweep with the same settings is loaded, not retrained: its manifest is untouched.
    if before is not None and manifest.read_bytes() == before:
        print(f"{cfg.out} already holds these {len(cfg.specs)} SAEs; nothing to do")
    else:
        print(f"saved {len(cfg.specs)} SAEs to {cfg.out} (listed in {manifest})")
    return 0
