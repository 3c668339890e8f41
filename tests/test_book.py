"""The book, kernel side: parameter validation (`saekit.book_parameters`), provenance, and a
chapter's encoders and stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from saekit.book import setup
from saekit.book_parameters import (
    ParameterError,
    _declared_parameters,
    check_parameters,
)
from saekit.runner import _coerce, chapter_parameters

PARAMETERS_CELL = (
    'profile = "mini"\nlam = 10.0\nlayers = "all"\nepochs: int = 3\nshow_widgets = True\n'
)


def test_declared_parameters_are_read_with_their_defaults():
    assert _declared_parameters(PARAMETERS_CELL) == {
        "profile": "mini",
        "lam": 10.0,
        "layers": "all",
        "epochs": 3,
        "show_widgets": True,
    }


def test_unknown_parameter_lists_the_valid_ones():
    declared = _declared_parameters(PARAMETERS_CELL)
    with pytest.raises(ParameterError, match=r"Unknown parameter\(s\) \['lamda'\]") as err:
        check_parameters(declared, {"lamda": 5.0})
    assert "lam = 10.0  (float)" in str(err.value) and "epochs = 3  (int)" in str(err.value)


@pytest.mark.parametrize(
    "name,value", [("lam", "ten"), ("epochs", 2.5), ("show_widgets", 1), ("layers", 3)]
)
def test_wrong_type_is_refused(name, value):
    with pytest.raises(ParameterError, match=f"Parameter {name}="):
        check_parameters(_declared_parameters(PARAMETERS_CELL), {name: value})


def test_ints_are_fine_for_floats_and_profile_is_checked():
    declared = _declared_parameters(PARAMETERS_CELL)
    check_parameters(declared, {"lam": 5, "profile": "paper"})
    with pytest.raises(ParameterError, match="profile must be one of"):
        check_parameters(declared, {"profile": "huge"})


def test_setup_reads_the_parameters_cell_from_the_kernel_history(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEKIT_WORKDIR", str(tmp_path))
    # What papermill leaves in the kernel: the parameters cell, then its injected overrides.
    namespace = {
        "In": ["", PARAMETERS_CELL, "lam = 2\n"],
        "profile": "mini",
        "lam": 2,
        "layers": "all",
        "epochs": 3,
        "show_widgets": True,
        "np": __import__("numpy"),
    }
    chapter = setup(namespace, show=False)
    assert chapter.params == {
        "profile": "mini",
        "lam": 2,
        "layers": "all",
        "epochs": 3,
        "show_widgets": True,
    }
    assert chapter.workdir == tmp_path / "mini" and chapter.workdir.is_dir()
    namespace["typo"] = 1
    with pytest.raises(ParameterError, match="typo"):
        setup(namespace, show=False)


def test_missing_dataset_folder_shows_the_expected_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEKIT_WORKDIR", str(tmp_path))
    namespace = {
        "In": ['profile = "paper"\nimagenet_val = ""\n'],
        "profile": "paper",
        "imagenet_val": str(tmp_path / "nope"),
    }
    chapter = setup(namespace, show=False)
    with pytest.raises(FileNotFoundError, match=r"n01440764/\*\.JPEG"):
        chapter.require_folder("imagenet_val")


def test_chapter_parameters_come_from_the_tagged_cell_and_values_take_their_type(tmp_path):
    source = tmp_path / "01_x.py"
    source.write_text(
        '# %%\nimport os\n\n# %% tags=["parameters"]\n' + PARAMETERS_CELL + "\n# %%\nx = 1\n"
    )
    assert list(chapter_parameters(source)) == [
        "profile",
        "lam",
        "layers",
        "epochs",
        "show_widgets",
    ]
    assert _coerce((str,), 5) == "5" and _coerce((str,), [0, 5]) == "[0, 5]"
    assert _coerce((float,), 3) == 3.0 and isinstance(_coerce((float,), 3), float)
    assert _coerce((int,), 4) == 4 and _coerce((bool,), False) is False
    # "None means the profile's default": an annotated optional keeps None and takes numbers
    assert _coerce((float, type(None)), None) is None
    assert _coerce((float, type(None)), 5) == 5.0
    assert _coerce((list, type(None)), [1, 2]) == [1, 2]


def test_book_kernels_silence_even_explicitly_enabled_progress_bars(tmp_path, monkeypatch):
    import tqdm
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)  # restored after the test
    monkeypatch.setattr(tqdm, "tqdm", tqdm.tqdm)
    monkeypatch.setenv("SAEKIT_WORKDIR", str(tmp_path))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    setup({"In": ['profile = "mini"\n'], "profile": "mini"}, show=False)
    assert not tqdm.auto.tqdm(range(3), disable=False).disable  # interactive: bars stay
    monkeypatch.setenv("TQDM_DISABLE", "1")
    setup({"In": ['profile = "mini"\n'], "profile": "mini"}, show=False)
    assert tqdm.auto.tqdm(range(3), disable=False).disable


OPTIONAL_CELL = (
    'profile = "mini"\nlam: float | None = None\nepochs: int | None = None\n'
    "archs: list[str] | None = None\nname: str | None = None\n"
)


def test_annotated_optional_parameters_check_the_annotation_not_the_none_default():
    from saekit.book_parameters import declared_types

    declared, types = _declared_parameters(OPTIONAL_CELL), declared_types(OPTIONAL_CELL)
    assert declared["lam"] is None and types["lam"] == (float, type(None))
    check_parameters(declared, {"lam": 5, "epochs": None, "archs": ["relu"]}, types)
    for name, value in [("lam", "five"), ("epochs", 2.5), ("epochs", True), ("archs", "relu")]:
        with pytest.raises(ParameterError, match=f"expected {name == 'lam' and 'float' or ''}"):
            check_parameters(declared, {name: value}, types)
    with pytest.raises(ParameterError) as err:
        check_parameters(declared, {"name": 3}, types)
    assert "name = None  (str | None)" in str(err.value)


def test_a_bool_is_never_an_int_or_a_float():
    from saekit.book_parameters import _type_ok

    assert not _type_ok((int,), True) and not _type_ok((float, type(None)), False)
    assert _type_ok((bool,), True) and not _type_ok((bool,), 1)


def test_a_chapter_loads_its_encoder_once_and_reopens_a_finished_store_without_it(
    tmp_path, monkeypatch
):
    import os

    import numpy as np

    import saekit.models

    monkeypatch.setenv("SAEKIT_WORKDIR", str(tmp_path))

    def chapter():
        return setup({"In": ['profile = "mini"\n'], "profile": "mini"}, show=False)

    loads = []
    real = saekit.models.load_encoder
    monkeypatch.setattr(
        saekit.models, "load_encoder", lambda *a, **k: loads.append(a[0]) or real(*a, **k)
    )
    first = chapter()
    cls = first.store("vit", "val", layers=[1], n_per_class=1)
    first.store("vit", "val", layers=[1], tokens="patch", n_per_class=1)
    assert len(loads) == 1  # one load serves both stores

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(saekit.models, "load_encoder", refuse)
    again = chapter().store("vit", "val", layers=[1], n_per_class=1)  # a rerun: no model needed
    assert again.root == cls.root and np.array_equal(
        np.asarray(again.cls(1)), np.asarray(cls.cls(1))
    )
    # other model files under the same name: back through extract, which checks the model
    weights = Path(first.encoder_id("vit")) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(stamp, stamp))
    with pytest.raises(AssertionError, match="the encoder was loaded"):
        chapter().store("vit", "val", layers=[1], n_per_class=1)
