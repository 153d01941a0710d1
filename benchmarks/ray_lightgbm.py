"""LightGBM on Ray Train against LightGBM here, on the same training parts of a synthetic log.

`recengine train` builds the training and validation parts of a seeded synthetic log (benchmarks/synthlog.py,
cached as train_scale.py caches it) up to the point where LightGBM starts. The same parts then train:
here, with LightGBM seeds 0, 1 and 2 (the seed noise: bagging and feature sampling), and with `--workers`
Ray Train workers on a simulated cluster of as many nodes on this machine (one CPU each), twice (the
model must be the same bytes). The table gives each run's best round, its validation NDCG@10 at that
round, its seconds and the ratio to the local median. On one machine the workers share its cores, so
the time says what the network and Ray Train's start-up cost, not what a real cluster gains. A worker
takes whole parts (chunks of `--chunk-requests`, 2,000 requests), so a log with fewer parts trains on fewer.

    .venv/bin/python benchmarks/ray_lightgbm.py [--size 1M] [--workers 2] [--feature-set movielens]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthlog  # noqa: E402
from train_scale import ROOT, ensure_log  # noqa: E402

from recengine.core.data import Dataset  # noqa: E402
from recengine.learning.training import Boost, boost_here, train  # noqa: E402
from recengine.parts.encoders import EmbeddingCache  # noqa: E402
from recengine.parts.featureset import FeatureSet  # noqa: E402


class _Parts(Exception):
    """Carries the first LightGBM job out of `train` (its parts live while the job does)."""


def _stop_at_lightgbm(job: Boost, progress: bool):
    raise _Parts(job)


def training_job(size: str, feature_set: str, data: Path) -> Boost:
    folder = ensure_log(data, synthlog.parse_size(size), 0, True)
    dataset = Dataset.load(folder / "events.parquet", folder / "items.parquet")
    started = time.perf_counter()
    try:
        train(dataset, FeatureSet.load(feature_set), EmbeddingCache(data / "cache"), progress=True,
              run_boost=_stop_at_lightgbm)
    except _Parts as parts:
        print(f"training parts of the {size} log built in {time.perf_counter() - started:.1f} s", flush=True)
        return parts.args[0]
    raise RuntimeError("train finished without training LightGBM")


def measured(name: str, run, job: Boost) -> dict:
    started = time.perf_counter()
    booster, history = run(job, False)
    seconds = time.perf_counter() - started
    best = booster.best_iteration
    return {"run": name, "best": best, "ndcg": history["validation_ndcg@10"][best - 1], "seconds": seconds,
            "model": booster.model_to_string()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1M", help="Log size in events (0.1M, 1M, 5M).")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers, one per simulated node.")
    parser.add_argument("--feature-set", default="movielens", help="A bundled feature set's name or a TOML file.")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".data", help="Where generated logs are kept.")
    args = parser.parse_args()
    feature_set = args.feature_set if args.feature_set.endswith(".toml") else str(ROOT / "features" / f"{args.feature_set}.toml")
    job = training_job(args.size, feature_set, args.data)

    rows = [measured(f"local, seed {seed}", boost_here, dataclasses.replace(job, params={**job.params, "seed": seed}))
            for seed in (0, 1, 2)]
    import ray
    from ray.cluster_utils import Cluster

    from recengine.running.ray_lightgbm import ray_lightgbm

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 300 << 20,
                                                            "include_dashboard": False})
    for _ in range(args.workers - 1):
        cluster.add_node(num_cpus=1, object_store_memory=300 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        for run in (1, 2):
            runner = ray_lightgbm()
            rows.append(measured(f"Ray Train, run {run}", runner, job))
            rows[-1]["run"] += f" ({runner.workers} worker{'s' if runner.workers > 1 else ''})"
    finally:
        ray.shutdown()
        cluster.shutdown()

    local = statistics.median(row["seconds"] for row in rows[:3])
    print(f"\n{'run':34}{'best round':>12}{'NDCG@10':>10}{'seconds':>10}{'x local':>9}")
    for row in rows:
        print(f"{row['run']:34}{row['best']:12d}{row['ndcg']:10.4f}{row['seconds']:10.1f}{row['seconds'] / local:9.2f}")
    print(f"\nRay runs the same bytes: {rows[3]['model'] == rows[4]['model']}; local NDCG@10 over seeds "
          f"{min(r['ndcg'] for r in rows[:3]):.4f}-{max(r['ndcg'] for r in rows[:3]):.4f}")


if __name__ == "__main__":
    main()
