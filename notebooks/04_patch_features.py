# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # Patch features: exemplars, a feature browser, and two encoders compared
#
# Stevens et al. (paper 002, §3 and §4) train a sparse autoencoder not on the CLS token but on
# the **patch tokens** of one layer of a vision transformer: every patch of every image is one
# training vector $x \in \mathbb{R}^D$. Their SAE is a ReLU autoencoder,
#
# $$f(x) = \mathrm{ReLU}\big(W_\text{enc}(x - b_\text{dec}) + b_\text{enc}\big), \qquad
# \hat x = W_\text{dec} f(x) + b_\text{dec}, \qquad
# \mathcal{L} = \lVert x - \hat x \rVert_2^2 + \lambda \lVert f(x) \rVert_1,$$
#
# trained on mean-centred activations scaled to unit norm (recipe `stevens2025`). A feature
# $k$ is then read through its **exemplars**: the images on which it fires hardest. With patch
# codes an image $i$ with patches $x_{i,1..P}$ gets the score
#
# $$s_k(i) = \max_{p} f_k(x_{i,p})$$
#
# (its strongest patch), and the top-scoring images are drawn with every patch's $f_k$ as a
# heat map over that patch. The paper names features MODEL-WIDTH/INDEX (e.g. DINOv2-24K/9823),
# explores them in a browser that lists the exemplars of a feature and, for a chosen patch, the
# features active there, and compares CLIP with DINOv2 by finding, for a feature of one model,
# the features of the other that fire on the same images.
#
# This chapter does all of that: one patch SAE, its exemplars over a whole activation store in
# one streaming pass (never holding all codes), a facts table per feature (firing frequency,
# maximum activation, top classes, ontology label), exemplar grids, the feature browser (it
# works on this static page: every view is pre-rendered), a static HTML export, and the
# two-encoder comparison. In the `mini` profile the toy world also says what the patches *are*,
# so we can check where each feature fires against the planted parts.

# %% tags=["parameters"]
profile = "mini"
family: str | None = None  # encoder of the patch SAE; None: mini toyvit, paper dinov2
layer: int | None = None  # its layer; None: toyvit 3 of 0..5, any other encoder its second-to-last
family_b: str | None = None  # encoder to compare with; None: mini toyvit, paper clip
layer_b: int | None = None  # its layer; None: toyvit 5 (the last), any other its second-to-last
expansion: int | None = None  # SAE width as a multiple of the layer width; None: mini 8, paper 32
lam: float | None = None  # λ of the ReLU SAEs (stevens2025); None: mini 0.3, paper the recipe's
epochs: int | None = None  # passes over the training patches; None: mini 20, paper 1
batch_size: int | None = None  # patches per step; None: mini 512, paper 16384
seed = 0  # seeds the SAEs' initialisation and the batch order
n_features = 8  # strongest features: facts table, exemplars, browser, export
n_exemplars = 8  # top images per feature
max_image_freq = 0.5  # features firing on more of the images count as dense and are not shown
n_part_features = 4  # mini profile: features most tied to the planted parts, shown too
min_fire_frac = 0.5  # a class joins a feature's class set if it fires on at least this share...
min_rel_mean_act = 0.5  # ...and scores at least this share of its best class's mean there
n_browse_images = 4  # images in the browser's patch tab
n_pairs = 4  # matched feature pairs drawn side by side
min_match_freq = 0.05  # features matched across encoders fire on at least this share of images
imagenet_train: str | None = None  # paper profile: ImageNet-1k train folder (one sub-folder per wnid)
imagenet_val: str | None = None  # paper profile: ImageNet-1k validation folder, same layout
device: str | None = None  # where the SAEs train and encode; None: cuda when available, else cpu

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %% [markdown]
# ## Setting up
#
# **`mini`**: the toy-world ViT (6 layers, width 64, 48-pixel images cut into a 6 × 6 grid of
# 8-pixel patches; trained to classify the toy world, see chapter 00) at layer 3, a middle
# layer. Its SAE has 8 × 64 = 512 features and trains for 20 epochs of 512 patches per step on
# every patch of the training images, at λ = 0.3: the recipe's λ ≈ 2.2e-3 is set for
# ImageNet-scale runs and leaves far too many features firing on the toy ViT's patches (the
# patch SAE section below trains both and shows it). The comparison partner is the same toy
# ViT at its last layer (5), with an SAE of its own: there is only one trained encoder in the
# toy world, and its residual stream carries much of layer 3 on to layer 5, so most features
# *should* find a counterpart, a check that the matching finds what is there.
# `-p family_b clip` compares with the miniature CLIP instead, a real CLIP architecture with
# **random weights** (no hub access here), whose features can only be colour and texture
# detectors.
#
# **`paper`**: the book's DINOv2 and CLIP checkpoints (`facebook/dinov2-giant`,
# `openai/clip-vit-large-patch14`; paper 002 used the ViT-B/14 and ViT-B/16 versions) at their
# second-to-last layer (paper 002 §9), recipe `stevens2025` as given (32 × expansion, λ ≈ 2.2e-3,
# batch 16,384, one epoch). Beware the size: every patch of every training image is stored.
#
# The settings below resolve the profile's defaults and the parameters given; the layers left
# open follow each encoder's depth.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import HTML, Markdown, display

