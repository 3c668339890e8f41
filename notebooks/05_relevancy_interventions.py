# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # Relevancy maps and causal interventions
#
# A feature's exemplars say *what* it fires on. This chapter asks two further questions of SAE
# features: *where* in the image does a feature's activation come from, and does the model
# actually *use* the feature?
#
# **Relevancy maps** (paper 000 §3.3, after Chefer et al. 2021). For a feature $f$ of an SAE on
# the CLS token of layer $L$, weight each block's attention probabilities $A_i$ by their
# gradient, keep the positive part per head and average the heads, then roll the result up
# through the blocks:
#
# $$\bar A_i = \mathbb{E}_h\big[(\nabla A_i \odot A_i)^+\big], \qquad \nabla A_i =
# \frac{\partial z_f}{\partial A_i}, \qquad R_0 = I, \quad R_i = R_{i-1} + \bar A_i R_{i-1}
# \quad (i \le L).$$
#
# The CLS row of $R_L$, without the identity's contribution and restricted to the patches, is
# the map: how much each patch contributed to $z_f$. Paper 000 Fig. 3 draws it for a
# hierarchical DINOv2 feature on orcas and grey whales.
#
# **Interventions** (paper 002 §3.3). For activations $x$ of a frozen model with a frozen task
# head $g$, in six steps:
#
# 1. encode and reconstruct, $z = \mathrm{SAE}_{enc}(x)$, $\hat x = \mathrm{SAE}_{dec}(z)$;
# 2. keep the reconstruction error, $e = x - \hat x$;
# 3. change chosen features in chosen patches, $z \to z'$ (here: suppress to 0);
# 4. decode, $\hat x' = \mathrm{SAE}_{dec}(z')$;
# 5. add the error back, $x' = \hat x' + e$;
# 6. compare $g(x)$ with $g(x')$.
#
# The error term makes an edit that changes nothing return the model's own output exactly, so
# every change comes from the edit. An effect only means something next to what a meaningless
# edit of the same size does, so every edit is run beside two controls, as the saev code does:
# the same change in norm along a **random direction**, and the same edit of a **random
# feature** (one whose activation mass in the edited patches is like the edited feature's, so
# the control's edit is about as large). Paper 002 edits two tasks: a linear
# classifier on the CLS token (§5.1) and a linear segmentation head on the patch tokens (§5.2);
# so does this chapter.

