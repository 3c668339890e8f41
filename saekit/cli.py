"""The `saekit` command: long runs outside notebooks.

saekit extract --model ID_OR_PATH --data DIR --layers all|0,5,11 --tokens cls|patch|both --out DIR
saekit train ...   /   saekit sweep SWEEP.toml      (see `saekit train -h`)
saekit book [--profile mini|paper] [--only CHAPTER]  (execute chapters, build the site)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from saekit import runner
from saekit.sae import commands as sae_commands


def _extract(args: argparse.Namespace) -> int:
    from saekit.activations import extract
    from saekit.data import load_dataset
    from saekit.models import load_encoder

    encoder = load_encoder(args.model, device=args.device)
    dataset = load_dataset(args.data)
    store = extract(
        encoder,
        dataset,
        layers=args.layers,
        tokens=args.tokens,
        out=args.out,
        dtype=args.dtype,
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    print(store)
    if store.skipped:
        print(
            f"{len(store.skipped)} unreadable images were skipped (listed in {args.out}/manifest.json)"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saekit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser(
        "extract", help="store a model's activations over an image folder"
    )
    extract.add_argument("--model", required=True, help="hub id or local folder (save_pretrained)")
    extract.add_argument("--data", required=True, help="ImageNet-style folder root/<class>/*.png")
    extract.add_argument(
        "--layers", default="all", help="'all' or comma-separated indices, e.g. 0,5,11"
    )
    extract.add_argument("--tokens", default="cls", choices=["cls", "patch", "both"])
    extract.add_argument("--out", required=True, help="store folder (resumes if interrupted)")
    extract.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    extract.add_argument("--batch-size", type=int, default=64)
    extract.add_argument("--workers", type=int, default=4, help="image-decoding threads")
    extract.add_argument("--device", default=None, help="e.g. cuda; default: CPU")
    extract.set_defaults(handler=_extract)
    # Stages that own more commands register them: train and sweep (SAE engine), book.
    sae_commands.register(commands)
    runner.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
