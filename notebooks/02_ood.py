# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # OOD generalization: do SAE features transfer to shifted images?
#
# Olson et al. (2025, §3, Table 1, Fig. 2, 10 and 12) train SAEs on the last-layer CLS embedding
# of ImageNet's training images, sweeping the architecture (ReLU, TopK, Gated), the sparsity
# (λ ∈ {0.1, …, 100} or k ∈ {4, …, 256}) and the width (expansion 8, 16, 32). A linear probe is
# then fit, with identical settings, on the raw embedding $x$ and on the SAE codes
#
# $$z = \sigma\big(W_{\mathrm{enc}}(x - b_{\mathrm{dec}}) + b_{\mathrm{enc}}\big),\qquad
# \sigma \in \{\mathrm{ReLU},\ \mathrm{TopK},\ \text{gated ReLU}\},$$
#
# and scored on the validation set and on four shifted sets with ImageNet's labels: ImageNet-V2
# (new photos), -Sketch, -A (adversarially hard photos) and -R (renditions). ImageNet-A and -R
# cover 200 of the 1000 classes, so their probes predict the argmax over those 200 logits. The
# paper's headline (Table 1, λ = 0.5, expansion 8): a probe on DINOv2's SAE codes beats the probe
# on the raw embedding on most shifted sets. Appendix Fig. 12 probes the *pre-activation* codes
# (skipping σ), which rescues SAEs trained with a strong penalty. Reconstruction error,
#
# $$\mathrm{MSE} = \tfrac{1}{d}\,\lVert x - \hat{x} \rVert_2^2 ,$$
#
# is compared between in-domain images, near-OOD images (here: the shifted sets) and far-OOD
# images that share nothing with the training data.
#
# In the **mini** profile the encoder is the toy-world ViT (a 6-layer, 64-wide ViT trained on the
# planted-hierarchy toy world), the shifted sets are the toy world's `v2`, `sketch`, `hard` and
# `rendition` renderings, and far-OOD images are noise textures.

# %% tags=["parameters"]
profile = "mini"
encoders: list[str] | None = None  # encoder families; None: mini toyvit, paper dinov2, clip, resnet
layer = -1  # whose CLS token the SAEs read; -1 is the last layer, as in the paper
archs = ["relu", "topk", "gated"]  # SAE architectures
lambdas: list[float] | None = None  # λ of the ReLU and Gated SAEs; None: profile default
ks: list[int] | None = None  # k of the TopK SAEs; None: profile default
expansions: list[int] | None = None  # SAE width ÷ model width; None: profile default
epochs: int | None = None  # passes over the training images; None: mini 30, paper 3
lr: float | None = None  # SAE learning rate; None: mini 1e-3, paper 1e-4
probe_per_class: int | None = None  # probes' training images per class; None: mini all, paper 100
pre_activation = True  # also probe the pre-activation codes (paper Fig. 12)
table1_arch = "relu"  # the SAE Table 1 reports: architecture,
table1_sparsity = 0.5  # its λ (or k for TopK),
table1_expansion = 8  # and its expansion
detail_encoder: str | None = None  # the encoder Fig. 11 details; None: mini toyvit, paper resnet
seed = 0  # seeds the SAEs' initialisation, the batch order and the probes' subsample
device: str | None = None  # where SAEs and probes train; None: "cuda" when available, else "cpu"
imagenet_train: str | None = None  # paper profile: ImageNet-1k train folder (a folder per wnid)
imagenet_val: str | None = None  # paper profile: ImageNet-1k val folder
imagenet_v2: str | None = None  # paper profile: ImageNet-V2 (matched frequency), by wnid
imagenet_sketch: str | None = None  # paper profile: ImageNet-Sketch
imagenet_rendition: str | None = None  # paper profile: ImageNet-R (200 classes)
imagenet_hard: str | None = None  # paper profile: ImageNet-A (200 classes)
imagenet_far_ood: str | None = None  # paper profile: far-OOD images (e.g. OpenOOD's Textures)

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import saekit.analysis.widgets
from saekit.studies import ood, ood_figures, ood_scoring
from saekit.studies.ood import OODSettings

