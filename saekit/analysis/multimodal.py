"""LLaVA-1.5 studies with SAEs: image/text feature overlap and layer-wise visual features.

Paper 003 §5. Two questions about a LLaVA model, asked through SAEs:

* **Overlap (§5.1, Fig. 6).** Ask the model to define a concept in text only ("What is a
  clock?") and, separately, to describe an image of it without naming it ("Describe this
  image."). Read a middle language-model layer while the model writes its answer, encode those
  activations with one ReLU SAE, and compare per class the top 1% most activated features of
  the two modalities: overlap size and Jaccard index, against a chance level from mismatched
  class pairs (a permutation test).
* **Evolution (§5.2, Fig. 7).** Read the image tokens at the projector output and at a
  language-model layer (6 in the paper), encode each with its own SAE, map every image token
  back to its cell of the vision patch grid, and overlay the two maps of activated patches.

The same functions run `llava-hf/llava-1.5-7b-hf` (by hub id, from the local cache) and the
miniature that `saekit.mini.llava.build_mini_llava` writes; only the id differs.

Layer numbering: `layer=k` means the output of language-model decoder block k (0-based), i.e.
the residual stream after k + 1 blocks, `hidden_states[k + 1]` in transformers' numbering.
SAEs are SAELens SAE objects; this module only calls `sae.encode`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from PIL import Image, ImageOps
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

if TYPE_CHECKING:  # only for hints: importing SAELens pulls in TransformerLens
    from sae_lens import SAE

PAPER_MODEL = "llava-hf/llava-1.5-7b-hf"
PROJECTOR = "projector"
"""Key for the multi-modal projector output in `image_token_activations`."""


@dataclass
class MultimodalConfig:
    """Knobs of the LLaVA study; the notebook's parameters use the same names."""

    model: str = PAPER_MODEL
    """Hub id (read from the local cache only) or local folder of a LLaVA checkpoint."""
    layer: int | None = None
    """Language-model block read for the overlap study; None means the middle block."""
    evolution_layer: int = 6
    """Language-model block compared with the projector output in the evolution study."""
    text_prompts: tuple[str, ...] = ("What is a {name}?",)
    """Text-only questions, one response per class and template; `{name}` is the class name."""
    image_prompt: str = "Describe this image."
    """The question asked with each image; it must not name the class."""
    max_new_tokens: int = 48
    """Longest response generated per prompt."""
    batch_size: int = 4
    """Prompts per `generate` call."""
    top_fraction: float = 0.01
    """Fraction of SAE features kept as a class's top set per modality (1% in the paper)."""
    n_permutations: int = 1000
    """Mismatched class pairings drawn for the chance baseline."""
    seed: int = 0
    """Seed of the permutation baseline."""
    device: str = "cpu"
    """Torch device the model runs on."""
    dtype: str = "float32"
    """Model weight dtype: float32, float16 or bfloat16."""


PROFILES: dict[str, MultimodalConfig] = {
    "paper": MultimodalConfig(
        model=PAPER_MODEL, layer=16, evolution_layer=6, device="cuda", dtype="float16"
    ),
    # The miniature's model path is filled in by the book once it has built it.
    "mini": MultimodalConfig(
        model="", layer=2, evolution_layer=1, max_new_tokens=8, top_fraction=0.05
    ),
}


