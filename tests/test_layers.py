"""The package's one rule: imports run down the pipeline, never up.

core (data, models, activations, taxonomy, masks, sae/) imports only core; analysis imports
core and analysis; mini imports core; studies import core, analysis and mini. The book, the
runner and the CLI may import anything. Every import is read from the source (including those
inside functions), so a lazy import cannot hide a violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "saekit"

CORE = "core"
ALLOWED = {
    CORE: {CORE},
    "analysis": {CORE, "analysis"},
    "mini": {CORE, "mini"},
    "studies": {CORE, "analysis", "mini", "studies"},
}
TOP_LEVEL = {"book", "runner", "cli", "eval_command", "__main__", "__init__"}


def layer_of(module: str) -> str:
    """The layer of a dotted ``saekit`` module name."""
    parts = module.split(".")
    if parts[0] != "saekit":
        raise ValueError(module)
    if len(parts) == 1:
        return "package"
    if parts[1] in ("analysis", "studies", "mini"):
        return parts[1]
    if parts[1] in TOP_LEVEL:
        return "top"
    return CORE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def saekit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``saekit`` import in a file, absolute or relative."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (
        _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    )
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("saekit")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "saekit":
                found += [(node.lineno, f"saekit.{a.name}") for a in node.names]
            elif module.startswith("saekit."):
                found.append((node.lineno, module))
    return found


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(_module_name(path))
        if layer not in ALLOWED:
            continue
        for line, module in saekit_imports(path):
            target = layer_of(module)
            if target not in ALLOWED[layer] and target != "package":
                rel = path.relative_to(PACKAGE.parent)
                bad.append(f"{rel}:{line} ({layer}) imports {module} ({target})")
    return bad


def test_imports_run_down_the_pipeline():
    assert violations() == []


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("saekit.activations", CORE),
        ("saekit.sae.cache", CORE),
        ("saekit.taxonomy", CORE),
        ("saekit.analysis.exemplars", "analysis"),
        ("saekit.studies.ood", "studies"),
        ("saekit.mini.toyworld.export", "mini"),
        ("saekit.book", "top"),
    ],
)
def test_modules_fall_in_their_layer(module, layer):
    assert layer_of(module) == layer


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "saekit"
    (fake / "sae").mkdir(parents=True)
    (fake / "analysis").mkdir()
    (fake / "sae" / "bad.py").write_text("def f():\n    from saekit.analysis import probes\n")
    (fake / "analysis" / "worse.py").write_text("from ..studies import ood\n")
    (fake / "analysis" / "fine.py").write_text("from saekit.sae import SAESpec\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations() == [
        "saekit/analysis/worse.py:1 (analysis) imports saekit.studies (studies)",
        "saekit/sae/bad.py:2 (core) imports saekit.analysis (analysis)",
    ]