# %% tags=["parameters"]
profile = "mini"
seed = 0  # seeds the SAEs, the batch order, the heads and the controls
synsets = []  # WordNet ids of the groups studied; []: the toy world's 5 groups (ImageNet synsets)
relevancy_layer = 0  # layer of the relevancy CLS SAE; 0: profile default (mini 4, paper 36)
lam = 0.0  # λ of the CLS SAE (recipe olson2025); 0: profile default (mini 3, paper 10)
cls_epochs = 0  # passes over the store for the CLS SAE; 0: profile default (mini 60, paper 3)
n_images = 6  # top images per feature in the relevancy figure (twice as many in the widget)
patch_layer = 0  # layer of the edited patch SAE; 0: profile default (mini 1, paper second-to-last)
patch_arch = ""  # patch SAE architecture; "": profile default (mini topk, paper relu as paper 002)
patch_k = 8  # active latents per patch of a topk patch SAE
patch_expansion = 0  # patch SAE width over model width; 0: profile default (mini 4, paper 32)
patch_epochs = 0  # passes over the patch store; 0: profile default (mini 10, paper 1)
patch_batch = 0  # patch SAE minibatch; 0: profile default (mini 512, paper the recipe's 16384)
edit_images = 120  # at most this many validation images of each group are edited
n_suppress = 5  # the dose-response curve suppresses up to this many of a group's features
head_epochs = 20  # epochs of the linear segmentation head
head_weight_decay = 1.0  # AdamW weight decay of the segmentation head
weak_weight_decay = 0.001  # the weakly regularised head it is compared with
min_region_patches = 50  # parts covering fewer validation patches are left out of the table
segmentation_train = ""  # paper profile: image folder with masks in a sibling <folder>_masks
segmentation_val = ""  # paper profile: the same layout, for evaluation
segmentation_classes = 150  # paper profile: number of mask classes (ADE20K 150)
imagenet_train = ""  # paper profile: ImageNet-1k train folder (one sub-folder per wnid)
imagenet_val = ""  # paper profile: ImageNet-1k validation folder, same layout

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %% [markdown]
# ## Setting up
#
# The `mini` profile runs on the toy world and its 6-layer ViT (width 64, a 6×6 patch grid);
# the `paper` profile on DINOv2 ViT-g/14 and ImageNet. The groups studied are five WordNet
# synsets, *dog, bird, fish, vehicle* and *musical instrument*: the toy world's planted top
# level, and ordinary ImageNet synsets in the paper profile. Defaults that depend on the
# profile are resolved here:
#
# * the relevancy SAE reads layer 36 of DINOv2's 40, as paper 000 Fig. 3 does, and layer 4 of
#   the toy ViT's 6;
# * paper 002 edits the second-to-last layer. The toy ViT's CLS token has gathered most of its
#   group evidence by the middle layers (chapter 00's probes reach 94% on the groups at layer
#   2), so edits of later patch tokens hardly reach the class read off the last layer; in
#   `mini` the edit goes to layer 1, which leaves four blocks for it to travel through. The
#   segmentation head reads the same layer as the SAE;
# * paper 002 trains a ReLU SAE with an L1 penalty (recipe `stevens2025`). On the toy ViT's
#   64-wide activations the recipe's λ leaves hundreds of latents active per patch, so `mini`
#   trains a TopK SAE (k = 8, 4× expansion; same recipe otherwise) and fewer, smaller batches.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

from saekit.activations import extract
from saekit.analysis.exemplars import exemplar_figure, feature_facts, model_view, scan_store
from saekit.analysis.interventions import (
    Edit,
    compare_in_encoder,
)
from saekit.analysis.probes import (
    SegmentationConfig,
    mean_iou,
    train_probe,
    train_segmentation_head,
)
from saekit.analysis.relevancy import plot_relevancy_rows, relevancy_maps, relevancy_share
from saekit.analysis.widgets import switcher
from saekit.data import ImageFolder
from saekit.masks import (
    load_masks,
    patch_coverage,
)
from saekit.mini.toyworld import GROUPS, PART_NAMES
from saekit.models import load_encoder
from saekit.sae import SAESpec, evaluate, metrics_table, train_or_load
from saekit.studies import ontology as ontology_study
from saekit.studies.relevancy_interventions import (
    class_contrast,
    classification_table,
    edit_part,
    group_tie_table,
    part_effects,
    plot_class_probabilities,
    plot_segmentation_edit,
    plot_suppression_curves,
    suppression_curve,
    tie_scores,
)
from saekit.taxonomy import Taxonomy

mini = chapter.profile == "mini"
family = "toyvit" if mini else "dinov2"
encoder = load_encoder(chapter.encoder_id(family))
last = encoder.n_layers - 1
relevancy_layer = relevancy_layer or (4 if mini else 36)
patch_layer = patch_layer or (1 if mini else encoder.n_layers - 2)
lam = lam or (3.0 if mini else 10.0)
cls_epochs = cls_epochs or (60 if mini else 3)
patch_arch = patch_arch or ("topk" if mini else "relu")
patch_expansion = patch_expansion or (4 if mini else 32)
patch_epochs = patch_epochs or (10 if mini else 1)
patch_batch = patch_batch or (512 if mini else 16384)
pd.set_option("display.precision", 3)
print(encoder)

# %% [markdown]
# Activations come from the shared store cache: every layer's CLS token (the store chapters 00
# to 03 use too) and the patch tokens of the edited layer, for the training and validation
# images. The groups' classes are the leaves of each synset among the store's classes.

