"""Benchmark: LCH height and coverage for every SAE feature of paper 003 Table 2.

40 layers x 12,288 features = 491,520 class sets over ImageNet-1k, scored by the vectorised
`Taxonomy.metrics` (target: under 60 s on 2 CPU cores) beside the naive per-feature reference
(`Taxonomy.lch` / `lch_height` / `coverage`) on a random sample, which must agree exactly;
the naive time is extrapolated to all features. Writes results.json and the paper 000 Fig. 2
style histogram of the synthetic features (layers 24, 28, 32, 36) to --out.

The class sets are synthetic with a size distribution like the papers' describe (paper 000
§4.1: most features fire on one class or on many dissimilar classes; later layers have more
features on coherent subtrees). Per feature, independently:
  10%  no class (excluded from the metrics, as in the study);
  15%  'wide': k log-uniform in [4, 1000] classes drawn at random;
  p_l  'subtree': the leaves of a random synset with 2..100 leaves, each kept with p = 0.9,
       p_l rising from 5% at layer 0 to 30% at the last layer;
  rest 'narrow': 1 to 3 random classes.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/ontology.py [--layers 40 --width 12288]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy import sparse

from saekit.analysis.ontology import feature_table, plot_height_vs_coverage
from saekit.taxonomy import Taxonomy


def synthetic_class_sets(
    taxonomy: Taxonomy, n_layers: int, width: int, seed: int = 0
) -> sparse.csr_array:
    """Boolean class_sets_FC, F = n_layers * width (layer-major), built sparse throughout."""
    rng = np.random.default_rng(seed)
    n_cls = len(taxonomy.leaves)
    n_feat = n_layers * width
    layer_F = np.repeat(np.arange(n_layers), width)
    p_subtree_F = 0.05 + 0.25 * layer_F / max(n_layers - 1, 1)
    u_F = rng.random(n_feat)
    empty_F = u_F < 0.10
    wide_F = (u_F >= 0.10) & (u_F < 0.25)
    subtree_F = (u_F >= 0.25) & (u_F < 0.25 + p_subtree_F)
    narrow_F = ~(empty_F | wide_F | subtree_F)

    rows, cols = [], []
    # wide and narrow: sizes k, classes drawn with replacement (duplicates merge below)
    for mask, k_F in (
        (wide_F, np.exp(rng.uniform(np.log(4), np.log(n_cls + 1), n_feat)).astype(np.int64)),
        (narrow_F, rng.integers(1, 4, n_feat)),
    ):
        feats = np.flatnonzero(mask)
        k = np.minimum(k_F[feats], n_cls)
        rows.append(np.repeat(feats, k))
        cols.append(rng.integers(0, n_cls, int(k.sum())))
    # subtree: L(h) for random mid-sized synsets, thinned
    mid_H = np.flatnonzero((taxonomy.n_leaves_H >= 2) & (taxonomy.n_leaves_H <= 100))
    feats = np.flatnonzero(subtree_F)
    leaves = sparse.csr_array(taxonomy.leaves_HC)[rng.choice(mid_H, feats.size)]
    keep = rng.random(leaves.nnz) < 0.9
    rows.append(feats[np.repeat(np.arange(feats.size), np.diff(leaves.indptr))][keep])
    cols.append(leaves.indices[keep])

    rows, cols = np.concatenate(rows), np.concatenate(cols)
    X = sparse.csr_array((np.ones(rows.size, bool), (rows, cols)), shape=(n_feat, n_cls))
    X.sum_duplicates()
    return X


def run(
    n_layers: int = 40,
    width: int = 12288,
    sample: int = 1000,
    seed: int = 0,
    out: Path | None = None,
) -> dict:
    """Time vectorised vs naive, check they agree, write results.json and figure.png."""
    taxonomy = Taxonomy.imagenet1k()
    t0 = time.perf_counter()
    X = synthetic_class_sets(taxonomy, n_layers, width, seed)
    t_make = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics = taxonomy.metrics(X, progress=False)
    t_vec = time.perf_counter() - t0

    # The whole per-feature output (metrics again, names, labels) for every layer.
    t0 = time.perf_counter()
    per_layer = {layer: X[layer * width : (layer + 1) * width] for layer in range(n_layers)}
    table = feature_table(per_layer, taxonomy, progress=False)
    t_table = time.perf_counter() - t0

    # Work of the sparse product: Σ_k Σ_{ω∈C_k} |ancestors(ω)| multiply-adds, and its output
    # size Σ_k |∪_{ω∈C_k} ancestors(ω)| (one candidate synset per stored entry).
    ancestors_C = taxonomy.leaves_HC.sum(axis=0)
    mult_adds = int((X.astype(np.int64) @ ancestors_C).sum())

    nonempty = np.flatnonzero(metrics.n_classes_F > 0)
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(nonempty, size=min(sample, nonempty.size), replace=False)
    t0 = time.perf_counter()
    naive = []
    for f in picked:
        wnids = [taxonomy.leaves[c] for c in X.indices[X.indptr[f] : X.indptr[f + 1]]]
        naive.append(
            (
                taxonomy.synset_index[taxonomy.lch(wnids)],
                taxonomy.lch_height(wnids),
                taxonomy.coverage(wnids),
            )
        )
    t_naive = time.perf_counter() - t0
    naive = np.array(naive, dtype=np.float64).reshape(-1, 3)
    agree = bool(
        np.array_equal(naive[:, 0], metrics.lch_F[picked])
        and np.allclose(naive[:, 1], metrics.height_F[picked])
        and np.allclose(naive[:, 2], metrics.coverage_F[picked])
    )

    sizes = metrics.n_classes_F[nonempty]
    results = {
        "features": int(X.shape[0]),
        "features_with_classes": int(nonempty.size),
        "class_set_size": {
            "mean": float(sizes.mean()),
            "median": float(np.median(sizes)),
            "share_single": float(np.mean(sizes == 1)),
            "max": int(sizes.max()),
        },
        "class_set_entries": int(X.nnz),
        "sparse_product_mult_adds": mult_adds,
        "make_sets_s": round(t_make, 3),
        "vectorised_s": round(t_vec, 3),
        "feature_table_s": round(t_table, 3),
        "feature_table_rows": len(table),
        "naive_sample": int(picked.size),
        "naive_sample_s": round(t_naive, 3),
        "naive_extrapolated_s": round(t_naive / max(picked.size, 1) * nonempty.size, 1),
        "agree_on_sample": agree,
        "coverage_gt_0.99_multi_class": int(
            np.sum((sizes >= 2) & (metrics.coverage_F[nonempty] > 0.99))
        ),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        shown = [layer for layer in (24, 28, 32, 36) if layer < n_layers] or [n_layers - 1]
        panels = {layer: X[layer * width : (layer + 1) * width] for layer in shown}
        fig = plot_height_vs_coverage(feature_table(panels, taxonomy, progress=False))
        fig.suptitle("synthetic class sets: LCH height vs ontological coverage")
        fig.savefig(out / "figure.png", dpi=100)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict) -> None:
    """The timings beside the naive per-feature reference, and the 60 s target."""
    n = results["features"]
    rows = [
        ("vectorised Taxonomy.metrics", results["vectorised_s"]),
        ("vectorised + per-feature table", results["vectorised_s"] + results["feature_table_s"]),
        (
            f"naive reference (extrapolated from {results['naive_sample']})",
            results["naive_extrapolated_s"],
        ),
    ]
    print(f"\nLCH height + coverage for {n:,} features ({results['cpu']})")
    print(f"{'method':<48}{'seconds':>10}")
    for name, seconds in rows:
        print(f"{name:<48}{seconds:>10.1f}")
    speedup = results["naive_extrapolated_s"] / max(results["vectorised_s"], 1e-9)
    print(
        f"ratio (naive / vectorised): {speedup:.0f}x; target < 60 s for 491,520 features; "
        f"agree with naive on sample: {results['agree_on_sample']}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=40, help="layers (paper 003: 40)")
    parser.add_argument("--width", type=int, default=12288, help="SAE features per layer")
    parser.add_argument("--sample", type=int, default=1000, help="features for the naive reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic class sets")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/benchmarks/ontology"), help="output folder"
    )
    parser.add_argument("--quick", action="store_true", help="4 layers x 2048 (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.sample = 4, 2048, 200
    results = run(args.layers, args.width, args.sample, args.seed, args.out)
    print_table(results)
    if not results["agree_on_sample"]:
        raise SystemExit("vectorised metrics disagree with the naive reference")
    return results


if __name__ == "__main__":
    main()
