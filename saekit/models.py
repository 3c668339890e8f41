"""Vision encoders: load by hub id or local folder, and read every layer in one forward pass.

`load_encoder` wraps a transformers vision model (DINOv2 with or without registers, the CLIP
vision tower, ViT, ResNet) together with its own image processor. Calling the encoder on a batch
of images returns, from ONE forward pass, each requested layer's CLS token and patch tokens:

* transformers: layer ``i`` is the output of block ``i`` (``hidden_states[i + 1]``), i.e. the
  residual stream the papers train SAEs on; register tokens are dropped.
* ResNet: layer ``i`` is stage ``i``; its globally average-pooled vector plays the CLS role and
  its spatial positions (row-major) are the "patches".

`saekit.mini.miniatures.miniature(kind, path)` saves a tiny seeded model of each kind with its processor, so tests and
the CI book load it through exactly the `from_pretrained` path a hub checkpoint takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from saekit.data import as_pil_images

#: transformers ``model_type`` values load_encoder understands, mapped to saekit's family name.
SUPPORTED_MODEL_TYPES = {
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "vit": "vit",
    "clip": "clip",
    "clip_vision_model": "clip",
    "resnet": "resnet",
}

#: Config keys that name or tune a checkpoint without changing what its layers compute.
_CONFIG_NOISE = {
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "use_return_dict",
    "use_cache",
    "torchscript",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
}
#: Values per tensor that the weights fingerprint reads (tensors up to this size are read whole).
WEIGHT_SAMPLE = 1 << 16

_LAYERS_HELP = (
    "'all', comma-separated indices such as 0,5,11 (negative count from the end, -1 = last) "
    "or ranges such as 3-5"
)


class EncoderLoadError(ValueError):
    """The model id or folder could not be loaded; the message says what was tried."""


def parse_layers(text: str) -> str | list[int]:
    """``"all"``, or the indices a layer string names: ``"0,5,11"``, ``"-1"``, ``"3-5"`` (an
    inclusive range), or a mix (``"0,3-5,-1"``). Raises ValueError saying what is accepted."""
    text = text.strip()
    if text == "all":
        return "all"
    layers: list[int] = []
    items = [item.strip() for item in text.split(",")]
    if not text or not all(items):
        raise ValueError(f"layers {text!r} names no layer: give {_LAYERS_HELP}.")
    for item in items:
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise ValueError(f"layer range {item!r} runs backwards; write {hi}-{lo}.")
            layers.extend(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", item):
            layers.append(int(item))
        else:
            raise ValueError(f"cannot read layer {item!r} in {text!r}: give {_LAYERS_HELP}.")
    return layers


class LayerDict(dict):
    """``{layer: tensor}`` keyed by non-negative layer index that also answers to the negative
    index naming the same layer (``out.cls[-1]`` is ``out.cls[n_layers - 1]``).

    Keys are always the resolved, non-negative indices (what a store's manifest lists).
    """

    def __init__(self, n_layers: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_layers = n_layers

    def _resolve(self, key: Any) -> Any:
        if isinstance(key, int | np.integer) and key < 0 and self.n_layers is not None:
            return int(key) + self.n_layers
        return key

    def __missing__(self, key: Any) -> Any:
        resolved = self._resolve(key)
        if resolved != key and dict.__contains__(self, resolved):
            return dict.__getitem__(self, resolved)
        raise KeyError(f"layer {key} was not computed; this output holds layers {sorted(self)}")

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, self._resolve(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default


@dataclass
class EncoderOutput:
    """What one forward pass returns, keyed by layer index.

    Layers are keyed by their non-negative index; a negative index the caller asked for (``-1``)
    looks up the same entry, so ``out.cls[-1]`` works and ``list(out.cls)`` shows the index it
    resolved to.
    """

    cls: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer: the CLS token (or a CNN stage's pooled vector), ``[B, D]``."""
    patches: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer: patch tokens in row-major grid order, registers excluded, ``[B, P, D]``."""
    attentions: dict[int, torch.Tensor] | None = None
    """Per layer: attention probabilities ``[B, H, T, T]`` (transformers only, on request)."""
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Per layer: patch grid (rows, cols) of this batch; ``P = rows * cols``."""

    @property
    def grid(self) -> tuple[int, int]:
        """The last requested layer's patch grid."""
        return self.grids[max(self.grids)]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load reports (e.g. a CLIP text tower skipped on purpose)."""
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


def _read_config(id_or_path: str) -> transformers.PretrainedConfig:
    path = Path(id_or_path).expanduser()
    # Hub ids look like "org/name"; anything else that names a path is treated as a folder.
    looks_local = (
        path.exists() or id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") > 1
    )
    if looks_local and not path.is_dir():
        raise EncoderLoadError(
            f"Model folder {str(path)!r} does not exist. Pass a folder written by "
            "`save_pretrained` (or `saekit.mini.miniature(kind, path)`), or a hub id such as "
            "'facebook/dinov2-small'."
        )
    try:
        with _quiet_transformers():
            return transformers.AutoConfig.from_pretrained(str(path) if looks_local else id_or_path)
    except (OSError, ValueError) as err:
        raise EncoderLoadError(
            f"Could not load model {id_or_path!r}: tried it as a local folder ({path} "
            f"{'exists' if path.exists() else 'does not exist'}) and as a Hugging Face hub id. "
            "Hub ids need a network connection (or a populated HF cache); offline, pass a local "
            f"folder written by `save_pretrained`. Underlying error: {err}"
        ) from err


class Encoder:
    """A vision model plus its processor, returning many layers' tokens per forward pass."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        processor: transformers.BaseImageProcessor,
        family: str,
        model_id: str,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.family = family
        self.model_id = model_id
        cfg = model.config
        self.n_registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        if family == "resnet":
            self.n_layers = len(cfg.hidden_sizes)
            self.widths = list(cfg.hidden_sizes)
        else:
            self.n_layers = int(cfg.num_hidden_layers)
            self.widths = [int(cfg.hidden_size)] * self.n_layers

    @property
    def d_model(self) -> int:
        """Width of the last layer (all layers share it, except in a CNN)."""
        return self.widths[-1]

    @property
    def config_hash(self) -> str:
        """A short hash of what in the model config determines its activations (not where it
        was loaded from: ``_name_or_path``, versions and label names are left out)."""
        return config_fingerprint(self.model.config)

    @property
    def identity(self) -> dict[str, str]:
        """What determines this encoder's activations: family, config, image processor and a
        fingerprint of the weights' content (`weights_fingerprint`). Two loads of one
        checkpoint agree however its path was spelled; cheap (no forward pass)."""
        return {
            "family": self.family,
            "config": self.config_hash,
            "processor": processor_fingerprint(self.processor),
            "weights": weights_fingerprint(self.model),
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of a processed image at the processor's default size (a CNN: last stage)."""
        size = _processed_size(self.processor)
        if self.family == "resnet":
            # Each ResNet stage halves the resolution; the embedder already divides by 4.
            factor = 4 * 2 ** (self.n_layers - 1)
        else:
            factor = int(self.model.config.patch_size)
        return size[0] // factor, size[1] // factor

    def resolve_layers(self, layers: str | int | Sequence[int] | None) -> list[int]:
        """Turn "all", an int, a string (`parse_layers`: "0,5,11", "-1", "3-5") or a list into
        sorted, distinct, non-negative indices (negatives count from the end; a layer named
        twice, e.g. as 2 and -1 of three, is computed once)."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, str):
            layers = parse_layers(layers)
            if layers == "all":
                return list(range(self.n_layers))
        if isinstance(layers, int | np.integer) and not isinstance(layers, bool):
            layers = [int(layers)]
        layers = list(layers)  # type: ignore[arg-type]  # "all" was handled above
        if not layers:
            raise ValueError(f"No layers asked for: give {_LAYERS_HELP}.")
        resolved = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
                raise TypeError(f"Layer indices are integers, not {layer!r}.")
            layer = int(layer)
            index = layer + self.n_layers if layer < 0 else layer
            if not 0 <= index < self.n_layers:
                raise IndexError(
                    f"Layer {layer} is out of range for {self.model_id!r}, which has "
                    f"{self.n_layers} layers: valid indices are 0..{self.n_layers - 1} "
                    f"(or -{self.n_layers}..-1)."
                )
            resolved.append(index)
        return sorted(set(resolved))

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images -> ``pixel_values [B, 3, H, W]`` with the model's own processor.

        ``images`` is anything `as_pil_images` accepts (PIL images, paths, uint8 or [0, 1] float
        tensors and arrays, one or a batch)."""
        rgb = as_pil_images(images)
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
        # Transformers cast inputs themselves; a CNN's first conv does not, so match its dtype.
        return pixels.to(self.device, dtype=next(self.model.parameters()).dtype)

    def forward_pixels(
        self,
        pixel_values: torch.Tensor,
        layers: str | int | Sequence[int] | None = "all",
        attentions: bool = False,
    ) -> EncoderOutput:
        """One forward pass on preprocessed pixels; keeps gradients if the caller wants them."""
        layer_ids = self.resolve_layers(layers)
        if attentions and self.family == "resnet":
            raise ValueError("A CNN has no attention maps; ask for attentions=False.")
        previous = self.model.config._attn_implementation
        if attentions and previous != "eager":
            # sdpa kernels never materialise the attention probabilities; switch for this call only.
            self.model.set_attn_implementation("eager")
        try:
            out = self.model(
                pixel_values=pixel_values,
                output_hidden_states=True,
                output_attentions=attentions,
            )
        finally:
            if self.model.config._attn_implementation != previous:
                self.model.set_attn_implementation(previous)
        n = self.n_layers
        result = EncoderOutput(
            cls=LayerDict(n),
            patches=LayerDict(n),
            attentions=LayerDict(n) if attentions else None,
            grids=LayerDict(n),
        )
        if self.family == "resnet":
            # hidden_states[0] is the stem; stage i is hidden_states[i + 1], shaped [B, C, H, W].
            for layer in layer_ids:
                fmap_BDHW = out.hidden_states[layer + 1]
                result.cls[layer] = fmap_BDHW.mean(dim=(2, 3))
                result.patches[layer] = fmap_BDHW.flatten(2).transpose(1, 2)
                result.grids[layer] = tuple(fmap_BDHW.shape[2:])
            return result
        patch = int(self.model.config.patch_size)
        grid = (pixel_values.shape[2] // patch, pixel_values.shape[3] // patch)
        first_patch = 1 + self.n_registers
        attention_maps = result.attentions
        for layer in layer_ids:
            tokens_BTD = out.hidden_states[layer + 1]
            result.cls[layer] = tokens_BTD[:, 0]
            result.patches[layer] = tokens_BTD[:, first_patch:]
            result.grids[layer] = grid
            if attention_maps is not None:
                attention_maps[layer] = out.attentions[layer]
        return result

    def __call__(
        self,
        images: Any,
        layers: str | int | Sequence[int] | None = "all",
        attentions: bool = False,
    ) -> EncoderOutput:
        """Every requested layer's CLS and patch tokens for a batch of images.

        ``images``: a PIL image or a list of them, a file path or a list of paths, or a uint8
        (0-255) / float ([0, 1]) tensor ``[B, 3, H, W]`` / ``[3, H, W]`` (numpy arrays in image
        layout ``[B, H, W, 3]`` / ``[H, W, 3]``). ``layers``: see `resolve_layers`; the output is
        keyed by the resolved index and also answers to the negative one asked for.
        """
        with torch.inference_mode():
            return self.forward_pixels(self.preprocess(images), layers, attentions)

    def __repr__(self) -> str:
        return (
            f"Encoder({self.model_id!r}, family={self.family}, layers={self.n_layers}, "
            f"d_model={self.d_model}, grid={self.grid})"
        )


def _strip_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_config(v)
            for k, v in sorted(value.items())
            if not k.startswith("_") and k not in _CONFIG_NOISE
        }
    if isinstance(value, list | tuple):
        return [_strip_config(v) for v in value]
    return value


def config_fingerprint(config: transformers.PretrainedConfig) -> str:
    """A short hash of what in a model config determines its activations: every field except
    where it was loaded from (``_name_or_path``), versions, dtype and classification labels."""
    text = json.dumps(_strip_config(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def processor_fingerprint(processor: Any) -> str:
    """A short hash of an image processor's settings (resize, crop, normalisation)."""
    text = json.dumps(_strip_config(processor.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, sample: int = WEIGHT_SAMPLE) -> str:
    """A short hash of a model's weights: every tensor's name, shape and dtype, and its values
    (whole up to `sample` values, else `sample` values spread evenly over it).

    Two checkpoints that differ anywhere in training differ in every sampled slice, and the
    fingerprint costs milliseconds where hashing gigabytes of weights would take seconds.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        if flat.numel() > sample:
            picks = torch.linspace(0, flat.numel() - 1, sample, dtype=torch.float64).long()
            flat = flat[picks.to(flat.device)]
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _processed_size(processor: transformers.BaseImageProcessor) -> tuple[int, int]:
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        return int(crop["height"]), int(crop["width"])
    size = getattr(processor, "size", None) or {}
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size["shortest_edge"])
    return edge, edge


def load_encoder(
    id_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Encoder:
    """Load a supported vision encoder and its image processor by hub id or local folder.

    A full CLIP checkpoint (e.g. ``openai/clip-vit-base-patch32``) loads its vision tower only.
    """
    id_or_path = str(id_or_path)
    config = _read_config(id_or_path)
    family = SUPPORTED_MODEL_TYPES.get(config.model_type)
    if family is None:
        raise EncoderLoadError(
            f"{id_or_path!r} is a {config.model_type!r} model; saekit reads "
            f"{sorted(SUPPORTED_MODEL_TYPES)} (DINOv2, CLIP, ViT, ResNet)."
        )
    source = (
        str(Path(id_or_path).expanduser()) if Path(id_or_path).expanduser().is_dir() else id_or_path
    )
    model: transformers.PreTrainedModel
    with _quiet_transformers():
        if family == "clip":
            model = transformers.CLIPVisionModel.from_pretrained(source, dtype=dtype)
        elif family == "vit":
            # ViTModel without the pooler: a classification checkpoint loads its backbone.
            model = transformers.ViTModel.from_pretrained(
                source, add_pooling_layer=False, dtype=dtype
            )
        else:
            model = transformers.AutoModel.from_pretrained(source, dtype=dtype)
        processor = transformers.AutoImageProcessor.from_pretrained(source)
    if device is not None:
        torch.nn.Module.to(model, device)  # in place (transformers types its own .to oddly)
    return Encoder(model, processor, family, id_or_path)
