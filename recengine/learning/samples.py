"""Training samples: request times, labels from what followed, and a time-based validation split.

Impression logs (`request_id` + `label`): each logged request is a group, labels are its clicks.
Interaction logs: per user, request times are drawn (seeded) from the user's own events after the
first `min_history`; the items the user interacted with from t on (within `window_days`, if set)
are the positives among the candidates.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from recengine.core.pit import DAY, cumulative, totals_before


def sample_requests(events: pl.LazyFrame, per_user: int = 2, min_history: int = 5, seed: int = 0,
                    after: datetime | None = None) -> pl.DataFrame:
    """Up to `per_user` distinct request times per user, each at one of the user's events (and, when
    `after` is given, at or after it: the end of the learned parts' window)."""
    # One candidate time per distinct timestamp: a burst of ratings in one second is one moment.
    times = events.select("user_id", "timestamp").unique().sort("user_id", "timestamp")
    times = times.with_columns(pl.int_range(pl.len()).over("user_id").alias("_position"))
    eligible = times.filter(pl.col("_position") >= min_history)
    if after is not None:
        eligible = eligible.filter(pl.col("timestamp") >= after)
    eligible = eligible.collect()
    sampled = eligible.with_columns(pl.int_range(pl.len()).shuffle(seed=seed).over("user_id").alias("_draw"))
    return sampled.filter(pl.col("_draw") < per_user).select("user_id", "timestamp").sort("timestamp", "user_id")


def future_items(
    requests: pl.DataFrame, events: pl.LazyFrame, window_days: float | None = None, until: datetime | None = None
) -> pl.DataFrame:
    """(user_id, timestamp, item_id): items each user interacted with at or after the request time,
    within `window_days` and strictly before `until` (the validation boundary) when given."""
    later = requests.lazy().join(events.select("user_id", pl.col("item_id"), pl.col("timestamp").alias("_at")), on="user_id")
    later = later.filter(pl.col("_at") >= pl.col("timestamp"))
    if window_days:
        later = later.filter(pl.col("_at") < pl.col("timestamp") + DAY * window_days)
    if until is not None:
        later = later.filter(pl.col("_at") < until)
    return later.select("user_id", "timestamp", "item_id").unique().collect()


def attach_labels(candidates: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """Candidates with `label` 1 where the item is in the request's truth, else 0."""
    positives = truth.with_columns(pl.lit(1.0).alias("label"))
    joined = candidates.join(positives, on=["user_id", "timestamp", "item_id"], how="left", maintain_order="left")
    return joined.with_columns(pl.col("label").fill_null(0.0))


def time_split(requests: pl.DataFrame, validation_fraction: float) -> tuple[pl.DataFrame, pl.DataFrame, datetime]:
    """Earlier requests train, the latest `validation_fraction` validate; returns the boundary too."""
    boundary = requests["timestamp"].quantile(1 - validation_fraction, interpolation="lower")
    return requests.filter(pl.col("timestamp") < boundary), requests.filter(pl.col("timestamp") >= boundary), boundary


def cap_groups(requests: pl.DataFrame, most: int, seed: int, period: str = "1w") -> pl.DataFrame:
    """At most `most` requests, drawn (seeded) so that every `period` keeps its share of them: the
    time mix of the training groups stays that of the log. 0 keeps every request."""
    if not most or requests.height <= most:
        return requests
    bucket = pl.col("timestamp").dt.truncate(period)
    share = pl.len().over(bucket) * most / requests.height
    # A seeded hash of the request, not a shuffle: the draw does not depend on the rows' order.
    draw = pl.struct("user_id", "timestamp").hash(seed=seed).rank("ordinal").over(bucket)
    return requests.filter(draw <= share.ceil()).sort("timestamp", "user_id")


def sample_negatives(rows: pl.DataFrame, keys: list[str], rank_columns: list[str], negatives: int,
                     hard_share: float, seed: int) -> pl.DataFrame:
    """Every positive row, plus at most `negatives` negatives per group: the `hard_share` of them the
    sources ranked best (the smallest rank any source gave, ties by item id), the rest at random
    (a seeded hash of the row). Each group's draw depends on its own rows only, so building the rows
    in chunks keeps the same ones. Groups without a positive teach LightGBM nothing and are dropped.
    `negatives = 0` keeps every negative. Returns the rows in their input order."""
    rows = rows.filter((pl.col("label") > 0).any().over(keys))
    if not negatives:
        return rows
    hard = round(negatives * hard_share)
    best = pl.min_horizontal(rank_columns).fill_null(float("inf")) if rank_columns else pl.lit(0.0)
    negative = pl.col("label") <= 0
    draw = pl.struct(*keys, "item_id").hash(seed=seed)
    keyed = rows.with_row_index("_row").with_columns(best.alias("_best"), draw.alias("_draw"))
    # Negatives only, in the order each kind is taken: hard by best rank, easy by the hash.
    ranked = keyed.filter(negative).sort([*keys, "_best", "item_id"]).with_columns(
        pl.int_range(pl.len()).over(keys).alias("_hard"))
    easy = ranked.filter(pl.col("_hard") >= hard).sort([*keys, "_draw", "item_id"]).with_columns(
        pl.int_range(pl.len()).over(keys).alias("_easy"))
    kept = pl.concat([ranked.filter(pl.col("_hard") < hard)["_row"],
                      easy.filter(pl.col("_easy") < negatives - hard)["_row"],
                      keyed.filter(~negative)["_row"]])
    return keyed.join(kept.to_frame(), on="_row", how="semi", maintain_order="left").drop("_row", "_best", "_draw")


def snapshot_requests(events: pl.LazyFrame, every_days: float, horizon_days: float, min_history: int = 5,
                      after: datetime | None = None) -> pl.DataFrame:
    """Requests as the engine is used: "as of time s, what will each user take next". Snapshot times
    every `every_days` from the first event (from `after`, when given, the end of the learned parts'
    window); at each, every user with at least `min_history` events before s and at least one event in
    [s, s + horizon_days) (a user with none has no positive, and such a group is dropped anyway)."""
    bounds = events.select(pl.col("timestamp").min().alias("first"), pl.col("timestamp").max().alias("last")).collect()
    first, last = bounds["first"][0], bounds["last"][0]
    if first is None:
        return pl.DataFrame(schema={"user_id": events.collect_schema()["user_id"], "timestamp": pl.Datetime("ms")})
    start = first + DAY * every_days
    if after is not None and after > start:
        start = after
    step = DAY * every_days
    count = max(0, int((last - start) / step) + 1)
    times = pl.DataFrame({"timestamp": [start + step * i for i in range(count)]}).cast({"timestamp": events.collect_schema()["timestamp"]})
    table = cumulative(events.select("user_id", "timestamp"), "user_id", {"n": pl.len()})
    users = events.select("user_id").unique().sort("user_id")
    grid = users.join(times.lazy(), how="cross").collect().with_row_index("_row").lazy()  # numbered once: read thrice
    before = totals_before(grid, table, "user_id", ["n"]).rename({"n": "_before"})
    by_end = totals_before(grid, table, "user_id", ["n"], at=pl.col("timestamp") + DAY * horizon_days).rename({"n": "_by_end"})
    chosen = grid.join(before, on="_row").join(by_end, on="_row").filter(
        (pl.col("_before") >= min_history) & (pl.col("_by_end") > pl.col("_before")))
    return chosen.select("user_id", "timestamp").sort("timestamp", "user_id").collect()
