"""Rehearse the paper profile offline on a CPU (``make rehearse``).

1. Write hub-shaped miniatures of every hub id the paper profile names into ``DIR/hf`` (used as
   ``HF_HOME``) and ImageNet-layout folders of the toy world into ``DIR/data``
   (`saekit.mini.hub`).
2. Run ``saekit book --profile paper`` against them with ``HF_HUB_OFFLINE=1``: pages into
   ``DIR/book``, their site into ``DIR/_build/html``, failed chapters into
   ``DIR/_build/failed``. Where the paper's defaults would take hours on a CPU (epochs, images,
   prompts, denoising steps) small ``-p`` overrides apply; the code path stays the paper one.
3. Print how long it took. The exit status is the book's: non-zero if any chapter failed.

What a rehearsal cannot show: the real weights' numbers and the GPU memory they need. On a GPU
machine with the real checkpoints, ``saekit book --plan --profile paper -p imagenet_train ...``
prints what a full run will need, and ``saekit book --profile paper --only CHAPTER ...`` runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Small values for the knobs that set a paper run's length (see the module docstring).
OVERRIDES: dict[str, object] = {
    "epochs": 1,
    "probe_epochs": 2,
    "probe_per_class": 2,
    # one point of chapter 02's 7 x 3 x 3 grid per architecture (Table 1's λ and expansion):
    # its probes on every SAE's codes for every set would take most of the rehearsal's time
    "lambdas": [0.5],
    "ks": [32],
    "expansions": [8],
    "cls_epochs": 1,
    "patch_epochs": 1,
    "sae_epochs": 1,
    "edit_images": 8,
    "head_epochs": 2,
    "n_images": 2,
    "n_features": 2,
    "n_show": 1,
    "n_sample_prompts": 2,
    "n_pairs": 4,
    "num_inference_steps": 2,
    "n_classes": 3,
    "images_per_class": 1,
    "sae_captions_per_class": 1,
    "max_new_tokens": 4,
    "n_permutations": 20,
}


def data_parameters(hf_home: Path, data: Path) -> dict[str, object]:
    """Write (or reuse) the miniatures and the data; the book parameters that point at them."""
    from saekit.mini.diffusion import mini_prompt_file
    from saekit.mini.hub import book_parameters, write_hub_cache, write_imagenet
    from saekit.mini.toyworld import PART_NAMES

    snapshots = write_hub_cache(hf_home)
    # Stores and SAEs are named by encoder and split, not by weights: miniatures rebuilt by a
    # newer builder (another revision) start a fresh work folder instead of being refused.
    runs, stamp = data.parent / "runs", {rid: path.name for rid, path in snapshots.items()}
    stamp_file = runs / "hub-revisions.json"
    if runs.exists() and (not stamp_file.exists() or json.loads(stamp_file.read_text()) != stamp):
        shutil.rmtree(runs)
    runs.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")
    params: dict[str, object] = dict(book_parameters(write_imagenet(data)))
    params["segmentation_classes"] = len(PART_NAMES)
    params["prompt_file"] = str(mini_prompt_file())  # stands in for Midjourney prompts
    return params


def declared(only: str | None) -> set[str]:
    """Every parameter the chapters to run declare (an override none takes is left out)."""
    from saekit.runner import chapter_parameters, chapters

    sources = [s for s in chapters() if not only or only in (s.stem, s.stem.split("_", 1)[1])]
    return {name for source in sources for name in chapter_parameters(source)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(ROOT / "build" / "rehearsal"), help="work folder")
    parser.add_argument("--only", help="rehearse just this chapter")
    parser.add_argument("--no-html", action="store_true", help="skip the site build")
    parser.add_argument("--plan", action="store_true", help="print the chapters' plans only")
    parser.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE")
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = Path(args.dir).resolve()
    hf_home = work / "hf"
    os.environ["HF_HOME"] = str(hf_home)  # before anything imports huggingface_hub
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # save_pretrained's bars, in this process only
    params = data_parameters(hf_home, work / "data") | OVERRIDES
    del os.environ["TQDM_DISABLE"]
    known = declared(args.only)
    if "describer" in known and importlib.util.find_spec("torchvision") is None:
        # transformers builds Qwen2.5-VL's processor with a video processor that needs
        # torchvision; without it the paper's describer cannot load (nor would it for a user)
        print(
            "[rehearse] torchvision is not installed, so chapter 06's paper describer "
            "(Qwen2.5-VL, whose processor needs it) cannot load: rehearsing describer='clip'",
            flush=True,
        )
        params["describer"] = "clip"
    unused = sorted(set(OVERRIDES) - known)
    if unused and not args.only:
        print(f"[rehearse] no chapter declares {unused}; not passed", flush=True)
    pairs = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in params.items()]
    pairs = [(k, v) for k, v in pairs if k in known] + [tuple(p) for p in args.param]
    print(
        f"[rehearse] data and miniatures ready in {time.perf_counter() - start:.0f} s", flush=True
    )
    command = [sys.executable, "-m", "saekit.cli", "book", "--profile", "paper"]
    command += ["--out", str(work / "book")]
    command += ["--only", args.only] if args.only else []
    command += ["--no-html"] if args.no_html else []
    command += ["--plan"] if args.plan else []
    for name, value in pairs:
        command += ["-p", name, value]
    env = {**os.environ, "SAEKIT_WORKDIR": str(work / "runs")}
    status = subprocess.run(command, env=env, cwd=ROOT).returncode
    minutes = (time.perf_counter() - start) / 60
    if args.plan:
        verdict = "plans printed" if status == 0 else "some chapters FAILED before their plan"
    else:
        verdict = "every chapter ran" if status == 0 else "some chapters FAILED (listed above)"
    print(f"[rehearse] paper profile rehearsed in {minutes:.1f} min: {verdict}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
