"""Live widgets: setting a control runs the Python callback, and the output area then holds the
view for the new value, equal to a direct call of the analysis it wraps (a feature's card, an
intervention's effect table, a steered generation); bad picks are reported in place; the static
build (``SAEKIT_CHAPTER`` set) and plain Python get a note instead of the app."""

from __future__ import annotations

import html

import matplotlib

matplotlib.use("Agg")

import ipywidgets as widgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from IPython.display import Markdown  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402

from saekit.activations import extract  # noqa: E402
from saekit.analysis import live  # noqa: E402
from saekit.analysis.browser import card_html, feature_cards, patch_html, patch_views  # noqa: E402
from saekit.analysis.compare import ExemplarSource  # noqa: E402
from saekit.analysis.exemplars import feature_facts, scan_store  # noqa: E402
from saekit.analysis.interventions import Edit, compare, compare_in_encoder  # noqa: E402
from saekit.data import ImageFolder  # noqa: E402
from saekit.models import load_encoder  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _sae(d_in: int, d_sae: int, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.3 - 0.2)
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
    return sae


# ------------------------------------------------------------------ switch and shared pattern


class _Shell:
    kernel = object()


def test_live_only_in_a_kernel_outside_the_static_build(monkeypatch):
    import IPython

    monkeypatch.delenv(live.STATIC_BUILD_ENV, raising=False)
    assert not live.is_live_kernel()  # plain Python: no kernel to call back
    monkeypatch.setattr(IPython, "get_ipython", lambda: _Shell())
    assert live.is_live_kernel()
    app = widgets.Label("app")
    assert live.live_or_note(lambda: app, "any feature") is app
    monkeypatch.setenv(live.STATIC_BUILD_ENV, "03_ontology")  # what the book runner sets
    assert not live.is_live_kernel()
    note = live.live_or_note(lambda: app, "any feature")
    assert isinstance(note, Markdown) and "computes any feature on demand" in note.data


def test_live_view_rerenders_on_change_and_reports_bad_picks():
    calls = []

    def render(x: int, label: str) -> str:
        calls.append((x, label))
        if x < 0:
            raise IndexError(f"no item {x}")
        return f"<p>{label} {x}</p>"

    x, label = widgets.IntText(value=1), widgets.Text(value="item")
    app = live.live_view(render, {"x": x, "label": label})
    assert app.view.value == "<p>item 1</p>"
    x.value = 7
    assert app.view.value == "<p>item 7</p>"
    label.value = "row"
    assert app.view.value == "<p>row 7</p>" and calls == [(1, "item"), (7, "item"), (7, "row")]
    x.value = -2
    assert "no item -2" in app.view.value and "color" in app.view.value
    assert set(app.controls) == {"x", "label"} and app.children[1] is app.output
    with pytest.raises(ValueError, match="at least one control"):
        live.live_view(render, {})


def test_a_figure_becomes_a_png_image_and_is_closed():
    figures = []

    def render(value: float):
        figure, axis = plt.subplots(figsize=(1, 1))
        axis.set_title(f"value {value}")
        figures.append(figure)
        return figure

    app = live.live_view(render, {"value": widgets.FloatText(value=0.5)})
    assert isinstance(app.view, widgets.Image) and app.view.value[:8] == PNG
    assert figures[-1].axes[0].get_title() == "value 0.5" and not plt.fignum_exists(
        figures[-1].number
    )


def test_layer_view_renders_the_picked_layer_and_count():
    def render(layer: int, n: int) -> str:
        return f"<b>layer {layer}</b> top {n}"

    app = live.live_layer_view(render, [2, 5, 9], n=3)
    assert app.view.value == render(2, 3)
    app.controls["layer"].value = 9
    app.controls["n"].value = 11
    assert app.view.value == render(9, 11)
    with pytest.raises(ValueError, match="at least one layer"):
        live.live_layer_view(render, [])


# ------------------------------------------------------------------ feature browser


@pytest.fixture(scope="module")
def source(miniatures, image_folder, tmp_path_factory) -> ExemplarSource:
    dataset = ImageFolder(image_folder)
    store = extract(str(miniatures["dinov2"]), dataset, layers=[2], tokens="both",
                    out=tmp_path_factory.mktemp("live") / "store", num_workers=1,
                    progress=False)  # fmt: skip
    sae = _sae(32, 32)
    scan = scan_store(store, sae, 2, k=4, progress=False)
    return ExemplarSource(scan, store, sae, dataset, load_encoder(miniatures["dinov2"]).processor)


def test_feature_browser_computes_any_feature_card_on_demand(source):
    app = live.live_feature_browser(source, feature=0, k=4, taxonomy=None, image_format="png")
    assert f"<h3>{source.scan.name(0)}</h3>" in app.view.value
    picked = 23
    app.controls["feature"].value = picked
    facts = feature_facts(source.scan, [picked], taxonomy=None)
    (card,) = feature_cards(source, [picked], k=4, facts=facts, tile=1.8, dpi=85,
                            image_format="png", progress=False)  # fmt: skip
    assert app.view.value == card_html(card)
    assert f"<h3>{source.scan.name(picked)}</h3>" in app.view.value
    assert app.controls["feature"].max == source.scan.d_sae - 1
    with pytest.raises(IndexError, match="outside"):
        live.live_feature_browser(source, feature=source.scan.d_sae)


