"""Live widgets: pick any feature, layer or strength and the view is computed on demand.

The published book has no kernel, so its widgets (`saekit.analysis.widgets.switcher`) switch
between views rendered in advance. In a live kernel (JupyterLab, a launched session) that stops at
what the page baked in; the apps here instead run a Python callback whenever a control changes:

* :func:`live_view` is the one pattern they share: controls, an output area, and a re-render of
  ``render(**values)`` on every change (an error, such as a feature out of range, is shown in
  the output area instead of a view);
* :func:`live_feature_browser`: any feature's exemplars and facts (`saekit.analysis.browser`);
  :func:`live_patch_view`: any image's patches and their features; :func:`live_browser`: both,
  as the tabs of the precomputed `saekit.analysis.browser.feature_browser`;
* :func:`live_layer_view`: any layer of a per-layer view (e.g. chapter 03's layer page);
* :func:`live_intervention`: any feature, edit mode and strength (`saekit.analysis.interventions`);
* :func:`live_steering`: any feature and λ, generated at few steps (`saekit.analysis.steering`);
* :func:`is_live_kernel` / :func:`live_or_note` let a chapter show the live app in a kernel and
  only a note in the static build.
"""

from __future__ import annotations

import dataclasses
import html
import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import pandas as pd
import torch
from PIL.Image import Image
from sae_lens import SAE

from saekit.analysis.browser import card_html, feature_cards, image_tag, patch_html, patch_views
from saekit.analysis.compare import ExemplarSource
from saekit.analysis.exemplars import feature_facts
from saekit.analysis.interventions import EDIT_MODES, Comparison, Edit, compare, compare_in_encoder
from saekit.analysis.widgets import View, as_widget
from saekit.models import Encoder
from saekit.taxonomy import Taxonomy

if TYPE_CHECKING:
    # steering imports diffusers, which only the steering explorer needs.
    from diffusers import DiffusionPipeline

    from saekit.analysis.steering import GenerationConfig

#: Set by the book runner for every chapter it executes (`saekit.book.CHAPTER_ENV`): the static
#: build, whose saved pages have no kernel to call back.
STATIC_BUILD_ENV = "SAEKIT_CHAPTER"

#: Errors a user's pick can cause (a feature past the SAE's width, a layer the table lacks, an
#: impossible edit); shown in the output area so the controls stay usable.
PICK_ERRORS = (IndexError, KeyError, ValueError)


def is_live_kernel() -> bool:
    """True in an interactive Jupyter kernel, False in the book's static build (the runner sets
    ``SAEKIT_CHAPTER``; papermill's kernel is a kernel too, so only that switch tells them apart)
    and outside Jupyter (a script, the tests), where no comm carries a callback."""
    if os.environ.get(STATIC_BUILD_ENV):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def live_or_note(build: Callable[[], widgets.Widget], what: str) -> Any:
    """``build()`` in a live kernel; in the static build only a note that this cell computes
    ``what`` on demand there (the page keeps its precomputed view above)."""
    if is_live_kernel():
        return build()
    from IPython.display import Markdown

    return Markdown(
        f"*In a live kernel this cell is an app that computes {what} on demand; "
        "the published page shows the precomputed view above.*"
    )


class LiveView(widgets.VBox):
    """Controls above an output area that shows ``render(**values)`` for the controls' values,
    re-rendered whenever one changes (`live_view`)."""

    def __init__(
        self, render: Callable[..., View], controls: Mapping[str, widgets.ValueWidget]
    ) -> None:
        self.render = render
        self.controls = dict(controls)
        self.output = widgets.VBox(layout=widgets.Layout(width="100%"))
        super().__init__([widgets.HBox(list(self.controls.values())), self.output])
        for control in self.controls.values():
            control.observe(self.refresh, names="value")
        self.refresh()

    @property
    def values(self) -> dict[str, Any]:
        """The controls' current values, by the name ``render`` takes them as."""
        return {name: control.value for name, control in self.controls.items()}

    @property
    def view(self) -> widgets.Widget:
        """The widget now in the output area."""
        return self.output.children[0]

    def refresh(self, _change: Any = None) -> None:
        """Render the view for the controls' current values into the output area."""
        try:
            view = as_widget(self.render(**self.values))
        except PICK_ERRORS as err:
            view = widgets.HTML(f"<p style='color:#b00020'>{html.escape(str(err))}</p>")
        self.output.children = (view,)


