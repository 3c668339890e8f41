"""Domain shifts with the same labels, mirroring ImageNet's OOD test sets, and far-OOD noise.

=============  ===============  =========================================================
shift          mirrors          what changes
=============  ===============  =========================================================
``"v2"``       ImageNet-V2      a fresh draw from its own stream, nuisances nudged
                                (smaller, more rotated, dimmer): a small, honest drop
``"sketch"``   ImageNet-Sketch  the same scene as edges only, dark lines on white paper
``"rendition"`` ImageNet-R      the same scene as a cartoon: hues turned a little,
                                posterised, outlined, on a flat pastel background
``"hard"``     ImageNet-A       the same scene, smaller, among clutter and partly occluded
=============  ===============  =========================================================

``far_ood_image`` paints multi-octave noise textures that belong to no class.
Sketch, rendition and hard keep the scene of the in-domain image with the same index, so a
drop measured on them is the shift's doing alone.
"""

from __future__ import annotations

import colorsys
from dataclasses import replace

import numpy as np
from scipy import ndimage

from saekit.mini.toyworld.render import (
    PALETTES,
    Nuisance,
    Scene,
    centre_samples,
    compose,
    downsample,
    image_grid,
    paint_background,
    paint_object,
    to_uint8,
    upsample,
)

SHIFTS = ("v2", "sketch", "rendition", "hard")
"""Valid values of ``shift`` (``None`` is in-domain)."""

V2_NUISANCE = Nuisance(
    scale=(0.5, 0.75),
    offset=0.18,
    rotation=40.0,
    brightness=(0.7, 1.0),
    background_value=(0.25, 0.75),
)
"""The nudged ranges ImageNet-V2's stand-in draws from."""


def render_sketch(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges of the clean scene (Sobel on the luminance), greyscale, dark on white."""
    x, y = image_grid(size)
    rgb, parts = paint_object(scene, x, y)
    canvas = compose(paint_background(scene, x, y), rgb, parts)
    luminance = canvas @ np.array([0.299, 0.587, 0.114])
    edges = np.hypot(ndimage.sobel(luminance, 0), ndimage.sobel(luminance, 1))
    ink = np.clip((edges - 0.15) / 0.6, 0, 1)
    grey = downsample((1 - ink)[..., None])
    return to_uint8(np.repeat(grey, 3, axis=2)), centre_samples(parts)


def _rotate_hue(rgb: np.ndarray, turn: float) -> np.ndarray:
    out = []
    for color in rgb:
        h, s, v = colorsys.rgb_to_hsv(*color)
        out.append(colorsys.hsv_to_rgb((h + turn) % 1, s, v))
    return np.array(out)


def render_rendition(
    scene: Scene, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A cartoon: hues turned slightly, flat pastel background, black outline, 4 levels a channel."""
    x, y = image_grid(size)
    # A small hue turn either way: repainted, not recoloured beyond recognition.
    colors = _rotate_hue(scene.colors, rng.choice([-1, 1]) * rng.uniform(0.03, 0.06))
    rgb, parts = paint_object(scene, x, y, colors=colors)
    pastel = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.1, 0.35), 0.95))
    canvas = compose(np.broadcast_to(pastel, rgb.shape), rgb, parts)
    inside = parts > 0
    outline = ndimage.binary_dilation(inside, iterations=2) & ~ndimage.binary_erosion(
        inside, iterations=1
    )
    canvas = np.where(outline[..., None], 0.05, canvas)
    posterised = np.round(downsample(canvas) * 3) / 3
    return to_uint8(posterised), centre_samples(parts)


def _blob(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A random small disc, square or triangle in image coordinates (clutter)."""
    cx, cy = rng.uniform(-0.9, 0.9, 2)
    r = rng.uniform(0.08, 0.2)
    kind = rng.integers(3)
    if kind == 0:
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if kind == 1:
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    return (y - cy <= r) & (y - cy >= 2 * np.abs(x - cx) - r)


def render_hard(scene: Scene, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smaller object among palette-coloured clutter, with a bar occluding part of it.

    The mask keeps only the visible object: occluded and cluttered pixels are background.
    """
    scene = replace(scene, scale=scene.scale * rng.uniform(0.75, 0.9))
    x, y = image_grid(size)
    canvas = paint_background(scene, x, y)
    colors = PALETTES.reshape(-1, 3)
    for _ in range(rng.integers(3, 7)):
        canvas = np.where(_blob(rng, x, y)[..., None], colors[rng.integers(len(colors))], canvas)
    rgb, parts = paint_object(scene, x, y)
    canvas = compose(canvas, rgb, parts)
    # The occluder: a bar through a point near the object's centre.
    angle = rng.uniform(0, np.pi)
    px = scene.center[0] + rng.uniform(-0.3, 0.3) * scene.scale
    py = scene.center[1] + rng.uniform(-0.3, 0.3) * scene.scale
    distance = np.abs(-np.sin(angle) * (x - px) + np.cos(angle) * (y - py))
    bar = distance <= rng.uniform(0.12, 0.25) * scene.scale
    for _ in range(rng.integers(1, 3)):
        bar |= _blob(rng, x, y)
    occluder = np.array(
        colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.6), rng.uniform(0.2, 0.9))
    )
    canvas = np.where(bar[..., None], occluder, canvas)
    parts = np.where(bar, 0, parts).astype(np.uint8)
    image = downsample(canvas) + rng.normal(0, 0.015, (size, size, 3))
    return to_uint8(image), centre_samples(parts)


def far_ood_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-octave value noise in random colours: a texture of no class, [size, size, 3]."""
    n = size * 2
    octaves = [g for g in (3, 6, 12, 24) if g <= n]
    weights = rng.dirichlet(np.ones(len(octaves)))
    field = np.zeros((n, n, 3))
    for grid, weight in zip(octaves, weights, strict=True):
        for channel in range(3):
            field[..., channel] += weight * upsample(rng.uniform(-1, 1, (grid, grid)), n)
    mixing = rng.normal(0, 1, (3, 3))
    field = field @ mixing
    field = (field - field.mean()) / (field.std() + 1e-8)
    image = 0.5 + rng.uniform(0.1, 0.3) * field + rng.uniform(-0.15, 0.15, 3)
    return to_uint8(image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3)))
