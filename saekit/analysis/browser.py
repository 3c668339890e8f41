"""The feature browser: pick a feature to see its exemplars, pick a patch to see its features.

Paper 002 explores SAEs through a custom UI (§9: "displays exemplar images that maximally
activate SAE features"; §5: "select specific image patches" to list the features there). Here:

* :func:`feature_cards` renders, per feature, its exemplar grid and facts once;
* :func:`patch_views` renders, per image, the features active at every patch, strongest first;
* :func:`feature_browser` puts both in an ipywidgets app. Every view is pre-rendered and the
  pickers are ``jslink``'ed to ``ipywidgets.Stack`` containers (`saekit.analysis.widgets.switcher`), so
  the app also works in the published book, which has no kernel (in a live kernel,
  `saekit.analysis.live.live_feature_browser` renders any feature's card on demand);
* :func:`export_html` writes the top features as one standalone HTML page (images inlined);
  :func:`cards_html` is the same content as a fragment to show inline.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from saekit.analysis.compare import ExemplarSource
from saekit.analysis.exemplar_plots import exemplar_figure, patch_features, row_images
from saekit.analysis.exemplars import feature_facts
from saekit.analysis.widgets import figure_png, switcher
from saekit.taxonomy import Taxonomy

if TYPE_CHECKING:
    from IPython.display import Image as IPythonImage

#: fact columns shown on a card, with their labels ('part' only where the facts have it, e.g.
#: `saekit.studies.patch_features.dominant_part` from segmentation masks)
CARD_FACTS = {
    "image_freq": "fires on images",
    "token_freq": "fires on tokens",
    "max_act": "max activation",
    "top_classes": "top classes",
    "ontology": "ontology label",
    "part": "where it fires",
}
OPTIONAL_FACTS = ("part",)


@dataclass
class FeatureCard:
    """One feature, rendered: its name, facts and exemplar grid."""

    feature: int
    """SAE feature index."""
    name: str
    """MODEL-WIDTH/INDEX name."""
    facts: dict[str, Any]
    """Its row of `saekit.analysis.exemplars.feature_facts`."""
    grid_image: bytes
    """The exemplar grid, encoded as ``image_format``."""
    image_format: str = "png"
    """'png' or 'jpeg'."""


@dataclass
class PatchView:
    """One image, rendered, with the features active at each of its patches."""

    row: int
    """Store row of the image."""
    caption: str
    """Class name and image id."""
    image: bytes
    """The image as the model saw it, with its patch grid numbered, encoded as ``image_format``."""
    grid: tuple[int, int]
    """Patch grid (rows, cols)."""
    features: list[list[tuple[int, float]]]
    """Per patch: (feature, activation), strongest first."""
    names: dict[int, str]
    """Name of every listed feature."""
    image_format: str = "png"
    """'png' or 'jpeg'."""


IMAGE_FORMATS = ("png", "jpeg")
"""How rendered figures are stored: PNG (lossless) or JPEG (far smaller for photographs and
noisy textures, which is what exemplar grids show)."""


def figure_bytes(figure: Figure, image_format: str = "png", dpi: int = 110) -> bytes:
    """A matplotlib figure encoded as PNG or JPEG (quality 85); the figure is closed."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {image_format!r}")
    if image_format == "png":
        return figure_png(figure, dpi=dpi)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="jpeg", dpi=dpi, bbox_inches="tight",
                   pil_kwargs={"quality": 85})  # fmt: skip
    plt.close(figure)
    return buffer.getvalue()


