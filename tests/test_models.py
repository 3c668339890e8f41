"""Encoders: every miniature kind loads through from_pretrained and yields the right tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from saekit.data import ImageFolder
from saekit.models import EncoderLoadError, load_encoder, parse_layers


@pytest.fixture(scope="module")
def images(image_folder):
    dataset = ImageFolder(image_folder)
    return [dataset.load(i) for i in range(4)]


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "clip", "vit", "resnet"])
def test_every_layer_has_cls_and_patches_of_the_right_shape(kind, miniatures, images):
    encoder = load_encoder(miniatures[kind])
    out = encoder(images, layers="all")
    assert sorted(out.cls) == list(range(encoder.n_layers))
    for layer in range(encoder.n_layers):
        rows, cols = out.grids[layer]
        assert out.cls[layer].shape == (4, encoder.widths[layer])
        assert out.patches[layer].shape == (4, rows * cols, encoder.widths[layer])
    if kind != "resnet":
        assert out.grid == encoder.grid == (4, 4)


def test_registers_are_excluded_from_patches(miniatures, images):
    encoder = load_encoder(miniatures["dinov2_registers"])
    assert encoder.n_registers == 4
    pixels = encoder.preprocess(images)
    with torch.inference_mode():
        hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        out = encoder.forward_pixels(pixels, layers=[1])
    assert torch.equal(out.cls[1], hidden[2][:, 0])
    assert torch.equal(out.patches[1], hidden[2][:, 5:])  # CLS + 4 registers come first


def test_resnet_cls_is_the_pooled_stage_and_patches_its_positions(miniatures, images):
    encoder = load_encoder(miniatures["resnet"])
    pixels = encoder.preprocess(images)
    with torch.inference_mode():
        stage = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[3]
        out = encoder.forward_pixels(pixels, layers=[2])
    assert torch.allclose(out.cls[2], stage.mean(dim=(2, 3)))
    # Position (row 1, col 2) of the feature map is patch 1 * cols + 2.
    cols = stage.shape[3]
    assert torch.equal(out.patches[2][:, 1 * cols + 2], stage[:, :, 1, 2])


def test_full_clip_checkpoint_loads_its_vision_tower(miniatures):
    assert transformers.AutoConfig.from_pretrained(miniatures["clip"]).model_type == "clip"
    encoder = load_encoder(miniatures["clip"])
    assert isinstance(encoder.model, transformers.CLIPVisionModel)


def test_one_multi_layer_pass_equals_per_layer_passes(miniatures, images):
    encoder = load_encoder(miniatures["vit"])
    together = encoder(images, layers=[0, 2])
    for layer in (0, 2):
        alone = encoder(images, layers=[layer])
        assert torch.equal(together.cls[layer], alone.cls[layer])
        assert torch.equal(together.patches[layer], alone.patches[layer])


def test_attention_maps_on_request(miniatures, images):
    encoder = load_encoder(miniatures["dinov2"])
    reference = encoder(images, layers=[1]).cls[1]  # sdpa attention
    assert encoder.model.config._attn_implementation == "sdpa"
    out = encoder(images, layers=[0, 1], attentions=True)
    attention = out.attentions[1]
    assert attention.shape == (4, 2, 17, 17)
    assert torch.allclose(attention.sum(-1), torch.ones(4, 2, 17))
    # Eager attention gives the same activations, and is used for that call only.
    assert torch.allclose(out.cls[1], reference, atol=1e-5)
    assert encoder.model.config._attn_implementation == "sdpa"


def test_low_precision_cnn_gets_pixels_in_its_dtype(miniatures, images):
    encoder = load_encoder(miniatures["resnet"], dtype=torch.bfloat16)
    out = encoder(images[:2], layers=[3])
    assert out.cls[3].dtype == torch.bfloat16 and out.cls[3].shape == (2, 48)


def test_negative_layers_and_out_of_range(miniatures):
    encoder = load_encoder(miniatures["vit"])
    assert encoder.resolve_layers("0,-1") == [0, 2]
    with pytest.raises(IndexError, match=r"valid indices are 0\.\.2"):
        encoder.resolve_layers([3])


def test_missing_folder_and_unknown_hub_id_say_what_was_tried(tmp_path):
    with pytest.raises(EncoderLoadError, match="does not exist"):
        load_encoder(tmp_path / "no_such_model")
    with pytest.raises(EncoderLoadError, match="need a network connection"):
        load_encoder("saekit-test/definitely-not-a-model")


def test_unsupported_architecture_is_named(tmp_path):
    transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(EncoderLoadError, match="'bert' model"):
        load_encoder(tmp_path)


# --- inputs, layers, identity -------------------------------------------------------------------


def test_every_input_kind_gives_the_same_activations(miniatures, images, tmp_path):
    encoder = load_encoder(miniatures["dinov2"])
    reference = encoder(images[:2], layers=[2]).cls[2]
    pixels = np.stack([np.asarray(image) for image in images[:2]])
    for i, image in enumerate(images[:2]):
        image.save(tmp_path / f"{i}.png")
    chw = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    inputs = {
        "PIL list": images[:2],
        "paths": [tmp_path / "0.png", str(tmp_path / "1.png")],
        "uint8 tensor": chw,
        "float tensor": chw.float() / 255,
        "numpy": pixels,
    }
    for name, value in inputs.items():
        assert torch.equal(encoder(value, layers=[2]).cls[2], reference), name
    single = encoder(images[0], layers=[2]).cls[2]
    assert single.shape == (1, 32) and torch.equal(single[0], reference[0])
    with pytest.raises(TypeError, match="PIL image or a list"):
        encoder({"not": "images"})


def test_negative_layers_answer_under_the_key_asked_for(miniatures, images):
    encoder = load_encoder(miniatures["vit"])
    out = encoder(images[:1], layers=[-1, 0])
    assert list(out.cls) == [0, 2]  # keys are the resolved indices ...
    assert out.cls[-1] is out.cls[2] and out.patches[-3] is out.patches[0]  # ... -1 finds 2
    assert -1 in out.cls and -2 not in out.cls and out.grids.get(-1) == out.grids[2]
    with pytest.raises(KeyError, match=r"layer -2 was not computed; .* layers \[0, 2\]"):
        out.cls[-2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", "all"),
        ("0,5,11", [0, 5, 11]),
        ("-1", [-1]),
        ("3-5", [3, 4, 5]),
        (" 0, 3-4 ,-1", [0, 3, 4, -1]),
        ("2-2", [2]),
    ],
)
def test_layer_strings(text, expected):
    assert parse_layers(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "names no layer"), ("1,,2", "names no layer"), ("1-x", "cannot read layer '1-x'"),
     ("5-3", "runs backwards; write 3-5"), ("one", "cannot read")],
)  # fmt: skip
def test_bad_layer_strings_say_what_is_accepted(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layers(text)


def test_duplicate_unsorted_and_bad_layer_lists(miniatures):
    encoder = load_encoder(miniatures["vit"])
    assert encoder.resolve_layers([2, 0, 2, -1]) == [0, 2]
    assert encoder.resolve_layers("2,0-1,-3") == [0, 1, 2]
    assert encoder.resolve_layers(np.int64(-1)) == [2]
    with pytest.raises(ValueError, match="No layers"):
        encoder.resolve_layers([])
    with pytest.raises(TypeError, match="not True"):
        encoder.resolve_layers([True])
    with pytest.raises(IndexError, match=r"-4"):
        encoder.resolve_layers([-4])


def _non_square(encoder):
    """Let the processor keep a 64x32 (W x H) image's shape instead of cropping a square."""
    encoder.processor.do_center_crop = False
    encoder.processor.size = {"shortest_edge": 32}
    return encoder


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "clip", "vit", "resnet"])
def test_non_square_images_through_every_encoder_kind(kind, miniatures):
    encoder = load_encoder(miniatures[kind])
    wide = [Image.fromarray(np.full((32, 64, 3), 120, np.uint8))]  # height 32, width 64
    # processors that crop or resize to their square size: the grid is square and P = rows*cols
    out = encoder(wide, layers="all")
    for layer in range(encoder.n_layers):
        rows, cols = out.grids[layer]
        assert out.patches[layer].shape[1] == rows * cols
    if kind in ("clip", "vit"):  # fixed position embeddings: square inputs only
        return
    if kind == "resnet":  # its processor always crops a square; a CNN takes any shape
        pixels = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            out = encoder.forward_pixels(pixels, layers="all")
    else:
        _non_square(encoder)
        pixels = encoder.preprocess(wide)
        assert pixels.shape[2:] == (32, 64)
        out = encoder(wide, layers="all")
    for layer in range(encoder.n_layers):
        rows, cols = out.grids[layer]
        assert cols == 2 * rows, (layer, rows, cols)  # rows follow the height, cols the width
        assert out.patches[layer].shape[1] == rows * cols
    if kind == "resnet":
        with torch.inference_mode():
            stage = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
        assert out.grids[1] == tuple(stage.shape[2:])
        assert torch.equal(out.patches[1][:, 1 * stage.shape[3] + 3], stage[:, :, 1, 3])
    else:
        assert out.grids[0] == (32 // 8, 64 // 8)


def test_model_identity_ignores_how_the_path_is_spelled(miniatures, tmp_path, monkeypatch):
    folder = miniatures["vit"]
    reference = load_encoder(folder).identity
    assert set(reference) == {"family", "config", "processor", "weights"}
    monkeypatch.chdir(folder.parent)
    assert load_encoder(folder.name).identity == reference
    assert load_encoder(f"./{folder.name}/").identity == reference
    monkeypatch.chdir(tmp_path)
    assert load_encoder(str(folder) + "/").identity == reference


def test_model_identity_changes_with_what_changes_the_activations(miniatures, tmp_path):
    from saekit.mini.miniatures import miniature

    reference = load_encoder(miniatures["vit"]).identity
    other_seed = load_encoder(miniature("vit", tmp_path / "seed1", seed=1)).identity
    assert other_seed["config"] == reference["config"]
    assert other_seed["weights"] != reference["weights"]
    encoder = load_encoder(miniatures["vit"])
    encoder.processor.image_mean = [0.5, 0.5, 0.5]
    assert encoder.identity["processor"] != reference["processor"]
    assert (
        load_encoder(miniatures["vit"], dtype=torch.bfloat16).identity["weights"]
        != (reference["weights"])
    )
    encoder = load_encoder(miniatures["vit"])
    with torch.no_grad():
        next(iter(encoder.model.parameters())).view(-1)[-1] += 1  # one value, the last one
    assert encoder.identity["weights"] != reference["weights"]
