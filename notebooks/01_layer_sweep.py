# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # Layer sweep: where does the CLS token start to carry information?
#
# Olson, Hinck et al. (2025, Fig. 1; repeated as Fig. 8 of Olson et al. 2025) train one ReLU SAE
# and one linear probe on the CLS token of **every layer** of DINOv2 ViT-g/14 (40 layers). The
# SAE minimises
#
# $$\mathcal{L}(x) = \lVert x - \hat{x} \rVert_2^2 + \lambda \sum_i z_i \lVert W_{\mathrm{dec},i} \rVert_2,
# \qquad z = \mathrm{ReLU}\big(W_{\mathrm{enc}}(x - b_{\mathrm{dec}}) + b_{\mathrm{enc}}\big),
# \quad \hat{x} = W_{\mathrm{dec}}^\top z + b_{\mathrm{dec}},$$
#
# with the paper's recipe (`olson2025`: Adam at 1e-4 with 5% warm-up and 20% decay, λ warmed up
# over 5% of steps, minibatch 64, 3 epochs, expansion 8, λ = 10). On held-out images they report
# the reconstruction error $\mathrm{MSE} = \frac{1}{n}\lVert x - \hat{x}\rVert_2^2$, the sparsity
# $L_1 = \lVert z \rVert_1$ and the number of active latents $L_0 = \lVert z \rVert_0$, next to
# the probe's top-1 accuracy. Their finding: the early layers are *easy to auto-encode* (low
# MSE, few active latents) and *useless for classification*; both grow together with depth, so
# the unsupervised SAE metrics alone tell where the information is.
#
# This chapter repeats the study: all layers' SAEs are trained in **one pass over the data**
# with saekit's sweep trainer, the probes are multinomial logistic regressions on the raw CLS
# activations, and the agreement between SAE metrics and accuracy is measured (Pearson and
# Spearman) rather than eyeballed.

# %% tags=["parameters"]
profile = "mini"
encoder: str | None = None  # encoder family; None: profile default (mini toyvit, paper dinov2)
layers = "all"  # "all" or comma-separated layer indices, e.g. "0,10,20,39"
lam: float | None = None  # SAE sparsity coefficient λ; None: profile default (mini 3, paper 10)
expansion = 8  # SAE width as a multiple of the model width
epochs: int | None = None  # SAE passes over the training store; None: mini 100, paper 3
probe_optimizer: str | None = None  # "lbfgs" or "adam" (streamed); None: mini lbfgs, paper adam
probe_epochs: int | None = None  # probes' L-BFGS iterations or Adam epochs; None: mini 200, paper 3
lambda_sweep: list[float] | None = None  # λ compared; None: mini [0.3, 1, 3, 10], paper []
seed = 0  # seeds the SAEs' initialisation and the batch order
device: str | None = None  # where SAEs and probes train; None: "cuda" when available, else "cpu"
imagenet_train: str | None = None  # paper profile: ImageNet-1k train folder (a folder per wnid)
imagenet_val: str | None = None  # paper profile: ImageNet-1k val folder, same layout

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import saekit.analysis.plots
import saekit.analysis.widgets
from saekit.studies import layer_sweep
from saekit.studies.layer_sweep import LayerSweepSettings

settings = LayerSweepSettings.for_profile(**chapter.params)
plan = chapter.plan(**layer_sweep.resource_needs(settings))
settings

# %% [markdown]
# ## Profile defaults
#
# The paper profile runs DINOv2 ViT-g/14 with λ = 10 and 3 epochs, as published; its probes
# train with Adam on minibatches streamed from the store, because a full-batch solver would
# hold all of ImageNet's activations at once, and for 3 epochs, as paper 000's probes "use
# identical training parameters as the SAEs where relevant". The probes' length is its own
# setting (`probe_epochs`), not tied to the SAEs'.
#
# The mini profile's toy-world ViT has a narrow residual stream whose CLS activations are far
# smaller than DINOv2-g's. λ multiplies a penalty that grows with the activations' scale while
# the summed squared error grows with its square, so the paper's λ = 10 switches most latents
# off here. The mini profile therefore compares several λ on every layer (`lambda_sweep`,
# below) and uses the one where both terms matter (`lam`, 3): most of the variance explained
# with about as many active latents as the model has dimensions. Its training store is small,
# so the SAEs train for 100 epochs instead of the paper's 3.

# %% [markdown]
# ## Activations
#
# The CLS token of every layer, on the training images (for the SAEs and the probes) and on
# the held-out validation images (for every number reported below). Stores are cached in the
# profile's work folder, so other chapters reuse them.

# %%
train_store = chapter.store(settings.encoder, "train", layers=settings.layers)
val_store = chapter.store(settings.encoder, "val", layers=settings.layers)
n_classes = len(train_store.class_names)
print(train_store)
print(val_store)
display(Markdown(layer_sweep.data_summary(train_store, val_store, settings.epochs)))

