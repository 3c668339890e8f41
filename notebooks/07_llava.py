# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # LLaVA: do images and words share SAE features?
#
# Olson et al. (paper 003, §5) open up LLaVA-1.5, a CLIP vision tower whose patch features a
# small projector turns into tokens for a Llama language model, with SAEs. They ask two
# questions.
#
# **Modality overlap (§5.1, Fig. 6).** Ask the model, with no image, to define a concept ("What
# is a clock?"); separately, show it an image of that class and ask "Describe this image."
# without naming the class. Read a middle language-model layer at every token of each answer,
# encode those activations with one ReLU SAE, and average per class to get a text profile
# $\bar z^{\text{text}}_c$ and an image profile $\bar z^{\text{image}}_c$ over the $S$ features.
# Each modality's top set keeps the $K = \lceil f S \rceil$ most activated features ($f$ = 1%
# in the paper):
#
# $$T_c = \operatorname{top}_K\big(\bar z^{\text{text}}_c\big), \qquad
# I_c = \operatorname{top}_K\big(\bar z^{\text{image}}_c\big), \qquad
# J_c = \frac{|T_c \cap I_c|}{|T_c \cup I_c|}.$$
#
# The paper shows the sets (Fig. 6) and reads the overlap by eye. We also give it a chance
# level: pair each class's text set with *another* class's image set (a random derangement
# $\pi$, no class kept) and recompute the mean Jaccard many times,
#
# $$\bar J = \frac1C \sum_c J(T_c, I_c) \quad\text{against}\quad
# \bar J_\pi = \frac1C \sum_c J(T_c, I_{\pi(c)}),$$
#
# with the one-sided p-value $p = (1 + \#\{\pi : \bar J_\pi \ge \bar J\}) / (1 + n_\pi)$.
# Overlap only means something where it beats the mismatched pairs.
#
# **Layer-wise evolution (§5.2, Fig. 7).** Train one SAE on the image tokens at the projector
# output (where the image enters the language model) and one at language-model layer 6. For each
# image, take each SAE's dominant feature, map every image token back to its cell of the vision
# patch grid, and overlay the two maps of active patches. The paper sees the core regions
# persist while layer 6 recruits extra patches.
#
# ```{note}
# The `mini` profile runs a *toy* LLaVA: a real `LlavaForConditionalGeneration` whose vision
# tower is the toy ViT of chapter 00 and whose language model is a small Llama (its sizes are
# printed below), trained on the toy world by `python -m saekit.mini.toy_llava` to describe a
# toy image by its planted factors ("a coarse dotted green fish") and to answer "What is a
# great white shark?" the same way. Its world is a toy, but its answers are learned, and
# because the toy world's classes are planted, section 6 checks the overlap against the answer
# key. What LLaVA-1.5 itself does needs the `paper` profile (`llava-hf/llava-1.5-7b-hf` and
# ImageNet validation images, on a GPU).
# ```

# %% tags=["parameters"]
profile = "mini"
model: str | None = None  # LLaVA hub id or folder; None: toy LLaVA (mini), LLaVA-1.5-7B (paper)
layer: int | None = None  # block read for the overlap; None: mini 2 of 4, paper 16 of 32
evolution_layer: int | None = None  # block set against the projector; None: mini 1, paper 6
n_classes = 10  # classes studied, spread evenly over the dataset's classes
images_per_class = 3  # images described per class
max_new_tokens: int | None = None  # longest answer in tokens; None: mini 8, paper 48
top_fraction: float | None = None  # share of features in a top set; None: mini 0.05, paper 0.01
sae_captions_per_class = 2  # further images of every class captioned to train the overlap SAE
sae_train_on = "both"  # overlap SAE data besides captions: "both" modalities' answers or "image"
sae_expansion = 8  # SAE width as a multiple of the model width
sae_l1 = 0.3  # λ of the ReLU SAEs, on normalised inputs
sae_lr: float | None = None  # Adam learning rate; None: mini 1e-3, paper 1e-4
sae_epochs: int | None = None  # passes over the activations; None: mini 50, paper 3
n_permutations = 1000  # mismatched class pairings drawn for the chance level
seed = 0  # seeds the SAEs and the permutations
imagenet_val: str | None = None  # paper: ImageNet-1k validation folder (one sub-folder per wnid)
device: str | None = None  # where LLaVA runs and the SAEs train; None: cuda when available

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from saekit.analysis import modality_overlap as mo
from saekit.analysis import multimodal as mm
from saekit.analysis import patch_evolution as pe
from saekit.analysis.widgets import switcher
from saekit.sae import evaluate, metrics_table
from saekit.studies import llava as study
from saekit.studies import llava_planted as planted

