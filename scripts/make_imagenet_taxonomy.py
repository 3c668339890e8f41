"""Generate saekit/assets/imagenet1k_taxonomy.json from NLTK's WordNet 3.0.

The 1000 ImageNet-1k wnids (class-index order = sorted order) and the 200-class subsets of
ImageNet-A and ImageNet-R are not in NLTK; timm ships them. Fetch its wheel without installing
it and point this script at the wheel (or at a folder holding the three .txt files):

    d=$(mktemp -d) && pip download --no-deps -d $d timm==1.0.31
    NLTK_DATA=nltk_data python scripts/make_imagenet_taxonomy.py $d/timm-1.0.31-py3-none-any.whl

Names are WordNet's first lemma with underscores as spaces ('crane' and 'maillot' each name two
ImageNet classes; the wnid tells them apart), definitions are WordNet's glosses.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from saekit.taxonomy import IMAGENET1K_FILE, Taxonomy

LISTS = {
    "imagenet1k": "imagenet_synsets.txt",
    "imagenet_a": "imagenet_a_synsets.txt",
    "imagenet_r": "imagenet_r_synsets.txt",
}
TIMM_DIR = "timm/data/_info/"


def read_lists(source: Path) -> dict[str, list[str]]:
    """The three wnid lists from a timm wheel (a zip) or a folder of the .txt files."""
    if source.is_dir():
        texts = {k: (source / name).read_text() for k, name in LISTS.items()}
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            texts = {k: wheel.read(TIMM_DIR + name).decode() for k, name in LISTS.items()}
    else:
        raise SystemExit(
            f"{source}: expected timm's wheel (.whl) or a folder with {list(LISTS.values())}"
        )
    lists = {k: text.split() for k, text in texts.items()}
    classes = lists["imagenet1k"]
    if len(classes) != 1000 or classes != sorted(classes):
        raise SystemExit(f"{LISTS['imagenet1k']}: expected 1000 sorted wnids, got {len(classes)}")
    for name in ("imagenet_a", "imagenet_r"):
        if len(lists[name]) != 200 or not set(lists[name]) <= set(classes):
            raise SystemExit(f"{LISTS[name]}: expected 200 ImageNet-1k wnids")
        # Keep the subsets in ImageNet-1k class-index order, as the 200-way heads index them.
        lists[name] = sorted(lists[name], key=classes.index)
    return lists


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="timm wheel or folder with the wnid lists")
    parser.add_argument("--out", type=Path, default=IMAGENET1K_FILE, help="file to write")
    args = parser.parse_args(argv)
    lists = read_lists(args.source)
    subsets = {k: v for k, v in lists.items() if k != "imagenet1k"}
    taxonomy = Taxonomy.from_wordnet(lists["imagenet1k"], subsets=subsets)
    source = (
        "WordNet 3.0 (NLTK) hypernyms and instance hypernyms; names are first lemmas; "
        "class order and ImageNet-A/R subsets from timm 1.0.31 timm/data/_info/*_synsets.txt; "
        "written by scripts/make_imagenet_taxonomy.py"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    taxonomy.to_json(args.out, source=source)
    print(f"{args.out}: {len(taxonomy.leaves)} classes, {len(taxonomy.synsets)} synsets")


if __name__ == "__main__":
    main()
