"""Data sets shipped with recengine.

`movielens()` is MovieLens ml-latest-small (GroupLens, 2018): 100,836 ratings by 610 users of 9,742
movies. Its licence (README.txt beside the files) allows research use and redistribution under the
same conditions, and forbids commercial use without GroupLens' permission.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recengine.core.data import Dataset, events_from, load_items

MOVIELENS_DIR = Path(__file__).resolve().parent / "movielens"
MOVIELENS_COLUMNS = {"userId": "user_id", "movieId": "item_id"}


def movielens_items() -> pl.LazyFrame:
    """The movie catalogue: item_id, title, genres ("Action|Comedy"), year (from the title)."""
    items = load_items(MOVIELENS_DIR / "movies.parquet", {"movieId": "item_id"})
    return items.with_columns(
        pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int32).alias("year"),
        pl.col("genres").replace("(no genres listed)", ""),
    )


def movielens() -> Dataset:
    """Ratings as events (event="rating", value=stars) and the movie catalogue as items."""
    ratings = pl.scan_parquet(MOVIELENS_DIR / "ratings.parquet").with_columns(
        pl.lit("rating").alias("event")
    )
    events = events_from(
        ratings.rename({"rating": "value"}), str(MOVIELENS_DIR / "ratings.parquet"), MOVIELENS_COLUMNS
    )
    return Dataset(events=events, items=movielens_items(), name="movielens-latest-small")
