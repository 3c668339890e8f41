# ---
# jupyter:
#   jupytext:
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # Choosing an SAE: a report card for every architecture
#
# The earlier chapters score SAEs by reconstruction error and sparsity (MSE and L0). A
# researcher choosing an SAE for a vision model asks more: does the model still work on the
# reconstruction, can a class be read off a few features, would another seed learn the same
# dictionary, and do general features survive or are they absorbed by specific ones? The
# language-model world answers these with SAEBench and SAELens's "loss recovered"; this chapter
# puts the vision forms side by side for one layer of one model (`saekit.analysis.report_card`):
#
# - **fidelity**: normalised MSE $\sum\lVert x-\hat x\rVert^2 / \sum\lVert x-\bar x\rVert^2$,
#   L0, dead latents;
# - **downstream fidelity**: the reconstruction $\hat x$ spliced back into the encoder at its
#   layer; the model's own classifier then runs on, and
#   $\text{acc recovered} = \frac{\text{acc}(\hat x)-\text{acc}(0)}{\text{acc}(x)-\text{acc}(0)}$
#   (zero ablation is the floor), with the same for the KL divergence from the original output;
# - **sparse probing**: per class, a one-vs-rest probe on the $k$ features whose mean
#   activation on the class exceeds their mean elsewhere the most, scored by balanced accuracy,
#   against the same on the model's neurons;
# - **stability**: a twin SAE trained with another seed, decoder atoms matched one-to-one by the
#   Hungarian algorithm; the mean cosine of matched atoms;
# - **hierarchical absorption**: for each WordNet parent of several classes, the feature that
#   best covers the parent; the share of a child's images on which it stays silent while a
#   child-specific feature fires;
# - **Pareto**: NMSE against L0 beside PCA (top-$k$ components) and k-means ($k$ centroids,
#   one active).
#
# The SAEs read the last layer's CLS token. ReLU, TopK and Gated are chapter 02's SAEs (equal
# requests, so they come from the SAE cache), the ReLU marked "ch. 01" is the layer sweep's, and
# BatchTopK, JumpReLU and Matryoshka (nested prefixes of the dictionary each trained to
# reconstruct, SAELens's MatryoshkaBatchTopK) train here with the same recipe.

# %% tags=["parameters"]
profile = "mini"
encoder: str | None = None  # encoder family; None: mini toyvit, paper dinov2
archs = ["relu", "topk", "gated", "batchtopk", "jumprelu", "matryoshka"]  # SAEs to compare
lam = 0.5  # λ of the ReLU and Gated SAEs (chapter 02's Table 1 point)
k: int | None = None  # k of TopK, BatchTopK and Matryoshka; None: mini 16, paper 64
jumprelu_lam: float | None = None  # λ of the JumpReLU SAE (an L0 weight); None: mini 0.05, paper 0.5
expansion = 8  # SAE width ÷ model width
include_layer_sweep = True  # also grade chapter 01's SAE at this layer
ks = [1, 5, 20]  # feature counts for sparse probing
max_images = 256  # validation images for downstream fidelity
seed = 0  # seeds the SAEs (twins: seed + 1), the batch order and the probes
device: str | None = None  # where SAEs train; None: "cuda" when available, else "cpu"
imagenet_train: str | None = None  # paper profile: ImageNet-1k train folder (a folder per wnid)
imagenet_val: str | None = None  # paper profile: ImageNet-1k val folder

# %%
import saekit.book

chapter = saekit.book.setup(globals())

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from saekit.analysis.report_card import pareto_frame, plot_pareto
from saekit.analysis.widgets import switcher
from saekit.studies import choosing_an_sae as study
from saekit.studies.choosing_an_sae import ChoosingSettings

settings = ChoosingSettings.for_profile(**chapter.params)
plan = chapter.plan(**settings.resource_needs())
pd.set_option("display.precision", 3)
display(Markdown(study.recipe_note(settings)))

# %% [markdown]
# ## The SAEs
#
# Each SAE and its twin (seed + 1) train in one pass over the training store's last-layer CLS
# tokens, or load from the SAE cache.

# %%
train = chapter.store(settings.encoder, "train", layers=[-1])
val = chapter.store(settings.encoder, "val", layers=[-1])
sweep_store = (
    chapter.store(settings.encoder, "train", layers="all") if settings.include_layer_sweep else None
)
saes, twins = study.train_saes(settings, train, sweep_store, chapter.workdir / "saes")
print(f"{len(saes)} SAEs on layer {val.layers[-1]}: {', '.join(saes)}")

# %% [markdown]
# ## The report cards
#
# Sparse probes fit on the training images and are scored on the validation images; everything
# else is measured on the validation images. Downstream fidelity uses the model's own
# classifier where its checkpoint has one (the toy ViT does), else a linear probe trained on the
# last layer.

# %%
encoder = chapter.encoder(settings.encoder)
head = study.model_head(encoder) or study.probe_head(train, val.layers[-1], settings.device)
cards = study.grade(saes, twins, val, settings, train=train, encoder=encoder,
                    dataset=chapter.dataset("val"), head=head)  # fmt: skip
table = study.summary_table(cards)
table

# %% [markdown]
# ## Which wins on what
#
# The best SAE on each measure (the verdict is computed from the table above, so it holds for
# whatever parameters the chapter ran with):

# %%
verdicts = study.verdict(table)
display(Markdown(study.verdict_text(table, verdicts)))
verdicts

# %% [markdown]
# ## Sparsity against fidelity, with classical baselines
#
# An SAE earns its parameters only where it beats PCA with as many components as it has active
# latents, and vector quantisation (k-means) at L0 = 1.

# %%
frame = pareto_frame(saes, val, val.layers[-1], fit_store=train)
plot_pareto(frame)
plt.show()

# %% [markdown]
# ## Absorption, parent by parent
#
# The toy world's classes sit in a real WordNet hierarchy (its groups and mid-level synsets are
# planted), so absorption has a known structure to test against. The cards' absorption tables,
# each SAE's mean over its parent-child pairs, and the figure for the SAE with the most
# absorption:

# %%
absorption = pd.DataFrame(
    {card.name: card.absorption.groupby("parent")["absorption"].mean() for card in cards
     if card.absorption is not None and len(card.absorption)}  # fmt: skip
)
absorption

# %% [markdown]
# **Explore each SAE's card**: its sparse-probing curve against the neurons' and its absorption,
# parent by parent (the SAE with the most absorption first).

# %%
by_absorption = sorted(cards, key=lambda card: -card.row().get("mean absorption", -1.0))
switcher({card.name: card.figure() for card in by_absorption}, description="SAE")