from saekit.analysis import browser, compare, exemplars
from saekit.analysis.exemplar_plots import exemplar_rows
from saekit.analysis.ontology import ClassSetRule
from saekit.analysis.widgets import switcher
from saekit.plan import model_shape
from saekit.sae import metrics_table
from saekit.studies.patch_features import (
    PatchFeaturesSettings,
    browsable_features,
    dominant_part,
    ground_truth_note,
    lambda_note,
    matchable_features,
    object_features,
    part_shares,
    patch_metrics,
    plot_part_shares,
    recipe_lambda_check,
    resource_needs,
    store_patch_fractions,
    train_patch_sae,
)

settings = PatchFeaturesSettings.for_profile(**chapter.params)
n_layers, n_layers_b = (model_shape(chapter.encoder_id(name)).n_layers
                        for name in (settings.family, settings.family_b))  # fmt: skip
settings = settings.for_encoders(n_layers, n_layers_b)
plan = chapter.plan(**resource_needs(settings))
encoder, encoder_b = chapter.encoder(settings.family), chapter.encoder(settings.family_b)
label, label_b = settings.labels
pd.set_option("display.precision", 3)
pd.set_option("display.max_colwidth", 80)
print(f"A: {label} (layer {settings.layer} of {encoder.n_layers}), B: {label_b} "
      f"(layer {settings.layer_b})")  # fmt: skip
print(f"SAEs: {settings.expansion} x expansion, λ = {settings.lam:.3g}, {settings.epochs} "
      f"epochs of {settings.batch_size} patches per step, on {settings.device}")  # fmt: skip

# %%
train = chapter.store(settings.family, "train", layers=[settings.layer], tokens="both")
val = chapter.store(settings.family, "val", layers=[settings.layer], tokens="both")
dataset = chapter.dataset("val")
print(
    f"training: {train.n_rows} images x {train.patches(settings.layer).shape[1]} patches; "
    f"exemplars from {val.n_rows} validation images of {len(val.class_names)} classes"
)

# %% [markdown]
# ## The patch SAE
#
# One ReLU SAE on every patch token of the layer (recipe `stevens2025`: inputs centred and
# scaled to unit average norm, b_dec at the data mean, kaiming init, unit-norm decoder rows,
# lr and λ warmed up over 500 steps). It is cached in the work folder: rerunning the chapter
# with the same settings loads it. Its quality on the validation patches, in paper 002's
# columns (MSE per dimension in the normalised space the SAE trains in, as the paper reports
# it; L0 = active features per patch; dead = never fire; dense = fire on more than 1% of
# patches):

