"""Toy CLIPs trained contrastively on toy-world images and their captions.

Run from the repository root (single-threaded on purpose, as every toy model here)::

    python -m saekit.mini.toy_judge          # writes saekit/mini/assets/toy_judge/

One trainer, two uses. `python -m saekit.mini.toy_t2i` trains one (world seed 0, train split)
and takes its text encoder as the text-to-image pipeline's conditioning, keeping the whole
CLIP beside the pipeline for chapter 06's describer. This script trains the *judge*: the same
architecture from another weight seed on another world (seed 1, so not one of its scenes is
shared), which validates chapter 06's Table 3, so that the CLIP that names an attribute is
never the one that judges it.

Captions name a subset of an image's factors ("a red fish" fits every red fish), so a batch
holds many true pairs besides its diagonal. The loss is CLIP's symmetric cross-entropy with
every consistent (image, caption) pair a positive, the target spread evenly over them.

The folder holds a `CLIPModel` and its `CLIPProcessor` (``save_pretrained``, loadable with
`saekit.analysis.steering.load_clip`) and ``training.json``: command, config and the zero-shot
accuracy on held-out images, which ``tests/test_toy_t2i.py`` re-checks.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from saekit.mini import toy_eval
from saekit.mini.diffusion import train_clip_tokenizer
from saekit.mini.toyworld import captions as cap
from saekit.mini.toyworld.taxonomy import N_CLASSES
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

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_OUT = ASSETS / "toy_judge"
MAX_LENGTH = 24
"""Token length of the toy CLIP tokenizers (the longest caption with its Table 3 attribute is
about 16 tokens; real CLIP's 77 would only add padding)."""


@dataclass
class ClipConfig:
    """Everything that determines a toy CLIP's weights."""

    seed: int = 1
    """Seeds the weight init, the batch order and the tokenizer corpus."""
    world_seed: int = 1
    """Seed of the toy world the images and captions come from (the judge sees another world
    than the text-to-image model, which trains on seed 0)."""
    image_size: int = 32
    """Toy-world image side in pixels."""
    patch_size: int = 8
    """Vision patch side; 32 / 8 gives a 4 x 4 grid."""
    width: int = 64
    """Hidden width of both towers."""
    text_layers: int = 3
    """Text transformer blocks."""
    vision_layers: int = 3
    """Vision transformer blocks."""
    heads: int = 4
    """Attention heads per block."""
    projection_dim: int = 32
    """Width of the shared image-text embedding."""
    vocab_size: int = 400
    """Target size of the BPE vocabulary (bytes and merges)."""
    n_train: int = 6000
    """Distinct training images, each with its varied caption."""
    steps: int = 500
    """Optimiser steps."""
    batch_size: int = 128
    """Image-caption pairs per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay after warm-up)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    n_eval: int = 600
    """Held-out images (the world's val split) scored zero-shot."""
    out: str = str(DEFAULT_OUT)
    """Folder the model is written to."""


def build_tokenizer(vocab_size: int, seed: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer trained on a caption corpus, so every caption word is one token."""
    corpus = cap.prompt_corpus(3000, seed) + cap.vocabulary() + [", "]
    tokenizer = train_clip_tokenizer(corpus, vocab_size=vocab_size)
    tokenizer.model_max_length = MAX_LENGTH
    return tokenizer


def build_processor(cfg: ClipConfig, tokenizer: CLIPTokenizer) -> CLIPProcessor:
    size = cfg.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[PIXEL_MEAN] * 3,
        image_std=[PIXEL_STD] * 3,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_clip(cfg: ClipConfig, tokenizer: CLIPTokenizer) -> CLIPModel:
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.width,
        intermediate_size=2 * cfg.width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=cfg.projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=cfg.width,
        intermediate_size=2 * cfg.width,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)
    return CLIPModel(config)


def positives(image_f_B3: torch.Tensor, text_f_B3: torch.Tensor) -> torch.Tensor:
    """[B, B] True where caption j is true of image i (every factor it names matches)."""
    named = text_f_B3[None] >= 0
    agree = image_f_B3[:, None] == text_f_B3[None]
    return (agree | ~named).all(-1)


def contrastive_loss(logits_BB: torch.Tensor, positive_BB: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy against targets spread evenly over the positives."""
    target_i = positive_BB.float() / positive_BB.sum(1, keepdim=True)
    target_t = positive_BB.T.float() / positive_BB.T.sum(1, keepdim=True)
    loss_i = -(target_i * logits_BB.log_softmax(1)).sum(1).mean()
    loss_t = -(target_t * logits_BB.T.log_softmax(1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def encode_texts(model: CLIPModel, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Normalised text embeddings [N, E]."""
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out, dim=-1)


def encode_images(model: CLIPModel, images_BHWC: np.ndarray) -> torch.Tensor:
    """Normalised image embeddings [N, E]."""
    out = model.get_image_features(pixel_values=to_pixels(images_BHWC))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out, dim=-1)


@torch.inference_mode()
def zero_shot(
    model: CLIPModel, tokenizer: CLIPTokenizer, images_BHWC: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Zero-shot accuracy over the 30 canonical captions: class, and each factor of the pick;
    chance is 1/30 for the class, 1/5 for group and style, 1/3 for frequency."""
    model.eval()
    text_CE = encode_texts(model, tokenizer, [cap.canonical_caption(c) for c in range(N_CLASSES)])
    picks = []
    for start in range(0, len(images_BHWC), 256):
        image_BE = encode_images(model, images_BHWC[start : start + 256])
        picks.append((image_BE @ text_CE.T).argmax(1))
    pred = torch.cat(picks).numpy()
    return toy_eval.factor_scores(toy_eval.label_factors(pred), toy_eval.label_factors(labels))


def train_clip(cfg: ClipConfig) -> tuple[CLIPModel, CLIPProcessor, dict]:
    """Train a toy CLIP; returns the model, its processor and its measured results."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    world = ToyWorld(cfg.world_seed, cfg.image_size)
    images, _, labels = world.sample_arrays(cfg.n_train, "train")
    texts = cap.captions_for_images(cfg.n_train, cfg.world_seed, "train")
    tokenizer = build_tokenizer(cfg.vocab_size, cfg.seed)
    enc = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
    text_f = torch.from_numpy(toy_eval.text_factors(texts))
    image_f = torch.from_numpy(toy_eval.label_factors(labels))

    model = build_clip(cfg, tokenizer)
    batches = shuffled_batches(cfg.n_train, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))

    def loss_at(step: int) -> torch.Tensor:
        batch = next(batches)
        ids = enc.input_ids[batch]
        # Trim the common padding: CLIP's text tower is causal, so the tail changes nothing.
        length = int(enc.attention_mask[batch].sum(1).max())
        text_out = model.get_text_features(
            input_ids=ids[:, :length], attention_mask=enc.attention_mask[batch, :length]
        )
        image_out = model.get_image_features(pixel_values=to_pixels(images[batch.numpy()]))
        text_BE = torch.nn.functional.normalize(_tensor(text_out), dim=-1)
        image_BE = torch.nn.functional.normalize(_tensor(image_out), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_BE @ text_BE.T
        return contrastive_loss(logits, positives(image_f[batch], text_f[batch]))

    model.train()
    train_steps(
        model.parameters(),
        loss_at,
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=0.05,
        desc="train toy CLIP",
    )
    eval_world = ToyWorld(cfg.world_seed, cfg.image_size)
    val_images, _, val_labels = eval_world.sample_arrays(cfg.n_eval, "val")
    results = {"val": zero_shot(model, tokenizer, val_images, val_labels)}
    model.eval()
    return model, build_processor(cfg, tokenizer), results


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def save_clip(model: CLIPModel, processor: CLIPProcessor, out: Path, record: dict) -> None:
    """Write the model, its processor and ``training.json`` to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_record(out, record)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ClipConfig, argv, __doc__.split("\n\n")[0])
    started = time.time()
    model, processor, results = train_clip(cfg)
    record = {
        "command": command_line("saekit.mini.toy_judge", cfg),
        "config": dataclasses.asdict(cfg) | {"out": Path(cfg.out).name},
        "results": results,
        "notes": (
            "results.val: zero-shot on the first n_eval images of the val split of world "
            "world_seed; the image is matched against the 30 canonical captions and the pick "
            "scored as a class and per factor (chance: class 1/30, group and style 1/5, "
            "frequency 1/3)."
        ),
        "train_seconds": round(time.time() - started, 1),
        "versions": versions(),
    }
    save_clip(model, processor, Path(cfg.out), record)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
