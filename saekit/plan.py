"""Resource plans: what a run will need (images, activation stores on disk, SAEs to train),
worked out from the models' configs and the image folders alone, before anything is loaded.

A chapter states its needs with `saekit.book.Chapter.plan`; ``saekit book --plan`` collects every
chapter's plan. The arithmetic is the store's own: ``images x sum over layers (tokens x width) x
bytes per value``, e.g. DINOv2-g's CLS token at all 40 layers over ImageNet-1k's 1,281,167
training images in float16 is 1,281,167 x 40 x 1536 x 2 bytes, about 157 GB.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saekit.sae.architectures import SAESpec

#: Images per split of the public ImageNet sets, for a plan made before the folders exist.
IMAGENET_IMAGES = {
    "train": 1_281_167,
    "val": 50_000,
    "v2": 10_000,
    "sketch": 50_889,
    "rendition": 30_000,
    "hard": 7_500,
}


@dataclass(frozen=True)
class StoreNeed:
    """One activation store a chapter reads (the arguments of `saekit.book.Chapter.store`)."""

    family: str
    """Encoder family, e.g. ``dinov2`` (the profile maps it to a hub id or a miniature)."""
    split: str
    """``train``, ``val``, a shift (``v2``, ``sketch``, ``rendition``, ``hard``) or ``far_ood``."""
    layers: str | tuple[int, ...] = "all"
    """``"all"`` or layer indices (negative ones count from the end)."""
    tokens: str = "cls"
    """``cls``, ``patch`` or ``both``."""
    n_per_class: int | None = None
    """Mini profile: images per class (None: the split's default)."""

    @classmethod
    def of(cls, value: StoreNeed | Sequence[Any] | dict[str, Any]) -> StoreNeed:
        """A `StoreNeed` from itself, a tuple of its fields in order, or a dict of them."""
        if isinstance(value, StoreNeed):
            need = value
        elif isinstance(value, dict):
            need = cls(**value)
        else:
            need = cls(*value)
        if isinstance(need.layers, list | tuple):
            need = dataclasses.replace(need, layers=tuple(int(x) for x in need.layers))
        return need


@dataclass(frozen=True)
class SAENeed:
    """SAEs a chapter trains, and on what."""

    specs: SAESpec | tuple[SAESpec, ...]
    """The SAEs (as passed to `saekit.sae.train_or_load`)."""
    on: StoreNeed | tuple | dict | None = None
    """The store they train on; None for an in-memory matrix (then give `rows` and `d_in`)."""
    epochs: int | None = None
    """Passes over the data (None: the recipe's)."""
    batch_size: int | None = None
    """Rows per step (None: the recipe's)."""
    tokens: str = "cls"
    """Which rows of the store: ``cls`` or ``patch``."""
    rows: int | None = None
    """Without a store: rows of the training matrix (an estimate is fine)."""
    d_in: int | None = None
    """Without a store: width of the training rows."""
    per_layer: bool = False
    """One SAE of each spec for every layer of the store (a layer sweep; the specs' layers are
    then left unset)."""


@dataclass(frozen=True)
class ModelShape:
    """What a checkpoint's config and processor say about its activations."""

    model: str
    """Hub id or folder."""
    n_layers: int
    """Blocks (a CNN: stages)."""
    widths: tuple[int, ...]
    """Residual width per layer."""
    patches: tuple[int, ...]
    """Patch tokens per image per layer at the processor's input size (registers excluded)."""


def _input_side(processor: Any) -> int:
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        return int(crop["height"])
    size = processor.size
    return int(size["height"] if "height" in size else size["shortest_edge"])


@cache
def model_shape(model_id: str) -> ModelShape:
    """Layers, widths and patch counts of a vision encoder, read from its config and processor
    (no weights are loaded; a hub id needs its two small JSON files cached or the network)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_id)
    config = getattr(config, "vision_config", None) or config
    side = _input_side(transformers.AutoImageProcessor.from_pretrained(model_id))
    if config.model_type == "resnet":
        # The stem divides the side by 4 and every later stage by 2 (as the encoder sees it).
        sides = [side // 4 // 2**i for i in range(len(config.hidden_sizes))]
        return ModelShape(
            model_id,
            len(config.hidden_sizes),
            tuple(config.hidden_sizes),
            tuple(s * s for s in sides),
        )
    n = int(config.num_hidden_layers)
    grid = side // int(config.patch_size)
    return ModelShape(model_id, n, (int(config.hidden_size),) * n, (grid * grid,) * n)


def resolve_layers(layers: str | Sequence[int], n_layers: int) -> list[int]:
    """``"all"`` or indices (negative from the end) as sorted layer indices."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n_layers))
        layers = [int(x) for x in layers.split(",") if x.strip()]
    return sorted({int(x) + n_layers if int(x) < 0 else int(x) for x in layers})


def _row_tokens(tokens: str, patches: int) -> int:
    return {"cls": 1, "patch": patches, "both": 1 + patches}[tokens]


def human_bytes(n: float | None) -> str:
    """``157.4 GB``: decimal units, as disks are sold."""
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass
class Plan:
    """A chapter's needs, as plain rows (what ``--plan`` collects as JSON)."""

    profile: str
    """The profile the plan was made for."""
    dtype: str
    """Value type of the stores."""
    stores: list[dict[str, Any]] = field(default_factory=list)
    """One row per store: encoder, split, images, layers, tokens, bytes, on disk or not."""
    saes: list[dict[str, Any]] = field(default_factory=list)
    """One row per SAE: name, store, widths, parameters, steps."""
    models: list[str] = field(default_factory=list)
    """Other checkpoints the chapter loads."""
    notes: list[str] = field(default_factory=list)
    """Anything else the chapter says it needs."""
    chapter: str = ""
    """The chapter's name (filled in by the runner)."""

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        """A plan from `to_json`'s output."""
        return cls(**data)

    @property
    def bytes_to_extract(self) -> int:
        """Disk the stores not yet on disk will take (unknown sizes count as 0)."""
        return sum(s["bytes"] or 0 for s in self.stores if not s["on_disk"])

    def text(self) -> str:
        """The plan as lines of text."""
        head = f"Plan for {self.chapter or 'this chapter'} (profile {self.profile})"
        lines = [head]
        if self.stores:
            lines.append(f"  activation stores ({self.dtype}):")
        for s in self.stores:
            images = "?" if s["images"] is None else f"{s['images']:,}"
            lines.append(
                f"    {s['family']} {s['split']}: {images} images ({s['images_from']}), "
                f"{s['n_layers']} layer(s) {s['layer_list']}, {s['tokens']} "
                f"({s['tokens_per_image']} token(s) x width {s['width']}), "
                f"{human_bytes(s['bytes'])}, {'on disk' if s['on_disk'] else 'to extract'}"
            )
        if self.saes:
            params = sum(a["params"] for a in self.saes)
            steps = sum(a["steps"] or 0 for a in self.saes)
            lines.append(
                f"  SAEs ({len(self.saes)}; {params / 1e6:.1f} M parameters, "
                f"{human_bytes(4 * params)} in float32; {steps:,} steps in all):"
            )
        # A long sweep shows its first and last SAEs; the line above has its totals.
        shown = self.saes if len(self.saes) <= 8 else [*self.saes[:4], None, *self.saes[-2:]]
        for a in shown:
            if a is None:
                lines.append(f"    ... {len(self.saes) - 6} more ...")
                continue
            rows = "?" if a["rows"] is None else f"{a['rows']:,}"
            steps = "?" if a["steps"] is None else f"{a['steps']:,}"
            lines.append(
                f"    {a['label']} on {a['on']}: {a['d_in']} -> {a['d_sae']} "
                f"({a['params'] / 1e6:.1f} M parameters, {human_bytes(4 * a['params'])} in "
                f"float32), {rows} rows x {a['epochs']} epoch(s) / batch {a['batch_size']} = "
                f"{steps} steps"
            )
        lines += [f"  model: {m}" for m in self.models]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  disk for stores not yet extracted: {human_bytes(self.bytes_to_extract)}")
        return "\n".join(lines)


def _sae_params(arch: str, d_in: int, d_sae: int) -> int:
    """Parameters of one SAE: encoder and decoder matrices and biases (a gated SAE adds its
    magnitude scale and bias)."""
    base = 2 * d_in * d_sae + d_sae + d_in
    return base + 2 * d_sae if arch == "gated" else base


def make_plan(
    chapter: Any,
    stores: Sequence[StoreNeed],
    saes: Sequence[SAENeed],
    models: Sequence[str] = (),
    notes: Sequence[str] = (),
    dtype: str = "float16",
) -> Plan:
    """Work out `chapter`'s plan (a `saekit.book.Chapter`: it maps families to models, splits
    to image counts and stores to folders)."""
    import numpy as np

    itemsize = np.dtype(dtype).itemsize
    plan = Plan(chapter.profile, dtype, models=list(models), notes=list(notes))
    rows_of: dict[StoreNeed, dict[str, Any]] = {}
    needed = list(stores) + [
        StoreNeed.of(n.on) for n in saes if n.on is not None and StoreNeed.of(n.on) not in stores
    ]
    for need in needed:
        shape = model_shape(chapter.encoder_id(need.family))
        layers = resolve_layers(need.layers, shape.n_layers)
        images, images_from = chapter.count_images(need.split, need.n_per_class)
        per_image = sum(
            _row_tokens(need.tokens, shape.patches[i]) * shape.widths[i] for i in layers
        )
        folder = (
            None
            if images is None
            else chapter.store_folder(
                need.family,
                need.split,
                images,
                need.layers if isinstance(need.layers, str) else list(need.layers),
                need.tokens,
            )
        )
        manifest = None if folder is None else folder / "manifest.json"
        row = {
            "family": need.family,
            "model": shape.model,
            "split": need.split,
            "images": images,
            "images_from": images_from,
            "n_layers": len(layers),
            "layer_list": _span(layers),
            "tokens": need.tokens,
            "tokens_per_image": _row_tokens(need.tokens, shape.patches[layers[-1]]),
            "width": shape.widths[layers[-1]],
            "bytes": None if images is None else images * per_image * itemsize,
            "folder": None if folder is None else str(folder),
            "on_disk": _complete(manifest),
            "_patches": {i: shape.patches[i] for i in layers},
            "_widths": {i: shape.widths[i] for i in layers},
            "_n_layers": shape.n_layers,
        }
        rows_of[need] = row
        plan.stores.append(row)
    from saekit.sae.architectures import SAESpec

    for sae_need in saes:
        on = None if sae_need.on is None else rows_of[StoreNeed.of(sae_need.on)]
        if isinstance(sae_need.specs, SAESpec):
            specs: tuple[SAESpec, ...] = (sae_need.specs,)
        else:
            specs = tuple(sae_need.specs)
        if sae_need.per_layer and on is not None:
            layers = sorted(on["_widths"])
            specs = tuple(dataclasses.replace(s, layer=i) for s in specs for i in layers)
        for spec in specs:
            plan.saes.append(_sae_row(spec.resolved(), sae_need, on))
    for row in plan.stores:
        for key in ("_patches", "_widths", "_n_layers"):
            row.pop(key)
    return plan


def _complete(manifest: Path | None) -> bool:
    """Whether a store's manifest says it is finished."""
    try:
        return bool(manifest and json.loads(manifest.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _sae_row(spec: SAESpec, need: SAENeed, on: dict[str, Any] | None) -> dict[str, Any]:
    from saekit.sae.recipes import get_recipe

    recipe = get_recipe(spec.recipe)
    epochs = need.epochs or recipe.epochs
    batch = need.batch_size or recipe.batch_size
    if on is None:
        d_in, rows, where = need.d_in or spec.d_in, need.rows, "activations in memory"
    else:
        layers = sorted(on["_widths"])
        layer = layers[-1] if spec.layer is None else int(spec.layer)
        layer = layer + on["_n_layers"] if layer < 0 else layer
        spec = dataclasses.replace(spec, layer=layer)  # named as the trainer will name it
        d_in = on["_widths"].get(layer, on["width"])
        per_image = _row_tokens(need.tokens, on["_patches"].get(layer, 1))
        rows = None if on["images"] is None else on["images"] * per_image
        where = f"{on['family']} {on['split']} {need.tokens}"
    d_sae = None if d_in is None or spec.expansion is None else d_in * spec.expansion
    return {
        "label": spec.label,
        "arch": spec.arch,
        "on": where,
        "d_in": d_in,
        "d_sae": d_sae,
        "params": 0 if d_in is None or d_sae is None else _sae_params(spec.arch, d_in, d_sae),
        "rows": rows,
        "epochs": epochs,
        "batch_size": batch,
        "steps": None if rows is None else math.ceil(rows / batch) * epochs,
    }


def _span(layers: list[int]) -> str:
    """``0-39`` for a run of layers, else the list."""
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def book_totals(plans: Sequence[Plan]) -> str:
    """A book's plan summed: each store folder counted once, however many chapters read it."""
    folders: dict[str, dict[str, Any]] = {}
    for plan in plans:
        for s in plan.stores:
            folders.setdefault(s["folder"] or f"{plan.chapter}:{s['family']}-{s['split']}", s)
    to_extract = sum(s["bytes"] or 0 for s in folders.values() if not s["on_disk"])
    on_disk = sum(s["bytes"] or 0 for s in folders.values() if s["on_disk"])
    n_saes = sum(len(p.saes) for p in plans)
    return (
        f"Book plan: {len(folders)} distinct activation stores, {human_bytes(to_extract)} to "
        f"extract ({human_bytes(on_disk)} already on disk); {n_saes} SAEs to train or load."
    )
