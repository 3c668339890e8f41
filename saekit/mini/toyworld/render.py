"""Paint one toy-world scene with numpy: a silhouette (group), a styled texture (mid), a
pattern frequency (leaf), over a nuisance background.

Everything is drawn as implicit functions on a supersampled pixel grid (``SUPERSAMPLE`` x the
output size) and box-filtered down, which antialiases edges without a drawing library; the
segmentation mask is read at the sub-pixel that sits on each output pixel's centre, so mask
and image agree pixel for pixel. PIL's ImageDraw was not used because it cannot evaluate a
texture in the object's own rotated frame, which is what keeps the leaf factor (pattern
frequency relative to the object) invariant to the scale and rotation nuisances.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass

import numpy as np

from saekit.mini.toyworld.taxonomy import LEAVES, N_STYLES

SUPERSAMPLE = 3
"""Sub-pixels per output pixel along each axis (odd, so one sub-pixel sits on the centre)."""

PART_NAMES: tuple[str, ...] = (
    "background",
    "body",
    "head",
    "legs",
    "wing",
    "tail",
    "fin",
    "cabin",
    "wheels",
    "neck",
)
"""Mask values: ``mask == i`` marks part ``PART_NAMES[i]``; 0 is background."""
_PART = {name: i for i, name in enumerate(PART_NAMES)}
TEXTURED_PARTS = (_PART["body"], _PART["head"])
"""Parts that carry the style texture; the others are painted in the palette's accent colour."""

PALETTES = np.array(
    [
        [[0.85, 0.15, 0.10], [0.97, 0.85, 0.20], [0.35, 0.20, 0.10]],  # red / yellow
        [[0.15, 0.30, 0.85], [0.95, 0.95, 0.95], [0.10, 0.10, 0.35]],  # blue / white
        [[0.15, 0.65, 0.20], [0.08, 0.08, 0.08], [0.45, 0.50, 0.10]],  # green / black
        [[0.55, 0.20, 0.75], [0.97, 0.55, 0.10], [0.30, 0.10, 0.35]],  # purple / orange
        [[0.10, 0.75, 0.80], [0.85, 0.20, 0.60], [0.05, 0.35, 0.40]],  # cyan / magenta
    ]
)
"""Per style: (base colour, pattern colour, accent colour) in RGB 0..1."""

TEXTURES = ("stripes", "checker", "dots", "rings", "waves")
"""Per style: the texture family painted on the textured parts."""

PERIODS = (0.72, 0.39, 0.21)
"""Per leaf frequency level: pattern period in the object's own units (half-size = 1)."""

assert len(PALETTES) == len(TEXTURES) == N_STYLES


@dataclass(frozen=True)
class Nuisance:
    """Ranges the nuisance factors are drawn from (uniformly)."""

    scale: tuple[float, float] = (0.6, 0.85)
    """Object half-size as a fraction of the image half-size."""
    offset: float = 0.12
    """Largest shift of the object centre, as a fraction of the image half-size."""
    rotation: float = 25.0
    """Largest rotation of the object, degrees either way."""
    brightness: tuple[float, float] = (0.85, 1.1)
    """Multiplier on the object's colours."""
    background_value: tuple[float, float] = (0.3, 0.8)
    """HSV value (lightness) of the background's base colour."""
    background_saturation: float = 0.3
    """Largest HSV saturation of the background (kept low so it never mimics a palette)."""


@dataclass(frozen=True)
class Scene:
    """Every random choice behind one image; painting a scene is deterministic."""

    label: int
    """Class index into ``LEAVES``."""
    center: tuple[float, float]
    """Object centre (x, y) in normalised image coordinates (-1..1)."""
    scale: float
    """Object half-size in normalised image units."""
    angle: float
    """Rotation in radians."""
    flip: bool
    """Mirror the object left-right."""
    phase: tuple[float, float]
    """Texture offset in the object frame, in units of the period."""
    colors: np.ndarray
    """(base, pattern, accent) RGB after jitter, shape [3, 3]."""
    background: np.ndarray
    """Background base RGB, shape [3]."""
    gradient: tuple[float, float, float]
    """Background ramp: (direction x, direction y, amplitude)."""
    noise: np.ndarray
    """Coarse grid of background luminance noise, upsampled when painted, shape [6, 6]."""


