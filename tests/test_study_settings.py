"""Chapter settings own their profile: one dataclass per study, fields = the chapter's parameters."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from saekit.studies.settings import StudySettings, default_device


@dataclasses.dataclass(frozen=True)
class ToySettings(StudySettings):
    lam: float = 0.5
    """λ."""
    layers: tuple[int, ...] = (3, 5)
    """Layers."""
    device: str | None = None
    """Device; None: cuda when available."""

    PAPER: ClassVar[dict] = {"lam": 10.0, "layers": (39,)}


def test_profile_defaults_then_overrides_and_none_keeps_the_default():
    mini = ToySettings.for_profile("mini")
    assert (mini.lam, mini.layers, mini.mini) == (0.5, (3, 5), True)
    paper = ToySettings.for_profile("paper", lam=None, layers=[1, 2])
    assert (paper.lam, paper.layers, paper.mini) == (10.0, (1, 2), False)
    assert mini.device == default_device() and paper.device == default_device()
    assert ToySettings.for_profile("mini", device="meta").device == "meta"


def test_unknown_setting_and_profile_are_refused_with_the_valid_names():
    with pytest.raises(TypeError, match="lam, layers, device"):
        ToySettings.for_profile("mini", lamda=3)
    with pytest.raises(ValueError, match="profile must be one of"):
        ToySettings.for_profile("huge")


def test_settings_are_frozen():
    settings = ToySettings.for_profile("mini")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lam = 3.0  # type: ignore[misc]
    assert settings.replace(lam=2.0).lam == 2.0 and settings.lam == 0.5
