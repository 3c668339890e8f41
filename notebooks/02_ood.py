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
encoders = []  # encoder families; empty: ["toyvit"] (mini) or ["dinov2", "clip"] (paper)
layer = -1  # whose CLS token the SAEs read; -1 is the last layer, as in the paper
archs = ["relu", "topk", "gated"]  # SAE architectures
lambdas = []  # λ of the ReLU and Gated SAEs; empty: profile default (see below)
ks = []  # k of the TopK SAEs; empty: profile default
expansions = []  # SAE width ÷ model width; empty: profile default
epochs = 0  # passes over the training images; 0: profile default (mini 30, paper 3)
lr = 0.0  # SAE learning rate; 0: profile default (mini 1e-3, paper 1e-4)
probe_per_class = 0  # training images per class for the probes; 0: all (mini), 100 (paper)
pre_activation = True  # also probe the pre-activation codes (paper Fig. 12)
table1_arch = "relu"  # the SAE Table 1 reports: architecture,
table1_sparsity = 0.5  # its λ (or k for TopK),
table1_expansion = 8  # and its expansion
seed = 0  # seeds the SAEs' initialisation, the batch order and the probes' subsample
device = ""  # where SAEs and probes train; empty: "cuda" when available, else "cpu"
imagenet_train = ""  # paper profile: ImageNet-1k train folder (one sub-folder per wnid)
imagenet_val = ""  # paper profile: ImageNet-1k val folder
imagenet_v2 = ""  # paper profile: ImageNet-V2 (matched frequency), folders named by wnid
imagenet_sketch = ""  # paper profile: ImageNet-Sketch
imagenet_rendition = ""  # paper profile: ImageNet-R (200 classes)
imagenet_hard = ""  # paper profile: ImageNet-A (200 classes)
imagenet_far_ood = ""  # paper profile: far-OOD images (e.g. OpenOOD's iNaturalist/Textures)

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Markdown, display

import saekit.analysis.widgets
from saekit.sae import get_recipe, train_or_load
from saekit.studies import ood

# %% [markdown]
# ## Profile defaults
#
# The paper profile runs the paper's grid (7 values of λ or k × 3 expansions × 3 architectures)
# on DINOv2 ViT-g/14 and CLIP ViT-L/14 with the paper's recipe (`olson2025_ood`: Adam at 1e-4,
# 5% warm-up, 20% decay, λ warm-up, minibatch 64, 3 epochs). Its probes see 100 training images
# per class: the SAE codes of all 1.28M images (12,288 floats each at expansion 8) would not fit
# in memory.
#
# The mini profile trains a 3 × 2 × 2 grid on the toy ViT. Its training set has 1,800 images
# (29 minibatches an epoch), so it trains 30 epochs at lr 1e-3 instead of 3 at 1e-4, and its
# sparsities are scaled to a 64-wide residual stream: λ ∈ {0.5, 5} (0.5 is Table 1's value),
# k ∈ {4, 16}, expansions 4 and 8. As the 200-of-1000-class restriction of ImageNet-A and -R,
# its `hard` and `rendition` sets are scored on every other toy class (indices 0, 2, 4, …).

# %%
mini = chapter.profile == "mini"
encoders = encoders or (["toyvit"] if mini else ["dinov2", "clip"])
grid = ood.SweepGrid(
    archs=tuple(archs),
    lambdas=tuple(lambdas or ([0.5, 5.0] if mini else ood.PAPER_GRID.lambdas)),
    ks=tuple(ks or ([4, 16] if mini else ood.PAPER_GRID.ks)),
    expansions=tuple(expansions or ([4, 8] if mini else ood.PAPER_GRID.expansions)),
)
recipe = get_recipe(
    "olson2025_ood", epochs=epochs or (30 if mini else 3), lr=lr or (1e-3 if mini else 1e-4)
)
probe_per_class = probe_per_class or (0 if mini else 100)
device = device or ("cuda" if torch.cuda.is_available() else "cpu")
eval_splits = ["val", *ood.SHIFTS]
print(f"encoders {encoders}; {grid}; epochs {recipe.epochs}, lr {recipe.lr:g}; on {device}")

# %% [markdown]
# ## Activations
#
# The chosen layer's CLS token for the training images, the validation images, every shifted
# set and the far-OOD images, extracted once per encoder and cached in the profile's work folder.