settings = study.LlavaSettings.for_profile(**chapter.params)
plan = chapter.plan(**study.resource_needs(settings))
answers_cfg = settings.answers()
saes_root = chapter.workdir / "saes"
pd.set_option("display.precision", 3)

# %% [markdown]
# ## Setting up
#
# The profile fills in what the parameters leave at `None`. In `mini`: the toy LLaVA shipped
# with saekit (loaded with `from_pretrained` like the paper's checkpoint), short answers, top
# sets of a larger share of the features than the paper's 1% (the toy model's SAE is small),
# and the toy world's validation images. In `paper`: LLaVA-1.5-7B on the GPU (in
# float16 there), the middle block for the overlap and block 6 for the evolution as in the paper,
# 48-token answers, 1% top sets and the ImageNet validation folder.
#
# All three SAEs use the `olson2025` recipe (paper 003 §3.3: Adam with 5% warm-up and 20%
# decay, λ warmed up, minibatch 64) with one change: inputs are centred and scaled to unit mean
# norm before training (and the scaling folded back into the weights afterwards), so that one λ
# means the same sparsity for the miniature's residual stream and LLaVA-7B's, whose norms differ
# by orders of magnitude. They are trained once and cached (`saekit.sae.train_or_load`). `mini`
# has few activation rows, so its SAEs take more epochs at a larger learning rate than `paper`,
# which keeps the recipe's.
#
# The study's classes are spread evenly over the dataset's classes (in `mini`, across all five
# shape families of the toy world), with the first `images_per_class` validation images of each.

# %%
dataset = chapter.dataset("val")
classes_C, image_indices, labels_N = study.study_images(
    dataset.labels, settings.n_classes, settings.images_per_class
)
class_names = [dataset.class_names[c] for c in classes_C]
images = [dataset.load(int(i)) for i in image_indices]
print(f"{len(images)} images of {len(class_names)} classes: {', '.join(class_names)}")

# %%
llava, processor, source = study.load_model(settings)
grid = mm.patch_grid(llava, processor)
n_blocks = len(mm.language_layers(llava))
display(
    Markdown(
        f"**This run:** `{source}` ({n_blocks} language-model blocks of width "
        f"{llava.config.text_config.hidden_size}, a {grid[0]}×{grid[1]} patch grid) in "
        f"{settings.dtype} on `{settings.device}`; the overlap is read at block {settings.layer}, "
        f"the evolution compares the projector with block {settings.evolution_layer}; answers of "
        f"at most {settings.max_new_tokens} tokens; top sets of {settings.top_fraction:.0%} of "
        f"the features; SAEs trained for {settings.sae_epochs} epochs at lr {settings.sae_lr:g}."
    )
)

# %% [markdown]
# ## 1. Answers in two modalities (§5.1)
#
# Greedy generation; a forward hook on block `layer` keeps, at every generation step, the
# residual stream at the position that produces the next token, so the activations are exactly
# those computed while the answer was written, up to the end-of-sequence token. The text prompt
# names the class; the image prompt never does. (In `mini` the answers are the toy LLaVA's
# captions; in `paper` this table shows LLaVA's definitions and descriptions.)

# %%
text = mm.text_responses(llava, processor, class_names, answers_cfg)
image = mm.image_responses(llava, processor, images, labels_N, answers_cfg)
first_image = [list(labels_N).index(c) for c in range(len(class_names))]
pd.DataFrame(
    {
        "class": class_names,
        "text prompt answer": text.texts,
        "image prompt answer (first image)": [image.texts[i] for i in first_image],
    }
)

# %% [markdown]
# ## 2. One ReLU SAE on the answers
#
# The paper trains its SAE on middle-layer activations recorded while LLaVA captions ImageNet.
# So do we: `sae_captions_per_class` further validation images of *every* class (never the
# study's images) are described with the same prompt, and their answers are the bulk of the
# training data. By default the study's own answers of both modalities join them, so that
# neither modality's directions are missing from the dictionary; `sae_train_on="image"` leaves
# the text answers out, as the paper does. Reconstruction quality on each kind of answer:

