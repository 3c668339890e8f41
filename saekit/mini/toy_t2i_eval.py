"""Running and scoring the toy text-to-image pipeline (`saekit.mini.toy_t2i`).

The conditioning the UNet reads (`condition`), the VAE's latents, generation on either text
layer, and the measured quality that lands in the pipeline's ``training.json``: images drawn
for every class's caption, classified by the shipped toy ViT (`saekit.mini.toy_eval`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from saekit.mini import toy_eval
from saekit.mini.toyworld import captions as cap
from saekit.mini.toyworld.taxonomy import N_CLASSES
from saekit.mini.toyworld.world import ToyWorld
from saekit.mini.training import to_pixels

PROMPT_FILE = "prompts.txt"
"""Prompt corpus shipped beside the pipeline (one varied caption per line)."""


@torch.inference_mode()
def condition(
    encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states the UNet reads, [N, T, D], at the last layer and at the penultimate layer
    through the final layer norm, each padded to the tokenizer's full length as pipelines do."""
    enc = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    out = encoder(enc.input_ids, output_hidden_states=True)
    return out.last_hidden_state, encoder.final_layer_norm(out.hidden_states[-2])


@torch.inference_mode()
def encode_latents(vae, images: np.ndarray, scale: float | None = None) -> torch.Tensor:
    """Posterior means of `images` times the VAE's scaling factor (or `scale`), [N, C, h, w]."""
    scale = vae.config.scaling_factor if scale is None else scale
    chunks = [
        vae.encode(to_pixels(images[s : s + 256])).latent_dist.mean
        for s in range(0, len(images), 256)
    ]
    return torch.cat(chunks) * scale


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """uint8 images [N, H, W, 3] from scaled latents."""
    x = vae.decode(latents / vae.config.scaling_factor).sample
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


NOTES = (
    "Generated images are classified by the shipped toy ViT (saekit/mini/assets/toyvit, its "
    "30-way head; images resized 32 -> 48 by its processor); a factor counts as right when the "
    "ViT's class has the prompted value. 'prompted': every class's canonical caption x "
    "n_eval_seeds seeds, conditioned on the penultimate layer (chapter 06's layer=-2) or the "
    "last (pipe(prompt=...)), at guidance 7.5 with eval_steps and 4 DPM-Solver steps. "
    "'corpus': the shipped prompts.txt (varied, partial captions), each factor scored over the "
    "prompts that name it. Chance: 1/5 for group and style, 1/3 for frequency, 1/30 for the "
    "class. 'real' and vae 'val' are the same scores on real val images and their VAE "
    "reconstructions: the ceiling for generated ones."
)


def generate(pipe, prompts: list[str], seed: int, steps: int, layer: int, guidance: float = 7.5):
    """One image per prompt (each from its own generator seeded `seed`), conditioned on the
    text encoder's `layer` (-1 last, -2 penultimate through the final layer norm)."""
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    last, penultimate = condition(encoder, tokenizer, prompts)
    empty_last, empty_penultimate = condition(encoder, tokenizer, [""] * len(prompts))
    positive, negative = (last, empty_last) if layer == -1 else (penultimate, empty_penultimate)
    return pipe(
        prompt_embeds=positive,
        negative_prompt_embeds=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed) for _ in prompts],
    ).images


def reconstruction_accuracy(
    vae, seed: int = 0, image_size: int = 32, n: int = 300
) -> dict[str, dict[str, float]]:
    """Toy-ViT scores of real val images and of their VAE reconstructions."""
    images, _, labels = ToyWorld(seed, image_size).sample_arrays(n, "val")
    prompts = [cap.canonical_caption(int(c)) for c in labels]
    recon = decode_latents(vae, encode_latents(vae, images))
    return {
        "real": toy_eval.score_images(images, prompts),
        "reconstructed": toy_eval.score_images(recon, prompts),
    }


def evaluate(folder: Path, n_seeds: int = 4, steps: int = 10) -> dict:
    """Score the saved pipeline: prompted images classified by the toy ViT (see `NOTES`);
    `n_seeds` images per class caption, `steps` denoising steps (and 4)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    canonical = [cap.canonical_caption(c) for c in range(N_CLASSES)]
    results: dict[str, dict] = {}
    for name, layer, n_steps in (
        ("penultimate", -2, steps),
        ("last", -1, steps),
        ("penultimate_4_steps", -2, 4),
    ):
        images, prompts = [], []
        for seed in range(n_seeds):
            images += generate(pipe, canonical, seed, n_steps, layer)
            prompts += canonical
        results[f"prompted/{name}"] = toy_eval.score_images(images, prompts)
    corpus = (folder / PROMPT_FILE).read_text().splitlines()[:90]
    results["corpus/penultimate"] = toy_eval.score_images(
        generate(pipe, corpus, 0, steps, -2), corpus
    )
    return results