def sample_scene(rng: np.random.Generator, label: int, nuisance: Nuisance) -> Scene:
    """Draw the nuisance factors of one image of class `label`."""
    leaf = LEAVES[label]
    brightness = rng.uniform(*nuisance.brightness)
    colors = np.clip(PALETTES[leaf.style] + rng.normal(0, 0.04, (3, 3)), 0, 1) * brightness
    hue = rng.uniform()
    saturation = rng.uniform(0, nuisance.background_saturation)
    value = rng.uniform(*nuisance.background_value)
    direction = rng.uniform(0, 2 * np.pi)
    return Scene(
        label=label,
        center=tuple(float(c) for c in rng.uniform(-nuisance.offset, nuisance.offset, 2)),
        scale=float(rng.uniform(*nuisance.scale)),
        angle=float(np.deg2rad(rng.uniform(-nuisance.rotation, nuisance.rotation))),
        flip=bool(rng.integers(2)),
        phase=tuple(float(p) for p in rng.uniform(0, 1, 2)),
        colors=np.clip(colors, 0, 1).astype(np.float32),
        background=np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32),
        gradient=(float(np.cos(direction)), float(np.sin(direction)), float(rng.uniform(0, 0.15))),
        noise=rng.normal(0, 0.05, (6, 6)).astype(np.float32),
    )


@functools.lru_cache(maxsize=8)
def image_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (x, y) coordinates of every sub-pixel centre, each [size*SS, size*SS]."""
    n = size * SUPERSAMPLE
    coords = ((np.arange(n) + 0.5) / n * 2 - 1).astype(np.float32)
    x, y = np.meshgrid(coords, coords)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def object_frame(scene: Scene, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates -> the object's own frame (u right, v down, half-size 1)."""
    dx, dy = x - scene.center[0], y - scene.center[1]
    cos, sin = float(np.cos(scene.angle)), float(np.sin(scene.angle))
    u = (cos * dx + sin * dy) / scene.scale
    v = (-sin * dx + cos * dy) / scene.scale
    return (-u if scene.flip else u), v


def _ellipse(u, v, cx, cy, a, b):
    return ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2 <= 1


def _rect(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _convex(u, v, points):
    """Inside a convex polygon: on the same side of every edge."""
    signs = []
    for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1], strict=True):
        signs.append((x2 - x1) * (v - y1) - (y2 - y1) * (u - x1) >= 0)
    inside_ccw = np.logical_and.reduce(signs)
    inside_cw = np.logical_and.reduce([~s for s in signs])
    return inside_ccw | inside_cw


def _dog(u, v):
    legs = np.zeros_like(u, dtype=bool)
    for x in (-0.42, -0.22, 0.18, 0.38):
        legs |= _rect(u, v, x - 0.06, x + 0.06, 0.1, 0.72)
    tail = _convex(u, v, [(-0.5, -0.02), (-0.58, 0.06), (-0.95, -0.42), (-0.86, -0.5)])
    body = _ellipse(u, v, 0.0, 0.05, 0.62, 0.3)
    head = (
        _ellipse(u, v, 0.6, -0.3, 0.24, 0.24)
        | _ellipse(u, v, 0.82, -0.22, 0.18, 0.1)
        | _convex(u, v, [(0.45, -0.42), (0.56, -0.72), (0.66, -0.45)])
    )
    return [("legs", legs), ("tail", tail), ("body", body), ("head", head)]


def _bird(u, v):
    tail = _convex(u, v, [(-0.4, 0.0), (-0.95, -0.25), (-0.95, 0.25)])
    legs = _rect(u, v, -0.12, -0.05, 0.2, 0.68) | _rect(u, v, 0.08, 0.15, 0.2, 0.68)
    body = _ellipse(u, v, 0.0, 0.0, 0.5, 0.32)
    wing = _convex(u, v, [(-0.35, -0.02), (0.3, -0.02), (-0.55, -0.78)])
    head = _ellipse(u, v, 0.5, -0.32, 0.2, 0.2) | _convex(
        u, v, [(0.64, -0.4), (0.95, -0.3), (0.64, -0.22)]
    )
    return [("tail", tail), ("legs", legs), ("body", body), ("wing", wing), ("head", head)]


def _fish(u, v):
    tail = _convex(u, v, [(-0.5, 0.0), (-0.98, -0.45), (-0.98, 0.45)])
    fin = _convex(u, v, [(-0.2, -0.25), (0.25, -0.25), (-0.18, -0.7)]) | _convex(
        u, v, [(-0.05, 0.25), (0.2, 0.25), (-0.1, 0.58)]
    )
    body = _ellipse(u, v, 0.1, 0.0, 0.65, 0.36)
    return [("tail", tail), ("fin", fin), ("body", body)]


def _vehicle(u, v):
    cabin = _convex(u, v, [(-0.5, -0.05), (-0.35, -0.52), (0.25, -0.52), (0.48, -0.05)])
    body = _rect(u, v, -0.9, 0.9, -0.1, 0.35)
    wheels = _ellipse(u, v, -0.5, 0.38, 0.22, 0.22) | _ellipse(u, v, 0.5, 0.38, 0.22, 0.22)
    return [("cabin", cabin), ("body", body), ("wheels", wheels)]