# %%
train_cls = chapter.store(family, "train")
val_cls = chapter.store(family, "val")
train_patch = chapter.store(family, "train", layers=[patch_layer], tokens="patch")
val_patch = chapter.store(family, "val", layers=[patch_layer], tokens="patch")
train_images, val_images = chapter.dataset("train"), chapter.dataset("val")
class_names = val_cls.class_names
taxonomy = Taxonomy.from_store(val_cls)
groups = {
    taxonomy.name(wnid): [val_cls.wnids.index(leaf) for leaf in taxonomy.leaf_set(wnid)]
    for wnid in (synsets or [group.wnid for group in GROUPS])
}
pd.DataFrame(
    {"classes": [len(c) for c in groups.values()],
     "examples": [", ".join(class_names[i] for i in c[:4]) for c in groups.values()]},
    index=list(groups),
)  # fmt: skip

# %% [markdown]
# ## Part 1: relevancy maps
#
# ### A CLS SAE and the features tied to each group
#
# The relevancy SAE is the ontology chapter's: ReLU, recipe `olson2025`, 8× expansion, on the
# CLS token of one layer, trained by the sweep trainer (`saekit.sae.sweep_from_store`) and
# reused from that chapter's cache when it has run. One streaming pass over the validation
# store (`saekit.analysis.exemplars.scan_store`) gives every feature's top images and its mean
# activation per class; the feature *tied* to a group is the one whose mean activation over
# the group's classes exceeds its mean over the other classes by the most.

# %%
cls_sae = ontology_study.layer_saes(
    train_cls,
    chapter.workdir / "saes",
    lam=lam,
    epochs=cls_epochs,
    layers=[relevancy_layer],
    seed=seed,
)[relevancy_layer]
cls_scan = scan_store(val_cls, cls_sae, relevancy_layer, k=2 * n_images, rank_by="cls")
cls_features = {
    name: int(np.argmax(class_contrast(cls_scan.class_stats.mean_act_SC, classes)))
    for name, classes in groups.items()
}
facts = feature_facts(cls_scan, list(cls_features.values()))
facts.insert(0, "group", list(cls_features))
facts

# %% [markdown]
# ### Where each feature looks
#
# Each row is one group's feature on its top validation images, every image overlaid with the
# feature's relevancy map (each map scaled to its own maximum; the number is the feature's
# CLS activation). The maps come from one forward pass with eager attention and one backward
# pass per feature (`saekit.analysis.relevancy.relevancy_maps`).

# %%
relevancy = {}
for name, feature in cls_features.items():
    rows, _ = cls_scan.exemplars(feature)
    images = [val_images.load(int(val_cls.rows[r])) for r in rows]
    relevancy[name] = (
        rows,
        images,
        relevancy_maps(encoder, images, cls_sae, relevancy_layer, feature),
    )
first = {name: range(min(n_images, len(images))) for name, (_, images, _) in relevancy.items()}
figure = plot_relevancy_rows(
    [(f"{name}\n{cls_scan.name(cls_features[name])}", images[: len(first[name])],
      maps.subset(first[name]))
     for name, (_, images, maps) in relevancy.items()],
    processor=encoder.processor,
)  # fmt: skip
plt.show()

# %% [markdown]
# Pick a feature to see its relevancy on twice as many of its top images:

# %%
switcher(
    {
        f"{name}: {cls_scan.name(cls_features[name])}": plot_relevancy_rows(
            [
                (f"top 1-{len(first[name])}", images[: len(first[name])], maps.subset(first[name])),
                (
                    f"top {len(first[name]) + 1}-{len(images)}",
                    images[len(first[name]) :],
                    maps.subset(range(len(first[name]), len(images))),
                ),
            ],
            processor=encoder.processor,
        )  # fmt: skip
        for name, (_, images, maps) in relevancy.items()
    },
    "feature",
)

