"""Scoring toy-world outputs against planted truth with the shipped toy ViT.

The text-to-image pipeline is scored by classifying what it draws, the toy LLaVA by reading
the factors back out of what it writes (`toyworld.captions.parse_caption`); both compare with
the factors a prompt or an image carries. The toy ViT is trained as a 30-way classifier, so its
class pick names a shape family, a style and a frequency at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import transformers

from saekit.mini.toyworld import captions as cap
from saekit.mini.toyworld import toyvit_path


def toyvit() -> tuple[transformers.ViTForImageClassification, transformers.ViTImageProcessor]:
    """The shipped toy ViT with its 30-way head, and its processor."""
    path = toyvit_path()
    model = transformers.ViTForImageClassification.from_pretrained(path).eval()
    return model, transformers.ViTImageProcessor.from_pretrained(path)


@torch.inference_mode()
def classify(images, model=None, processor=None, batch_size: int = 256) -> np.ndarray:
    """Toy-ViT class of each image (PIL images or uint8 [N, H, W, 3]); the processor resizes
    any image size to the ViT's 48 pixels."""
    if model is None or processor is None:
        model, processor = toyvit()
    images = list(images)
    preds = []
    for s in range(0, len(images), batch_size):
        pixels = processor(images=images[s : s + batch_size], return_tensors="pt").pixel_values
        preds.append(model(pixel_values=pixels).logits.argmax(-1).numpy())
    return np.concatenate(preds)


def label_factors(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """[N, 3] true factor values (group, style, frequency) of each class label."""
    return np.array([[*map(int, _astuple(cap.factors(int(label))))] for label in labels]).reshape(
        -1, len(cap.FACTORS)
    )


def text_factors(texts: Sequence[str]) -> np.ndarray:
    """[N, 3] factor values each text names (group, style, frequency), -1 where unnamed or
    named inconsistently."""
    rows = [[cap.parse_caption(t).get(f, -1) for f in cap.FACTORS] for t in texts]
    return np.array(rows, dtype=int).reshape(-1, len(cap.FACTORS))


def _astuple(f: cap.Factors) -> tuple[int, int, int]:
    return f.group, f.style, f.frequency


def factor_scores(found_N3: np.ndarray, wanted_N3: np.ndarray) -> dict[str, float]:
    """Per factor, the share of rows whose found value equals the wanted one, over the rows
    that want a value (>= 0); plus the class accuracy over rows that want all three."""
    out = {}
    for k, factor in enumerate(cap.FACTORS):
        rows = wanted_N3[:, k] >= 0
        if rows.any():
            out[f"{factor}_accuracy"] = float((found_N3[rows, k] == wanted_N3[rows, k]).mean())
    full = (wanted_N3 >= 0).all(1)
    if full.any():
        out["class_accuracy"] = float((found_N3[full] == wanted_N3[full]).all(1).mean())
    out["n"] = int(len(wanted_N3))
    return out


def score_images(images, prompts: Sequence[str], model=None, processor=None) -> dict[str, float]:
    """How often the toy ViT finds in each image the factors its prompt names."""
    found = label_factors(classify(images, model, processor))
    return factor_scores(found, text_factors(prompts))


def score_captions(texts: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """How often each text names its image's true factors (an unnamed factor counts wrong)."""
    return factor_scores(text_factors(texts), label_factors(labels))
