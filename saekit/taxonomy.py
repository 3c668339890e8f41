"""The WordNet hierarchy above a set of classes: LCH, LCH height and ontological coverage.

Classes are WordNet 3.0 noun synsets named by wnid ("n01440764" = noun offset 01440764). Given
the leaf classes Ω, S is every synset that is an ancestor-or-self of a leaf along any hypernym
path (WordNet is a DAG; every parent is followed) and L(h) is the set of leaves below h. For the
set C of classes a feature fires on:

- LCH(C): the h in S with C ⊆ L(h) and the smallest |L(h)|. Ties (chains of synsets with the
  same leaves) go to the lowest one, i.e. the smallest LCH height, and then to the smallest wnid.
- LCH height(C) = (1/|C|) Σ_{ω∈C} dist(ω, LCH(C)), dist = shortest hypernym path from ω up.
- coverage(C) = |C| / |L(LCH(C))|.

`Taxonomy` comes from the shipped ImageNet-1k file or from NLTK's WordNet (`wordnet()`, the one
WordNet loader of the package) for any other classes. It is core: datasets use it to name
classes, and the ontology analyses (`saekit.analysis.ontology`) build on its metrics.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

IMAGENET1K_FILE = Path(__file__).resolve().parent / "assets" / "imagenet1k_taxonomy.json"
FILE_FORMAT = "saekit.ontology.Taxonomy/1"
_WNID = re.compile(r"^n\d{8}$")
_NO_WNIDS = (
    "ontology needs WordNet ids for the store's classes, but its manifest has no 'wnids'. "
    "Re-extract with wnids (ImageNet folders are named by wnid), or map each class name to "
    "its WordNet 3.0 noun, e.g. `s = nltk.corpus.wordnet.synsets(name.replace(' ', '_'), 'n')[0]; "
    "wnid = f'n{s.offset():08d}'` (check ambiguous names such as 'crane' by hand), and pass "
    "the list to Taxonomy.from_wnids(wnids) in class-index order."
)


def _check_wnid(wnid: Any) -> str:
    if not isinstance(wnid, str) or not _WNID.match(wnid):
        raise ValueError(
            f"{wnid!r} is not a WordNet noun id: expected 'n' and an 8-digit offset, "
            "e.g. 'n01440764' (tench)"
        )
    return wnid


def _as_float_tensor(acts: Any) -> torch.Tensor:
    if torch.is_tensor(acts):
        return acts.detach().float()
    return torch.from_numpy(np.asarray(acts, dtype=np.float32))


def wordnet():
    """NLTK's WordNet 3.0 reader, with the repo's offline ./nltk_data on the search path."""
    try:
        import nltk
        from nltk.corpus import wordnet as wn
    except ImportError as err:
        raise ImportError(
            "building a taxonomy outside ImageNet-1k needs NLTK and its WordNet 3.0 corpus "
            "(pip install nltk; then scripts/setup_wordnet.sh or nltk.download('wordnet'))"
        ) from err
    repo_data = Path(__file__).resolve().parents[1] / "nltk_data"
    if repo_data.is_dir() and str(repo_data) not in nltk.data.path:
        nltk.data.path.append(str(repo_data))
    try:
        wn.ensure_loaded()
    except LookupError as err:
        raise LookupError(
            "NLTK cannot find the WordNet corpus: run scripts/setup_wordnet.sh (offline, "
            "Debian's WordNet 3.0), or nltk.download('wordnet'), or set NLTK_DATA"
        ) from err
    if wn.get_version() != "3.0":
        raise ValueError(
            f"NLTK's WordNet is version {wn.get_version()}, but wnids are WordNet 3.0 "
            "offsets; install the 3.0 corpus ('wordnet', not 'wordnet31')"
        )
    return wn


# --------------------------------------------------------------------------- taxonomy


class Taxonomy:
    """Leaf classes Ω (in class-index order) and every synset above them, S, with the hypernym
    edges among them; answers LCH, LCH height and coverage for class sets.

    Arrays (H = |S|, synsets sorted by wnid; C = |Ω|): ``leaves_HC[h, c]`` is True when leaf c is
    below-or-equal to synset h; ``n_leaves_H`` = |L(h)|; ``dist_CH[c, h]`` is the shortest
    hypernym path from leaf c up to h (inf when h is not above c).
    """

    def __init__(
        self,
        leaves: Sequence[str],
        hypernyms: Mapping[str, Sequence[str]],
        names: Mapping[str, str] | None = None,
        definitions: Mapping[str, str] | None = None,
        subsets: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Build from parent edges. Synsets missing from ``hypernyms`` are roots; edges of
        synsets that are above no leaf are ignored, so a big edge list serves any subset."""
        self.leaves: list[str] = list(leaves)
        if not self.leaves:
            raise ValueError("a taxonomy needs at least one leaf class")
        repeated = sorted({w for w in self.leaves if self.leaves.count(w) > 1})
        if repeated:
            raise ValueError(f"leaf classes must be distinct; repeated: {repeated[:5]}")

        above: set[str] = set()
        stack = list(self.leaves)
        while stack:
            node = stack.pop()
            if node not in above:
                above.add(node)
                stack.extend(hypernyms.get(node, ()))
        self.synsets: list[str] = sorted(above)
        self.hypernyms: dict[str, tuple[str, ...]] = {
            h: tuple(sorted(set(hypernyms.get(h, ())))) for h in self.synsets
        }
        names = names or {}
        definitions = definitions or {}
        self.names: dict[str, str] = {h: names.get(h, h) for h in self.synsets}
        self.definitions: dict[str, str] = {h: definitions.get(h, "") for h in self.synsets}
        self.subsets: dict[str, list[str]] = {k: list(v) for k, v in (subsets or {}).items()}
        self.leaf_index: dict[str, int] = {w: c for c, w in enumerate(self.leaves)}
        self.synset_index: dict[str, int] = {h: i for i, h in enumerate(self.synsets)}

        # Breadth-first search up from each leaf gives the shortest hypernym path to every
        # ancestor even where the DAG offers several (a node with two parents).
        self._up: list[dict[int, int]] = []
        for leaf in self.leaves:
            dist = {leaf: 0}
            queue = deque([leaf])
            while queue:
                node = queue.popleft()
                for parent in self.hypernyms[node]:
                    if parent not in dist:
                        dist[parent] = dist[node] + 1
                        queue.append(parent)
            self._up.append({self.synset_index[h]: d for h, d in dist.items()})

        n_syn, n_cls = len(self.synsets), len(self.leaves)
        self.leaves_HC = np.zeros((n_syn, n_cls), dtype=bool)
        self.dist_CH = np.full((n_cls, n_syn), np.inf)
        for c, up in enumerate(self._up):
            idx = np.fromiter(up.keys(), dtype=np.int64)
            self.leaves_HC[idx, c] = True
            self.dist_CH[c, idx] = np.fromiter(up.values(), dtype=np.float64)
        self.n_leaves_H = self.leaves_HC.sum(axis=1)
        self._leaf_sets: list[frozenset[int]] | None = None
        self._packed: tuple[sparse.csr_array, int] | None = None

    def __repr__(self) -> str:
        return f"Taxonomy({len(self.leaves)} leaves, {len(self.synsets)} synsets)"

    def __contains__(self, wnid: object) -> bool:
        """Whether ``wnid`` is a synset of S (a leaf or one of its ancestors)."""
        return wnid in self.synset_index

    # ---- constructors

    @classmethod
    def imagenet1k(cls) -> Taxonomy:
        """The shipped ImageNet-1k taxonomy (1000 classes in class-index order, |S| = 1860);
        needs no WordNet install. ``.subsets`` holds the ImageNet-A and -R 200-class lists."""
        return _imagenet1k()

    @classmethod
    def from_wnids(cls, wnids: Sequence[str]) -> Taxonomy:
        """A taxonomy whose leaves are ``wnids`` (in this order, = class index). Uses the shipped
        ImageNet-1k edges when every wnid is one of its 1860 synsets, else NLTK's WordNet."""
        wnids = [_check_wnid(w) for w in wnids]
        imagenet = _imagenet1k()
        if all(w in imagenet.synset_index for w in wnids):
            return cls(wnids, imagenet.hypernyms, imagenet.names, imagenet.definitions)
        return cls.from_wordnet(wnids)

    @classmethod
    def from_wordnet(
        cls, wnids: Sequence[str], subsets: Mapping[str, Sequence[str]] | None = None
    ) -> Taxonomy:
        """Build from NLTK's WordNet 3.0, following hypernyms and instance hypernyms (so that
        named instances reach the hierarchy too; ImageNet-1k has none)."""
        wn = wordnet()

        def wnid_of(synset) -> str:
            return f"n{synset.offset():08d}"

        start = []
        for wnid in wnids:
            _check_wnid(wnid)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NLTK warns and returns None; we raise instead
                synset = wn.synset_from_pos_and_offset("n", int(wnid[1:]))
            if synset is None or wnid_of(synset) != wnid:
                raise ValueError(f"{wnid!r} is not a WordNet 3.0 noun synset (no such offset)")
            start.append(synset)

        hypernyms, names, definitions = {}, {}, {}
        stack, seen = list(start), set()
        while stack:
            synset = stack.pop()
            if synset in seen:
                continue
            seen.add(synset)
            parents = synset.hypernyms() + synset.instance_hypernyms()
            hypernyms[wnid_of(synset)] = [wnid_of(p) for p in parents]
            names[wnid_of(synset)] = synset.lemmas()[0].name().replace("_", " ")
            definitions[wnid_of(synset)] = synset.definition()
            stack.extend(parents)
        return cls(wnids, hypernyms, names, definitions, subsets)

    @classmethod
    def from_store(cls, store: Any) -> Taxonomy:
        """The taxonomy of a labelled activation store's classes (needs ``store.wnids``)."""
        wnids = getattr(store, "wnids", None)
        if not wnids:
            raise ValueError(_NO_WNIDS)
        return cls.from_wnids(wnids)

    # ---- file format

    @classmethod
    def from_json(cls, path: str | Path) -> Taxonomy:
        """Read a file written by `to_json`."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a {FILE_FORMAT} file")
        synsets = data["synsets"]
        return cls(
            data["leaves"],
            {h: s["hypernyms"] for h, s in synsets.items()},
            {h: s["name"] for h, s in synsets.items()},
            {h: s["definition"] for h, s in synsets.items()},
            data.get("subsets"),
        )

    def to_json(self, path: str | Path, source: str = "") -> None:
        """Write leaves, subsets and every synset's name, definition and hypernyms, one synset
        per line so that diffs stay readable."""
        lines = [
            "{",
            f'"format": {json.dumps(FILE_FORMAT)},',
            f'"source": {json.dumps(source)},',
            f'"leaves": {json.dumps(self.leaves)},',
            f'"subsets": {json.dumps(self.subsets)},',
            '"synsets": {',
        ]
        for i, h in enumerate(self.synsets):
            entry = {
                "name": self.names[h],
                "hypernyms": list(self.hypernyms[h]),
                "definition": self.definitions[h],
            }
            comma = "," if i < len(self.synsets) - 1 else ""
            lines.append(f"{json.dumps(h)}: {json.dumps(entry)}{comma}")
        lines += ["}", "}"]
        Path(path).write_text("\n".join(lines) + "\n")

    # ---- the metrics, one class set at a time (the readable reference)

    def name(self, wnid: str) -> str:
        """WordNet's first lemma of a synset in S, underscores as spaces (e.g. 'elasmobranch')."""
        try:
            return self.names[wnid]
        except KeyError:
            raise KeyError(f"{wnid!r} is not a synset of this taxonomy ({self!r})") from None

    def leaf_set(self, wnid: str) -> list[str]:
        """L(h): the leaf classes below-or-equal to synset ``wnid``, in class-index order."""
        self.name(wnid)  # a clear KeyError for a synset outside S
        row = self.leaves_HC[self.synset_index[wnid]]
        return [self.leaves[c] for c in np.flatnonzero(row)]

    def _class_indices(self, wnids: Iterable[str] | str) -> list[int]:
        if isinstance(wnids, str):
            wnids = [wnids]
        out = set()
        for w in wnids:
            if w not in self.leaf_index:
                raise ValueError(
                    f"{w!r} is not a leaf class of this taxonomy ({self!r}, e.g. "
                    f"{self.leaves[0]!r}); LCH is defined for sets of leaf classes"
                )
            out.add(self.leaf_index[w])
        if not out:
            raise ValueError("the class set is empty: LCH needs at least one class")
        return sorted(out)

    def _lch_index(self, classes: list[int]) -> int:
        """The reference search: every synset, compared by (|L(h)|, Σ dist, wnid)."""
        if self._leaf_sets is None:
            self._leaf_sets = [frozenset(np.flatnonzero(row).tolist()) for row in self.leaves_HC]
        wanted = set(classes)
        best, best_key = -1, None
        for h, leaf_set in enumerate(self._leaf_sets):
            if wanted <= leaf_set:
                key = (len(leaf_set), sum(self._up[c][h] for c in classes), self.synsets[h])
                if best_key is None or key < best_key:
                    best, best_key = h, key
        if best < 0:
            raise ValueError("these classes share no hypernym: the taxonomy has several roots")
        return best

    def lch(self, wnids: Iterable[str]) -> str:
        """Lowest common hypernym: the synset with the fewest leaves that holds every class."""
        return self.synsets[self._lch_index(self._class_indices(wnids))]

    def lch_height(self, wnids: Iterable[str]) -> float:
        """Mean shortest-hypernym-path length from each class up to the LCH."""
        classes = self._class_indices(wnids)
        h = self._lch_index(classes)
        return sum(self._up[c][h] for c in classes) / len(classes)

    def coverage(self, wnids: Iterable[str]) -> float:
        """Ontological coverage |C| / |L(LCH(C))|."""
        classes = self._class_indices(wnids)
        return len(classes) / int(self.n_leaves_H[self._lch_index(classes)])

    # ---- the metrics for every feature at once

    def metrics(
        self,
        class_sets_FC: np.ndarray | sparse.sparray,
        chunk_size: int = 16384,
        progress: bool = True,
    ) -> FeatureMetrics:
        """LCH, height and coverage of every row of a boolean class-set matrix (features of
        all layers stacked), equal to `lch`/`lch_height`/`coverage` row by row.

        A dense leaf-membership matmul would cost F·C·H multiply-adds (9e11 for 491,520
        features); instead each class set is a sparse row and one sparse product with a packed
        leaf→ancestor matrix W_CH gives, per feature and candidate synset h, both
        |C ∩ L(h)| (high bits) and Σ_{ω∈C∩L(h)} (dist(ω, h) + 1) (low bits). Candidates with
        |C ∩ L(h)| = |C| contain C; the smallest (|L(h)|, Σ dist, h) wins, found with one
        integer key and `np.minimum.reduceat` per row. Work ~ Σ_k Σ_{ω∈C_k} |ancestors(ω)|.
        """
        X = sparse.csr_array(class_sets_FC, dtype=np.int64)
        if X.ndim != 2 or X.shape[1] != len(self.leaves):
            raise ValueError(
                f"class sets must be [features, {len(self.leaves)} classes] in this taxonomy's "
                f"class order, got shape {X.shape}"
            )
        X.sum_duplicates()
        X.eliminate_zeros()
        X.data[:] = 1
        W, dist_bits = self._packed_ancestors()
        n_cls, n_syn = len(self.leaves), len(self.synsets)
        syn_bits = max(n_syn - 1, 1).bit_length()
        if n_cls.bit_length() + dist_bits + syn_bits > 63:
            raise ValueError(f"{self!r} is too large for the packed int64 key")
        dist_mask = (1 << dist_bits) - 1
        syn_mask = (1 << syn_bits) - 1
        n_leaves = self.n_leaves_H.astype(np.int64)

        n_feat = X.shape[0]
        size_F = np.diff(X.indptr).astype(np.int64)
        lch_F = np.full(n_feat, -1, dtype=np.int64)
        sum_dist_F = np.zeros(n_feat, dtype=np.int64)
        starts = range(0, n_feat, chunk_size)
        for start in tqdm(starts, desc="LCH", unit="chunk", disable=not progress):
            Y = (X[start : start + chunk_size] @ W).tocsr()
            rows = np.repeat(np.arange(Y.shape[0]), np.diff(Y.indptr))
            count = Y.data >> dist_bits
            holds = count == size_F[start + rows]
            rows, syn, packed = rows[holds], Y.indices[holds].astype(np.int64), Y.data[holds]
            if rows.size == 0:
                continue
            sum_dist = (packed & dist_mask) - count[holds]
            key = (n_leaves[syn] << (dist_bits + syn_bits)) | (sum_dist << syn_bits) | syn
            first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            best = np.minimum.reduceat(key, first)
            lch_F[start + rows[first]] = best & syn_mask
            sum_dist_F[start + rows[first]] = (best >> syn_bits) & dist_mask

        found = lch_F >= 0
        height_F = np.full(n_feat, np.nan)
        coverage_F = np.full(n_feat, np.nan)
        height_F[found] = sum_dist_F[found] / size_F[found]
        coverage_F[found] = size_F[found] / n_leaves[lch_F[found]]
        return FeatureMetrics(size_F, lch_F, height_F, coverage_F)

    def _packed_ancestors(self) -> tuple[sparse.csr_array, int]:
        """W_CH = 2^dist_bits + dist(c, h) + 1 where h is above-or-equal to c (else 0). The +1
        keeps dist 0 (a leaf and itself) a stored, countable entry."""
        if self._packed is None:
            finite = np.isfinite(self.dist_CH)
            max_dist = int(self.dist_CH[finite].max())
            dist_bits = (len(self.leaves) * (max_dist + 1)).bit_length()
            c, h = np.nonzero(finite)
            values = (1 << dist_bits) + self.dist_CH[c, h].astype(np.int64) + 1
            W = sparse.csr_array((values, (c, h)), shape=self.dist_CH.shape, dtype=np.int64)
            self._packed = (W, dist_bits)
        return self._packed


