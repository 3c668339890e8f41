"""The fast paths of SAE training (issue #15 item 5), each against its switch turned off.

1. ``torch.compile``: steady step time of one ReLU SAE (paper size: d_in 768, expansion 8,
   minibatch 4096; ``--quick``: d_in 256, minibatch 512), eager against ``sweep(...,
   compile=True)`` with inductor. Each round trains both for ``--steps`` steps on the same
   rows; a step's time is the gap between consecutive ``on_step`` calls, the first step
   (fitting, compiling) left out, and a round's value the median of its steps. The compiled
   SAE's largest weight difference from the eager one is printed too.
2. Batch assembly: steps per second of a sweep fed from a float16 store on disk (per-shard
   ``.npy`` files read by `saekit.store_iterator.StoreBatches`; the page cache holds them after
   the first round): batches assembled on the training thread (``background=False``, how it
   was), off it (``background=True``), and off it in the store's float16,
   cast by the trainer (``dtype=None``: what `sweep_from_store` asks of a store that takes it).
   Two regimes: paper width (d_in 768, x8, minibatch 1024) and mini (d_in 128, x8, minibatch 64).

Rounds interleave the methods (the machine is shared); tables give each method's median over
rounds with the min-max spread, and ratios as the median of per-round ratios with their spread.

    OMP_NUM_THREADS=1 python benchmarks/fast_paths.py [--quick] [--rounds R] [--steps N]
    python benchmarks/fast_paths.py --device cuda   # on a GPU: pinned, non-blocking copies too

With ``--device cuda`` the store batches are also page-locked (``pin_memory=True``) and copied
with ``non_blocking=True``: no GPU was lent when this was written, so that path has been run on
a CPU only through its logic (tests/test_fast_paths.py); a GPU user measures it with the line
above.

Results (2026-12-02; CPU: 2-core AMD EPYC VM shared with other helpers' jobs, 1 torch thread;
torch 2.13 CPU)::

    step time, ReLU SAE d_in 768 x8, minibatch 4096, cpu, 3 rounds (first compiled run,
    compilation included: 13 s)
    method           ms per step, median (min-max)
    eager                   1481.1 (1459.4-3497.8)
    compiled                1971.5 (1897.4-3326.2)
    eager / compiled = 0.77 (0.75-1.05)x
    largest weight difference, compiled vs eager after 5 steps: 3.36e-06

    (assembly table: a second run, --skip-compile --rounds 5)
    paper width: ReLU SAE d_in 768 x8, minibatch 1024, 24 steps from a float16 store, cpu
    batches assembled        steps/s, median (min-max)      vs training thread
    training thread                   2.91 (2.30-3.00)       1.00 (1.00-1.00)x
    off-thread                        2.94 (2.78-3.03)       1.03 (0.97-1.21)x
    off-thread fp16                   2.83 (2.68-3.13)       0.96 (0.92-1.36)x

    mini: ReLU SAE d_in 128 x8, minibatch 64, 300 steps from a float16 store, cpu
    batches assembled        steps/s, median (min-max)      vs training thread
    training thread             359.02 (310.97-381.66)       1.00 (1.00-1.00)x
    off-thread                  312.91 (270.33-352.67)       0.91 (0.80-0.96)x
    off-thread fp16             299.58 (276.08-325.49)       0.88 (0.72-0.92)x

What it says, on this CPU: inductor's compiled step is slower than eager at paper size (not
profiled; the step is dominated by five large matmuls, which compiling cannot make cheaper),
so ``compile`` stays off by default. Assembling off the training thread
is even at paper width (the step dwarfs a 1024-row gather) and costs ~10% at mini size, where
a step takes ~3 ms and the hand-over between threads costs more than the gather: hence
`StoreBatches`'s default, off the thread only for batches of at least 1 MiB
(`saekit.store_iterator.BACKGROUND_BYTES`). On a CPU the float16 path saves memory, not time
(the cast moves to the training thread); its gain is the halved PCIe transfer on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saekit.sae import SAESpec, get_recipe, sweep, tensor_batches
from saekit.store_iterator import StoreBatches


def _spec(d_in: int, batch: int) -> SAESpec:
    recipe = get_recipe("olson2025", batch_size=batch, epochs=1)
    return SAESpec(arch="relu", d_in=d_in, expansion=8, l1=1.0, recipe=recipe)


def _spread(values: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
    low, mid, high = (scale * v for v in (min(values), statistics.median(values), max(values)))
    return f"{mid:{fmt}} ({low:{fmt}}-{high:{fmt}})"


def _ratio(a: list[float], b: list[float]) -> str:
    return _spread([x / y for x, y in zip(a, b, strict=True)], fmt=".2f") + "x"


# --- 1. torch.compile ------------------------------------------------------------------------------


def step_times(d_in: int, batch: int, steps: int, device: str, compile: bool):
    """(median seconds per step after the first, the trained SAE)."""
    rows = torch.randn(batch * steps, d_in, generator=torch.Generator().manual_seed(0))
    stamps: list[float] = []

    def on_step(record: dict) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    (sae,) = sweep([_spec(d_in, batch)], tensor_batches(rows, batch), steps, device=device,
                   progress=False, on_step=on_step, compile=compile)  # fmt: skip
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(gaps[1:] if len(gaps) > 2 else gaps), sae


def compile_table(d_in: int, batch: int, steps: int, rounds: int, device: str) -> None:
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    start = time.perf_counter()
    _, first = step_times(d_in, batch, 2, device, compile=True)  # compile outside the rounds
    print(f"(first compiled run, compilation included: {time.perf_counter() - start:.0f} s)")
    diff = 0.0
    for _ in range(rounds):
        eager_s, eager = step_times(d_in, batch, steps, device, compile=False)
        compiled_s, compiled = step_times(d_in, batch, steps, device, compile=True)
        times["eager"].append(eager_s)
        times["compiled"].append(compiled_s)
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(
                eager.state_dict().values(), compiled.state_dict().values(), strict=True
            )
        )
    print(f"\nstep time, ReLU SAE d_in {d_in} x8, minibatch {batch}, {device}, {rounds} rounds")
    print(f"{'method':<12}{'ms per step, median (min-max)':>34}")
    for name, values in times.items():
        print(f"{name:<12}{_spread(values, 1e3):>34}")
    print(f"eager / compiled = {_ratio(times['eager'], times['compiled'])}")
    print(f"largest weight difference, compiled vs eager after {steps} steps: {diff:.2e}")


# --- 2. batch assembly -----------------------------------------------------------------------------


def write_store(root: Path, rows: int, d_in: int, shards: int = 4) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for shard in range(shards):
        path = root / f"shard_{shard}.npy"
        np.save(path, rng.normal(size=(rows // shards, d_in)).astype(np.float16))
        paths.append(path)
    return paths


METHODS = {
    "training thread": {"background": False},
    "off-thread": {"background": True},
    "off-thread fp16": {"background": True, "dtype": None},
}


def store_steps_per_second(paths, d_in, batch, steps, device, options) -> float:
    pin = device.startswith("cuda")

    def batches(epoch: int):
        return StoreBatches({0: paths}, batch, seed=0, epoch=epoch, pin_memory=pin, **options)

    stamps: list[float] = []

    def on_step(record: dict) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    sweep([_spec(d_in, batch)], batches, steps, device=device, progress=False, on_step=on_step)
    return (len(stamps) - 2) / (stamps[-1] - stamps[1])


def assembly_table(regimes, rounds: int, device: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, d_in, batch, steps in regimes:
            paths = write_store(Path(folder), batch * steps, d_in)
            rates: dict[str, list[float]] = {m: [] for m in METHODS}
            for _ in range(rounds):
                for method, options in METHODS.items():
                    rates[method].append(
                        store_steps_per_second(paths, d_in, batch, steps, device, options)
                    )
            print(f"\n{name}: ReLU SAE d_in {d_in} x8, minibatch {batch}, {steps} steps from a "
                  f"float16 store, {device}, {rounds} rounds")  # fmt: skip
            print(
                f"{'batches assembled':<20}{'steps/s, median (min-max)':>30}{'vs training thread':>24}"
            )
            base = rates["training thread"]
            for method, values in rates.items():
                print(f"{method:<20}{_spread(values, fmt='.2f'):>30}{_ratio(values, base):>24}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per compile-table run")
    parser.add_argument("--skip-compile", action="store_true", help="only the assembly table")
    args = parser.parse_args()
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if not args.skip_compile:
        d_in, batch = (256, 512) if args.quick else (768, 4096)
        compile_table(d_in, batch, args.steps or (6 if args.quick else 5), args.rounds, args.device)
    regimes = (
        [("paper width", 256, 256, 20), ("mini", 128, 64, 60)]
        if args.quick
        else [("paper width", 768, 1024, 24), ("mini", 128, 64, 300)]
    )
    assembly_table(regimes, args.rounds, args.device)


if __name__ == "__main__":
    main()
