"""Online ranking latency: `Ranker.rank` for one user with 100 and 500 candidates.

The state is built from the bundled MovieLens (embeddings precomputed in the cache). Single-thread
p50/p99 over many users and random candidate lists, then throughput with 8 threads. The peer is
LightGBM's bare `predict` on a matrix of the same shape (the floor), timed in the same run.

    .venv/bin/python benchmarks/serving.py --model models:/recengine-movielens@champion
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from recengine import Ranker
from recengine.core.datasets import movielens
from recengine.parts.encoders import DEFAULT_CACHE_DIR, EmbeddingCache


def percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models:/recengine-movielens@champion")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()

    data = movielens()
    events, items = data.events.collect(), data.items.collect()
    started = time.perf_counter()
    ranker = Ranker.load(args.model, events, items, cache=EmbeddingCache(DEFAULT_CACHE_DIR))
    print(f"Ranker.load + state: {time.perf_counter() - started:.2f} s; torch imported: {'torch' in sys.modules}")
    rng = np.random.default_rng(0)
    users = events["user_id"].unique().to_numpy()
    catalogue = items["item_id"].to_numpy()
    booster = ranker.model.booster

    print(f"\n{'candidates':>10} {'method':32} {'p50 ms':>8} {'p99 ms':>8} {'p99 vs floor':>13}")
    for n in (100, 500):
        requests = [(int(rng.choice(users)), [int(i) for i in rng.choice(catalogue, n, replace=False)]) for _ in range(args.calls)]
        for user, cands in requests[:50]:
            ranker.rank(user, cands)
        samples = []
        for user, cands in requests:
            t = time.perf_counter()
            ranker.rank(user, cands)
            samples.append(time.perf_counter() - t)
        matrix = rng.random((n, len(ranker.model.features)))
        floor = []
        for _ in range(args.calls):
            t = time.perf_counter()
            booster.predict(matrix, num_threads=1)  # as Ranker.rank calls it
            floor.append(time.perf_counter() - t)
        (p50, p99), (f50, f99) = percentiles(samples), percentiles(floor)
        print(f"{n:>10} {'Ranker.rank (features + predict)':32} {p50:8.2f} {p99:8.2f} {p99 / f99:12.1f}x")
        print(f"{n:>10} {'LightGBM predict alone (floor)':32} {f50:8.2f} {f99:8.2f} {1.0:12.1f}x")

        with ThreadPoolExecutor(8) as pool:
            t = time.perf_counter()
            list(pool.map(lambda r: ranker.rank(*r), requests))
            elapsed = time.perf_counter() - t
        print(f"{n:>10} {'8 threads: requests/s':32} {len(requests) / elapsed:8.0f}")
    print(f"\ntorch imported after ranking: {'torch' in sys.modules}")


if __name__ == "__main__":
    main()
