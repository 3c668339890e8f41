"""Train the miniature ViT on the toy world and ship it as a hub-style checkpoint.

Run from the repository root (single-threaded on purpose: the result must not depend on the
machine's core count)::

    python -m saekit.mini.toyworld.train            # writes saekit/mini/assets/toyvit/

The folder gets ``model.safetensors`` + ``config.json`` (``save_pretrained``), the
``ViTImageProcessor`` that feeds it, and ``training.json``: the command, config, seed and the
accuracy reached on every split and shift, which ``tests/test_toyworld.py`` re-checks.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from saekit.mini.toyworld.shifts import SHIFTS
from saekit.mini.toyworld.taxonomy import CLASS_NAMES, GROUP_OF_CLASS, N_CLASSES, WNIDS
from saekit.mini.toyworld.world import ToyWorld
from saekit.mini.training import (
    PIXEL_MEAN,
    PIXEL_STD,
    command_line,
    parse_config,
    shuffled_batches,
    to_pixels,
    train_steps,
    versions,
    write_record,
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "toyvit"


@dataclass
class TrainConfig:
    """Everything that determines the shipped weights."""

    seed: int = 0
    """Seeds the toy world, the weight init and the batch order."""
    image_size: int = 48
    """Toy-world image side in pixels."""
    patch_size: int = 8
    """ViT patch side; 48 / 8 gives a 6 x 6 patch grid."""
    hidden_size: int = 64
    """Residual-stream width D."""
    num_layers: int = 6
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    intermediate_size: int = 128
    """MLP width inside each block."""
    n_train: int = 16_000
    """Distinct training images (rendered once; every epoch revisits them in a new order)."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 128
    """Images per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay after a linear warm-up)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    n_eval: int = 1500
    """Images per split / shift when scoring (50 per class)."""
    out: str = str(DEFAULT_OUT)
    """Folder the checkpoint is written to."""


def build_model(cfg: TrainConfig) -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        num_labels=N_CLASSES,
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: i for i, name in enumerate(CLASS_NAMES)},
    )
    return transformers.ViTForImageClassification(config)


def build_processor(cfg: TrainConfig) -> transformers.ViTImageProcessor:
    size = {"height": cfg.image_size, "width": cfg.image_size}
    return transformers.ViTImageProcessor(
        do_resize=True,
        size=size,
        do_normalize=True,
        image_mean=[PIXEL_MEAN] * 3,
        image_std=[PIXEL_STD] * 3,
    )


@torch.inference_mode()
def predict(model: torch.nn.Module, images_BHWC: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted class per image."""
    model.eval()
    preds = []
    for start in range(0, len(images_BHWC), batch_size):
        logits = model(pixel_values=to_pixels(images_BHWC[start : start + batch_size])).logits
        preds.append(logits.argmax(-1).numpy())
    return np.concatenate(preds)


def score(model: torch.nn.Module, world: ToyWorld, n: int, split: str, shift: str | None) -> dict:
    """Leaf and group accuracy on the first `n` images of a split under a shift."""
    images, _, labels = world.sample_arrays(n, split, shift)
    preds = predict(model, images)
    groups = np.array(GROUP_OF_CLASS)
    return {
        "accuracy": float((preds == labels).mean()),
        "group_accuracy": float((groups[preds] == groups[labels]).mean()),
    }


def train(cfg: TrainConfig) -> dict:
    """Train, evaluate and save; returns the training record that lands in training.json."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    started = time.time()
    world = ToyWorld(cfg.seed, cfg.image_size)
    images, _, labels = world.sample_arrays(cfg.n_train, "train")
    labels_t = torch.from_numpy(labels).long()

    model = build_model(cfg)
    batches = shuffled_batches(cfg.n_train, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))

    def loss_at(step: int) -> torch.Tensor:
        batch = next(batches)
        return model(pixel_values=to_pixels(images[batch.numpy()]), labels=labels_t[batch]).loss

    model.train()
    train_steps(
        model.parameters(),
        loss_at,
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        desc="train toy ViT",
    )
    train_seconds = time.time() - started

    results = {"train": score(model, world, cfg.n_eval, "train", None)}
    for split in ("val", "test"):
        results[split] = score(model, world, cfg.n_eval, split, None)
    for shift in SHIFTS:
        results[f"val/{shift}"] = score(model, world, cfg.n_eval, "val", shift)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(cfg).save_pretrained(out)
    record = {
        "command": command_line("saekit.mini.toyworld.train", cfg),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "config": dataclasses.asdict(cfg) | {"out": str(Path(cfg.out).name)},
        "results": results,
        "notes": (
            "results[split] are scored on that split's first n_eval images; 'val/<shift>' on "
            "the val split under that shift. group_accuracy counts a prediction right when it "
            "lands in the true class's top-level group."
        ),
        "train_seconds": round(train_seconds, 1),
        "versions": versions(("torch", "transformers", "numpy")),
        "classes": WNIDS,
    }
    write_record(out, record)
    return record


def main(argv: list[str] | None = None) -> None:
    record = train(parse_config(TrainConfig, argv, __doc__.split("\n\n")[0]))
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
