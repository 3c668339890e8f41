"""LLaVA-1.5 read through its activations: answers in two modalities and image tokens.

Paper 003 §5 asks two questions about a LLaVA model; this module records what both need:

* **Answers (§5.1).** Ask the model, without an image, to define a concept ("What is a
  clock?") and, separately, to describe an image of it without naming it ("Describe this
  image."); `text_responses` / `image_responses` keep a language-model block's residual stream at
  every position that produced an answer token. `saekit.analysis.modality_overlap` compares the
  two modalities' SAE features per class.
* **Image tokens (§5.2).** `image_token_activations` reads the image tokens at the projector
  output and at language-model blocks, each mapped back to its cell of the vision patch grid;
  `saekit.analysis.patch_evolution` compares where SAE features fire at two depths.

The same functions run `llava-hf/llava-1.5-7b-hf` (by hub id, from the local cache) and the
miniature that `saekit.mini.llava.build_mini_llava` writes; only the id differs.

Layer numbering: `layer=k` means the output of language-model decoder block k (0-based), i.e.
the residual stream after k + 1 blocks, `hidden_states[k + 1]` in transformers' numbering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

PAPER_MODEL = "llava-hf/llava-1.5-7b-hf"
PROJECTOR = "projector"
"""Key for the multi-modal projector output in `image_token_activations`."""
LLAVA_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class AnswerConfig:
    """How LLaVA is asked and where it is read while it answers (§5.1)."""

    layer: int | None = None
    """Language-model block read while the model answers; None means the middle block."""
    text_prompts: tuple[str, ...] = ("What is a {name}?",)
    """Text-only questions, one response per class and template; `{name}` is the class name."""
    image_prompt: str = "Describe this image."
    """The question asked with each image; it must not name the class."""
    max_new_tokens: int = 48
    """Longest response generated per prompt."""
    batch_size: int = 4
    """Prompts per `generate` call."""


# --------------------------------------------------------------------------- loading


def load_llava(
    id_or_path: str, *, device: str = "cpu", dtype: str | None = None, offline: bool = True
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a LLaVA model and its processor from a local folder or the local hub cache.

    `offline=True` (the default) never touches the network; a hub id that is not cached fails
    with an error that says how to get it.
    """
    try:
        config = AutoConfig.from_pretrained(id_or_path, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise OSError(
            f"Cannot load LLaVA {id_or_path!r}{' offline' if offline else ''}: {err}\n"
            f"Pass a local folder, download the checkpoint beforehand "
            f"(`huggingface-cli download {PAPER_MODEL}`), or build a miniature with "
            "saekit.mini.llava.build_mini_llava(path)."
        ) from err
    if config.model_type != "llava":
        raise ValueError(
            f"{id_or_path!r} is a {config.model_type!r} checkpoint, not LLaVA; this study needs "
            f"a LlavaForConditionalGeneration such as {PAPER_MODEL}."
        )
    if dtype is not None and dtype not in LLAVA_DTYPES:
        raise ValueError(f"dtype must be one of {LLAVA_DTYPES}, got {dtype!r}.")
    torch_dtype = getattr(torch, dtype) if dtype else None
    model = LlavaForConditionalGeneration.from_pretrained(
        id_or_path, dtype=torch_dtype, local_files_only=offline
    )
    processor = AutoProcessor.from_pretrained(id_or_path, local_files_only=offline)
    return model.to(device).eval(), processor


def language_layers(model: LlavaForConditionalGeneration) -> torch.nn.ModuleList:
    """The decoder blocks of LLaVA's language model."""
    return model.model.language_model.layers


def middle_layer(model: LlavaForConditionalGeneration) -> int:
    """The middle decoder block, where the paper reads its activations."""
    return len(language_layers(model)) // 2


def patch_grid(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> tuple[int, int]:
    """(rows, cols) of the vision patch grid the image tokens come from."""
    crop = processor.image_processor.crop_size
    patch = model.config.vision_config.patch_size
    return crop["height"] // patch, crop["width"] // patch


def build_prompt(processor: LlavaProcessor, question: str, *, with_image: bool) -> str:
    """One user turn through the processor's chat template, ready for the assistant's answer."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )


# ------------------------------------------------------------------ response activations


@dataclass
class Responses:
    """Language-model activations read while LLaVA answered a list of prompts."""

    acts: list[torch.Tensor]
    """Per prompt, [T, D]: row t is the residual stream at the position that produced response
    token t (the last prompt position, then each response token read back), up to the end of
    sequence token."""
    texts: list[str]
    """The decoded responses."""
    labels: np.ndarray
    """Class index of each prompt, [N]."""
    layer: int
    """The decoder block the activations come from."""

    def stacked(self) -> torch.Tensor:
        """All response-token activations in one [sum T, D] matrix, e.g. to train an SAE."""
        return torch.cat(self.acts, dim=0)


def response_mask(new_tokens_BN: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """Which generation steps belong to the response: every step up to the first EOS.

    Step t produced token t; it counts while no EOS came before it (the step that produced the
    EOS is still part of the answer, the padding after it is not).
    """
    is_eos_BN = torch.isin(new_tokens_BN, torch.as_tensor(list(eos_ids)))
    ended_BN = is_eos_BN.cumsum(dim=1) > 0
    keep_BN = torch.ones_like(ended_BN)
    keep_BN[:, 1:] = ~ended_BN[:, :-1]
    return keep_BN


def _eos_ids(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def generate_with_activations(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None = None,
    *,
    layer: int,
    max_new_tokens: int = 48,
    batch_size: int = 4,
) -> tuple[list[torch.Tensor], list[str]]:
    """Greedy-generate an answer to each prompt and record block `layer` while it is written.

    A forward hook on the block keeps the last position of every forward pass `generate`
    makes; that is the position that produces the next token, so the activations are exactly
    those the model computed while answering (no second teacher-forced pass, and left padding
    cannot shift them). Returns per prompt a [T, D] float32 CPU tensor and the decoded answer.
    """
    blocks = language_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range; this model has {len(blocks)} blocks.")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts; pass one each.")
    steps: list[torch.Tensor] = []

    def keep_last_position(_module, _inputs, output):
        hidden_BTD = output[0] if isinstance(output, tuple) else output
        steps.append(hidden_BTD[:, -1].detach().float().cpu())

    eos_ids = _eos_ids(model, processor)
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    handle = blocks[layer].register_forward_hook(keep_last_position)
    acts, texts = [], []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=f"generate (block {layer})"):
            batch = {"text": list(prompts[start : start + batch_size])}
            if images is not None:
                batch["images"] = list(images[start : start + batch_size])
            inputs = processor(**batch, return_tensors="pt", padding=True)
            inputs = inputs.to(model.device, dtype=model.dtype)
            steps.clear()
            with torch.no_grad():
                out_BT = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_BN = out_BT[:, inputs["input_ids"].shape[1] :].cpu()
            if len(steps) != new_BN.shape[1]:
                raise RuntimeError(
                    f"Expected one forward pass per generated token ({new_BN.shape[1]}), saw "
                    f"{len(steps)}; this generation mode is not supported."
                )
            steps_BND = torch.stack(steps, dim=1)
            keep_BN = response_mask(new_BN, eos_ids)
            for b in range(new_BN.shape[0]):
                acts.append(steps_BND[b, keep_BN[b]])
                texts.append(tokenizer.decode(new_BN[b, keep_BN[b]], skip_special_tokens=True))
    finally:
        handle.remove()
        tokenizer.padding_side = padding_side
    return acts, texts


def text_responses(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    class_names: Sequence[str],
    cfg: AnswerConfig,
) -> Responses:
    """Ask the model, without images, to define each class (§5.1 text representations).

    Underscores in class names (ImageNet style, "great_white_shark") become spaces."""
    layer = middle_layer(model) if cfg.layer is None else cfg.layer
    prompts, labels = [], []
    for c, name in enumerate(class_names):
        for template in cfg.text_prompts:
            question = template.format(name=name.replace("_", " "))
            prompts.append(build_prompt(processor, question, with_image=False))
            labels.append(c)
    acts, texts = generate_with_activations(
        model,
        processor,
        prompts,
        layer=layer,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    return Responses(acts, texts, np.asarray(labels), layer)


def image_responses(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: Sequence[Image.Image],
    labels: Sequence[int],
    cfg: AnswerConfig,
) -> Responses:
    """Ask the model to describe each image, never naming its class (§5.1 image side)."""
    layer = middle_layer(model) if cfg.layer is None else cfg.layer
    prompt = build_prompt(processor, cfg.image_prompt, with_image=True)
    acts, texts = generate_with_activations(
        model,
        processor,
        [prompt] * len(images),
        images,
        layer=layer,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    return Responses(acts, texts, np.asarray(labels), layer)


# ------------------------------------------------------------- image tokens and evolution


@dataclass
class ImageTokens:
    """Where each vision patch sits in the language model's input sequence."""

    positions_BP: torch.Tensor
    """Sequence index of the token carrying patch p of image b, [B, P], P = rows * cols."""
    rows_P: torch.Tensor
    """Patch-grid row of patch p, [P]."""
    cols_P: torch.Tensor
    """Patch-grid column of patch p, [P]."""
    grid: tuple[int, int]
    """(rows, cols) of the patch grid."""

    def to_grid(self, values_BP: torch.Tensor) -> torch.Tensor:
        """Per-patch values [B, P] laid out on the patch grid, [B, rows, cols]."""
        values_BHW = values_BP.new_zeros((values_BP.shape[0], *self.grid))
        values_BHW[:, self.rows_P, self.cols_P] = values_BP
        return values_BHW


def image_token_positions(
    input_ids_BT: torch.Tensor, image_token_id: int, grid: tuple[int, int]
) -> ImageTokens:
    """Map each image placeholder token back to its (row, col) cell of the vision patch grid.

    LLaVA scatters the projected patch features into the `<image>` placeholders in order, and
    the vision tower lists patches row by row, so the k-th placeholder of a prompt carries patch
    k: row k // cols, column k % cols. If the prompt holds one extra placeholder per image
    (vision_feature_select_strategy="full" keeps CLIP's CLS token, which comes first), it is
    skipped. One image per prompt.
    """
    n_rows, n_cols = grid
    n_patches = n_rows * n_cols
    is_image_BT = input_ids_BT == image_token_id
    counts_B = is_image_BT.sum(dim=1)
    if not torch.all(counts_B == counts_B[0]) or int(counts_B[0]) not in (n_patches, n_patches + 1):
        raise ValueError(
            f"Each prompt must hold one image expanded to {n_patches} (or {n_patches + 1} with "
            f"CLS) <image> tokens for a {n_rows}x{n_cols} grid; found {counts_B.tolist()}. "
            "Tokenize with the model's own processor, one image per prompt."
        )
    # A stable sort puts the placeholder positions first, in sequence order.
    order_BT = torch.sort((~is_image_BT).to(torch.int8), dim=1, stable=True).indices
    positions_BP = order_BT[:, int(counts_B[0]) - n_patches : int(counts_B[0])]
    patch_P = torch.arange(n_patches)
    return ImageTokens(positions_BP, patch_P // n_cols, patch_P % n_cols, grid)


@torch.no_grad()
def image_token_activations(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: Sequence[Image.Image],
    layers: Sequence[int | str] = (PROJECTOR, 6),
    *,
    prompt: str = "Describe this image.",
    batch_size: int = 4,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[dict[int | str, torch.Tensor], ImageTokens]:
    """Image-token activations, [N, P, D] per requested point, patches in grid order (§5.2).

    `layers` holds `PROJECTOR` (the multi-modal projector output, where image features enter
    the language model) and/or decoder block indices. One forward pass per batch of images
    with the prompt, no generation. Also returns the token map of the last batch (every batch
    shares its grid); use its `to_grid` to lay per-patch values out as images.
    """
    blocks = language_layers(model)
    grid = patch_grid(model, processor)
    n_patches = grid[0] * grid[1]
    bad = [
        k for k in layers if k != PROJECTOR and not (isinstance(k, int) and 0 <= k < len(blocks))
    ]
    if bad:
        raise ValueError(
            f"Unknown points {bad}; use {PROJECTOR!r} or a block index in [0, {len(blocks)})."
        )
    captured: dict[int | str, torch.Tensor] = {}

    def recorder(key):
        def hook(_module, _inputs, output):
            captured[key] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [
        (
            model.model.multi_modal_projector if key == PROJECTOR else blocks[key]
        ).register_forward_hook(recorder(key))
        for key in layers
    ]
    text = build_prompt(processor, prompt, with_image=True)
    chunks: dict[int | str, list[torch.Tensor]] = {key: [] for key in layers}
    tokens = None
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="image tokens"):
            batch = list(images[start : start + batch_size])
            inputs = processor(images=batch, text=[text] * len(batch), return_tensors="pt")
            inputs = inputs.to(model.device, dtype=model.dtype)
            model(**inputs)
            tokens = image_token_positions(
                inputs["input_ids"].cpu(), model.config.image_token_id, grid
            )
            rows_B1 = torch.arange(len(batch))[:, None]
            for key in layers:
                out = captured[key].float().cpu()
                # The projector sees only image features: the last P of them are the patches.
                acts_BPD = (
                    out[:, -n_patches:] if key == PROJECTOR else out[rows_B1, tokens.positions_BP]
                )
                chunks[key].append(acts_BPD.to(out_dtype))
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(parts) for key, parts in chunks.items()}, tokens


def square_crop(processor: LlavaProcessor, image: Image.Image) -> Image.Image:
    """The part of `image` the patch grid covers: LLaVA-1.5's processor resizes the short side
    and crops the centre square."""
    crop = processor.image_processor.crop_size
    return ImageOps.fit(image.convert("RGB"), (crop["width"], crop["height"]))
