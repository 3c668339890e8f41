"""The README as a user reads it: its Python runs as written, its sweep file is the example in the
repository and parses to the SAEs it counts, and its versions and commands are the project's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from conftest import write_image_folder

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    """Every Python block, in order, in one namespace; hub ids and data folders are swapped for a
    miniature of the same architecture and tiny ImageNet-style folders (no network, seconds)."""
    from saekit.mini.miniatures import miniature

    swaps = {
        '"facebook/dinov2-small"': repr(str(miniature("dinov2", tmp_path / "dinov2-small"))),
        '"/data/imagenet/train"': repr(str(write_image_folder(tmp_path / "train", seed=0))),
        '"/data/imagenet/val"': repr(str(write_image_folder(tmp_path / "val", seed=1))),
    }
    blocks = _blocks("python")
    assert blocks, "the README has no Python example"
    source = "\n".join(blocks)
    for readme_text, local in swaps.items():
        assert readme_text in source, f"the README no longer uses {readme_text}: update the swaps"
        source = source.replace(readme_text, local)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(source, "README.md", "exec"), namespace)
    # What the example promises: two SAEs, trained, cached, scored on the held-out store.
    saes, metrics = namespace["saes"], namespace["metrics"]
    assert len(saes) == 2 and (tmp_path / "saes").is_dir()
    assert metrics.n_rows == len(namespace["held_out"]) and metrics.mse >= 0
    assert namespace["out"].cls[-1].shape[0] == len(namespace["images"])


def test_the_sweep_file_shown_is_the_example_and_holds_the_saes_it_counts():
    from saekit.sae.commands import load_sweep_config

    example = ROOT / "examples" / "sweep.toml"
    assert example.read_text() in _blocks("toml"), "the README must show examples/sweep.toml whole"
    config = load_sweep_config(example)
    counted = re.search(r"under `\[\[sae\]\]`: (\d+) SAEs", README)
    assert counted, "the README says how many SAEs the example trains"
    assert len(config.specs) == int(counted.group(1))
    assert len({spec.label for spec in config.specs}) == len(config.specs)


def test_the_python_version_is_the_one_pyproject_requires():
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    stated = set(re.findall(r"Python (?:≥|>=) ?(\d+\.\d+)", README))
    assert stated == {required.removeprefix(">=")}


@pytest.mark.parametrize("target", sorted(set(re.findall(r"\bmake ([a-z]+)\b", README))))
def test_every_make_command_the_readme_names_exists(target):
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{target}:", makefile, re.M), f"the Makefile has no `{target}` target"
