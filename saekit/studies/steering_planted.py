"""Chapter 06's planted-truth check: does a text-SAE feature that fires on a factor word steer
that factor in the images?

The mini profile's pipeline is trained on the toy world, whose captions name planted factors
(shape family "fish", colour "red" and texture "striped" of a style, pattern frequency
"coarse"; `saekit.mini.toyworld.captions`). An SAE feature whose strongest tokens are mostly
one such word has a known meaning, and the toy ViT (trained on the world, never on generated
images) reads the factor back out of any image. So each such feature is steered on prompts
that do not already ask for its value, and the share of images showing that value is compared
with two controls at the same λ: a random unit direction, and a random other SAE feature.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL.Image import Image

from saekit.analysis.steering import GenerationConfig, encode_prompts, feature_direction
from saekit.mini import toy_eval
from saekit.mini.toyworld import captions as cap
from saekit.studies.steering import steering_grid

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from matplotlib.figure import Figure
    from sae_lens import SAE

_VALUE_WORDS = {
    "group": cap.GROUP_WORDS,
    "style": tuple(f"{c}/{t}" for c, t in zip(cap.COLOR_WORDS, cap.TEXTURE_WORDS, strict=True)),
    "frequency": cap.FREQUENCY_WORDS,
}
"""How each factor value is named in the tables ("red/striped" for a style)."""


RENDERED_FACTORS = ("group", "style")
"""Factors the toy pipeline draws well above chance (its ``training.json``); it does not render
the pattern frequency, so a frequency feature has nothing to move."""


def planted_features(
    descriptive: pd.DataFrame,
    min_purity: float = 0.6,
    per_value: int = 1,
    factors: Sequence[str] = RENDERED_FACTORS,
) -> pd.DataFrame:
    """Features whose strongest tokens mostly name one planted factor value.

    `descriptive` is `saekit.analysis.attributes.descriptive_features`' table (its `top_words`
    and `n_active`). A feature's *purity* is the share of its top tokens whose word names its
    most named (factor, value); features of `factors` at or above `min_purity` are kept, the
    `per_value` most active per value. Columns: feature, word (its most frequent naming word),
    factor, value, value_name, purity, n_active.
    """
    rows = []
    for feature, words, n_active in descriptive[["feature", "top_words", "n_active"]].itertuples(
        index=False
    ):
        named = [(w, cap.factor_of_word(w)) for w in words]
        named = [(w, hit) for w, hit in named if hit is not None]
        if not words or not named or n_active == 0:
            continue
        (factor, value), count = Counter(hit for _, hit in named).most_common(1)[0]
        word = Counter(w for w, hit in named if hit == (factor, value)).most_common(1)[0][0]
        rows.append(
            (
                feature,
                word,
                factor,
                value,
                _VALUE_WORDS[factor][value],
                count / len(words),
                n_active,
            )
        )
    columns = ["feature", "word", "factor", "value", "value_name", "purity", "n_active"]
    table = pd.DataFrame(rows, columns=columns)
    table = table[(table.purity >= min_purity) & table.factor.isin(factors)].sort_values(
        ["factor", "value", "n_active"], ascending=[True, True, False]
    )
    return table.groupby(["factor", "value"]).head(per_value).reset_index(drop=True)


@torch.inference_mode()
def generate_along(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    direction_D: torch.Tensor,
    strength: float,
    seed: int = 0,
    *,
    config: GenerationConfig | None = None,
) -> list[Image]:
    """Images of `prompts` with every token embedding moved by `strength` along `direction_D`
    (the negative embedding the other way): `saekit.analysis.steering.generate`'s add mode for
    any direction, so a feature and a random control are steered the same way."""
    return generate_along_each(pipe, prompts, direction_D[None], strength, seed, config=config)[0]


@torch.inference_mode()
def generate_along_each(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    directions_KD: torch.Tensor,
    strength: float,
    seed: int = 0,
    *,
    config: GenerationConfig | None = None,
) -> list[list[Image]]:
    """`generate_along` for each of K directions, in one batch: K lists of images. Every image
    has its own generator seeded `seed`, so the batch does not change any image."""
    config = config or GenerationConfig()
    prompts = list(prompts)
    n_directions = len(directions_KD)
    units_KD = directions_KD / directions_KD.norm(dim=-1, keepdim=True)
    positive = encode_prompts(pipe, prompts, config.layer).tokens_BTD
    negative = encode_prompts(pipe, [""] * len(prompts), config.layer).tokens_BTD
    shift_K11D = strength * units_KD.to(positive)[:, None, None, :]
    images = pipe(
        prompt_embeds=(positive[None] + shift_K11D).flatten(0, 1),
        negative_prompt_embeds=(negative[None] - shift_K11D).flatten(0, 1),
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        height=config.height,
        width=config.width,
        generator=[
            torch.Generator("cpu").manual_seed(seed) for _ in range(n_directions * len(prompts))
        ],
    ).images
    return [images[i * len(prompts) : (i + 1) * len(prompts)] for i in range(n_directions)]


def _share(images: Sequence[Image], factor: int, value: int, classifier) -> float:
    found = toy_eval.label_factors(toy_eval.classify(images, *classifier))
    return float((found[:, factor] == value).mean())


def names_value(words: Sequence[str], factor: str, value: int) -> bool:
    """Whether any of `words` names `value` of `factor`."""
    return any(cap.factor_of_word(w) == (factor, value) for w in words)


def planted_steering(
    pipe: StableDiffusionPipeline,
    sae: SAE,
    planted: pd.DataFrame,
    descriptive: pd.DataFrame,
    prompts: Sequence[str],
    strength: float,
    *,
    seed: int = 0,
    config: GenerationConfig | None = None,
    n_controls: int = 3,
) -> pd.DataFrame:
    """Steer each planted feature and its controls; the share of images showing the value.

    For a feature naming value v of factor f, the prompts that already name v are left out;
    the rest are generated unsteered, steered along the feature, along `n_controls` random
    unit directions and along `n_controls` random other features (live features of
    `descriptive` none of whose top words names v), all at `strength`, and the toy ViT says how
    many images show v; a control's share is the mean over its draws. The draws are seeded with
    `seed`.
    """
    classifier = toy_eval.toyvit()
    named_N3 = toy_eval.text_factors(prompts)
    live = descriptive[descriptive.n_active > 0]
    rng = np.random.default_rng(seed)
    rows = []
    for row in planted.itertuples(index=False):
        k = cap.FACTORS.index(row.factor)
        kept = [p for p, named in zip(prompts, named_N3[:, k], strict=True) if named != row.value]
        pool = [
            f
            for f, words in live[["feature", "top_words"]].itertuples(index=False)
            if not names_value(words, row.factor, row.value)
        ]
        if not kept or len(pool) < n_controls:
            continue
        others = rng.choice(pool, n_controls, replace=False).tolist()
        directions_KD = torch.cat(
            [
                feature_direction(sae, row.feature)[None],
                torch.from_numpy(rng.standard_normal((n_controls, sae.cfg.d_in))).float(),
                torch.stack([feature_direction(sae, f) for f in others]),
            ]
        )
        original = generate_along(pipe, kept, directions_KD[0], 0.0, seed, config=config)
        steered = generate_along_each(pipe, kept, directions_KD, strength, seed, config=config)
        shares = [_share(images, k, row.value, classifier) for images in [original, *steered]]
        rows.append(
            {
                "feature": row.feature,
                "word": row.word,
                "factor": row.factor,
                "value": row.value_name,
                "prompts": len(kept),
                "original": shares[0],
                "steered": shares[1],
                "random direction": float(np.mean(shares[2 : 2 + n_controls])),
                "random feature": float(np.mean(shares[2 + n_controls :])),
            }
        )
    return pd.DataFrame(rows)


def planted_summary(table: pd.DataFrame, strength: float) -> str:
    """The check in one paragraph per factor, computed from `planted_steering`'s table."""
    if table.empty:
        return "No SAE feature fires mostly on one factor word, so there is nothing to check."
    parts = [f"At λ = {strength:.3g}, the share of images showing the feature's value:"]
    for factor, rows in table.groupby("factor", sort=False):
        beats = (rows["steered"] > rows["random direction"]) & (
            rows["steered"] > rows["random feature"]
        )
        parts.append(
            f"**{factor}** features ({len(rows)}): {rows['original'].mean():.0%} unsteered, "
            f"**{rows['steered'].mean():.0%} steered**, {rows['random direction'].mean():.0%} "
            f"along random directions and {rows['random feature'].mean():.0%} along random "
            f"features; the feature beats both controls for {int(beats.sum())} of {len(rows)}."
        )
    return " ".join(parts)


