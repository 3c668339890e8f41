"""Every command the "Scaling out" page shows parses: torchrun's options with torchrun's own
parser, and the saekit command it launches with saekit's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from torch.distributed.run import get_args_parser

from saekit.cli import build_parser

PAGE = Path(__file__).resolve().parents[1] / "book" / "scaling_out.md"


def _commands() -> list[list[str]]:
    """The torchrun command lines of the page's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if "torchrun" in line:
                tokens = shlex.split(line)
                commands.append(tokens[tokens.index("torchrun") + 1 :])
    return commands


def test_the_page_shows_every_launch_and_each_parses():
    commands = _commands()
    assert len(commands) == 5  # one node (extract, sweep, train), several nodes, Slurm
    launched = set()
    for argv in commands:
        options = get_args_parser().parse_args(argv)
        assert options.module and options.training_script == "saekit", argv
        assert options.standalone or options.rdzv_endpoint, argv  # how the ranks meet
        saekit_argv = list(options.training_script_args)
        args = build_parser(saekit_argv[0]).parse_args(saekit_argv)
        launched.add(args.command)
        if args.command in ("extract", "train"):
            assert args.device == "cuda"
    assert launched == {"extract", "sweep", "train"}
