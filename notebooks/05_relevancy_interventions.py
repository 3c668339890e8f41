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
synsets: list[str] | None = None  # WordNet ids of the groups; None: the toy world's 5 groups
relevancy_layer: int | None = None  # layer of the relevancy CLS SAE; None: mini 4, paper 36
lam: float | None = None  # λ of the CLS SAE (olson2025); None: chapter 03's (mini 3, paper 10)
cls_epochs: int | None = None  # CLS SAE's passes over the store; None: chapter 03's (mini 100, paper 3)
n_images = 6  # top images per feature in the relevancy figure (twice as many in the widget)
patch_layer: int | None = None  # layer of the edited patch SAE; None: mini 1, paper 38 (second-to-last)
patch_arch: str | None = None  # patch SAE architecture; None: mini topk, paper relu (as paper 002)
patch_k = 8  # active latents per patch of a topk patch SAE
patch_expansion: int | None = None  # patch SAE width over model width; None: mini 4, paper 32
patch_epochs: int | None = None  # passes over the patch store; None: mini 10, paper 1
patch_batch: int | None = None  # patch SAE minibatch; None: mini 512, paper the recipe's 16384
edit_images = 120  # at most this many validation images of each group are edited
n_suppress = 5  # the dose-response curve suppresses up to this many of a group's features
head_epochs = 20  # epochs of the linear segmentation head
head_weight_decay = 1.0  # AdamW weight decay of the segmentation head
weak_weight_decay = 0.001  # the weakly regularised head it is compared with
min_region_patches = 50  # parts covering fewer validation patches are left out of the table
segmentation_train: str | None = None  # paper profile: image folder, masks in sibling <folder>_masks
segmentation_val: str | None = None  # paper profile: the same layout, for evaluation
segmentation_classes = 150  # paper profile: number of mask classes (ADE20K 150)
imagenet_train: str | None = None  # paper profile: ImageNet-1k train folder (one sub-folder per wnid)
imagenet_val: str | None = None  # paper profile: ImageNet-1k validation folder, same layout
device: str | None = None  # where the encoder and SAEs run; None: cuda when available, else cpu

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %% [markdown]
# ## Setting up
#
# The `mini` profile runs on the toy world and its 6-layer ViT (width 64, a 6×6 patch grid);
# the `paper` profile on DINOv2 ViT-g/14 and ImageNet. The groups studied are five WordNet
# synsets, *dog, bird, fish, vehicle* and *musical instrument*: the toy world's planted top
# level, and ordinary ImageNet synsets in the paper profile. The settings resolve the
# profile's defaults:
#
# * the relevancy SAE reads layer 36 of DINOv2's 40, as paper 000 Fig. 3 does, and layer 4 of
#   the toy ViT's 6. It is chapter 03's SAE of that layer (same λ, epochs, seed and store), so
#   it comes from the SAE cache when chapter 03 has run;
# * paper 002 edits the second-to-last layer. The toy ViT's CLS token gathers its group
#   evidence early (chapter 00 probes it layer by layer), so edits of its last patch tokens
#   hardly reach the class read off the last layer; in `mini` the edit goes to layer 1, which
#   leaves four blocks for it to travel through. The segmentation head reads the same layer as
#   the SAE;
# * paper 002 trains a ReLU SAE with an L1 penalty (recipe `stevens2025`). On the toy ViT's
#   64-wide activations the recipe's λ leaves far too many latents active per patch (chapter
#   04 measures it), so `mini` trains a TopK SAE (k = 8, 4× expansion; same recipe otherwise)
#   and fewer, smaller batches.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

from saekit.analysis.exemplar_plots import exemplar_figure, model_view
from saekit.analysis.exemplars import feature_facts, scan_store
from saekit.analysis.interventions import Edit, compare_in_encoder
from saekit.analysis.probes import (
    SegmentationConfig,
    mean_iou,
    train_probe,
    train_segmentation_head,
)
from saekit.analysis.relevancy import plot_relevancy_rows, relevancy_maps
from saekit.analysis.widgets import switcher
from saekit.masks import load_masks
from saekit.sae import evaluate, metrics_table, train_or_load
from saekit.studies import ontology as ontology_study
from saekit.studies.relevancy_interventions import (
    RelevancySettings,
    class_contrast,
    group_tie_table,
    object_relevancy,
    resource_needs,
    summary,
    synset_groups,
)
from saekit.studies.relevancy_interventions_edits import (
    classification_table,
    edit_part,
    part_effects,
    part_features,
    segmentation_data,
    suppression_curve,
)
from saekit.studies.relevancy_interventions_figures import (
    plot_class_probabilities,
    plot_segmentation_edit,
    plot_suppression_curves,
)