def image_tag(data: bytes, image_format: str = "png", alt: str = "") -> str:
    """An ``<img>`` with the image inlined as a data URI, so the HTML needs nothing else."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {image_format!r}")
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<img src="data:image/{image_format};base64,{encoded}" alt="{html.escape(alt)}" '
        'style="max-width:100%">'
    )


def jpeg(figure: Figure, dpi: int = 100) -> IPythonImage:
    """A figure as an inline JPEG for a notebook (an ``IPython.display.Image``; make it a cell's
    last expression). Exemplar grids of noisy textures or photographs are several times smaller
    than as PNG, which counts in a book page that stores every figure."""
    from IPython.display import Image

    return Image(data=figure_bytes(figure, "jpeg", dpi), format="jpeg")


def figure_html(figure: Figure, image_format: str = "png", dpi: int = 110, alt: str = "") -> str:
    """A figure as a self-contained ``<img>`` (e.g. a `saekit.analysis.widgets.switcher` view in JPEG)."""
    return image_tag(figure_bytes(figure, image_format, dpi), image_format, alt)


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{value:.3g}"
    return str(value)


def feature_cards(
    source: ExemplarSource,
    features: Sequence[int],
    *,
    k: int = 8,
    facts: pd.DataFrame | None = None,
    taxonomy: Taxonomy | str | None = "auto",
    ncols: int = 4,
    tile: float = 1.8,
    dpi: int = 110,
    image_format: str = "png",
    progress: bool = True,
) -> list[FeatureCard]:
    """Render ``features`` of one SAE: exemplar grid (top ``k``) and facts per feature.
    ``facts`` defaults to `feature_facts` of the scan (with ``taxonomy``). ``tile`` (inches per
    image) and ``dpi`` set the grids' size: every card is stored in the page, so small images
    (the toy world's are 48 pixels) and ``image_format='jpeg'`` keep them light."""
    if facts is None:
        facts = feature_facts(source.scan, features, taxonomy=taxonomy)
    cards = []
    for feature in tqdm(features, desc="feature cards", disable=not progress):
        figure = exemplar_figure(
            source.scan,
            source.store,
            source.sae,
            source.dataset,
            int(feature),
            k=k,
            processor=source.processor,
            ncols=ncols,
            tile=tile,
        )
        cards.append(
            FeatureCard(
                int(feature),
                source.scan.name(int(feature)),
                facts.loc[int(feature)].to_dict(),
                figure_bytes(figure, image_format, dpi),
                image_format,
            )
        )
    return cards


def _numbered_grid(image: Image.Image, grid: tuple[int, int], image_format: str) -> bytes:
    h, w = grid
    fig, ax = plt.subplots(figsize=(3, 3 * image.height / image.width))
    ax.imshow(image, extent=(0, w, h, 0))
    for r in range(h + 1):
        ax.axhline(r, color="white", lw=0.5, alpha=0.7)
    for c in range(w + 1):
        ax.axvline(c, color="white", lw=0.5, alpha=0.7)
    if h * w <= 256:
        for p in range(h * w):
            ax.text(p % w + 0.5, p // w + 0.5, str(p), ha="center", va="center", fontsize=6,
                    color="white", alpha=0.9)  # fmt: skip
    ax.set_axis_off()
    return figure_bytes(fig, image_format)


def patch_views(
    source: ExemplarSource,
    rows: Sequence[int],
    *,
    top: int = 8,
    image_format: str = "png",
    progress: bool = True,
) -> list[PatchView]:
    """For each store row: the image (patches numbered) and every patch's active features
    (at most ``top`` per patch)."""
    store, scan = source.store, source.scan
    if "patch" not in store.manifest["tokens"]:
        raise ValueError("patch views need a store with patch tokens (extract with tokens='both')")
    grid = store.grid(scan.layer)
    images = row_images(store, source.dataset, rows, source.processor)
    views = []
    for row, image in tqdm(zip(rows, images, strict=True), total=len(rows), desc="patch views",
                           disable=not progress):  # fmt: skip
        listed = patch_features(source.sae, store.patches(scan.layer)[int(row)], top=top)
        names = {f: scan.name(f) for entries in listed for f, _ in entries}
        label = scan.class_names[int(store.labels[row])]
        views.append(
            PatchView(
                int(row),
                f"{label} ({store.image_ids[row]})",
                _numbered_grid(image, grid, image_format),
                tuple(grid),
                listed,
                names,
                image_format,
            )
        )
    return views


def card_html(card: FeatureCard, *, anchor: bool = False) -> str:
    """A card as HTML: name, facts table and the exemplar grid (inlined)."""
    rows = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{label}</th>"
        f"<td>{html.escape(_format(card.facts.get(key)))}</td></tr>"
        for key, label in CARD_FACTS.items()
        if key not in OPTIONAL_FACTS or key in card.facts
    )
    anchor_id = f" id='feature-{card.feature}'" if anchor else ""
    return (
        f"<section{anchor_id}><h3>{html.escape(card.name)}</h3>"
        f"<table>{rows}</table>{image_tag(card.grid_image, card.image_format, card.name)}</section>"
    )


