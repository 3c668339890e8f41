"""ipywidgets apps the chapters share, built so they still work in the static book.

The published site has no kernel, so a widget whose Python callback redraws a figure would show
its controls but never change. `switcher` therefore pre-renders one view per choice and links the
control to an `ipywidgets.Stack` with `jslink`: the link lives in the browser, so choosing a layer,
threshold or feature works the same in a live notebook and on the offline site.

In a live kernel, `saekit.analysis.live` adds apps whose Python callbacks compute the view for
any choice on demand (any feature, layer or strength, not only the pre-rendered ones).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import ipywidgets as widgets
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

Choice = TypeVar("Choice")
"""Whatever a `render_each` choice is (a layer, a feature, a threshold)."""
View = Figure | bytes | str | widgets.Widget
"""What a control can show: a figure, PNG bytes, HTML or a widget."""


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed, so notebooks do not show it twice)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def as_widget(content: View) -> widgets.Widget:
    """A view as a widget: a figure or PNG bytes become an ``Image``, a string ``HTML``."""
    if isinstance(content, widgets.Widget):
        return content
    if isinstance(content, Figure):
        content = figure_png(content)
    if isinstance(content, bytes):
        return widgets.Image(value=content, format="png", layout=widgets.Layout(max_width="100%"))
    return widgets.HTML(value=content)


def switcher(
    views: Mapping[object, View],
    description: str = "show",
    control: str = "dropdown",
) -> widgets.VBox:
    """A control (dropdown, slider or toggle buttons) choosing between pre-rendered views.

    `views` maps each choice's label to a matplotlib figure, PNG bytes, an HTML string or a
    widget. The control's ``index`` is jslink'ed to the stack's ``selected_index``.
    """
    if not views:
        raise ValueError("switcher needs at least one view.")
    labels = [str(key) for key in views]
    if control == "slider":
        picker = widgets.SelectionSlider(
            options=labels, description=description, continuous_update=True
        )
    elif control == "toggle":
        picker = widgets.ToggleButtons(options=labels, description=description)
    elif control == "dropdown":
        picker = widgets.Dropdown(options=labels, description=description)
    else:
        raise ValueError(f"control must be 'dropdown', 'slider' or 'toggle', not {control!r}.")
    stack = widgets.Stack([as_widget(view) for view in views.values()], selected_index=0)
    widgets.jslink((picker, "index"), (stack, "selected_index"))
    return widgets.VBox([picker, stack])


def render_each(
    choices: Sequence[Choice],
    render: Callable[[Choice], View],
    description: str = "show",
    control: str = "dropdown",
) -> widgets.VBox:
    """`switcher` over ``{choice: render(choice)}``: one pre-rendered view per choice."""
    return switcher({choice: render(choice) for choice in choices}, description, control)
