"""Single-SAE training on one device: saekit against SAELens, and the FLOP/s it achieves as a
fraction of a plain matmul of the same shapes.

Issue 15 asks, for a lent GPU: (1) single-SAE training throughput against SAELens on the same
GPU; (2) achieved FLOP/s as a fraction of a plain bf16 matmul of the same shapes (target: at
least half). This script measures both, on any device:

1. ``matmul``: ``x_BD @ W_DS`` in bf16 (and float32), the reference rate.
2. ``saekit``: ``saekit.sae.train_sae`` of a ReLU SAE (olson2025's loss), float32 and
   ``autocast="bfloat16"`` (float32 master weights), data already on the device.
3. ``SAELens``: ``SAETrainer`` on the same SAE shape, float32 and its ``autocast=True``.

Per-step time is the slope between a short and a long run (``(t_long - t_short) / (n_long -
n_short)``), so building the SAE, fitting the normaliser and exporting cancel out and every
run ends synchronised with the device. Achieved FLOP/s counts the five ``2·B·D·S`` matmuls a
step needs (encoder forward, decoder forward, the decoder's two gradients, the encoder's weight
gradient; the input gradient is not needed); the fraction is against the bf16 matmul rate.
Methods are interleaved over ``--rounds`` rounds; the table gives medians, the min-max spread
and each ratio's per-round spread.

    python benchmarks/gpu.py --device cuda                 # on a GPU: d_in 768 x8, batch 4096
    OMP_NUM_THREADS=1 python benchmarks/gpu.py --quick     # CPU smoke run

No GPU was lent to this project's sessions so far; the numbers below are a CPU smoke run, which
shows the script works, not the GPU result the issue asks for (2026-12-02, ``--quick --rounds
2``, one thread of a 2-core AVX-512-bf16 VM shared with other jobs)::

    device cpu; ReLU SAE d_in 256 x8, batch 512; 2 rounds; steady per-step time (slope of 3 vs 8 steps)
      plain bf16 matmul [B,D]@[D,S]: 0.427 TFLOP/s (0.426-0.428)
      plain float32 matmul [B,D]@[D,S]: 0.094 TFLOP/s (0.090-0.097)
      method                  act/s (median)                spread    vs SAELens fp32   of bf16 matmul
      saekit float32                  13,730      6,679-20,781       1.20x (0.56-1.85)     0.17 (0.08-0.26)
      saekit bf16 autocast            59,544     53,572-65,516       5.15x (4.46-5.83)     0.73 (0.66-0.81)
      SAELens float32                 11,620     11,239-12,001       1.00x (1.00-1.00)     0.14 (0.14-0.15)
      SAELens autocast                30,140     25,364-34,916       2.61x (2.11-3.11)     0.37 (0.31-0.43)

Five steps against eight is a short slope on a shared machine: the float32 spread is wide.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import Regime, _saelens_cfg, _saelens_sae  # noqa: E402

from saekit.sae import SAESpec, get_recipe, train_sae  # noqa: E402

L1 = 10.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_seconds(r: Regime, dtype: torch.dtype, device: str, reps: int) -> float:
    """Seconds of one ``[B, D] @ [D, S]`` product in `dtype`."""
    x = torch.randn(r.batch, r.d_in, device=device, dtype=dtype)
    w = torch.randn(r.d_in, r.d_in * r.expansion, device=device, dtype=dtype)
    for _ in range(3):
        x @ w
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        x @ w
    _sync(device)
    return (time.perf_counter() - start) / reps


def _data(r: Regime, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(r.batch, r.d_in, generator=gen).to(device) for _ in range(4)]


def _saekit_run(r: Regime, steps: int, device: str, autocast: str | None) -> None:
    data = _data(r, device)
    recipe = get_recipe("olson2025", batch_size=r.batch, epochs=1)
    spec = SAESpec(arch="relu", d_in=r.d_in, expansion=r.expansion, l1=L1, recipe=recipe)
    train_sae(spec, lambda epoch: itertools.islice(itertools.cycle(data), steps), steps,
              device=device, progress=False, autocast=autocast)  # fmt: skip


def _saelens_run(r: Regime, steps: int, device: str, autocast: bool) -> None:
    from sae_lens.training.sae_trainer import SAETrainer

    regime = Regime(r.name, r.d_in, r.expansion, r.batch, steps)
    cfg = _saelens_cfg(regime, device)
    cfg.autocast = autocast
    trainer = SAETrainer(cfg=cfg, sae=_saelens_sae(regime, device), data_provider=iter(
        itertools.cycle(_data(r, device))))  # fmt: skip
    trainer.fit()


def step_seconds(run: Callable[[int], None], device: str, short: int, long: int) -> float:
    """Per-step seconds as the slope between a `short` and a `long` run."""
    times = []
    for steps in (short, long):
        _sync(device)
        start = time.perf_counter()
        run(steps)
        _sync(device)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="d_in 256, batch 512 (smoke)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = args.device
    if args.quick:
        r, short, long, reps = Regime("quick", 256, 8, 512, 0), 3, 8, 20
    elif device.startswith("cuda"):
        r, short, long, reps = Regime("paper", 768, 8, 4096, 0), 50, 300, 200
    else:
        r, short, long, reps = Regime("paper", 768, 8, 4096, 0), 3, 10, 10
    methods: dict[str, Callable[[int], None]] = {
        "saekit float32": lambda n: _saekit_run(r, n, device, None),
        "saekit bf16 autocast": lambda n: _saekit_run(r, n, device, "bfloat16"),
        "SAELens float32": lambda n: _saelens_run(r, n, device, False),
        "SAELens autocast": lambda n: _saelens_run(r, n, device, True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    matmul: dict[str, list[float]] = {"bf16": [], "float32": []}
    for _ in range(args.rounds):
        for name, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
            matmul[name].append(matmul_seconds(r, dtype, device, reps))
        for name, run in methods.items():
            seconds[name].append(step_seconds(run, device, short, long))
    flops_step = 5 * 2 * r.batch * r.d_in * r.d_in * r.expansion
    flops_matmul = 2 * r.batch * r.d_in * r.d_in * r.expansion
    bf16_rate = [flops_matmul / s for s in matmul["bf16"]]
    print(f"\ndevice {device}; ReLU SAE d_in {r.d_in} x{r.expansion}, batch {r.batch}; "
          f"{args.rounds} rounds; steady per-step time (slope of {short} vs {long} steps)")  # fmt: skip
    for name, values in matmul.items():
        rates = [flops_matmul / s / 1e12 for s in values]
        print(f"  plain {name} matmul [B,D]@[D,S]: {statistics.median(rates):.3f} TFLOP/s "
              f"({min(rates):.3f}-{max(rates):.3f})")  # fmt: skip
    base = seconds["SAELens float32"]
    print(f"  {'method':<22} {'act/s (median)':>15} {'spread':>21} {'vs SAELens fp32':>18} "
          f"{'of bf16 matmul':>16}")  # fmt: skip
    for name, values in seconds.items():
        act = [r.batch / s for s in values]
        ratio = [b / s for s, b in zip(values, base, strict=True)]
        fraction = [flops_step / s / m for s, m in zip(values, bf16_rate, strict=True)]
        print(
            f"  {name:<22} {statistics.median(act):>15,.0f} {min(act):>10,.0f}-{max(act):<10,.0f} "
            f"{statistics.median(ratio):>6.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) "
            f"{statistics.median(fraction):>8.2f} ({min(fraction):.2f}-{max(fraction):.2f})"
        )


if __name__ == "__main__":
    main()