def live_view(render: Callable[..., View], controls: Mapping[str, widgets.ValueWidget]) -> LiveView:
    """The shared pattern: ``controls`` (keyed by ``render``'s argument names) and an output
    area showing ``render(**values)`` (a figure, PNG bytes, HTML or a widget), recomputed in
    Python on every change."""
    if not controls:
        raise ValueError("live_view needs at least one control; use switcher for a fixed view.")
    return LiveView(render, controls)


def feature_picker(
    d_sae: int, value: int = 0, description: str = "feature"
) -> widgets.BoundedIntText:
    """A box for any feature index of an SAE with ``d_sae`` features."""
    if not 0 <= value < d_sae:
        raise IndexError(f"feature {value} is outside the SAE's 0..{d_sae - 1}")
    return widgets.BoundedIntText(value=value, min=0, max=d_sae - 1, description=description)


def live_feature_browser(
    source: ExemplarSource,
    *,
    feature: int = 0,
    k: int = 8,
    taxonomy: Taxonomy | str | None = "auto",
    rule: Any = None,
    tile: float = 1.8,
    dpi: int = 85,
    image_format: str = "jpeg",
) -> LiveView:
    """Any feature's card (name, facts, exemplar grid of its top ``k`` images), computed from
    the scan and store when picked; ``taxonomy`` and ``rule`` as in `feature_facts`."""

    def render(feature: int) -> str:
        facts = feature_facts(source.scan, [feature], taxonomy=taxonomy, rule=rule)
        (card,) = feature_cards(source, [feature], k=k, facts=facts, tile=tile, dpi=dpi,
                                image_format=image_format, progress=False)  # fmt: skip
        return card_html(card)

    return live_view(render, {"feature": feature_picker(source.scan.d_sae, feature)})


def live_patch_view(source: ExemplarSource, *, row: int = 0, top: int = 8) -> LiveView:
    """Any image of the store (by row) with its patches numbered, and the features active at
    any of its patches, strongest first (at most ``top``); the store needs patch tokens."""
    n_rows, (h, w) = len(source.store), source.store.grid(source.scan.layer)

    def render(row: int, patch: int) -> str:
        (view,) = patch_views(source, [row], top=top, progress=False)
        picture = image_tag(view.image, view.image_format, view.caption)
        return (
            "<div style='display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap'>"
            f"<div style='width:300px'>{picture}<p>{html.escape(view.caption)}</p></div>"
            f"<div>{patch_html(view, patch)}</div></div>"
        )

    controls = {
        "row": widgets.BoundedIntText(value=row, min=0, max=n_rows - 1, description="image"),
        "patch": widgets.BoundedIntText(value=0, min=0, max=h * w - 1, description="patch"),
    }
    return live_view(render, controls)


def live_browser(
    source: ExemplarSource, *, feature: int = 0, row: int = 0, **card: Any
) -> widgets.Tab:
    """`feature_browser`'s two tabs, live: any feature's card (`live_feature_browser`, with
    ``card`` options) and any image's patches (`live_patch_view`)."""
    tabs = [live_feature_browser(source, feature=feature, **card), live_patch_view(source, row=row)]
    app = widgets.Tab(children=tabs)
    for i, title in enumerate(["features", "patches"]):
        app.set_title(i, title)
    return app


def live_layer_view(
    render: Callable[[int, int], View], layers: Sequence[int], *, n: int = 5
) -> LiveView:
    """Any of ``layers`` through ``render(layer, n)`` (e.g. chapter 03's
    ``ontology_figures.layer_view``), with ``n`` (how many features it lists) editable too."""
    if not layers:
        raise ValueError("live_layer_view needs at least one layer.")
    controls = {
        "layer": widgets.Dropdown(options=[int(layer) for layer in layers], description="layer"),
        "n": widgets.BoundedIntText(value=n, min=1, max=1000, description="features"),
    }
    return live_view(render, controls)


