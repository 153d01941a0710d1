"""Offline batch ranking throughput and memory: `recengine rank` on 1M and 10M candidate rows.

Each size runs in its own process (so its peak RSS is its own): the end-to-end job (features +
predict, chunked, written to parquet) against LightGBM's bare `predict` on a feature matrix of the
same size (the floor: one chunk's real features, tiled), timed in the same run. The rows are ranked
as of just after the last event (the nightly job), or with `--point-in-time` an hour later, which
sends them through the point-in-time pipeline.

The input holds requests of 1,000 random catalogue items for random users: ~16 requests per user at
10M rows, ~1.6 at 1M (users with rows for an eighth of the catalogue are computed once per item).
Each size runs `--repeats` times and the run with the median job/floor ratio is shown: the machines
are shared and noisy.

    .venv/bin/python benchmarks/batch.py --model models:/recengine-movielens@champion [--sizes 1000000 10000000] [--repeats 3] [--point-in-time]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl


def make_input(path: Path, rows: int, per_request: int = 1000, seed: int = 0, later: timedelta = timedelta(0)) -> None:
    """`rows` candidates: requests of `per_request` random catalogue items for random users, just after
    the data (the serving-state path), or `later` than that (the point-in-time path)."""
    from recengine.datasets import movielens

    data = movielens()
    events = data.events.select("user_id", "timestamp").collect()
    catalogue = data.items.select("item_id").collect()["item_id"].to_numpy()
    rng = np.random.default_rng(seed)
    requests = rows // per_request
    at = events["timestamp"].max() + timedelta(seconds=1) + later
    pl.DataFrame({
        "request_id": np.repeat(np.arange(requests), per_request),
        "user_id": np.repeat(rng.choice(events["user_id"].unique().to_numpy(), requests), per_request),
        "item_id": rng.choice(catalogue, requests * per_request),
    }).with_columns(pl.lit(at).alias("timestamp")).write_parquet(path)


def child(model_uri: str, input_path: str, output: str, chunk_rows: int) -> None:
    """One size, in this process: the job end to end, then the floor; prints JSON."""
    from recengine.batch import rank_file
    from recengine.datasets import movielens
    from recengine.encoders import DEFAULT_CACHE_DIR, EmbeddingCache
    from recengine.extractors import FeatureContext
    from recengine.model import load_model

    model = load_model(model_uri)
    data = movielens()
    context = FeatureContext.from_frames(data.events, data.items, cache=EmbeddingCache(DEFAULT_CACHE_DIR))
    started = time.perf_counter()
    report = rank_file(model, input_path, output, context, k=10, chunk_rows=chunk_rows, progress=False)
    job = time.perf_counter() - started
    peak_job = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # The floor: bare predict over a matrix of the same size, built from one chunk's real features.
    sample = pl.read_parquet(input_path, n_rows=min(chunk_rows, report.rows))
    features = model.feature_set().given_rows(sample, ["request_id"], context)
    block = features.select(pl.col(model.features).cast(pl.Float64)).to_numpy()
    repeats = -(-report.rows // len(block))
    started = time.perf_counter()
    for _ in range(repeats):
        model.booster.predict(block, num_iteration=model.spec.get("best_iteration") or None)
    floor = time.perf_counter() - started
    print(json.dumps({"rows": report.rows, "job_s": job, "floor_s": floor, "peak_mib": peak_job, "chunks": report.chunks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models:/recengine-movielens@champion")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--chunk-rows", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per size; the table shows the median run.")
    parser.add_argument("--point-in-time", action="store_true",
                        help="Stamp the rows an hour after the last event, so they take the point-in-time pipeline "
                             "instead of the serving state that rows ranked 'now' get.")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, *args.child[:2], chunk_rows=int(args.child[2]))
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            source = Path(tmp) / f"candidates-{size}.parquet"
            make_input(source, size, later=timedelta(hours=1) if args.point_in_time else timedelta(0))
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", str(source),
                                      str(Path(tmp) / f"ranked-{size}.parquet"), str(args.chunk_rows)],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"done: {size:,} rows, job/floor {runs[-1]['job_s'] / runs[-1]['floor_s']:.2f}x", flush=True)
            # The run with the median job/floor ratio (job and floor are timed in the same process).
            results.append(sorted(runs, key=lambda r: r["job_s"] / r["floor_s"])[len(runs) // 2])

    print(f"\nmedian of {args.repeats} run(s) per size:")
    print(f"{'rows':>12} {'chunks':>7} {'job rows/s':>12} {'floor rows/s':>13} {'job/floor':>10} {'peak MiB':>9} {'vs first':>9}")
    for r in results:
        print(f"{r['rows']:>12,} {r['chunks']:>7} {r['rows'] / r['job_s']:>12,.0f} {r['rows'] / r['floor_s']:>13,.0f} "
              f"{r['job_s'] / r['floor_s']:>9.2f}x {r['peak_mib']:>9.0f} {r['peak_mib'] / results[0]['peak_mib']:>8.2f}x")


if __name__ == "__main__":
    main()
