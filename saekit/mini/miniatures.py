"""Miniature encoders: the supported architectures at toy size, saved as hub checkpoints.

Each is a real `transformers` model (32x32 images, width 32-64, 3-4 layers) saved with its
processor through `save_pretrained`, so `load_encoder(path)` runs exactly the code a hub id runs.

`clip_text_config`, `clip_vision_config` and `tiny_clip` are the one tiny-CLIP builder: the
miniature encoder here, the mini Stable Diffusion's text encoder and judge CLIP
(`saekit.mini.diffusion`), the mini LLaVA's vision tower (`saekit.mini.llava`) and the
hub-shaped miniatures (`saekit.mini.hub`) all take their CLIP towers from it. Likewise `dinov2`
and `resnet_config` build the DINOv2s and ResNets both here and in `saekit.mini.hub`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

from saekit.models import _quiet_transformers

MINIATURE_KINDS = ("dinov2", "dinov2_registers", "clip", "vit", "resnet")
"""The encoder kinds `miniature` builds."""


def clip_text_config(
    vocab_size: int,
    width: int,
    layers: int,
    heads: int,
    *,
    max_positions: int = 77,
    projection_dim: int | None = None,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    pad_token_id: int = 1,
) -> transformers.CLIPTextConfig:
    """A CLIP text tower `width` wide (MLP 2x), `layers` deep; projection defaults to `width`."""
    return transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        projection_dim=projection_dim or width,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def clip_vision_config(
    width: int,
    layers: int,
    heads: int,
    image_size: int,
    patch_size: int,
    *,
    projection_dim: int | None = None,
) -> transformers.CLIPVisionConfig:
    """A CLIP vision tower `width` wide (MLP 2x) over `image_size` images in `patch_size` patches."""
    return transformers.CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim or width,
    )


def tiny_clip(
    text: transformers.CLIPTextConfig,
    vision: transformers.CLIPVisionConfig,
    projection_dim: int,
    seed: int = 0,
) -> transformers.CLIPModel:
    """A seeded `CLIPModel` from the two towers' configs (random weights)."""
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim
    )
    torch.manual_seed(seed)
    return transformers.CLIPModel(config)


def dinov2(registers: bool, **fields: Any) -> transformers.PreTrainedModel:
    """A random-weight DINOv2 with the config `fields`, and four register tokens if `registers`."""
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **fields)
        return transformers.Dinov2WithRegistersModel(config)
    return transformers.Dinov2Model(transformers.Dinov2Config(**fields))


def resnet_config(
    embedding_size: int, hidden_sizes: list[int], depths: list[int], layer_type: str, **extra: Any
) -> transformers.ResNetConfig:
    """A ResNet config whose first stage keeps the stem's resolution, as microsoft/resnet-50's."""
    return transformers.ResNetConfig(
        embedding_size=embedding_size,
        hidden_sizes=hidden_sizes,
        depths=depths,
        layer_type=layer_type,
        downsample_in_first_stage=False,
        **extra,
    )


def miniature(kind: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny, seeded model of `kind` with its processor at `path`; return the path.

    The configs are real architectures at toy size (32x32 images, width 32-64, 3-4 layers), so
    `load_encoder(path)` exercises the same code a hub checkpoint does.
    """
    if kind not in MINIATURE_KINDS:
        raise ValueError(f"Unknown miniature kind {kind!r}; choose one of {MINIATURE_KINDS}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    image_mean, image_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    crop = {"height": 32, "width": 32}
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    with _quiet_transformers():
        if kind in ("dinov2", "dinov2_registers"):
            model = dinov2(kind == "dinov2_registers", image_size=32, patch_size=8, **small)
            processor = transformers.BitImageProcessor(
                size={"shortest_edge": 32},
                crop_size=crop,
                do_center_crop=True,
                image_mean=image_mean,
                image_std=image_std,
            )
        elif kind == "clip":
            # A full CLIPModel, like the hub's openai/clip-* checkpoints; we read its vision tower.
            model = tiny_clip(
                clip_text_config(64, 32, 3, 2, max_positions=16, projection_dim=512),
                clip_vision_config(32, 3, 2, image_size=32, patch_size=8, projection_dim=512),
                projection_dim=16,
                seed=seed,
            )
            processor = transformers.CLIPImageProcessor(
                size={"shortest_edge": 32},
                crop_size=crop,
            )
        elif kind == "vit":
            config = transformers.ViTConfig(image_size=32, patch_size=8, **small)
            model = transformers.ViTModel(config, add_pooling_layer=False)
            processor = transformers.ViTImageProcessor(
                size=crop, image_mean=image_mean, image_std=image_std
            )
        else:
            model = transformers.ResNetModel(resnet_config(16, [16, 24, 32, 48], [1] * 4, "basic"))
            processor = transformers.ConvNextImageProcessor(
                size={"shortest_edge": 64},
                crop_pct=1.0,
                image_mean=image_mean,
                image_std=image_std,
            )
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return path