settings = RelevancySettings.for_profile(**chapter.params)
plan = chapter.plan(**resource_needs(settings))
encoder = chapter.encoder(settings.family)
last = encoder.n_layers - 1
pd.set_option("display.precision", 3)
print(encoder)
print(f"relevancy: CLS SAE of layer {settings.relevancy_layer} (λ = {settings.lam:g}, "
      f"{settings.cls_epochs} epochs); edits: {settings.patch_spec.label} patch SAE, "
      f"{settings.patch_epochs} epochs of {settings.patch_batch}; on {settings.device}")  # fmt: skip

# %% [markdown]
# Activations come from the shared store cache: every layer's CLS token (the store chapters 00
# to 03 use too) and the patch tokens of the edited layer, for the training and validation
# images. The groups' classes are the leaves of each synset among the store's classes.

# %%
train_cls = chapter.store(settings.family, "train")
val_cls = chapter.store(settings.family, "val")
layers = [settings.patch_layer]
train_patch = chapter.store(settings.family, "train", layers=layers, tokens="patch")
val_patch = chapter.store(settings.family, "val", layers=layers, tokens="patch")
train_images, val_images = chapter.dataset("train"), chapter.dataset("val")
class_names = val_cls.class_names
groups = synset_groups(val_cls, settings.synsets)
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
# CLS token of one layer. The request (store, λ, epochs, seed) equals chapter 03's, so the SAE
# cache (`saekit.sae.train_or_load`) hands back the SAE chapter 03 trained; it is trained here
# only when that chapter has not run. One streaming pass over the validation
# store (`saekit.analysis.exemplars.scan_store`) gives every feature's top images and its mean
# activation per class; the feature *tied* to a group is the one whose mean activation over
# the group's classes exceeds its mean over the other classes by the most.

# %%
cls_sae = ontology_study.layer_saes(
    train_cls,
    chapter.workdir / "saes",
    lam=settings.lam,
    epochs=settings.cls_epochs,
    layers=[settings.relevancy_layer],
    seed=settings.seed,
    device=settings.device,
)[settings.relevancy_layer]
cls_scan = scan_store(val_cls, cls_sae, settings.relevancy_layer, k=2 * settings.n_images,
                      rank_by="cls")  # fmt: skip
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
        relevancy_maps(encoder, images, cls_sae, settings.relevancy_layer, feature),
    )
first = {
    name: range(min(settings.n_images, len(images))) for name, (_, images, _) in relevancy.items()
}
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
object_table = None
if settings.mini:
    object_table = object_relevancy(
        {name: (rows, maps) for name, (rows, _, maps) in relevancy.items()},
        load_masks(val_cls, val_images, encoder.processor),
        {name: cls_scan.name(feature) for name, feature in cls_features.items()},
    )
    display(object_table)

# %% [markdown]
# ## Part 2: interventions
#
# ### A patch SAE
#
# Paper 002 trains its SAEs on patch tokens (recipe `stevens2025`: inputs centred and scaled
# to unit mean norm, unit-norm decoder rows, warm-ups of 500 steps). Its quality on the
# patches of (up to 1,000) validation images, in paper 002's MSE / L0 / Dead / Dense terms:

