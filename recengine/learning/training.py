"""Training: labelled request groups, candidates, point-in-time features, a LightGBM ranker, evaluation.

Two kinds of logs, picked by the events' columns:
- interaction logs (no `request_id`): request times are sampled per user; each request's group is
  its candidates from the feature set's sources, and the positives are the items the user
  interacted with from t on (training labels stop at the validation boundary: no peeking).
- impression logs (`request_id` and `label`): each logged request is a group of the items shown,
  labelled by `label` (graded: 2 for a purchase beats 1 for a click).
Requests before the time boundary train, those after validate (early stopping and the metrics).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import lightgbm as lgb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recengine.core.data import Dataset, write_parquet_atomic
from recengine.core.metrics import request_metrics, summarise
from recengine.core.pit import users_events
from recengine.errors import ConfigError, DataError
from recengine.learning.model import SPEC_FORMAT, RankerModel
from recengine.learning.samples import (attach_labels, cap_groups, future_items, sample_negatives, sample_requests,
                                        snapshot_requests, time_split)
from recengine.parts import plugins
from recengine.parts.candidates import drop_seen, generate
from recengine.parts.context import FeatureContext, compute_features, fit_learned
from recengine.parts.encoders import EmbeddingCache, create_encoder
from recengine.parts.featureset import FeatureSet
from recengine.parts.protocol import candidate_columns, encoders_of, learns

REQUEST_KEYS = ["user_id", "timestamp"]
# The order training groups are built and stored in: by time, so chunk after chunk the as-of state of
# the features (co-visitation's totals as of each time) moves forward instead of restarting.
GROUP_ORDER = ["timestamp", "user_id"]
# Training requests built at a time: with a few hundred candidates each, some hundreds of MB of rows
# and their features' intermediates at most, whatever the log's size.
CHUNK_REQUESTS = 2_000
IMPRESSION_KEYS = ["request_id"]
NO_POSITIVES = ("no training or no validation request has a positive among its candidates; "
                "add events, widen [labels] window_days, or add candidate sources.")


@dataclass
class Split:
    """One side of the time split: labelled candidate rows (sorted by group) and the truth.

    Rows are held in memory (`frame`: impression logs, a held-out window) or, for interaction logs,
    where they can be far more, stream to disk as parquet `parts` (one per chunk of requests, in group
    order) that LightGBM and the evaluation read back a part at a time; `rows` reads them all, for
    tests and small data."""

    frame: pl.DataFrame | None
    truth: pl.DataFrame | None
    requests: int
    parts: list[Path] = field(default_factory=list)
    folder: Any = field(default=None, repr=False)  # the temporary folder of the parts, alive while the split is

    @property
    def rows(self) -> pl.DataFrame:
        if self.frame is not None:
            return self.frame
        return pl.concat(list(self.chunks()), how="vertical_relaxed")

    def chunks(self) -> Iterator[pl.DataFrame]:
        """The rows a part at a time (the frame, if held in memory)."""
        if self.frame is not None:
            yield self.frame
            return
        for part in self.parts:
            yield pl.read_parquet(part)

    @property
    def height(self) -> int:
        if self.frame is not None:
            return self.frame.height
        return sum(pq.ParquetFile(part).metadata.num_rows for part in self.parts)

    def head(self, n: int) -> pl.DataFrame:
        """The first `n` rows, reading no more than it needs."""
        if self.frame is not None or not self.parts:
            return self.rows.head(n)
        return pl.scan_parquet(self.parts).head(n).collect()


@dataclass
class TrainResult:
    model: RankerModel
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    history: dict[str, list[float]]
    importance: pl.DataFrame
    lineage: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    train: Split | None = None
    validation: Split | None = None


def train(
    dataset: Dataset,
    feature_set: FeatureSet,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    chunk_requests: int = CHUNK_REQUESTS,
    run_chunks: ChunkRunner | None = None,
    run_boost: BoostRunner | None = None,
) -> TrainResult:
    """Fit the feature set's ranker on `dataset` and evaluate it on the later requests.

    Training groups are built `chunk_requests` requests at a time and written to temporary parquet
    parts, so memory follows the chunk, not the log; the parts are the same whatever the chunk size.
    `run_chunks` builds the chunks and `run_boost` trains LightGBM (default: here, in this process)."""
    check_ranker(feature_set)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    events = dataset.events.collect()
    context = FeatureContext.from_frames(events, dataset.items, cache=cache, progress=progress)
    keys = IMPRESSION_KEYS if is_impression_log(events) else REQUEST_KEYS
    trained_on = lineage(events, dataset.name, dataset.items)
    if context.impressions is None:  # the context's copy (in time order) is these events: keep one, not two
        events = context.events.collect()
    lap("data")
    learned = [p for p in [*feature_set.build_sources(), *feature_set.build_extractors()] if learns(p)]
    if learned:
        # Learned parts see only the events before the boundary, and the ranker's requests all come
        # after it: no feature comes from a model fit on events at or after its request.
        boundary = events["timestamp"].quantile(feature_set.labels["learned_fraction"], interpolation="lower")
        fit_learned(learned, context, boundary)
        lap("learned_parts")
        say(f"fit {len(learned)} learned part(s) on the events before {boundary} ({timings['learned_parts']:.1f} s); "
            "the ranker's requests come after it")
    say(f"building {'impression' if keys == IMPRESSION_KEYS else 'interaction'} training groups from {events.height:,} events")
    if keys == IMPRESSION_KEYS:
        train_split, val_split = impression_splits(events, feature_set, context)
    else:
        train_split, val_split = interaction_splits(events, feature_set, context, chunk_requests, progress, run_chunks)
    lap("candidates_and_features")
    say(f"  train: {train_split.requests:,} requests, {train_split.height:,} rows; "
        f"validation: {val_split.requests:,} requests, {val_split.height:,} rows ({timings['candidates_and_features']:.1f} s)")

    features = feature_columns(feature_set)
    booster, history = fit(train_split, val_split, features, keys, feature_set.ranker, progress, run_boost)
    lap("lightgbm")
    catalogue = catalogue_size(dataset, events)
    metrics, baselines = evaluate_split(RankerModel(booster, model_spec(feature_set, features, keys, booster, trained_on)),
                                        val_split, feature_set, context, keys, catalogue)
    lap("evaluation")
    stopped_at = booster.best_iteration or booster.current_iteration()
    if feature_set.ranker["refit"]:
        booster = refit(train_split, val_split, features, keys, feature_set, stopped_at, run_boost, progress)
        say(f"  refit on training + validation groups: {booster.current_iteration()} rounds")
        lap("refit")
    spec = model_spec(feature_set, features, keys, booster, trained_on)
    spec["metrics"], spec["early_stopped_at"] = metrics, stopped_at
    spec["early_stopping_metric"] = early_stopping_metric(feature_set.ranker)
    spec["metrics_measured"] = "on validation, before the refit" if feature_set.ranker["refit"] else "on validation"
    if learned:
        # What the model carries: the learned parts fit on every training event, the freshest state.
        spec["learned_until"] = (events["timestamp"].max() + timedelta(milliseconds=1)).isoformat()
        fit_learned(learned, context, datetime.fromisoformat(spec["learned_until"]))
        lap("learned_parts_final")
    model = RankerModel(booster, spec, context.learned if learned else None)
    importance = pl.DataFrame({
        "feature": features,
        "gain": booster.feature_importance("gain"),
        "splits": booster.feature_importance("split").astype(np.int64),
    }).sort("gain", descending=True)
    return TrainResult(model, metrics, baselines, history, importance, spec["trained_on"], timings, train_split, val_split)


def is_impression_log(events: pl.DataFrame) -> bool:
    return "request_id" in events.columns and "label" in events.columns


def interaction_splits(events: pl.DataFrame, feature_set: FeatureSet, context: FeatureContext,
                       chunk_requests: int = CHUNK_REQUESTS, progress: bool = False,
                       run_chunks: ChunkRunner | None = None) -> tuple[Split, Split]:
    labels = feature_set.labels
    snapshots = labels["design"] == "snapshots"
    if snapshots:
        requests = snapshot_requests(events.lazy(), labels["snapshot_every_days"], labels["horizon_days"],
                                     labels["min_history"], after=context.learned_until)
    else:
        requests = sample_requests(events.lazy(), labels["samples_per_user"], labels["min_history"], labels["seed"],
                                   after=context.learned_until)
    if requests.height < 2:
        raise DataError(
            f"only {requests.height} training requests: too few users have more than min_history="
            f"{labels['min_history']} events. Lower [labels] min_history or add events."
        )
    train_requests, val_requests, boundary = time_split(requests, labels["validation_fraction"])
    train_requests = cap_groups(train_requests, labels["max_training_groups"], labels["seed"])
    val_requests = cap_groups(val_requests, labels["max_validation_groups"], labels["seed"])
    window = labels["horizon_days"] if snapshots else labels["window_days"] or None
    folder = tempfile.TemporaryDirectory(prefix="recengine-train-")
    # Training labels stop at the boundary, so no training row learns from the validation period.
    # Validation keeps every candidate: its metrics are the ranker's on the lists it will really rank.
    # Both are built in one pass of chunks in time order (validation's come after the boundary), so
    # the features' as-of state moves forward through both.
    chunks = [*plan_chunks(train_requests, Path(folder.name), chunk_requests, "part"),
              *plan_chunks(val_requests, Path(folder.name), validation_chunk(chunk_requests, feature_set), "validation",
                           validation=True)]
    build_chunks(chunks, (events, feature_set, context, window, boundary), progress, run_chunks)
    val_truth = future_items(val_requests, events.lazy(), window)
    if feature_set.exclude_seen:
        val_truth = drop_seen(val_truth.lazy(), context.events).collect()
    train_parts = [chunk.part for chunk in chunks if not chunk.validation]
    val_parts = [chunk.part for chunk in chunks if chunk.validation]
    return (Split(None, None, train_requests.height, train_parts, folder),
            Split(None, val_truth, val_requests.height, val_parts, folder))


@dataclass(frozen=True)
class Chunk:
    """A consecutive run of requests (in group order) and the parquet part its rows are written to:
    training rows (labels stop at the boundary, negatives sampled) or validation rows (every candidate)."""

    requests: pl.DataFrame
    part: Path
    validation: bool = False


def validation_chunk(chunk_requests: int, feature_set: FeatureSet) -> int:
    """Validation requests per chunk: about the rows of a training chunk. A training group keeps its
    positives and `negatives_per_group` negatives, a validation group every candidate: at least the
    largest source's k, at most the sources' k summed (200 and 600 in `movielens`, against 100
    negatives; at 20M events its validation groups held 324 rows on average, training's 100). Sized by
    the largest k: a chunk has costs that do not shrink with its requests (at 20M events most of a
    333-request chunk's 20 s), and sized by the sum (333 requests) validation took a third of the chunks."""
    negatives = feature_set.labels["negatives_per_group"]
    ks = [getattr(source, "k", None) for source in feature_set.build_sources()]
    if not negatives or not all(isinstance(k, int) for k in ks):  # no budget, or a source without a k: no bound to scale by
        return chunk_requests
    return max(1, chunk_requests * negatives // max(*ks, negatives))


def plan_chunks(requests: pl.DataFrame, folder: Path, chunk_requests: int, prefix: str, validation: bool = False) -> list[Chunk]:
    if chunk_requests < 1:
        raise ConfigError(f"chunk_requests = {chunk_requests}: give a number of requests per chunk, at least 1.")
    requests = requests.sort(*GROUP_ORDER)
    return [Chunk(requests.slice(start, chunk_requests), folder / f"{prefix}-{number:05d}.parquet", validation)
            for number, start in enumerate(range(0, requests.height, chunk_requests))]


def build_chunks(chunks: list[Chunk], shared: tuple, progress: bool = False, run_chunks: "ChunkRunner | None" = None) -> None:
    """Every chunk's part, built by `run_chunks` (default: here, one after the other; the Ray engine's
    runs them on a cluster), which yields each chunk's request count as it finishes."""
    with tqdm(total=sum(chunk.requests.height for chunk in chunks), desc="training and validation groups",
              unit="request", disable=not progress) as bar:
        for done in (run_chunks or run_here)(build_part, chunks, shared):
            bar.update(done)


def training_parts(requests: pl.DataFrame, events: pl.DataFrame, feature_set: FeatureSet, context: FeatureContext,
                   window: float | None, until: datetime | None, folder: Path, chunk_requests: int = CHUNK_REQUESTS,
                   progress: bool = False, run_chunks: "ChunkRunner | None" = None) -> list[Path]:
    """The training rows of `requests`, built `chunk_requests` at a time, one parquet part each.

    Chunks are consecutive runs of the requests in group order, and every step is per request (the
    negatives' draw included), so the parts, read in order, are the whole table to the bit, whichever
    runner built them."""
    chunks = plan_chunks(requests, folder, chunk_requests, "part")
    build_chunks(chunks, (events, feature_set, context, window, until), progress, run_chunks)
    return [chunk.part for chunk in chunks]


# A way to run `build_part` over chunks: (build_part, chunks, shared) -> each chunk's request count.
ChunkRunner = Callable[[Callable[[Chunk, tuple], int], list[Chunk], tuple], Iterable[int]]


def run_here(build: Callable[[Chunk, tuple], int], chunks: list[Chunk], shared: tuple) -> Iterator[int]:
    """The local runner: each chunk in turn, in this process."""
    for chunk in chunks:
        yield build(chunk, shared)


def build_part(chunk: Chunk, shared: tuple) -> int:
    """One chunk's rows, written to its part (whole or not at all); returns its request count."""
    events, feature_set, context, window, until = shared
    if chunk.validation:
        rows = validation_rows(chunk.requests, events, feature_set, context, window)
    else:
        rows = training_rows(chunk.requests, events, feature_set, context, window, until)
    write_parquet_atomic(rows, chunk.part)
    return chunk.requests.height


def training_rows(requests: pl.DataFrame, events: pl.DataFrame, feature_set: FeatureSet, context: FeatureContext,
                  window: float | None, until: datetime | None) -> pl.DataFrame:
    """Labelled, negative-sampled training rows of `requests`, with features, sorted by group and item.

    Negatives are drawn before the features are computed: the features of a dropped row are never built."""
    truth = future_items(requests, users_events(events, requests), window, until=until)
    rows = generate(requests, feature_set.build_sources(), context, feature_set.exclude_seen)
    rows = attach_labels(rows, truth).sort(*GROUP_ORDER, "item_id")
    return compute_features(sampled(rows, feature_set), feature_set.build_extractors(), context)


def validation_rows(requests: pl.DataFrame, events: pl.DataFrame, feature_set: FeatureSet, context: FeatureContext,
                    window: float | None) -> pl.DataFrame:
    """Every candidate of `requests`, labelled by what the user took in the window, with features,
    sorted by group and item."""
    truth = future_items(requests, users_events(events, requests), window)
    return labelled_candidates(requests, truth, feature_set, context, GROUP_ORDER)


def sampled(rows: pl.DataFrame, feature_set: FeatureSet) -> pl.DataFrame:
    """`rows` (labelled request groups) with the negatives the feature set's [labels] budget keeps, hard
    ones by the ranks of its sources."""
    labels = feature_set.labels
    ranks = [candidate_columns(name)[1] for name in feature_set.candidates if candidate_columns(name)[1] in rows.columns]
    return sample_negatives(rows, REQUEST_KEYS, ranks, labels["negatives_per_group"], labels["hard_negative_share"],
                            labels["seed"])


def labelled_candidates(requests: pl.DataFrame, truth: pl.DataFrame, feature_set: FeatureSet, context: FeatureContext,
                        order: list[str] = REQUEST_KEYS) -> pl.DataFrame:
    return attach_labels(feature_set.candidate_rows(requests, context), truth).sort(*order, "item_id")


def impression_splits(events: pl.DataFrame, feature_set: FeatureSet, context: FeatureContext) -> tuple[Split, Split]:
    shown = events.filter(pl.col("label").is_not_null()).select("request_id", "user_id", "item_id", "timestamp", "label")
    requests = shown.group_by("request_id").agg(pl.col("user_id").first(), pl.col("timestamp").min())
    owners = shown.group_by("request_id").agg(pl.col("user_id").n_unique().alias("n"), pl.col("timestamp").n_unique().alias("t"))
    bad = owners.filter((pl.col("n") > 1) | (pl.col("t") > 1))
    if bad.height:
        raise DataError(f"events: request_id {bad['request_id'].head(5).to_list()} span several users or timestamps; "
                        "each logged request must be one user's impressions at one time.")
    if context.learned_until is not None:  # after the learned parts' window, as for interaction logs
        requests = requests.filter(pl.col("timestamp") >= context.learned_until)
    train_requests, val_requests, _ = time_split(requests.sort("timestamp"), feature_set.labels["validation_fraction"])
    splits = []
    for reqs in (train_requests, val_requests):
        rows = shown.join(reqs.select("request_id"), on="request_id")
        rows = feature_set.given_rows(rows, IMPRESSION_KEYS, context).sort("request_id", "item_id")
        splits.append(Split(rows, rows.filter(pl.col("label") > 0).select("request_id", "item_id"), reqs.height))
    return splits[0], splits[1]


def feature_columns(feature_set: FeatureSet) -> list[str]:
    """The model's inputs, in order: each source's score and rank, then each extractor's columns."""
    return feature_set.columns()


def fit(
    train_split: Split, val_split: Split, features: list[str], keys: list[str], ranker: dict[str, Any], progress: bool = True,
    run_boost: "BoostRunner | None" = None,
) -> tuple[lgb.Booster, dict[str, list[float]]]:
    """LightGBM on groups that hold a positive (others teach nothing and would inflate validation NDCG),
    early-stopped on the validation groups, by `run_boost` (default: here; the Ray engine's trains on a cluster)."""
    job = Boost(lgb_params(ranker), train_split, val_split, features, keys, ranker["num_boost_round"],
                (early_stopping_metric(ranker), ranker["early_stopping_rounds"]))
    return (run_boost or boost_here)(job, progress)


@dataclass(frozen=True)
class Boost:
    """One LightGBM training as a runner gets it: the splits (their groups that hold a positive are the
    rows), LightGBM's parameters and rounds, and early stopping on `validation` as (metric, patience)
    (none for the refit, which has no validation split)."""

    params: dict[str, Any]
    train: Split
    validation: Split | None
    features: list[str]
    keys: list[str]
    rounds: int
    stopping: tuple[str, int] | None = None


def boost_here(job: Boost, progress: bool = True) -> tuple[lgb.Booster, dict[str, list[float]]]:
    """The local runner: LightGBM in this process, reading the parts one at a time."""
    train_set, val_set = job_datasets(job, job.train)
    with tqdm(total=job.rounds, desc="lightgbm", unit="it", disable=not progress) as bar:
        return boost(job, train_set, val_set, lambda done: bar.update(done - bar.n))


def job_datasets(job: Boost, train: Split) -> tuple[lgb.Dataset, lgb.Dataset | None]:
    """The LightGBM Datasets of `train` (the job's, or a worker's shard of it) and of the job's validation
    split, refused when either has no group with a positive."""
    train_set = lgb_dataset(train, job.features, job.keys)
    val_set = None if job.validation is None else lgb_dataset(job.validation, job.features, job.keys)
    if train_set is None or (job.validation is not None and val_set is None):
        raise DataError(NO_POSITIVES)
    return train_set, val_set


def boost(job: Boost, train_set: lgb.Dataset, val_set: lgb.Dataset | None, on_round: Callable[[int], None],
          params: dict[str, Any] | None = None) -> tuple[lgb.Booster, dict[str, list[float]]]:
    """`lgb.train` on built Datasets, as every runner calls it: `on_round` hears each round's count
    done; the history is each validation metric per round. `params` replaces the job's (a cluster
    worker's adds its network)."""
    history: dict[str, dict[str, list[float]]] = {}
    callbacks: list[Callable] = [lambda env: on_round(env.iteration + 1)]
    validation: dict[str, Any] = {}
    if val_set is not None:
        val_set.set_reference(train_set)
        callbacks += [lgb.record_evaluation(history), StopOnMetric(*job.stopping)]
        validation = {"valid_sets": [val_set], "valid_names": ["validation"]}
    booster = lgb.train(params or job.params, train_set, num_boost_round=job.rounds, callbacks=callbacks, **validation)
    _Part.release()
    return booster, {f"validation_{name}": values for name, values in history.get("validation", {}).items()}


# A way to train LightGBM: (job, progress) -> (the booster, its best iteration set when early-stopped;
# the validation history).
BoostRunner = Callable[[Boost, bool], tuple[lgb.Booster, dict[str, list[float]]]]


def lgb_params(ranker: dict[str, Any]) -> dict[str, Any]:
    own = ("num_boost_round", "early_stopping_rounds", "refit", "early_stopping_metric")
    params = {k: v for k, v in ranker.items() if k not in own}
    # The early-stopping cut-off is evaluated even when eval_at leaves it out.
    cutoff = int(early_stopping_metric(ranker).split("@")[1])
    params["eval_at"] = sorted({*ranker.get("eval_at", [5, 10]), cutoff})
    return {**params, "metric": "ndcg", "verbosity": -1, "deterministic": True, "force_row_wise": True}


def early_stopping_metric(ranker: dict[str, Any]) -> str:
    """The validation metric early stopping watches: `[ranker] early_stopping_metric`, NDCG@10 by default
    (the metric the champion is chosen on)."""
    return str(ranker.get("early_stopping_metric", "ndcg@10"))


def check_ranker(feature_set: FeatureSet, source: str = "feature set") -> None:
    """Refuse an early-stopping metric LightGBM cannot evaluate, before any data is read."""
    metric = early_stopping_metric(feature_set.ranker)
    name, _, cutoff = metric.partition("@")
    if name != "ndcg" or not cutoff.isdigit() or int(cutoff) < 1:
        raise ConfigError(f"{source}: [ranker] early_stopping_metric = {metric!r} is not a validation metric "
                          "recengine can stop on; give ndcg@K with K a cut-off such as 10 (\"ndcg@10\", the default).")


class StopOnMetric:
    """Early stopping on one named validation metric (LightGBM's own callback watches every metric, or
    the first one only, which is NDCG at the smallest cut-off). Stops after `patience` rounds without
    a strict improvement and, like LightGBM's callback, leaves the best iteration on the booster."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.order = 30  # after record_evaluation (20), so the last round is recorded too (an instance attribute: lgb.train reads __dict__)
        self.best_score, self.best_iteration, self.best_results = float("-inf"), 0, []

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        results = [r for r in env.evaluation_result_list if r[0] == "validation" and r[1] == self.metric]
        if not results:
            raise ConfigError(f"LightGBM did not report validation {self.metric}; its metrics: "
                              f"{sorted({r[1] for r in env.evaluation_result_list})}.")
        if results[0][2] > self.best_score:
            self.best_score, self.best_iteration, self.best_results = results[0][2], env.iteration, env.evaluation_result_list
        last_round = env.iteration == env.end_iteration - 1
        if env.iteration - self.best_iteration >= self.patience or last_round:
            raise lgb.callback.EarlyStopException(self.best_iteration, self.best_results)


def refit(train_split: Split, val_split: Split, features: list[str], keys: list[str], feature_set: FeatureSet,
          best: int, run_boost: BoostRunner | None = None, progress: bool = False) -> lgb.Booster:
    """The same ranker trained on both splits, its early-stopped round count scaled by the growth in rows.
    The validation groups join with their negatives sampled as the training groups' were."""
    requests = train_split.requests + val_split.requests
    if train_split.frame is not None:
        val_rows = sampled(val_split.rows, feature_set) if keys == REQUEST_KEYS else val_split.rows
        train_rows = _useful(train_split.frame, keys).height
        both = Split(pl.concat([train_split.frame, val_rows], how="diagonal_relaxed"), None, requests)
    else:
        train_rows = train_split.height
        columns = train_split.head(0).columns
        parts = []
        for number, rows in enumerate(val_split.chunks()):
            part = Path(train_split.folder.name) / f"validation-sampled-{number:05d}.parquet"
            sampled(rows, feature_set).select(columns).write_parquet(part)
            parts.append(part)
        both = Split(None, None, requests, [*train_split.parts, *parts], train_split.folder)
    rounds = max(1, round(best * useful_rows(both, keys) / train_rows))
    job = Boost(lgb_params(feature_set.ranker), both, None, features, keys, rounds)
    return (run_boost or boost_here)(job, progress)[0]


def useful_rows(split: Split, keys: list[str]) -> int:
    """The rows LightGBM learns from in `split`: those of groups that hold a positive."""
    if split.frame is not None:
        return _useful(split.frame, keys).height
    return sum(_useful(pl.read_parquet(part, columns=[*keys, "label"]), keys).height for part in split.parts)


def _useful(rows: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """The rows of groups that hold a positive: the only ones LightGBM learns from."""
    return rows.filter((pl.col("label") > 0).any().over(keys))


def lgb_dataset(split: Split, features: list[str], keys: list[str]) -> lgb.Dataset | None:
    """The split's groups that hold a positive as a LightGBM Dataset. Parts on disk are read through
    `lgb.Sequence`, one part in memory at a time, in the two rounds LightGBM builds a Dataset in."""
    if split.frame is not None:
        useful = _useful(split.frame, keys)
        if useful.height == 0:
            return None
        matrix = useful.select(pl.col(features).cast(pl.Float64)).to_numpy()
        return lgb.Dataset(matrix, label=_labels(useful), group=_group_sizes(useful, keys), feature_name=features,
                           free_raw_data=False)
    heads = [_useful(pl.read_parquet(part, columns=[*keys, "label"]), keys) for part in split.parts]
    sequences = [_Part(part, features, keys, head.height) for part, head in zip(split.parts, heads) if head.height]
    if not sequences:
        return None
    heads = [head for head in heads if head.height]
    return lgb.Dataset(sequences, label=np.concatenate([_labels(h) for h in heads]),
                       group=np.concatenate([_group_sizes(h, keys) for h in heads]), feature_name=features,
                       free_raw_data=False)


def _labels(rows: pl.DataFrame) -> np.ndarray:
    return rows["label"].cast(pl.Int32).to_numpy()


def _group_sizes(rows: pl.DataFrame, keys: list[str]) -> np.ndarray:
    return rows.group_by(keys, maintain_order=True).len()["len"].to_numpy()


class _Part(lgb.Sequence):
    """One part's feature matrix for LightGBM (the rows of its groups that hold a positive), read from
    its parquet file when first asked for. LightGBM asks for rows in increasing order, part after
    part, so one part is held at a time."""

    batch_size = 65_536
    _held: tuple[Any, np.ndarray | None] = (None, None)  # (part, its matrix): the one part in memory

    def __init__(self, path: Path, features: list[str], keys: list[str], height: int):
        self.path, self.features, self.keys, self.height = path, features, keys, height

    def __len__(self) -> int:
        return self.height

    def __getitem__(self, index):
        held, matrix = _Part._held
        if held is not self:
            rows = _useful(pl.read_parquet(self.path, columns=list(dict.fromkeys([*self.features, *self.keys, "label"]))), self.keys)
            matrix = rows.select(pl.col(self.features).cast(pl.Float64)).to_numpy()
            _Part._held = (self, matrix)
        return matrix[index]

    @staticmethod
    def release() -> None:
        """Drop the part held in memory (LightGBM has binned every row once the Dataset is built)."""
        _Part._held = (None, None)


def evaluate_split(
    model: RankerModel, split: Split, feature_set: FeatureSet, context: FeatureContext, keys: list[str], catalogue: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The ranker's metrics on `split`, and the same metrics for each source alone and for popularity."""
    ks = tuple(feature_set.ranker["eval_at"])
    columns = list(dict.fromkeys([*keys, "user_id", "item_id", "timestamp"]))
    counts = plugins.create("feature_extractors", "item_popularity", {"windows_days": [], "half_lives_days": []})
    per_request: dict[str, list[pl.DataFrame]] = {}

    def add(name: str, ranked: pl.DataFrame) -> None:
        per_request.setdefault(name, []).append(request_metrics(ranked, split.truth, keys, ks))

    for rows in split.chunks():  # requests are independent: a part at a time, in bounded memory
        add("model", rows.with_columns(pl.Series("score", model.score(rows))))
        for name in feature_set.candidates:
            column = candidate_columns(name)[0]
            if column in rows.columns:
                add(f"source_{name}", rows.filter(pl.col(column).is_not_null()).with_columns(pl.col(column).alias("score")))
        # Popularity re-ranking the same candidates: the lift a ranker must at least show.
        counted = compute_features(rows.select(columns), [counts], context)
        add("popularity", counted.rename({"item_count_all": "score"}))
    summaries = {name: summarise(pl.concat(frames), split.truth, keys, ks, catalogue) for name, frames in per_request.items()}
    return summaries.pop("model"), summaries


def model_spec(feature_set: FeatureSet, features: list[str], keys: list[str], booster: lgb.Booster, trained_on: dict) -> dict[str, Any]:
    return {
        "format": SPEC_FORMAT,
        "recengine_version": plugins.engine_version(),
        "feature_set": feature_set.to_dict(),
        "features": features,
        "group_keys": keys,
        "best_iteration": booster.best_iteration or booster.current_iteration(),
        "parts": used_parts(feature_set),
        "encoders": encoder_ids(feature_set),
        "trained_on": trained_on,
    }


def used_parts(feature_set: FeatureSet) -> list[dict[str, str]]:
    """Each registered part the feature set uses, with the plugin providing it and that plugin's version."""
    versions = plugins.plugin_versions()
    used = [("candidate_sources", "source", name, params) for name, params in feature_set.candidates.items()]
    used += [("feature_extractors", "extractor", name, params) for name, params in feature_set.features.items()]
    parts = []
    for kind, alias, name, params in used:
        registration = plugins.get(kind, params.get(alias, name))
        parts.append({"kind": kind, "name": registration.name, "plugin": registration.plugin,
                      "version": versions.get(registration.plugin, "unknown")})
    for encoder in sorted({name for name, _ in _encoders(feature_set)}):
        registration = plugins.get("encoders", encoder)
        parts.append({"kind": "encoders", "name": encoder, "plugin": registration.plugin,
                      "version": versions.get(registration.plugin, "unknown")})
    return parts


def _encoders(feature_set: FeatureSet) -> list[tuple[str, dict[str, Any]]]:
    """Every (encoder, parameters) a part of the feature set declares it embeds text with."""
    parts = [*feature_set.build_sources(), *feature_set.build_extractors()]
    return [pair for part in parts for pair in encoders_of(part)]


def encoder_ids(feature_set: FeatureSet) -> list[str]:
    """The encoders' ids (model, pooling, length, precision): which cached embeddings the model expects."""
    return sorted({create_encoder(name, params).id for name, params in _encoders(feature_set)})


def lineage(events: pl.DataFrame, name: str, items: pl.LazyFrame | pl.DataFrame | None = None) -> dict[str, Any]:
    """What the model was trained on: counts, time span and a content digest of the raw events and items."""
    digest = data_digest(events, items)
    return {
        "dataset": name,
        "events": events.height,
        "users": events["user_id"].n_unique(),
        "items": events["item_id"].n_unique(),
        "first_event": str(events["timestamp"].min()),
        "last_event": str(events["timestamp"].max()),
        "digest": digest,
    }


def data_digest(events: pl.DataFrame, items: pl.LazyFrame | pl.DataFrame | None = None) -> str:
    """A digest of the input data alone, equal across processes and row orders: each table's sorted
    row hashes, its column names and types. Feature values play no part, so two trainings on the
    same data show the same digest whatever their feature sets."""
    digest = hashlib.sha256()
    for table in (events, items):
        if table is None:
            digest.update(b"no table")
            continue
        frame = table.collect() if isinstance(table, pl.LazyFrame) else table
        digest.update(str(sorted((c, str(t)) for c, t in frame.schema.items())).encode())
        columns = sorted(frame.columns)  # column order is not content
        digest.update(frame.select(columns).hash_rows(seed=0).sort().to_numpy().tobytes())
    return digest.hexdigest()[:16]


def evaluate_window(
    model: RankerModel, dataset: Dataset, since: datetime, until: datetime | None = None, cache: EmbeddingCache | None = None
) -> tuple[dict[str, float], dict[str, dict[str, float]], int]:
    """A trained model on a held-out time window: one request per user at their first event in
    [since, until), whose truth is what they interacted with from then until `until`.
    Features still see only events before each request. Returns metrics, baselines, requests."""
    events = dataset.events.collect()
    in_window = events.filter(pl.col("timestamp") >= since)
    if until is not None:
        in_window = in_window.filter(pl.col("timestamp") < until)
    if in_window.height == 0:
        raise DataError(f"no events in the evaluation window from {since} to {until or 'the end'}; "
                        f"the events span {events['timestamp'].min()} to {events['timestamp'].max()}.")
    requests = in_window.group_by("user_id").agg(pl.col("timestamp").min()).sort("user_id")
    feature_set = model.feature_set()
    context = FeatureContext.from_frames(events, dataset.items, cache=cache, progress=True)
    # Learned parts are refit on the events before the window, never on the window itself.
    fit_learned([*feature_set.build_sources(), *feature_set.build_extractors()], context, since)
    truth = future_items(requests, events.lazy(), until=until)
    if feature_set.exclude_seen:
        truth = drop_seen(truth.lazy(), context.events).collect()
    split = Split(labelled_candidates(requests, truth, feature_set, context), truth, requests.height)
    catalogue = catalogue_size(dataset, events)
    metrics, baselines = evaluate_split(model, split, feature_set, context, REQUEST_KEYS, catalogue)
    return metrics, baselines, requests.height


def catalogue_size(dataset: Dataset, events: pl.DataFrame) -> int:
    """Items that could be recommended: the catalogue, or the items seen in events without one."""
    return dataset.items.select(pl.len()).collect().item() if dataset.items is not None else events["item_id"].n_unique()