def profile_config(profile: str, **overrides) -> MultimodalConfig:
    """The study's settings for a book profile (`mini` or `paper`), with field overrides."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}.")
    known = set(MultimodalConfig.__dataclass_fields__)
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"Unknown parameters {sorted(unknown)}; valid ones are {sorted(known)}.")
    base = PROFILES[profile]
    return MultimodalConfig(**{**base.__dict__, **overrides})


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
    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}.")
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
    cfg: MultimodalConfig,
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
    cfg: MultimodalConfig,
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


# ------------------------------------------------------------------------ overlap metrics


@torch.no_grad()
def class_profiles(sae: SAE, responses: Responses, n_classes: int) -> np.ndarray:
    """Mean SAE activation per class, [C, S]: mean over a response's tokens, then over the
    class's responses. A class with no responses gets a zero row (and so an empty top set)."""
    param = sae.W_enc
    profile_CS = np.zeros((n_classes, sae.cfg.d_sae), dtype=np.float64)
    counts_C = np.zeros(n_classes)
    for acts_TD, label in zip(responses.acts, responses.labels, strict=True):
        codes_TS = sae.encode(acts_TD.to(param.device, param.dtype))
        profile_CS[label] += codes_TS.float().mean(dim=0).cpu().numpy()
        counts_C[label] += 1
    return profile_CS / np.maximum(counts_C, 1)[:, None]