# %%
patch_sae = train_or_load(
    settings.patch_spec, train_patch, root=chapter.workdir / "saes", tokens="patch",
    batch_size=settings.patch_batch, epochs=settings.patch_epochs, seed=settings.seed,
    device=settings.device,
)  # fmt: skip
val_patches = np.array(val_patch.patches(settings.patch_layer)[:1000], np.float32)  # ≤ 1000 images
metrics_table({settings.patch_spec.label: evaluate(
    patch_sae, val_patches.reshape(-1, val_patches.shape[-1]), normalized=True
)})  # fmt: skip

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
patch_scan = scan_store(train_patch, patch_sae, settings.patch_layer, k=6, rank_by="max")
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
rng = np.random.default_rng(settings.seed)
for name, classes in groups.items():
    rows = np.flatnonzero(np.isin(val_cls.labels, classes))
    rows = np.sort(rng.choice(rows, size=min(settings.edit_images, len(rows)), replace=False))
    group_images[name] = [val_images.load(int(val_cls.rows[r])) for r in rows]
    group_labels[name] = val_cls.labels[rows]
    class_edits[name] = compare_in_encoder(encoder, group_images[name], patch_sae,
                                           settings.patch_layer, Edit(ranked[name][0]), probe,
                                           seed=settings.seed)  # fmt: skip
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
    [suppression_curve(encoder, group_images[name], patch_sae, settings.patch_layer,
                       ranked[name][: settings.n_suppress], probe, group_labels[name],
                       groups[name], seed=settings.seed).assign(group=name)
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
# In a live kernel the next cell edits any feature of the patch SAE, in any mode and strength, on
# the most affected group's images and shows the probe's table beside the controls; the
# published page keeps the precomputed views above.

# %%
from saekit.analysis import live

live.live_or_note(
    lambda: live.live_intervention(
        group_images[strongest], patch_sae, probe, encoder=encoder, layer=settings.patch_layer,
        feature=int(ranked[strongest][0]), seed=settings.seed,
        table=lambda c: classification_table(c, group_labels[strongest], groups[strongest]),
    ),
    "the edit of any feature at any strength",
)  # fmt: skip

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
seg = segmentation_data(settings, encoder, train_patch, val_patch, train_images, val_images,
                        stores_root=chapter.workdir / "stores")  # fmt: skip
part_names, grid = seg.class_names, seg.train.grid(settings.patch_layer)
seg_val_patches = np.array(seg.val.patches(settings.patch_layer), dtype=np.float32)
head_settings = dict(lr=3e-2, epochs=settings.head_epochs, seed=settings.seed)
head = train_segmentation_head(
    seg.train.patches(settings.patch_layer), seg.train_masks, grid, len(part_names),
    progress=True, config=SegmentationConfig(weight_decay=settings.head_weight_decay,
                                             **head_settings),
)  # fmt: skip
predicted = head.predict(torch.as_tensor(seg_val_patches), seg.val_masks.shape[1:])
miou, iou = mean_iou(predicted, seg.val_masks, len(part_names))
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
# patches at least half (thin parts; the cell names them) are left out. Per part: the
# share of edited patches whose predicted class changed and the mean absolute logit change
# there, for the edit and each control:

# %%
chosen, left_out = part_features(patch_sae, seg, settings.patch_layer, settings.min_region_patches)
print(f"edited: {', '.join(part_names[p] for p in chosen)}; left out (fewer than "
      f"{settings.min_region_patches} patches): {', '.join(part_names[p] for p in left_out) or 'none'}")  # fmt: skip
part_edits = [edit_part(seg_val_patches, seg.val_masks, patch_sae, head, p, f, seed=settings.seed)
              for p, f in chosen.items()]  # fmt: skip
part_table = part_effects(part_edits, seg.val_masks, part_names)
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
    views = [model_view(seg.val_images.load(int(seg.val.rows[e.images[b]])), encoder.processor)
             for b in picks]  # fmt: skip
    part_views[part_names[e.part]] = plot_segmentation_edit(
        views, seg.val_masks[e.images[picks]], e, picks, part_names
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
    seg.train.patches(settings.patch_layer), seg.train_masks, grid, len(part_names),
    progress=True, config=SegmentationConfig(weight_decay=settings.weak_weight_decay,
                                             **head_settings),
)  # fmt: skip
strongest_edit = part_edits[list(part_table.index).index(strongest_part)]
weak_edit = edit_part(seg_val_patches, seg.val_masks, patch_sae, weak_head, strongest_edit.part,
                      strongest_edit.feature, seed=settings.seed)  # fmt: skip
head_table = pd.concat(
    {f"weight decay {settings.head_weight_decay:g}":
         part_effects([strongest_edit], seg.val_masks, part_names),
     f"weight decay {settings.weak_weight_decay:g}":
         part_effects([weak_edit], seg.val_masks, part_names)},
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
print(summary(effects, part_table, head_table, object_table))

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
