"""Hub-shaped miniatures: the paper profile's checkpoints at toy width, in a Hugging Face cache.

For every hub id the paper profile names, `write_hub_cache` writes a miniature with the same
architecture class, the real layer count, patch size, image size, processor and tokenizer files,
and tiny widths, into the Hugging Face cache layout under ``HF_HOME``::

    HF_HOME/hub/models--facebook--dinov2-giant/refs/main            (the revision below)
    HF_HOME/hub/models--facebook--dinov2-giant/snapshots/<rev>/...  (save_pretrained's files)

so the unchanged paper code path (``from_pretrained("facebook/dinov2-giant")``) loads it offline
(``HF_HUB_OFFLINE=1``). `write_imagenet` writes the matching ImageNet-layout folders (real
wnids; train and val; V2-, Sketch-, R- and A-style sets, the last two on ImageNet-R's and -A's
class subsets; far-OOD noise; masks beside train and val, ADE20K-style) from the toy world.
Together they rehearse the paper profile on a CPU: ``make rehearse``, or by hand::

    python -m saekit.mini.hub --hf-home /tmp/rehearsal/hf --data /tmp/rehearsal/data

The weights are random: a rehearsal proves that every chapter's paper path runs, not what the
real weights compute (that needs the real checkpoints and a GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers

from saekit.mini.diffusion import (
    CLIP_MEAN,
    CLIP_STD,
    build_hub_sd14,
    build_hub_sd35,
    mini_prompts,
    mini_vocabulary,
    text_config,
    train_clip_tokenizer,
)
from saekit.mini.llava import build_hub_llava, build_hub_qwen25_vl
from saekit.mini.miniatures import clip_vision_config, dinov2, resnet_config, tiny_clip
from saekit.models import _quiet_transformers

HUB_FORMAT = 2
"""Bumped when a miniature changes, so a cache written by an older builder is rebuilt."""

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BICUBIC, BILINEAR = 3, 2  # PIL resampling filters, as the hub's processor configs store them


def _dinov2(registers: bool) -> Callable[[Path, int], None]:
    def build(path: Path, seed: int) -> None:
        # ViT-g/14: 40 blocks, SwiGLU MLP, position embeddings for 518-pixel images that the
        # model interpolates to the processor's 224-pixel crops (as the real checkpoint does).
        # 32 wide: the paper's grid asks for k = 256 latents of an 8x SAE (d_sae = 256).
        shape = dict(
            hidden_size=32,
            num_hidden_layers=40,
            num_attention_heads=2,
            mlp_ratio=4,
            use_swiglu_ffn=True,
            image_size=518,
            patch_size=14,
            layerscale_value=1.0,
            layer_norm_eps=1e-6,
        )
        torch.manual_seed(seed)
        dinov2(registers, **shape).save_pretrained(path)
        transformers.BitImageProcessor(
            size={"shortest_edge": 256},
            resample=BICUBIC,
            do_center_crop=True,
            crop_size={"height": 224, "width": 224},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        ).save_pretrained(path)

    return build


def _clip(
    vision_layers: int, patch_size: int, text_layers: int = 12
) -> Callable[[Path, int], None]:
    def build(path: Path, seed: int) -> None:
        tokenizer = train_clip_tokenizer(mini_prompts() + mini_vocabulary())
        model = tiny_clip(
            text_config(tokenizer, text_layers, 2),
            clip_vision_config(32, vision_layers, 2, image_size=224, patch_size=patch_size),
            projection_dim=16,
            seed=seed,
        )
        model.save_pretrained(path)
        # Saved apart, as the hub's openai/clip-* repositories hold them.
        transformers.CLIPImageProcessor(
            size={"shortest_edge": 224},
            resample=BICUBIC,
            crop_size={"height": 224, "width": 224},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ).save_pretrained(path)
        tokenizer.save_pretrained(path)

    return build


def _vit_large(path: Path, seed: int) -> None:
    # The hub checkpoint is an ImageNet classifier; saekit reads its ViTModel backbone.
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=24,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
        num_labels=1000,
    )
    transformers.ViTForImageClassification(config).save_pretrained(path)
    transformers.ViTImageProcessor(
        size={"height": 224, "width": 224},
        resample=BILINEAR,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(path)


def _resnet50(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    config = resnet_config(8, [16, 32, 48, 64], [3, 4, 6, 3], "bottleneck", num_labels=1000)
    transformers.ResNetForImageClassification(config).save_pretrained(path)
    transformers.ConvNextImageProcessor(
        size={"shortest_edge": 224},
        crop_pct=0.875,
        resample=BICUBIC,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(path)


HUB_MINIATURES: dict[str, Callable[[Path, int], None]] = {
    "facebook/dinov2-giant": _dinov2(registers=False),
    "facebook/dinov2-with-registers-giant": _dinov2(registers=True),
    "openai/clip-vit-large-patch14": _clip(vision_layers=24, patch_size=14),
    "openai/clip-vit-base-patch32": _clip(vision_layers=12, patch_size=32),
    "google/vit-large-patch16-224": _vit_large,
    "microsoft/resnet-50": _resnet50,
    "CompVis/stable-diffusion-v1-4": build_hub_sd14,
    "stabilityai/stable-diffusion-3.5-large": build_hub_sd35,
    "llava-hf/llava-1.5-7b-hf": build_hub_llava,
    "Qwen/Qwen2.5-VL-7B-Instruct": build_hub_qwen25_vl,
}
"""Hub id -> builder writing its miniature into a folder (``builder(path, seed)``)."""


def revision(repo_id: str, seed: int = 0) -> str:
    """The snapshot's 40-hex revision: fixed by the id, the seed and `HUB_FORMAT`."""
    return hashlib.sha1(
        f"saekit miniature {repo_id} seed {seed} v{HUB_FORMAT}".encode()
    ).hexdigest()


