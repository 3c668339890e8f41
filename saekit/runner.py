"""The book, host side: ``saekit book`` executes the chapters with papermill and builds the site.

Every chapter in ``notebooks/`` runs in its own kernel (which calls `saekit.book.setup`); the
executed notebooks land in ``book/`` and Jupyter Book 1 renders them into ``_build/html``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saekit.book import (
    CHAPTER_ENV,
    EXECUTED_DIR,
    NOTEBOOK_DIR,
    PLAN_ENV,
    PROFILES,
    QUIET_PAGES,
    REPO_ROOT,
    PlanComplete,
    _declared_parameters,
    _type_ok,
    declared_types,
)


def chapters() -> list[Path]:
    """The chapters' text sources in reading order."""
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


FAILED_DIR = REPO_ROOT / "_build" / "failed"
"""Where a failed chapter's executed notebook goes (the last good page in ``book/`` stays);
with ``--out DIR/book``, ``DIR/_build/failed``."""

PLAN_ERROR = "PlanComplete"
"""The exception name with which `saekit.book.Chapter.plan` stops a chapter in plan mode."""


@dataclass
class ChapterFailure:
    """One chapter that stopped: where, why, and where its executed notebook is."""

    chapter: str
    """The chapter's stem, e.g. ``02_ood``."""
    error: str
    """The exception, as ``Name: message`` (first line of the message)."""
    cell: int | None = None
    """Execution count of the failing cell (``In [n]`` in the error notebook), if known."""
    cell_source: str = ""
    """The failing cell's first non-blank line."""
    notebook: Path | None = None
    """The executed notebook up to the failure (under `FAILED_DIR`)."""

    def __str__(self) -> str:
        where = f"cell In [{self.cell}] `{self.cell_source}`" if self.cell else "before any cell"
        saved = f"; executed notebook: {self.notebook}" if self.notebook else ""
        return f"{self.chapter}: {where} raised {self.error}{saved}"


