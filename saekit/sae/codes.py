"""Reading SAE codes from activations that may not fit in memory, and refusing what is wrong.

Every analysis that scans a store (exemplars, class statistics, cross-encoder matching, feature
discovery, metrics) does the same three things: read rows in chunks (a memory-mapped store stays
on disk), move each chunk to the SAE's device and dtype, and encode it without gradients. They
all go through `iter_codes`; a scan that keeps each feature's strongest rows folds chunks into a
running top-k with `merge_top_k`.

Two ways a scan returns a number that looks right but is not, refused here:

* an SAE applied to activations it was not trained on (another model, layer or token kind of
  the same width): `check_sae_matches_store` compares the SAE's metadata with the store, and
  `iter_codes` does it by itself for a store's arrays (they carry their ``provenance``);
* NaN/Inf rows: `iter_codes` raises `NonFiniteActivationsError` naming them, or with
  ``on_nonfinite="zero"`` gives them all-zero codes and warns with the count; `merge_top_k`
  never ranks a NaN score above a number.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


class NonFiniteActivationsError(ValueError):
    """Activations contain NaN or Inf; the message says where."""


class NonFiniteActivationsWarning(UserWarning):
    """Rows with NaN or Inf were excluded (or given zero codes); the message counts them."""


class SAEStoreMismatchError(ValueError):
    """An SAE is applied to activations of another model, layer or token kind than it was
    trained on."""


NONFINITE_POLICIES = ("raise", "zero")


def device_dtype(module: Any) -> tuple[torch.device, torch.dtype]:
    """Where a model's weights live and in what precision: an SAE's decoder, or the first
    parameter of any ``nn.Module`` (CPU float32 for an object without weights)."""
    weight = getattr(module, "W_dec", None)
    if weight is None and isinstance(module, torch.nn.Module):
        weight = next(module.parameters(), None)
    if torch.is_tensor(weight):
        return weight.device, weight.dtype
    return torch.device("cpu"), torch.float32


def read_rows(acts: Any, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of an array, memmap or tensor as a float32 tensor (a copy, since
    memory-mapped stores are read-only)."""
    chunk = acts[start:stop]
    if isinstance(chunk, torch.Tensor):
        return chunk.float()
    return torch.from_numpy(np.array(chunk, dtype=np.float32))


def check_width(sae: Any, width: int) -> None:
    """Raise a clear error when activations of ``width`` cannot feed ``sae``."""
    if width != sae.cfg.d_in:
        raise ValueError(
            f"activations are {width} wide but the SAE expects d_in={sae.cfg.d_in}; "
            "use the layer/model the SAE was trained on"
        )


def sae_provenance(sae: Any) -> dict[str, Any]:
    """What an SAE was trained on, from the metadata saekit saves with it: ``model`` (as named),
    ``model_identity`` (config/processor/weights fingerprints), ``layer`` and ``tokens``. Values
    are None where unknown (SAEs trained on in-memory matrices, or from SAELens)."""
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    info = (metadata.get("saekit") if metadata is not None else None) or {}
    spec = info.get("spec") or {}
    return {
        "model": info.get("model"),
        "model_identity": info.get("model_identity"),
        "layer": info.get("layer", spec.get("layer")),
        "tokens": info.get("tokens"),
    }


def _check_provenance(sae: Any, source: dict[str, Any], where: str) -> None:
    trained = sae_provenance(sae)
    problems = []
    if (
        trained["model_identity"] is not None
        and source.get("model_identity") is not None
        and trained["model_identity"] != source["model_identity"]
    ):
        problems.append(
            f"it was trained on model {trained['model']!r} but {where} holds {source.get('model')!r}"
            " (their weights, config or image processor differ)"
        )
    if (
        trained["layer"] is not None
        and source.get("layer") is not None
        and trained["layer"] != source["layer"]
    ):
        problems.append(
            f"it was trained on layer {trained['layer']} but is given layer {source['layer']}"
        )
    if (
        trained["tokens"] in ("cls", "patch")
        and source.get("tokens") in ("cls", "patch")
        and trained["tokens"] != source["tokens"]
    ):
        problems.append(
            f"it was trained on {trained['tokens']} tokens but is given {source['tokens']} tokens"
        )
    if problems:
        raise SAEStoreMismatchError(
            f"This SAE does not fit {where}: {'; '.join(problems)}. Use the store, layer and "
            "token kind it was trained on, or train one for these activations "
            "(`saekit train --store ...`)."
        )


def check_sae_matches_store(sae: Any, store: Any, layer: int, tokens: str) -> None:
    """Refuse to apply ``sae`` to ``store``'s ``layer`` / ``tokens`` ("cls" or "patch") rows
    unless it was trained on that model's same layer and token kind, and the width fits.

    Raises `SAEStoreMismatchError` naming what differs. What the SAE's metadata does not record
    (an SAE from SAELens, or one trained on an in-memory matrix) is not checked, except the width.
    """
    manifest = store.manifest
    widths = manifest.get("widths") or {}
    check_width(sae, int(widths.get(str(layer), manifest.get("d_model", sae.cfg.d_in))))
    identity = (manifest.get("identity") or {}).get("model")
    source = {
        "model": manifest.get("model"),
        "model_identity": identity if isinstance(identity, dict) else None,
        "layer": layer,
        "tokens": tokens,
    }
    _check_provenance(sae, source, f"the store at {getattr(store, 'root', '?')}")


