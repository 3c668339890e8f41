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
# * **Classes** are 30 real ImageNet-1k synsets (their WordNet ids are the folder names), under
#   10 mid-level and 5 top-level WordNet hypernyms: a few dogs, birds, fish, vehicles and
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
# ImageNet study can do. This chapter shows the world and how the ViT's layers separate it.

# %% tags=["parameters"]
profile = "mini"
seed = 0
images_per_class = 20
encoder = "toyvit"

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from saekit.analysis.probes import train_probe
from saekit.analysis.widgets import switcher
from saekit.mini.toyworld import GROUPS, LEAVES, MIDS, ToyWorld, toyvit_path
from saekit.mini.toyworld.figures import classes_per_group, group_separation, sample_grid

# %% [markdown]
# ## The planted hierarchy
# Every leaf is an ImageNet class; every edge is a real WordNet hypernym relation (checked against
# WordNet by the test suite).

# %%
pd.DataFrame([{"group": GROUPS[leaf.group].name, "mid": MIDS[leaf.mid].name,
               "class": leaf.name, "wnid": leaf.wnid} for leaf in LEAVES]).pivot_table(
    index=["group", "mid"], values="class", aggfunc=", ".join)

# %% [markdown]
# ## Samples, masks and shifts
# One class of each group: the in-domain image, its part mask (used by the segmentation head of
# the patch-features chapter), and the same scene under each shift.

# %%
world = ToyWorld(seed=seed)
sample_grid(world, classes_per_group(1))
plt.show()

# %% [markdown]
# ## The toy ViT
# Its recorded accuracy, in-domain and under each shift (the OOD chapter measures what SAEs keep
# of this):

# %%
record = json.loads((toyvit_path() / "training.json").read_text())
pd.DataFrame(record["results"]).T.rename(columns=lambda c: c.replace("_", " ")).round(3)

# %% [markdown]
# ## How the layers separate the planted groups
# CLS activations of every layer over the validation images, extracted once into an activation
# store (`saekit.activations.extract`, cached under the work folder), then projected on the two
# directions that best spread the five group means (a linear discriminant view) and coloured by
# planted group. The view is fitted on the plotted images, so it flatters a little; the linear
# probes below (`saekit.analysis.probes`, trained on the train split, scored on val) are the honest number.

# %%
store = chapter.store(encoder, "val", n_per_class=images_per_class)
train_store = chapter.store(encoder, "train")
layers = store.layers
cls_by_layer = {layer: np.asarray(store.cls(layer)) for layer in layers}
group_of = np.array([leaf.group for leaf in LEAVES])
figure = group_separation(cls_by_layer, store.labels)
plt.show()

# %%
rows = []
for layer in layers:
    for target, name in ((lambda y: y, "class"), (lambda y: group_of[y], "group")):
        probe = train_probe(np.asarray(train_store.cls(layer)), target(train_store.labels))
        rows.append({"layer": layer, "target": name,
                     "accuracy": probe.accuracy(cls_by_layer[layer], target(store.labels))})
accuracy = pd.DataFrame(rows).pivot(index="layer", columns="target", values="accuracy")
accuracy.round(3)

# %% [markdown]
# Explore the projection layer by layer (the widget works on the static site too):

# %%
switcher({f"layer {layer}": group_separation({layer: cls_by_layer[layer]}, store.labels)
          for layer in layers}, "layer", control="slider")