# %%
saes_root = chapter.workdir / "saes"
options = dict(expansion=settings.expansion, l1=settings.lam, epochs=settings.epochs,
               batch_size=settings.batch_size, device=settings.device)  # fmt: skip
sae = train_patch_sae(train, settings.layer, saes_root, seed=settings.seed, **options)
# the first images of the validation store, up to 65,536 patches (all of them in mini)
metrics = {label: patch_metrics(sae, val, settings.layer)}
metrics_table(metrics)

# %% [markdown]
# Why not the recipe's λ everywhere: the same SAE trained at the recipe's λ (cached like the
# first), beside the chapter's:

# %%
check = recipe_lambda_check(settings, train, val, saes_root)
if len(check):
    display(check)
display(Markdown(lambda_note(check, settings, int(sae.cfg.d_sae))))

# %% [markdown]
# ## Exemplars at scale
#
# One pass over the validation store encodes a chunk of images at a time and folds it into a
# running top-k per feature (a stable sort, so the result equals a full sort of all images);
# the same pass counts how often each feature fires and its per-class statistics. The features
# worth browsing, as paper 002 §9 sorts them: alive, not dense (firing on at most
# `max_image_freq` of the images), strongest maximum activation first. Their facts:
#
# * *token_freq* / *image_freq*: share of patches / of images on which the feature fires;
# * *max_act*: its largest activation on any patch;
# * *top_classes*: the classes with the highest mean image score $s_k$;
# * *ontology*: the lowest common WordNet hypernym of its class set (chapter 03), with its
#   coverage, or "no class set". A patch feature fires somewhere on many images, so a class
#   joins the set only when the feature fires on at least `min_fire_frac` of the class's
#   images **and** its mean score there is at least `min_rel_mean_act` of its best class's.
#
# (When no feature passes the density filter, as with a random-weight encoder, the strongest
# live features are shown instead, with a note saying so.)

# %%
scan = exemplars.scan_store(val, sae, settings.layer, k=settings.n_exemplars, model=label)
rule = ClassSetRule(min_fire_frac=settings.min_fire_frac,
                    min_rel_mean_act=settings.min_rel_mean_act)  # fmt: skip
features = browsable_features(scan, settings.n_features, max_image_freq=settings.max_image_freq)
facts = exemplars.feature_facts(scan, features, rule=rule)
facts

# %% [markdown]
# Their exemplars: each row is one feature, its strongest images left to right (class and
# score above each), every patch tinted by the feature's activation there (bright and opaque:
# strong; clear: zero), on one colour scale per row.

# %%
browser.jpeg(
    exemplar_rows(scan, val, sae, dataset, features[:6], k=6, processor=encoder.processor,
                  tile=settings.tile)
)  # fmt: skip

# %% [markdown]
# ## Ground truth: where on the image do features fire?
#
# The toy world draws every image from parts (body, head, legs, wing, tail, fin, cabin,
# wheels, neck) on a textured background, with a segmentation mask. Each patch is split into
# the fractions of its pixels that each part covers; a feature's activation, summed over every
# validation patch, is split the same way. The first row is how common each part is among all
# pixels: a feature blind to the parts would repeat it; a feature tied to a part puts far more
# of its mass there. Below the strongest features come the `n_part_features` features (firing
# on at least `min_match_freq` of the images) with the largest share on the object's parts.
# (The `paper` profile has no masks, so this section is skipped there.)

# %%
part_features = []
if settings.mini:
    from saekit.mini.toyworld import PART_NAMES

    fractions = store_patch_fractions(
        val, dataset, val.grid(settings.layer), len(PART_NAMES), processor=encoder.processor
    )
    common = np.flatnonzero(scan.image_freq_S >= settings.min_match_freq)
    shares = part_shares(val, sae, settings.layer, np.union1d(common, features), fractions,
                         PART_NAMES)  # fmt: skip
    part_features = object_features(shares, common, settings.n_part_features, exclude=features)
    shown = shares.loc[features + part_features]  # keeps the pixel shares in .attrs
    plot_part_shares(shown, [scan.name(f) for f in shown.index])
    plt.show()
    facts = exemplars.feature_facts(scan, features + part_features, rule=rule)
    facts["part"] = dominant_part(shown)
    display(facts[["name", "image_freq", "token_freq", "top_classes", "ontology", "part"]])
    display(Markdown(ground_truth_note(shown, features, part_features)))

