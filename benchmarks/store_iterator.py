"""Peak memory of the training iterator, `ActivationStore.batches`, against the store's size.

Writes float16 stores of ``--rows`` rows x 768 (the ViT-B width) for 1, 4 and 12 layers, and
one 4x larger, then iterates one shuffled epoch of each (batch 4096, the default byte budget)
in a fresh subprocess and records the peak resident memory it added over the process after
opening the store (``ru_maxrss`` minus the RSS before the first batch). The configurations are
interleaved over ``--rounds`` rounds; the table gives the median and the spread (min-max).
Target: flat, within the budget, whatever the store's size.

    python benchmarks/store_iterator.py [--quick] [--rows N] [--rounds R] [--budget-mib M]

Results of one run (2026-12-02; 2-core VM shared with other jobs; median of 2 rounds)::

    ActivationStore.batches, float16 x 768, batch 4096, budget 512 MiB, 2 round(s)
    layers      rows  store MiB         added peak RSS MiB     rows/s
         1    50,000         73            107 (  106-108)    162,728
         4    50,000        293            408 (  408-408)     22,876
        12    50,000        879            619 (  618-621)      8,055
         1   200,000        293            326 (  326-326)    129,082
         4   200,000      1,172            551 (  551-551)     36,929

A store smaller than the budget is held whole (1 layer, 4 layers at 50k rows); past it the
peak stays at the budget plus the float32 batch the caller still holds while the next is built
(4 layers x 4096 x 768 x 4 B = 48 MiB; 151 MiB for 12 layers). The previous iterator added
104/396/1,174 MiB for 1/4/12 layers of a 50k-row store and grew with the store.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

WIDTH = 768
SHARD_ROWS = 8192


def write_store(root: Path, layers: int, rows: int) -> Path:
    """A store folder `ActivationStore.open` accepts: float16 CLS rows, shards of 8,192."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for index, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        folder = root / f"shard_{index:05d}"
        folder.mkdir()
        np.save(folder / "rows.npy", np.arange(start, start + n))
        np.save(folder / "labels.npy", np.zeros(n, np.int64))
        block = rng.standard_normal((n, WIDTH), dtype=np.float32).astype(np.float16)
        for layer in range(layers):
            np.save(folder / f"L{layer}_cls.npy", block)
        shards.append({"index": index, "rows": n, "grids": {}})
    manifest = {
        "identity": {}, "model": "benchmark", "layers": list(range(layers)), "tokens": ["cls"],
        "dtype": "float16", "widths": {str(ly): WIDTH for ly in range(layers)},
        "d_model": WIDTH, "class_names": ["x"], "wnids": None, "n_images": rows,
        "n_rows": rows, "shards": shards, "skipped": [], "grids": {}, "complete": True,
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(store_dir: str, layers: int, budget: int) -> None:
    """Child: one epoch; prints the added peak RSS (MiB), rows and seconds as JSON."""
    from saekit.activation_store import ActivationStore

    store = ActivationStore.open(store_dir)
    batches = store.batches(list(range(layers)), 4096, seed=0, budget=budget)
    base = rss_mib()
    start = time.perf_counter()
    rows = sum(len(batch[0]) for batch in batches)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"added": peak - base, "rows": rows, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stores, 1 round (smoke)")
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the base store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-mib", type=int, default=None, help="default: the iterator's")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from saekit.store_iterator import DEFAULT_BUDGET

    budget = DEFAULT_BUDGET if args.budget_mib is None else args.budget_mib << 20
    if args.child:
        measure(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    rows, rounds = (8_000, 1) if args.quick else (args.rows, args.rounds)
    configs = [(1, rows), (4, rows), (12, rows), (1, 4 * rows), (4, 4 * rows)]
    results: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {c: write_store(Path(tmp) / f"L{c[0]}_N{c[1]}", *c) for c in configs}
        for _ in range(rounds):
            for config in configs:  # interleaved: every round visits every configuration
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(stores[config]), str(config[0]),
                     str(budget)],
                    capture_output=True, text=True,
                )  # fmt: skip
                if out.returncode:
                    raise RuntimeError(f"{config} failed:\n{out.stderr}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                if result["rows"] != config[1]:
                    raise AssertionError(f"{config}: {result['rows']} rows, not {config[1]}")
                results[config].append(result)
    print(
        f"ActivationStore.batches, float16 x {WIDTH}, batch 4096, budget "
        f"{budget / 2**20:.0f} MiB, {rounds} round(s)"
    )
    print(f"{'layers':>6} {'rows':>9} {'store MiB':>10} {'added peak RSS MiB':>26} {'rows/s':>10}")
    for (layers, n), runs in results.items():
        added = [r["added"] for r in runs]
        speed = statistics.median(r["rows"] / r["seconds"] for r in runs)
        store_mib = layers * n * WIDTH * 2 / 2**20
        spread = f"{min(added):.0f}-{max(added):.0f}"
        print(
            f"{layers:>6} {n:>9,} {store_mib:>10,.0f} {statistics.median(added):>14,.0f} "
            f"({spread:>9}) {speed:>10,.0f}"
        )


if __name__ == "__main__":
    main()
