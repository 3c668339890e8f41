"""Chapter 06: steering Stable Diffusion with text-encoder SAE features (paper 003 §4).

What only this chapter needs: its settings (`SteeringSettings`, which own the profile), the
models it runs (`resolve_models`: in mini the toy text-to-image pipeline trained on the toy
world, the toy CLIP its text encoder comes from as the describer, and a judge CLIP trained apart
on another world, all shipped in ``saekit/mini/assets``), the describer it names features with,
its prompt split and strengths, and its tables and figures (the attribute table, Fig. 5's grid,
Table 3's figure). The planted-truth check of the mini profile is `steering_planted`. The
generic parts are `saekit.analysis.steering`, `saekit.analysis.attributes`,
`saekit.analysis.describers` and `saekit.analysis.attribute_validation`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from PIL.Image import Image

from saekit.analysis.attribute_validation import Table3, table3
from saekit.analysis.attributes import Discovery, word_counts
from saekit.analysis.describers import Describer, load_describer
from saekit.analysis.steering import (
    PAPER_CLIP,
    PAPER_PIPELINE,
    GenerationConfig,
    SteerMode,
    load_clip,
)
from saekit.mini import toy_judge, toy_t2i
from saekit.mini.toyworld import captions
from saekit.plan import SAENeed
from saekit.sae import SAEMetrics, SAESpec, get_recipe
from saekit.studies.settings import StudySettings

PAPER_DESCRIBER = "Qwen/Qwen2.5-VL-7B-Instruct"
"""The multimodal LM that names the features in the paper."""
PAPER_DESCRIBER_CLIP = "openai/clip-vit-large-patch14"
"""The zero-shot describer's CLIP on paper (``describer="clip"``): not the judge's B/32."""
TOY_PIPELINE = toy_t2i.DEFAULT_OUT
"""The mini profile's Stable Diffusion: trained on the toy world (`python -m saekit.mini.toy_t2i`)."""
TOY_DESCRIBER_CLIP = toy_t2i.DEFAULT_OUT / toy_t2i.CLIP_FOLDER
"""The toy CLIP whose text tower conditions the toy pipeline; mini's describer."""
TOY_JUDGE_CLIP = toy_judge.DEFAULT_OUT
"""The toy CLIP trained on another world with another seed (`python -m saekit.mini.toy_judge`);
mini's judge."""


