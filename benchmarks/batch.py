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

With `--engine ray` (needs recengine[ray]), each size runs the local job, the Ray job on a local Ray
(`--ray-cpus` CPUs, one scoring actor per CPU less one) and the Ray job on a simulated cluster
(`ray.cluster_utils.Cluster`: a driver-only head and `--nodes` nodes, one actor each), each in its own
process, on the same input; the Ray times exclude starting Ray (a real cluster is already up), not
starting the job's actors. It shows rows/s, the Ray/local time ratio, whether the output is the
local job's byte for byte, the driver's and the largest actor's peak memory, and a projection of
the cores needed to rank 1 billion rows in an hour from the Ray job's rows/s per scoring core.

    .venv/bin/python benchmarks/batch.py --engine ray --sizes 10000000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import math
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
    from recengine.core.datasets import movielens

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
    from recengine.running.batch import rank_file
    from recengine.core.datasets import movielens
    from recengine.parts.encoders import DEFAULT_CACHE_DIR, EmbeddingCache
    from recengine.parts.context import FeatureContext
    from recengine.learning.model import load_model

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


def child_ray(model_uri: str, input_path: str, output: str, chunk_rows: int, nodes: int, cpus: int, threads: int,
              share_state: bool = True) -> None:
    """The Ray job on a local Ray (`nodes` 0) or a simulated cluster of `nodes` nodes; prints JSON."""
    import ray

    from recengine.core.datasets import movielens
    from recengine.running.distributed import DEFAULT_OBJECT_STORE, rank_on_ray
    from recengine.parts.encoders import DEFAULT_CACHE_DIR, EmbeddingCache
    from recengine.parts.context import FeatureContext
    from recengine.learning.model import load_model

    model = load_model(model_uri)
    data = movielens()
    context = FeatureContext.from_frames(data.events, data.items, cache=EmbeddingCache(DEFAULT_CACHE_DIR))
    cluster = None
    if nodes:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": DEFAULT_OBJECT_STORE,
                                                                "include_dashboard": False})
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus, object_store_memory=DEFAULT_OBJECT_STORE // nodes)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        actors = nodes
    else:
        ray.init(num_cpus=cpus, object_store_memory=DEFAULT_OBJECT_STORE, include_dashboard=False, log_to_driver=False)
        actors = max(1, cpus - 1)
    started = time.perf_counter()  # Ray is up: from here on, the job's own cost
    report = rank_on_ray(model, input_path, output, context, k=10, chunk_rows=chunk_rows, progress=False,
                         actors=actors, threads=threads, share_state=share_state)
    job = time.perf_counter() - started
    print(json.dumps({"rows": report.rows, "job_s": job, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "actor_mib": report.actor_peak_mib, "chunks": report.chunks, "actors": report.actors,
                      "first_chunk_s": report.first_chunk_s,
                      "nodes": sorted(report.nodes.values())}))
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


def compare_engines(args) -> None:
    """`--engine ray`: the local job, the Ray job and the simulated cluster on the same input, per size."""
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            source = Path(tmp) / f"candidates-{size}.parquet"
            make_input(source, size, later=timedelta(hours=1) if args.point_in_time else timedelta(0))
            # The Ray job once per --serving-state mode (shared: built on the driver, shipped through the
            # object store; per-actor: each actor builds its own), the simulated cluster in the first mode.
            modes = ["shared", "per-actor"] if args.serving_state == "both" else [args.serving_state]
            engines = ["local", *(f"ray/{mode}" for mode in modes), *([f"cluster/{modes[0]}"] if args.nodes else [])]
            outputs = {name: Path(tmp) / f"{name.replace('/', '-')}-{size}.parquet" for name in engines}
            runs: dict[str, list[dict]] = {name: [] for name in outputs}
            for _ in range(args.repeats):
                for name, out in outputs.items():
                    extra = [] if name == "local" else ["--child-ray", str(args.nodes if name.startswith("cluster") else 0),
                                                        "--serving-state", name.split("/")[1]]
                    done = subprocess.run([sys.executable, __file__, "--model", args.model, "--ray-cpus", str(args.ray_cpus),
                                           "--ray-threads", str(args.ray_threads), "--child", str(source), str(out),
                                           str(args.chunk_rows), *extra], capture_output=True, text=True)
                    if done.returncode:
                        sys.exit(f"{name} run failed:\n{done.stderr[-3000:]}")
                    runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"done: {size:,} rows, {name}: {runs[name][-1]['job_s']:.1f} s", flush=True)
            median = {name: sorted(r, key=lambda x: x["job_s"])[len(r) // 2] for name, r in runs.items()}
            local = outputs["local"].read_bytes()
            same = {name: outputs[name].read_bytes() == local for name in engines[1:]}
            table.append((size, median, same))

    print(f"\nmedian of {args.repeats} run(s); Ray times exclude starting Ray; {args.ray_cpus} CPUs for the local Ray, "
          f"{args.nodes} simulated nodes of {args.ray_cpus} CPUs; LightGBM threads per actor: {args.ray_threads}")
    print(f"{'rows':>12} {'engine':>17} {'actors':>6} {'rows/s':>10} {'time/local':>10} {'start-up s':>10} "
          f"{'same bytes':>10} {'driver MiB':>10} {'actor MiB':>9}  chunks per node")
    for size, median, same in table:
        base = median["local"]["job_s"]
        for name, r in median.items():
            print(f"{size:>12,} {name:>17} {r.get('actors', 0):>6} {r['rows'] / r['job_s']:>10,.0f} {r['job_s'] / base:>9.2f}x "
                  f"{r.get('first_chunk_s', 0):>10.1f} {('yes' if same.get(name, True) else 'NO'):>10} {r['peak_mib']:>10.0f} {r.get('actor_mib', 0):>9.0f}  "
                  f"{r.get('nodes', '')}")
    size, median, _ = table[-1]
    ray_run = median[engines[1]]
    per_core = ray_run["rows"] / ray_run["job_s"] / args.ray_cpus
    cores = 1e9 / 3600 / per_core
    print(f"\nprojection: {per_core:,.0f} rows/s per core (the local Ray's rows/s over its {args.ray_cpus} cores) -> "
          f"1 billion rows in one hour needs {math.ceil(cores)} cores, e.g. {math.ceil(cores / 16)} node(s) of 16 cores "
          f"(linear scaling assumed: chunks are independent; the driver only merges the top k)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models:/recengine-movielens@champion")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--chunk-rows", type=int, default=500_000)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per size; the table shows the median run.")
    parser.add_argument("--point-in-time", action="store_true",
                        help="Stamp the rows an hour after the last event, so they take the point-in-time pipeline "
                             "instead of the serving state that rows ranked 'now' get.")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: compare the local job, the Ray job and a simulated Ray cluster on the same rows.")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (and of each simulated node).")
    parser.add_argument("--ray-threads", type=int, default=2, help="LightGBM threads in each scoring actor.")
    parser.add_argument("--nodes", type=int, default=2, help="Nodes of the simulated cluster (0: no cluster run).")
    parser.add_argument("--serving-state", choices=["shared", "per-actor", "both"], default="shared",
                        help="With --engine ray: the serving state built once on the driver and shared through the "
                             "object store, or built by each actor; both: measure the two on the same rows.")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-ray", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.child_ray is not None:
        child_ray(args.model, *args.child[:2], int(args.child[2]), args.child_ray, args.ray_cpus, args.ray_threads,
                  share_state=args.serving_state != "per-actor")
        return
    if args.child:
        child(args.model, *args.child[:2], chunk_rows=int(args.child[2]))
        return
    if args.engine == "ray":
        compare_engines(args)
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
