"""Snapshot training requests ([labels] design = "snapshots"): as of time s, what each user takes next."""

from datetime import timedelta

import polars as pl
import pytest

from recengine.core.data import Dataset
from recengine.errors import ConfigError
from recengine.learning.samples import snapshot_requests
from recengine.learning.training import train
from recengine.parts.context import FeatureContext
from recengine.parts.featureset import FeatureSet

from synthetic import catalogue, feature_set, interactions


def snapshot_set(every: float = 7, horizon: float = 7) -> FeatureSet:
    raw = feature_set().to_dict()
    raw["labels"].update(design="snapshots", snapshot_every_days=every, horizon_days=horizon)
    return FeatureSet.from_dict(raw)


@pytest.fixture(scope="module")
def events():
    return FeatureContext.from_frames(interactions(), catalogue()).events.collect()


def test_snapshots_are_on_the_schedule_with_history_before_and_an_event_within_the_horizon(events):
    # The synthetic users are active for 30 hours each: snapshots every 6 hours, a 12-hour horizon.
    requests = snapshot_requests(events.lazy(), every_days=0.25, horizon_days=0.5, min_history=5)
    first = events["timestamp"].min()
    times = requests["timestamp"].unique().sort()
    assert times.len() > 10
    assert all((t - first) % timedelta(hours=6) == timedelta(0) for t in times)
    for user, at in requests.sample(50, seed=0).iter_rows():
        mine = events.filter(pl.col("user_id") == user)["timestamp"]
        assert (mine < at).sum() >= 5
        assert ((mine >= at) & (mine < at + timedelta(hours=12))).sum() >= 1
    # Every user who qualifies at a snapshot is there: the same count from the events directly.
    at = times[len(times) // 2]
    before = events.filter(pl.col("timestamp") < at).group_by("user_id").len().filter(pl.col("len") >= 5)
    active = events.filter((pl.col("timestamp") >= at) & (pl.col("timestamp") < at + timedelta(hours=12)))
    expected = before.join(active.select("user_id").unique(), on="user_id")
    assert requests.filter(pl.col("timestamp") == at).height == expected.height


def test_snapshot_positives_stay_within_the_horizon_and_before_the_boundary(events):
    result = train(Dataset(events.lazy(), catalogue().lazy()), snapshot_set(every=0.25, horizon=0.25), progress=False,
                   say=lambda *_: None)
    rows = result.train.rows
    positives = rows.filter(pl.col("label") > 0).join(
        events.select("user_id", "item_id", pl.col("timestamp").alias("at")), on=["user_id", "item_id"])
    # Each positive was taken in [request, request + horizon): the earliest such event is in it.
    first_take = positives.filter(pl.col("at") >= pl.col("timestamp")).group_by("user_id", "timestamp", "item_id").agg(
        pl.col("at").min())
    assert first_take.height == rows.filter(pl.col("label") > 0).height
    assert (first_take["at"] < first_take["timestamp"] + timedelta(hours=6)).all()
    assert rows["timestamp"].max() < result.validation.rows["timestamp"].min()
    # Items taken at or after the horizon only are negatives.
    later = rows.filter(pl.col("label") == 0).join(
        events.select("user_id", "item_id", pl.col("timestamp").alias("at")), on=["user_id", "item_id"])
    assert later.filter((pl.col("at") >= pl.col("timestamp")) & (pl.col("at") < pl.col("timestamp") + timedelta(hours=6))).height == 0


def test_no_feature_of_a_snapshot_request_comes_from_events_at_or_after_it(events):
    # The rows of one snapshot built from every event equal those built from the events before it.
    fs = snapshot_set(0.25, 0.5)
    requests = snapshot_requests(events.lazy(), 0.25, 0.5, 5)
    at = requests.group_by("timestamp").len().sort("len", "timestamp", descending=[True, False])["timestamp"][0]
    chosen = requests.filter(pl.col("timestamp") == at)
    past = events.filter(pl.col("timestamp") < at)
    full = fs.candidate_rows(chosen, FeatureContext.from_frames(events, catalogue()))
    only_past = fs.candidate_rows(chosen, FeatureContext.from_frames(past, catalogue()))
    assert chosen.height >= 2 and full.height > 50 and full.equals(only_past)


def test_an_unknown_design_is_refused():
    raw = feature_set().to_dict()
    raw["labels"]["design"] = "every_event"
    with pytest.raises(ConfigError, match="design = 'every_event'; give one of"):
        FeatureSet.from_dict(raw)
