"""`Ranker`: the serving path against the batch pipeline, loading, unknowns, threads, no torch."""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from recengine import Ranker
from recengine.core.data import Dataset
from recengine.parts.encoders import EmbeddingCache
from recengine.errors import ConfigError
from recengine.learning.model import spec_digest
from recengine.parts.featureset import FeatureSet
from recengine.learning.training import train

from conftest import DEVICE
from synthetic import catalogue, interactions


def full_feature_set(tiny_bert) -> FeatureSet:
    """Every built-in source and extractor, so every serving path is exercised."""
    encoder = {"encoder": "transformers", "encoder_params": {"model": str(tiny_bert), "device": DEVICE}}
    return FeatureSet.from_dict({
        "name": "everything",
        "candidates": {
            "popular": {"k": 30, "half_life_days": 30},
            "covisitation": {"k": 40, "window": 3, "recent": 5},
            "embedding": {"k": 30, "field": "title", "history": 20, **encoder},
        },
        "features": {
            "item_popularity": {"windows_days": [7, 30], "half_lives_days": [14]},
            "item_trend": {}, "item_age": {}, "item_value": {}, "item_ctr": {}, "user_activity": {},
            "category_affinity": {"field": "genres"},
            "covisitation": {"window": 3, "recent": 5},
            "covis_next": {"extractor": "covisitation", "window": 2, "recent": 4, "directed": True},
            "item_attribute": {"fields": ["year", "price"], "recent": 4},
            "interest": {"fields": ["title", "genres"], "recent": 3, "history": 10, "half_life_days": 30, **encoder},
        },
        "labels": {"samples_per_user": 2, "min_history": 5},
        "ranker": {"num_boost_round": 40, "early_stopping_rounds": 10, "min_data_in_leaf": 20},
    })


@pytest.fixture(scope="module")
def served(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    cache = EmbeddingCache(folder / "cache")
    events, items = interactions(n_users=80), catalogue()
    result = train(Dataset(events.lazy(), items.lazy()), full_feature_set(tiny_bert), cache=cache, progress=False, say=lambda _: None)
    model_dir = result.model.save(folder / "model")
    return Ranker.load(model_dir, events, items, cache=cache), events, items, folder


def batch_features(ranker, user, candidates, at):
    rows = pl.DataFrame({"user_id": [user] * len(candidates), "item_id": candidates, "timestamp": [at] * len(candidates)})
    rows = rows.with_columns(pl.col("item_id").cast(pl.Int64), pl.col("user_id").cast(pl.Int64))
    scored = ranker.model.feature_set().given_rows(rows, ["user_id", "timestamp"], ranker._state.context)
    return scored.select(pl.col(ranker.model.features).cast(pl.Float64)).to_numpy()


def test_serving_features_equal_the_batch_pipeline(served):
    ranker, events, items, _ = served
    rng = np.random.default_rng(3)
    candidates = [int(i) for i in rng.choice(items["item_id"].to_numpy(), 40, replace=False)] + [10_000, 10_001]
    for user in (0, 7, 31, 5_000):  # known users, and one nobody has seen
        fast = ranker._state.feature_matrix(user, candidates)
        batch = batch_features(ranker, user, candidates, ranker.at)
        for j, name in enumerate(ranker.model.features):
            np.testing.assert_allclose(fast[:, j], batch[:, j], rtol=1e-5, atol=1e-6, err_msg=f"user {user}: {name}")


def test_batch_users_computed_once_per_item_read_the_same_features(served):
    # A batch user with many rows (here: more than the catalogue has items) is computed once per item,
    # then read per row (interest similarities for many such users in one product); a light user row by row.
    ranker, events, items, _ = served
    state, rng = ranker._state, np.random.default_rng(4)
    catalogue = items["item_id"].to_numpy()
    heavy = {u: np.append(rng.choice(catalogue, len(catalogue) + 30), [10_000, 10_001]) for u in (0, 7, 5_000)}
    light = {31: rng.choice(catalogue, 10)}
    users = [u for u, its in {**heavy, **light}.items() for _ in its]
    item_ids = np.concatenate([*heavy.values(), *light.values()])
    assert all(state._whole(len(its)) for its in heavy.values()) and not state._whole(10)
    rows = state.feature_rows(pl.Series(users), pl.Series(item_ids))
    start = 0
    for user, its in {**heavy, **light}.items():
        expected = state.feature_matrix(user, its.tolist())
        np.testing.assert_allclose(rows[start:start + len(its)], expected, rtol=1e-5, atol=1e-6, err_msg=f"user {user}")
        start += len(its)


def test_rank_orders_by_score_and_handles_unknowns_and_empty(served):
    ranker, events, items, _ = served
    ranked = ranker.rank(3, [1, 2, 3, 4, 10_000])
    assert sorted(i for i, _ in ranked) == [1, 2, 3, 4, 10_000]
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))
    assert len(ranker.rank(987_654, [1, 2, 3])) == 3  # unknown user
    assert ranker.rank(3, []) == []