def live_intervention(
    inputs: torch.Tensor | Sequence[Image],
    sae: SAE,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    encoder: Encoder | None = None,
    layer: int | None = None,
    feature: int = 0,
    mode: str = "suppress",
    value: float = 0.0,
    table: Callable[[Comparison], pd.DataFrame] | None = None,
    seed: int = 0,
) -> LiveView:
    """Edit any feature in any mode and strength, and show the head's change beside the two
    controls. ``inputs`` are activations (`compare`) or, with ``encoder`` and ``layer``, images
    whose patches at ``layer`` are edited and run through the rest of the encoder
    (`compare_in_encoder`). ``table`` turns the `Comparison` into the table shown (default
    `Comparison.summary`)."""
    if (encoder is None) != (layer is None):
        raise ValueError("pass both encoder and layer (images as inputs) or neither (activations)")
    if encoder is None and not isinstance(inputs, torch.Tensor):
        raise ValueError("without an encoder the inputs must be an activation tensor [B, D] or "
                         "[B, P, D]; for images pass encoder= and layer=")  # fmt: skip
    summarize = table or (lambda comparison: comparison.summary())

    def render(feature: int, mode: str, value: float) -> str:
        edit = Edit((feature,), mode=mode, value=value)
        if encoder is not None and layer is not None:
            comparison = compare_in_encoder(encoder, inputs, sae, layer, edit, head, seed=seed)
        elif isinstance(inputs, torch.Tensor):
            comparison = compare(inputs, sae, edit, head, seed=seed)
        shown = summarize(comparison)
        caption = (
            f"<p><b>feature {feature}: {mode}"
            + ("" if mode == "suppress" else f" (value {value:g})")
            + f"</b>; random-feature control: {list(comparison.control_features)}</p>"
        )
        return caption + shown.to_html(float_format="{:.4g}".format, border=0)

    controls = {
        "feature": feature_picker(sae.cfg.d_sae, feature),
        "mode": widgets.Dropdown(options=list(EDIT_MODES), value=mode, description="edit"),
        "value": widgets.FloatText(value=value, description="value"),
    }
    return live_view(render, controls)


def _image_rows_html(
    originals: Sequence[Image], columns: Mapping[str, Sequence[Image]], prompts: Sequence[str]
) -> str:
    def tag(image: Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return image_tag(buffer.getvalue(), "png")

    head = "".join(f"<th>{html.escape(title)}</th>" for title in ["prompt", "original", *columns])
    rows = "".join(
        f"<tr><td>{html.escape(prompt)}</td><td>{tag(originals[i])}</td>"
        + "".join(f"<td>{tag(images[i])}</td>" for images in columns.values())
        + "</tr>"
        for i, prompt in enumerate(prompts)
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def live_steering(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    sae: SAE,
    *,
    feature: int = 0,
    strength: float = 1.0,
    seed: int = 0,
    config: GenerationConfig | None = None,
    steps: int | None = None,
    grid: Callable[..., View] | None = None,
) -> LiveView:
    """Steer ``prompts`` along any feature with any λ (`generate`), beside the unsteered images
    (generated once, on the first view). ``steps`` overrides the config's denoising steps, so a
    pick answers in seconds; ``grid(originals, {title: images}, prompts)`` draws the view
    (e.g. chapter 06's ``steering_grid``; default an HTML table)."""
    from saekit.analysis.steering import GenerationConfig, generate

    config = config or GenerationConfig()
    if steps is not None:
        config = dataclasses.replace(config, num_inference_steps=steps)
    prompts = list(prompts)
    draw = grid or _image_rows_html
    originals: list[Image] = []

    def render(feature: int, strength: float) -> View:
        if not originals:
            originals.extend(generate(pipe, prompts, seed=seed, config=config))
        steered = generate(pipe, prompts, sae, feature, strength, seed, config=config)
        return draw(originals, {f"#{feature}, λ = {strength:.3g}": steered}, prompts)

    controls = {
        "feature": feature_picker(sae.cfg.d_sae, feature),
        "strength": widgets.FloatText(value=strength, description="λ"),
    }
    return live_view(render, controls)
