"""Train a toy text-to-image model on the toy world and ship it as a Stable Diffusion pipeline.

Run from the repository root (single-threaded on purpose: the result must not depend on the
machine's core count)::

    python -m saekit.mini.toy_t2i            # writes saekit/mini/assets/toy_t2i/

What comes out is a real diffusers `StableDiffusionPipeline` folder (``save_pretrained``), so
chapter 06 loads it through `saekit.analysis.steering.load_pipeline` exactly as it loads
`CompVis/stable-diffusion-v1-4`. Three stages, each trained from scratch on the toy world's
train split (world seed 0, 32-pixel images) and its captions (`toyworld.captions`):

1. **text encoder**: a toy CLIP trained contrastively (`saekit.mini.toy_judge.train_clip`); its
   text tower is the pipeline's frozen `CLIPTextModel`, as SD 1.x keeps OpenAI's CLIP frozen,
   and the whole CLIP is kept in ``clip/`` for chapter 06's describer;
2. **VAE**: an `AutoencoderKL` that maps 32x32 images to 8x8x4 latents;
3. **UNet**: a `UNet2DConditionModel` trained to predict the noise of those latents
   conditioned on the text encoder's token states, the caption dropped for 10% of images so
   classifier-free guidance works. Half the images are conditioned on the last layer (what
   ``pipe(prompt=...)`` feeds) and half on the penultimate one through the final layer norm
   (what chapter 06 steers, diffusers' ``clip_skip=1``), so both give the prompted images.

Quality is measured, not eyeballed: `saekit.mini.toy_t2i_eval.evaluate` generates images for every
class's caption and has the shipped toy ViT classify them; how often its pick has the prompted
shape family (group) and palette (style) lands in ``training.json``.

Each stage is cached in ``--work`` under a name made from its own config and its inputs', so a
rerun with one stage changed retrains only that stage and those after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from saekit.mini import toy_judge
from saekit.mini.toy_t2i_eval import (
    NOTES,
    PROMPT_FILE,
    condition,
    encode_latents,
    evaluate,
    reconstruction_accuracy,
)
from saekit.mini.toyworld import captions as cap
from saekit.mini.toyworld.world import ToyWorld
from saekit.mini.training import (
    command_line,
    parse_config,
    to_pixels,
    train_steps,
    versions,
    write_record,
)

DEFAULT_OUT = toy_judge.ASSETS / "toy_t2i"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "saekit-toy-t2i"
CLIP_FOLDER = "clip"
"""Sub-folder of the pipeline folder holding the whole toy CLIP its text encoder comes from."""


@dataclass
class T2IConfig:
    """Everything that determines the shipped pipeline."""

    seed: int = 0
    """Seeds the toy world, the captions, every weight init and every batch order."""
    image_size: int = 32
    """Toy-world image side in pixels."""
    n_train: int = 8000
    """Distinct training images (with their varied captions)."""
    clip_steps: int = 500
    """Optimiser steps of the text encoder's contrastive training."""
    vae_channels: tuple[int, ...] = (16, 32, 64)
    """Channels per VAE block; each block after the first halves the side (32 -> 8)."""
    latent_channels: int = 8
    """Latent channels of the VAE (SD 1.x has 4 at 1/8 the side; 8x8x8 keeps a 32x32 toy image)."""
    vae_steps: int = 600
    """VAE optimiser steps."""
    vae_kl: float = 1e-6
    """Weight of the VAE's KL term (small, as in SD's autoencoder)."""
    unet_channels: tuple[int, ...] = (32, 64)
    """Channels per UNet block (8x8 latents, then 4x4; cross-attention from the second on)."""
    unet_steps: int = 1500
    """UNet optimiser steps."""
    unet_lr: float = 1.5e-3
    """Peak AdamW learning rate of the UNet."""
    batch_size: int = 32
    """Images per VAE and UNet step."""
    uncond_prob: float = 0.1
    """Share of training captions replaced by "" so classifier-free guidance has an
    unconditional model to push away from."""
    min_snr: float = 5.0
    """Cap γ of the Min-SNR loss weight min(SNR, γ) / SNR on the noise-prediction error."""
    ema: float = 0.999
    """Top decay of the exponential moving average of UNet weights that is shipped."""
    n_eval_seeds: int = 4
    """Images generated per class caption when scoring."""
    eval_steps: int = 10
    """Denoising steps when scoring."""
    out: str = str(DEFAULT_OUT)
    """Folder the pipeline is written to."""
    work: str = str(DEFAULT_WORK)
    """Folder caching each trained stage."""


def _stage_key(name: str, payload: dict) -> str:
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"{name}-{digest}"


def _cached(folder: Path) -> dict | None:
    record = folder / "stage.json"
    return json.loads(record.read_text()) if record.is_file() else None