@functools.lru_cache(maxsize=1)
def _imagenet1k() -> Taxonomy:
    if not IMAGENET1K_FILE.is_file():
        raise FileNotFoundError(
            f"{IMAGENET1K_FILE} is missing; regenerate it with scripts/make_imagenet_taxonomy.py"
        )
    return Taxonomy.from_json(IMAGENET1K_FILE)


def imagenet_subset(name: str) -> list[str]:
    """The wnids of a shipped ImageNet-1k subset, in class-index order: 'imagenet_a' or
    'imagenet_r' (the 200 classes of ImageNet-A / ImageNet-R)."""
    subsets = _imagenet1k().subsets
    if name not in subsets:
        raise KeyError(f"unknown subset {name!r}; shipped: {sorted(subsets)}")
    return list(subsets[name])


@dataclass
class FeatureMetrics:
    """Per-feature results of `Taxonomy.metrics`, aligned with the rows of the class sets."""

    #: |C_k|, the number of classes the feature fires on (0: none, metrics are NaN)
    n_classes_F: np.ndarray
    #: index into ``taxonomy.synsets`` of LCH(C_k); -1 when C_k is empty or has no common root
    lch_F: np.ndarray
    #: LCH height, the mean hypernym distance from the classes up to the LCH
    height_F: np.ndarray
    #: ontological coverage |C_k| / |L(LCH)|
    coverage_F: np.ndarray