def test_patch_view_lists_the_picked_patch_features_strongest_first(source):
    app = live.live_patch_view(source, row=0, top=5)
    assert app.controls["row"].max == len(source.store) - 1
    app.controls["row"].value = 7
    app.controls["patch"].value = 3
    (view,) = patch_views(source, [7], top=5, progress=False)
    assert patch_html(view, 3) in app.view.value and html.escape(view.caption) in app.view.value
    assert "patch 3 (row" in app.view.value
    tabs = live.live_browser(source, feature=5, row=2, k=4, taxonomy=None)
    assert [tabs.get_title(i) for i in range(2)] == ["features", "patches"]
    assert f"<h3>{source.scan.name(5)}</h3>" in tabs.children[0].view.value
    assert tabs.children[1].values == {"row": 2, "patch": 0}


# ------------------------------------------------------------------ intervention explorer


def test_intervention_explorer_equals_a_direct_compare():
    D, S = 16, 24
    sae = _sae(D, S, seed=1)
    acts = torch.randn(6, D, generator=torch.Generator().manual_seed(2))
    head = torch.nn.Linear(D, 5)
    app = live.live_intervention(acts, sae, head, feature=3, seed=4)
    first = app.view.value
    assert "feature 3: suppress" in first
    app.controls["feature"].value = 17
    app.controls["mode"].value = "scale"
    app.controls["value"].value = 3.0
    direct = compare(acts, sae, Edit((17,), mode="scale", value=3.0), head, seed=4)
    expected = direct.summary().to_html(float_format="{:.4g}".format, border=0)
    assert "feature 17: scale (value 3)" in app.view.value and expected in app.view.value
    assert str(list(direct.control_features)) in app.view.value
    assert app.view.value != first


def test_intervention_explorer_runs_the_rest_of_the_encoder(miniatures, image_folder):
    encoder = load_encoder(miniatures["dinov2"])
    images = [ImageFolder(image_folder).load(i) for i in range(3)]
    sae = _sae(32, 40, seed=3)
    head = torch.nn.Linear(32, 3)

    def table(comparison):
        return comparison.summary().assign(shift=float(comparison.change("edited").abs().sum()))

    app = live.live_intervention(images, sae, head, encoder=encoder, layer=1, table=table)
    app.controls["feature"].value = 11
    app.controls["mode"].value = "set"
    app.controls["value"].value = 5.0
    direct = compare_in_encoder(encoder, images, sae, 1, Edit(11, mode="set", value=5.0), head)
    assert table(direct).to_html(float_format="{:.4g}".format, border=0) in app.view.value
    with pytest.raises(ValueError, match="both encoder and layer"):
        live.live_intervention(images, sae, head, encoder=encoder)
    with pytest.raises(ValueError, match="activation tensor"):
        live.live_intervention(images, sae, head)


# ------------------------------------------------------------------ steering explorer


def test_steering_explorer_generates_the_picked_feature_and_strength(tmp_path):
    from saekit.analysis import steering as st
    from saekit.mini.diffusion import build_mini_sd

    pipe = st.load_pipeline(build_mini_sd(tmp_path / "sd", seed=0))
    sae = _sae(32, 48, seed=5)
    prompts = ["a tiny red dragon by the sea"]
    config = st.GenerationConfig(num_inference_steps=4)
    drawn = []

    def grid(originals, columns, prompts_):
        drawn.append((originals, columns, prompts_))
        return "<p>" + ", ".join(columns) + "</p>"

    app = live.live_steering(pipe, prompts, sae, feature=1, strength=0.0, seed=7, config=config,
                             steps=2, grid=grid)  # fmt: skip
    originals, columns, _ = drawn[-1]
    assert app.view.value == "<p>#1, λ = 0</p>"
    # strength 0 steers nothing: the steered column is the unsteered image, bit for bit
    assert np.array_equal(np.asarray(columns["#1, λ = 0"][0]), np.asarray(originals[0]))
    app.controls["feature"].value = 30
    app.controls["strength"].value = 4.0
    _, columns, shown_prompts = drawn[-1]
    fast = st.GenerationConfig(num_inference_steps=2)
    direct = st.generate(pipe, prompts, sae, 30, 4.0, 7, config=fast)
    assert app.view.value == "<p>#30, λ = 4</p>" and shown_prompts == prompts
    assert np.array_equal(np.asarray(columns["#30, λ = 4"][0]), np.asarray(direct[0]))
    assert not np.array_equal(np.asarray(direct[0]), np.asarray(originals[0]))
    default = live.live_steering(pipe, prompts, sae, feature=30, strength=4.0, seed=7, steps=2)
    assert default.view.value.count("<img") == 2 and "dragon" in default.view.value


# ------------------------------------------------------------------ in a real kernel


def test_in_a_kernel_the_app_is_live_and_its_callback_runs(monkeypatch):
    """In an ipykernel (a comm manager, no SAEKIT_CHAPTER) `live_or_note` returns the app, whose
    widgets hold comms, and setting a control there re-renders the view."""
    from jupyter_client.manager import start_new_kernel

    monkeypatch.delenv(live.STATIC_BUILD_ENV, raising=False)
    code = (
        "from saekit.analysis import live\n"
        "app = live.live_or_note(lambda: live.live_layer_view("
        "lambda layer, n: f'layer {layer} top {n}', [1, 4]), 'any layer')\n"
        "app.controls['layer'].value = 4\n"
        "print(live.is_live_kernel(), app.comm is not None, app.view.value, sep='|')\n"
    )
    kernel, client = start_new_kernel(kernel_name="python3")
    printed = []
    try:
        reply = client.execute_interactive(
            code,
            timeout=120,
            output_hook=lambda msg: (
                printed.append(msg["content"].get("text", ""))
                if msg["msg_type"] == "stream"
                else None
            ),
        )
    finally:
        client.stop_channels()
        kernel.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert "".join(printed).strip() == "True|True|layer 4 top 5"