def top_feature_sets(profile_CS: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """Each class's top `fraction` of features by activation, as a boolean [C, S] mask.

    K = ceil(fraction * S), at least 1. Features that never fire (activation <= 0) are left out
    even when a class has fewer than K active ones, so silence cannot count as overlap.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    profile_CS = np.asarray(profile_CS, dtype=np.float64)
    k = max(1, math.ceil(fraction * profile_CS.shape[1]))
    order_CS = np.argsort(-profile_CS, axis=1, kind="stable")
    sets_CS = np.zeros(profile_CS.shape, dtype=bool)
    np.put_along_axis(sets_CS, order_CS[:, :k], True, axis=1)
    return sets_CS & (profile_CS > 0)


def overlap_size(a_CS: np.ndarray, b_CS: np.ndarray) -> np.ndarray:
    """Features shared by row c of both masks, [C]."""
    return (np.asarray(a_CS, bool) & np.asarray(b_CS, bool)).sum(axis=1)


def jaccard(a_CS: np.ndarray, b_CS: np.ndarray) -> np.ndarray:
    """Jaccard index |A ∩ B| / |A ∪ B| of row c of both masks, [C]; 0 when both are empty."""
    a_CS, b_CS = np.asarray(a_CS, bool), np.asarray(b_CS, bool)
    union_C = (a_CS | b_CS).sum(axis=1)
    return np.where(union_C > 0, overlap_size(a_CS, b_CS) / np.maximum(union_C, 1), 0.0)


def jaccard_matrix(a_CS: np.ndarray, b_CS: np.ndarray) -> np.ndarray:
    """Jaccard index of every pair (A_i, B_j), [C, C]; the diagonal holds the matched classes."""
    a_CS, b_CS = np.asarray(a_CS, np.int64), np.asarray(b_CS, np.int64)
    inter_CC = a_CS @ b_CS.T
    union_CC = a_CS.sum(1)[:, None] + b_CS.sum(1)[None, :] - inter_CC
    return np.where(union_CC > 0, inter_CC / np.maximum(union_CC, 1), 0.0)


def random_derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (every class mismatched).

    Rejection sampling: about e draws on average; numpy and scipy have no derangement sampler.
    """
    if n < 2:
        raise ValueError("A mismatched pairing needs at least 2 classes.")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


@dataclass
class PermutationBaseline:
    """Matched-class Jaccard against mismatched-class pairings."""

    observed: float
    """Mean Jaccard over classes, text of class c against image of class c."""
    null: np.ndarray = field(repr=False)
    """Mean Jaccard under each random mismatched pairing, [n_permutations]."""
    expected_chance: float
    """Exact expectation of the null: mean Jaccard over all pairs of different classes."""
    p_value: float
    """(1 + #null >= observed) / (1 + n_permutations), one-sided."""

    @property
    def null_mean(self) -> float:
        return float(self.null.mean())


def permutation_baseline(
    text_CS: np.ndarray, image_CS: np.ndarray, n_permutations: int = 1000, seed: int = 0
) -> PermutationBaseline:
    """Chance level of text/image overlap: pair each class's text set with another class's
    image set (a random derangement), many times, and compare with the matched pairing."""
    j_CC = jaccard_matrix(text_CS, image_CS)
    n = j_CC.shape[0]
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    null = np.array([j_CC[rows, random_derangement(n, rng)].mean() for _ in range(n_permutations)])
    observed = float(np.diag(j_CC).mean())
    off_diagonal = ~np.eye(n, dtype=bool)
    # Ties count against the observed value, so identical sets everywhere give p = 1.
    p_value = (1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations)
    return PermutationBaseline(observed, null, float(j_CC[off_diagonal].mean()), float(p_value))


def overlap_table(
    text_CS: np.ndarray, image_CS: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Per class: set sizes, overlap, Jaccard, and the class's own chance Jaccard (its text set
    against every other class's image set)."""
    j_CC = jaccard_matrix(text_CS, image_CS)
    n = len(class_names)
    chance_C = (j_CC.sum(axis=1) - np.diag(j_CC)) / max(n - 1, 1)
    return pd.DataFrame(
        {
            "class": list(class_names),
            "n_text": np.asarray(text_CS, bool).sum(axis=1),
            "n_image": np.asarray(image_CS, bool).sum(axis=1),
            "overlap": overlap_size(text_CS, image_CS),
            "jaccard": np.diag(j_CC),
            "chance_jaccard": chance_C,
        }
    )


def overlap_heatmap_frame(
    text_CS: np.ndarray, image_CS: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Fig. 6 as a table: two rows per class (text, image), one column per feature in any top
    set, ordered by the first class that selects it. A cell is 0 when the feature is not in
    that row's set, 1 when it is in this modality's set only, 2 when both modalities of the
    class select it."""
    text_CS, image_CS = np.asarray(text_CS, bool), np.asarray(image_CS, bool)
    either_CS = text_CS | image_CS
    features = []
    for c in range(either_CS.shape[0]):
        features += [int(f) for f in np.flatnonzero(either_CS[c]) if f not in features]
    both_CS = text_CS & image_CS
    rows, index = [], []
    for c, name in enumerate(class_names):
        for modality, sets_CS in (("text", text_CS), ("image", image_CS)):
            rows.append(sets_CS[c, features].astype(int) + both_CS[c, features])
            index.append((name, modality))
    return pd.DataFrame(
        np.array(rows).reshape(len(index), len(features)),
        index=pd.MultiIndex.from_tuples(index, names=["class", "modality"]),
        columns=pd.Index(features, name="feature"),
    )


def plot_overlap_heatmap(frame: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Draw `overlap_heatmap_frame` (Fig. 6): grey = one modality only, red = shared."""
    # Wide enough to read a few dozen features, capped so a 1% set of a big SAE still fits a page.
    width = min(14, max(6, 0.25 * frame.shape[1]))
    ax = ax or plt.subplots(figsize=(width, 0.35 * len(frame) + 1))[1]
    labels = [f"{name} · {modality}" for name, modality in frame.index]
    sns.heatmap(
        frame.set_axis(labels, axis=0),
        cmap=ListedColormap(["white", "0.6", "tab:red"]),
        vmin=0,
        vmax=2,
        cbar=False,
        linewidths=0.3 if frame.shape[1] <= 80 else 0,
        linecolor="0.9",
        ax=ax,
    )
    ax.set_xlabel("SAE feature")
    ax.set_ylabel("")
    ax.set_title("Top SAE features per class: text vs image (red = shared)")
    return ax


def plot_jaccard_matrix(
    j_CC: np.ndarray, class_names: Sequence[str], ax: Axes | None = None
) -> Axes:
    """Jaccard of every (text class, image class) pair; a bright diagonal means overlap beyond
    what mismatched classes share."""
    ax = ax or plt.subplots(figsize=(1 + 0.4 * len(class_names), 0.4 * len(class_names) + 1))[1]
    sns.heatmap(
        pd.DataFrame(j_CC, index=list(class_names), columns=list(class_names)),
        cmap="viridis",
        vmin=0,
        vmax=max(float(np.max(j_CC)), 0.01),  # an all-zero matrix still gets a 0-based scale
        square=True,
        ax=ax,
    )
    ax.set_ylabel("text prompt class")
    ax.set_xlabel("image class")
    return ax


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


@torch.no_grad()
def patch_maps(
    sae: SAE, acts_BPD: torch.Tensor, grid: tuple[int, int], feature: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SAE feature's activation on every patch, laid out on the grid, [B, rows, cols].

    With `feature=None` each image uses its own dominant feature (largest total activation over
    its patches), since SAEs trained at different points share no feature indices. Returns the
    maps and the feature used per image, [B].
    """
    n_images, n_patches, _ = acts_BPD.shape
    if n_patches != grid[0] * grid[1]:
        raise ValueError(f"{n_patches} patches do not fill a {grid[0]}x{grid[1]} grid.")
    param = sae.W_enc
    codes_BPS = sae.encode(acts_BPD.reshape(n_images * n_patches, -1).to(param.device, param.dtype))
    codes_BPS = codes_BPS.float().cpu().reshape(n_images, n_patches, -1)
    if feature is None:
        features_B = codes_BPS.sum(dim=1).argmax(dim=1)
    else:
        features_B = torch.full((n_images,), int(feature))
    maps_BP = codes_BPS[torch.arange(n_images), :, features_B]
    return maps_BP.reshape(n_images, *grid), features_B


@dataclass
class Evolution:
    """Activated patches at two points of the model and how they relate (Fig. 7)."""

    early_BHW: torch.Tensor
    """Patches active at the earlier point (e.g. the projector), bool."""
    late_BHW: torch.Tensor
    """Patches active at the later point (e.g. block 6), bool."""
    overlay_BHW: torch.Tensor
    """0 neither, 1 early only, 2 late only, 3 both."""
    persistence_B: torch.Tensor
    """Fraction of early-active patches still active later (NaN when none were active)."""
    new_B: torch.Tensor
    """Number of patches active only at the later point."""


def compare_patch_maps(
    early_BHW: torch.Tensor, late_BHW: torch.Tensor, threshold: float = 0.0
) -> Evolution:
    """Threshold two sets of patch maps (active = activation > threshold) and overlay them."""
    early, late = early_BHW > threshold, late_BHW > threshold
    overlay = early.to(torch.int64) + 2 * late.to(torch.int64)
    kept_B = (early & late).flatten(1).sum(1).float()
    n_early_B = early.flatten(1).sum(1).float()
    persistence_B = torch.where(n_early_B > 0, kept_B / n_early_B.clamp(min=1), torch.nan)
    new_B = (late & ~early).flatten(1).sum(1)
    return Evolution(early, late, overlay, persistence_B, new_B)


def square_crop(processor: LlavaProcessor, image: Image.Image) -> Image.Image:
    """The part of `image` the patch grid covers: LLaVA-1.5's processor resizes the short side
    and crops the centre square."""
    crop = processor.image_processor.crop_size
    return ImageOps.fit(image.convert("RGB"), (crop["width"], crop["height"]))


def plot_evolution(
    image: Image.Image,
    evolution: Evolution,
    index: int = 0,
    names: tuple[str, str] = ("projector", "layer 6"),
    axes: Sequence[Axes] | None = None,
) -> Sequence[Axes]:
    """Fig. 7 for one image: active patches early, late, and their overlay on the image.

    Drawn with matplotlib's imshow because seaborn has no image-overlay plot. Pass the image
    as the grid sees it (`square_crop`).
    """
    axes = axes if axes is not None else plt.subplots(1, 3, figsize=(9, 3.2))[1]
    width, height = image.size
    clear = (0, 0, 0, 0)
    panels = [
        (evolution.early_BHW[index].int(), [clear, "tab:blue"], names[0]),
        (evolution.late_BHW[index].int(), [clear, "tab:orange"], names[1]),
        (
            evolution.overlay_BHW[index],
            [clear, "tab:blue", "tab:orange", "tab:purple"],
            "overlay (purple = both)",
        ),
    ]
    for ax, (values_HW, colors, title) in zip(axes, panels, strict=True):
        ax.imshow(image, extent=(0, width, height, 0))  # same extent as the grid: cells align
        ax.imshow(
            values_HW.numpy(),
            cmap=ListedColormap(colors),
            vmin=0,
            vmax=len(colors) - 1,
            alpha=0.6,
            extent=(0, width, height, 0),
            interpolation="nearest",
        )
        ax.set_title(title)
        ax.axis("off")
    return axes


# ------------------------------------------------------------------ study helpers (chapter 7)


def _first_images(labels_N: np.ndarray, label: int, start: int, count: int) -> list[int]:
    found = np.flatnonzero(labels_N == label)[start : start + count]
    if len(found) < count:
        raise ValueError(
            f"Class {label} has {len(np.flatnonzero(labels_N == label))} images; {start + count} "
            "are needed (images_per_class plus sae_captions_per_class). Lower those or add images."
        )
    return found.tolist()


def study_images(
    labels_N: Sequence[int], n_classes: int, per_class: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose the study's classes and images from a labelled dataset.

    `n_classes` classes spread evenly over the dataset's class indices (so a toy world's or
    ImageNet's whole range is sampled, not just its first few classes), and the first
    `per_class` images of each. Returns the chosen class indices [C], the dataset indices of the
    images [C * per_class], grouped by class, and each image's study label in 0..C-1 [C * per_class].
    """
    labels_N = np.asarray(labels_N)
    n_available = int(labels_N.max()) + 1 if len(labels_N) else 0
    if not 1 <= n_classes <= n_available:
        raise ValueError(
            f"n_classes={n_classes} but the dataset has {n_available} classes; "
            f"pick between 1 and {n_available}."
        )
    # Points spaced >= 1 apart round to distinct integers.
    classes_C = np.linspace(0, n_available - 1, n_classes).round().astype(int)
    indices, study_labels = [], []
    for c, label in enumerate(classes_C):
        indices.extend(_first_images(labels_N, label, 0, per_class))
        study_labels.extend([c] * per_class)
    return classes_C, np.asarray(indices, dtype=int), np.asarray(study_labels, dtype=int)


def caption_images(labels_N: Sequence[int], skip: int, per_class: int) -> np.ndarray:
    """Dataset indices of images `skip .. skip + per_class - 1` of *every* class: images to
    caption only for the overlap SAE's training data (the paper trains it on activations
    recorded while LLaVA captions ImageNet), kept apart from the first `skip` study images."""
    labels_N = np.asarray(labels_N)
    indices = [
        i for label in np.unique(labels_N) for i in _first_images(labels_N, label, skip, per_class)
    ]
    return np.asarray(indices, dtype=int)


def training_activations(
    text: Responses, image: Responses, on: str = "both", captions: Responses | None = None
) -> torch.Tensor:
    """The overlap SAE's training rows, [N, D]: the caption answers (if any) plus both
    modalities' study answers (`on="both"`) or the image answers only (`on="image"`)."""
    if on not in ("both", "image"):
        raise ValueError(f"sae_train_on must be 'both' or 'image', got {on!r}.")
    parts = [r for r in (captions, text if on == "both" else None, image) if r is not None]
    layers = {r.layer for r in parts}
    if len(layers) != 1:
        raise ValueError(f"The answers come from blocks {sorted(layers)}; one SAE needs one layer.")
    return torch.cat([r.stacked() for r in parts if r.acts])


def train_relu_sae(
    acts_ND: torch.Tensor,
    *,
    expansion: int = 8,
    l1: float = 0.3,
    lr: float = 1e-4,
    epochs: int = 3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> SAE:
    """A ReLU SAE on in-memory activations (response tokens or image tokens).

    The `olson2025` recipe (paper 003 §3.3) with input normalisation switched on: a LLaVA-7B
    residual stream and the miniature's differ in scale by orders of magnitude, and normalised
    inputs let one λ mean the same sparsity for both. The normalisation is folded into the
    weights, so the SAE encodes raw activations. These few thousand rows live in memory, so
    training goes through `saekit.sae.train_on_tensor` rather than an activation store.
    """
    from saekit.sae import SAESpec, get_recipe, train_on_tensor

    recipe = get_recipe(
        "olson2025", lr=lr, epochs=epochs, batch_size=batch_size, normalize_inputs=True
    )
    spec = SAESpec(arch="relu", expansion=expansion, l1=l1, recipe=recipe, seed=seed)
    return train_on_tensor(spec, acts_ND, seed=seed, device=device, progress=progress)


def evolution_table(
    evolution: Evolution,
    labels_N: Sequence[int],
    class_names: Sequence[str],
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """One row per image: its class, active patches early / late / both, persistence, new.

    `features` (early, late), as returned by `patch_maps`, adds the feature each map shows."""
    early_N = evolution.early_BHW.flatten(1).sum(1)
    late_N = evolution.late_BHW.flatten(1).sum(1)
    frame = pd.DataFrame(
        {
            "class": [class_names[int(c)] for c in labels_N],
            "early": early_N.numpy(),
            "late": late_N.numpy(),
            "both": (evolution.early_BHW & evolution.late_BHW).flatten(1).sum(1).numpy(),
            "persistence": evolution.persistence_B.numpy(),
            "new": evolution.new_B.numpy(),
        }
    )
    if features is not None:
        frame.insert(1, "early_feature", features[0].numpy())
        frame.insert(2, "late_feature", features[1].numpy())
    return frame


def plot_permutation_null(baseline: PermutationBaseline, ax: Axes | None = None) -> Axes:
    """The chance distribution of mean Jaccard (mismatched class pairings) and the matched value."""
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    sns.histplot(baseline.null, bins=30, color="0.6", ax=ax, label="mismatched pairings")
    ax.axvline(baseline.observed, color="tab:red", lw=2, label="matched classes")
    ax.axvline(baseline.expected_chance, color="k", ls="--", lw=1, label="exact chance level")
    ax.set_xlabel("mean Jaccard over classes (text set vs image set)")
    ax.set_title(f"Permutation baseline, p = {baseline.p_value:.3g}")
    ax.legend(fontsize=8)
    return ax


def plot_class_view(
    c: int,
    class_names: Sequence[str],
    text_CS: np.ndarray,
    image_CS: np.ndarray,
    images: Sequence[Image.Image],
    evolution: Evolution,
    indices: Sequence[int],
    names: tuple[str, str] = ("projector", "layer 6"),
) -> Figure:
    """One class at a glance: its text and image top sets (a Fig. 6 strip) above the Fig. 7
    panels of its images `indices` (positions in `images` and `evolution`)."""
    strip, row = 2.4, 3.0  # inches: the strip needs room for its rotated feature labels
    fig = plt.figure(figsize=(9, strip + row * len(indices)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[strip, row * len(indices)])
    ax = top.subplots()
    frame = overlap_heatmap_frame(text_CS[[c]], image_CS[[c]], [class_names[c]])
    if frame.shape[1]:
        plot_overlap_heatmap(frame, ax=ax)
        ax.set_yticklabels(["text", "image"], rotation=0)  # the title names the class
    else:
        ax.text(0.5, 0.5, "no active features in either modality", ha="center", va="center")
        ax.axis("off")
    shared = int(overlap_size(text_CS[[c]], image_CS[[c]])[0])
    ax.set_title(
        f"{class_names[c]}: {shared} shared top features, "
        f"Jaccard {jaccard(text_CS[[c]], image_CS[[c]])[0]:.2f}"
    )
    axes = np.atleast_2d(bottom.subplots(len(indices), 3))
    for row, index in zip(axes, indices, strict=True):
        plot_evolution(images[index], evolution, index, names, axes=row)
    return fig
