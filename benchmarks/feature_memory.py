"""Each extractor's memory on one chunk of a large log: what a training chunk costs it, and what it
keeps for the run (its point-in-time tables over all events).

Loads a synthetic log (benchmarks/synthlog.py; train_scale.py keeps them in benchmarks/.data/), takes
the first `--requests` snapshot requests (as `train` builds them, in time order) with `--candidates`
random items each, and runs each extractor of the feature set on those rows in turn, printing the
peak resident memory above the start (the kernel's high-water mark, reset before each) and what
stays resident after it, with its seconds. The chunk goes through twice: the first pass builds what
an extractor keeps for the run (its tables over the log), the second is what every later chunk costs. Run it at two log sizes to see which parts grow with the log:

    .venv/bin/python benchmarks/feature_memory.py benchmarks/.data/synth-5M-seed0 [--feature-set movielens] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import polars as pl

from recengine.learning.samples import snapshot_requests
from recengine.parts.context import FeatureContext
from recengine.parts.encoders import EmbeddingCache
from recengine.parts.featureset import FeatureSet, resolve


def resident_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="A folder with events.parquet and items.parquet.")
    parser.add_argument("--feature-set", default="movielens", help="A bundled feature set's name or a TOML file.")
    parser.add_argument("--cache-dir", type=Path, help="Embedding cache (default: none, the item text is embedded).")
    parser.add_argument("--requests", type=int, default=2_000, help="Requests in the chunk (train's --chunk-requests).")
    parser.add_argument("--candidates", type=int, default=100, help="Random candidate items per request.")
    args = parser.parse_args()

    feature_set = FeatureSet.load(resolve(args.feature_set))
    cache = EmbeddingCache(args.cache_dir) if args.cache_dir else None
    context = FeatureContext.from_frames(pl.read_parquet(args.log / "events.parquet"),
                                         pl.read_parquet(args.log / "items.parquet"), cache=cache)
    events = context.events.collect()
    labels = feature_set.labels
    requests = snapshot_requests(events.lazy(), labels["snapshot_every_days"], labels["horizon_days"],
                                 labels["min_history"]).sort("timestamp", "user_id").head(args.requests)
    items = events["item_id"].unique().sort().to_numpy()
    rows = (requests.select("user_id", "timestamp").join(pl.DataFrame({"_k": np.arange(args.candidates)}), how="cross")
            .drop("_k").with_columns(pl.Series("item_id", np.random.default_rng(0).choice(items, requests.height * args.candidates))))
    print(f"{args.log.name}: {events.height:,} events; a chunk of {requests.height:,} requests, {rows.height:,} rows; "
          f"resident {resident_mb('VmRSS'):,.0f} MB", flush=True)
    print(f"{'pass':<6} {'extractor':<28} {'peak +MB':>10} {'kept +MB':>10} {'seconds':>9}")
    chunk = rows.with_row_index("_row").lazy()
    extractors = feature_set.build_extractors()
    for attempt, extractor in [(attempt, extractor) for attempt in ("first", "next") for extractor in extractors]:
        start = resident_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        began = time.perf_counter()
        extractor.transform(chunk, context).collect()
        print(f"{attempt:<6} {type(extractor).__name__:<28} {resident_mb('VmHWM') - start:>10,.0f} {resident_mb('VmRSS') - start:>10,.0f} "
              f"{time.perf_counter() - began:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