# %%
caption_indices = study.caption_images(
    dataset.labels, settings.images_per_class, settings.sae_captions_per_class
)
captions = mm.image_responses(
    llava,
    processor,
    [dataset.load(int(i)) for i in caption_indices],
    [dataset.labels[i] for i in caption_indices],
    answers_cfg,
)
overlap_acts_ND = study.training_activations(text, image, settings.sae_train_on, captions)
sae = study.train_sae(overlap_acts_ND, settings, "llava-overlap", saes_root)
answers = {"text answers": text, "image answers": image, "caption answers": captions}
display(
    Markdown(
        f"The overlap SAE has {sae.cfg.d_sae} features and trained on {len(overlap_acts_ND):,} "
        f"answer-token rows whose mean norm is {overlap_acts_ND.norm(dim=1).mean():.3g}."
    )
)
metrics_table({name: evaluate(sae, r.stacked()) for name, r in answers.items() if r.acts})

# %% [markdown]
# ## 3. Overlap of the top features (Fig. 6)
#
# Each class's text and image profiles are the mean SAE code over the tokens of an answer,
# averaged over the class's answers; each keeps its top $K$ features (features that never fire
# are left out, so silence cannot count as overlap).

# %%
n_classes_C = len(class_names)
text_CS = mo.top_feature_sets(mo.class_profiles(sae, text, n_classes_C), settings.top_fraction)
image_CS = mo.top_feature_sets(mo.class_profiles(sae, image, n_classes_C), settings.top_fraction)
baseline = mo.permutation_baseline(text_CS, image_CS, settings.n_permutations, settings.seed)
table = mo.overlap_table(text_CS, image_CS, class_names)
table

# %%
k = mo.top_set_size(settings.top_fraction, sae.cfg.d_sae)
display(
    Markdown(
        f"**Permutation baseline.** With top sets of K = {k} of {sae.cfg.d_sae} features, "
        f"matched classes share on average {table['overlap'].mean():.2f} features, a mean "
        f"Jaccard of **{baseline.observed:.3f}**. Mismatched pairings give "
        f"{baseline.null_mean:.3f} on average over {settings.n_permutations} random derangements "
        f"(exact chance level {baseline.expected_chance:.3f}; 95th percentile of the null "
        f"{pd.Series(baseline.null).quantile(0.95):.3f}), so p = **{baseline.p_value:.3g}**. "
        + (
            "The matched overlap is above chance."
            if baseline.p_value < 0.05
            else "The matched overlap is **not** above chance."
        )
    )
)

# %% [markdown]
# Fig. 6: one row per class and modality, one column per feature that is in any top set, in
# order of the first class that selects it. Grey marks a feature in this modality's set only,
# red one that both modalities of the class select. Watch for columns that fill every row of one
# modality: features of "answering about an image" or "answering without one" rather than of a
# concept. Shared, they would inflate every class's overlap, matched or not, which is what the
# chance level below accounts for.

# %%
study.plot_overlap_heatmap(mo.overlap_heatmap_frame(text_CS, image_CS, class_names))
plt.show()

# %% [markdown]
# The same numbers as a chance test: the Jaccard of every (text class, image class) pair, whose
# diagonal holds the matched classes, and the distribution of mean Jaccard under mismatched
# pairings with the matched value in red. A real shared representation shows as a bright
# diagonal and a red line far to the right of the grey histogram.

# %%
study.plot_chance(mo.jaccard_matrix(text_CS, image_CS), class_names, baseline)
plt.show()

# %% [markdown]
# ## 4. Visual features from the projector to layer `evolution_layer` (§5.2, Fig. 7)
#
# One forward pass per image with the image prompt reads the image tokens at the projector
# output and at block `evolution_layer`. The processor expands the prompt's `<image>` into one
# placeholder per patch, filled with the projected patch features in row-major order, so the
# k-th placeholder is patch (k // cols, k % cols) of the grid (the tests check this by painting
# single patches). Each point gets its own ReLU SAE, trained on all image tokens of the study's
# images.

# %%
points = (mm.PROJECTOR, settings.evolution_layer)
names = ("projector", f"layer {settings.evolution_layer}")
tokens_BPD, tokens = mm.image_token_activations(
    llava,
    processor,
    images,
    points,
    prompt=answers_cfg.image_prompt,
    batch_size=answers_cfg.batch_size,
)
point_saes = {
    point: study.train_sae(tokens_BPD[point].flatten(0, 1), settings, f"llava-{name}", saes_root)
    for point, name in zip(points, ("projector", f"block{settings.evolution_layer}"), strict=True)
}
metrics_table(
    {
        f"{name} SAE": evaluate(point_saes[point], tokens_BPD[point].flatten(0, 1))
        for point, name in zip(points, names, strict=True)
    }
)

