"""LightGBM trained on a Ray cluster: the ranker of `recengine train --engine ray`.

Ray Train's `LightGBMTrainer` starts one worker per node (or `workers`), and each trains LightGBM's
data-parallel learner on its shard of the training parts with the others over LightGBM's own
network (`get_network_params`): histograms are summed across workers, so every worker grows the same
trees. Shards are consecutive runs of whole parts, and a part holds whole request groups (a chunk of
requests), so no group is cut between workers, as a ranking objective needs.

Early stopping watches the validation groups, which every worker reads whole: LightGBM evaluates
metrics on each worker's own validation rows without combining them, so only the same rows (and
the same thread count) give every worker the same metric in the same round, and every worker stops
at the same round, as the network needs (one that stopped alone would leave the others waiting).

The model is deterministic for a given worker count: the shards, LightGBM's bins (each worker bins
a block of the features from its shard and they swap the results) and the trees follow from the
parts. One worker trains exactly as the local runner does, and writes the same bytes. The parts,
the worker's files and Ray Train's run folder live in the training's temporary folder, which every
node must see (as for the chunks: set TMPDIR to a shared mount on a cluster of several machines).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import lightgbm as lgb
import polars as pl
from tqdm.auto import tqdm

from recengine.errors import ConfigError, DataError
from recengine.learning.training import NO_POSITIVES, Boost, Split, _useful, boost, job_datasets, useful_rows
from recengine.running.distributed import _ray, _user_error, check_address, connect

# Model-file parameters that name the run's network (ports drawn at random): written as a local run
# writes them, so a model's bytes follow from its data, parameters and worker count alone.
_NETWORK_LINES = {"machines": "", "local_listen_port": "12400"}


def ray_lightgbm(address: str | None = None, workers: int | None = None):
    """A LightGBM runner for `recengine.learning.training.train` on the Ray cluster at `address` (a
    local Ray without one): `workers` Ray Train workers (default: one per node with CPUs), each with
    as many LightGBM threads as the smallest node's CPUs allow."""
    _ray()
    check_address(address)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give the number of LightGBM workers, 1 or more.")

    def run(job: Boost, progress: bool = True) -> tuple[lgb.Booster, dict[str, list[float]]]:
        connect(address)
        with tempfile.TemporaryDirectory(prefix="recengine-lightgbm-") as folder:
            if job.validation is not None and not useful_rows(job.validation, job.keys):
                raise DataError(NO_POSITIVES)  # here, not in a worker, where Ray would wrap it
            shards = _shards(job, Path(folder), workers or _nodes())
            threads = _threads(len(shards))
            run.workers = len(shards)
            cpus = int(_ray().cluster_resources().get("CPU", 0))
            if len(shards) * threads > cpus:  # Ray would wait for ever for CPUs the cluster lacks
                raise ConfigError(f"--workers {len(shards)}: the Ray cluster has {cpus} CPU(s), and each LightGBM worker "
                                  f"takes one at least; give --workers {max(cpus, 1)} or fewer, or add nodes.")
            config = {"job": dataclasses.replace(job, train=Split(None, None, job.train.requests),
                                                 validation=_on_disk(job.validation, Path(folder), job.keys)),
                      "shards": shards, "threads": threads, "folder": folder}
            result = _fit_with_progress(config, len(shards), threads, job.rounds, progress)
            model = Path(result) / "model.txt"
            booster = lgb.Booster(model_str=model.read_text())
            found = json.loads((Path(result) / "history.json").read_text())
        booster.best_iteration = found["best_iteration"]
        return booster, found["history"]

    run.workers = 0  # the workers of the last training (fewer than asked when there are fewer parts)
    return run


def _node_cpus() -> list[float]:
    """The CPUs of each live node that has one at least."""
    return [node["Resources"]["CPU"] for node in _ray().nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1]


def _nodes() -> int:
    return max(1, len(_node_cpus()))


