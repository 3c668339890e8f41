"""Widgets: the switcher links its control to a stack of pre-rendered views in the browser."""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib
from ipywidgets.widgets.widget_link import Link

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from saekit.analysis.widgets import figure_png, render_each, switcher  # noqa: E402


def _figure(value: float):
    figure, axis = plt.subplots(figsize=(2, 2))
    axis.plot([0, 1], [0, value])
    return figure


def test_figure_png_is_a_png_and_closes_the_figure():
    figure = _figure(1.0)
    data = figure_png(figure)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(figure.number)


@pytest.mark.parametrize(
    "control,cls",
    [
        ("dropdown", widgets.Dropdown),
        ("slider", widgets.SelectionSlider),
        ("toggle", widgets.ToggleButtons),
    ],
)
def test_switcher_links_control_index_to_stack(control, cls):
    box = switcher({0: _figure(0), 1: "<b>one</b>", "two": _figure(2)}, "layer", control)
    picker, stack = box.children
    assert isinstance(picker, cls) and list(picker.options) == ["0", "1", "two"]
    assert isinstance(stack, widgets.Stack) and len(stack.children) == 3
    assert isinstance(stack.children[0], widgets.Image) and isinstance(
        stack.children[1], widgets.HTML
    )
    links = [
        w
        for w in widgets.Widget.widgets.values()
        if isinstance(w, Link) and w.source[0] is picker and w.target[0] is stack
    ]
    assert (
        len(links) == 1 and links[0].source[1] == "index" and links[0].target[1] == "selected_index"
    )


def test_render_each_renders_one_view_per_choice():
    seen = []
    box = render_each([3, 5], lambda c: seen.append(c) or f"<p>{c}</p>")
    assert seen == [3, 5] and [v.value for v in box.children[1].children] == [
        "<p>3</p>",
        "<p>5</p>",
    ]


def test_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        switcher({})
    with pytest.raises(ValueError, match="control must be"):
        switcher({1: "x"}, control="knob")
