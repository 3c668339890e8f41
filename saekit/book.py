"""The book, kernel side: profiles, chapter parameters and the `Chapter` a notebook works with.

Every chapter is a Jupytext text notebook in ``notebooks/`` whose first code cell is tagged
``parameters`` (``profile = "mini"`` plus the study's knobs) and whose second cell calls
`setup(globals())`. `setup` checks what papermill injected against the parameters cell
(`saekit.book_parameters`: unknown names and wrong types stop the chapter with the list of
valid parameters), prints which profile and parameters produced the page, and returns a
`Chapter` that resolves the profile into models, data and a working folder.

The host side (``saekit book``: papermill runner and site build) is `saekit.runner`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import saekit
from saekit.book_parameters import (  # noqa: F401 (re-exported: the runner, older imports)
    PROFILES,
    ParameterError,
    _declared_parameters,
    _type_ok,
    check_parameters,
    declared_types,
)
from saekit.plan import IMAGENET_IMAGES, Plan, SAENeed, StoreNeed

if TYPE_CHECKING:
    from saekit.activations import ActivationStore
    from saekit.data import ImageDataset, ImageFolder
    from saekit.models import Encoder

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

#: Value type of the activation stores per profile.
STORE_DTYPE = {"mini": "float32", "paper": "float16"}

#: Set by ``saekit book --plan`` to the file where `Chapter.plan` records the chapter's plan.
PLAN_ENV = "SAEKIT_PLAN_FILE"
#: Set by the book runner to the executing chapter's name (`Chapter.name`).
CHAPTER_ENV = "SAEKIT_CHAPTER"

#: Environment for the chapters' kernels: no progress-bar widgets saved into the pages.
QUIET_PAGES = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

IMAGENET_LAYOUT = """Expected ImageNet-style folders (one sub-folder per WordNet id):
    {path}/n01440764/*.JPEG
    {path}/n01443537/*.JPEG
    ...
Pass the folder with `-p {name} /path/to/folder` (papermill) or `saekit book -p {name} PATH`."""


class PlanComplete(Exception):
    """Raised by `Chapter.plan` under ``saekit book --plan``: the plan is recorded, the chapter
    stops before doing any work (the runner expects this exception and nothing else)."""


_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


@dataclass
class Chapter:
    """A chapter's resolved settings: profile, parameters, and where its artefacts live."""

    profile: str
    """'mini' (toy world, miniature models; what CI builds) or 'paper' (hub ids, ImageNet)."""
    params: dict[str, Any]
    """Every parameter of the chapter with the value it runs with."""
    workdir: Path = field(default_factory=Path)
    """Folder for stores, SAEs and tables; shared by chapters of one profile so work is reused."""
    name: str = ""
    """The chapter's name (e.g. ``02_ood``) when the book runner executes it."""
    _encoders: dict[str, Encoder] = field(default_factory=dict, repr=False, compare=False)
    """Encoders loaded so far, by family (`encoder` loads each once per chapter)."""

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

    @property
    def device(self) -> str:
        """Where this chapter's encoders run: its ``device`` parameter when set, else a GPU when
        the paper profile sees one, else the CPU (the mini book's stores stay CPU-made)."""
        import torch

        given = self.params.get("device")
        if given:
            return str(given)
        return "cuda" if self.profile == "paper" and torch.cuda.is_available() else "cpu"

    def encoder_id(self, family: str) -> str:
        """Hub id (paper) or, in the mini profile, the toy-world ViT ("toyvit") or a miniature."""
        if self.profile == "paper":
            if family not in PAPER_ENCODERS:
                raise KeyError(
                    f"No paper encoder {family!r}; choose from {sorted(PAPER_ENCODERS)}."
                )
            return PAPER_ENCODERS[family]
        if family == "toyvit":
            from saekit.mini.toyworld import toyvit_path

            return str(toyvit_path())
        from saekit.mini.miniatures import miniature

        path = self.workdir / "models" / family
        if not (path / "config.json").exists():
            miniature(family, path)
        return str(path)

    def encoder(self, family: str) -> Encoder:
        """Encoder `family` on `device`, loaded once per chapter however many stores use it."""
        if family not in self._encoders:
            from saekit.models import load_encoder

            self._encoders[family] = load_encoder(self.encoder_id(family), device=self.device)
        return self._encoders[family]

    def dataset(self, split: str, n_per_class: int | None = None) -> ImageFolder:
        """Images of a split: "train", "val", a shift ("v2", "sketch", "rendition", "hard") or
        "far_ood". Paper profile: the folder parameter ``imagenet_<split>``; mini profile: the
        toy world exported once (ImageNet layout) under the work folder."""
        from saekit.data import ImageFolder

        if self.profile == "paper":
            return ImageFolder(self.require_folder(f"imagenet_{split}"))
        from saekit.mini.toyworld import export_imagefolder

        n_per_class = n_per_class or MINI_IMAGES_PER_CLASS.get(split, 20)
        root = self.workdir / "data" / f"{split}-{n_per_class}"
        if not (root / ".complete").exists():
            base_split, shift = MINI_SPLITS[split]
            export_imagefolder(root, n_per_class, split=base_split, shift=shift)
            (root / ".complete").touch()
        return ImageFolder(root)

    def count_images(self, split: str, n_per_class: int | None = None) -> tuple[int | None, str]:
        """How many images `dataset(split)` holds, without exporting or loading any, and whence
        the number comes (a plan is made before the data is in place)."""
        if self.profile == "mini":
            from saekit.mini.toyworld import N_CLASSES

            per_class = n_per_class or MINI_IMAGES_PER_CLASS.get(split, 20)
            return per_class * N_CLASSES, "toy world"
        name = f"imagenet_{split}"
        folder = self.params.get(name)
        if folder and Path(folder).expanduser().is_dir():
            from saekit.data import ImageFolder

            return len(ImageFolder(Path(folder).expanduser())), name
        known = IMAGENET_IMAGES.get(split)
        return known, f"{name} not set: " + ("ImageNet's size" if known else "unknown")

    def store_folder(
        self, family: str, split: str, n_images: int, layers: str | list[int], tokens: str
    ) -> Path:
        """Where `store` keeps these activations (one folder per encoder, split and size)."""
        layer_tag = layers if isinstance(layers, str) else "-".join(map(str, layers))
        return self.workdir / "stores" / f"{family}-{split}-{n_images}-{tokens}-{layer_tag}"

    def store(
        self,
        family: str,
        split: str,
        layers: str | list[int] = "all",
        tokens: str = "cls",
        n_per_class: int | None = None,
    ) -> ActivationStore:
        """Activations of encoder `family` over `split`, extracted once and reused by chapters.

        A finished store made from the same model files over the same images opens without
        loading the encoder; otherwise the encoder is loaded (once per chapter) and
        `saekit.activations.extract` creates, resumes or checks the store.
        """
        from saekit.activations import extract

        dataset = self.dataset(split, n_per_class)
        out = self.store_folder(family, split, len(dataset), layers, tokens)
        model_id = self.encoder_id(family)
        source = {
            "model": model_id,
            "files": model_fingerprint(model_id),
            "dtype": STORE_DTYPE[self.profile],
        }
        found = _finished_store(out, dataset, layers, tokens, source)
        if found is not None:
            return found
        store = extract(
            self.encoder(family),
            dataset,
            layers=layers,
            tokens=tokens,
            out=out,
            dtype=STORE_DTYPE[self.profile],
        )
        if source["files"] is not None:
            _source_file(out).write_text(json.dumps(source, indent=1) + "\n")
        return store

    def plan(
        self,
        stores: Sequence[StoreNeed | tuple | dict] = (),
        saes: Sequence[SAENeed] = (),
        models: Sequence[str] = (),
        notes: Sequence[str] = (),
    ) -> Plan:
        """What this chapter will need, shown before it starts (paper profile).

        `stores` are `StoreNeed`s (or their arguments as a tuple or dict, as `store` takes
        them), `saes` the SAEs it trains, `models` other checkpoints it loads (hub ids),
        `notes` anything else worth knowing. Nothing is loaded or extracted. Under
        ``saekit book --plan`` the plan is recorded and the chapter stops here.
        """
        from saekit.plan import make_plan

        needs = [StoreNeed.of(s) for s in stores]
        plan = make_plan(self, needs, list(saes), models, notes, STORE_DTYPE[self.profile])
        plan.chapter = self.name
        plan_file = os.environ.get(PLAN_ENV)
        if plan_file or self.profile == "paper":
            _display_plan(plan)
        if plan_file:
            Path(plan_file).write_text(json.dumps(plan.to_json(), indent=1) + "\n")
            raise PlanComplete(
                "Plan recorded; `saekit book --plan` stops each chapter after its plan."
            )
        return plan


def model_fingerprint(id_or_path: str) -> str | None:
    """What identifies a checkpoint's files without reading them: a hub snapshot's revision, or
    a local folder's file names, sizes and modification times. None when neither is at hand."""
    path = Path(id_or_path).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(
                f"{file.relative_to(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode()
            )
        return "files:" + digest.hexdigest()[:16]
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(id_or_path, "config.json")
    except ValueError:  # not a valid repository id
        return None
    return f"revision:{Path(found).parent.name}" if isinstance(found, str) else None


def _source_file(store_folder: Path) -> Path:
    """Beside a store: which model files and value type the chapter made it from."""
    return store_folder.with_name(store_folder.name + ".source.json")


def _finished_store(
    out: Path,
    dataset: ImageDataset,
    layers: str | list[int],
    tokens: str,
    source: dict[str, Any],
) -> ActivationStore | None:
    """The finished store at `out` if it was made from the same model files over the same
    images (checked without loading the model); None sends the caller to `extract`."""
    from saekit.activations import ActivationStore

    if source["files"] is None:
        return None
    try:
        if json.loads(_source_file(out).read_text()) != source:
            return None
        store = ActivationStore.open(
            out, layers=None if isinstance(layers, str) else layers, tokens=tokens
        )
    except (OSError, RuntimeError, ValueError):
        return None
    return store if list(store.image_ids) == list(dataset.image_ids) else None


def _display_plan(plan: Plan) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Markdown("```text\n" + plan.text() + "\n```"))
    else:
        print(plan.text())


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
    types = declared_types(sources[0]) if sources else {}
    defined = {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_")
        and name not in _IPYTHON_NAMES
        and not callable(value)
        and type(value).__name__ != "module"
    }
    if declared:
        check_parameters(declared, defined, types)
    params = {name: defined.get(name, default) for name, default in declared.items()} or defined
    profile = params.get("profile", "mini")
    workdir = Path(os.environ.get("SAEKIT_WORKDIR", REPO_ROOT / "runs")) / profile
    workdir.mkdir(parents=True, exist_ok=True)
    chapter = Chapter(
        profile=profile, params=params, workdir=workdir, name=os.environ.get(CHAPTER_ENV, "")
    )
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
