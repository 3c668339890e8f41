"""The planted hierarchy: 5 WordNet groups -> 10 mid-level synsets -> 30 ImageNet-1k leaves.

Every leaf is a real ImageNet-1k class (its wnid is the ImageNet folder name) and every edge
below is a real WordNet 3.0 hypernym-closure relation (the mid synset is an ancestor of the
leaf, the group synset an ancestor of the mid). The tree was chosen once with NLTK's WordNet
and is written out here so the package needs no WordNet at run time;
``tests/test_toyworld.py`` re-checks every edge against WordNet when the corpus is present.

Each level owns one visual factor of the generator (see ``render.py``):

* group -> shape family (a dog, bird, fish, vehicle or instrument silhouette with its parts);
* mid   -> style: a palette plus a texture family. Styles are shared by two groups each
  (group ``g``'s mids use styles ``g`` and ``g + 1`` modulo 5), so colour alone never
  names the group: only the shape does;
* leaf  -> pattern frequency (coarse, medium or fine) of that texture.

Class indices follow sorted wnid order, as ImageNet's and an ImageNet-style folder's do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Synset:
    """A WordNet noun synset named the way ImageNet names it."""

    wnid: str
    """WordNet 3.0 offset id, ``n`` + 8 digits (the ImageNet folder name)."""
    name: str
    """Human-readable name (the first ImageNet lemma)."""


@dataclass(frozen=True)
class Leaf:
    """One class of the toy world with its place in the planted hierarchy."""

    synset: Synset
    """The ImageNet-1k class this leaf stands for."""
    group: int
    """Index into ``GROUPS``; selects the shape family."""
    mid: int
    """Index into ``MIDS`` (global over all groups)."""
    style: int
    """Palette + texture family, ``(group + mid-within-group) % N_STYLES``."""
    frequency: int
    """Pattern frequency level 0 (coarse) .. 2 (fine): the leaf's own factor."""

    @property
    def wnid(self) -> str:
        return self.synset.wnid

    @property
    def name(self) -> str:
        return self.synset.name


N_STYLES = 5
"""Number of palette + texture families (one per group, each shared by two groups' mids)."""

#: group synset -> ((mid synset, (leaf synsets, coarse to fine pattern)), ...)
TREE: tuple[tuple[Synset, tuple[tuple[Synset, tuple[Synset, ...]], ...]], ...] = (
    (
        Synset("n02084071", "dog"),
        (
            (
                Synset("n02087551", "hound"),
                (
                    Synset("n02088364", "beagle"),
                    Synset("n02088466", "bloodhound"),
                    Synset("n02088238", "basset"),
                ),
            ),
            (
                Synset("n02092468", "terrier"),
                (
                    Synset("n02094433", "Yorkshire terrier"),
                    Synset("n02093754", "Border terrier"),
                    Synset("n02093991", "Irish terrier"),
                ),
            ),
        ),
    ),
    (
        Synset("n01503061", "bird"),
        (
            (
                Synset("n01529672", "finch"),
                (
                    Synset("n01531178", "goldfinch"),
                    Synset("n01532829", "house finch"),
                    Synset("n01530575", "brambling"),
                ),
            ),
            (
                Synset("n01816887", "parrot"),
                (
                    Synset("n01818515", "macaw"),
                    Synset("n01817953", "African grey"),
                    Synset("n01820546", "lorikeet"),
                ),
            ),
        ),
    ),
    (
        Synset("n02512053", "fish"),
        (
            (
                Synset("n01482330", "shark"),
                (
                    Synset("n01484850", "great white shark"),
                    Synset("n01491361", "tiger shark"),
                    Synset("n01494475", "hammerhead"),
                ),
            ),
            (
                Synset("n02552171", "spiny-finned fish"),
                (
                    Synset("n02607072", "anemone fish"),
                    Synset("n02643566", "lionfish"),
                    Synset("n02655020", "puffer"),
                ),
            ),
        ),
    ),
    (
        Synset("n04524313", "vehicle"),
        (
            (
                Synset("n02958343", "car"),
                (
                    Synset("n04285008", "sports car"),
                    Synset("n03100240", "convertible"),
                    Synset("n02930766", "cab"),
                ),
            ),
            (
                Synset("n04490091", "truck"),
                (
                    Synset("n03345487", "fire engine"),
                    Synset("n03417042", "garbage truck"),
                    Synset("n04461696", "tow truck"),
                ),
            ),
        ),
    ),
    (
        Synset("n03800933", "musical instrument"),
        (
            (
                Synset("n02891788", "brass"),
                (
                    Synset("n03110669", "cornet"),
                    Synset("n03394916", "French horn"),
                    Synset("n04487394", "trombone"),
                ),
            ),
            (
                Synset("n04338517", "stringed instrument"),
                (
                    Synset("n02676566", "acoustic guitar"),
                    Synset("n02787622", "banjo"),
                    Synset("n04536866", "violin"),
                ),
            ),
        ),
    ),
)

GROUPS: tuple[Synset, ...] = tuple(group for group, _ in TREE)
"""The top level, in shape-family order (dog, bird, fish, vehicle, instrument)."""

MIDS: tuple[Synset, ...] = tuple(mid for _, mids in TREE for mid, _ in mids)
"""The middle level; ``MIDS[2 * g + j]`` is group ``g``'s ``j``-th mid."""


def _build_leaves() -> tuple[Leaf, ...]:
    leaves = []
    mid_index = 0
    for group_index, (_, mids) in enumerate(TREE):
        for j, (_, leaf_synsets) in enumerate(mids):
            for frequency, synset in enumerate(leaf_synsets):
                style = (group_index + j) % N_STYLES
                leaves.append(Leaf(synset, group_index, mid_index, style, frequency))
            mid_index += 1
    return tuple(sorted(leaves, key=lambda leaf: leaf.wnid))


LEAVES: tuple[Leaf, ...] = _build_leaves()
"""The classes, indexed by label (sorted by wnid, like ImageNet and ImageFolder)."""

N_CLASSES = len(LEAVES)
WNIDS: list[str] = [leaf.wnid for leaf in LEAVES]
CLASS_NAMES: list[str] = [leaf.name for leaf in LEAVES]
GROUP_OF_CLASS: list[int] = [leaf.group for leaf in LEAVES]
"""Label -> group index, e.g. to score a model at the coarse level."""
MID_OF_CLASS: list[int] = [leaf.mid for leaf in LEAVES]
"""Label -> mid index."""


def edges() -> list[tuple[Synset, Synset]]:
    """Every planted (ancestor, descendant) edge: group -> mid and mid -> leaf."""
    result = []
    for group, mids in TREE:
        for mid, leaf_synsets in mids:
            result.append((group, mid))
            result.extend((mid, leaf) for leaf in leaf_synsets)
    return result


def class_index(wnid: str) -> int:
    """Label of a leaf wnid; raises a KeyError that lists the valid wnids."""
    try:
        return WNIDS.index(wnid)
    except ValueError:
        raise KeyError(f"{wnid!r} is not a toy-world class; the classes are {WNIDS}") from None
