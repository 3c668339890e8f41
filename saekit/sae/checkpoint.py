"""Sweep checkpoints: one ``checkpoint.safetensors`` that resumes a run to the same result.

The file holds every SAE group's weights, Adam moments, dead-latent counters and the input
normalisations as tensors; its metadata holds the JSON state: the step, the specs, the schedule
length, and ``run``, everything else that determines the result (the data's identity, the
data-order seed, the batch size, the token kind). A checkpoint is resumed only when all of it
agrees with the run asking; otherwise the error names what differs. It is written to a ``.tmp``
file, fsync'd and renamed (`saekit.durable`), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saekit.durable import fsync_file, replace_durably
from saekit.sae.architectures import SAESpec
from saekit.sae.recipes import InputNormalizer

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "saekit-sweep-checkpoint/2"


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with other settings than the one resuming it."""


def write_checkpoint(
    path: Path,
    step: int,
    specs: Sequence[SAESpec],
    steps_per_epoch: int,
    epochs: int,
    groups: Sequence[Any],
    normalizers: Mapping[Any, InputNormalizer],
    run: Mapping[str, Any] | None,
) -> None:
    """Save the state of every group (``saekit.sae.trainer._Group``) after ``step`` steps."""
    tensors: dict[str, torch.Tensor] = {}
    for g, group in enumerate(groups):
        for name, p in group.model.named_parameters():
            tensors[f"g{g}.param.{name}"] = p.detach()
            for key, value in group.optimizer.state.get(p, {}).items():
                tensors[f"g{g}.adam.{name}.{key}"] = torch.as_tensor(value).reshape(-1)
        for name, b in group.model.named_buffers():
            tensors[f"g{g}.buffer.{name}"] = b
        tensors[f"g{g}.since_fired"] = group.since_fired_nS
    norms = []
    for j, (key, norm) in enumerate(normalizers.items()):
        tensors[f"norm{j}.mean"] = norm.mean_D
        norms.append({"source": key[0], "input_norm": key[1], "scale": norm.scale})
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "steps_per_epoch": steps_per_epoch,
        "epochs": epochs,
        "specs": [spec.to_dict() for spec in specs],
        "run": dict(run or {}),
        "normalizers": norms,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
        str(tmp),
        metadata={"saekit_state": json.dumps(state)},
    )
    fsync_file(tmp)  # safetensors does not fsync
    replace_durably(tmp, path)


def _differences(state: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    found = []
    if state.get("specs") != expected["specs"]:
        old = {s.get("name") or json.dumps(s, sort_keys=True) for s in state.get("specs", [])}
        new = {s.get("name") or json.dumps(s, sort_keys=True) for s in expected["specs"]}
        found.append(
            "the SAEs (their specs, recipes or seeds)" if old == new else "the list of SAEs"
        )
    for key in ("steps_per_epoch", "epochs"):
        if state.get(key) != expected[key]:
            found.append(f"{key}: checkpoint {state.get(key)!r}, this run {expected[key]!r}")
    old_run, new_run = state.get("run") or {}, expected["run"]
    for key in sorted(set(old_run) | set(new_run)):
        if old_run.get(key) != new_run.get(key):
            if isinstance(old_run.get(key), dict) or isinstance(new_run.get(key), dict):
                found.append(f"{key} (another store or dataset)")
            else:
                found.append(
                    f"{key}: checkpoint {old_run.get(key)!r}, this run {new_run.get(key)!r}"
                )
    return found


def read_checkpoint(
    path: Path,
    specs: Sequence[SAESpec],
    steps_per_epoch: int,
    epochs: int,
    run: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The saved state, if it was written by this same run; else `CheckpointMismatchError`."""
    with safe_open(str(path), framework="pt") as f:
        state = json.loads((f.metadata() or {}).get("saekit_state", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"{path} is not a checkpoint this saekit can resume (format "
            f"{state.get('format')!r}); delete it to start over, or pass resume=False."
        )
    expected = {
        "specs": json.loads(json.dumps([s.to_dict() for s in specs])),
        "steps_per_epoch": steps_per_epoch,
        "epochs": epochs,
        "run": json.loads(json.dumps(dict(run or {}))),
    }
    differences = _differences(state, expected)
    if differences:
        raise CheckpointMismatchError(
            f"The checkpoint {path} was written by a run with other settings ("
            f"{'; '.join(differences)}). Rerun with the checkpoint's settings to resume it, or "
            "start over: delete it, pass resume=False, or use --overwrite on the command line."
        )
    normalizers = {
        (n["source"], n["input_norm"]): InputNormalizer(tensors[f"norm{j}.mean"], n["scale"])
        for j, n in enumerate(state["normalizers"])
    }
    return {"step": state["step"], "tensors": tensors, "normalizers": normalizers}


def load_state(
    groups: Sequence[Any], tensors: Mapping[str, torch.Tensor], device: torch.device
) -> None:
    """Copy a checkpoint's tensors into freshly built groups (weights, Adam, counters)."""
    with torch.no_grad():
        for g, group in enumerate(groups):
            for name, p in group.model.named_parameters():
                p.copy_(tensors[f"g{g}.param.{name}"])
                adam = {
                    key.rsplit(".", 1)[1]: value
                    for key, value in tensors.items()
                    if key.startswith(f"g{g}.adam.{name}.")
                }
                if adam:
                    fused = group.optimizer.defaults.get("fused")
                    group.optimizer.state[p] = {
                        "step": adam["step"].reshape(()).to(device if fused else "cpu"),
                        "exp_avg": adam["exp_avg"].reshape(p.shape).to(device),
                        "exp_avg_sq": adam["exp_avg_sq"].reshape(p.shape).to(device),
                    }
            for name, b in group.model.named_buffers():
                b.copy_(tensors[f"g{g}.buffer.{name}"])
            group.since_fired_nS.copy_(tensors[f"g{g}.since_fired"])
