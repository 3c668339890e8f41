"""A miniature LLaVA-1.5, built offline and saved so that it loads like the real one.

`build_mini_llava(path)` writes a real `transformers.LlavaForConditionalGeneration` (a tiny
Llama language model, a tiny CLIP vision tower, the two-layer GELU projector), a Llama BPE
tokenizer trained on the spot with `tokenizers`, a CLIP image processor and a
`LlavaProcessor` with a LLaVA-1.5 style chat template. Everything goes through
`save_pretrained`, so `saekit.analysis.multimodal.load_llava(path)` reads it back exactly the way it
reads `llava-hf/llava-1.5-7b-hf`: same classes, same vision-feature selection (second-to-last
vision layer, CLS dropped), same prompt format. The weights are random: the miniature exercises
the code paths, it does not describe images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from saekit.mini.miniatures import clip_vision_config

IMAGE_TOKEN = "<image>"

# The LLaVA-1.5 conversation format: "USER: <image>\n{question} ASSISTANT:". Images of a turn
# come before its text, as in the llava-hf checkpoints.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Enough English for the study's prompts and short descriptions to tokenize into whole words;
# anything else still encodes through byte fallback.
_CORPUS = [
    "USER: ASSISTANT:",
    "What is a clock? What is an apple? What is a dog?",
    "Describe this image.",
    "The image shows a small red circle on a blue background.",
    "It is a kind of object, an animal, a plant, a tool, a shape, a thing that people use.",
    "square triangle circle star stripe dot line red green blue yellow black white gray",
    "large small dark light left right top bottom center with and of in on the a an",
]


@dataclass
class MiniLlavaConfig:
    """Sizes of the miniature; the defaults generate a few tokens in milliseconds on one CPU core."""

    image_size: int = 48
    """Side of the square input image in pixels (the processor resizes and crops to it)."""
    patch_size: int = 8
    """Vision patch side in pixels; the patch grid is (image_size // patch_size) squared."""
    vision_width: int = 32
    """Hidden width of the CLIP vision tower."""
    vision_layers: int = 2
    """Vision transformer blocks; LLaVA reads the second-to-last hidden state."""
    text_width: int = 64
    """Hidden width D of the Llama language model (and of the projector output)."""
    text_layers: int = 4
    """Llama decoder blocks."""
    text_heads: int = 4
    """Attention heads of the language model."""
    vocab_size: int = 400
    """Target size of the trained BPE vocabulary (special and byte tokens included)."""


def _train_tokenizer(vocab_size: int, extra_words: list[str]) -> LlamaTokenizer:
    """Train a byte-fallback BPE like Llama's and wrap it in the real `LlamaTokenizer` class."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False
    )
    bpe.train_from_iterator(_CORPUS + [" ".join(extra_words)], trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = LlamaTokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        pad_token="<pad>",
        add_bos_token=True,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def build_mini_llava(
    path: str | Path,
    seed: int = 0,
    config: MiniLlavaConfig | None = None,
    extra_words: list[str] | tuple[str, ...] = (),
) -> Path:
    """Save a miniature LLaVA-1.5 (model, tokenizer, processor) to `path` and return the path.

    `extra_words` (e.g. the class names of a toy world) join the tokenizer's training text so
    that they become whole tokens. Same `seed` and arguments give identical weights.
    """
    cfg = config or MiniLlavaConfig()
    if cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}; "
            "pick sizes that tile the image exactly."
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(cfg.vocab_size, list(extra_words))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" then drops
        chat_template=CHAT_TEMPLATE,
    )

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=2 * cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = clip_vision_config(
        cfg.vision_width,
        cfg.vision_layers,
        heads=2,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    llava_config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
