"""The ``saekit train`` and ``saekit sweep`` subcommands (``saekit.cli`` calls :func:`register`).

``saekit train --store DIR --layer L --arch topk --k 32 --expansion 8 --recipe stevens2025 --out DIR``
trains one SAE and saves it, SAELens style, into ``--out``.

``saekit sweep SWEEP.toml`` trains every SAE the file lists in one pass over the store. The file
(read with tomllib, Python >= 3.11)::

    store = "runs/acts/dinov2"        # activation store folder
    out = "runs/saes/dinov2-sweep"    # one folder per SAE, plus sweep.json
    recipe = "olson2025"              # recipe of every SAE unless an entry names another
    tokens = "cls"                    # "cls" or "patch"
    # optional: batch_size = 64, epochs = 3, data_seed = 0, checkpoint_every = 1000,
    #           device = "cpu"

    [recipe_overrides]                # optional: change fields of the recipe(s)
    lr = 3e-4

    [grid]                            # every combination becomes one SAE
    layer = [3, 7, 11]
    arch = ["relu", "gated", "topk"]
    expansion = [8, 16]
    l1 = [0.5, 10.0]                  # λ values, for relu / gated / jumprelu
    k = [16, 32]                      # k values, for topk / batchtopk

    [[sae]]                           # extra SAEs; any SAESpec field
    layer = 11
    arch = "batchtopk"
    k = 64

The grid above is 3 layers × (2 λ for relu + 2 λ for gated + 2 k for topk) × 2 expansions = 36
SAEs, plus the one listed under ``[[sae]]``. An interrupted sweep resumes when run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.sae.architectures import ARCH_ALIASES, ARCHITECTURES, K_ARCHS, SAESpec, canonical_arch
from saekit.sae.recipes import RECIPES, get_recipe

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
    """Parse a sweep TOML file (format in this module's docstring) into a :class:`SweepConfig`."""
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


# --- argparse ---------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add ``train`` and ``sweep`` to an ``argparse`` subparsers object."""
    arch_names = sorted(ARCHITECTURES) + sorted(ARCH_ALIASES)
    train = subparsers.add_parser(
        "train",
        help="train one SAE on one layer of an activation store",
        description="Train one SAE on one layer of an activation store and save it SAELens style.",
    )
    train.add_argument("--store", required=True, help="activation store folder")
    train.add_argument("--layer", required=True, type=_layer, help="layer of the store")
    train.add_argument("--arch", default="relu", choices=arch_names, help="SAE architecture")
    train.add_argument("--k", type=float, help="active latents (topk, batchtopk)")
    train.add_argument("--l1", type=float, help="sparsity coefficient λ (relu, gated, jumprelu)")
    train.add_argument("--expansion", type=int, help="d_sae / d_in (default: the recipe's)")
    train.add_argument(
        "--recipe", default="olson2025", choices=sorted(RECIPES), help="training recipe"
    )
    train.add_argument("--lr", type=float, help="override the recipe's learning rate")
    train.add_argument("--out", required=True, help="folder to save the SAE in")
    train.add_argument("--tokens", default="cls", choices=["cls", "patch"], help="which tokens")
    train.add_argument("--batch-size", type=int, help="minibatch size (default: the recipe's)")
    train.add_argument("--epochs", type=int, help="passes over the store (default: the recipe's)")
    train.add_argument("--seed", type=int, default=0, help="weight-init seed")
    train.add_argument("--data-seed", type=int, default=0, help="store shuffling seed")
    train.add_argument(
        "--checkpoint-every", type=int, default=1000, help="steps between checkpoints"
    )
    train.add_argument("--device", default="cpu", help="torch device")
    train.set_defaults(handler=run_train)

    sweep = subparsers.add_parser(
        "sweep",
        help="train many SAEs in one pass over an activation store",
        description="Train every SAE a sweep TOML file lists in one pass over a store.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("config", help="sweep TOML file (see `saekit.sae.commands`)")
    sweep.set_defaults(handler=run_sweep)


def _layer(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _open_store(path: str) -> Any:
    from saekit.activations import ActivationStore

    return ActivationStore.open(path)


def run_train(args: argparse.Namespace) -> int:
    """Body of ``saekit train``."""
    from saekit.sae.architectures import save_sae
    from saekit.sae.train import CHECKPOINT_FILE, train_from_store

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
    out = Path(args.out)
    checkpoint_dir = out / ".checkpoint"
    sae = train_from_store(
        _open_store(args.store),
        spec,
        tokens=args.tokens,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.data_seed,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )
    save_sae(sae, out)
    (checkpoint_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    print(f"saved {sae.cfg.metadata.saekit['name']} to {out}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """Body of ``saekit sweep``."""
    from saekit.sae.train import sweep_from_store

    cfg = load_sweep_config(args.config)
    sweep_from_store(
        _open_store(cfg.store),
        cfg.specs,
        tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        seed=cfg.data_seed,
        out_dir=cfg.out,
        checkpoint_every=cfg.checkpoint_every,
        device=cfg.device,
    )
    print(f"saved {len(cfg.specs)} SAEs to {cfg.out} (listed in {Path(cfg.out) / 'sweep.json'})")
    return 0