def test_an_explicit_time_is_ranked_exactly_by_the_batch_pipeline(served):
    ranker, events, items, _ = served
    at = events["timestamp"].sort()[events.height // 2]
    candidates = [5, 11, 17, 23, 29]
    expected = ranker.model.score(pl.DataFrame(batch_features(ranker, 5, candidates, at), schema=ranker.model.features, orient="row"))
    got = dict(ranker.rank(5, candidates, at=at))
    assert np.allclose([got[i] for i in candidates], expected)


def test_concurrent_calls_match_sequential_calls(served):
    ranker, events, items, _ = served
    rng = np.random.default_rng(5)
    requests = [(int(u), [int(i) for i in rng.choice(120, 30, replace=False)]) for u in rng.integers(0, 90, 200)]
    sequential = [ranker.rank(*r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda r: ranker.rank(*r), requests))
    assert concurrent == sequential


def test_append_moves_the_state_forward_without_reloading(served, tiny_bert):
    ranker, events, items, folder = served
    fresh = Ranker.load(folder / "model", events, items, cache=EmbeddingCache(folder / "cache"))
    before = fresh.at
    new = pl.DataFrame({"user_id": [2, 2], "item_id": [7, 13], "timestamp": [before, before + timedelta(minutes=5)], "value": [4.0, 5.0]})
    fresh.append(new.with_columns(pl.col("timestamp").cast(events["timestamp"].dtype)))
    assert fresh.at > before
    candidates = [1, 19, 25, 31]
    np.testing.assert_allclose(fresh._state.feature_matrix(2, candidates), batch_features(fresh, 2, candidates, fresh.at),
                               rtol=1e-5, atol=1e-6)


def test_load_from_an_mlflow_uri_and_refuse_a_missing_plugin(served, tmp_path, monkeypatch):
    from recengine.learning.model import RankerModel
    from recengine.interfaces.tracking import log_training

    ranker, events, items, folder = served
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = RankerModel.load(folder / "model")
    from recengine.learning.training import TrainResult

    result = TrainResult(model, {"ndcg@10": 0.5}, {}, {}, pl.DataFrame({"feature": model.features, "gain": [0.0] * len(model.features)}),
                         {"dataset": "synthetic", "digest": "x"})
    log_training(result, model.feature_set(), "serving", "served-ranker")
    loaded = Ranker.load("models:/served-ranker@champion", events, items, cache=EmbeddingCache(folder / "cache"))
    assert loaded.rank(3, [1, 2, 3]) == ranker.rank(3, [1, 2, 3])

    broken = tmp_path / "broken"
    shutil.copytree(folder / "model", broken)
    spec = json.loads((broken / "spec.json").read_text())
    spec["parts"].append({"kind": "encoders", "name": "clip", "plugin": "recengine-clip", "version": "2.0"})
    spec["spec_sha256"] = spec_digest(spec)  # a consistent edit: only the plugin check may refuse it
    (broken / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="recengine-clip"):
        Ranker.load(broken, events, items)


def test_ranking_with_cached_embeddings_never_imports_torch(served, tmp_path):
    _, events, items, folder = served
    events.write_parquet(tmp_path / "events.parquet")
    items.write_parquet(tmp_path / "items.parquet")
    code = f"""
import sys, polars as pl
from recengine import Ranker
from recengine.parts.encoders import EmbeddingCache
r = Ranker.load({str(folder / 'model')!r}, pl.read_parquet({str(tmp_path / 'events.parquet')!r}),
                pl.read_parquet({str(tmp_path / 'items.parquet')!r}), cache=EmbeddingCache({str(folder / 'cache')!r}))
assert len(r.rank(3, [1, 2, 3, 4])) == 4
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ids_of_another_type_are_cast_when_lossless_and_refused_otherwise(served):
    from recengine.errors import DataError

    ranker, events, items, _ = served
    user, candidates = 7, [int(i) for i in items["item_id"].head(5)]
    expected = ranker.rank(user, candidates)
    assert ranker.rank("7", [str(i) for i in candidates]) == expected  # was: an unknown user and unknown items
    assert ranker.rank(7.0, [np.int64(i) for i in candidates]) == expected
    assert ranker.rank(user, candidates, at=ranker.at.isoformat()) == expected  # an ISO time is a time
    for bad_user, bad_items, named in [("7x", candidates, "user_id = '7x'"), (user, [candidates[0], None], "candidate 1 = None"),
                                       (user, [4.5], "candidate 0 = 4.5"), (True, candidates, "user_id = True")]:
        with pytest.raises(DataError, match=named.replace("(", r"\(")):
            ranker.rank(bad_user, bad_items)
    with pytest.raises(DataError, match="at = 'yesterday' is not a time"):
        ranker.rank(user, candidates, at="yesterday")


def test_append_casts_new_events_to_the_snapshots_types_and_never_changes_them(served, tmp_path):
    from recengine.errors import DataError

    ranker, events, items, folder = served
    fresh = Ranker.load(folder / "model", events, items, cache=EmbeddingCache(folder / "cache"))
    late = events.filter(pl.col("user_id") == 3).head(1).with_columns(pl.lit(events["timestamp"].max() + timedelta(days=1)).alias("timestamp"))
    fresh.append(late.with_columns(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)))
    assert fresh._events.schema == events.schema  # string ids became the log's integers, not the reverse
    assert fresh._events.height == events.height + 1 and fresh.at > ranker.at  # the state moved past the new event
    assert [item for item, _ in fresh.rank(3, [1, 2, 3])] != [] and fresh.rank("3", ["1", "2", "3"]) == fresh.rank(3, [1, 2, 3])
    with pytest.raises(DataError, match="column 'user_id'.*row 0 \\('u3'\\)"):
        fresh.append(late.with_columns(pl.lit("u3").alias("user_id")))
    assert fresh._events.height == events.height + 1  # the refused batch changed nothing
