"""Packaging: compatible ranges in pyproject, the exact lock `make` and CI install, and the files
that must agree with them (environment.yml, the oldest tested set, LICENSE, CITATION.cff, the
jupytext pairing, the publishing workflow and `make publish`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCK = ROOT / "requirements" / "lock.txt"
OLDEST = ROOT / "requirements" / "oldest.txt"
MAKEFILE = (ROOT / "Makefile").read_text()
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _requirements() -> list[Requirement]:
    """Every requirement saekit declares: the core and each extra (``all`` only names extras)."""
    lines = list(PROJECT["dependencies"])
    for extra, deps in PROJECT["optional-dependencies"].items():
        if extra != "all":
            lines += deps
    return [Requirement(line) for line in lines]


def _pins(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            name = canonicalize_name(match[1])
            assert name not in pins, f"{path.name} pins {name} twice"
            pins[name] = Version(match[2])
    return pins


def _make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)", MAKEFILE, re.M)
    assert match, f"the Makefile defines no {name}"
    return match[1]


def _recipe(target: str) -> list[str]:
    """The command lines of a Makefile rule (tab-indented lines after ``target:``)."""
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", MAKEFILE, re.M)
    assert match, f"the Makefile has no rule for {target}"
    return [line.strip() for line in match[1].splitlines()]


def test_pyproject_declares_ranges_not_pins():
    for requirement in _requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators, f"{requirement} needs a tested lower bound (>=)"
        assert not operators & {"==", "===", "~="}, f"{requirement}: a range, not a pin"


def test_the_lock_satisfies_every_range():
    lock = _pins(LOCK)
    torch = Version(_make_variable("TORCH"))
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        # torch is the user's (or the Makefile's CPU wheel, installed first), never the lock's.
        version = torch if name == "torch" else lock.get(name)
        assert version is not None, f"{name} is required but not in {LOCK.name}"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCK.name} has {name}=={version}, outside pyproject's {requirement}"
        )
    assert "torch" not in lock, "torch comes first, from the user's or the Makefile's build"


def test_the_lock_pins_every_line_exactly():
    lines = [
        line
        for line in LOCK.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines and all(PIN.match(line) for line in lines), [
        line for line in lines if not PIN.match(line)
    ]


def test_lower_bounds_are_the_oldest_set_the_tests_ran_with():
    oldest = _pins(OLDEST)
    bounds = {}
    for requirement in _requirements():
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        bounds[canonicalize_name(requirement.name)] = max(lower)
    assert oldest == bounds


def test_make_installs_torch_first_then_the_lock_then_saekit_without_deps():
    rule = next(line for line in MAKEFILE.splitlines() if line.startswith("$(VENV)/.installed:"))
    assert "requirements/lock.txt" in rule, "a changed lock must reinstall the venv"
    steps = _recipe("$(VENV)/.installed")
    order = [
        next(i for i, line in enumerate(steps) if fragment in line)
        for fragment in ("torch==$(TORCH)", "-r requirements/lock.txt", "--no-deps -e .")
    ]
    assert order == sorted(order), steps


def test_environment_yml_installs_what_make_installs():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(str(d) for d in env["dependencies"] if str(d).startswith("python="))
    assert SpecifierSet(PROJECT["requires-python"]).contains(python.split("=", 1)[1] + ".0")
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    installs = [line for line in pip if not line.startswith("--")]  # index options aside
    assert installs == [f"torch=={_make_variable('TORCH')}", "-r requirements/lock.txt", "-e ."]


def test_license_and_citation_agree_with_pyproject_and_the_readme():
    assert PROJECT["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT"
    assert citation["version"] == PROJECT["version"]
    # The three papers the README says the book reproduces are the references to cite.
    readme_titles = re.findall(r"^- .*?\*(.+?)\*\s*$", (ROOT / "README.md").read_text(), re.M)
    assert len(readme_titles) == 3
    assert sorted(ref["title"] for ref in citation["references"]) == sorted(readme_titles)
    assert all(ref["authors"] and ref["year"] for ref in citation["references"])


def test_jupytext_pairs_the_chapters_with_git_ignored_notebooks(tmp_path):
    jupytext = pytest.importorskip("jupytext")
    from jupytext.config import load_jupytext_config

    config = load_jupytext_config(str(ROOT / "notebooks"))
    assert "ipynb" in config.default_formats("notebooks/00_toy_world.py")
    # The executed pages in book/ are outputs, not paired sources.
    assert config.default_formats("book/00_toy_world.ipynb") is None
    # `jupytext --sync` (what saving in Jupyter does): both files, the same cells in each.
    _, chapter = _chapter_copy(tmp_path)
    subprocess.run(
        [Path(sys.executable).parent / "jupytext", "--sync", f"notebooks/{chapter.name}"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    paired = jupytext.read(tmp_path / "notebooks" / f"{chapter.stem}.ipynb")
    source = jupytext.read(chapter)
    assert [c.source for c in paired.cells] == [c.source for c in source.cells]
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", f"notebooks/{chapter.stem}.ipynb"], cwd=ROOT
        )
        assert ignored.returncode == 0, "the paired .ipynb must be ignored by git"


def _chapter_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A checkout's jupytext.toml and its first chapter's source, copied under ``tmp_path``."""
    (tmp_path / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "jupytext.toml", tmp_path)
    chapter = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))[0]
    return Path(shutil.copy(chapter, tmp_path / "notebooks")), chapter


