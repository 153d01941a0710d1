"""Training end to end on logs with a known truth: real LightGBM, real features, no mocks."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from recengine.core.data import Dataset
from recengine.parts.context import FeatureContext
from recengine.learning.model import load_model
from recengine.learning.samples import sample_requests
from recengine.learning.training import train

from synthetic import catalogue, feature_set, impressions, interactions


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def trained():
    return train(Dataset(interactions().lazy(), catalogue().lazy()), feature_set(), progress=False, say=quiet)


def test_ranker_beats_popularity_and_each_source_where_the_truth_is_known(trained):
    ndcg = trained.metrics["ndcg@10"]
    assert ndcg > trained.baselines["popularity"]["ndcg@10"] + 0.1
    for name in ("source_popular", "source_covisitation"):
        assert ndcg > trained.baselines[name]["ndcg@10"], name
    # What the ranker learnt is the planted taste: category affinity carries the most gain.
    assert trained.importance["feature"][0].startswith("affinity_genres")


def test_training_is_seeded_and_repeatable(trained):
    again = train(Dataset(interactions().lazy(), catalogue().lazy()), feature_set(), progress=False, say=quiet)
    assert again.model.booster.model_to_string() == trained.model.booster.model_to_string()
    assert again.metrics == pytest.approx(trained.metrics, rel=1e-12)


def test_training_labels_stop_at_the_validation_boundary():
    # After the boundary every user takes item 999; a training row labelling it positive would have
    # learnt from the validation period.
    events = interactions()
    late = events["timestamp"].max() + timedelta(days=1)
    extra = events.select("user_id").unique().with_columns(
        pl.lit(999, pl.Int64).alias("item_id"), pl.lit(late).alias("timestamp"), pl.lit(5.0).alias("value"))
    items = pl.concat([catalogue(), pl.DataFrame({"item_id": [999], "title": ["x"], "genres": ["g0"], "year": [2000], "price": [9.99]})])
    events = pl.concat([events, extra.select(events.columns)])
    result = train(Dataset(events.lazy(), items.lazy()), feature_set(), progress=False, say=quiet)
    leaked = result.train.rows.filter((pl.col("item_id") == 999) & (pl.col("label") > 0))
    assert leaked.height == 0
    assert result.validation.truth.filter(pl.col("item_id") == 999).height > 0



def test_requests_are_drawn_per_user_after_min_history_one_per_burst_second():
    # User 1 has 20 distinct times; user 2 has 7, one of them a burst of two events in one second.
    t0 = datetime(2024, 1, 1)
    rows = [(1, i, t0 + timedelta(hours=i)) for i in range(20)] + [(2, i, t0 + timedelta(hours=i)) for i in range(7)]
    events = pl.DataFrame(rows + [(2, 99, t0 + timedelta(hours=6))], schema=["user_id", "item_id", "timestamp"], orient="row")
    drawn = sample_requests(events.lazy(), per_user=3, min_history=5, seed=3)
    assert drawn.group_by("user_id").len().sort("user_id")["len"].to_list() == [3, 2]  # user 2: hours 5 and 6 only
    assert (drawn["timestamp"] >= t0 + timedelta(hours=5)).all() and drawn.n_unique() == drawn.height
    assert drawn.equals(sample_requests(events.lazy(), per_user=3, min_history=5, seed=3))

def test_saved_model_is_text_and_json_and_scores_the_same(trained, tmp_path):
    folder = trained.model.save(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["model.txt", "spec.json"]
    loaded = load_model(folder)
    rows = trained.validation.rows
    assert np.array_equal(loaded.score(rows), trained.model.score(rows))
    spec = loaded.spec
    assert spec["features"] == trained.model.features and spec["best_iteration"] >= 1
    assert {p["name"] for p in spec["parts"]} >= {"popular", "covisitation", "category_affinity"}
    assert spec["trained_on"]["events"] == interactions().height


def test_recommend_excludes_seen_items_and_ranks_by_score(trained):
    events = interactions()
    at = events["timestamp"].max() + timedelta(hours=1)
    requests = pl.DataFrame({"user_id": [0, 1, 424242], "timestamp": [at] * 3})
    out = trained.model.recommend(requests, FeatureContext.from_frames(events, catalogue()), k=5)
    assert out.columns == ["user_id", "timestamp", "item_id", "rank", "score"]
    seen = events.filter(pl.col("user_id").is_in([0, 1])).select("user_id", "item_id")
    assert out.join(seen, on=["user_id", "item_id"]).height == 0
    for user in (0, 1):
        mine = out.filter(pl.col("user_id") == user)
        assert mine["rank"].to_list() == [1, 2, 3, 4, 5]
        assert mine["score"].is_sorted(descending=True)
    # An unknown user still gets the popular items.
    assert out.filter(pl.col("user_id") == 424242).height == 5


def test_impression_logs_train_on_logged_groups_with_graded_labels():
    result = train(Dataset(impressions().lazy(), catalogue().lazy()), feature_set(), progress=False, say=quiet)
    assert result.model.spec["group_keys"] == ["request_id"]
    assert set(result.train.rows["label"].unique().to_list()) == {0.0, 1.0, 2.0}
    assert result.metrics["ndcg@10"] > result.baselines["popularity"]["ndcg@10"] + 0.1


def test_ctr_reads_impressions_before_t_only():
    from recengine.parts.context import compute_features
    from recengine.features.popularity import ItemCTR

    shown = impressions(n_users=20)
    at = shown["timestamp"].sort()[shown.height // 2]
    requests = pl.DataFrame({"user_id": [0, 1], "item_id": [3, 4], "timestamp": [at, at]})
    before = compute_features(requests, [ItemCTR()], FeatureContext.from_frames(shown.filter(pl.col("timestamp") < at)))
    full = compute_features(requests, [ItemCTR()], FeatureContext.from_frames(shown))
    assert before.equals(full)
    assert before["item_impressions"].to_list() == [
        shown.filter((pl.col("item_id") == i) & (pl.col("timestamp") < at)).height for i in (3, 4)
    ]


def test_too_little_history_says_what_to_change():
    from recengine.errors import DataError

    events = interactions(n_users=3, per_user=4)
    with pytest.raises(DataError, match="min_history"):
        train(Dataset(events.lazy(), catalogue().lazy()), feature_set(), progress=False, say=quiet)


def test_refit_trains_on_both_splits_for_proportionally_more_rounds(trained):
    spec = trained.model.spec
    rows = [s.rows.filter((pl.col("label") > 0).any().over("user_id", "timestamp")).height for s in (trained.train, trained.validation)]
    assert spec["best_iteration"] == round(spec["early_stopped_at"] * (rows[0] + rows[1]) / rows[0])
    assert trained.model.booster.current_iteration() == spec["best_iteration"]
    assert spec["metrics_measured"] == "on validation, before the refit"

    fs = feature_set()
    fs.ranker["refit"] = False
    alone = train(Dataset(interactions().lazy(), catalogue().lazy()), fs, progress=False, say=quiet)
    assert alone.model.spec["best_iteration"] == alone.model.spec["early_stopped_at"] == spec["early_stopped_at"]
    # The validation metrics describe the early-stopped model in both cases.
    assert alone.metrics == pytest.approx(trained.metrics, rel=1e-12)