def repo_folder(hf_home: str | os.PathLike, repo_id: str) -> Path:
    """``HF_HOME/hub/models--org--name``: where the hub cache keeps `repo_id`."""
    return Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))


def write_miniature(hf_home: str | os.PathLike, repo_id: str, seed: int = 0) -> Path:
    """Write `repo_id`'s miniature into the cache under `hf_home` unless it is there; return its
    snapshot folder. Built beside and renamed into place, so an interrupted build is redone."""
    if repo_id not in HUB_MINIATURES:
        raise KeyError(f"No miniature for {repo_id!r}; there are: {', '.join(HUB_MINIATURES)}.")
    repo, rev = repo_folder(hf_home, repo_id), revision(repo_id, seed)
    snapshot = repo / "snapshots" / rev
    if not (snapshot / ".complete").exists():
        scratch = repo / "snapshots" / f".{rev}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(snapshot, ignore_errors=True)
        scratch.mkdir(parents=True)
        with _quiet_transformers():
            HUB_MINIATURES[repo_id](scratch, seed)
        (scratch / ".complete").touch()
        scratch.rename(snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snapshot


def write_hub_cache(
    hf_home: str | os.PathLike, repo_ids: Sequence[str] | None = None, seed: int = 0
) -> dict[str, Path]:
    """Write the miniatures of `repo_ids` (default: all of `HUB_MINIATURES`) under `hf_home`."""
    return {rid: write_miniature(hf_home, rid, seed) for rid in (repo_ids or HUB_MINIATURES)}


# --------------------------------------------------------------------------- data

#: Rehearsal folder per split: (toy-world split, shift, ImageNet subset its classes are cut to).
REHEARSAL_SPLITS = {
    "train": ("train", None, None),
    "val": ("val", None, None),
    "v2": ("val", "v2", None),
    "sketch": ("val", "sketch", None),
    "rendition": ("val", "rendition", "imagenet_r"),
    "hard": ("val", "hard", "imagenet_a"),
    "far_ood": ("val", "far_ood", None),
}


def write_imagenet(
    root: str | os.PathLike, train_per_class: int = 4, per_class: int = 2, seed: int = 0
) -> dict[str, Path]:
    """ImageNet-layout folders of the toy world under `root`, one per `REHEARSAL_SPLITS` entry
    (``root/<split>/<wnid>/*.png``, masks in ``root/<split>_masks``); return split -> folder.

    ImageNet-R and -A cover 200 classes each, so the ``rendition`` and ``hard`` folders keep
    only the toy classes that are among them, as the real sets do.
    """
    from saekit.mini.toyworld import export_imagefolder, masks_root
    from saekit.taxonomy import imagenet_subset

    folders = {}
    for name, (split, shift, subset) in REHEARSAL_SPLITS.items():
        folder = Path(root) / name
        if not (folder / ".complete").exists():
            n = train_per_class if name == "train" else per_class
            export_imagefolder(folder, n, split=split, shift=shift, seed=seed)
            if subset is not None:
                keep = set(imagenet_subset(subset))
                for cls in [p for p in folder.iterdir() if p.is_dir() and p.name not in keep]:
                    shutil.rmtree(cls)
                    shutil.rmtree(masks_root(folder) / cls.name, ignore_errors=True)
            (folder / ".complete").touch()
        folders[name] = folder
    return folders


def book_parameters(data: dict[str, Path]) -> dict[str, str]:
    """The ``-p NAME VALUE`` pairs that point the chapters at `write_imagenet`'s folders."""
    params = {f"imagenet_{name}": str(folder) for name, folder in data.items()}
    params["segmentation_train"] = str(data["train"])
    params["segmentation_val"] = str(data["val"])
    return params


def main(argv: Sequence[str] | None = None) -> None:
    """Write the hub cache and the data; print the book parameters as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-home", required=True, help="HF_HOME of the rehearsal")
    parser.add_argument("--data", required=True, help="folder for the ImageNet-layout sets")
    parser.add_argument("--train-per-class", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=2, help="images per class elsewhere")
    parser.add_argument("--ids", nargs="*", help="hub ids to write (default: all)")
    args = parser.parse_args(argv)
    write_hub_cache(args.hf_home, args.ids)
    data = write_imagenet(args.data, args.train_per_class, args.per_class)
    print(json.dumps(book_parameters(data), indent=1))


if __name__ == "__main__":
    main()