def test_jupyter_saves_an_opened_chapter_as_both_paired_files(tmp_path):
    """What JupyterLab does: open notebooks/NN.py as a notebook, save it; both files written."""
    pytest.importorskip("jupyter_server")
    jupytext = pytest.importorskip("jupytext")
    copy, chapter = _chapter_copy(tmp_path / "checkout")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = "saekit-pairing-test"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "jupyter"),
            "server",
            "--no-browser",
            "--ServerApp.allow_root=True",  # CI runs as root
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={tmp_path / 'checkout'}",
            f"--IdentityProvider.token={token}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api"

    def call(method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            api + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                call("GET", "/status")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.5)
        url = f"/contents/notebooks/{copy.name}"
        model = call("GET", url + "?type=notebook&content=1")
        assert model["type"] == "notebook", "jupytext must open the .py source as a notebook"
        call("PUT", url, {"type": "notebook", "format": "json", "content": model["content"]})
    finally:
        server.terminate()
        server.wait(timeout=30)
    paired = jupytext.read(copy.with_suffix(".ipynb"))
    assert [c.source for c in paired.cells] == [c.source for c in jupytext.read(chapter).cells]
    assert [c.source for c in jupytext.read(copy).cells] == [c.source for c in paired.cells]


def test_the_publishing_workflow_builds_the_readmes_book_and_passes_actionlint():
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert workflows
    actionlint = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    assert actionlint, "actionlint is a dev dependency (pip install -e '.[dev]')"
    result = subprocess.run(
        [actionlint, "-no-color", *map(str, workflows)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pages = yaml.safe_load((ROOT / ".github" / "workflows" / "pages.yml").read_text())
    steps = [step for job in pages["jobs"].values() for step in job.get("steps", [])]
    runs = "\n".join(step.get("run", "") for step in steps)
    # The README's command, so the published site is the one a reader can rebuild.
    assert "make book" in (ROOT / "README.md").read_text() and "make book" in runs
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-pages")]
    assert uploads and uploads[0]["with"]["path"] == "_build/html"
    assert any(str(s.get("uses", "")).startswith("actions/deploy-pages") for s in steps)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_publish_packs_the_built_site(tmp_path):
    site = tmp_path / "html"
    (site / "book").mkdir(parents=True)
    (site / "index.html").write_text("<html>home</html>")
    (site / "book" / "00_toy_world.html").write_text("<html>chapter</html>")
    tarball = tmp_path / "site.tar.gz"
    subprocess.run(
        ["make", "-s", "publish", f"SITE_DIR={site}", f"SITE_TARBALL={tarball}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    with tarfile.open(tarball) as packed:
        names = {Path(n).as_posix().removeprefix("./") for n in packed.getnames()}
        # Unpacked at a host's web root, the site's pages sit at the top.
        assert {"index.html", "book/00_toy_world.html"} <= names
        page = packed.extractfile(packed.getmember("./book/00_toy_world.html"))
        assert page.read() == b"<html>chapter</html>"
    missing = subprocess.run(
        ["make", "-s", "publish", f"SITE_DIR={tmp_path / 'none'}", f"SITE_TARBALL={tarball}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "make book" in missing.stderr + missing.stdout


def test_pre_commit_runs_the_checks_of_make_lint():
    hooks = [
        hook
        for repo in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
        for hook in repo["hooks"]
    ]
    entries = {hook["entry"].replace(".venv/bin/", "$(BIN)/") for hook in hooks}
    # Each tool the lint step runs (ruff, mypy, actionlint) with the lock's version in .venv.
    tools = {line.split()[0] + (" check" if "ruff" in line else "") for line in _recipe("lint")}
    assert entries == tools
    ruff = next(hook for hook in hooks if hook["id"] == "ruff")
    linted = next(line for line in _recipe("lint") if "ruff" in line).split()[2:]
    assert ruff["files"] == "^(" + "|".join(linted) + ")/"
