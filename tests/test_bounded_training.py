"""Bounded training tables: sampled negatives, capped groups, and rows built in chunks on disk."""

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recengine.core.data import Dataset
from recengine.learning.samples import cap_groups, sample_negatives, sample_requests, time_split
from recengine.learning.training import (GROUP_ORDER, REQUEST_KEYS, labelled_candidates, train, training_parts,
                                         validation_chunk)
from recengine.parts.context import FeatureContext
from recengine.parts.featureset import FeatureSet

from synthetic import catalogue, feature_set, interactions

RANKS = ["cand_a_rank", "cand_b_rank"]


def quiet(*_):
    pass


def candidate_table(groups: int = 40, per_group: int = 50, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = groups * per_group
    return pl.DataFrame({
        "user_id": np.repeat(np.arange(groups), per_group),
        "timestamp": [datetime(2024, 1, 1)] * n,
        "item_id": np.tile(np.arange(per_group), groups),
        "cand_a_rank": pl.Series(rng.integers(1, 100, n).astype(float)).scatter(rng.choice(n, n // 3, replace=False), None),
        "cand_b_rank": rng.integers(1, 100, n).astype(float),
        "label": (rng.random(n) < 0.1).astype(float),
    })


def test_negative_sampling_keeps_every_positive_within_the_budget_seeded():
    rows = candidate_table()
    kept = sample_negatives(rows, REQUEST_KEYS, RANKS, negatives=10, hard_share=0.5, seed=3)
    useful = rows.filter((pl.col("label") > 0).any().over(REQUEST_KEYS))
    assert kept.filter(pl.col("label") > 0).equals(useful.filter(pl.col("label") > 0))
    per_group = kept.filter(pl.col("label") == 0).group_by(REQUEST_KEYS).len()["len"]
    assert per_group.max() == 10
    # Seeded: the same rows twice, other rows for another seed, and the draw ignores row order.
    assert kept.equals(sample_negatives(rows, REQUEST_KEYS, RANKS, 10, 0.5, seed=3))
    assert not kept.equals(sample_negatives(rows, REQUEST_KEYS, RANKS, 10, 0.5, seed=4))
    shuffled = sample_negatives(rows.sample(fraction=1.0, shuffle=True, seed=1), REQUEST_KEYS, RANKS, 10, 0.5, seed=3)
    assert shuffled.sort(*REQUEST_KEYS, "item_id").equals(kept.sort(*REQUEST_KEYS, "item_id"))
    # The hard half is each group's five best-ranked negatives (smallest rank of any source, then item id).
    best = useful.filter(pl.col("label") == 0).with_columns(pl.min_horizontal(RANKS).fill_null(float("inf")).alias("best"))
    top5 = best.sort(*REQUEST_KEYS, "best", "item_id").group_by(REQUEST_KEYS, maintain_order=True).head(5)
    assert top5.select(*REQUEST_KEYS, "item_id").join(kept, on=[*REQUEST_KEYS, "item_id"], how="anti").height == 0


def test_zero_negatives_keeps_every_row_of_groups_with_a_positive():
    rows = candidate_table()
    kept = sample_negatives(rows, REQUEST_KEYS, RANKS, negatives=0, hard_share=0.5, seed=0)
    assert kept.equals(rows.filter((pl.col("label") > 0).any().over(REQUEST_KEYS)))


def test_capped_groups_keep_the_time_mix():
    weeks = 20
    rng = np.random.default_rng(0)
    # Busier weeks later: the cap must keep that shape, not the first weeks' requests.
    counts = np.arange(1, weeks + 1) * 50
    times = np.concatenate([np.datetime64("2024-01-01") + np.timedelta64(7 * w, "D") + rng.integers(0, 6 * 86400, c).astype("timedelta64[s]")
                            for w, c in enumerate(counts)])
    requests = pl.DataFrame({"user_id": np.arange(len(times)), "timestamp": times.astype("datetime64[us]")})
    capped = cap_groups(requests, 1000, seed=0)
    assert 1000 <= capped.height <= 1000 + weeks  # each week's share rounded up
    share = capped.group_by(pl.col("timestamp").dt.truncate("1w")).len().sort("timestamp")["len"].to_numpy()
    expected = counts * 1000 / counts.sum()
    assert np.all(np.abs(share - expected) <= 1)
    assert capped.equals(cap_groups(requests.reverse(), 1000, seed=0))
    assert cap_groups(requests, 0, seed=0).height == requests.height


@pytest.fixture(scope="module")
def small_budget():
    raw = feature_set().to_dict()
    raw["labels"].update(negatives_per_group=12, hard_negative_share=0.25)
    return FeatureSet.from_dict(raw)


def _requests(events, fs):
    labels = fs.labels
    requests = sample_requests(events.lazy(), labels["samples_per_user"], labels["min_history"], labels["seed"])
    train_requests, _, boundary = time_split(requests, labels["validation_fraction"])
    return train_requests, boundary


def test_chunked_rows_equal_the_whole_table_to_the_bit(small_budget, tmp_path):
    context = FeatureContext.from_frames(interactions(n_users=120), catalogue())
    events = context.events.collect()
    requests, boundary = _requests(events, small_budget)
    tables = []
    for size in (7, 50, requests.height):
        folder = tmp_path / str(size)
        folder.mkdir()
        parts = training_parts(requests, events, small_budget, context, None, boundary, folder, chunk_requests=size)
        assert len(parts) == -(-requests.height // size)
        tables.append(pl.concat([pl.read_parquet(p) for p in parts]))
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])
    # The whole-table path: every candidate's features, then the sample. Features of the kept rows
    # are the same whether or not the dropped rows were built: no feature depends on its neighbours.
    from recengine.learning.samples import future_items
    truth = future_items(requests, events.lazy(), until=boundary)
    whole = labelled_candidates(requests, truth, small_budget, context)
    ranks = [c for c in whole.columns if c.endswith("_rank") and c.startswith("cand_")]
    whole = sample_negatives(whole, REQUEST_KEYS, ranks, 12, 0.25, seed=0)
    # The parts hold the groups in time order (GROUP_ORDER), the whole table in the requests' order.
    assert tables[0].select(whole.columns).equals(whole.sort(*GROUP_ORDER, "item_id"))
    assert tables[0]["label"].sum() == whole["label"].sum() > 0


def test_validation_chunks_hold_about_the_rows_of_a_training_chunk(small_budget):
    # A validation group keeps every candidate (at least the largest source's k), a training group its
    # negatives' budget: validation chunks take fewer requests, so the two hold about as many rows.
    assert validation_chunk(2_000, FeatureSet.load("movielens")) == 2_000 * 100 // 200
    assert validation_chunk(9, small_budget) == 1  # 12 negatives against k = 40 and 60
    everything = FeatureSet.from_dict({**small_budget.to_dict(), "labels": {**small_budget.labels, "negatives_per_group": 0}})
    assert validation_chunk(2_000, everything) == 2_000  # no budget: training groups keep every candidate too


def test_validation_in_parts_equals_the_whole_table_and_its_metrics(small_budget):
    # Validation streams as training does: every candidate of each chunk of requests, a part each.
    # Read back, the parts are the whole table (in group order), and the metrics computed a part at a
    # time are the metrics of the whole table, to the bit.
    from recengine.learning.training import Split, catalogue_size, evaluate_split, interaction_splits

    data = Dataset(interactions(n_users=120).lazy(), catalogue().lazy())
    context = FeatureContext.from_frames(data.events, data.items)
    events = context.events.collect()
    train_split, val_split = interaction_splits(events, small_budget, context, chunk_requests=9)
    assert len(val_split.parts) == -(-val_split.requests // validation_chunk(9, small_budget)) > 3
    requests = val_split.rows.select(*REQUEST_KEYS).unique().sort(*GROUP_ORDER)
    whole = labelled_candidates(requests, val_split.truth, small_budget, context, GROUP_ORDER)
    assert val_split.rows.select(whole.columns).equals(whole)
    assert whole["label"].sum() > 0 and whole.height > 20 * requests.height  # every candidate, none sampled
    no_refit = FeatureSet.from_dict({**small_budget.to_dict(), "ranker": {**small_budget.ranker, "refit": False}})
    trained = train(data, no_refit, progress=False, say=quiet, chunk_requests=9)  # metrics of the model it returns
    keys, size = REQUEST_KEYS, catalogue_size(data, events)
    in_memory = Split(trained.validation.rows, trained.validation.truth, trained.validation.requests)
    assert evaluate_split(trained.model, in_memory, no_refit, context, keys, size) == (trained.metrics, trained.baselines)


def test_model_does_not_depend_on_the_chunk_size(small_budget):
    data = Dataset(interactions().lazy(), catalogue().lazy())
    one = train(data, small_budget, progress=False, say=quiet, chunk_requests=10_000)
    many = train(data, small_budget, progress=False, say=quiet, chunk_requests=37)
    assert len(many.train.parts) > 5
    assert one.model.booster.model_to_string() == many.model.booster.model_to_string()
    assert one.train.rows.equals(many.train.rows)


def test_budget_bounds_the_rows_and_keeps_the_ranker_useful(small_budget):
    data = Dataset(interactions().lazy(), catalogue().lazy())
    full = FeatureSet.from_dict({**feature_set().to_dict(), "labels": {**feature_set().labels, "negatives_per_group": 0}})
    everything = train(data, full, progress=False, say=quiet)
    sampled = train(data, small_budget, progress=False, say=quiet)
    positives = everything.train.rows["label"].sum()
    assert sampled.train.rows["label"].sum() == positives
    assert sampled.train.height <= positives + 12 * sampled.train.requests
    assert sampled.train.height < everything.train.height / 2
    # Validation is never sampled: both models are judged on the same, whole candidate lists.
    assert sampled.validation.rows.equals(everything.validation.rows)
    assert sampled.metrics["ndcg@10"] > sampled.baselines["popularity"]["ndcg@10"]


MEMORY_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import polars as pl
from recengine.parts.context import FeatureContext
from recengine.parts.featureset import FeatureSet
from recengine.learning.training import build_chunks, plan_chunks, training_parts
from recengine.learning.samples import sample_requests
from synthetic import catalogue, feature_set, interactions

def hwm_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024

def rss_mb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024

raw = feature_set().to_dict()
raw["candidates"]["popular"]["k"] = 400
raw["labels"].update(negatives_per_group=0)  # every candidate: the chunk alone bounds the rows
fs = FeatureSet.from_dict(raw)
context = FeatureContext.from_frames(interactions(n_users=400, n_items=600, per_user=40), catalogue(600))
events = context.events.collect()
requests = sample_requests(events.lazy(), 3, 5, 0)
out = {{}}
for name, size in (("warm-up", 50), ("chunked", 50), ("whole", requests.height)):
    folder = Path(sys.argv[1]) / name
    folder.mkdir()
    base = rss_mb()
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
    training_parts(requests, events, fs, context, None, None, folder, chunk_requests=size)
    out[name] = hwm_mb() - base
for name, size in (("validation chunked", 50), ("validation whole", requests.height)):  # every candidate, labelled
    folder = Path(sys.argv[1]) / name
    folder.mkdir()
    base = rss_mb()
    open("/proc/self/clear_refs", "w").write("5")
    build_chunks(plan_chunks(requests, folder, size, "validation", validation=True), (events, fs, context, None, None))
    out[name] = hwm_mb() - base
print(json.dumps(out))
"""


def test_peak_memory_follows_the_chunk_not_the_table(tmp_path):
    # Training's parts and validation's alike.
    script = MEMORY_SCRIPT.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    # The whole table (1,200 requests x ~400 candidates) needs far more than 50 requests at a time.
    assert peaks["chunked"] < 120, peaks
    assert peaks["whole"] > 2.5 * peaks["chunked"], peaks
    assert peaks["validation chunked"] < 120 and peaks["validation whole"] > 2.5 * peaks["validation chunked"], peaks


def test_covisitation_source_in_small_join_batches_proposes_the_same(monkeypatch):
    # Training requests come before the last pair, so the source joins their seeds with the dated
    # pairs; in batches of a few hundred joined rows (many batches) it must give the one-batch answer.
    from recengine.features import covisitation
    from recengine.parts.candidates import generate

    context = FeatureContext.from_frames(interactions(n_users=120), catalogue())
    events = context.events.collect()
    requests = sample_requests(events.lazy(), 3, 5, 0)
    fs = FeatureSet.from_dict({"candidates": {"covisitation": {"k": 30, "window": 10, "recent": 10}}})
    whole = generate(requests, fs.build_sources(), context)
    monkeypatch.setattr(covisitation, "JOIN_ROWS", 300)
    batched = generate(requests, fs.build_sources(), context)
    assert whole.height > 1000 and batched.equals(whole)


def test_covisitation_source_as_of_shared_times_proposes_what_the_join_does(monkeypatch):
    # Snapshot requests: many users at a few times. The source grows the pair totals time after time
    # instead of joining each seed with its item's pairs: the same candidates and scores.
    from recengine.features import covisitation
    from recengine.parts.candidates import generate

    context = FeatureContext.from_frames(interactions(n_users=200), catalogue())
    events = context.events.collect()
    first, last = events["timestamp"].min(), events["timestamp"].max()
    times = pl.DataFrame({"timestamp": [first + (last - first) * f for f in (0.3, 0.5, 0.7, 0.9)]})
    users = events.select("user_id").unique().sort("user_id")
    requests = users.join(times.cast({"timestamp": events["timestamp"].dtype}), how="cross").sort("timestamp", "user_id")
    fs = FeatureSet.from_dict({"candidates": {"covisitation": {"k": 30, "window": 10, "recent": 10}}})
    assert requests["timestamp"].n_unique() * covisitation.SHARED_TIME < requests.height
    shared = generate(requests, fs.build_sources(), context)
    monkeypatch.setattr(covisitation, "PAIR_ROWS", 500)  # the totals grown from many small blocks of pairs
    assert generate(requests, fs.build_sources(), FeatureContext.from_frames(context.events, context.items)).equals(shared)
    # Scores in blocks of a few requests, lower terms for groups of a few more, products of a few
    # stored pairs at a time: the same candidates and scores.
    items = context.items.collect().height
    monkeypatch.setattr(covisitation, "SCORE_CELLS", 7 * items)
    monkeypatch.setattr(covisitation, "LOWER_CELLS", 17 * items)
    monkeypatch.setattr(covisitation, "PRODUCT_PAIRS", 50)
    for threads in (1, 3):  # each thread writes its own rows: the same whatever their number and timing
        monkeypatch.setattr(covisitation, "THREADS", threads)
        assert generate(requests, fs.build_sources(), FeatureContext.from_frames(context.events, context.items)).equals(shared)
    monkeypatch.setattr(covisitation, "SHARED_TIME", 10**9)  # the join, whatever the times
    joined = generate(requests, fs.build_sources(), context)
    assert shared.height > 1000 and shared.equals(joined)


@pytest.mark.parametrize("directed", [False, True])
def test_covisitation_features_as_of_shared_times_equal_the_running_counts(monkeypatch, directed):
    # Snapshot requests (many users at a few times) read each (seed, candidate) count from the pair
    # totals as of each time instead of the running counts of every dated pair: the same features.
    from recengine.features import covisitation
    from recengine.features.covisitation import Covisitation
    from recengine.parts.context import compute_features

    context = FeatureContext.from_frames(interactions(n_users=200), catalogue())
    events = context.events.collect()
    first, last = events["timestamp"].min(), events["timestamp"].max()
    times = pl.DataFrame({"timestamp": [first + (last - first) * f for f in (0.3, 0.6, 0.9, 1.1)]})
    users = events.select("user_id").unique().sort("user_id")
    items = events.select("item_id").unique().sort("item_id").head(25)
    requests = users.join(times.cast({"timestamp": events["timestamp"].dtype}), how="cross").join(items, how="cross")
    extractor = [Covisitation(window=4, recent=6, directed=directed)]
    assert times.height * covisitation.SHARED_TIME < users.height * times.height
    shared = compute_features(requests, extractor, context).sort("user_id", "timestamp", "item_id")
    monkeypatch.setattr(covisitation, "SHARED_TIME", 10**9)  # the running counts, whatever the times
    running = compute_features(requests, extractor, FeatureContext.from_frames(context.events, context.items))
    assert shared["covis_w4_r6_sum" if not directed else "covis_next_w4_r6_sum"].sum() > 0
    assert shared.equals(running.sort("user_id", "timestamp", "item_id"))


def test_a_small_last_chunk_steps_the_covisitation_totals_instead_of_building_every_dated_pair():
    # Chunks go in time order, and the last one may hold a request or two (5M events: 2 of 10,002
    # validation requests). Those must step the totals kept from the chunk before, not build the
    # dated pair table (events x 2 x window rows, kept for the run): at 5M events that took 18 GB.
    from recengine.parts.candidates import generate
    from recengine.parts.context import compute_features

    context = FeatureContext.from_frames(interactions(n_users=200), catalogue())
    events = context.events.collect()
    first, last = events["timestamp"].min(), events["timestamp"].max()
    users = events.select("user_id").unique().sort("user_id")
    at = lambda f: pl.DataFrame({"timestamp": [first + (last - first) * f]}).cast({"timestamp": events["timestamp"].dtype})
    big = users.join(at(0.5), how="cross")
    small = users.head(3).join(at(0.8), how="cross")
    fs = FeatureSet.from_dict({"candidates": {"covisitation": {"k": 30, "window": 10, "recent": 10}},
                               "features": {"covisitation": {"window": 10, "recent": 10}}})

    def rows(requests, ctx):
        return compute_features(generate(requests, fs.build_sources(), ctx), fs.build_extractors(), ctx)

    rows(big, context)
    stepped = rows(small, context)
    assert not [key for key in context._memo if isinstance(key, tuple) and key[0] in ("covis_pairs", "covis_counts")]
    fresh = FeatureContext.from_frames(context.events, context.items)  # no totals kept: the dated pairs' way
    assert stepped.height > 0 and stepped.equals(rows(small, fresh))
    assert [key for key in fresh._memo if isinstance(key, tuple) and key[0] == "covis_pairs"]
