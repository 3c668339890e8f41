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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
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


def llama_tokenizer(texts: Sequence[str], vocab_size: int) -> LlamaTokenizer:
    """Train a byte-fallback BPE like Llama's on `texts` and wrap it in the real `LlamaTokenizer`
    class, with LLaVA's image token added."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False
    )
    bpe.train_from_iterator(list(texts), trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = LlamaTokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        pad_token="<pad>",
        add_bos_token=True,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def llava_processor(
    tokenizer: LlamaTokenizer, image_processor: CLIPImageProcessorPil, patch_size: int
) -> LlavaProcessor:
    """LLaVA-1.5's processor: one placeholder per patch, the tower's CLS token dropped."""
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the tower's CLS token, which "default" then drops
        chat_template=CHAT_TEMPLATE,
    )


def llava_config(
    tokenizer: LlamaTokenizer,
    vision_config: transformers.PretrainedConfig | dict,
    width: int,
    layers: int,
    heads: int,
    max_positions: int,
) -> LlavaConfig:
    """LLaVA-1.5's wiring (second-to-last vision layer, CLS dropped, two-layer GELU projector)
    of `vision_config` under a Llama `width` wide and `layers` deep over `tokenizer`."""
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


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

    tokenizer = llama_tokenizer(_CORPUS + [" ".join(extra_words)], cfg.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    processor = llava_processor(tokenizer, image_processor, cfg.patch_size)
    vision_config = clip_vision_config(
        cfg.vision_width,
        cfg.vision_layers,
        heads=2,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    config = llava_config(
        tokenizer, vision_config, cfg.text_width, cfg.text_layers, cfg.text_heads, 512
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- hub-shaped


def build_hub_llava(path: Path, seed: int = 0) -> None:
    """Hub-shaped llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (24 layers, 576 patches) under a 32-layer
    Llama, the two-layer GELU projector, LLaVA-1.5's chat template."""
    from saekit.mini.toyworld import CLASS_NAMES

    config = MiniLlavaConfig(image_size=336, patch_size=14, vision_layers=24, text_layers=32)
    build_mini_llava(path, seed=seed, config=config, extra_words=CLASS_NAMES)


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's chat format (system turn first, images as vision_start/image_pad/vision_end).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer(texts: Sequence[str]) -> transformers.PreTrainedTokenizerBase:
    """A byte-level BPE like Qwen2's, trained on `texts`, in the real `Qwen2Tokenizer` class."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = transformers.Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    return tokenizer


def build_hub_qwen25_vl(path: Path, seed: int = 0) -> None:
    """Hub-shaped Qwen/Qwen2.5-VL-7B-Instruct (the describer): a 32-block windowed ViT (patch 14, 2x2
    merge, temporal patch 2) under a 28-layer Qwen2 decoder with multimodal RoPE.

    The processor's files are written one by one: building a `Qwen2_5_VLProcessor` object
    needs torchvision (for its video processor), which loading it needs too."""
    from saekit.mini.diffusion import CLIP_MEAN, CLIP_STD, mini_prompts, mini_vocabulary

    tokenizer = _qwen_tokenizer(
        mini_prompts() + mini_vocabulary() + ["Answer with the most important keywords."]
    )
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=28,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            # head width 8: its 4 rotary frequencies split over (time, height, width)
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=32,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        **ids,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.Qwen2VLImageProcessorPil(
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(path)
    preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    preprocessor |= {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (path / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n"
    )
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
