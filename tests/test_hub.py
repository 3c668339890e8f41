"""Hub-shaped miniatures: the paper's hub ids load offline from a written HF cache, every hub id
the package names has a miniature, and the rehearsal's ImageNet folders have ImageNet's shape."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from saekit.mini.hub import (
    HUB_MINIATURES,
    REHEARSAL_SPLITS,
    book_parameters,
    repo_folder,
    revision,
    write_imagenet,
    write_miniature,
)

PACKAGE = Path(__file__).resolve().parents[1] / "saekit"
HUB_ID = re.compile(r"[A-Za-z0-9][\w-]*/[\w.-]*[A-Za-z][\w.-]*")


def hub_ids_named_by_the_package() -> set[str]:
    """Every string constant outside ``saekit/mini`` shaped like ``org/name``."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if "mini" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if HUB_ID.fullmatch(node.value):
                    found.add(node.value)
    return found


def test_every_hub_id_the_package_names_has_a_miniature():
    named = hub_ids_named_by_the_package()
    # the ids the chapters' paper defaults use must be among them (guards the scan itself)
    assert {"facebook/dinov2-giant", "CompVis/stable-diffusion-v1-4"} <= named
    assert named <= set(HUB_MINIATURES), sorted(named - set(HUB_MINIATURES))


LOAD_SCRIPT = """
import json, transformers
from saekit.book import model_fingerprint
from saekit.models import load_encoder
out = {}
for rid in ("facebook/dinov2-giant", "microsoft/resnet-50"):
    enc = load_encoder(rid)
    cls = enc([__import__("PIL.Image").Image.new("RGB", (40, 30))]).cls
    out[rid] = {
        "class": type(enc.model).__name__,
        "layers": enc.n_layers,
        "grid": list(enc.grid),
        "widths": enc.widths,
        "cls_shape": list(cls[enc.n_layers - 1].shape),
        "checkpoint": transformers.AutoConfig.from_pretrained(rid).architectures[0],
        "fingerprint": model_fingerprint(rid),
    }
print(json.dumps(out))
"""


def test_paper_hub_ids_load_offline_from_the_written_cache(tmp_path):
    hf_home = tmp_path / "hf"
    for rid in ("facebook/dinov2-giant", "microsoft/resnet-50"):
        write_miniature(hf_home, rid)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    dinov2 = loaded["facebook/dinov2-giant"]
    # ViT-g/14's depth and patching at the processor's 224-pixel crop; a tiny width
    assert dinov2["class"] == "Dinov2Model" and dinov2["layers"] == 40
    assert dinov2["grid"] == [16, 16] and dinov2["cls_shape"] == [1, 32]
    assert dinov2["fingerprint"] == "revision:" + revision("facebook/dinov2-giant")
    resnet = loaded["microsoft/resnet-50"]
    # the hub checkpoint is the ImageNet classifier; saekit reads its four-stage backbone
    assert resnet["checkpoint"] == "ResNetForImageClassification"
    assert resnet["layers"] == 4 and resnet["grid"] == [7, 7]


def test_a_written_miniature_is_reused_and_an_interrupted_one_rebuilt(tmp_path):
    rid = "microsoft/resnet-50"
    snapshot = write_miniature(tmp_path, rid)
    repo = repo_folder(tmp_path, rid)
    assert snapshot == repo / "snapshots" / revision(rid)
    assert (repo / "refs" / "main").read_text() == snapshot.name
    weights = snapshot / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert write_miniature(tmp_path, rid) == snapshot and weights.stat().st_mtime_ns == stamp
    # a build that died before its completion mark is redone, not trusted
    (snapshot / ".complete").unlink()
    weights.write_bytes(b"truncated")
    write_miniature(tmp_path, rid)
    assert weights.stat().st_size > 1000 and revision(rid, seed=1) != revision(rid)


def test_rehearsal_folders_have_imagenet_wnids_and_the_shifted_sets_their_subsets(tmp_path):
    from saekit.mini.toyworld import WNIDS
    from saekit.taxonomy import imagenet_subset

    folders = write_imagenet(tmp_path, train_per_class=1, per_class=1)
    assert set(folders) == set(REHEARSAL_SPLITS)

    def classes(split: str) -> set[str]:
        return {p.name for p in folders[split].iterdir() if p.is_dir()}

    assert classes("train") == classes("val") == classes("sketch") == set(WNIDS)
    hard, rendition = classes("hard"), classes("rendition")
    # only the toy classes that ImageNet-A / -R cover, as the real sets hold
    assert hard == set(WNIDS) & set(imagenet_subset("imagenet_a")) and 0 < len(hard) < 30
    assert rendition == set(WNIDS) & set(imagenet_subset("imagenet_r"))
    assert {p.name for p in (tmp_path / "hard_masks").iterdir()} == hard
    params = book_parameters(folders)
    assert params["imagenet_hard"] == str(folders["hard"])
    assert params["segmentation_val"] == str(folders["val"])
