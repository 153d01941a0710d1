"""sequential (#22): a SASRec-style transformer over the user's last items, fed their text, as a learned
part: the part contract (leakage per request time included), one seed one state, items nobody took
scored from their text, the state carried by a saved model to identical rankings, bad settings refused."""

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from recengine.core.data import Dataset
from recengine.errors import ConfigError, DataError
from recengine.features.sequential import WEIGHT, SequentialScores, SequentialSource, training_windows
from recengine.learning.training import train
from recengine.parts.candidates import generate
from recengine.parts.context import FeatureContext, compute_features, fit_learned
from recengine.parts.contract import check_extractor, check_source
from recengine.parts.featureset import FeatureSet

from conftest import DEVICE
from synthetic import CLUSTERS, THEMES, assert_learned_state_round_trips, catalogue, interactions


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared: torch on one thread in these tests (the fit sets one thread itself)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(tiny_bert, **extra) -> dict:
    return {"encoder_params": {"model": str(tiny_bert), "device": DEVICE}, "history": 10, "dim": 16, "heads": 2,
            "layers": 1, "epochs": 8, "batch_size": 32, "lr": 1e-2, "device": DEVICE, **extra}


def events_and_boundary(n_users: int = 120):
    events = Dataset(interactions(n_users=n_users).lazy()).events.collect()
    return events, events["timestamp"].quantile(0.5, interpolation="lower")


def last_requests(events: pl.DataFrame, boundary) -> pl.DataFrame:
    """An hour after each user's last event, for the users active after the boundary."""
    users = events.filter(pl.col("timestamp") >= boundary).group_by("user_id").agg(pl.col("timestamp").max() + timedelta(hours=1))
    return users.sort("user_id")


def fitted(tiny_bert, events, boundary, items=None, **extra):
    source = SequentialSource(k=10, **settings(tiny_bert, **extra))
    extractor = SequentialScores(**settings(tiny_bert, **extra))
    context = FeatureContext.from_frames(events, (catalogue() if items is None else items).lazy())
    fit_learned([source, extractor], context, boundary)
    return source, extractor, context


@pytest.mark.parametrize("extra", [{}, {"id_embedding": False, "exclude_history": False}])
def test_the_parts_pass_the_contract_leakage_per_request_time_included(tiny_bert, extra):
    params = settings(tiny_bert, history=6, epochs=2, layers=2, **extra)
    check_source(SequentialSource, {**params, "k": 15})
    params.pop("exclude_history", None)
    check_extractor(SequentialScores, params)


def test_the_model_learns_the_users_clusters_from_the_window_and_answers_nothing_before_it(tiny_bert):
    events, boundary = events_and_boundary()
    source, extractor, context = fitted(tiny_bert, events, boundary)
    state = context.learned["SequentialSource"]
    assert state is context.learned["SequentialScores"]  # one fit for the pair (same fit_key)
    assert state["loss"][-1] < state["loss"][0]
    requests = last_requests(events, boundary)
    proposed = generate(requests, [source], context, exclude_seen=False)
    assert proposed.group_by("user_id").len()["len"].max() == 10
    # A user's next items are mostly of their cluster (1 in 6 by chance).
    assert (proposed["item_id"] % CLUSTERS == proposed["user_id"] % CLUSTERS).mean() > 0.3
    # The history is not proposed again (exclude_history), and nothing is proposed before the boundary.
    early = requests.with_columns(pl.col("timestamp") - timedelta(days=400))
    assert generate(early, [source], context, exclude_seen=False).height == 0
    rows = compute_features(requests.join(pl.DataFrame({"item_id": [0, 1, 6, 7, 30]}), how="cross"), [extractor], context)
    assert rows["seq_score"].null_count() == 0 and rows["seq_rank"].min() >= 1
    assert rows["seq_rank"].max() <= catalogue().height and rows["seq_score"].abs().max() <= 1
    before = compute_features(early.join(pl.DataFrame({"item_id": [0, 1]}), how="cross"), [extractor], context)
    assert before["seq_score"].null_count() == before.height == before["seq_rank"].null_count()


def test_the_source_agrees_with_the_features_score_and_rank(tiny_bert):
    events, boundary = events_and_boundary(60)
    source, extractor, context = fitted(tiny_bert, events, boundary)
    requests = last_requests(events, boundary).head(8)
    proposed = generate(requests, [source], context, exclude_seen=False)
    rows = compute_features(proposed, [extractor], context)
    np.testing.assert_array_equal(rows["seq_score"].round(9).to_numpy(), rows["cand_sequential_score"].to_numpy())
    # The source's best items are the extractor's best ranks (the history, ranked last, is not proposed).
    np.testing.assert_array_equal(rows["seq_rank"].to_numpy(), rows["cand_sequential_rank"].to_numpy())


def test_one_seed_gives_the_same_state_arrays_and_rankings_another_seed_another(tiny_bert):
    events, boundary = events_and_boundary(60)
    requests = last_requests(events, boundary)
    runs = []
    for seed in (0, 0, 1):
        source, _, context = fitted(tiny_bert, events, boundary, seed=seed)
        runs.append((context.learned["SequentialSource"], generate(requests, [source], context, exclude_seen=False)))
    (first, ranked), (again, reranked), (other, _) = runs
    assert set(first) == set(again) and all(np.array_equal(first[name], again[name]) for name in first)
    assert ranked.equals(reranked)
    assert not np.array_equal(first[WEIGHT + "text.weight"], other[WEIGHT + "text.weight"])
    # Plain arrays only (saved as npz without pickles): numbers, and the item ids.
    assert all(value.dtype.kind in "fiU" for value in first.values())
    assert first[WEIGHT + "ids.weight"].shape == (len(first["item_ids"]), 16)


