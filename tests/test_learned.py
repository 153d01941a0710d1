"""Learned parts (EASE): fit on a window before the ranker's requests, never on later events;
their state saved with the model as digested arrays and read back to the same scores."""

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from recengine.parts.candidates import generate
from recengine.core.data import Dataset
from recengine.errors import ConfigError
from recengine.parts.context import FeatureContext, compute_features, fit_learned
from recengine.parts.featureset import FeatureSet
from recengine.learning.model import RankerModel
from recengine.learning.training import train

from synthetic import assert_learned_state_round_trips, catalogue, interactions

EASE = {"l2": 50.0, "max_items": 100, "history": 20}


def feature_set() -> FeatureSet:
    return FeatureSet.from_dict({
        "name": "learned",
        "candidates": {"popular": {"k": 30}, "ease": {"k": 30, **EASE}},
        "features": {"ease": EASE, "item_popularity": {"windows_days": [7]}},
        "labels": {"samples_per_user": 2, "learned_fraction": 0.5},
        "ranker": {"num_boost_round": 30, "early_stopping_rounds": 10, "min_data_in_leaf": 10},
    })


def ease_columns(events: pl.DataFrame, requests: pl.DataFrame, boundary) -> pl.DataFrame:
    fs = feature_set()
    context = FeatureContext.from_frames(events, catalogue().lazy())
    fit_learned([*fs.build_sources(), *fs.build_extractors()], context, boundary)
    rows = generate(requests, fs.build_sources(), context, exclude_seen=False)
    rows = compute_features(rows, fs.build_extractors(), context)
    return rows.select("user_id", "timestamp", "item_id", "cand_ease_score", "cand_ease_rank", "ease_score", "ease_rank").sort(
        "user_id", "timestamp", "item_id")


def test_an_event_at_or_after_the_boundary_changes_no_learned_feature():
    events = Dataset(interactions(n_users=80).lazy()).events.collect()
    boundary = events["timestamp"].quantile(0.5, interpolation="lower")
    requests = events.filter(pl.col("timestamp") >= boundary).group_by("user_id").agg(pl.col("timestamp").min()).sort("user_id")
    # New users taking pairs of items together: after every request, so no request's history holds them.
    # They can only reach a request's features through the learned model: only if it learnt after the boundary.
    pairs = [(10_000 + u, item, t) for u in range(40) for item in (u % 12, 60 + u % 12)
             for t in [events["timestamp"].max() + timedelta(days=1)]]
    late = pl.DataFrame(pairs, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("ms")}, orient="row")
    late = late.with_columns(pl.lit(5.0).alias("value"))
    before = ease_columns(events, requests, boundary)
    assert before["ease_score"].drop_nulls().len() > 0 and before["cand_ease_score"].drop_nulls().len() > 0
    with_late = ease_columns(pl.concat([events, late]), requests, boundary)
    assert before.equals(with_late)
    # The same events before the boundary do reach the model: the test can see a leak.
    early = late.with_columns(pl.lit(events["timestamp"].min() - timedelta(days=1)).cast(pl.Datetime("ms")).alias("timestamp"))
    assert not before.equals(ease_columns(pl.concat([events, early]), requests, boundary))


def test_a_part_missing_from_a_fitted_context_is_fit_at_its_boundary_which_stays_put():
    """A learned part the context holds no state for is fit on demand, at the boundary the others were
    fit at: not on every event (a leak for requests after the boundary), and without moving it."""
    from recengine.parts.context import learned_state

    events = Dataset(interactions(n_users=80).lazy()).events.collect()
    boundary = events["timestamp"].quantile(0.5, interpolation="lower")
    source, extractor = feature_set().build_sources()[1], feature_set().build_extractors()[0]
    context = FeatureContext.from_frames(events, catalogue().lazy())
    fit_learned([source], context, boundary)
    state, until = learned_state(context, extractor)
    assert until == boundary == context.learned_until
    alone = FeatureContext.from_frames(events, catalogue().lazy())
    fit_learned([extractor], alone, boundary)
    assert all(np.array_equal(state[name], alone.learned[extractor.key][name]) for name in state)


def test_the_rankers_requests_come_after_the_learned_window_and_the_model_carries_its_state():
    events, items = interactions(n_users=80), catalogue()
    result = train(Dataset(events.lazy(), items.lazy()), feature_set(), progress=False, say=lambda _: None)
    boundary = Dataset(events.lazy()).events.collect()["timestamp"].quantile(0.5, interpolation="lower")
    assert result.train.rows["timestamp"].min() >= boundary
    assert result.validation.rows["timestamp"].min() >= boundary
    assert result.train.rows["ease_score"].drop_nulls().len() > 0
    model = result.model
    assert set(model.learned) == {"candidates.ease", "features.ease"}
    assert model.spec["learned_until"] > str(events["timestamp"].max())[:10]


def test_saved_state_reloads_to_identical_scores_and_a_damaged_one_is_refused(tmp_path):
    events, items = interactions(n_users=80), catalogue()
    model = train(Dataset(events.lazy(), items.lazy()), feature_set(), progress=False, say=lambda _: None).model
    folder = model.save(tmp_path / "model")
    assert_learned_state_round_trips(model, folder, events, items, items["item_id"].to_list()[:60], (0, 3, 40))
    npz = folder / "learned" / "features.ease.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="sha256"):
        RankerModel.load(folder)