settings = OODSettings.for_profile(**chapter.params)
plan = chapter.plan(**ood.resource_needs(settings))
settings

# %% [markdown]
# ## Profile defaults
#
# The paper profile runs the paper's grid (7 values of λ or k × 3 expansions × 3 architectures)
# on DINOv2 ViT-g/14, CLIP ViT-L/14 and ResNet-50 with the paper's recipe (`olson2025_ood`: Adam
# at 1e-4, 5% warm-up, 20% decay, λ warm-up, minibatch 64, 3 epochs). Its probes see 100
# training images per class: the SAE codes of all 1.28M images (12,288 floats each at
# expansion 8) would not fit in memory.
#
# The mini profile trains a 3 × 2 × 2 grid on the toy ViT, for more epochs at a larger learning
# rate than the paper (its training set is small, see below), with sparsities scaled to a
# 64-wide residual stream: λ ∈ {0.5, 5} (0.5 is Table 1's value), k ∈ {4, 16}, expansions 4
# and 8. As the 200-of-1000-class restriction of ImageNet-A and -R, its `hard` and `rendition`
# sets are scored on every other toy class (indices 0, 2, 4, …). The mini profile has no
# ResNet row: the only ResNet available offline is a randomly initialised miniature, whose
# features say nothing about the paper's point (a ResNet's ImageNet-specific latent space);
# `-p encoders '["toyvit", "resnet"]'` adds one anyway.

# %%
print(f"{settings.grid}; epochs {settings.epochs}, lr {settings.lr:g}; on {settings.device}")

# %% [markdown]
# ## Activations
#
# The chosen layer's CLS token for the training images, the validation images, every shifted
# set and the far-OOD images, extracted once per encoder and cached in the profile's work folder.

# %%
stores = {
    encoder: {
        split: chapter.store(encoder, split, layers=[settings.layer])
        for split in ood_scoring.SPLITS
    }
    for encoder in settings.encoders
}
display(Markdown(ood.data_summary(stores, settings.recipe)))

# %% [markdown]
# ## The SAE sweep
#
# Every SAE of an encoder trains in **one pass** over its training activations (saekit's sweep
# trainer stacks SAEs of equal architecture and width and feeds each minibatch to all of them).
# Every SAE is kept in the SAE cache and reused when the chapter reruns with the same settings.

# %%
saes = ood.train_sweeps(stores, settings, chapter.workdir / "saes")
sweep = ood.sweep_tables(saes)
sweep

# %% [markdown]
# ## Linear probes: raw embedding vs SAE codes
#
# One multinomial logistic regression per representation (raw embedding, SAE codes, SAE
# pre-activation codes), standardised and fit with L-BFGS under identical settings, on the
# training images; the probes learn the classes the training folder holds. Every evaluation set
# is labelled in the training set's class order (by wnid) and scored on the training classes it
# holds: rows of other classes are left out, and the prediction is the argmax over the scored
# classes' logits. The table says how many classes and rows each set was scored on.

# %%
probes, scoring = ood.probe_tables(stores, saes, settings)
scoring

# %% [markdown]
# ## Reconstruction in-domain, near- and far-OOD
#
# Each SAE's MSE, L0 and L1 on the validation images (in-domain), on the shifted sets
# (near-OOD: same classes, new rendering) and on the far-OOD images.

# %%
recon = ood.reconstruction_tables(stores, saes)
summary = ood.summary_table(sweep, probes, recon)

# %% [markdown]
# ## Table 1
#
# Top-1 accuracy (%) of the probe on the raw embedding and on the codes of the SAE the paper
# reports (λ = 0.5, expansion 8, ReLU by default; change `table1_*` to pick another), with the
# pre-activation codes' probe as a third row. Columns follow the paper: Val, V2, S(ketch),
# A (`hard`) and R (`rendition`).

