"""The `saekit` command: long runs outside notebooks.

saekit extract --model ID_OR_PATH --data DIR|wds:PATTERN|hf:NAME --layers all|0,5,11|3-5 --tokens cls|patch|both --out DIR
saekit train --store DIR --layer L --arch relu|topk|... --out DIR   (one SAE)
saekit sweep SWEEP.toml                                              (many SAEs, one pass)
saekit eval --sae DIR --store DIR                                    (an SAE's report card)
saekit book [--profile mini|paper] [--only CHAPTER]                  (execute chapters, build the site)

Every command resumes when rerun after an interruption, refuses to overwrite results made with
other settings, and prints errors without a traceback (add --debug to see one). Run
`saekit COMMAND -h` for a command's options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from saekit.eval_command import add_eval

# The parser is built without importing torch, transformers or SAELens (seconds), so
# `saekit -h` answers at once; each handler imports what its command needs. A test checks these
# names against the registries they mirror.
#: SAE architectures (saekit.sae.architectures.ARCHITECTURES and ARCH_ALIASES).
ARCH_NAMES = (
    "batchtopk",
    "gated",
    "jumprelu",
    "matryoshka",
    "relu",
    "topk",
    "l1",
    "matryoshka_batchtopk",
    "standard",
)
#: Architectures whose sparsity is k rather than λ (saekit.sae.architectures.K_ARCHS).
K_ARCH_NAMES = ("topk", "batchtopk", "matryoshka")
#: Training recipes (saekit.sae.recipes.RECIPES).
RECIPE_NAMES = ("olson2025", "olson2025_ood", "stevens2025")

SWEEP_FORMAT = """\
The sweep file (TOML)::

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
SAEs, plus the one listed under [[sae]]. An interrupted sweep resumes when run again; rerunning a
finished one loads it; an `out` folder holding a sweep with other settings is refused unless
--overwrite.
"""


class CommandLineError(ValueError):
    """Options that do not fit together; the message names the flags."""


def _layers_arg(text: str) -> str:
    """Check ``--layers`` while parsing, before any folder or model is touched."""
    from saekit.models import parse_layers

    try:
        parse_layers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def _extract(args: argparse.Namespace) -> int:
    from pathlib import Path

    from saekit import distributed
    from saekit.activations import check_output_folder, extract
    from saekit.data import load_dataset
    from saekit.models import load_encoder

    _check_data_flags(args)
    # Under torchrun every rank extracts its share of the shards (saekit.distributed).
    ranks = distributed.init_from_env(args.device)
    try:
        # Cheap checks first: a bad data or output folder is reported before the model loads.
        dataset = load_dataset(
            args.data, split=args.split, streaming=args.streaming, classes=args.classes,
            image_key=args.image_key or "image", label_key=args.label_key or "label",
        )  # fmt: skip
        if ranks.is_main:
            check_output_folder(Path(args.out).expanduser())
        encoder = load_encoder(args.model, device=distributed.rank_device(args.device, ranks))
        store = extract(
            encoder,
            dataset,
            layers=args.layers,
            tokens=args.tokens,
            out=args.out,
            dtype=args.dtype,
            batch_size=args.batch_size,
            shard_images=args.shard_images,
            decode_workers=args.workers,
        )
    finally:
        distributed.shutdown()
    if not ranks.is_main:
        return 0
    print(store)
    if store.skipped:
        print(
            f"{len(store.skipped)} unreadable images were skipped (listed in {args.out}/manifest.json)"
        )
    return 0


def _check_data_flags(args: argparse.Namespace) -> None:
    """Flags that only some kinds of --data read are refused for the others."""
    kind = "wds" if args.data.startswith("wds:") else "hf" if args.data.startswith("hf:") else ""
    if args.classes is not None and kind != "wds":
        raise CommandLineError(
            "--classes applies to WebDataset tar shards (--data wds:PATTERN); a folder's classes "
            "are its sub-folders and a Hugging Face dataset's come from its label column."
        )
    hf_only = {"--split": args.split, "--image-key": args.image_key, "--label-key": args.label_key}
    hf_only["--streaming"] = args.streaming or None
    for flag, value in hf_only.items():
        if value is not None and kind != "hf":
            raise CommandLineError(
                f"{flag} applies to Hugging Face datasets (--data hf:NAME); drop it, or name "
                "the dataset as hf:NAME."
            )


def _check_sparsity_flags(args: argparse.Namespace) -> None:
    aliases = {"standard": "relu", "l1": "relu", "matryoshka_batchtopk": "matryoshka"}
    arch = aliases.get(args.arch, args.arch)
    if args.k is not None and arch not in K_ARCH_NAMES:
        raise CommandLineError(
            f"--k applies to topk, batchtopk and matryoshka SAEs; a {arch} SAE's sparsity is "
            "--l1 (λ). Drop --k, or choose --arch topk / batchtopk / matryoshka."
        )
    if args.l1 is not None and arch in K_ARCH_NAMES:
        raise CommandLineError(
            f"--l1 applies to relu, gated and jumprelu SAEs; a {arch} SAE's sparsity is --k. "
            "Drop --l1, or choose --arch relu / gated / jumprelu."
        )


def _train(args: argparse.Namespace) -> int:
    _check_sparsity_flags(args)
    from saekit.sae.commands import run_train

    return run_train(args)


def _sweep(args: argparse.Namespace) -> int:
    from saekit.sae.commands import run_sweep

    return run_sweep(args)


def _add_extract(commands: Any) -> None:
    extract = commands.add_parser(
        "extract",
        help="store a model's activations over an image folder",
        description=(
            "Run a vision model over an ImageNet-style image folder once and store each "
            "requested layer's CLS and/or patch tokens in a sharded, memory-mapped activation "
            "store. Rerunning the same command resumes an interrupted extraction (or returns "
            "the finished store); unreadable images are skipped and listed in the manifest."
        ),
    )
    extract.add_argument("--model", required=True, help="hub id or local folder (save_pretrained)")
    extract.add_argument(
        "--data",
        required=True,
        help="ImageNet-style folder root/<class>/*.png; or wds:PATTERN, WebDataset tar shards "
        "read as a stream (a brace range such as 'wds:/data/train-{000000..000146}.tar', a "
        "glob, a folder, or pipe:/http(s) URLs; label from each sample's .cls member or .json "
        "'label'); or hf:NAME, a Hugging Face dataset (or a local folder of parquet files), "
        "streamed with --streaming",
    )
    extract.add_argument(
        "--classes",
        default=None,
        help="wds: only: text file naming label k on line k (class names, or WordNet ids such "
        "as n01440764); default: classes numbered 0..max label",
    )
    extract.add_argument(
        "--split", default=None, help="hf: only: the split to read (default: train)"
    )
    extract.add_argument(
        "--streaming",
        action="store_true",
        help="hf: only: stream the dataset, shard by shard, instead of downloading it first; "
        "under torchrun and with --workers each process reads its own shards",
    )
    extract.add_argument(
        "--image-key", default=None, help="hf: only: the image column (default: image)"
    )
    extract.add_argument(
        "--label-key", default=None, help="hf: only: the class-index column (default: label)"
    )
    extract.add_argument(
        "--layers",
        default="all",
        type=_layers_arg,
        help="'all', indices such as 0,5,11 (negative count from the end) or ranges such as 3-5",
    )
    extract.add_argument(
        "--tokens",
        default="cls",
        choices=["cls", "patch", "both"],
        help="store the CLS token, the patch tokens, or both (default: cls)",
    )
    extract.add_argument("--out", required=True, help="store folder (resumes if interrupted)")
    extract.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "float32"],
        help="precision the activations are stored in (default: float16, half the disk)",
    )
    extract.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per forward pass (default: 64); also sets the shard size, so resume with "
        "the same value",
    )
    extract.add_argument(
        "--shard-images",
        type=int,
        default=None,
        help="images per shard (default: about 256 MB of activations, a multiple of the batch "
        "size); under torchrun the shards are dealt to the ranks in turn",
    )
    extract.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes that decode and preprocess images, so the model never "
        "waits on PIL; 0 decodes in threads of the main process (default: 2)",
    )
    extract.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    extract.set_defaults(handler=_extract)


def _add_train(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="train one SAE on one layer of an activation store",
        description=(
            "Train one SAE on one layer of an activation store and save it SAELens style "
            "(cfg.json + sae_weights.safetensors) in --out. Rerunning resumes from the last "
            "checkpoint, or loads the finished SAE; an --out folder holding an SAE trained "
            "with other settings is refused unless --overwrite."
        ),
    )
    train.add_argument("--store", required=True, help="activation store folder (saekit extract)")
    train.add_argument("--layer", required=True, type=int, help="layer of the store to train on")
    train.add_argument(
        "--arch", default="relu", choices=ARCH_NAMES, help="SAE architecture (default: relu)"
    )
    train.add_argument("--k", type=float, help="active latents (topk, batchtopk only)")
    train.add_argument(
        "--l1", type=float, help="sparsity coefficient λ (relu, gated, jumprelu only)"
    )
    train.add_argument("--expansion", type=int, help="d_sae / d_in (default: the recipe's)")
    train.add_argument(
        "--recipe",
        default="olson2025",
        choices=RECIPE_NAMES,
        help="training recipe (default: olson2025)",
    )
    train.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    train.add_argument("--out", required=True, help="folder to save the SAE in")
    train.add_argument(
        "--tokens",
        default="cls",
        choices=["cls", "patch"],
        help="train on CLS tokens or on patch tokens (default: cls)",
    )
    train.add_argument("--batch-size", type=int, help="minibatch size (default: the recipe's)")
    train.add_argument("--epochs", type=int, help="passes over the store (default: the recipe's)")
    train.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    train.add_argument("--data-seed", type=int, default=0, help="seed of the store's shuffling")
    train.add_argument(
        "--checkpoint-every", type=int, default=1000, help="steps between checkpoints"
    )
    train.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an SAE in --out that was trained with other settings",
    )
    train.set_defaults(handler=_train)


def _add_sweep(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="train many SAEs in one pass over an activation store",
        description="Train every SAE a sweep TOML file lists in one pass over a store.",
        epilog=SWEEP_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("config", help="sweep TOML file (format below)")
    sweep.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the SAEs of a sweep with other settings in the file's `out` folder",
    )
    sweep.set_defaults(handler=_sweep)


BOOK_DESCRIPTION = (
    "Execute the book's chapters (notebooks/NN_*.py) with papermill under a profile (mini: toy "
    "models, minutes on a CPU; paper: the papers' models and data) and build the site with "
    "Jupyter Book."
)


def _book_stub(commands: Any) -> None:
    """``book`` as `saekit -h` lists it, without importing the runner (which imports the book's
    kernel side and, through it, torch); `main` registers the real one when it is the command."""
    commands.add_parser(
        "book", help="execute the chapters and build the site", description=BOOK_DESCRIPTION
    )


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``saekit`` argument parser. Building it imports nothing heavy, except the book
    runner's own registration, made only when ``command`` is ``"book"`` or None (everything)."""
    parser = argparse.ArgumentParser(
        prog="saekit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback when a command fails"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(commands)
    _add_train(commands)
    _add_sweep(commands)
    add_eval(commands)
    if command in (None, "book"):
        from saekit import runner  # the book's host side registers `saekit book` itself

        runner.register(commands)
        book = commands.choices.get("book")
        if book is not None and not book.description:
            book.description = BOOK_DESCRIPTION
    else:
        _book_stub(commands)
    for sub in commands.choices.values():
        # SUPPRESS: `saekit --debug train ...` must not be reset by the subcommand's default.
        sub.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback when the command fails",
        )
    return parser


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return str(text) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``saekit`` command; errors print as one message (``--debug``: a traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Without a command (`saekit -h`) the book stub suffices: nothing heavy is imported.
    command = _command_in(argv) or "help"
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            "\nsaekit: interrupted. Run the same command again to resume: finished work is kept.",
            file=sys.stderr,
        )
        return 130
    except Exception as err:  # noqa: BLE001 - every failure reaches the user as a message
        if args.debug:
            raise
        print(
            f"saekit {args.command}: error: {_message(err)}\n"
            "(run again with --debug to see the traceback)",
            file=sys.stderr,
        )
        return 2 if isinstance(err, CommandLineError) else 1


if __name__ == "__main__":
    sys.exit(main())
