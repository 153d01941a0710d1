"""A third party's user-item extractor, written in one file as a plugin author would: with its own
serving path it is served per request from its prepared tables, never through the batch pipeline,
and it passes the same contract check as the built-ins."""

from __future__ import annotations

import sys

import numpy as np
import polars as pl
import pytest

import recengine
from recengine import Ranker
from recengine.parts import plugins
from recengine.core.data import Dataset
from recengine.parts.featureset import FeatureSet
from recengine.core.pit import recent_history
from recengine.parts.contract import check_extractor
from recengine.learning.training import train

from synthetic import catalogue, interactions


class YearGap:
    """How many years the item lies from the user's latest item (a user-item feature)."""

    columns = ["year_gap_latest"]
    history_depth = 1  # serve reads the user's latest event

    def transform(self, requests, context):
        years = context.items.select("item_id", pl.col("year").cast(pl.Float64))
        keys = requests.select("_row", "user_id", "item_id", "timestamp")
        latest = recent_history(keys.select("user_id", "timestamp").unique(), context.events, 1).select(
            "user_id", "timestamp", "h_item").join(years.rename({"item_id": "h_item", "year": "_latest"}), on="h_item")
        joined = keys.join(years, on="item_id", how="left").join(latest, on=["user_id", "timestamp"], how="left")
        return joined.select("_row", (pl.col("year") - pl.col("_latest")).abs().alias("year_gap_latest"))

    def prepare(self, snapshot):
        years = snapshot.context.items.select("item_id", pl.col("year").cast(pl.Float64)).collect()
        table = np.full(snapshot.size + 1, np.nan)  # the last slot: items the state does not know
        table[snapshot.index(years["item_id"])] = years["year"].to_numpy()
        return {"years": table, "histories": snapshot.histories}

    def serve(self, tables, user, idx):
        history = tables["histories"].get(user)
        latest = tables["years"][history["item"][0]] if history is not None else np.nan
        return {"year_gap_latest": np.abs(tables["years"][idx] - latest)}


@recengine.hookimpl
def register_feature_extractors(register):
    register("year_gap", YearGap, "Years between the item and the user's latest item.")


@pytest.fixture
def registered():
    plugins.load_plugins()
    plugins.pm.register(sys.modules[__name__], name="test-year-gap")
    yield
    plugins.pm.unregister(sys.modules[__name__])


def test_the_plugin_part_passes_the_contract_check():
    check_extractor(YearGap)


def test_the_plugin_part_is_served_per_request_without_the_batch_pipeline(registered, tmp_path, monkeypatch):
    feature_set = FeatureSet.from_dict({
        "name": "with-plugin", "candidates": {"popular": {"k": 30}},
        "features": {"year_gap": {}, "item_popularity": {"windows_days": [7]}},
        "labels": {"samples_per_user": 2}, "ranker": {"num_boost_round": 20, "early_stopping_rounds": 5, "min_data_in_leaf": 10},
    })
    events, items = interactions(n_users=60), catalogue()
    model = train(Dataset(events.lazy(), items.lazy()), feature_set, progress=False, say=lambda _: None).model
    ranker = Ranker.load(model.save(tmp_path / "model"), events, items)

    import recengine.running.serving as serving

    calls = []
    monkeypatch.setattr(serving, "compute_features", lambda *a, **k: calls.append(a) or pytest.fail("batch pipeline called"))
    candidates = items["item_id"].to_list()[:50]
    for user in (0, 5, 59, 12345):
        assert len(ranker.rank(user, candidates)) == len(candidates)
    assert not calls
    state = ranker._state
    column = state.features.index("year_gap_latest")
    served = state.feature_matrix(5, candidates)[:, column]
    rows = pl.DataFrame({"user_id": [5] * len(candidates), "item_id": candidates, "timestamp": [state.at] * len(candidates)})
    monkeypatch.undo()
    batch = model.feature_set().given_rows(rows, ["user_id", "timestamp"], state.context)["year_gap_latest"].to_numpy()
    assert np.array_equal(served, batch, equal_nan=True)
