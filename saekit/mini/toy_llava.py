"""Train a toy LLaVA on the toy world: the toy ViT sees, a small Llama captions.

Run from the repository root (single-threaded on purpose, like every toy model here)::

    python -m saekit.mini.toy_llava            # writes saekit/mini/assets/toy_llava/

The result is a real `LlavaForConditionalGeneration` saved with ``save_pretrained``, with a
`LlavaProcessor` and LLaVA-1.5's chat template, so chapter 07 loads it through
`saekit.analysis.multimodal.load_llava` exactly as it loads ``llava-hf/llava-1.5-7b-hf``:

* vision tower: the shipped toy ViT (``saekit/mini/assets/toyvit``), frozen; LLaVA reads its
  second-to-last layer and drops the CLS token, as LLaVA-1.5 does with CLIP;
* projector: LLaVA-1.5's two-layer GELU MLP, trained;
* language model: a small Llama with a byte-fallback BPE tokenizer trained on the captions,
  trained from scratch.

It is taught two things, in the two forms chapter 07 asks: "Describe this image." with a toy
image is answered by the image's caption ("a coarse dotted green fish"), and "What is a
{class}?" without an image by the same caption of the class ("What is a great white shark?"
"a coarse dotted green fish"). Only the answer tokens carry the loss. ``training.json`` records how often the
greedy answers on held-out images (the world's val split) name the true shape family, style
and frequency, and how often the text answers define each class right.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    LlamaTokenizer,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    ViTConfig,
    ViTForImageClassification,
)

from saekit.mini import toy_eval, toy_judge
from saekit.mini.llava import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    llama_tokenizer,
    llava_config,
    llava_processor,
)
from saekit.mini.toyworld import CLASS_NAMES, N_CLASSES, toyvit_path
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

DEFAULT_OUT = toy_judge.ASSETS / "toy_llava"
IMAGE_PROMPT = "Describe this image."
"""The question asked with an image (chapter 07's `AnswerConfig.image_prompt`)."""
TEXT_PROMPT = "What is a {name}?"
"""The question asked about a class without an image (chapter 07's text prompt)."""


@dataclass
class LlavaTrainConfig:
    """Everything that determines the shipped toy LLaVA."""

    seed: int = 0
    """Seeds the toy world, the weight init and the batch order."""
    n_train: int = 3000
    """Training images (the toy world's train split, 48 pixels as the toy ViT sees them)."""
    text_width: int = 64
    """Hidden width D of the Llama (and of the projector's output)."""
    text_layers: int = 4
    """Llama decoder blocks."""
    text_heads: int = 4
    """Attention heads per block."""
    vocab_size: int = 800
    """Largest BPE vocabulary (special and byte tokens included); the corpus runs out of merges
    before it, so every prompt and caption word is one token."""
    steps: int = 400
    """Optimiser steps."""
    batch_size: int = 32
    """Examples per step."""
    text_share: float = 0.25
    """Share of each batch that is a text-only question about a class."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay after warm-up)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    n_eval: int = 300
    """Held-out images (val split) captioned when scoring."""
    out: str = str(DEFAULT_OUT)
    """Folder the model is written to."""


def definition(label: int) -> str:
    """The taught answer to "What is a {class}?": the class's caption, the same words an image
    of it is described with (so the two modalities share their answer by construction)."""
    return cap.canonical_caption(label)


def build_tokenizer(vocab_size: int) -> LlamaTokenizer:
    """A byte-fallback BPE like Llama's, trained on the prompts and answers, in `LlamaTokenizer`."""
    corpus = [
        CHAT_TEMPLATE,
        "USER: ASSISTANT:",
        IMAGE_PROMPT,
        *(TEXT_PROMPT.format(name=name) for name in CLASS_NAMES),
        *(definition(c) for c in range(N_CLASSES)),
        *cap.prompt_corpus(300, seed=0),
    ]
    return llama_tokenizer(corpus, vocab_size)


def build_processor(tokenizer: LlamaTokenizer, vit_config: ViTConfig) -> LlavaProcessor:
    """LLaVA-1.5's processor around the toy ViT's geometry and normalisation."""
    size = vit_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return llava_processor(tokenizer, image_processor, vit_config.patch_size)


def build_model(cfg: LlavaTrainConfig, tokenizer: LlamaTokenizer) -> LlavaForConditionalGeneration:
    """LLaVA around the shipped toy ViT (weights loaded) and a fresh Llama."""
    vit = ViTForImageClassification.from_pretrained(toyvit_path())
    vision_config = vit.config.to_dict()
    for key in ("id2label", "label2id", "architectures"):
        vision_config.pop(key, None)
    config = llava_config(
        tokenizer, vision_config, cfg.text_width, cfg.text_layers, cfg.text_heads, 128
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    tower = model.model.vision_tower
    missing, unexpected = tower.load_state_dict(vit.vit.state_dict(), strict=False)
    # ViTModel from a config carries a pooler that LLaVA never reads; nothing else may be new.
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"toy ViT weights do not fit the tower: {missing=} {unexpected=}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def prompt_text(processor: LlavaProcessor, question: str, with_image: bool) -> str:
    """One user turn through the chat template, ready for the answer (as chapter 07 asks)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )


def _example(processor: LlavaProcessor, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + EOS (the image expanded to its placeholders) and the
    prompt's length; the answer is tokenized alone, as greedy decoding writes it."""
    tokenizer = processor.tokenizer
    expanded = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens(processor))
    prompt_ids = tokenizer(expanded)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)