@dataclass
class PlantedCheck:
    """Chapter 06's planted-truth section: the table, its summary and the strongest feature's
    λ sweep as a Fig. 5 grid."""

    table: pd.DataFrame
    """`planted_steering`'s table."""
    summary: str
    """`planted_summary`'s paragraph."""
    grid: Figure | None
    """The feature with the largest margin over its best control, on prompts that do not ask
    for its value, at every strength (None when no feature qualified)."""


def planted_check(
    pipe: StableDiffusionPipeline,
    sae: SAE,
    descriptive: pd.DataFrame,
    prompts: Sequence[str],
    strength: float,
    strengths: Sequence[float],
    *,
    seed: int = 0,
    config: GenerationConfig | None = None,
    n_grid: int = 4,
) -> PlantedCheck:
    """Find the planted features, steer them against their controls and draw the best one."""
    planted = planted_features(descriptive)
    table = planted_steering(
        pipe, sae, planted, descriptive, prompts, strength, seed=seed, config=config
    )
    summary = planted_summary(table, strength)
    if table.empty:
        return PlantedCheck(table, summary, None)
    margin = table["steered"] - table[["random direction", "random feature"]].max(axis=1)
    best = table.loc[margin.idxmax()]
    k = cap.FACTORS.index(best.factor)
    value = _VALUE_WORDS[best.factor].index(best.value)
    named = toy_eval.text_factors(prompts)[:, k]
    shown = [p for p, v in zip(prompts, named, strict=True) if v != value][:n_grid]
    direction_D = feature_direction(sae, int(best.feature))
    originals = generate_along(pipe, shown, direction_D, 0.0, seed, config=config)
    columns = {
        s: generate_along(pipe, shown, direction_D, s, seed, config=config) for s in strengths
    }
    grid = steering_grid(
        originals,
        columns,
        shown,
        column_format="λ = {:.3g}",
        title=f"feature {int(best.feature)} (fires on '{best.word}'): towards {best.value}",
    )
    return PlantedCheck(table, summary, grid)