# %% [markdown]
# ## One SAE per layer, trained in a single pass
#
# The sweep trainer reads each minibatch of every layer once and feeds it to that layer's SAE;
# SAEs of equal shape and recipe train as one stacked module, so the whole sweep costs about as
# much as a single SAE. The SAEs land in the SAE cache, where the ontology and relevancy
# chapters find them under the same request.

# %%
saes = layer_sweep.train_layer_saes(
    train_store,
    chapter.workdir / "saes",
    lam=settings.lam,
    epochs=settings.epochs,
    expansion=settings.expansion,
    seed=settings.seed,
    device=settings.device,
)

# %% [markdown]
# Each SAE is scored on the validation images it never saw: MSE (averaged over dimensions),
# L1, L0, the fraction of variance explained, and dead latents (never active) and dense ones
# (active on more than 1% of the images).

# %%
sae_metrics = layer_sweep.sae_metrics(saes, val_store)
d_sae = settings.expansion * val_store.d_model
display(Markdown(layer_sweep.sweep_summary(sae_metrics, settings.lam, d_sae)))

# %% [markdown]
# ## Choosing λ
#
# The same SAEs at every λ of `lambda_sweep` (trained together in one more pass, and cached):
# each cell gives the variance explained and the number of active latents (L0) on the
# validation images. Too large a λ explains little of the variance; too small a λ keeps many
# more latents active than the model has dimensions.

# %%
calibration = layer_sweep.lambda_calibration(
    train_store,
    val_store,
    settings.lambda_sweep,
    chapter.workdir / "saes",
    epochs=settings.epochs,
    expansion=settings.expansion,
    seed=settings.seed,
    device=settings.device,
)
if len(calibration):
    display(layer_sweep.calibration_view(calibration))
display(Markdown(layer_sweep.calibration_summary(calibration, settings.lam, val_store.d_model)))

# %% [markdown]
# ## One linear probe per layer
#
# A multinomial logistic regression on each layer's raw CLS activations (standardised with the
# training set's statistics, identical optimiser settings for every layer), trained on the
# training store and scored on the validation store.

# %%
print(settings.probe_config)
accuracy = layer_sweep.layer_probes(
    train_store, val_store, settings.probe_config, device=settings.device
)

# %% [markdown]
# ## The layer sweep
#
# Probe accuracy on the left axis; the SAE's MSE, L0 and L1 on the right, each divided by its
# largest value over the layers (the legend gives that value), so that the three curves' shapes
# can be compared with the accuracy's.

# %%
table = saekit.analysis.plots.layer_sweep_table(sae_metrics, accuracy)
table.round(4)

# %%
fig = saekit.analysis.plots.layer_sweep_figure(
    table,
    chance=1 / n_classes,
    title=f"{train_store.manifest['model'].rsplit('/', 1)[-1]}: ReLU SAE (λ = {settings.lam:g}) "
    "and linear probe on each layer's CLS token",
)
plt.show()

# %% [markdown]
# ## Do the unsupervised metrics track the probe?
#
# If the SAE metrics can stand in for labels, they should rise and fall with probe accuracy
# across layers. Pearson's r measures a linear relation, Spearman's ρ only a monotone one
# (p-values are two-sided; with as many points as layers they are rough). A large r with a
# small ρ means one jump dominates (say, the first layer against all others) while the order of
# the remaining layers does not follow accuracy. The fraction of variance explained is added as
# a scale-free view: MSE and L1 also grow with the activations' norm, which itself grows with
# depth in a residual stream, and with one λ for every layer the penalty weighs most where the
# activations are smallest. Where the raw MSE rises with depth but the explained variance rises
# too, the early layers' low MSE says more about their scale than about being easy to encode.

# %%
correlations = saekit.analysis.plots.metric_correlations(
    table, metrics=["mse", "l0", "l1", "explained_variance"]
)
display(correlations.round(3))
display(Markdown(saekit.analysis.plots.correlation_summary(correlations)))

# %% [markdown]
# ## Explore: how often each layer's latents fire
#
# The overview below draws every layer's histogram of latent firing frequencies on the
# validation images; pick a layer with the slider to see its histogram alone, with its MSE and
# L0. Latents that never fire (dead) are counted in the legend and the titles; the dashed line
# marks the 1% "dense" threshold.

# %%
frequencies = {layer: m.frequencies for layer, m in sae_metrics.items()}
n_val = len(val_store)
fig = saekit.analysis.plots.frequency_by_layer_figure(frequencies, n_rows=n_val)
plt.show()

# %%
views = {
    layer: saekit.analysis.plots.frequency_histogram_figure(
        m.frequencies, n_rows=n_val, title=f"layer {layer}: MSE {m.mse:.3g}, L0 {m.l0:.1f}"
    )
    for layer, m in sae_metrics.items()
}
saekit.analysis.widgets.switcher(views, description="layer", control="slider")