def image_tokens(processor: LlavaProcessor) -> int:
    """Placeholders one image expands to: one per patch (the CLS token is dropped)."""
    crop = processor.image_processor.crop_size
    return (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)


def _batch(examples: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels (-100 outside the answers)."""
    length = max(len(ids) for ids, _ in examples)
    ids_BT = torch.full((len(examples), length), pad)
    mask_BT = torch.zeros((len(examples), length), dtype=torch.long)
    labels_BT = torch.full((len(examples), length), -100)
    for b, (ids, start) in enumerate(examples):
        ids_BT[b, : len(ids)] = torch.tensor(ids)
        mask_BT[b, : len(ids)] = 1
        labels_BT[b, start : len(ids)] = torch.tensor(ids[start:])
    return ids_BT, mask_BT, labels_BT


@torch.inference_mode()
def vision_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """What LLaVA hands the projector, [N, P, D_vision]: the tower's feature layer, CLS dropped.

    The tower is frozen, so training computes this once per image."""
    chunks = []
    for s in range(0, len(pixels), 256):
        out = model.model.vision_tower(pixels[s : s + 256], output_hidden_states=True)
        chunks.append(out.hidden_states[model.config.vision_feature_layer][:, 1:])
    return torch.cat(chunks)


def _forward_loss(model, ids_BT, mask_BT, labels_BT, feats_BPD: torch.Tensor | None):
    """LLaVA's forward on precomputed tower features: the projected patches replace the image
    placeholders (`LlavaModel.forward`'s masked scatter), then the language model and head."""
    embeds_BTD = model.get_input_embeddings()(ids_BT)
    if feats_BPD is not None:
        image_BPD = model.model.multi_modal_projector(feats_BPD)
        slots = (ids_BT == model.config.image_token_id)[..., None].expand_as(embeds_BTD)
        embeds_BTD = embeds_BTD.masked_scatter(slots, image_BPD.to(embeds_BTD.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds_BTD, attention_mask=mask_BT)
    logits = model.lm_head(hidden.last_hidden_state)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels_BT[:, 1:].flatten(), ignore_index=-100
    )


def train(cfg: LlavaTrainConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, float]:
    """Train the projector and the Llama; returns the model, its processor and the seconds."""
    torch.set_num_threads(1)
    started = time.time()
    tokenizer = build_tokenizer(cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    processor = build_processor(tokenizer, model.config.vision_config)
    world = ToyWorld(cfg.seed, model.config.vision_config.image_size)
    images, _, labels = world.sample_arrays(cfg.n_train, "train")
    feats_NPD = vision_features(model.eval(), to_pixels(images))
    image_prompt = prompt_text(processor, IMAGE_PROMPT, with_image=True)
    captions = [
        _example(processor, image_prompt, cap.canonical_caption(c)) for c in range(N_CLASSES)
    ]
    definitions = [
        _example(
            processor, prompt_text(processor, TEXT_PROMPT.format(name=n), False), definition(c)
        )
        for c, n in enumerate(CLASS_NAMES)
    ]

    model.model.vision_tower.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    n_text = round(cfg.batch_size * cfg.text_share)
    n_image = cfg.batch_size - n_text
    pad = tokenizer.pad_token_id

    def loss_at(step: int) -> torch.Tensor:
        batch = torch.randint(cfg.n_train, (n_image,), generator=generator)
        loss = _forward_loss(
            model, *_batch([captions[int(labels[i])] for i in batch], pad), feats_NPD[batch]
        )
        if n_text:
            classes = torch.randint(N_CLASSES, (n_text,), generator=generator)
            text_loss = _forward_loss(
                model, *_batch([definitions[int(c)] for c in classes], pad), None
            )
            loss = (n_image * loss + n_text * text_loss) / cfg.batch_size
        return loss

    model.train()
    train_steps(
        [p for p in model.parameters() if p.requires_grad],
        loss_at,
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=0.01,
        desc="train toy LLaVA",
        clip_norm=1.0,
    )
    model.eval()
    return model, processor, time.time() - started


@torch.inference_mode()
def answer(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    questions: list[str],
    images: list[Image.Image] | None = None,
    max_new_tokens: int = 12,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers through the processor and `generate`, the way chapter 07 asks."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = []
    try:
        for s in range(0, len(questions), batch_size):
            batch = {"text": questions[s : s + batch_size]}
            if images is not None:
                batch["images"] = images[s : s + batch_size]
            inputs = processor(**batch, return_tensors="pt", padding=True)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [t.strip() for t in texts]


def evaluate(model, processor, cfg: LlavaTrainConfig) -> dict:
    """Caption accuracy on held-out images, and the text answers' accuracy per class."""
    size = model.config.vision_config.image_size
    world = ToyWorld(cfg.seed, size)
    val = world.sample(cfg.n_eval, "val")
    prompt = prompt_text(processor, IMAGE_PROMPT, with_image=True)
    texts = answer(model, processor, [prompt] * len(val), [t.image for t in val])
    labels = [t.label for t in val]
    results = {"val_captions": toy_eval.score_captions(texts, labels)}
    results["val_captions"]["exact"] = float(
        np.mean([t == cap.canonical_caption(c) for t, c in zip(texts, labels, strict=True)])
    )
    questions = [prompt_text(processor, TEXT_PROMPT.format(name=n), False) for n in CLASS_NAMES]
    definitions = answer(model, processor, questions)
    results["text_definitions"] = toy_eval.score_captions(definitions, list(range(N_CLASSES)))
    results["examples"] = {
        "image": [
            {"class": CLASS_NAMES[c], "answer": t}
            for t, c in zip(texts[:5], labels[:5], strict=True)
        ],
        "text": [{"class": CLASS_NAMES[c], "answer": definitions[c]} for c in range(0, 30, 6)],
    }
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(LlavaTrainConfig, argv, __doc__.split("\n\n")[0])
    model, processor, seconds = train(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    results = evaluate(model, processor, cfg)
    record = {
        "command": command_line("saekit.mini.toy_llava", cfg),
        "config": dataclasses.asdict(cfg) | {"out": out.name},
        "vision_tower": "saekit/mini/assets/toyvit (frozen; LLaVA reads hidden_states[-2], CLS dropped)",
        "results": results,
        "notes": (
            "val_captions: greedy answers to 'Describe this image.' on the first n_eval val "
            "images; a factor is right when the answer names the image's true value (chance "
            "1/5 for group and style, 1/3 for frequency), 'exact' when the answer is the "
            "canonical caption. text_definitions: answers to 'What is a {class}?' scored the "
            "same way against the class."
        ),
        "train_seconds": round(seconds, 1),
        "versions": versions(),
    }
    write_record(out, record)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
