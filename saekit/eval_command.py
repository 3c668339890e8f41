"""``saekit eval``: the report card of one saved SAE on an activation store, from the shell.

The parser is built without importing torch (``saekit -h`` stays instant); the handler imports
`saekit.analysis.report_card` when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _ks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--ks takes comma-separated integers, not {text!r}"
        ) from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--ks needs positive feature counts, got {text!r}")
    return values


def run_eval(args: argparse.Namespace) -> int:
    """Grade ``--sae`` on ``--store`` and print the card; with ``--out`` also save it."""
    import matplotlib

    matplotlib.use("Agg")

    from saekit.activations import ActivationStore
    from saekit.analysis.report_card import report_card
    from saekit.sae import load_sae

    sae = load_sae(args.sae, device=args.device)
    store = ActivationStore.open(args.store)
    layer = args.layer
    if layer is None:
        trained_on = (sae.cfg.metadata.get("saekit") or {}).get("spec", {}).get("layer")
        layer = trained_on if trained_on in store.layers else store.layers[-1]
    train = ActivationStore.open(args.train_store) if args.train_store else None
    twin = load_sae(args.twin, device=args.device) if args.twin else None
    card = report_card(sae, store, int(layer), train_store=train, twin=twin, ks=args.ks,
                       name=Path(args.sae).name)  # fmt: skip
    row = card.row()
    width = max(len(name) for name in row)
    print(f"report card of {args.sae} on layer {layer} of {args.store}")
    for name, value in row.items():
        print(f"  {name:<{width}}  {value:.4g}")
    for note in card.notes:
        print(f"  (not measured: {note})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        import pandas as pd

        pd.Series(row, name=card.name).to_csv(out / "report_card.csv")
        card.figure().savefig(out / "report_card.png", dpi=120)
        if card.absorption is not None:
            card.absorption.to_csv(out / "absorption.csv", index=False)
        print(f"saved report_card.csv, report_card.png and absorption.csv in {out}")
    return 0


def add_eval(commands: Any) -> None:
    """Add ``saekit eval`` to the CLI's subcommands."""
    parser = commands.add_parser(
        "eval",
        help="the report card of one SAE on an activation store",
        description=(
            "Grade a saved SAE (SAELens folder) on the CLS tokens of one layer of an activation "
            "store: MSE, normalised MSE, explained variance, L0, dead and dense features; sparse "
            "probing against the model's neurons; stability against a --twin trained with "
            "another seed; hierarchical absorption against WordNet when the store has WordNet "
            "ids. Downstream fidelity needs the images and a head: use "
            "saekit.analysis.report_card from Python for it."
        ),
    )
    parser.add_argument("--sae", required=True, help="SAE folder (cfg.json + safetensors)")
    parser.add_argument("--store", required=True, help="activation store to evaluate on")
    parser.add_argument(
        "--layer", type=int, default=None,
        help="store layer (default: the layer the SAE was trained on, else the last)",
    )  # fmt: skip
    parser.add_argument(
        "--train-store", default=None,
        help="store the sparse probes are fit on (default: even rows of --store, scored on odd)",
    )  # fmt: skip
    parser.add_argument("--twin", default=None, help="the same SAE trained with another seed")
    parser.add_argument(
        "--ks", type=_ks, default=(1, 2, 5, 20),
        help="feature counts for sparse probing (default: 1,2,5,20)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="folder for report_card.csv/.png")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(handler=run_eval)