# %%
splits = ["train", *eval_splits, "far_ood"]
stores = {
    encoder: {split: chapter.store(encoder, split, layers=[layer]) for split in splits}
    for encoder in encoders
}
for encoder in encoders:
    print(encoder, {split: len(store) for split, store in stores[encoder].items()})

# %% [markdown]
# ## The SAE sweep
#
# Every SAE of an encoder trains in **one pass** over its training activations (saekit's sweep
# trainer stacks SAEs of equal architecture and width and feeds each minibatch to all of them).
# A finished sweep is saved and reused when the chapter reruns with the same settings.

# %%
saes = {}
for encoder in encoders:
    train_store = stores[encoder]["train"]
    specs = grid.specs(layer=train_store.layers[-1], recipe=recipe)
    saes[encoder] = train_or_load(
        specs, train_store, root=chapter.workdir / "saes", seed=seed, device=device
    )
sweep = pd.concat([ood.sweep_table(saes[encoder], encoder) for encoder in encoders])
sweep

# %% [markdown]
# ## Linear probes: raw embedding vs SAE codes
#
# One multinomial logistic regression per representation (raw embedding, SAE codes, SAE
# pre-activation codes), standardised and fit with L-BFGS under identical settings, on the
# training images. Every evaluation set is labelled in the training set's class order (by wnid),
# and the class-subset sets are scored on their subset only.

# %%
probes = []
for encoder in encoders:
    train = ood.LabelledActs.from_store(stores[encoder]["train"])
    train = train.per_class(probe_per_class, seed=seed)
    evals = {
        split: ood.LabelledActs.from_store(stores[encoder][split], classes=train.classes)
        for split in eval_splits
    }
    subsets = ood.restricted_classes(train.classes, chapter.profile)
    probes.append(
        ood.probe_table(
            saes[encoder],
            train,
            evals,
            class_subsets=subsets,
            pre_activation=pre_activation,
            encoder=encoder,
            device=device,
        )
    )
probes = pd.concat(probes, ignore_index=True)
print({split: len(subset) for split, subset in subsets.items()}, "classes scored")

# %% [markdown]
# ## Reconstruction in-domain, near- and far-OOD
#
# Each SAE's MSE, L0 and L1 on the validation images (in-domain), on the shifted sets
# (near-OOD: same classes, new rendering) and on the far-OOD images.

# %%
recon = pd.concat(
    [
        ood.reconstruction_table(
            saes[encoder],
            {split: ood.LabelledActs.from_store(stores[encoder][split]) for split in splits[1:]},
            encoder=encoder,
        )
        for encoder in encoders
    ],
    ignore_index=True,
)
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
    encoder: ood.pick_sae(sweep, table1_arch, table1_expansion, table1_sparsity, encoder)
    for encoder in encoders
}
ood.table1(probes, chosen, pre_activation=pre_activation)

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
fig = ood.ood_figure(summary, raw_ood)
plt.show()

# %%
display(Markdown(ood.findings(summary, probes).replace("\n", "\n\n")))

# %% [markdown]
# **Explore by architecture.** Pick one to highlight its SAEs in all three panels (the others
# stay in grey, so the axes do not move).

# %%
saekit.analysis.widgets.switcher(
    {arch: ood.ood_figure(summary, raw_ood, focus=("arch", arch)) for arch in grid.archs},
    description="architecture",
    control="toggle",
)

# %% [markdown]
# ## Figure 10: every SAE on every set
#
# The expanded Table 1: accuracy on each evaluation set for the codes (filled) and the
# pre-activation codes (hollow) of every SAE, with the raw embedding's probe dashed.

# %%
fig = ood.split_figure(summary, eval_splits, probes)
plt.show()

# %% [markdown]
# **Explore by evaluation set.**

# %%
saekit.analysis.widgets.switcher(
    {
        f"{split} ({ood.TABLE1_COLUMNS[split]})": ood.split_figure(
            summary, split, probes, panel_size=(6.0, 4.2)
        )
        for split in eval_splits
    },
    description="set",
    control="dropdown",
)

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
if pre_activation:
    fig = ood.preactivation_figure(summary, "val", probes)
    plt.show()