# %% [markdown]
# The two SAEs share no feature indices, so each image is shown through each SAE's *dominant*
# feature (largest total activation over its patches); a patch is active where that feature
# is above zero. Blue: active at the projector only; orange: at the later layer only; purple:
# both. *Persistence* is the share of projector-active patches still active later; *new*
# counts the patches that only the later layer activates.

# %%
maps = {point: pe.patch_maps(point_saes[point], tokens_BPD[point], grid) for point in points}
evolution = pe.compare_patch_maps(maps[points[0]][0], maps[points[1]][0])
crops = [mm.square_crop(processor, im) for im in images]
shown = first_image[:4]
titles = [f"{class_names[labels_N[i]]}: {names[0]}" for i in shown]
study.plot_evolutions(crops, evolution, shown, titles, names)
plt.show()

# %%
evolution_frame = study.evolution_table(
    evolution, labels_N, class_names, (maps[points[0]][1], maps[points[1]][1])
)
display(
    evolution_frame.groupby("class", sort=False)[
        ["early", "late", "both", "persistence", "new"]
    ].mean()
)
display(
    Markdown(
        f"Over all {len(images)} images, on a {grid[0]}×{grid[1]} grid: "
        f"{evolution_frame['early'].mean():.1f} patches active at the projector, "
        f"{evolution_frame['late'].mean():.1f} at layer {settings.evolution_layer}; a mean "
        f"persistence of {evolution_frame['persistence'].mean():.2f} and "
        f"{evolution_frame['new'].mean():.1f} new patches per image."
    )
)

# %% [markdown]
# ## 5. One class at a time
#
# Pick a class: its text and image top sets (a strip of Fig. 6, with its overlap and Jaccard)
# above the Fig. 7 panels of each of its images.

# %%
switcher(
    {
        name: study.plot_class_view(
            c,
            class_names,
            text_CS,
            image_CS,
            crops,
            evolution,
            [i for i in range(len(images)) if labels_N[i] == c],
            names,
        )
        for c, name in enumerate(class_names)
    },
    description="class",
)

# %% [markdown]
# ## 6. Planted truth: an image of a fish and the word "fish"
#
# Only the toy world has an answer key. Each toy class has a planted shape family (the top of
# its hierarchy), a style (colour and texture) and a pattern frequency, and the toy LLaVA was
# taught to name them. First, how often this run's answers name the true factors of their
# class (image answers: held-out validation images; text answers: the class name alone):

# %%
if planted.has_planted_truth(dataset.wnids):
    class_wnids = [dataset.wnids[c] for c in classes_C]
    display(
        pd.DataFrame(
            {
                "image answers": planted.answer_scores(image, class_wnids),
                "text answers": planted.answer_scores(text, class_wnids),
            }
        ).T
    )
else:
    display(Markdown("These classes are not toy-world classes: there is no answer key."))

# %% [markdown]
# Then the overlap test of section 3 at each planted level: the study's classes are pooled by
# shape family (and by style), text and image top sets are taken per pooled value, and the
# matched Jaccard is set against mismatched pairings as before. If the features shared by the
# two modalities carry the planted classes, the matched pairing beats the null at the level of
# shape families as well as of classes.

# %%
if planted.has_planted_truth(dataset.wnids):
    planted_table = planted.planted_overlap(
        sae,
        text,
        image,
        class_wnids,
        settings.top_fraction,
        settings.n_permutations,
        settings.seed,
    )
    display(Markdown(planted.planted_summary(planted_table)))
    display(planted_table)

# %% [markdown]
# ## What this shows
#
# The chapter's machinery: answers recorded at the exact positions that produced them, one SAE
# over both modalities, top-$K$ sets, overlap and Jaccard with a chance level the paper did not
# report, and image tokens mapped back to their patches at two depths. In `mini` it runs on a
# toy LLaVA whose answers are learned, and section 6 compares the overlap with the planted
# classes; the patch maps show where the dominant feature of each SAE fires on the toy images.
#
# The paper, on LLaVA-1.5-7B, reports a large overlap between the text and image top sets for
# nearly every class it examined (Fig. 6) and, at layer 6, the projector's active regions
# preserved with extra patches recruited (Fig. 7). It calls both observations qualitative; run
# this chapter with `profile="paper"` and `imagenet_val` set to test the first against the
# permutation baseline above and to put numbers (persistence, new patches) on the second.