# %% [markdown]
# The features tied to the object, with their exemplars:

# %%
if part_features:
    display(browser.jpeg(exemplar_rows(scan, val, sae, dataset, part_features, k=6,
                                       processor=encoder.processor, tile=settings.tile)))  # fmt: skip

# %% [markdown]
# ## The feature browser
#
# Paper 002 explores its SAEs through a web app. This one has two tabs: **features** (pick a
# feature to see its exemplars and facts) and **patches** (pick an image, then a patch, to list
# the features active there, strongest first; the patches are numbered on the image, row by
# row). The images of the patch tab are the top exemplars of the features above. Every view
# is rendered in advance and the pickers are linked in the browser, so the app works on this
# page without a running kernel; the figures above are its static counterpart.

# %%
browsed = features + part_features
source = compare.ExemplarSource(scan, val, sae, dataset, encoder.processor)
cards = browser.feature_cards(source, browsed, k=settings.n_exemplars, facts=facts,
                              tile=settings.tile, dpi=85, image_format="jpeg")  # fmt: skip
rows = list(dict.fromkeys(int(scan.top_rows_SK[f, 0]) for f in browsed))
rows = rows[: settings.n_browse_images]
views = browser.patch_views(source, rows, image_format="jpeg")
browser.feature_browser(cards, views)

# %% [markdown]
# In a live kernel the next cell is the same browser computed on demand: the card of any feature
# of the SAE, and the patches of any image of the store; the published page keeps the
# precomputed browser above.

# %%
from saekit.analysis import live

live.live_or_note(
    lambda: live.live_browser(source, feature=browsed[0], row=rows[0], k=settings.n_exemplars,
                              rule=rule, tile=settings.tile),
    "the card of any feature and the patches of any image",
)  # fmt: skip

# %% [markdown]
# ## A static export
#
# The same cards as one standalone HTML page (images inlined, nothing to fetch) for sharing
# outside the book. It is written to the work folder; a file there is not part of the
# published site, so the page's content is also shown here, folded: open it to read every
# card.

# %%
page = browser.export_html(
    chapter.workdir / "exports" / f"patch-features-{settings.family}-L{settings.layer}.html",
    cards,
    title=f"{label} patch SAE: {len(cards)} features",
    intro=f"Exemplars from {val.n_rows} validation images; profile {chapter.profile}.",
)
print(f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB)")
display(HTML(
    f"<details><summary><b>The exported page: {len(cards)} feature cards</b></summary>"
    + browser.cards_html(cards) + "</details>"
))  # fmt: skip

# %% [markdown]
# ## Comparing two encoders (paper 002 §4)
#
# Paper 002 sets CLIP beside DINOv2 and asks which concepts each one has: "starting with
# positive examples known to activate a feature in one model", it looks for "features in the
# second model with high activation on the same examples". Done for every feature at once,
# that is a correlation: over the same validation images, each feature of SAE A and each of
# SAE B reduced to its image score $s_k(i)$ (strongest patch), then the Pearson correlation of
# every A feature with every B feature, computed in one streaming pass. An A feature's match is
# its best-correlated B feature.
#
# B gets its own patch SAE, trained the same way on B's patches of the same training images
# but from another initialisation (seed + 1), so that equal indices mean nothing. Only
# features that fire on at least `min_match_freq` of the images are matched: one that fires on
# three images can correlate highly with some B feature by luck. To see what luck gives, the
# matching is run once more with B's images shuffled.

