"""A chapter's parameters: what its ``parameters`` cell declares, and whether given values fit.

The first code cell of every chapter is tagged ``parameters``: ``profile = "mini"`` and the
study's knobs, each a literal default, annotated (``lam: float | None = None``) where the
default alone does not say the type. `declared_types` and `_declared_parameters` read that cell
from its source; `check_parameters` holds what papermill injected (or ``saekit book -p``
passes) against it, so a misspelt name or a wrong type stops the chapter with the list of
valid parameters. Both sides of the book read it: the kernel (`saekit.book.setup`) and the
host (`saekit.runner`, which hands each chapter the ``saekit book -p`` values it declares).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from typing import Any

PROFILES = ("mini", "paper")
"""The book's profiles: ``mini`` runs on a CPU in minutes, ``paper`` reproduces the papers."""


class ParameterError(ValueError):
    """A chapter got a parameter it does not declare, or a value of the wrong type."""


_TYPE_NAMES: dict[str, type] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "list": list,
    "tuple": tuple,
    "dict": dict,
    "None": type(None),
}


def _annotation_types(node: ast.expr) -> tuple[type, ...] | None:
    """The types an annotation such as ``float | None`` or ``list[int] | None`` allows; None
    when it names something the check does not know (then any value passes)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _annotation_types(node.left), _annotation_types(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.Subscript):
        return _annotation_types(node.value)
    if isinstance(node, ast.Constant) and node.value is None:
        return (type(None),)
    if isinstance(node, ast.Name) and node.id in _TYPE_NAMES:
        return (_TYPE_NAMES[node.id],)
    return None


def _parameter_nodes(source: str) -> Iterator[tuple[str, ast.Assign | ast.AnnAssign]]:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    yield target.id, node


def _declared_parameters(source: str) -> dict[str, Any]:
    """Names and default values assigned in a parameters cell's source."""
    declared = {}
    for name, node in _parameter_nodes(source):
        if node.value is None:  # `_parameter_nodes` yields assignments only; for the type checker
            continue
        try:
            declared[name] = ast.literal_eval(node.value)
        except ValueError:
            declared[name] = None
    return declared


def declared_types(source: str) -> dict[str, tuple[type, ...] | None]:
    """Each parameter's allowed types: its annotation (``lam: float | None = None``), else the
    type of its default; None where neither says (any value passes)."""
    defaults = _declared_parameters(source)
    types: dict[str, tuple[type, ...] | None] = {}
    for name, node in _parameter_nodes(source):
        if isinstance(node, ast.AnnAssign):
            types[name] = _annotation_types(node.annotation)
        else:
            types[name] = None if defaults[name] is None else (type(defaults[name]),)
    return types


def type_label(types: tuple[type, ...] | None) -> str:
    """``float | None`` for the types a parameter allows."""
    if types is None:
        return "any"
    return " | ".join("None" if t is type(None) else t.__name__ for t in types)


def _type_ok(types: tuple[type, ...] | None, value: Any) -> bool:
    if types is None:
        return True
    if value is None:
        return type(None) in types
    if isinstance(value, bool):  # a bool is an int to Python, never to a parameter
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    if isinstance(value, list | tuple):
        return bool({list, tuple} & set(types))
    return isinstance(value, tuple(t for t in types if t is not bool))


def check_parameters(
    declared: dict[str, Any],
    given: dict[str, Any],
    types: dict[str, tuple[type, ...] | None] | None = None,
) -> None:
    """Raise `ParameterError` listing the valid parameters if `given` strays from `declared`
    (defaults by name) or from `types` (allowed types by name; default: the defaults' types)."""
    if types is None:
        types = {k: None if v is None else (type(v),) for k, v in declared.items()}
    valid = "\n".join(
        f"  {name} = {default!r}  ({type_label(types.get(name))})"
        for name, default in declared.items()
    )
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ParameterError(
            f"Unknown parameter(s) {unknown}. This chapter's parameters are:\n{valid}"
        )
    for name, value in given.items():
        if not _type_ok(types.get(name), value):
            raise ParameterError(
                f"Parameter {name}={value!r} is a {type(value).__name__}; expected "
                f"{type_label(types.get(name))}. This chapter's parameters are:\n{valid}"
            )
    if given.get("profile", declared.get("profile")) not in PROFILES:
        raise ParameterError(f"profile must be one of {PROFILES}, not {given.get('profile')!r}.")