def patch_html(view: PatchView, patch: int) -> str:
    """The features active at one patch, strongest first, as an HTML table."""
    h, w = view.grid
    entries = view.features[patch]
    title = f"patch {patch} (row {patch // w}, col {patch % w})"
    if not entries:
        return f"<p><b>{title}</b>: no feature fires here.</p>"
    peak = max(value for _, value in entries)
    rows = "".join(
        f"<tr><td>{html.escape(view.names[f])}</td><td style='text-align:right'>{v:.3g}</td>"
        f"<td><div style='background:#e4572e;height:0.8em;width:{100 * v / peak:.0f}px'></div></td>"
        "</tr>"
        for f, v in entries
    )
    return f"<p><b>{title}</b></p><table>{rows}</table>"


def feature_browser(
    cards: Sequence[FeatureCard], views: Sequence[PatchView] | None = None
) -> widgets.Widget:
    """The app: a 'features' tab (pick a feature, see its card) and, with ``views``, a
    'patches' tab (pick an image, then a patch, see its features strongest first)."""
    if not cards:
        raise ValueError("no feature cards to browse; render some with feature_cards(...)")
    by_feature = switcher({card.name: card_html(card) for card in cards}, description="feature")
    tabs = [by_feature]
    titles = ["features"]
    if views:
        per_image = {}
        for view in views:
            patches = switcher(
                {
                    f"{p} (row {p // view.grid[1]}, col {p % view.grid[1]})": patch_html(view, p)
                    for p in range(len(view.features))
                },
                description="patch",
            )
            picture = widgets.Image(value=view.image, format=view.image_format,
                                    layout=widgets.Layout(width="300px"))  # fmt: skip
            per_image[view.caption] = widgets.HBox([picture, patches])
        tabs.append(switcher(per_image, description="image"))
        titles.append("patches")
    app = widgets.Tab(children=tabs)
    for i, title in enumerate(titles):
        app.set_title(i, title)
    return app


def cards_html(cards: Sequence[FeatureCard], *, title: str = "", intro: str = "") -> str:
    """The cards as one HTML fragment: an index of names (with their ontology labels) linking to
    anchored cards. It is the body of `export_html`'s page and can be shown inline in a notebook
    (``IPython.display.HTML``), where the static book keeps it as is."""
    if not cards:
        raise ValueError("no feature cards to export; render some with feature_cards(...)")
    index = "".join(
        f"<li><a href='#feature-{card.feature}'>{html.escape(card.name)}</a>"
        f" – {html.escape(_format(card.facts.get('ontology')))}</li>"
        for card in cards
    )
    body = "\n".join(card_html(card, anchor=True) for card in cards)
    heading = f"<h1>{html.escape(title)}</h1>" if title else ""
    lead = f"<p>{html.escape(intro)}</p>" if intro else ""
    return f"{heading}{lead}<ol>{index}</ol>{body}"


def export_html(
    path: str | os.PathLike,
    cards: Sequence[FeatureCard],
    *,
    title: str = "SAE features",
    intro: str = "",
) -> Path:
    """Write the cards as one standalone HTML page (images inlined), with an index."""
    fragment = cards_html(cards, title=title, intro=intro)
    path = Path(path)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "section{border-top:1px solid #ccc;padding:0.5em 0}</style></head><body>"
        f"{fragment}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