# %%
train_b = chapter.store(settings.family_b, "train", layers=[settings.layer_b], tokens="both")
val_b = chapter.store(settings.family_b, "val", layers=[settings.layer_b], tokens="both")
sae_b = train_patch_sae(train_b, settings.layer_b, saes_root, seed=settings.seed + 1, **options)
scan_b = exemplars.scan_store(val_b, sae_b, settings.layer_b, k=settings.n_exemplars,
                              model=label_b)  # fmt: skip
metrics[label_b] = patch_metrics(sae_b, val_b, settings.layer_b)
metrics_table(metrics)

# %%
common = matchable_features(scan, settings.min_match_freq, fallback=browsed)
pair = (val, sae, settings.layer, val_b, sae_b, settings.layer_b)
matches = compare.correlate_features(*pair, features_a=common)
chance = compare.correlate_features(*pair, features_a=common, null_seed=settings.seed)
compare.plot_best_correlations(matches, chance, label_a=label, label_b=label_b)
plt.show()

# %% [markdown]
# The blue bars are the real best matches, the outline what shuffled images give. How many
# features have a counterpart in B beyond chance, and how strong the typical match is:

# %%
share, cut = compare.share_above_chance(matches, chance)
best_r = matches.best(1)[1][:, 0]
print(f"{share:.0%} of {label}'s features match a {label_b} feature better than shuffled images "
      f"do in 99% of cases (r > {cut:.2f}); median best correlation {np.median(best_r):.2f}.")

# %% [markdown]
# With the default `mini` partner (the same ViT two layers up) the residual stream carries
# features on; `-p family_b clip` compares against a random-weight encoder instead. Paper 002's
# question is the other tail: the features with *no* counterpart.
#
# The browsed features and their best match in B, strongest matches first. A high
# correlation says the two features fire on the same images; whether on the same *patches* of
# them is for the exemplars to show.

# %%
table = compare.correlate_features(*pair, features_a=browsed).table(scan.name, scan_b.name)
table["A: top classes"] = facts.loc[table["feature_a"], "top_classes"].to_numpy()
facts_b = exemplars.feature_facts(scan_b, table["feature_b"], rule=rule)
table["B: top classes"] = facts_b["top_classes"].to_numpy()
table

# %% [markdown]
# Matched exemplars side by side: each row is one pair, A's top images on the left and B's on
# the right, the correlation between them. The static figure shows the `n_pairs` strongest
# matches; the dropdown below it shows every pair of the table.

# %%
source_b = compare.ExemplarSource(scan_b, val_b, sae_b, dataset, encoder_b.processor)
pairs = list(table[["feature_a", "feature_b"]].itertuples(index=False, name=None))
correlations = table["correlation"].tolist()
top = slice(settings.n_pairs)
browser.jpeg(compare.plot_matched(source, source_b, pairs[top], k=4, correlations=correlations[top],
                                  tile=settings.tile))  # fmt: skip

# %%
switcher(
    {
        f"{scan.name(a)} ↔ {scan_b.name(b)}": browser.figure_html(
            compare.plot_matched(source, source_b, [(a, b)], k=4, correlations=[r],
                                 tile=settings.tile),
            "jpeg",
            dpi=70,
        )
        for (a, b), r in zip(pairs, correlations, strict=True)
    },
    "pair",
)

# %% [markdown]
# ## What to take from this
#
# * A patch SAE turns a layer's patches into features one can *look at*: each has exemplars,
#   frequencies, a class profile and an ontology label, found in one streaming pass that never
#   holds the codes of the whole store, so the same cells run on ImageNet in `paper`.
# * In the toy world, the masks check what the exemplar overlays suggest: the note under the
#   part-share figure counts how many of the strongest features fire mostly on the
#   *background* around the object (a ViT can spread an image's class over its background
#   tokens) and how much of their activation the object-tied features put on its parts; their
#   top classes tell class-specific features from colour and texture detectors shared across
#   classes.
# * Matching by correlation finds, for a feature of one encoder, the features of another that
#   fire on the same images; features whose best match is no better than chance are where two
#   encoders differ, which is where paper 002 looked for CLIP's cultural and cross-style
#   concepts.

# %%
plt.close("all")
