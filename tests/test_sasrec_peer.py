"""The benchmark's SASRec peer (benchmarks/sasrec.py): it learns an order it is shown, excludes what a
user took, breaks ties by item id and repeats itself with one seed. A peer that silently fails to learn
(as it did with torch's default N(0, 1) embeddings) would make every comparison with it worthless."""

import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sasrec

ITEMS = 30
SETTINGS = sasrec.Settings(maxlen=8, dim=16, epochs=60, batch_size=32, loss="ce", dropout=0.0)


def cyclic_log(users: int = 60) -> pl.DataFrame:
    """Each user walks the items in a cycle from a random start: the next item is always the current + 1."""
    start = np.random.default_rng(0).integers(0, ITEMS, size=users)
    steps = np.arange(8)
    base = datetime(2020, 1, 1)
    return pl.DataFrame({
        "user_id": np.repeat(np.arange(users), len(steps)),
        "item_id": ((start[:, None] + steps[None, :]) % ITEMS).ravel() + 100,
        "timestamp": [base + timedelta(hours=int(h)) for h in np.tile(steps, users)],
    })


def test_it_learns_the_next_item_of_a_cycle_and_never_proposes_a_taken_one():
    events = cyclic_log()
    users = np.arange(0, 60, 3)
    ids, items = sasrec.top_items(events, users, SETTINGS, seed=0, top=3)
    last = events.group_by("user_id").agg(pl.col("item_id").sort_by("timestamp").last()).sort("user_id")
    expected = (last.filter(pl.col("user_id").is_in(users))["item_id"].to_numpy() - 100 + 1) % ITEMS + 100
    assert (items[ids[:, 0]] == expected).mean() >= 0.9
    taken = events.group_by("user_id").agg("item_id").sort("user_id")
    for row, user in enumerate(users):
        assert not set(items[ids[row]]) & set(taken.filter(pl.col("user_id") == user)["item_id"][0])


def test_one_seed_gives_the_same_top_items_and_unknown_users_get_none():
    events = cyclic_log()
    users = np.array([5, 999, 1])
    first, items = sasrec.top_items(events, users, SETTINGS, seed=4, top=5)
    again, _ = sasrec.top_items(events, users, SETTINGS, seed=4, top=5)
    np.testing.assert_array_equal(first, again)
    assert (first[1] == -1).all() and (first[[0, 2]] >= 0).all()