@dataclasses.dataclass(frozen=True)
class SteeringSettings(StudySettings):
    """Chapter 06's parameters; field defaults are the mini profile's, `PAPER` the paper's."""

    pipeline: str | None = str(TOY_PIPELINE)
    """Stable Diffusion hub id or folder; mini: the toy pipeline trained on the toy world."""
    describer_clip: str | None = str(TOY_DESCRIBER_CLIP)
    """CLIP of the zero-shot describer (used when ``describer="clip"``); mini: the toy CLIP whose
    text tower conditions the toy pipeline."""
    judge_clip: str | None = str(TOY_JUDGE_CLIP)
    """CLIP that scores Table 3; mini: a toy CLIP trained with another seed on another toy
    world. It must not be the describer's CLIP, or Table 3 checks the namer against itself."""
    prompt_file: str | None = str(toy_t2i.DEFAULT_OUT / toy_t2i.PROMPT_FILE)
    """Prompts, one per line (SAE corpus, sample and test prompts); mini: the toy world's
    captions shipped with the pipeline; paper: no default (the paper used Midjourney prompts)."""
    caption_file: str | None = None
    """Captions for finding descriptive features (paper: MS-COCO); None: the prompt file."""
    describer: str = "clip"
    """``"clip"`` (zero-shot over `vocabulary`) or a multimodal LM's hub id (paper: Qwen2.5-VL)."""
    vocabulary: tuple[str, ...] = tuple(captions.vocabulary())
    """Candidate attribute words for the CLIP describer (mini: the toy captions' factor words)."""
    layer: int = -2
    """Text-encoder hidden state the SAE reads and steering moves (-2: penultimate)."""
    expansion: int = 8
    """SAE width as a multiple of the text encoder's width."""
    l1: float = 1.0
    """SAE sparsity coefficient λ_1 (paper profile: the `olson2025` recipe's 10)."""
    lr: float = 1e-3
    """SAE learning rate (paper profile: 1e-4; mini's corpus has only ~2,600 tokens)."""
    epochs: int = 30
    """Passes over the token corpus (paper profile: 3)."""
    mode: SteerMode = "add"
    """``"add"`` λ·d_k to every token, or ``"amplify"`` the feature's code by (1 + λ)."""
    strength: float | None = None
    """Steering strength λ; None: 0.75 × the corpus's mean token-embedding norm."""
    strengths: tuple[float, ...] | None = None
    """λ values in the explorer; None: 0.25, 0.5, 1 and 2 × `strength`."""
    n_features: int = 12
    """Descriptive features steered and named."""
    n_show: int = 4
    """Features in the Figure-5 grid."""
    n_sample_prompts: int = 8
    """Prompts steered per feature for naming it (4 per describer call)."""
    n_pairs: int = 40
    """Prompt-attribute pairs in Table 3 (the paper: 100)."""
    num_inference_steps: int = 8
    """Denoising steps (paper profile: 50)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance weight w."""
    n_planted_prompts: int = 24
    """Held-out prompts steered per feature in the planted-truth check (toy pipeline only)."""
    seed: int = 0
    """Seeds the SAE, the prompt order, every image and the planted check's random controls."""
    device: str | None = None
    """Where the models run and the SAE trains; None: "cuda" when available, else "cpu"."""

    PAPER: ClassVar[dict[str, object]] = {
        "pipeline": PAPER_PIPELINE,
        "describer_clip": PAPER_DESCRIBER_CLIP,
        "judge_clip": PAPER_CLIP,
        "prompt_file": None,
        "describer": PAPER_DESCRIBER,
        "l1": 10.0,
        "lr": 1e-4,
        "epochs": 3,
        "num_inference_steps": 50,
    }

    @property
    def captions_file(self) -> str | None:
        """Where the descriptive-feature captions come from: `caption_file`, else the prompts."""
        return self.caption_file if self.caption_file is not None else self.prompt_file

    def sae_spec(self) -> SAESpec:
        """The text-encoder SAE: ReLU, the `olson2025` recipe with this chapter's learning rate
        (its epochs are passed to `saekit.sae.train_or_load` as `epochs`)."""
        return SAESpec(
            arch="relu",
            expansion=self.expansion,
            l1=self.l1,
            recipe=get_recipe("olson2025", lr=self.lr),
            seed=self.seed,
            name="text-sae",
        )

    def generation(self) -> GenerationConfig:
        """How every image of the chapter is generated."""
        return GenerationConfig(
            layer=self.layer,
            mode=self.mode,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
        )


@dataclasses.dataclass(frozen=True)
class SteeringModels:
    """Where the chapter's models come from (hub ids or folders)."""

    pipeline: str
    """The Stable Diffusion pipeline that is steered."""
    describer_clip: str | None
    """The CLIP that names the features (None when a multimodal LM names them)."""
    judge_clip: str
    """The CLIP that scores Table 3."""



def _text_width(pipeline: str | None) -> int | None:
    """The text encoder's width from the pipeline's config alone (None when not at hand)."""
    if pipeline is None:
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(pipeline, subfolder="text_encoder")
    except (OSError, ValueError):
        return None
    return int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0)) or None


def resource_needs(settings: SteeringSettings) -> dict[str, list]:
    """What the chapter loads and trains, for `saekit.book.Chapter.plan`: the pipeline and the
    two CLIPs, and the text-encoder SAE on the prompts' tokens (77 per prompt at most)."""
    prompts = settings.prompt_file
    n_prompts = None
    if prompts is not None and Path(prompts).is_file():
        n_prompts = sum(1 for line in Path(prompts).read_text().splitlines() if line.strip())
    sae = SAENeed(settings.sae_spec(), epochs=settings.epochs, d_in=_text_width(settings.pipeline),
                  rows=None if n_prompts is None else 77 * n_prompts)  # fmt: skip
    models = [m for m in (settings.pipeline, settings.describer_clip, settings.judge_clip) if m]
    notes = [f"{settings.n_pairs} prompt pairs and {settings.n_features} features are generated "
             f"at {settings.num_inference_steps} denoising steps each"]  # fmt: skip
    return {"saes": [sae], "models": models, "notes": notes}

def same_model(a: str, b: str) -> bool:
    """Whether two hub ids or folders name the same model."""
    if Path(a).expanduser().is_dir() and Path(b).expanduser().is_dir():
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a.rstrip("/") == b.rstrip("/")


