"""Describers: what do steered images show that the originals do not? (paper 003 §4.2c)

The paper shows a multimodal LM (Qwen2.5-VL) original and steered images and asks for keywords:
`LMMDescriber`. Where no LMM is at hand (the mini profile), `ClipDescriber` ranks a vocabulary by
how much each word's CLIP similarity rises under steering. `load_describer` picks one by name.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from PIL.Image import Image

from saekit.analysis.steering import offline_error

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor, PreTrainedModel, ProcessorMixin


class Describer(Protocol):
    """Names what differs between original and steered images (§4.2c), e.g. an LMM or CLIP."""

    def describe(self, originals: Sequence[Image], steered: Sequence[Image]) -> list[str]:
        """Keywords for what the steered images show more of, most important first."""
        ...


@torch.inference_mode()
def clip_image_embeds(
    model: CLIPModel, processor: CLIPProcessor, images: Sequence[Image]
) -> torch.Tensor:
    """Unit-norm CLIP image embeddings, [N, E], float32 on the CPU."""
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    out = model.get_image_features(pixel_values=pixels.to(model.device))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


@torch.inference_mode()
def clip_text_embeds(
    model: CLIPModel, processor: CLIPProcessor, texts: Sequence[str]
) -> torch.Tensor:
    """Unit-norm CLIP text embeddings, [N, E], float32 on the CPU."""
    enc = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    out = model.get_text_features(
        input_ids=enc["input_ids"].to(model.device),
        attention_mask=enc["attention_mask"].to(model.device),
    )
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


@dataclass
class ClipDescriber:
    """Zero-shot describer: the vocabulary words whose CLIP similarity rises most under steering.

    Stands in for the paper's Qwen2.5-VL where no LMM is available (the mini profile).
    """

    model: CLIPModel
    """A transformers `CLIPModel`."""
    processor: CLIPProcessor
    """Its `CLIPProcessor`."""
    vocabulary: Sequence[str]
    """Candidate attribute words or phrases."""
    top_k: int = 3
    """How many keywords to return."""
    _vocab_VE: torch.Tensor | None = field(default=None, init=False, repr=False)

    def scores(self, originals: Sequence[Image], steered: Sequence[Image]) -> torch.Tensor:
        """Mean cosine similarity gain (steered minus original) for every vocabulary word ([V])."""
        if self._vocab_VE is None:
            self._vocab_VE = clip_text_embeds(self.model, self.processor, self.vocabulary)
        orig_BE = clip_image_embeds(self.model, self.processor, originals)
        steer_BE = clip_image_embeds(self.model, self.processor, steered)
        return (steer_BE @ self._vocab_VE.T).mean(0) - (orig_BE @ self._vocab_VE.T).mean(0)

    def describe(self, originals: Sequence[Image], steered: Sequence[Image]) -> list[str]:
        order = self.scores(originals, steered).argsort(descending=True)[: self.top_k]
        return [self.vocabulary[i] for i in order.tolist()]


LMM_INSTRUCTION = (
    "The first {k} images were generated from some prompts; the last {k} from the same prompts "
    "with one hidden change. Answer with the most important keywords, comma-separated, that "
    "describe what the last {k} images show and the first {k} do not."
)


def parse_keywords(text: str) -> list[str]:
    """Split an LMM's answer into lower-case keywords: commas, semicolons or lines separate them,
    and list bullets, numbering, a leading "keywords:" and trailing punctuation are dropped."""
    keywords = []
    for part in re.split(r"[,;\n]", text.lower()):
        part = re.sub(r"^\s*(keywords?\s*:|[-*\u2022]|\d+[.)])\s*", "", part)
        part = part.strip(" \t" + string.punctuation)
        if any(c.isalnum() for c in part) and part not in keywords:
            keywords.append(part)
    return keywords


@dataclass
class LMMDescriber:
    """The paper's describer: a multimodal LM (Qwen2.5-VL there) shown originals then steered
    images in one chat turn and asked for keywords. Works with any transformers image-text-to-
    text model whose processor has a chat template (Qwen2.5-VL, LLaVA)."""

    model: PreTrainedModel
    """A transformers image-text-to-text model (`AutoModelForImageTextToText`)."""
    processor: ProcessorMixin
    """Its processor, with a chat template that accepts several `{"type": "image"}` parts."""
    instruction: str = LMM_INSTRUCTION
    """The question; `{k}` becomes the number of image pairs."""
    max_new_tokens: int = 32
    """Length limit of the answer (greedy decoding)."""
    last_answer: str = field(default="", init=False)
    """The raw text of the most recent answer, for inspection."""

    @torch.inference_mode()
    def describe(self, originals: Sequence[Image], steered: Sequence[Image]) -> list[str]:
        images = [*originals, *steered]
        content = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": self.instruction.format(k=len(originals))})
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = self.processor(images=images, text=[prompt], return_tensors="pt").to(
            self.model.device
        )
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answer_ids = out[:, inputs["input_ids"].shape[1] :]
        self.last_answer = self.processor.batch_decode(answer_ids, skip_special_tokens=True)[0]
        return parse_keywords(self.last_answer)


def load_lmm(
    id_or_path: str | Path, *, device: str | torch.device = "cpu", local_files_only: bool = False
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load an image-text-to-text model and processor (e.g. `Qwen/Qwen2.5-VL-7B-Instruct`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = str(id_or_path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, local_files_only=local_files_only
        )
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise offline_error("multimodal LM", source, err) from err
    return model.to(device).eval(), processor


def load_describer(
    name: str,
    clip_model: CLIPModel | None = None,
    clip_processor: CLIPProcessor | None = None,
    vocabulary: Sequence[str] = (),
    *,
    top_k: int = 3,
    device: str | torch.device = "cpu",
) -> Describer:
    """`"clip"`: a `ClipDescriber` over `vocabulary` with the given CLIP model; anything else is
    an image-text-to-text model's hub id or folder, loaded as an `LMMDescriber`."""
    if name == "clip":
        if clip_model is None or clip_processor is None or not vocabulary:
            raise ValueError(
                "the CLIP describer needs clip_model, clip_processor and a non-empty vocabulary "
                "of candidate attribute words."
            )
        return ClipDescriber(clip_model, clip_processor, list(vocabulary), top_k=top_k)
    return LMMDescriber(*load_lmm(name, device=device))