def test_an_item_nobody_took_is_scored_and_proposed_from_its_text(tiny_bert):
    events, boundary = events_and_boundary()
    # Items 120-131: new titles of each theme, in the catalogue, with no event at all.
    items = pl.concat([catalogue(), pl.DataFrame({"item_id": np.arange(120, 132), "title": [f"{THEMES[i % CLUSTERS]} galaxy adventure"
                                                                                           for i in range(120, 132)]})],
                      how="diagonal_relaxed")
    _, extractor, context = fitted(tiny_bert, events, boundary, items=items)
    assert not set(context.learned["SequentialSource"]["item_ids"].tolist()) & set(range(120, 132))  # no id embedding
    requests = last_requests(events, boundary)
    rows = compute_features(requests.join(pl.DataFrame({"item_id": [120, 125, 999]}), how="cross"), [extractor], context)
    new = rows.filter(pl.col("item_id") != 999)
    assert new["seq_score"].null_count() == 0 and new["seq_rank"].null_count() == 0
    assert rows.filter(pl.col("item_id") == 999)["seq_score"].null_count() == requests.height  # not in the catalogue
    wide = SequentialSource(k=len(items), **settings(tiny_bert))
    wide.key = "SequentialSource"  # reads the state fit above
    proposed = generate(requests, [wide], context, exclude_seen=False)
    assert proposed.filter(pl.col("item_id") >= 120)["user_id"].n_unique() == requests.height


def test_a_trained_model_carries_the_state_and_ranks_the_same_after_save_and_load(tiny_bert, tmp_path):
    params = settings(tiny_bert, epochs=3)
    fs = FeatureSet.from_dict({
        "name": "sequential",
        "candidates": {"popular": {"k": 30}, "sequential": {"k": 30, **params}},
        "features": {"sequential": params, "item_popularity": {"windows_days": [7]}},
        "labels": {"samples_per_user": 2, "learned_fraction": 0.5},
        "ranker": {"num_boost_round": 20, "early_stopping_rounds": 5, "min_data_in_leaf": 10},
    })
    events, items = interactions(n_users=60), catalogue()
    result = train(Dataset(events.lazy(), items.lazy()), fs, progress=False, say=lambda _: None)
    assert result.train.rows["seq_score"].drop_nulls().len() > 0
    model = result.model
    assert set(model.learned) == {"candidates.sequential", "features.sequential"}
    folder = model.save(tmp_path / "model")
    assert_learned_state_round_trips(model, folder, events, items, items["item_id"].to_list()[:40], (0, 7, 33))


def test_training_windows_cut_each_history_from_the_latest_event_back():
    from datetime import datetime

    t = datetime(2024, 1, 1)
    events = pl.DataFrame({"user_id": [1] * 7 + [2], "item_id": [10, 11, 12, 13, 14, 15, 16, 20],
                           "timestamp": [t + timedelta(hours=h) for h in range(7)] + [t]})
    windows = training_windows(events, n=3, max_sequences=100, seed=0)
    got = {w: rows.sort("_slot")[["_slot", "item_id"]].rows() for (w,), rows in windows.group_by("_window")}
    # Cut from the newest back (13..16, then 10..13: 13 shared), numbered in time order; user 2's lone event
    # teaches nothing.
    assert got == {0: [(0, 10), (1, 11), (2, 12), (3, 13)], 1: [(0, 13), (1, 14), (2, 15), (3, 16)]}
    assert training_windows(events, n=3, max_sequences=1, seed=0)["_window"].n_unique() == 1


def test_bad_settings_are_refused_with_a_clear_error(tiny_bert):
    with pytest.raises(ConfigError, match="dim = 30 is not a multiple of heads = 4"):
        SequentialScores(dim=30, heads=4)
    with pytest.raises(ConfigError, match="history = 0"):
        SequentialScores(history=0)
    with pytest.raises(ConfigError, match="lr = -1"):
        SequentialSource(lr=-1)
    with pytest.raises(ConfigError, match="dropout = 1"):
        SequentialScores(dropout=1)
    with pytest.raises(ConfigError, match="k = 0"):
        SequentialSource(k=0)
    with pytest.raises(ConfigError, match="id_embedding = 'yes'"):
        SequentialScores(id_embedding="yes")
    with pytest.raises(ConfigError, match="device = 'tpu'"):
        SequentialScores(device="tpu")
    with pytest.raises(ConfigError, match=r"\[features.sequential\].*epochs"):
        FeatureSet.from_dict({"name": "x", "candidates": {"popular": {}}, "features": {"sequential": {"epochs": 1.5}}})
    with pytest.raises(ConfigError, match="no items table"):
        SequentialScores().fit(interactions(n_users=5), None)
    with pytest.raises(DataError, match="next-item example"):
        SequentialScores(**settings(tiny_bert)).fit(Dataset(interactions(n_users=1, per_user=1).lazy()).events.collect(), catalogue())