def resolve_models(settings: SteeringSettings, workdir: Path | None = None) -> SteeringModels:
    """The chapter's models as the settings name them (mini: the shipped toy pipeline, describer
    and judge; `workdir` is not needed and kept for callers that pass it).

    Refuses a judge that is the describer's CLIP: Table 3 would then test the names with the
    model that chose them, and pass by construction."""
    missing = [name for name in ("pipeline", "judge_clip") if getattr(settings, name) is None] + (
        ["describer_clip"] if settings.describer == "clip" and not settings.describer_clip else []
    )
    if missing:
        raise ValueError(f"Set {', '.join(missing)}: this profile has no default for them.")
    describer_clip = settings.describer_clip if settings.describer == "clip" else None
    if describer_clip is not None and same_model(describer_clip, settings.judge_clip):
        raise ValueError(
            f"describer_clip and judge_clip are both {settings.judge_clip!r}: the CLIP that names "
            "the attributes must not be the one that validates them (Table 3 would pass by "
            "construction). Pass another judge_clip, e.g. openai/clip-vit-base-patch32."
        )
    return SteeringModels(settings.pipeline, describer_clip, settings.judge_clip)


def has_planted_truth(models: SteeringModels) -> bool:
    """Whether the pipeline is the toy one, whose prompts name planted factors that the toy ViT
    reads back from images (the check in `saekit.studies.steering_planted`)."""
    return same_model(models.pipeline, str(TOY_PIPELINE))


def load_namer(settings: SteeringSettings, models: SteeringModels) -> Describer:
    """The describer that names the features: CLIP over `vocabulary` or a multimodal LM."""
    if settings.describer == "clip":
        model, processor = load_clip(models.describer_clip, device=settings.device)
        return load_describer("clip", model, processor, settings.vocabulary)
    return load_describer(settings.describer, device=settings.device)


def who_judged(settings: SteeringSettings, models: SteeringModels) -> str:
    """One sentence for the page: which model named the attributes and which judged them."""
    namer = (
        f"CLIP `{models.describer_clip}` over {len(settings.vocabulary)} words"
        if settings.describer == "clip"
        else f"`{settings.describer}`"
    )
    return f"The attributes were named by {namer}; Table 3 is judged by CLIP `{models.judge_clip}`."


def sae_summary(settings: SteeringSettings, n_rows: int, metrics: SAEMetrics, d_sae: int) -> str:
    """What the SAE trained on and how sparse it came out, for the page."""
    batch_size = settings.sae_spec().resolved().recipe.batch_size
    return (
        f"{n_rows:,} token rows make {math.ceil(n_rows / batch_size)} steps of {batch_size} an "
        f"epoch; {settings.epochs} epochs at lr {settings.lr:g} with λ_1 = {settings.l1:g} leave "
        f"about {metrics.l0:.0f} of {d_sae} latents active per token."
    )


def table3_summary(result: Table3, settings: SteeringSettings, models: SteeringModels) -> str:
    """Table 3's test in one paragraph, beside the paper's numbers, saying who judged."""
    return (
        f"cos(I_steer, t_attr) is {result.relative_increase:+.1%} relative to cos(I_steer, "
        f"t_orig); paired t = {result.t_statistic:.2f}, p = {result.p_value:.3g}, "
        f"n = {result.n} (the paper: +5.8%, p < 0.0001, n = 100). " + who_judged(settings, models)
    )


def chosen_features(descriptive: pd.DataFrame, n_features: int) -> list[int]:
    """The `n_features` most active of the features `descriptive_features` selected, or an error
    that says what to change when none passed its filter."""
    selected = descriptive[descriptive.selected].sort_values("n_active", ascending=False)
    if selected.empty:
        raise ValueError(
            f"none of the SAE's {len(descriptive)} features fires mostly on descriptive words, "
            "so there is nothing to steer: train the SAE longer or with a smaller l1 (sparser "
            "SAEs at few epochs leave many features unused), or use more captions."
        )
    return selected.feature.head(n_features).tolist()


