"""Chapter settings that own their profile.

Each study defines one frozen dataclass whose fields are exactly its chapter's parameters, each
documented where it is defined. Field defaults are the ``mini`` profile's values; the class
attribute ``PAPER`` holds the ``paper`` profile's differences. A notebook's parameters cell
declares the same names with ``None`` meaning "the profile's default", and the chapter resolves
them in one line::

    settings = OODSettings.for_profile(**chapter.params)

so no notebook carries a ``x or (a if mini else b)`` ternary. ``device=None`` resolves to
``"cuda"`` when a GPU is visible, else ``"cpu"`` (`default_device`, written once here).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import torch

PROFILES = ("mini", "paper")


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """Base of every chapter's settings (see the module docstring)."""

    profile: str = "mini"
    """'mini' (toy world and miniature models; what CI builds) or 'paper' (the papers' models by
    hub id on your data and GPU)."""

    PAPER: ClassVar[dict[str, Any]] = {}
    """The paper profile's values where they differ from the field defaults (mini)."""

    @classmethod
    def for_profile(cls, profile: str = "mini", **overrides: Any) -> Self:
        """The settings of ``profile`` with ``overrides`` applied; an override of ``None`` keeps
        the profile's default. Unknown names are refused with the list of valid ones."""
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, not {profile!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(
                f"{cls.__name__} has no setting(s) {unknown}; its settings are: "
                f"{', '.join(fields)}"
            )
        values: dict[str, Any] = dict(cls.PAPER) if profile == "paper" else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["profile"] = profile
        if "device" in fields and values.get("device", fields["device"].default) is None:
            values["device"] = default_device()
        for name, value in values.items():
            # Lists from a notebook become tuples, so the settings stay frozen and hashable.
            if isinstance(value, list):
                values[name] = tuple(value)
        return cls(**values)

    @property
    def mini(self) -> bool:
        """Whether this is the mini profile."""
        return self.profile == "mini"

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
