"""What the sequential model's training costs on each device: `SequentialScores.fit` (the very fit `train`
runs for the `sequential` parts) on MovieLens ml-latest-small's events before its last month, with the same
settings and seed on every device given. The item texts are encoded once first (the encoder's own cost is
benchmarks/encode.py's), so the rows time the model's training alone.

Prints one row per device: windows, next-item targets, epochs, seconds, targets/s and the ratio to the
first device's time, and the last epoch's loss (the devices' losses agree to rounding, not to the bit:
CUDA kernels sum in another order).

    .venv/bin/python benchmarks/sequential.py --model PATH --devices cpu,cuda [--epochs 10]
"""

from __future__ import annotations

import argparse
import statistics
from datetime import timedelta

import polars as pl

from recengine.core.datasets import movielens
from recengine.features.sequential import SequentialScores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local BERT-family folder (e.g. the packaged MiniLM)")
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu, cuda")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="fits per device; the median time is shown")
    args = parser.parse_args()

    data = movielens()
    events = data.events.collect()
    cutoff = events["timestamp"].max() - timedelta(days=30)
    window, items = events.filter(pl.col("timestamp") < cutoff), data.items.collect()
    print(f"sequential fit on {window.height:,} events of ml-latest-small before {cutoff}; {args.epochs} epochs",
          flush=True)
    print(f"{'device':<8} {'windows':>8} {'targets':>9} {'seconds':>9} {'targets/s':>11} {'vs first':>9} {'last loss':>10}")
    first = None
    for device in args.devices.split(","):
        # A one-epoch fit first: CUDA's start-up (context, kernels) is not the model's cost.
        SequentialScores(encoder_params={"model": args.model, "device": device}, epochs=1, device=device).fit(window, items)
        part = SequentialScores(encoder_params={"model": args.model, "device": device}, epochs=args.epochs, device=device)
        seconds = []
        for _ in range(args.repeats):
            part.fit(window, items)
            seconds.append(part.last_fit.seconds)
        result, median = part.last_fit, statistics.median(seconds)
        first = first or median
        per_epoch = result.targets * args.epochs / median
        print(f"{device:<8} {result.windows:>8,} {result.targets:>9,} {median:>9.2f} {per_epoch:>11,.0f} "
              f"{median / first:>8.2f}x {result.losses[-1]:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