def _threads(workers: int) -> int:
    """LightGBM threads per worker: the same on every worker (metrics sum per-thread buffers, so
    different counts could differ in the last bit and stop workers at different rounds)."""
    cpus = _node_cpus()
    per_node = int(min(cpus)) if cpus else 1
    nodes = len(cpus) or 1
    return max(1, per_node * nodes // max(workers, nodes))


def _shards(job: Boost, folder: Path, workers: int) -> list[list[str]]:
    """The training parts as `workers` consecutive runs (fewer when there are fewer parts that hold a
    useful group), balanced by the rows LightGBM learns from."""
    parts = _on_disk(job.train, folder, job.keys).parts
    rows = [_useful(pl.read_parquet(part, columns=[*job.keys, "label"]), job.keys).height for part in parts]
    useful = [(str(part), count) for part, count in zip(parts, rows) if count]
    if not useful:
        raise DataError(NO_POSITIVES)
    if workers >= len(useful):
        return [[part] for part, _ in useful]
    # Each part goes to the shard its middle row falls in, were the rows cut into equal runs.
    total, before, shards = sum(count for _, count in useful), 0, [[] for _ in range(workers)]
    for part, count in useful:
        shards[min(workers - 1, (2 * before + count) * workers // (2 * total))].append(part)
        before += count
    return [shard for shard in shards if shard]


def _on_disk(split: Split | None, folder: Path, keys: list[str], rows_per_part: int = 200_000) -> Split | None:
    """`split` as parquet parts the workers read (a split held in memory is written out, whole
    groups to a part); a split already on disk as it is."""
    if split is None or split.frame is None:
        return None if split is None else Split(None, None, split.requests, [Path(p) for p in split.parts])
    frame = split.frame.with_columns(pl.struct(keys).rle_id().alias("_group"))
    groups = frame["_group"].max() + 1 if frame.height else 0
    pieces = max(1, -(-frame.height // rows_per_part))
    folder = Path(tempfile.mkdtemp(prefix="split-", dir=folder))
    piece = frame["_group"] * pieces // max(groups, 1)
    parts = []
    for number in range(pieces):
        rows = frame.filter(piece == number).drop("_group")
        if rows.height:
            part = folder / f"part-{number:05d}.parquet"
            rows.write_parquet(part)
            parts.append(part)
    return Split(None, None, split.requests, parts)


def _fit_with_progress(config: dict, workers: int, threads: int, rounds: int, progress: bool) -> str:
    """Ray Train's fit, run in a thread while this one shows the rounds worker 0 has done; returns the
    folder of worker 0's model and history."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.lightgbm import LightGBMTrainer

    trainer = LightGBMTrainer(
        _train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name="lightgbm", storage_path=str(Path(config["folder"]) / "ray-train")),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()  # its result is worker 0's folder, read below
        except BaseException as exc:  # noqa: BLE001  (handed to the waiting thread)
            outcome["error"] = exc

    worker = threading.Thread(target=fit, daemon=True)
    worker.start()
    done = Path(config["folder"]) / "rounds"
    with tqdm(total=rounds, desc=f"lightgbm on {workers} Ray worker(s)", unit="it", disable=not progress) as bar:
        while worker.is_alive():
            worker.join(0.5)
            if done.exists():
                bar.update(int(done.read_text() or 0) - bar.n)
    if "error" in outcome:
        raise _user_error(outcome["error"]) or outcome["error"]
    output = Path(config["folder"]) / "output"
    if not (output / "model.txt").exists():
        raise RuntimeError(f"Ray Train finished without worker 0's model in {output}; see Ray's log above.")
    return str(output)


def _train_worker(config: dict) -> None:
    """One Ray Train worker: LightGBM on its shard with the others (the whole validation set each);
    worker 0 writes the model and the history."""
    import ray.train
    from ray.train.lightgbm import get_network_params

    job: Boost = config["job"]
    rank = ray.train.get_context().get_world_rank()
    workers = len(config["shards"])
    train_set, val_set = job_datasets(job, Split(None, None, 0, [Path(p) for p in config["shards"][rank]]))
    params = dict(job.params)
    if workers > 1:  # one worker is the local training exactly (LightGBM would drop the network anyway)
        params.update(tree_learner="data", **get_network_params())
        params.setdefault("num_threads", config["threads"])  # a feature set's own count is the same on every worker
    folder = Path(config["folder"])

    def on_round(done: int) -> None:
        if rank == 0 and (done % 5 == 0 or done == job.rounds):
            (folder / "rounds.tmp").write_text(str(done))
            (folder / "rounds.tmp").replace(folder / "rounds")

    booster, history = boost(job, train_set, val_set, on_round, params)
    booster.free_network()
    if rank == 0:
        output = folder / "output-tmp"
        output.mkdir()
        (output / "model.txt").write_text(without_network(booster.model_to_string(num_iteration=-1)))
        (output / "history.json").write_text(json.dumps({"best_iteration": booster.best_iteration, "history": history}))
        output.replace(folder / "output")
    ray.train.report({"best_iteration": booster.best_iteration})


def without_network(model: str) -> str:
    """A model file's text with the run's network parameters written as a local run writes them."""
    for name, value in _NETWORK_LINES.items():
        model = re.sub(rf"^\[{name}: [^\]\n]*\]$", f"[{name}: {value}]", model, count=1, flags=re.MULTILINE)
    return model
