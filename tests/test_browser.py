"""Feature browser: cards carry the right facts and a real PNG; the app's pickers are jslink'ed to
their stacks (so the static book can switch views without a kernel) and each view shows what it
claims; a patch's features are listed strongest first; the HTML export is standalone and
escapes what it shows."""

from __future__ import annotations

import base64
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from ipywidgets import Dropdown, Stack  # noqa: E402
from ipywidgets.embed import embed_data  # noqa: E402
from sae_lens import StandardSAE, StandardSAEConfig  # noqa: E402

from saekit.activations import extract  # noqa: E402
from saekit.analysis.browser import (  # noqa: E402
    cards_html,
    export_html,
    feature_browser,
    feature_cards,
    figure_bytes,
    figure_html,
    jpeg,
    patch_views,
)
from saekit.analysis.compare import ExemplarSource  # noqa: E402
from saekit.analysis.exemplar_plots import patch_features  # noqa: E402
from saekit.analysis.exemplars import scan_store, select_features  # noqa: E402
from saekit.data import ImageFolder  # noqa: E402
from saekit.models import load_encoder  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"


@pytest.fixture(scope="module")
def source(miniatures, image_folder, tmp_path_factory) -> ExemplarSource:
    dataset = ImageFolder(image_folder)
    store = extract(
        str(miniatures["dinov2"]),
        dataset,
        layers=[2],
        tokens="both",
        out=tmp_path_factory.mktemp("browser") / "store",
        num_workers=1,
        progress=False,
    )
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=32))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 32) / 32**0.5)
        sae.b_enc.copy_(torch.randn(32) * 0.3 - 0.2)
    scan = scan_store(store, sae, 2, k=4, progress=False)
    processor = load_encoder(miniatures["dinov2"]).processor
    return ExemplarSource(scan, store, sae, dataset, processor)


def _state(app) -> dict:
    return embed_data(views=[app])["manager_state"]["state"]


def _links(state: dict) -> set[tuple[str, str, str, str]]:
    found = set()
    for model in state.values():
        if model["model_name"] == "LinkModel":
            (src, src_attr), (dst, dst_attr) = model["state"]["source"], model["state"]["target"]
            found.add(
                (src.removeprefix("IPY_MODEL_"), src_attr, dst.removeprefix("IPY_MODEL_"), dst_attr)
            )
    return found


def test_feature_tab_switches_cards_client_side(source):
    features = select_features(source.scan, 3, max_image_freq=1.0)
    assert len(features) == 3
    cards = feature_cards(source, features, k=4, taxonomy=None, progress=False)
    for card, feature in zip(cards, features, strict=True):
        assert card.name == source.scan.name(feature)
        assert card.grid_image.startswith(PNG)
        assert card.facts["max_act"] == pytest.approx(float(source.scan.max_act_S[feature]))

    app = feature_browser(cards)
    picker, stack = app.children[0].children
    assert isinstance(picker, Dropdown) and isinstance(stack, Stack)
    assert list(picker.options) == [card.name for card in cards]
    for card, view in zip(cards, stack.children, strict=True):
        assert f"<h3>{card.name}</h3>" in view.value
    # the link lives in the page, not in a Python callback
    links = _links(_state(app))
    assert (picker.model_id, "index", stack.model_id, "selected_index") in links


def test_patch_tab_lists_each_patch_features_strongest_first(source):
    rows = [0, 7]
    views = patch_views(source, rows, top=5, progress=False)
    cards = feature_cards(source, [0], k=2, taxonomy=None, progress=False)
    app = feature_browser(cards, views)
    assert app.get_title(1) == "patches"
    image_picker, image_stack = app.children[1].children
    assert len(image_stack.children) == 2 and views[0].image.startswith(PNG)
    links = _links(_state(app))
    assert (image_picker.model_id, "index", image_stack.model_id, "selected_index") in links

    store, sae = source.store, source.sae
    expected = patch_features(sae, store.patches(2)[7], top=5)
    patch_picker, patch_stack = image_stack.children[1].children[1].children
    assert len(patch_stack.children) == 16 and patch_picker.options[5].startswith(
        "5 (row 1, col 1)"
    )
    assert sum(len(expected[p]) for p in (0, 5, 15)) >= 3
    for patch in (0, 5, 15):
        shown = re.findall(
            r"<td>(DINOv2-32/\d+)</td><td[^>]*>([0-9.e+-]+)</td>", patch_stack.children[patch].value
        )
        assert [name for name, _ in shown] == [f"DINOv2-32/{f}" for f, _ in expected[patch]]
        values = [float(v) for _, v in shown]
        assert values == sorted(values, reverse=True)