# %%
chosen = {
    encoder: ood.pick_sae(
        sweep, settings.table1_arch, settings.table1_expansion, settings.table1_sparsity, encoder
    )
    for encoder in settings.encoders
}
ood.table1(probes, chosen, pre_activation=settings.pre_activation)

# %% [markdown]
# ## Figure 2: accuracy, activation and reconstruction across the sweep
#
# Left: mean accuracy over the four shifted sets of the probe on each SAE's codes, against the
# SAE's L0 on the validation images (dashed: the raw embedding's probe). Middle: near-OOD MSE
# against the mean activation magnitude L1. Right: MSE on in-domain, near- and far-OOD images.
# L0 replaces the paper's λ on the x axis so that TopK (set by k) shares the axis with the λ
# architectures.

# %%
raw_ood = ood.baselines(probes)
fig = ood_figures.ood_figure(summary, raw_ood)
plt.show()

# %%
display(Markdown(ood.findings(summary, probes).replace("\n", "\n\n")))

# %% [markdown]
# **Explore by architecture.** Pick one to highlight its SAEs in all three panels (the others
# stay in grey, so the axes do not move).

# %%
saekit.analysis.widgets.switcher(
    {
        arch: ood_figures.ood_figure(summary, raw_ood, focus=("arch", arch))
        for arch in settings.grid.archs
    },
    description="architecture",
    control="toggle",
)

# %% [markdown]
# ## Figure 10: every SAE on every set
#
# The expanded Table 1: accuracy on each evaluation set for the codes (filled) and the
# pre-activation codes (hollow) of every SAE, with the raw embedding's probe dashed.

# %%
fig = ood_figures.split_figure(summary, ood_scoring.EVAL_SPLITS, probes)
plt.show()

# %% [markdown]
# **Explore by evaluation set.**

# %%
saekit.analysis.widgets.switcher(
    {
        f"{split} ({ood_scoring.TABLE1_COLUMNS[split]})": ood_figures.split_figure(
            summary, split, probes, panel_size=(6.0, 4.2)
        )
        for split in ood_scoring.EVAL_SPLITS
    },
    description="set",
    control="dropdown",
)

# %% [markdown]
# ## Figure 11: one encoder's sweep in detail
#
# Paper 003 looks at ResNet-50's SAEs alone and finds very consistent trends across
# architectures and expansions. Here, for `detail_encoder` (the paper profile's ResNet-50; the
# mini profile's toy ViT), the probe's validation and mean OOD accuracy and the in-domain and
# near-OOD reconstruction error of every SAE, against its L0: colour is the architecture, the
# marker the expansion.

# %%
if settings.detail_encoder in settings.encoders:
    fig = ood_figures.encoder_figure(summary, settings.detail_encoder, probes)
    plt.show()
else:
    print(f"{settings.detail_encoder} is not among the encoders {list(settings.encoders)}")

# %% [markdown]
# The numbers behind the figures, one row per SAE: grid point, in-domain L0 and L1, accuracy on
# every set (`pre:` = pre-activation codes; `ood` = mean over the shifted sets) and mean MSE per
# domain.

# %%
columns = ["encoder", "arch", "expansion", "sparsity", "l0", "l1"]
columns += [c for c in summary.columns if c not in columns + ["lam", "k"]]
summary[columns].style.format(precision=3)

# %% [markdown]
# ## Figure 12: skipping the activation function
#
# For each SAE, the validation accuracy of the probe on its codes and on its pre-activation codes
# (the encoder output before ReLU, TopK or the gate), joined by a grey line. The paper finds that
# pre-activation codes recover the accuracy that strongly sparse SAEs lose.

# %%
if settings.pre_activation:
    fig = ood_figures.preactivation_figure(summary, "val", probes)
    plt.show()
