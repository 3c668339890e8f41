"""Every command the "Scaling out" page shows parses: torchrun's options with torchrun's own
parser, and the saekit command it launches (or the page runs directly) with saekit's, the
flags that apply to one kind of --data included."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from torch.distributed.run import get_args_parser

from saekit.cli import _check_data_flags, build_parser

PAGE = Path(__file__).resolve().parents[1] / "book" / "scaling_out.md"


def _lines() -> list[list[str]]:
    """The command lines of the page's bash blocks as tokens, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    text = "\n".join(block.replace("\\\n", " ") for block in blocks)
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


def _commands() -> list[list[str]]:
    """torchrun's arguments in each line that runs it (directly or through srun)."""
    return [t[t.index("torchrun") + 1 :] for t in _lines() if "torchrun" in t]


def _parse(saekit_argv: list[str]):
    args = build_parser(saekit_argv[0]).parse_args(saekit_argv)
    if args.command == "extract":
        _check_data_flags(args)
    return args


def test_the_page_shows_every_launch_and_each_parses():
    commands = _commands()
    # one node (extract, sweep, train), several nodes, Slurm, streamed extraction (wds:, hf:)
    assert len(commands) == 7
    launched = set()
    data = []
    for argv in commands:
        options = get_args_parser().parse_args(argv)
        assert options.module and options.training_script == "saekit", argv
        assert options.standalone or options.rdzv_endpoint, argv  # how the ranks meet
        args = _parse(list(options.training_script_args))
        launched.add(args.command)
        if args.command in ("extract", "train"):
            assert args.device == "cuda"
        if args.command == "extract":
            data.append(args.data.split(":")[0] if ":" in args.data else "folder")
    assert launched == {"extract", "sweep", "train"}
    assert sorted(data) == ["folder", "folder", "hf", "wds"]


def test_the_page_s_single_process_commands_parse():
    (argv,) = [tokens[1:] for tokens in _lines() if tokens[0] == "saekit"]
    assert _parse(argv).data.startswith("wds:")
