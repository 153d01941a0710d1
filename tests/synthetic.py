"""Small logs where the truth is known: each user prefers one cluster of items."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl

CLUSTERS = 6
START = datetime(2024, 1, 1)


# Words of the tiny test BERT's vocabulary (tests/conftest.py), so titles embed to distinct vectors:
# one theme per cluster, then a second word. 6 x 19 titles: a catalogue of more than 114 items
# repeats titles, as editions and variants do in real catalogues.
THEMES = ["space", "love", "robot", "war", "comedy", "paris"]
WORDS = ("dark summer night future time star heart story galaxy wedding kiss ship planet alien drama "
         "action adventure travel romance").split()


def catalogue(n_items: int = 120) -> pl.DataFrame:
    ids = np.arange(n_items)
    return pl.DataFrame({
        "item_id": ids,
        "title": [f"{THEMES[i % CLUSTERS]} {WORDS[(i // CLUSTERS) % len(WORDS)]}" for i in ids],
        "genres": [THEMES[i % CLUSTERS] for i in ids],
        "year": 1950 + ids % 60,
        # A decimal field (sums of it are not exact in float) with gaps.
        "price": [None if i % 17 == 0 else round(1.99 + (i * 7 % 50) * 0.37, 2) for i in ids],
    })


def interactions(n_users: int = 200, n_items: int = 120, per_user: int = 30, taste: float = 0.8, seed: int = 0) -> pl.DataFrame:
    """Each user's events, an hour apart from a random start: mostly items of the user's cluster (in
    random order), otherwise one of the globally popular items 0..11."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        own = rng.permutation(np.arange(user % CLUSTERS, n_items, CLUSTERS))
        popular = rng.permutation(12)
        start = START + timedelta(days=float(rng.uniform(0, 200)))
        picked: set[int] = set()
        for step in range(per_user):
            pool = own if rng.random() < taste else popular
            choice = next((int(i) for i in pool if int(i) not in picked), None)
            if choice is None:
                continue
            picked.add(choice)
            rows.append((user, choice, start + timedelta(hours=step), float(rng.integers(1, 6))))
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "value"], orient="row")


def impressions(n_users: int = 150, n_items: int = 120, requests_per_user: int = 8, seed: int = 0) -> pl.DataFrame:
    """Logged requests of 10 random items; a user clicks (label 1) or buys (label 2) items of their
    cluster far more often than others."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        start = START + timedelta(days=float(rng.uniform(0, 100)))
        for r in range(requests_per_user):
            at = start + timedelta(hours=6 * r)
            for item in rng.choice(n_items, 10, replace=False):
                likes = item % CLUSTERS == user % CLUSTERS
                clicked = rng.random() < (0.6 if likes else 0.05)
                label = (2.0 if rng.random() < 0.3 else 1.0) if clicked else 0.0
                rows.append((f"{user}-{r}", user, int(item), at, label))
    return pl.DataFrame(rows, schema=["request_id", "user_id", "item_id", "timestamp", "label"], orient="row")


def feature_set(**ranker):
    from recengine.parts.featureset import FeatureSet

    return FeatureSet.from_dict({
        "name": "synthetic",
        "candidates": {"popular": {"k": 40, "half_life_days": 30}, "covisitation": {"k": 60, "window": 3, "recent": 5}},
        "features": {
            "item_popularity": {"windows_days": [7, 30], "half_lives_days": [14]},
            "category_affinity": {"field": "genres"},
            "covisitation": {"window": 3, "recent": 5},
            "user_activity": {},
        },
        "labels": {"samples_per_user": 3, "min_history": 5},
        "ranker": {"num_boost_round": 80, "early_stopping_rounds": 20, "min_data_in_leaf": 20, **ranker},
    })


def ranking_job(folder, events: pl.DataFrame, ranker, per_user: int, timestamped: bool = True):
    """A batch job's inputs in `folder`: a model trained on `events` with the feature set `ranker`
    (model/), the events and the catalogue as parquet, and candidates.parquet: users 0-149 (those with
    no event are unknown to the model) with `per_user` random items each, repeats dropped, as of an hour
    after the last event, or (not `timestamped`) without a time: ranked just after the last event.
    Returns (folder, model, events)."""
    from recengine.core.data import Dataset
    from recengine.learning.training import train

    result = train(Dataset(events.lazy(), catalogue().lazy()), ranker, progress=False, say=lambda _: None)
    result.model.save(folder / "model")
    events.write_parquet(folder / "events.parquet")
    catalogue().write_parquet(folder / "items.parquet")
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(150), per_user)
    candidates = pl.DataFrame({"user_id": users, "item_id": rng.integers(0, 120, users.size)})
    if timestamped:
        candidates = candidates.with_columns(pl.lit(events["timestamp"].max() + timedelta(hours=1)).alias("timestamp"))
    candidates.unique(["user_id", "item_id"], maintain_order=True).write_parquet(folder / "candidates.parquet")
    return folder, result.model, events


def feature_set_toml(**ranker) -> str:
    """`feature_set(**ranker)` as a feature-set file's text, for the CLI."""
    ranker = {"num_boost_round": 80, "early_stopping_rounds": 20, "min_data_in_leaf": 20, **ranker}
    return _TOML + "[ranker]\n" + "".join(f"{key} = {value!r}\n" for key, value in ranker.items())


_TOML = """
name = "synthetic"
description = "Popular and co-visitation candidates; behaviour features."
[candidates.popular]
k = 40
half_life_days = 30
[candidates.covisitation]
k = 60
window = 3
recent = 5
[features.item_popularity]
windows_days = [7, 30]
half_lives_days = [14]
[features.category_affinity]
field = "genres"
[features.covisitation]
window = 3
recent = 5
[features.user_activity]
[labels]
samples_per_user = 3
min_history = 5
"""


def assert_learned_state_round_trips(model, folder, events: pl.DataFrame, items: pl.DataFrame, candidates: list,
                                     users: tuple) -> None:
    """A model with learned parts, saved to `folder` and loaded: the same arrays, and the same rankings
    from its saved state in memory, from disk, and refit on the training events (the snapshot's)."""
    from recengine.learning.model import RankerModel
    from recengine.running.ranker import Ranker

    loaded = RankerModel.load(folder)
    for key, arrays in model.learned.items():
        assert set(arrays) == set(loaded.learned[key])
        for name in arrays:
            np.testing.assert_array_equal(arrays[name], loaded.learned[key][name])
    in_memory = Ranker(model, events, items, learned="saved")
    from_disk = Ranker(loaded, events, items, learned="saved")
    refit = Ranker(loaded, events, items)
    for user in users:
        assert in_memory.rank(user, candidates) == from_disk.rank(user, candidates)
        assert refit.rank(user, candidates) == from_disk.rank(user, candidates)
