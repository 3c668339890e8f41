"""Images in: every PIL mode converted faithfully or refused with a reason, bombs refused, and
every input kind an encoder accepts turned into the same RGB images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.data import UnreadableImageError, as_pil_images, open_image, to_rgb


def _pixels(image: Image.Image) -> np.ndarray:
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    return np.asarray(rgb)


def test_sixteen_bit_grayscale_keeps_its_tones(tmp_path):
    """It used to come out 99.5% white: PIL clips 16-bit values above 255."""
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(np.tile(values, (4, 1))).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(open_image(path))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    assert (rgb[..., 0] == rgb[..., 2]).all()  # gray stays gray
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(_pixels(big_endian)[0, :, 1], [0, 1, 128, 255])


def test_a_gradient_is_not_washed_out(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    rgb = np.asarray(open_image(tmp_path / "ramp.png"))
    assert (rgb == 255).mean() < 0.01 and abs(rgb.mean() - 127.5) < 1


@pytest.mark.parametrize(
    ("mode", "pixel", "expected"),
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # transparent: what a viewer shows, white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half-transparent black over white
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (40, 255), (40, 40, 40)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
    ],
)
def test_modes_convert_as_they_look(mode, pixel, expected):
    pixels = _pixels(Image.new(mode, (3, 2), pixel))
    np.testing.assert_allclose(pixels[0, 0], expected, atol=1)


def test_palette_transparency_is_composited_over_white():
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    np.testing.assert_array_equal(_pixels(image)[0], [[10, 20, 30], [255, 255, 255]])
    del image.info["transparency"]
    np.testing.assert_array_equal(_pixels(image)[0], [[10, 20, 30], [200, 0, 0]])


def test_premultiplied_alpha_modes_convert():
    assert _pixels(Image.new("La", (2, 2), (0, 0)))[0, 0].tolist() == [255, 255, 255]
    assert _pixels(Image.new("RGBa", (2, 2), (0, 0, 0, 255)))[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("mode", ["I", "F"])
def test_unranged_modes_are_refused_with_the_reason(mode, tmp_path):
    with pytest.raises(UnreadableImageError, match=f"mode {mode}.*no fixed range"):
        to_rgb(Image.new(mode, (2, 2), 70000))
    Image.new(mode, (2, 2), 7).save(tmp_path / "wide.tif")
    with pytest.raises(UnreadableImageError, match=r"wide.tif.*8- or 16-bit"):
        open_image(tmp_path / "wide.tif")


def test_a_decompression_bomb_is_refused_with_a_reason(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1200 > 2 x 500: a bomb
    with pytest.raises(UnreadableImageError, match="big.png.*decompression bomb.*MAX_IMAGE"):
        open_image(tmp_path / "big.png")


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "cannot identify"), (b"\x89PNG\r\n\x1a\n broken", "cannot identify|truncated")],
)
def test_unreadable_files_name_the_file(content, reason, tmp_path):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(UnreadableImageError, match=rf"x.png: .*({reason})"):
        open_image(tmp_path / "x.png")
    with pytest.raises(UnreadableImageError, match="No such file"):
        open_image(tmp_path / "missing.png")


# --- every input kind ---------------------------------------------------------------------------


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # non-square: rows != cols
    Image.fromarray(pixels).save(tmp_path / "p.png")
    return pixels, tmp_path / "p.png"


def test_every_input_kind_gives_the_same_images(picture):
    pixels, path = picture
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    inputs = {
        "PIL": Image.fromarray(pixels),
        "list of PIL": [Image.fromarray(pixels)],
        "path": str(path),
        "Path list": [path],
        "uint8 CHW": chw,
        "uint8 BCHW": chw[None],
        "float BCHW": chw[None].float() / 255,
        "numpy HWC": pixels,
        "numpy BHWC float": pixels[None] / 255.0,
        "list of tensors": [chw],
    }
    for name, value in inputs.items():
        (image,) = as_pil_images(value)
        np.testing.assert_array_equal(np.asarray(image), pixels, err_msg=name)
    gray = torch.from_numpy(pixels[..., :1]).permute(2, 0, 1)
    np.testing.assert_array_equal(np.asarray(as_pil_images(gray)[0])[..., 2], pixels[..., 0])
    assert len(as_pil_images(torch.zeros(3, 3, 5, 7, dtype=torch.uint8))) == 3


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (torch.zeros(2, 4, 5, 5), TypeError, "3 .or 1. channels"),
        (torch.zeros(5, 5, 3, dtype=torch.uint8), TypeError, "channels in layout"),
        (torch.full((3, 4, 4), 2.0), ValueError, r"\[0, 1\].*uint8"),
        (torch.full((3, 4, 4), float("nan")), ValueError, r"\[0, 1\]"),
        (torch.zeros(3, 4, 4, dtype=torch.int64), TypeError, "uint8 or float"),
        (torch.zeros(4, 4), TypeError, "shape"),
        ({"image": 1}, TypeError, "Cannot read dict"),
        ([], TypeError, "Cannot read list"),
        ([Image.new("RGB", (2, 2)), 3], TypeError, "Cannot read a int"),
    ],
)
def test_anything_else_gets_one_clear_error(value, error, message):
    with pytest.raises(error, match=message):
        as_pil_images(value)
