"""The book runner: a failing chapter never replaces its last good page, every chapter runs,
each failure is reported with its chapter and cell, and ``--plan`` stops chapters at their plan."""

from __future__ import annotations

import json
import math

import nbformat
import pytest

from saekit import runner
from saekit.book import Chapter
from saekit.cli import main
from saekit.plan import SAENeed, human_bytes

CHAPTER = """# %% tags=["parameters"]
profile = "mini"
fail = False
# %%
print("value", 41 + 1)
# %%
if fail:
    raise ValueError("boom")
"""


def outputs(notebook) -> str:
    cells = nbformat.read(notebook, as_version=4).cells
    return "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)


def test_a_failed_chapter_keeps_the_last_good_page_and_says_which_cell(tmp_path):
    source = tmp_path / "notebooks" / "01_demo.py"
    source.parent.mkdir()
    source.write_text(CHAPTER)
    pages, failed = tmp_path / "book", tmp_path / "failed"
    page = runner.run_chapter(source, params={}, out_dir=pages, failed_dir=failed)
    assert page == pages / "01_demo.ipynb" and "value 42" in outputs(page)
    good = page.read_bytes()

    with pytest.raises(runner.ChapterFailed) as err:
        runner.run_chapter(source, params={"fail": True}, out_dir=pages, failed_dir=failed)
    failure = err.value.failure
    assert failure.chapter == "01_demo" and failure.error == "ValueError: boom"
    # the third code cell, counting papermill's injected parameters cell
    assert failure.cell == 4 and failure.cell_source == "if fail:"
    assert page.read_bytes() == good  # the good page stayed
    assert failure.notebook == failed / "01_demo.ipynb" and "boom" in failure.notebook.read_text()
    assert "01_demo: cell In [4] `if fail:` raised ValueError: boom" in str(failure)
    assert not list(pages.glob(".*.ipynb"))  # no staged or half-written notebooks left behind

    runner.run_chapter(source, params={}, out_dir=pages, failed_dir=failed)
    assert not failure.notebook.exists()  # a later success retires the stale error file


def test_the_book_runs_every_chapter_reports_each_failure_and_exits_nonzero(
    tmp_path, monkeypatch, capsys
):
    sources = []
    for name, fails in (("01_a", False), ("02_b", True), ("03_c", False)):
        source = tmp_path / f"{name}.py"
        source.write_text(CHAPTER.replace("fail = False", f"fail = {fails}"))
        sources.append(source)
    monkeypatch.setattr(runner, "chapters", lambda: sources)
    pages = tmp_path / "out" / "book"
    assert main(["book", "--no-html", "--out", str(pages)]) == 1
    assert sorted(p.name for p in pages.glob("*.ipynb")) == ["01_a.ipynb", "03_c.ipynb"]
    assert (tmp_path / "out" / "_build" / "failed" / "02_b.ipynb").exists()
    err = capsys.readouterr().err
    assert "1 of 3 chapters failed" in err and "02_b: cell In [4] `if fail:`" in err


PLANNED = """# %% tags=["parameters"]
profile = "mini"
# %%
import saekit.book
chapter = saekit.book.setup(globals(), show=False)
# %%
plan = chapter.plan(stores=[("toyvit", "val", [5], "patch", 2)], notes=["a toy plan"])
# %%
open("ran-past-the-plan", "w").write("x")
"""


def test_plan_mode_stops_each_chapter_at_its_plan_and_skips_chapters_without_one(
    tmp_path, monkeypatch, capsys
):
    planned, unplanned = tmp_path / "01_planned.py", tmp_path / "02_unplanned.py"
    planned.write_text(PLANNED)
    unplanned.write_text(PLANNED.replace("chapter.plan(", "print("))
    monkeypatch.setattr(runner, "chapters", lambda: [planned, unplanned])
    monkeypatch.setenv("SAEKIT_WORKDIR", str(tmp_path / "runs"))
    assert main(["book", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "Plan for 01_planned (profile mini)" in out and "note: a toy plan" in out
    # 2 images x 30 classes, 36 patches of width 64 at layer 5, float32
    assert "toyvit val: 60 images (toy world), 1 layer(s) 5, patch" in out
    assert (
        f"{human_bytes(60 * 36 * 64 * 4)}, to extract" in out and human_bytes(553e3) == "553.0 kB"
    )
    assert "No plan cell (chapter.plan(...)) in: 02_unplanned." in out
    assert not (tmp_path / "ran-past-the-plan").exists()


def test_a_paper_plan_counts_a_store_as_the_store_would_take_it(tmp_path, monkeypatch):
    import transformers

    from saekit.sae.architectures import SAESpec

    # DINOv2-g's shape without its weights: config and processor are all a plan reads
    folder = tmp_path / "dinov2-g"
    transformers.Dinov2Config(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, patch_size=14
    ).save_pretrained(folder)
    transformers.BitImageProcessor(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(folder)
    monkeypatch.setattr("saekit.book.PAPER_ENCODERS", {"dinov2": str(folder)})
    chapter = Chapter("paper", {"imagenet_train": None}, workdir=tmp_path)
    spec = SAESpec("relu", layer=-1, recipe="olson2025")
    plan = chapter.plan(
        stores=[("dinov2", "train"), ("dinov2", "train", [-2], "patch")],
        saes=[
            SAENeed(spec, on=("dinov2", "train")),
            SAENeed(SAESpec("topk", k=32), on=("dinov2", "train"), epochs=1, per_layer=True),
        ],
    )
    cls_store, patch_store = plan.stores
    assert cls_store["images"] == 1_281_167 and cls_store["n_layers"] == 40
    assert cls_store["bytes"] == 1_281_167 * 40 * 1536 * 2  # float16
    assert "157.4 GB, to extract" in plan.text()
    assert patch_store["layer_list"] == "38" and patch_store["tokens_per_image"] == 256
    sae, *sweep = plan.saes
    assert [a["label"].split("-")[0] for a in sweep] == [f"layer{i:02d}" for i in range(40)]
    assert "SAEs (41;" in plan.text() and "... 35 more ..." in plan.text()
    assert sae["label"].startswith("layer39-relu-x8") and sae["epochs"] == 3
    assert sae["d_in"] == 1536 and sae["d_sae"] == 8 * 1536
    assert sae["steps"] == math.ceil(1_281_167 / 64) * 3
    assert json.loads(json.dumps(plan.to_json()))["stores"][0]["bytes"] == cls_store["bytes"]


def test_pages_executed_elsewhere_get_a_book_root_of_their_own(tmp_path):
    pages = tmp_path / "rehearsal" / "book"
    pages.mkdir(parents=True)
    root = runner.stage_book(pages)
    assert root == pages.parent
    assert (root / "_toc.yml").read_text() == (runner.REPO_ROOT / "_toc.yml").read_text()
    written = {p.name for p in runner.EXECUTED_DIR.glob("*.md")}
    assert "intro.md" in written and written <= {p.name for p in pages.glob("*.md")}
    assert (pages / "_static" / "saekit.css").exists()
    assert runner.stage_book(runner.EXECUTED_DIR) == runner.REPO_ROOT  # the book itself: as is
