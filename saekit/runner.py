"""The book, host side: ``saekit book`` executes the chapters with papermill and builds the site.

Every chapter in ``notebooks/`` runs in its own kernel (which calls `saekit.book.setup`); the
executed notebooks land in ``book/`` and Jupyter Book 1 renders them into ``_build/html``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from saekit.book import (
    EXECUTED_DIR,
    NOTEBOOK_DIR,
    PROFILES,
    QUIET_PAGES,
    REPO_ROOT,
    _declared_parameters,
    _type_ok,
    declared_types,
)


def chapters() -> list[Path]:
    """The chapters' text sources in reading order."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def run_chapter(
    source: Path,
    profile: str = "mini",
    params: dict[str, Any] | None = None,
    out_dir: Path = EXECUTED_DIR,
) -> Path:
    """Execute one chapter with papermill; the executed notebook lands in `out_dir`."""
    import jupytext
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    notebook = jupytext.read(source)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    staged = out_dir / f".{source.stem}.input.ipynb"
    jupytext.write(notebook, staged)
    target = out_dir / f"{source.stem}.ipynb"
    # Progress bars would be saved into the page as dozens of finished widgets; the runner shows
    # the chapter's progress in the terminal instead. Set TQDM_DISABLE=0 to keep them.
    quiet = {k: v for k, v in QUIET_PAGES.items() if k not in os.environ}
    os.environ.update(quiet)
    try:
        papermill.execute_notebook(
            str(staged),
            str(target),
            parameters={"profile": profile, **(params or {})},
            kernel_name="python3",
            cwd=str(source.parent),
            progress_bar=True,
        )
    finally:
        staged.unlink(missing_ok=True)
        for key in quiet:
            os.environ.pop(key, None)
    return target


def build_site(root: Path = REPO_ROOT) -> Path:
    """Render the executed chapters with Jupyter Book 1 into ``_build/html``."""
    command = [
        str(Path(sys.executable).parent / "jupyter-book"),
        "build",
        str(root),
        "--keep-going",
    ]
    subprocess.run(command, check=True)
    return root / "_build" / "html"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parameters_cell(source: Path) -> str:
    import jupytext

    for cell in jupytext.read(source).cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return cell.source
    return ""


def chapter_parameters(source: Path) -> dict[str, Any]:
    """The parameters a chapter declares (its cell tagged ``parameters``), with defaults."""
    return _declared_parameters(_parameters_cell(source))


def chapter_types(source: Path) -> dict[str, tuple[type, ...] | None]:
    """The types each of a chapter's parameters allows (its annotation, or its default's)."""
    return declared_types(_parameters_cell(source))


def _coerce(types: tuple[type, ...] | None, value: Any) -> Any:
    """A command-line value in its parameter's type ("-p layers 5" for a string parameter)."""
    if types is None or value is None:
        return value
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if str in types and not isinstance(value, str) and not _type_ok(types, value):
        return json.dumps(value)
    return value


def _book(args: argparse.Namespace) -> int:
    params = {name: _parse_value(value) for name, value in args.param or []}
    sources = chapters()
    if args.only:
        sources = [
            p for p in sources if p.stem == args.only or p.stem.split("_", 1)[1] == args.only
        ]
        if not sources:
            names = ", ".join(p.stem for p in chapters())
            raise SystemExit(f"No chapter {args.only!r}; chapters are: {names}")
    # Each chapter gets the -p values it declares; a name no chapter declares is an error.
    declared = {source: chapter_parameters(source) for source in sources}
    types = {source: chapter_types(source) for source in sources}
    unknown = sorted(set(params) - {name for names in declared.values() for name in names})
    if unknown:
        listing = "\n".join(
            f"  {source.stem}: {', '.join(names)}" for source, names in declared.items()
        )
        raise SystemExit(
            f"Unknown parameter(s) {unknown}; the chapters' parameters are:\n{listing}"
        )
    timings = []
    for source in sources:
        start = time.perf_counter()
        print(f"[saekit book] executing {source.name} (profile {args.profile})", flush=True)
        own = {
            k: _coerce(types[source][k], v) for k, v in params.items() if k in declared[source]
        }
        run_chapter(source, args.profile, own)
        timings.append((source.stem, time.perf_counter() - start))
    for name, seconds in timings:
        print(f"[saekit book] {name}: {seconds:.0f} s")
    if not args.no_html:
        site = build_site()
        print(f"[saekit book] site: {site / 'index.html'}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``saekit book`` to the CLI."""
    book = commands.add_parser("book", help="execute the chapters and build the site")
    book.add_argument("--profile", default="mini", choices=PROFILES)
    book.add_argument("--only", help="execute just this chapter (e.g. 01_layer_sweep)")
    book.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        help="a chapter parameter, as papermill's -p",
    )
    book.add_argument("--no-html", action="store_true", help="execute only; skip the site build")
    book.set_defaults(handler=_book)
