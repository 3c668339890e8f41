"""Chapter 04, patch features (paper 002): a patch SAE, its exemplars, and two encoders matched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.sae import SAESpec, train_or_load


def train_patch_sae(
    store: Any,
    layer: int,
    root: str | Path,
    *,
    arch: str = "relu",
    expansion: int | None = None,
    l1: float | None = None,
    k: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    recipe: str = "stevens2025",
    seed: int = 0,
    device: str = "cpu",
) -> Any:
    """Paper 002's patch SAE: one SAE on every patch token of ``layer`` (recipe ``stevens2025``;
    ``None`` takes the recipe's value), trained once and loaded from the SAE cache under
    ``root`` whenever the same store, settings and seed ask again (`saekit.sae.train_or_load`)."""
    if "patch" not in store.manifest["tokens"]:
        raise ValueError(
            f"the store at {store.root} holds no patch tokens; extract it with tokens='both'"
        )
    spec = SAESpec(arch=arch, expansion=expansion, l1=l1, k=k, layer=layer, recipe=recipe,
                   seed=seed)  # fmt: skip
    return train_or_load(
        spec, store, root=root, tokens="patch", epochs=epochs, batch_size=batch_size,
        seed=seed, device=device,
    )  # fmt: skip
