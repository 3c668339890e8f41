"""bf16 autocast against float32 for SAE training: step time and the quality it reaches.

Reference: float32 training with the same sweep trainer (``sweep(..., autocast=None)``).

1. Speed: one training step of a paper-size ReLU SAE (d_in 768, expansion 8, minibatch 1024;
   ``--quick``: d_in 256, minibatch 256), float32 vs ``autocast="bfloat16"`` (float32 master
   weights), interleaved over rounds; the table gives each method's median ms per step, the
   spread (min-max) over rounds, and the ratio float32 / bf16 with its per-round spread.
2. Quality: the same planted-dictionary SAEs (ReLU, TopK, Gated, BatchTopK, JumpReLU,
   Matryoshka) trained in both precisions: explained variance, L0 and atom recovery.

On this CPU (avx512_bf16) a bf16 matmul of these shapes runs several times faster than float32;
the step gains less, since the sparsity terms, the optimizer and the casts stay float32.

    python benchmarks/precision.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saekit.sae import SAESpec, get_recipe, sweep, tensor_batches
from saekit.sae.synthetic import atom_recovery, planted_dictionary

ARCHS = {
    "relu": {"l1": 0.2},
    "topk": {"k": 4},
    "gated": {"l1": 0.2},
    "batchtopk": {"k": 4},
    "jumprelu": {"l1": 0.02},
    "matryoshka": {"k": 4},
}


def step_seconds(d_in: int, batch: int, steps: int, autocast: str | None) -> float:
    """Seconds per step of one ReLU SAE trained for ``steps`` steps on random rows."""
    rows = torch.randn(batch * steps, d_in, generator=torch.Generator().manual_seed(0))
    recipe = get_recipe("olson2025", batch_size=batch, epochs=1)
    spec = SAESpec(arch="relu", d_in=d_in, expansion=8, l1=1.0, recipe=recipe)
    start = time.perf_counter()
    sweep([spec], tensor_batches(rows, batch), steps, progress=False, autocast=autocast)
    return (time.perf_counter() - start) / steps


def speed_table(d_in: int, batch: int, steps: int, rounds: int) -> None:
    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    for _ in range(rounds):  # interleaved, so a busy moment hits both methods alike
        times["float32"].append(step_seconds(d_in, batch, steps, None))
        times["bf16"].append(step_seconds(d_in, batch, steps, "bfloat16"))
    print(f"\nstep time, ReLU SAE d_in {d_in} x8, minibatch {batch}, {rounds} rounds")
    print(f"{'method':<10}{'median ms':>12}{'min-max ms':>18}")
    for name, values in times.items():
        print(f"{name:<10}{1e3 * statistics.median(values):>12.1f}"
              f"{1e3 * min(values):>9.1f}-{1e3 * max(values):.1f}")  # fmt: skip
    ratios = [a / b for a, b in zip(times["float32"], times["bf16"], strict=True)]
    print(f"float32 / bf16 = {statistics.median(ratios):.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


def quality_table(epochs: int) -> None:
    data = planted_dictionary(n_rows=8192, d_in=32, n_atoms=64, active=3, noise=0.01, seed=0)
    recipe = get_recipe("stevens2025", lr=1e-2, lr_warmup_steps=50, sparsity_warmup_steps=50,
                        batch_size=128, epochs=epochs, norm_sample_rows=4096,
                        dead_feature_window=50)  # fmt: skip
    x = data.acts_ND[:2000]
    total = (x - x.mean(0)).pow(2).sum()
    print(f"\nquality on a planted dictionary (d_in 32, 64 atoms), {epochs} epochs")
    print(f"{'arch':<12}{'EV fp32':>9}{'EV bf16':>9}{'L0 fp32':>9}{'L0 bf16':>9}"
          f"{'atoms fp32':>12}{'atoms bf16':>12}")  # fmt: skip
    for arch, sparsity in ARCHS.items():
        spec = SAESpec(arch=arch, d_in=32, expansion=4, recipe=recipe, **sparsity)
        row = {}
        for name, autocast in (("fp32", None), ("bf16", "bfloat16")):
            (sae,) = sweep([spec], tensor_batches(data.acts_ND, 128), 64, progress=False,
                           autocast=autocast)  # fmt: skip
            with torch.no_grad():
                codes = sae.encode(x)
                ev = float(1 - (sae.decode(codes) - x).pow(2).sum() / total)
            row[name] = (ev, float((codes != 0).sum(-1).float().mean()),
                         atom_recovery(sae.W_dec, data.atoms_AD))  # fmt: skip
        (e32, l32, a32), (e16, l16, a16) = row["fp32"], row["bf16"]
        print(f"{arch:<12}{e32:>9.4f}{e16:>9.4f}{l32:>9.2f}{l16:>9.2f}{a32:>12.3f}{a16:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one quality epoch")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    args = parser.parse_args()
    if args.quick:
        speed_table(d_in=256, batch=256, steps=5, rounds=args.rounds or 2)
        quality_table(epochs=1)
    else:
        speed_table(d_in=768, batch=1024, steps=10, rounds=args.rounds or 5)
        quality_table(epochs=10)


if __name__ == "__main__":
    main()