class ChapterFailed(RuntimeError):
    """A chapter raised; `failure` says which cell and what, the good page was kept."""

    def __init__(self, failure: ChapterFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _failure(source: Path, err: Exception, notebook: Path | None) -> ChapterFailure:
    """Describe `err`, papermill's or the kernel's, with the failing cell when known."""
    from papermill.exceptions import PapermillExecutionError

    if not isinstance(err, PapermillExecutionError):
        return ChapterFailure(
            source.stem, f"{type(err).__name__}: {_first_line(str(err))}", notebook=notebook
        )
    cell_source = ""
    if notebook is not None and notebook.exists():
        import nbformat

        # The cell holding the error output (papermill's cell_index counts differently).
        for cell in nbformat.read(notebook, as_version=4).cells:
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                cell_source = _first_line(cell.source)
    return ChapterFailure(
        source.stem,
        f"{err.ename}: {_first_line(err.evalue)}",
        cell=err.exec_count,
        cell_source=cell_source,
        notebook=notebook,
    )


def run_chapter(
    source: Path,
    profile: str = "mini",
    params: dict[str, Any] | None = None,
    out_dir: Path = EXECUTED_DIR,
    failed_dir: Path = FAILED_DIR,
    env: dict[str, str] | None = None,
    progress_bar: bool = True,
) -> Path:
    """Execute one chapter with papermill; the executed notebook lands in `out_dir`.

    The notebook is written beside the page and renamed over it only when every cell ran, so a
    failure never replaces the last good page: the failed run goes to ``failed_dir`` and
    `ChapterFailed` says which cell raised what. `env` is set for the kernel only.
    """
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
    # Executed away from the pages (and from git's view: _build is ignored), moved in on success.
    running = failed_dir.parent / "running" / f"{source.stem}.ipynb"
    running.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(notebook, staged)
    target = out_dir / f"{source.stem}.ipynb"
    failed = failed_dir / f"{source.stem}.ipynb"
    # Progress bars would be saved into the page as dozens of finished widgets; the runner shows
    # the chapter's progress in the terminal instead. Set TQDM_DISABLE=0 to keep them.
    kernel_env = {k: v for k, v in QUIET_PAGES.items() if k not in os.environ}
    kernel_env |= {CHAPTER_ENV: source.stem} | (env or {})
    previous = {key: os.environ.get(key) for key in kernel_env}
    os.environ.update(kernel_env)
    try:
        papermill.execute_notebook(
            str(staged),
            str(running),
            parameters={"profile": profile, **(params or {})},
            kernel_name="python3",
            cwd=str(source.parent),
            progress_bar=progress_bar,
        )
    except Exception as err:
        kept = None
        if running.exists():
            failed_dir.mkdir(parents=True, exist_ok=True)
            kept = Path(shutil.move(running, failed))
        raise ChapterFailed(_failure(source, err, kept)) from err
    finally:
        staged.unlink(missing_ok=True)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    shutil.move(running, target)
    failed.unlink(missing_ok=True)  # an older failure of this chapter is now stale
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


def stage_book(pages: Path) -> Path:
    """Make the folder above `pages` a book root like the repository's (its configuration, table
    of contents, introduction and static files), so pages executed elsewhere (``--out``, e.g. a
    rehearsal) build into their own site; return that root."""
    root = pages.parent
    if pages.resolve() == EXECUTED_DIR.resolve():
        return REPO_ROOT
    for name in ("_config.yml", "_toc.yml"):
        shutil.copyfile(REPO_ROOT / name, root / name)
    for page in EXECUTED_DIR.glob("*.md"):  # the introduction and other written pages
        shutil.copyfile(page, pages / page.name)
    static = pages / "_static"
    if not static.exists():
        static.symlink_to((EXECUTED_DIR / "_static").resolve(), target_is_directory=True)
    return root


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
    if args.plan:
        return _plan_book(sources, args.profile, params, declared, types)
    pages = Path(args.out).resolve() if args.out else EXECUTED_DIR
    if pages.name != "book":
        raise SystemExit(
            f"--out must name a folder called 'book' (e.g. build/x/book), not {pages}."
        )
    failed_dir = pages.parent / "_build" / "failed"
    timings, failures = [], []
    for source in sources:
        start = time.perf_counter()
        print(f"[saekit book] executing {source.name} (profile {args.profile})", flush=True)
        own = {k: _coerce(types[source][k], v) for k, v in params.items() if k in declared[source]}
        try:
            run_chapter(source, args.profile, own, out_dir=pages, failed_dir=failed_dir)
        except ChapterFailed as err:
            failures.append(err.failure)
            print(f"[saekit book] FAILED {err.failure}", flush=True)
        timings.append((source.stem, time.perf_counter() - start))
    for name, seconds in timings:
        print(f"[saekit book] {name}: {seconds:.0f} s")
    print(f"[saekit book] total: {sum(s for _, s in timings):.0f} s")
    if not args.no_html:
        site = build_site(stage_book(pages))
        print(f"[saekit book] site: {site / 'index.html'}")
    if failures:
        print(
            f"[saekit book] {len(failures)} of {len(sources)} chapters failed (their last good "
            "pages, if any, were kept):",
            file=sys.stderr,
        )
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


def _plan_book(
    sources: list[Path],
    profile: str,
    params: dict[str, Any],
    declared: dict[Path, dict[str, Any]],
    types: dict[Path, dict[str, tuple[type, ...] | None]],
) -> int:
    """Run each chapter up to its `Chapter.plan` cell, print every plan and the book's total.

    A chapter without a plan cell is not run at all (it would otherwise do all its work)."""
    import tempfile

    from saekit.plan import Plan, book_totals

    plans, failures, unplanned = [], [], []
    with tempfile.TemporaryDirectory(prefix="saekit-plan-") as scratch:
        for source in sources:
            if "chapter.plan(" not in source.read_text():
                unplanned.append(source.stem)
                continue
            plan_file = Path(scratch) / f"{source.stem}.json"
            own = {
                k: _coerce(types[source][k], v) for k, v in params.items() if k in declared[source]
            }
            print(f"[saekit book] planning {source.name} (profile {profile})", flush=True)
            try:
                run_chapter(
                    source,
                    profile,
                    own,
                    out_dir=Path(scratch),
                    failed_dir=Path(scratch) / "failed",
                    env={PLAN_ENV: str(plan_file)},
                    progress_bar=False,
                )
            except ChapterFailed as err:
                if not err.failure.error.startswith(PlanComplete.__name__ + ":"):
                    failures.append(err.failure)
            if plan_file.exists():
                plan = Plan.from_json(json.loads(plan_file.read_text()))
                plan.chapter = source.stem
                plans.append(plan)
            elif not any(f.chapter == source.stem for f in failures):
                unplanned.append(source.stem)
    for plan in plans:
        print(plan.text() + "\n")
    if unplanned:
        print(f"No plan cell (chapter.plan(...)) in: {', '.join(unplanned)}.")
    print(book_totals(plans))
    for failure in failures:
        print(f"[saekit book] FAILED before its plan: {failure}", file=sys.stderr)
    return 1 if failures else 0


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
    book.add_argument(
        "--out",
        help="folder named 'book' for the executed pages (default: the repository's book/); "
        "the site builds beside it, failed chapters go to its ../_build/failed",
    )
    book.add_argument(
        "--plan",
        action="store_true",
        help="print what each chapter will need (images, stores on disk, SAEs) without running it",
    )
    book.set_defaults(handler=_book)
