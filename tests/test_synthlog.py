"""The scale benchmark's synthetic log generator (benchmarks/synthlog.py): seeded to the byte, the
requested size, and shaped like a real log (heavy users, a popular head, items taken after release)."""

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import synthlog

EVENTS = 30_000


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    meta = synthlog.generate(folder, EVENTS, seed=3, chunk_events=7_000)  # several blocks
    return folder, meta


def test_one_seed_gives_the_same_bytes_and_another_seed_other_ones(log, tmp_path):
    folder, meta = log
    again = synthlog.generate(tmp_path / "again", EVENTS, seed=3, chunk_events=7_000)
    assert again == meta
    for name in ("events.parquet", "items.parquet"):
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes(), name
    synthlog.generate(tmp_path / "other", EVENTS, seed=4, chunk_events=7_000)
    assert (tmp_path / "other" / "events.parquet").read_bytes() != (folder / "events.parquet").read_bytes()


def test_the_requested_number_of_events_in_the_data_contract(log):
    from recengine.core.data import load_events, load_items

    folder, meta = log
    assert meta["blocks"] > 1
    events = load_events(folder / "events.parquet").collect()
    items = load_items(folder / "items.parquet").collect()
    assert events.height == EVENTS == meta["events"]
    assert events.columns[:3] == ["user_id", "item_id", "timestamp"] and "value" in events.columns
    assert events["value"].is_between(0.5, 5.0).all()
    assert events["user_id"].n_unique() == meta["users"] and items.height == meta["items"]
    assert events["item_id"].is_in(items["item_id"].implode()).all()
    assert set(items.columns) >= {"item_id", "title", "genres", "year"}
    # Titles are words the tests' tiny BERT knows; genres are "A|B" from MovieLens' list.
    from conftest import TINY_VOCAB

    words = set(items["title"].str.split(" ").explode().to_list())
    assert words <= set(TINY_VOCAB), words - set(TINY_VOCAB)
    genres = items["genres"].str.split("|")
    assert set(genres.explode().to_list()) <= set(synthlog.GENRES) and genres.list.len().max() > 1
    assert (genres.list.n_unique() == genres.list.len()).all()


def test_a_log_shaped_like_a_real_one(log):
    folder, _ = log
    events = pl.read_parquet(folder / "events.parquet")
    items = pl.read_parquet(folder / "items.parquet")
    per_user = events.group_by("user_id").len()["len"]
    assert per_user.max() > 20 * per_user.median()  # lognormal activity: a few very heavy users
    per_item = events.group_by("item_id").len()["len"].sort(descending=True)
    head = max(1, items.height // 100)
    assert per_item.head(head).sum() / events.height > 0.10  # the top 1% of items take >10x their share
    # Items are released over the year and never taken before it.
    released = events.join(items, on="item_id").filter(pl.col("timestamp").dt.year() < pl.col("year"))
    assert released.is_empty()
    assert (items["year"] == synthlog.START.year).mean() > 0.4
    # The most taken items of the first quarter are not those of the last: popularity drifts.
    quarter = events.with_columns(pl.col("timestamp").dt.quarter().alias("q"))
    top = {q: set(quarter.filter(pl.col("q") == q).group_by("item_id").len().sort("len", descending=True)
                  .head(10)["item_id"].to_list()) for q in (1, 4)}
    assert len(top[1] & top[4]) < 5
    # Users rarely take an item twice, and every event lies in the year.
    assert events.unique(["user_id", "item_id"]).height > 0.97 * events.height
    assert events["timestamp"].min() >= synthlog.START
    assert events["timestamp"].max() < synthlog.START + np.timedelta64(synthlog.DAYS, "D")


def test_sizes_parse_and_label():
    assert [synthlog.parse_size(s) for s in ("0.1M", "300k", "20M", "5000")] == [100_000, 300_000, 20_000_000, 5000]
    assert [synthlog.size_label(n) for n in (100_000, 20_000_000, 30_000)] == ["0.1M", "20M", "30k"]