def test_export_html_is_standalone_and_escaped(source, tmp_path):
    cards = feature_cards(source, [1, 2], k=3, taxonomy=None, progress=False)
    cards[0].facts["top_classes"] = "<script>alert(1)</script> (0.5)"
    path = export_html(tmp_path / "site" / "features.html", cards, title="Top <features>")
    page = path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<title>Top &lt;features&gt;</title>" in page
    for card in cards:
        assert f"id='feature-{card.feature}'" in page and f"href='#feature-{card.feature}'" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(data).startswith(PNG) for data in images)
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch
    with pytest.raises(ValueError, match="no feature cards"):
        export_html(tmp_path / "empty.html", [])


def test_patch_views_need_patch_tokens(source, tmp_path):
    cls_store = extract(
        source.store.manifest["model"],
        source.dataset,
        layers=[2],
        tokens="cls",
        out=tmp_path / "cls",
        num_workers=1,
        progress=False,
    )
    scan = scan_store(cls_store, source.sae, 2, rank_by="cls", k=2, progress=False)
    with pytest.raises(ValueError, match="patch tokens"):
        patch_views(ExemplarSource(scan, cls_store, source.sae, source.dataset), [0])
    assert np.isfinite(scan.top_values_SK).all()


def test_jpeg_cards_and_the_inline_fragment_of_the_export(source, tmp_path):
    cards = feature_cards(source, [1, 2], k=3, taxonomy=None, image_format="jpeg", tile=1.0,
                          dpi=60, progress=False)  # fmt: skip
    assert all(card.image_format == "jpeg" and card.grid_image.startswith(JPEG) for card in cards)
    cards[0].facts["part"] = "body (70%, 7.0x its pixel share)"
    fragment = cards_html(cards, title="Top <two>", intro="from a test")
    assert "<html" not in fragment and "<h1>Top &lt;two&gt;</h1>" in fragment
    images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', fragment)
    assert len(images) == 2 and all(base64.b64decode(data).startswith(JPEG) for data in images)
    for card in cards:
        assert f"id='feature-{card.feature}'" in fragment
        assert f"href='#feature-{card.feature}'" in fragment
    # an optional fact shows on the card that has it, and only there
    assert fragment.count("where it fires") == 1 and "body (70%, 7.0x" in fragment
    page = export_html(tmp_path / "page.html", cards, title="T").read_text()
    assert cards_html(cards, title="T") in page  # the page is the fragment, wrapped
    with pytest.raises(ValueError, match="no feature cards"):
        cards_html([])


def test_figure_encodings():
    fig = plt.figure(figsize=(1, 1))
    assert figure_bytes(fig, "jpeg", dpi=50).startswith(JPEG)
    assert not plt.fignum_exists(fig.number)  # closed, so a notebook does not show it twice
    shown = jpeg(plt.figure(figsize=(1, 1)), dpi=50)
    assert shown.format == "jpeg" and shown.data.startswith(JPEG)
    tag = figure_html(plt.figure(figsize=(1, 1)), "png", dpi=50, alt="a <b>")
    data = re.fullmatch(r'<img src="data:image/png;base64,([^"]+)" alt="a &lt;b&gt;".*', tag)
    assert data and base64.b64decode(data.group(1)).startswith(PNG)
    other = plt.figure()
    with pytest.raises(ValueError, match="image_format"):
        figure_bytes(other, "gif")
    plt.close(other)


def test_patch_views_in_jpeg_reach_the_widget_as_jpeg(source):
    views = patch_views(source, [3], image_format="jpeg", progress=False)
    assert views[0].image.startswith(JPEG)
    cards = feature_cards(source, [0], k=2, taxonomy=None, progress=False)
    app = feature_browser(cards, views)
    picture = app.children[1].children[1].children[0].children[0]  # image stack > HBox > image
    assert picture.format == "jpeg" and picture.value == views[0].image
    assert _state(app)[picture.model_id]["state"]["format"] == "jpeg"
