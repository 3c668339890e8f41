"""Steering Stable Diffusion with SAE features of its text encoder (paper 003, §4.1, App. B).

The stages, left to right:

1. `text_token_activations`: every token position of every prompt, taken at one layer of the
   pipeline's text encoder, becomes an independent row `acts_ND`, with a table saying which
   prompt, position, token and word each row came from.
2. an SAE on those rows, trained once and cached by `saekit.sae.train_or_load`.
3. `steer_embeddings` / `generate`: move the prompt's token embeddings along one SAE feature and
   hand them to the denoiser through diffusers' `prompt_embeds`; with classifier-free guidance
   the negative embedding is moved the other way. `steer_sweep` runs features x strengths,
   and `steering_effect` measures the pixel change (chapter 06 draws Fig. 5 from them).

Naming the features and checking the names with CLIP (§4.2, Table 3) is `saekit.analysis.attributes`.

The SAE's activation space is what the denoiser is conditioned on: `layer=-2` is the
penultimate hidden state as diffusers feeds it with `clip_skip=1` (through CLIP's final layer
norm; SD 3 uses it by default), and both the steered and the unsteered images are generated from
that same layer, so an SAE trained on `text_token_activations(pipe, ..., layer)` is steered with
the same `layer`. SD 1.x's own default conditions on the last layer (`layer=-1`).
Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`) and SD 3.x (`StableDiffusion3Pipeline`,
three text encoders, Appendix B) are supported; for SD 3 the rows are positions of the joint
CLIP+T5 sequence and the pooled CLIP vector is left unsteered.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from PIL.Image import Image
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from sae_lens import SAE
    from transformers import CLIPModel, CLIPProcessor

PAPER_PIPELINE = "CompVis/stable-diffusion-v1-4"
PAPER_CLIP = "openai/clip-vit-base-patch32"
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusion3Pipeline")
SteerMode = Literal["add", "amplify"]


# --------------------------------------------------------------------------- loading


def offline_error(kind: str, id_or_path: str, err: Exception) -> RuntimeError:
    """The error for a model that could not be loaded: where to get it when offline."""
    return RuntimeError(
        f"Could not load {kind} {id_or_path!r}: {err}\n"
        "Pass a local folder saved with save_pretrained (saekit.mini.diffusion builds the mini "
        "profile's), or, where the Hugging Face Hub cannot be reached, download the model on a "
        f"machine with internet (`huggingface-cli download {id_or_path}`) and copy its HF cache "
        "(HF_HOME) here."
    )


def load_pipeline(
    id_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
) -> DiffusionPipeline:
    """Load a Stable Diffusion 1.x/2.x or 3.x pipeline (no safety checker) from a hub id or folder.

    `CompVis/stable-diffusion-v1-4` (the paper's model) and a folder from
    `saekit.mini.diffusion.build_mini_sd` go through the same call.
    """
    from diffusers import DiffusionPipeline

    source = str(id_or_path)
    try:
        class_name = DiffusionPipeline.load_config(source, local_files_only=local_files_only)[
            "_class_name"
        ]
    except (OSError, ValueError) as err:
        raise offline_error("pipeline", source, err) from err
    if class_name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{source!r} is a {class_name}; steering supports {', '.join(SUPPORTED_PIPELINES)}."
        )
    # Only SD 1.x/2.x ship a safety checker; we want raw images, as the paper shows.
    is_sd1 = class_name == "StableDiffusionPipeline"
    extra = {"safety_checker": None, "requires_safety_checker": False} if is_sd1 else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source, dtype=dtype, local_files_only=local_files_only, **extra
        )
    except OSError as err:
        raise offline_error("pipeline", source, err) from err
    pipe.set_progress_bar_config(disable=True)  # our own loops show the progress
    return pipe.to(device)


def load_clip(
    id_or_path: str | Path, *, device: str | torch.device = "cpu", local_files_only: bool = False
) -> tuple[CLIPModel, CLIPProcessor]:
    """Load a `CLIPModel` and its `CLIPProcessor` (validation and the zero-shot describer)."""
    from transformers import CLIPModel, CLIPProcessor

    source = str(id_or_path)
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local_files_only)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise offline_error("CLIP model", source, err) from err
    return model.to(device).eval(), processor


def load_prompts(path: str | Path) -> list[str]:
    """Read a prompt file: one prompt per line; blank lines and `#` comments are skipped."""
    if not str(path) or not Path(path).is_file():
        raise FileNotFoundError(
            f"No prompt file at {str(path)!r}. Pass a text file with one prompt per line (the "
            "paper used Midjourney Prompts for steering and MS-COCO captions for finding "
            "descriptive features); saekit.mini.diffusion.mini_prompt_file() is the mini corpus."
        )
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one prompt per line.")
    return prompts


# --------------------------------------------------------------------------- text activations


@dataclass
class PromptEmbeds:
    """The conditioning a pipeline's denoiser reads for a batch of prompts."""

    tokens_BTD: torch.Tensor
    """Per-token embeddings passed as `prompt_embeds` (T positions of width D)."""
    pooled_BE: torch.Tensor | None = None
    """SD 3's pooled CLIP vector (`pooled_prompt_embeds`); None for SD 1.x/2.x."""


def _is_sd3(pipe: DiffusionPipeline) -> bool:
    return type(pipe).__name__.startswith("StableDiffusion3")


def _hidden_index(pipe: DiffusionPipeline, layer: int) -> int:
    """Validate `layer` (-1 last, -2 penultimate, 0 embeddings) and return it as a non-negative index."""
    n_layers = pipe.text_encoder.config.num_hidden_layers
    index = layer if layer >= 0 else n_layers + 1 + layer
    # SD 3 reads hidden_states[-(clip_skip + 2)], so its last usable layer is the penultimate.
    top = n_layers - 1 if _is_sd3(pipe) else n_layers
    if not 0 <= index <= top:
        raise ValueError(
            f"layer={layer} is outside this text encoder's {n_layers} layers; use an index into "
            f"its hidden states between {-(n_layers + 1)} and {top - n_layers - 1} (-2 = penultimate)."
        )
    return index


@torch.inference_mode()
def encode_prompts(
    pipe: DiffusionPipeline, prompts: Sequence[str], layer: int = -2, max_sequence_length: int = 256
) -> PromptEmbeds:
    """Text-encoder output at `layer` for `prompts`, in the form the pipeline's denoiser reads.

    SD 3 goes through the pipeline's own `encode_prompt` (`clip_skip`); `max_sequence_length`
    is its T5 length. For SD 1.x/2.x we tokenise and run the encoder ourselves: diffusers'
    `clip_skip` path reaches for `text_encoder.text_model`, which transformers 5's
    `CLIPTextModel` no longer has. As in diffusers, a hidden state below the last goes through
    CLIP's final layer norm, so `layer=-1` reproduces `pipe(prompt=...)` exactly.
    """
    prompts = list(prompts)
    device = pipe._execution_device
    index = _hidden_index(pipe, layer)
    if _is_sd3(pipe):
        skip = pipe.text_encoder.config.num_hidden_layers - 1 - index
        tokens, _, pooled, _ = pipe.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            clip_skip=skip or None,
            max_sequence_length=max_sequence_length,
        )
        return PromptEmbeds(tokens, pooled)
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    enc = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = (
        enc.attention_mask.to(device)
        if getattr(encoder.config, "use_attention_mask", False)
        else None
    )
    out = encoder(enc.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    if index == encoder.config.num_hidden_layers:
        tokens = out.last_hidden_state
    else:
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        tokens = final_norm(out.hidden_states[index])
    return PromptEmbeds(tokens.to(encoder.dtype))


def _token_segments(pipe: DiffusionPipeline, max_sequence_length: int) -> list[tuple[object, int]]:
    """(tokenizer, length) for each run of positions in the embedding sequence, in order."""
    segments = [(pipe.tokenizer, pipe.tokenizer.model_max_length)]
    if _is_sd3(pipe):
        segments.append((pipe.tokenizer_3, max_sequence_length))
    return segments


def text_token_activations(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    layer: int = -2,
    batch_size: int = 32,
    *,
    include_padding: bool = False,
    max_sequence_length: int = 256,
) -> tuple[torch.Tensor, pd.DataFrame]:
    """Token-level text-encoder activations: every position of every prompt is one row.

    Returns `acts_ND` (float32, CPU) and `token_info`, one row per activation row with columns
    `prompt` (index into `prompts`), `position`, `token_id`, `token` and `word` (the lower-cased
    word the token belongs to; "" for special and padding tokens). Padding positions are
    left out unless `include_padding`, since they repeat the end-of-text token and would swamp
    the corpus (the denoiser still sees them, and steering moves them too).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt.")
    acts_ND, info = [], []
    segments = _token_segments(pipe, max_sequence_length)
    for start in tqdm(range(0, len(prompts), batch_size), desc="text activations"):
        batch = prompts[start : start + batch_size]
        tokens_BTD = encode_prompts(pipe, batch, layer, max_sequence_length).tokens_BTD
        encodings = [
            tok(batch, padding="max_length", max_length=length, truncation=True)
            for tok, length in segments
        ]
        rows_B, rows_T = [], []
        for b, prompt in enumerate(batch):
            offset = 0
            for (tokenizer, length), enc in zip(segments, encodings, strict=True):
                mask, ids, word_ids = enc["attention_mask"][b], enc["input_ids"][b], enc.word_ids(b)
                names = tokenizer.convert_ids_to_tokens(ids)
                for t in range(length):
                    if not (mask[t] or include_padding):
                        continue
                    word = ""
                    if word_ids[t] is not None and mask[t]:
                        span = enc.word_to_chars(b, word_ids[t])
                        word = prompt[span.start : span.end].lower()
                        # T5 splits on spaces only, so "man," is one word; the lexicon wants "man".
                        word = word.strip(string.punctuation) or word
                    info.append((start + b, offset + t, ids[t], names[t], word))
                    rows_B.append(b)
                    rows_T.append(offset + t)
                offset += length
        acts_ND.append(tokens_BTD[rows_B, rows_T].float().cpu())
    columns = ["prompt", "position", "token_id", "token", "word"]
    return torch.cat(acts_ND), pd.DataFrame(info, columns=columns)


# --------------------------------------------------------------------------- steering


def feature_direction(sae: SAE, feature: int) -> torch.Tensor:
    """Unit-norm decoder direction of SAE feature `feature` ([D])."""
    if not 0 <= feature < sae.cfg.d_sae:
        raise IndexError(
            f"feature {feature} does not exist; this SAE has {sae.cfg.d_sae} features."
        )
    direction_D = sae.W_dec[feature].detach()
    return direction_D / direction_D.norm()


@torch.inference_mode()
def steer_embeddings(
    prompt_embeds_BTD: torch.Tensor,
    sae: SAE,
    feature: int,
    strength: float,
    mode: SteerMode = "add",
) -> torch.Tensor:
    """Move every token embedding along SAE feature `feature`.

    `add`: add `strength` times the feature's unit decoder direction, so each token moves by
    exactly `strength` along it. `amplify`: scale the feature's activation by `1 + strength`
    and decode, keeping the SAE's reconstruction error, i.e. `x + decode(c') - decode(c)`;
    tokens where the feature is silent do not move. `strength = 0` returns the input bit for bit.
    """
    if prompt_embeds_BTD.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"embeddings have width {prompt_embeds_BTD.shape[-1]} but the SAE expects "
            f"{sae.cfg.d_in}; train the SAE on this pipeline's text encoder at the same layer."
        )
    direction_D = feature_direction(sae, feature)
    if mode == "add":
        shift_BTD = strength * direction_D.to(prompt_embeds_BTD)
    elif mode == "amplify":
        x_BTD = prompt_embeds_BTD.to(direction_D)
        codes_BTS = sae.encode(x_BTD)
        steered_BTS = codes_BTS.clone()
        steered_BTS[..., feature] *= 1 + strength
        # Subtracting two decodes (not adding the error term to one) keeps strength 0 exact.
        shift_BTD = (sae.decode(steered_BTS) - sae.decode(codes_BTS)).to(prompt_embeds_BTD)
    else:
        raise ValueError(f"mode must be 'add' or 'amplify', not {mode!r}.")
    return prompt_embeds_BTD + shift_BTD


@dataclass
class GenerationConfig:
    """How `generate` runs the pipeline."""

    layer: int = -2
    """Text-encoder hidden state to steer; must be the layer the SAE was trained on."""
    mode: SteerMode = "add"
    """`add` a decoder direction or `amplify` the feature's activation (see `steer_embeddings`)."""
    num_inference_steps: int = 50
    """Denoising steps (the mini profile uses 2)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance weight; above 1 the negative embedding is steered away."""
    height: int | None = None
    """Image height in pixels; None uses the pipeline's native size."""
    width: int | None = None
    """Image width in pixels; None uses the pipeline's native size."""
    max_sequence_length: int = 256
    """T5 sequence length for SD 3 pipelines; ignored for SD 1.x/2.x."""


def generate(
    pipe: DiffusionPipeline,
    prompts: str | Sequence[str],
    sae: SAE | None = None,
    feature: int = 0,
    strength: float = 0.0,
    seed: int = 0,
    *,
    negative: str = "",
    config: GenerationConfig | None = None,
) -> list[Image]:
    """Generate one image per prompt, steered by `strength` along SAE `feature` (no SAE: unsteered).

    The prompt embedding moves by `+strength` and the negative (unconditional) embedding by
    `-strength`, so classifier-free guidance pushes towards the feature. Every image uses its
    own generator seeded with `seed`, so an image does not depend on what else is in the batch.
    """
    config = config or GenerationConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)

    def embed(texts: list[str]) -> PromptEmbeds:
        return encode_prompts(pipe, texts, config.layer, config.max_sequence_length)

    positive, negative_embeds = embed(prompts), embed([negative] * len(prompts))
    if sae is not None:
        positive.tokens_BTD = steer_embeddings(
            positive.tokens_BTD, sae, feature, strength, config.mode
        )
        negative_embeds.tokens_BTD = steer_embeddings(
            negative_embeds.tokens_BTD, sae, feature, -strength, config.mode
        )
    extra = {}
    if positive.pooled_BE is not None:
        extra = {
            "pooled_prompt_embeds": positive.pooled_BE,
            "negative_pooled_prompt_embeds": negative_embeds.pooled_BE,
            "max_sequence_length": config.max_sequence_length,
        }
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in prompts]
    return pipe(
        prompt_embeds=positive.tokens_BTD,
        negative_prompt_embeds=negative_embeds.tokens_BTD,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        height=config.height,
        width=config.width,
        generator=generators,
        **extra,
    ).images


def steer_sweep(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    sae: SAE,
    features: Sequence[int],
    strengths: Sequence[float],
    seed: int = 0,
    *,
    config: GenerationConfig | None = None,
) -> dict[int, dict[float, list[Image]]]:
    """Steered images of `prompts` for every feature at every strength: `{feature: {λ: images}}`."""
    grid = [(f, s) for f in features for s in strengths]
    out: dict[int, dict[float, list[Image]]] = {f: {} for f in features}
    for feature, strength in tqdm(grid, desc="steering sweep"):
        out[feature][strength] = generate(
            pipe, prompts, sae, feature, strength, seed, config=config
        )
    return out


def steering_effect(
    originals: Sequence[Image], sweep: Mapping[int, Mapping[float, Sequence[Image]]]
) -> pd.DataFrame:
    """Mean absolute pixel change (0-255 scale) from the originals, per feature and strength:
    a number for how far steering moved the images where the eye cannot tell."""
    base_BHWC = np.stack([np.asarray(image, dtype=np.float32) for image in originals])
    rows = []
    for feature, by_strength in sweep.items():
        for strength, images in by_strength.items():
            steered_BHWC = np.stack([np.asarray(image, dtype=np.float32) for image in images])
            change = float(np.abs(steered_BHWC - base_BHWC).mean())
            rows.append((feature, strength, change))
    table = pd.DataFrame(rows, columns=["feature", "strength", "pixel_change"])
    return table.pivot(index="feature", columns="strength", values="pixel_change")