# %% [markdown]
# ### Does the relevancy fall on the object?
#
# In the toy world the answer is known: every image comes with a mask of its object's parts.
# For each feature's top images, the share of relevancy on the object's patches (weighted by
# how much of each patch the object covers) is compared with the object's share of the image,
# which is what a map spread evenly over the patches would score. ImageNet has no masks, so
# this check runs in the `mini` profile only.

# %%
if mini:
    object_masks = load_masks(val_cls, val_images, encoder.processor)
    object_rows = []
    for name, (rows, _, maps) in relevancy.items():
        coverage = patch_coverage(object_masks[rows], maps.grid)
        share = relevancy_share(maps.maps_FBhw[0], coverage)
        object_rows.append(
            {
                "group": name,
                "feature": cls_scan.name(cls_features[name]),
                "relevancy on the object": share.mean(),
                "object's share of the image": coverage.mean(),
                "ratio": share.mean() / coverage.mean(),
            }
        )
    display(pd.DataFrame(object_rows).set_index("group"))

# %% [markdown]
# ## Part 2: interventions
#
# ### A patch SAE
#
# Paper 002 trains its SAEs on patch tokens (recipe `stevens2025`: inputs centred and scaled
# to unit mean norm, unit-norm decoder rows, warm-ups of 500 steps). Its quality on the
# patches of (up to 1,000) validation images, in paper 002's MSE / L0 / Dead / Dense terms:

# %%
spec = SAESpec(
    arch=patch_arch, layer=patch_layer, expansion=patch_expansion, recipe="stevens2025",
    k=patch_k if patch_arch in ("topk", "batchtopk") else None, seed=seed,
)  # fmt: skip
patch_sae = train_or_load(
    spec, train_patch, root=chapter.workdir / "saes", tokens="patch", batch_size=patch_batch,
    epochs=patch_epochs, seed=seed,
)  # fmt: skip
val_patches = np.array(val_patch.patches(patch_layer)[:1000], dtype=np.float32)  # ≤ 1000 images
metrics_table({spec.label: evaluate(patch_sae, val_patches.reshape(-1, val_patches.shape[-1]), normalized=True)})

# %% [markdown]
# ### Classification: observe, hypothesise, intervene
#
# The frozen task head is a linear probe (softmax regression, `saekit.analysis.probes.train_probe`) on
# the **last** layer's CLS token, trained on the training images. The edit is made on the
# patch tokens of the SAE's layer; the rest of the encoder then runs on the edited tokens
# (`continue_forward`), and the probe reads the class off the last layer, as in paper 002
# §5.1.

# %%
probe = train_probe(np.asarray(train_cls.cls(last)), train_cls.labels, n_classes=len(class_names))
print(f"probe accuracy on the validation images: "
      f"{probe.accuracy(np.asarray(val_cls.cls(last)), val_cls.labels):.3f}")  # fmt: skip

# %% [markdown]
# **Observe.** A pass over the training patches ranks every image by each feature's largest
# patch activation; the features tied to a group are ranked by how much more they fire on the
# group's classes than on the others. Here are the top-ranked feature's exemplars for each
# group, with its activation on each patch overlaid:

