# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # The toy world: what the mini book runs on
#
# The papers study DINOv2, CLIP and ViT on ImageNet. A book that CI can build on a 2-core CPU with
# no network cannot load those, and a miniature with random weights has no hierarchy to find: its
# SAE features would be noise. So the **mini** profile runs every chapter on a small world whose
# truth is known.
#
# * **Classes** are real ImageNet-1k synsets (their WordNet ids are the folder names), under
#   mid-level and top-level WordNet hypernyms: a few dogs, birds, fish, vehicles and
#   instruments.
# * **Each level of the hierarchy owns a visual factor**: the top-level group sets the shape
#   family, the mid level a palette and texture family, the leaf the pattern frequency; position,
#   scale, rotation and background are nuisances.
# * **Shifts** keep the labels, mirroring ImageNet-V2, -Sketch, -R and -A: a fresh sample with
#   other nuisances, an edges-only sketch, a palette-swapped rendition, and hard examples with
#   clutter and occlusion. Noise textures of no class serve as far-OOD images.
# * **A miniature ViT** (6 layers, width 64, a real `transformers` ViT) was trained on the toy
#   world by `python -m saekit.mini.toyworld.train`; its weights ship in `saekit/data/toyvit` and load
#   through `from_pretrained` like any hub checkpoint.
#
# The ontology chapter can then check its metrics against the planted hierarchy, which no
# ImageNet study can do. This chapter shows the world and how the ViT's layers separate it. It is
# the same under every profile: with `-p profile paper` it still shows the toy world, since the
# papers' models and ImageNet take over from chapter 01 on.

# %% tags=["parameters"]
profile = "mini"
seed = 0  # seed of the toy world drawn for the sample figure
images_per_class = 20  # validation images per class for the figures and probes
encoder = "toyvit"  # encoder whose layers are shown: the toy ViT trained on the toy world
device: str | None = None  # where the probes train; None: cuda when available, else cpu

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %%
import dataclasses

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from saekit.analysis.widgets import switcher
from saekit.mini.toyworld import ToyWorld
from saekit.mini.toyworld.figures import classes_per_group, group_separation, sample_grid
from saekit.studies import toy_world as study

settings = study.ToyWorldSettings.for_profile(**chapter.params)
# The toy world under any profile: its images and stores are those of the mini profile.
toy = dataclasses.replace(chapter, profile="mini")
display(Markdown(study.world_summary()))

# %% [markdown]
# ## The planted hierarchy
# Every leaf is an ImageNet class; every edge is a real WordNet hypernym relation (checked against
# WordNet by the test suite).

# %%
study.hierarchy_table()

# %% [markdown]
# ## Samples, masks and shifts
# One class of each group: the in-domain image, its part mask (used by the segmentation head of
# the patch-features chapter), and the same scene under each shift.

# %%
sample_grid(ToyWorld(seed=settings.seed), classes_per_group(1))
plt.show()

# %% [markdown]
# ## The toy ViT
# Its recorded accuracy, in-domain and under each shift (the OOD chapter measures what SAEs keep
# of this):

# %%
study.training_record().round(3)

# %% [markdown]
# ## How the layers separate the planted groups
# CLS activations of every layer over the validation images, extracted once into an activation
# store (`saekit.activations.extract`, cached under the work folder), then projected on the two
# directions that best spread the five group means (a linear discriminant view) and coloured by
# planted group. The view is fitted on the plotted images, so it flatters a little; the linear
# probes below (`saekit.analysis.probes`, trained on the train split, scored on val) are the honest number.

# %%
store = toy.store(settings.encoder, "val", n_per_class=settings.images_per_class)
train_store = toy.store(settings.encoder, "train")
cls_by_layer = {layer: np.asarray(store.cls(layer)) for layer in store.layers}
figure = group_separation(cls_by_layer, store.labels)
plt.show()

# %%
study.layer_probes(train_store, store, settings.device).round(3)

# %% [markdown]
# Explore the projection layer by layer (the widget works on the static site too):

# %%
switcher(
    {
        f"layer {layer}": group_separation({layer: cls_by_layer[layer]}, store.labels)
        for layer in store.layers
    },
    "layer",
    control="slider",
)