def _finish(folder: Path, scratch: Path, record: dict) -> None:
    (scratch / "stage.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)


def _scratch(folder: Path) -> Path:
    scratch = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


# ----------------------------------------------------------------------------- data


def training_data(cfg: T2IConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images [N, H, W, 3], labels [N], captions [N]) of the train split."""
    images, _, labels = ToyWorld(cfg.seed, cfg.image_size).sample_arrays(cfg.n_train, "train")
    return images, labels, cap.captions_for_images(cfg.n_train, cfg.seed, "train")


# ----------------------------------------------------------------------------- stage 1


def clip_config(cfg: T2IConfig, out: Path) -> toy_judge.ClipConfig:
    """The text encoder's CLIP: the judge's architecture on this pipeline's world and seed."""
    return toy_judge.ClipConfig(
        seed=cfg.seed,
        world_seed=cfg.seed,
        image_size=cfg.image_size,
        n_train=cfg.n_train,
        steps=cfg.clip_steps,
        out=str(out),
    )


def train_text_encoder(cfg: T2IConfig, work: Path) -> tuple[Path, dict]:
    """Stage 1 (cached): the toy CLIP whose text tower conditions the UNet."""
    clip_cfg = clip_config(cfg, Path("clip"))
    folder = work / _stage_key("clip", dataclasses.asdict(clip_cfg))
    if (record := _cached(folder)) is not None:
        return folder, record
    started = time.time()
    model, processor, results = toy_judge.train_clip(clip_cfg)
    scratch = _scratch(folder)
    model.save_pretrained(scratch)
    processor.save_pretrained(scratch)
    record = {
        "config": dataclasses.asdict(clip_cfg),
        "results": results,
        "seconds": round(time.time() - started, 1),
    }
    _finish(folder, scratch, record)
    return folder, record


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP's text tower as a stand-alone `CLIPTextModel`, as SD pipelines hold it."""
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


# ----------------------------------------------------------------------------- stage 2


def build_vae(cfg: T2IConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        sample_size=cfg.image_size,
    )


def _vae_payload(cfg: T2IConfig) -> dict:
    keys = ("seed", "image_size", "n_train", "vae_channels", "latent_channels", "vae_steps")
    return {k: getattr(cfg, k) for k in (*keys, "vae_kl", "batch_size")}


def train_vae(cfg: T2IConfig, images: np.ndarray, work: Path) -> tuple[Path, dict]:
    """Stage 2 (cached): the autoencoder, its latent scale set so latents have unit variance."""
    folder = work / _stage_key("vae", _vae_payload(cfg))
    if (record := _cached(folder)) is not None:
        return folder, record
    started = time.time()
    torch.manual_seed(cfg.seed + 1)
    vae = build_vae(cfg)
    generator = torch.Generator().manual_seed(cfg.seed + 1)

    def loss_at(step: int) -> torch.Tensor:
        batch = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        x = to_pixels(images[batch.numpy()])
        posterior = vae.encode(x).latent_dist
        # The decoder learns from the posterior mean: with a KL weight this small the sampling
        # noise only slows a short training down (it starts at unit variance).
        recon = vae.decode(posterior.mean).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        return loss + cfg.vae_kl * posterior.kl().mean()

    vae.train()
    train_steps(
        vae.parameters(),
        loss_at,
        steps=cfg.vae_steps,
        lr=2e-3,
        warmup_steps=30,
        weight_decay=0.0,
        desc="train toy VAE",
        loss_format=".4f",
    )
    vae.eval()
    latents = encode_latents(vae, images[:2000], scale=1.0)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    scratch = _scratch(folder)
    vae.save_pretrained(scratch)
    record = {
        "config": _vae_payload(cfg),
        "scaling_factor": vae.config.scaling_factor,
        "seconds": round(time.time() - started, 1),
    }
    _finish(folder, scratch, record)
    return folder, record


# ----------------------------------------------------------------------------- stage 3


def build_unet(cfg: T2IConfig, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=1,
        # Text enters below the full latent resolution (and in the middle block): at 8x8 a
        # 4x4 grid already sees the whole object, and attention dominates the CPU time.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=16,
        norm_num_groups=8,
    )


def noise_schedule():
    """SD 1.x's training noise schedule (scaled-linear betas over 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
    )


def inference_scheduler():
    """DPM-Solver++ (2M) on the training schedule: good images in few steps."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(noise_schedule().config)


def _unet_payload(cfg: T2IConfig, clip_key: str, vae_key: str) -> dict:
    keys = ("seed", "unet_channels", "unet_steps", "unet_lr", "batch_size", "uncond_prob")
    keys += ("min_snr", "ema")
    return {k: getattr(cfg, k) for k in keys} | {"clip": clip_key, "vae": vae_key}


def train_unet(
    cfg: T2IConfig,
    latents: torch.Tensor,
    captions: list[str],
    encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    work: Path,
    upstream: tuple[str, str],
) -> tuple[Path, dict]:
    """Stage 3 (cached): the noise predictor, shipped as its weight average (EMA)."""
    from diffusers import UNet2DConditionModel

    payload = _unet_payload(cfg, *upstream)
    folder = work / _stage_key("unet", payload)
    if (record := _cached(folder)) is not None:
        return folder, record
    started = time.time()
    # The text encoder is frozen: every distinct caption is encoded once, at both layers.
    texts = sorted(set(captions) | {""})
    index = {t: i for i, t in enumerate(texts)}
    last_UTD, penultimate_UTD = condition(encoder, tokenizer, texts)
    caption_ids = torch.tensor([index[t] for t in captions])
    empty = index[""]

    torch.manual_seed(cfg.seed + 2)
    unet = build_unet(cfg, encoder.config.hidden_size)
    average = UNet2DConditionModel.from_config(unet.config)
    average.load_state_dict(unet.state_dict())
    average.requires_grad_(False)
    schedule = noise_schedule()
    alphas = schedule.alphas_cumprod
    generator = torch.Generator().manual_seed(cfg.seed + 2)

    def loss_at(step: int) -> torch.Tensor:
        batch = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        ids = caption_ids[batch].clone()
        ids[torch.rand(cfg.batch_size, generator=generator) < cfg.uncond_prob] = empty
        use_last = torch.rand(cfg.batch_size, generator=generator) < 0.5
        cond_BTD = torch.where(use_last[:, None, None], last_UTD[ids], penultimate_UTD[ids])
        x0 = latents[batch]
        t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # Min-SNR-5 weighting (Hang et al. 2023): low-noise steps, which only polish detail,
        # stop dominating the loss, and the shape is learned in fewer steps.
        snr = a / (1 - a)
        weight = snr.clamp(max=cfg.min_snr) / snr
        return (weight * (unet(noisy, t, cond_BTD).sample - noise).pow(2)).mean()

    @torch.no_grad()
    def update_average(step: int) -> None:
        decay = min(cfg.ema, (1 + step) / (10 + step))
        for avg, live in zip(average.parameters(), unet.parameters(), strict=True):
            avg.lerp_(live, 1 - decay)

    unet.train()
    train_steps(
        unet.parameters(),
        loss_at,
        steps=cfg.unet_steps,
        lr=cfg.unet_lr,
        warmup_steps=100,
        weight_decay=0.01,
        desc="train toy UNet",
        clip_norm=1.0,
        after_step=update_average,
        loss_format=".4f",
    )
    scratch = _scratch(folder)
    average.save_pretrained(scratch)
    record = {"config": payload, "seconds": round(time.time() - started, 1)}
    _finish(folder, scratch, record)
    return folder, record


# ----------------------------------------------------------------------------- assembly


def assemble(clip_dir: Path, vae_dir: Path, unet_dir: Path, out: Path) -> Path:
    """Write the `StableDiffusionPipeline` (no safety checker) and the toy CLIP to `out`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    clip = CLIPModel.from_pretrained(clip_dir)
    processor = CLIPProcessor.from_pretrained(clip_dir)
    # The UNet and VAE are stored in half precision (half the package size); diffusers loads
    # them back in float32, and training.json scores exactly these rounded weights.
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir).half(),
        text_encoder=text_encoder_from_clip(clip),
        tokenizer=processor.tokenizer,
        unet=UNet2DConditionModel.from_pretrained(unet_dir).half(),
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    shutil.rmtree(out, ignore_errors=True)
    pipe.save_pretrained(out)
    clip.save_pretrained(out / CLIP_FOLDER)
    processor.save_pretrained(out / CLIP_FOLDER)
    (out / PROMPT_FILE).write_text("\n".join(cap.prompt_corpus(300, seed=0)) + "\n")
    return out


def train(cfg: T2IConfig) -> dict:
    """Train (or reuse) every stage, assemble, evaluate and save; returns the training record."""
    torch.set_num_threads(1)
    work = Path(cfg.work)
    images, _, captions = training_data(cfg)
    clip_dir, clip_record = train_text_encoder(cfg, work)
    vae_dir, vae_record = train_vae(cfg, images, work)

    from diffusers import AutoencoderKL

    clip = CLIPModel.from_pretrained(clip_dir)
    tokenizer = CLIPProcessor.from_pretrained(clip_dir).tokenizer
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    latents = encode_latents(vae, images)
    vae_record["val"] = reconstruction_accuracy(vae, cfg.seed, cfg.image_size)
    unet_dir, unet_record = train_unet(
        cfg,
        latents,
        captions,
        text_encoder_from_clip(clip),
        tokenizer,
        work,
        (clip_dir.name, vae_dir.name),
    )
    out = assemble(clip_dir, vae_dir, unet_dir, Path(cfg.out))
    results = evaluate(out, cfg.n_eval_seeds, cfg.eval_steps)
    record = {
        "command": command_line("saekit.mini.toy_t2i", cfg),
        "config": dataclasses.asdict(cfg) | {"out": Path(cfg.out).name, "work": "(cache)"},
        "stages": {"clip": clip_record, "vae": vae_record, "unet": unet_record},
        "results": results,
        "notes": NOTES,
        "train_seconds": round(
            sum(r["seconds"] for r in (clip_record, vae_record, unet_record)), 1
        ),
        "versions": versions(),
    }
    write_record(out, record)
    return record


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(T2IConfig, argv, __doc__.split("\n\n")[0])
    record = train(cfg)
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