# %%
patch_scan = scan_store(train_patch, patch_sae, patch_layer, k=6, rank_by="max")
ranked = {
    name: [int(f) for f in np.argsort(-class_contrast(patch_scan.class_stats.mean_act_SC, classes))]
    for name, classes in groups.items()
}
fig, axes = plt.subplots(len(groups), 6, figsize=(9, 1.6 * len(groups)), squeeze=False)
for row, (name, features) in enumerate(ranked.items()):
    exemplar_figure(patch_scan, train_patch, patch_sae, train_images, features[0], k=6,
                    processor=encoder.processor, axes=list(axes[row]), title="")  # fmt: skip
    axes[row, 0].set_ylabel(f"{name}\n{patch_scan.name(features[0])}", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# A feature's exemplars are the images where it peaks; the tie is about its average over the
# group's images. The two can disagree: a colour or texture feature may peak on another
# group's images and still fire, more weakly, on nearly every image of this one. The table
# gives each feature's mean image score (its largest patch activation) and how often it fires,
# on the group's classes and on the others:

# %%
group_tie_table(patch_scan.class_stats, {name: ranked[name][0] for name in groups}, groups)

# %% [markdown]
# **Hypothesise.** If the model uses such a feature to recognise the group, suppressing it in
# every patch should lower the probability the probe gives the group.
#
# **Intervene.** For up to `edit_images` validation images of each group, the group's feature
# is set to 0 in every patch of the SAE's layer (steps 1-5), and the probe's outputs are
# compared (step 6) with the original ones and with the two controls:

# %%
group_images, group_labels, class_edits = {}, {}, {}
rng = np.random.default_rng(seed)
for name, classes in groups.items():
    rows = np.flatnonzero(np.isin(val_cls.labels, classes))
    rows = np.sort(rng.choice(rows, size=min(edit_images, len(rows)), replace=False))
    group_images[name] = [val_images.load(int(val_cls.rows[r])) for r in rows]
    group_labels[name] = val_cls.labels[rows]
    class_edits[name] = compare_in_encoder(
        encoder, group_images[name], patch_sae, patch_layer, Edit(ranked[name][0]), probe, seed=seed
    )
effects = pd.concat(
    {
        name: classification_table(comparison, group_labels[name], groups[name])
        for name, comparison in class_edits.items()
    },
    names=["group", "condition"],
)
conditions = ["original", "edited", "random direction", "random feature"]
effects["p(group)"].unstack("condition")[conditions]

# %% [markdown]
# The full table (probability of the true class and of the group, accuracy, and the share of
# images whose predicted class changed):

# %%
effects.unstack("condition").swaplevel(axis=1)[conditions]

# %% [markdown]
# One feature is a single direction among many that carry a group, so suppressing it may not
# be enough. The dose-response curve suppresses the group's top 1, 2, ... `n_suppress` tied
# features together, each time beside the controls of the same size:

# %%
curves = pd.concat(
    [suppression_curve(encoder, group_images[name], patch_sae, patch_layer,
                       ranked[name][:n_suppress], probe, group_labels[name], groups[name],
                       seed=seed).assign(group=name)
     for name in groups],
    ignore_index=True,
)  # fmt: skip
plot_suppression_curves(curves)
plt.show()

# %% [markdown]
# One image up close: the image of the most affected group whose group probability the
# single-feature edit lowered most, and the probe's top classes under each condition. Pick a
# group to see its most affected image.

# %%
probability_views = {}
for name, comparison in class_edits.items():
    probs = {c: out.softmax(-1)[:, groups[name]].sum(-1) for c, out in comparison.outputs.items()}
    worst = int(np.argmax((probs["original"] - probs["edited"]).numpy()))
    probability_views[name] = plot_class_probabilities(
        comparison, worst, class_names,
        image=model_view(group_images[name][worst], encoder.processor),
    )  # fmt: skip
strongest = effects["p(group)"].unstack("condition").eval("original - edited").idxmax()
print(f"most affected group: {strongest}")
display(probability_views[strongest])
switcher(probability_views, "group")

# %% [markdown]
# ### Segmentation: suppressing a part where it is
#
# Paper 002 §5.2 trains a linear segmentation head on DINOv2's patch tokens over ADE20K: one
# linear map per patch to class logits, bilinearly upsampled to the image for training and
# mIoU, drawn one colour per patch for viewing. In the `mini` profile the toy world's part
# masks (background, body, head, legs, wing, tail, fin, cabin, wheels, neck) make that head
# real; in the `paper` profile it needs a folder of segmentation images and masks (e.g.
# ADE20K converted to an image folder with masks beside it, see `saekit.masks.MASK_LAYOUT`).
# The head is trained with AdamW at a constant learning rate, and with strong weight decay:
# why that matters is the last section of this chapter.

# %%
if mini:
    seg_train, seg_val = train_patch, val_patch
    seg_train_images, seg_val_images = train_images, val_images
    part_names = list(PART_NAMES)
else:
    seg_train_images = ImageFolder(chapter.require_folder("segmentation_train"))
    seg_val_images = ImageFolder(chapter.require_folder("segmentation_val"))
    seg_train, seg_val = (
        extract(encoder, images, layers=[patch_layer], tokens="patch", dtype="float16",
                out=chapter.workdir / "stores" / f"{family}-segmentation-{split}-{patch_layer}")
        for split, images in (("train", seg_train_images), ("val", seg_val_images))
    )  # fmt: skip
    part_names = [f"class {i}" for i in range(segmentation_classes)]
train_masks = load_masks(seg_train, seg_train_images, encoder.processor)
val_masks = load_masks(seg_val, seg_val_images, encoder.processor)
grid = seg_train.grid(patch_layer)
seg_val_patches = np.array(seg_val.patches(patch_layer), dtype=np.float32)
head_settings = dict(lr=3e-2, epochs=head_epochs, seed=seed)
head = train_segmentation_head(
    seg_train.patches(patch_layer), train_masks, grid, len(part_names), progress=True,
    config=SegmentationConfig(weight_decay=head_weight_decay, **head_settings),
)  # fmt: skip
predicted = head.predict(torch.as_tensor(seg_val_patches), val_masks.shape[1:])
miou, iou = mean_iou(predicted, val_masks, len(part_names))
print(f"validation mIoU {miou:.3f}")
pd.DataFrame({"IoU": iou}, index=part_names).T

# %% [markdown]
# **Observe and hypothesise.** For each part, the patches it covers at least half of are its
# region; the feature tied to the part is the one whose mean activation on the part's
# training patches exceeds its mean on all other patches by the most (`tie_scores`). If the
# head relies on it, suppressing it on the part's patches should move the head's prediction
# there, and only there.
#
# **Intervene.** On every validation image with such patches, the part's feature is set to 0
# on them (and nowhere else). Parts that cover fewer than `min_region_patches` validation
# patches at least half (thin parts such as legs, fins and necks) are left out. Per part: the
# share of edited patches whose predicted class changed and the mean absolute logit change
# there, for the edit and each control:

# %%
train_seg_patches = seg_train.patches(patch_layer)
regions = {
    part: (patch_coverage(train_masks, grid, part) >= 0.5).reshape(len(train_masks), -1)
    for part in range(1 if mini else 0, len(part_names))  # in mini, 0 is the background
}
parts = [
    p for p in regions if (patch_coverage(val_masks, grid, p) >= 0.5).sum() >= min_region_patches
]
part_features = {
    p: int(np.argmax(tie_scores(patch_sae, train_seg_patches, regions[p]))) for p in parts
}
part_edits = [edit_part(seg_val_patches, val_masks, patch_sae, head, p, f, seed=seed)
              for p, f in part_features.items()]  # fmt: skip
part_table = part_effects(part_edits, val_masks, part_names)
part_table[["feature", "patches"] + [c for c in part_table if c.startswith(("changed", "|Δ|"))]]

# %% [markdown]
# The part's IoU and the mIoU over all parts, on the edited images, before (original) and
# after the edit and the controls (pixels; logits bilinearly upsampled):

# %%
part_table[[c for c in part_table if c.startswith(("IoU", "mIoU"))]]

# %% [markdown]
# The part whose patches the edit changed most, on the images where it covers the most
# patches. Left: the image with the edited patches outlined, then the ground truth, then the
# head's prediction per patch under each condition. Pick another part in the widget below.

# %%
part_views = {}
for e in part_edits:
    picks = np.argsort(-e.region_BP.sum(1).numpy(), kind="stable")[:3]
    views = [model_view(seg_val_images.load(int(seg_val.rows[e.images[b]])), encoder.processor)
             for b in picks]  # fmt: skip
    part_views[part_names[e.part]] = plot_segmentation_edit(
        views, val_masks[e.images[picks]], e, picks, part_names
    )
strongest_part = part_table["changed: edited"].idxmax()
display(part_views[strongest_part])
switcher(part_views, "part")

# %% [markdown]
# ### Why the head's regularisation matters
#
# A linear head trained with little weight decay can put large weights on directions the
# training activations never vary along. The random-direction control pushes activations off
# the data's span, so against such a head it can look as "causal" as the real edit. The same
# edit of the same part, against a head trained with weak weight decay:

# %%
weak_head = train_segmentation_head(
    train_seg_patches, train_masks, grid, len(part_names), progress=True,
    config=SegmentationConfig(weight_decay=weak_weight_decay, **head_settings),
)  # fmt: skip
strongest_edit = part_edits[list(part_table.index).index(strongest_part)]
weak_edit = edit_part(seg_val_patches, val_masks, patch_sae, weak_head, strongest_edit.part,
                      strongest_edit.feature, seed=seed)  # fmt: skip
head_table = pd.concat(
    {f"weight decay {head_weight_decay:g}": part_effects([strongest_edit], val_masks, part_names),
     f"weight decay {weak_weight_decay:g}": part_effects([weak_edit], val_masks, part_names)},
    names=["head"],
)[[c for c in part_table if c.startswith(("changed", "|Δ|"))]]  # fmt: skip
head_table["|Δ| edited ÷ random direction"] = (
    head_table["|Δ|: edited"] / head_table["|Δ|: random direction"]
)
head_table

# %% [markdown]
# The last column is the test that matters: how many times further the edit moves the head's
# logits on the part's patches than a random direction of the same size. Above 1, the edit
# has an effect noise of its size does not have; near or below 1, an edit's effect can no
# longer be told from noise, which is what a weakly regularised head risks. Paper 002 sweeps
# the head's weight decay; this is why the sweep matters for interventions, not only for mIoU.
#
# ## Summary
#
# The numbers this run produced, read off the tables above:

# %%
relevancy_ratio = pd.DataFrame(object_rows)["ratio"] if mini else pd.Series(dtype=float)
moved = effects["p(group)"].unstack("condition").eval("original - edited")
control = effects["p(group)"].unstack("condition").eval("original - `random direction`")
control_feature = effects["p(group)"].unstack("condition").eval("original - `random feature`")
beats = (part_table["changed: edited"] > part_table["changed: random direction"]).sum()
beats_feature = (part_table["changed: edited"] > part_table["changed: random feature"]).sum()
lines = [
    f"Relevancy on the object: {relevancy_ratio.min():.1f} to {relevancy_ratio.max():.1f} times "
    "what an even spread over the patches would give." if mini else "",
    f"Classification: suppressing one feature lowered p(group) by more than 0.1 for "
    f"{(moved > 0.1).sum()} of {len(moved)} groups (largest drop {moved.max():.2f}, for "
    f"{moved.idxmax()}); the random direction's largest drop was {control.max():.2f}, the "
    f"random feature's {control_feature.max():.2f}.",
    f"Segmentation: the edit changed the predicted class of more of the part's patches than "
    f"the random direction did for {beats} of {len(part_table)} parts, and than the random "
    f"feature did for {beats_feature}; patches outside the "
    "edited region never change (the head is per patch, and the edit touches only the region).",
    "Head regularisation: the edit moved the logits "
    + " and ".join(f"{r:.1f}x as far as a random direction ({head})"
                   for (head, _), r in head_table["|Δ| edited ÷ random direction"].items()) + ".",
]  # fmt: skip
print("\n".join(line for line in lines if line))

# %% [markdown]
# * A relevancy map locates where a CLS feature's evidence comes from, without any labels;
#   where ground-truth masks exist, it can be scored against them.
# * The six-step edit with the error term changes the model only through the edited
#   features, so an effect next to its two controls is evidence that the model uses the
#   feature, and an effect no larger than the controls' is evidence of nothing.
# * A group's recognition can rest on a single feature or on many; the dose-response curves
#   show which, group by group.

# %%
plt.close("all")
