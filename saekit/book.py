"""The book: profiles, chapter parameters, the papermill runner and the site build.

Every chapter is a Jupytext text notebook in ``notebooks/`` whose first code cell is tagged
``parameters`` (``profile = "mini"`` plus the study's knobs) and whose second cell calls
`setup(globals())`. `setup` checks what papermill injected against the parameters cell (unknown
names and wrong types stop the chapter with the list of valid parameters), prints which profile
and parameters produced the page, and returns a `Chapter` that resolves the profile into models,
data and a working folder.

``saekit book`` executes every chapter with papermill into ``book/`` and builds the HTML with
Jupyter Book 1 (``_build/html``).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import saekit

if TYPE_CHECKING:
    from saekit.activations import ActivationStore
    from saekit.data import ImageFolder

PROFILES = ("mini", "paper")
REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
EXECUTED_DIR = REPO_ROOT / "book"

#: The papers' encoders by hub id (paper profile) and their mini stand-ins.
PAPER_ENCODERS = {
    "dinov2": "facebook/dinov2-giant",
    "clip": "openai/clip-vit-large-patch14",
    "vit": "google/vit-large-patch16-224",
    "resnet": "microsoft/resnet-50",
}

#: Mini-profile split name -> (toy-world split, shift); and the default images per class.
MINI_SPLITS = {
    "train": ("train", None),
    "val": ("val", None),
    "v2": ("val", "v2"),
    "sketch": ("val", "sketch"),
    "rendition": ("val", "rendition"),
    "hard": ("val", "hard"),
    "far_ood": ("val", "far_ood"),
}
MINI_IMAGES_PER_CLASS = {"train": 60, "val": 20}

#: Environment for the chapters' kernels: no progress-bar widgets saved into the pages.
QUIET_PAGES = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

IMAGENET_LAYOUT = """Expected ImageNet-style folders (one sub-folder per WordNet id):
    {path}/n01440764/*.JPEG
    {path}/n01443537/*.JPEG
    ...
Pass the folder with `-p {name} /path/to/folder` (papermill) or `saekit book -p {name} PATH`."""


class ParameterError(ValueError):
    """A chapter got a parameter it does not declare, or a value of the wrong type."""


_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def _declared_parameters(source: str) -> dict[str, Any]:
    """Names and default values assigned in a parameters cell's source."""
    declared = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        declared[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        declared[target.id] = None
    return declared


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) == isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))


def check_parameters(declared: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise `ParameterError` listing the valid parameters if `given` strays from `declared`."""
    valid = "\n".join(
        f"  {name} = {default!r}  ({type(default).__name__})" for name, default in declared.items()
    )
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ParameterError(
            f"Unknown parameter(s) {unknown}. This chapter's parameters are:\n{valid}"
        )
    for name, value in given.items():
        if not _type_ok(declared[name], value):
            raise ParameterError(
                f"Parameter {name}={value!r} is a {type(value).__name__}; expected "
                f"{type(declared[name]).__name__}. This chapter's parameters are:\n{valid}"
            )
    if given.get("profile", declared.get("profile")) not in PROFILES:
        raise ParameterError(f"profile must be one of {PROFILES}, not {given.get('profile')!r}.")


@dataclass
class Chapter:
    """A chapter's resolved settings: profile, parameters, and where its artefacts live."""

    profile: str
    """'mini' (toy world, miniature models; what CI builds) or 'paper' (hub ids, ImageNet)."""
    params: dict[str, Any]
    """Every parameter of the chapter with the value it runs with."""
    workdir: Path = field(default_factory=Path)
    """Folder for stores, SAEs and tables; shared by chapters of one profile so work is reused."""

    def require_folder(self, name: str) -> Path:
        """The folder parameter `name`, or an error that shows the expected layout."""
        value = self.params.get(name)
        if not value or not Path(value).expanduser().is_dir():
            raise FileNotFoundError(
                f"Parameter {name}={value!r} is not a folder.\n"
                + IMAGENET_LAYOUT.format(
                    path=value or f"/data/imagenet/{name.removeprefix('imagenet_')}", name=name
                )
            )
        return Path(value).expanduser()

    def encoder_id(self, family: str) -> str:
        """Hub id (paper) or, in the mini profile, the toy-world ViT ("toyvit") or a miniature."""
        if self.profile == "paper":
            if family not in PAPER_ENCODERS:
                raise KeyError(
                    f"No paper encoder {family!r}; choose from {sorted(PAPER_ENCODERS)}."
                )
            return PAPER_ENCODERS[family]
        if family == "toyvit":
            from saekit.toyworld import toyvit_path

            return str(toyvit_path())
        from saekit.models import miniature

        path = self.workdir / "models" / family
        if not (path / "config.json").exists():
            miniature(family, path)
        return str(path)

    def dataset(self, split: str, n_per_class: int | None = None) -> ImageFolder:
        """Images of a split: "train", "val", a shift ("v2", "sketch", "rendition", "hard") or
        "far_ood". Paper profile: the folder parameter ``imagenet_<split>``; mini profile: the
        toy world exported once (ImageNet layout) under the work folder."""
        from saekit.data import ImageFolder

        if self.profile == "paper":
            return ImageFolder(self.require_folder(f"imagenet_{split}"))
        from saekit.toyworld import export_imagefolder

        n_per_class = n_per_class or MINI_IMAGES_PER_CLASS.get(split, 20)
        root = self.workdir / "data" / f"{split}-{n_per_class}"
        if not (root / ".complete").exists():
            base_split, shift = MINI_SPLITS[split]
            export_imagefolder(root, n_per_class, split=base_split, shift=shift)
            (root / ".complete").touch()
        return ImageFolder(root)

    def store(
        self,
        family: str,
        split: str,
        layers: str | list[int] = "all",
        tokens: str = "cls",
        n_per_class: int | None = None,
    ) -> ActivationStore:
        """Activations of encoder `family` over `split`, extracted once and reused by chapters."""
        from saekit.activations import extract
        from saekit.models import load_encoder

        dataset = self.dataset(split, n_per_class)
        encoder = load_encoder(self.encoder_id(family))
        layer_tag = layers if isinstance(layers, str) else "-".join(map(str, layers))
        out = self.workdir / "stores" / f"{family}-{split}-{len(dataset)}-{tokens}-{layer_tag}"
        return extract(
            encoder,
            dataset,
            layers=layers,
            tokens=tokens,
            out=out,
            dtype="float32" if self.profile == "mini" else "float16",
        )


def setup(namespace: dict[str, Any] | None = None, *, show: bool = True) -> Chapter:
    """Validate a chapter's parameters, print the provenance banner, and resolve the profile.

    Called as the second cell of every chapter: ``chapter = saekit.book.setup(globals())``.
    The declared parameters are read from the first executed cell (the parameters cell);
    anything else defined before this call was injected by papermill and must be declared.
    """
    namespace = namespace if namespace is not None else {}
    history = namespace.get("In") or []
    sources = [cell for cell in history if cell.strip()]
    declared = _declared_parameters(sources[0]) if sources else {}
    defined = {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_")
        and name not in _IPYTHON_NAMES
        and not callable(value)
        and type(value).__name__ != "module"
    }
    if declared:
        check_parameters(declared, defined)
    params = {name: defined.get(name, default) for name, default in declared.items()} or defined
    profile = params.get("profile", "mini")
    workdir = Path(os.environ.get("SAEKIT_WORKDIR", REPO_ROOT / "runs")) / profile
    workdir.mkdir(parents=True, exist_ok=True)
    chapter = Chapter(profile=profile, params=params, workdir=workdir)
    if show:
        _show_banner(chapter)
        _inline_figures()
    if os.environ.get("TQDM_DISABLE") == "1":
        _silence_progress_bars()
    return chapter


def _silence_progress_bars() -> None:
    """Make every later tqdm bar silent, even one created with ``disable=False``.

    ``saekit book`` sets TQDM_DISABLE=1 so that pages do not keep dozens of finished progress
    widgets, but tqdm reads that variable only as a default and saekit's loops pass
    ``disable=not progress`` explicitly. Modules a chapter imports after `setup` pick up this
    class; an interactive session (no TQDM_DISABLE) keeps its bars.
    """
    import tqdm
    import tqdm.auto
    import tqdm.std

    class SilentTqdm(tqdm.std.tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = SilentTqdm
    tqdm.tqdm = SilentTqdm


def _inline_figures() -> None:
    """Show figures that a cell returns (papermill kernels do not always pick the inline backend)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.run_line_magic("matplotlib", "inline")


def _show_banner(chapter: Chapter) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = "".join(
        f"<tr><td><code>{k}</code></td><td><code>{v!r}</code></td></tr>"
        for k, v in chapter.params.items()
    )
    html = (
        f"<div class='saekit-provenance'><b>Produced with profile <code>{chapter.profile}</code></b>"
        f" by saekit {saekit.__version__} on {stamp}.<table>{rows}</table></div>"
    )
    try:
        from IPython.display import HTML, display

        display(HTML(html))
    except ImportError:
        print(f"profile={chapter.profile} params={chapter.params}")


# -- running chapters ------------------------------------------------------------------------
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


def chapter_parameters(source: Path) -> dict[str, Any]:
    """The parameters a chapter declares (its cell tagged ``parameters``), with defaults."""
    import jupytext

    for cell in jupytext.read(source).cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return _declared_parameters(cell.source)
    return {}


def _coerce(default: Any, value: Any) -> Any:
    """A command-line value in its parameter's type ("-p layers 5" for a string parameter)."""
    if isinstance(default, str) and not isinstance(value, str):
        return json.dumps(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
            k: _coerce(declared[source][k], v) for k, v in params.items() if k in declared[source]
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