def _instrument(u, v):
    neck = _rect(u, v, 0.2, 0.95, -0.07, 0.07) | _rect(u, v, 0.8, 1.0, -0.14, 0.14)
    body = _ellipse(u, v, -0.4, 0.0, 0.4, 0.4) | _ellipse(u, v, 0.05, 0.0, 0.3, 0.3)
    return [("neck", neck), ("body", body)]


SHAPES = (_dog, _bird, _fish, _vehicle, _instrument)
"""Per group: the silhouette as (part name, inside) layers, back to front."""


def silhouette(group: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Part map (values index ``PART_NAMES``) of group `group`'s shape in the object frame."""
    parts = np.zeros(u.shape, dtype=np.uint8)
    for name, inside in SHAPES[group](u, v):
        parts[inside] = _PART[name]
    return parts


def texture(style: int, frequency: int, u: np.ndarray, v: np.ndarray, phase) -> np.ndarray:
    """Pattern mask (True = pattern colour) of a style at a leaf's frequency."""
    period = PERIODS[frequency]
    a = u / period + phase[0]
    b = v / period + phase[1]
    kind = TEXTURES[style]
    if kind == "stripes":
        return np.sin(2 * np.pi * a) > 0
    if kind == "checker":
        return np.sin(2 * np.pi * a) * np.sin(2 * np.pi * b) > 0
    if kind == "dots":
        return (a % 1 - 0.5) ** 2 + (b % 1 - 0.5) ** 2 < 0.35**2
    if kind == "rings":
        return np.sin(2 * np.pi * (np.hypot(u + 0.1, v) / period + phase[0])) > 0
    # waves: horizontal bands with a fixed wobble, so only their spacing encodes the leaf
    return np.sin(2 * np.pi * (b + 0.12 / period * np.sin(2 * np.pi * u / 0.5))) > 0


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(g: int, n: int) -> np.ndarray:
    """[n, g] weights of linear interpolation from g knots to n evenly spaced points."""
    return np.stack(
        [np.interp(np.linspace(0, g - 1, n), np.arange(g), row) for row in np.eye(g)], 1
    )


def upsample(grid: np.ndarray, n: int) -> np.ndarray:
    """Bilinear upsampling of a small [g, g] grid to [n, n] (for smooth noise)."""
    weights = _interpolation_matrix(grid.shape[0], n).astype(np.float32)
    return weights @ grid.astype(np.float32) @ weights.T


def paint_background(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Low-saturation base colour + linear ramp + smooth luminance noise, [n, n, 3]."""
    gx, gy, amplitude = scene.gradient
    shade = amplitude * (gx * x + gy * y) + upsample(scene.noise, x.shape[0])
    return np.clip(scene.background[None, None, :] + shade[..., None], 0, 1)


def paint_object(
    scene: Scene, x: np.ndarray, y: np.ndarray, colors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The object's colours [n, n, 3] and part map [n, n] (0 where there is no object)."""
    leaf = LEAVES[scene.label]
    colors = scene.colors if colors is None else colors
    u, v = object_frame(scene, x, y)
    parts = silhouette(leaf.group, u, v)
    # Colour index per sub-pixel: 0 base, 1 pattern, 2 accent (a lookup beats np.where here).
    which = texture(leaf.style, leaf.frequency, u, v, scene.phase).astype(np.uint8)
    textured = (parts == TEXTURED_PARTS[0]) | (parts == TEXTURED_PARTS[1])
    which[~textured] = 2
    return np.asarray(colors, dtype=np.float32)[which], parts


def compose(background: np.ndarray, rgb: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """Object over background."""
    canvas = np.array(np.broadcast_to(background, rgb.shape), dtype=np.float32)
    inside = parts > 0
    canvas[inside] = rgb[inside]
    return canvas


def downsample(rgb_ss: np.ndarray) -> np.ndarray:
    """Box-filter the supersampled canvas to output pixels, [size, size, 3]."""
    n = rgb_ss.shape[0] // SUPERSAMPLE
    return rgb_ss.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE, -1).mean(axis=(1, 3))


def centre_samples(parts_ss: np.ndarray) -> np.ndarray:
    """The sub-pixel on each output pixel's centre: a mask aligned with the image."""
    mid = SUPERSAMPLE // 2
    return parts_ss[mid::SUPERSAMPLE, mid::SUPERSAMPLE]


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_clean(
    scene: Scene, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The in-domain image (uint8 [size, size, 3]) and mask (uint8 [size, size])."""
    x, y = image_grid(size)
    rgb, parts = paint_object(scene, x, y)
    canvas = compose(paint_background(scene, x, y), rgb, parts)
    image = downsample(canvas) + rng.normal(0, 0.015, (size, size, 3))
    return to_uint8(image), centre_samples(parts)
