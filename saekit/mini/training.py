"""What every toy trainer shares: the optimisation loop, batch order, pixels, command and record.

The toy ViT (`saekit.mini.toyworld.train`), the toy CLIPs (`saekit.mini.toy_judge`), the toy
text-to-image model (`saekit.mini.toy_t2i`) and the toy LLaVA (`saekit.mini.toy_llava`) all
train with AdamW under a cosine schedule after a linear warm-up (`train_steps`), are run as
``python -m <module> --flag value`` (`parse_config`), and record the command that reproduces
them, their config and results in ``training.json`` (`command_line`, `write_record`,
`versions`). The shipped assets in ``saekit/mini/assets`` were trained through these.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

PIXEL_MEAN = PIXEL_STD = 0.5
"""Image normalisation of every toy model: pixels to [-1, 1]."""


def to_pixels(images_BHWC: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] normalised exactly as the saved processors do."""
    pixels = torch.from_numpy(np.ascontiguousarray(images_BHWC)).permute(0, 3, 1, 2).float()
    return (pixels / 255.0 - PIXEL_MEAN) / PIXEL_STD


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into `n` items: each epoch a new permutation from `generator`,
    a batch that straddles two epochs taking the next one's first items."""
    queue = torch.empty(0, dtype=torch.long)
    while True:
        if len(queue) < batch_size:
            queue = torch.cat([queue, torch.randperm(n, generator=generator)])
        batch, queue = queue[:batch_size], queue[batch_size:]
        yield batch


def train_steps(
    params: Iterable[torch.nn.Parameter],
    loss_at: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    desc: str,
    clip_norm: float | None = None,
    after_step: Callable[[int], None] | None = None,
    loss_format: str = ".3f",
) -> None:
    """Minimise `loss_at(step)` over `params` for `steps` AdamW steps, the learning rate rising
    linearly to `lr` over `warmup_steps` and then decaying on a cosine to zero.

    `clip_norm` caps the gradient norm before each step; `after_step(step)` runs after it (e.g.
    to update a weight average). The loss shows in the progress bar every 25 steps.
    """
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    for step in (bar := tqdm(range(steps), desc=desc)):
        loss = loss_at(step)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step(step)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():{loss_format}}")


def versions(
    modules: Sequence[str] = ("torch", "transformers", "diffusers", "numpy"),
) -> dict[str, str]:
    """Python's version and each of `modules`' ``__version__``, for ``training.json``."""
    found = {name: importlib.import_module(name).__version__ for name in modules}
    return {"python": platform.python_version()} | found


def command_line(module: str, cfg: Any) -> str:
    """The command that reproduces `cfg` (a dataclass): the defaults are left out."""
    parts = [f"python -m {module}"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != f.default:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts.append(f"--{f.name.replace('_', '-')} {shlex.quote(text)}")
    return " ".join(parts)


def parse_config(cls: type, argv: list[str] | None, description: str) -> Any:
    """A dataclass of type `cls` from command-line flags named after its fields."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        kind = type(f.default)
        if kind is tuple:  # "16,32,64" -> (16, 32, 64)
            kind = _int_tuple
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    return cls(**vars(parser.parse_args(argv)))


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def write_record(out: Path, record: dict) -> None:
    """Write `record` to ``out/training.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