def steering_strengths(
    settings: SteeringSettings, acts_ND: torch.Tensor
) -> tuple[float, tuple[float, ...]]:
    """λ and the explorer's λ values: as set, or 0.75 × the corpus's mean token-embedding norm
    (so that λ scales with whichever text encoder runs) and 0.25, 0.5, 1, 2 × λ."""
    strength = settings.strength
    if strength is None:
        strength = 0.75 * acts_ND.norm(dim=-1).mean().item()
    strengths = settings.strengths
    if strengths is None:
        strengths = tuple(strength * f for f in (0.25, 0.5, 1.0, 2.0))
    return strength, strengths


def split_prompts(
    prompts: Sequence[str], n_sample: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Sample prompts (steered to name the features) and held-out test prompts (Table 3), from
    one seeded shuffle."""
    order = random.Random(seed).sample(list(prompts), len(prompts))
    return order[:n_sample], order[n_sample:]


# ----------------------------------------------------------------------- tables and figures


def attribute_table(
    discovery: Discovery, dominant: Mapping[int, str], descriptive: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per steered feature: the describer's keywords with counts, the dominant one and,
    given `descriptive_features`' table, the words the feature fires on most."""
    rows = []
    for feature, keywords in discovery.keywords.items():
        counts = Counter(k.strip().lower() for k in keywords if k.strip())
        row = {
            "feature": feature,
            "attribute": dominant.get(feature, ""),
            "keywords": ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.most_common()),
        }
        if descriptive is not None:
            row["fires_on"] = word_counts(descriptive.set_index("feature").top_words[feature])
        rows.append(row)
    return pd.DataFrame(rows)


def steering_grid(
    originals: Sequence[Image],
    columns: Mapping[object, Sequence[Image]],
    prompts: Sequence[str] | None = None,
    *,
    column_format: str = "{}",
    title: str | None = None,
    image_inches: float = 1.4,
) -> Figure:
    """Paper 003 Fig. 5's layout: one row per prompt, the unsteered image first, then one
    column per entry of `columns` (e.g. a feature's attribute, or a strength), its key shown
    through `column_format` (e.g. `"λ = {:.3g}"` for strengths)."""
    n_rows = len(originals)
    if n_rows == 0:
        raise ValueError("no images to show; pass at least one original image.")
    for label, images in columns.items():
        if len(images) != n_rows:
            raise ValueError(
                f"column {label!r} has {len(images)} images but there are {n_rows} originals; "
                "each column needs one steered image per prompt."
            )
    labels = ["original", *(column_format.format(key) for key in columns)]
    fig, axes = plt.subplots(
        n_rows,
        len(labels),
        figsize=(image_inches * len(labels), image_inches * n_rows + 0.4),
        squeeze=False,
    )
    for r in range(n_rows):
        images = [originals[r], *(column[r] for column in columns.values())]
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(labels[c], fontsize=9)
        if prompts is not None:
            axes[r, 0].set_ylabel(
                textwrap.fill(prompts[r], 22), fontsize=6, rotation=0, ha="right", va="center"
            )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def table3_figure(sims: pd.DataFrame, result: Table3 | None = None) -> Figure:
    """The three similarities of every pair (lines join a pair) and the paired differences
    cos(I_steer, t_attr) - cos(I_steer, t_orig) that the t-test is about."""
    result = result or table3(sims)
    names = {
        "orig_orig": "(I_orig, t_orig)",
        "steer_orig": "(I_steer, t_orig)",
        "steer_attr": "(I_steer, t_attr)",
    }
    long = sims[list(names)].rename(columns=names).melt(var_name="pair", value_name="cosine")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), width_ratios=[3, 2])
    left.plot(range(3), sims[list(names)].to_numpy().T, color="0.6", alpha=0.25, linewidth=0.7)
    sns.pointplot(long, x="pair", y="cosine", color="C3", errorbar="sd", ax=left)
    left.set_xlabel("")
    left.set_ylabel("CLIP cosine similarity")
    left.set_title(f"n = {result.n} prompt-attribute pairs (mean ± std)")
    diff = sims.steer_attr - sims.steer_orig
    sns.histplot(diff, ax=right, color="C0", bins=min(30, max(5, len(diff) // 3)))
    right.axvline(0, color="0.2", linestyle="--", linewidth=1)
    right.set_xlabel("cos(I_steer, t_attr) − cos(I_steer, t_orig)")
    right.set_title(f"paired t = {result.t_statistic:.2f}, p = {result.p_value:.2g}")
    fig.tight_layout()
    return fig