def check_sae_matches_acts(sae: Any, acts: Any) -> None:
    """`check_sae_matches_store` for an array that knows where it came from (a store's
    ``cls(layer)`` / ``patches(layer)`` carries ``provenance``), plus the width check for any."""
    check_width(sae, int(acts.shape[-1]))
    source = getattr(acts, "provenance", None)
    if source:
        _check_provenance(sae, source, f"the store at {source.get('store', '?')}")


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (first axis) of ``x`` holding any NaN or Inf."""
    return (~torch.isfinite(x.reshape(len(x), -1)).all(-1)).nonzero().flatten()


def iter_codes(
    sae: Any,
    acts: Any,
    chunk: int = 4096,
    *,
    pre_activation: bool = False,
    progress: bool = False,
    desc: str = "encoding",
    on_nonfinite: str = "raise",
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, codes)`` for consecutive chunks of ``acts`` (``[N, D]``, or ``[N, P, D]`` patch
    rows), each chunk ``chunk`` rows long; ``codes`` is ``[b, S]`` (``[b, P, S]``), float32, on the
    SAE's device, computed without gradients.

    ``pre_activation=True`` yields what SAELens exposes at ``hook_sae_acts_pre`` instead: the
    encoder output before the sparsifying nonlinearity (paper 003 Fig. 12).

    Rows holding NaN/Inf: ``on_nonfinite="raise"`` (default) stops with
    `NonFiniteActivationsError` naming them; ``"zero"`` gives them all-zero codes (they never
    rank or count as firing) and warns with their number at the end. An SAE whose codes come out
    non-finite from finite inputs (NaN weights) always raises. A store's array is checked against
    the SAE's metadata first (`check_sae_matches_acts`).
    """
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, not {on_nonfinite!r}")
    check_sae_matches_acts(sae, acts)
    device, dtype = device_dtype(sae)
    captured: list[torch.Tensor] = []
    handle = None
    zeroed: list[int] = []
    if pre_activation:
        handle = sae.hook_sae_acts_pre.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output)
        )
    try:
        starts = range(0, len(acts), chunk)
        for start in tqdm(starts, desc=desc, disable=not progress):
            x = read_rows(acts, start, start + chunk)
            bad = nonfinite_rows(x)
            if len(bad):
                rows = (bad + start).tolist()
                if on_nonfinite == "raise":
                    raise NonFiniteActivationsError(
                        f"{len(rows)} activation row(s) hold NaN/Inf (rows {rows[:10]}"
                        f"{' ...' if len(rows) > 10 else ''}); re-extract those images, drop "
                        "the rows, or pass on_nonfinite='zero' to give them zero codes."
                    )
                zeroed.extend(rows)
                x[bad] = 0
            x = x.to(device, dtype)
            with torch.no_grad():
                codes = sae.encode(x)
            if pre_activation:
                codes = captured.pop()
            codes = codes.float()
            broken = nonfinite_rows(codes)
            if len(bad):
                codes[bad.to(codes.device)] = 0
                broken = nonfinite_rows(codes)
            if len(broken):
                raise NonFiniteActivationsError(
                    f"the SAE gives NaN/Inf codes for finite activations (rows "
                    f"{(broken + start).tolist()[:10]}): its weights hold NaN/Inf; retrain it "
                    "(a lower learning rate) or load another."
                )
            yield start, codes
    finally:
        if handle is not None:
            handle.remove()
        if zeroed:
            warnings.warn(
                f"{len(zeroed)} activation row(s) held NaN/Inf and were given zero codes "
                f"(rows {zeroed[:10]}{' ...' if len(zeroed) > 10 else ''}).",
                NonFiniteActivationsWarning,
                stacklevel=2,
            )


def merge_top_k(
    values_SK: torch.Tensor,
    rows_SK: torch.Tensor,
    scores_SB: torch.Tensor,
    rows_B: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a chunk's scores into a running top-k per feature, keeping exactly what a full sort
    of all rows would keep.

    The running entries come first and a stable descending sort keeps equal scores in their
    order, so ties go to the earlier row, as ``argsort(-scores, kind="stable")`` does
    (torch.topk promises no order among ties, which would make results depend on chunking).
    A NaN score ranks below every number (a descending sort would put it first).
    Start from ``torch.empty(S, 0)`` values and rows.
    """
    values = torch.cat([values_SK, scores_SB], dim=1)
    rows = torch.cat([rows_SK, rows_B.expand(len(scores_SB), -1)], dim=1)
    keys = values.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), rows.gather(1, order)
