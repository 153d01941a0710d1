"""Point-in-time primitives: what was known strictly before each request's timestamp.

Every feature and candidate source is built from these, so "an event at or after t is never seen
by a request at t" is enforced in one place: as-of joins with `allow_exact_matches=False`.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

DAY = timedelta(days=1)


def asof_before(
    requests: pl.LazyFrame, table: pl.LazyFrame, by: str | list[str], at: str = "timestamp"
) -> pl.LazyFrame:
    """Join each request with the last `table` row (per `by`) whose timestamp is strictly before `at`."""
    right = table.rename({"timestamp": "_known_at"}).sort("_known_at")
    joined = requests.sort(at).join_asof(
        right, left_on=at, right_on="_known_at", by=by, strategy="backward",
        allow_exact_matches=False, check_sortedness=False,
    )
    return joined.drop("_known_at", strict=False)


def cumulative(events: pl.LazyFrame, by: str | list[str], sums: dict[str, pl.Expr]) -> pl.LazyFrame:
    """Per `by`, running totals of `sums` at each distinct timestamp (ties summed together), in time
    order (each key's rows in time order within it). As-of joins need the table sorted by time: a table
    kept for the run (a context's memo) is then sorted once, not once per chunk of requests."""
    keys = [by] if isinstance(by, str) else list(by)
    per_time = events.group_by(*keys, "timestamp").agg(**sums).sort(*keys, "timestamp")
    running = per_time.with_columns(pl.col(name).cum_sum().over(keys) for name in sums)
    return running.sort("timestamp", maintain_order=True)


def totals_before(
    requests: pl.LazyFrame,
    table: pl.LazyFrame,
    by: str | list[str],
    names: list[str],
    at: pl.Expr | None = None,
) -> pl.LazyFrame:
    """`_row` plus the running totals `names` of `table` (from `cumulative`) strictly before `at`."""
    keys = [by] if isinstance(by, str) else list(by)
    left = requests.select("_row", *keys, (at if at is not None else pl.col("timestamp")).alias("_at"))
    joined = asof_before(left, table.select(*keys, "timestamp", *names), keys, at="_at")
    return joined.select("_row", *(pl.col(n).fill_null(0) for n in names))


def users_events(events: pl.LazyFrame, requests: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """Only the events of `requests`' users: a chunk of requests then costs its users' histories, not the log."""
    return events.lazy().join(requests.lazy().select("user_id").unique(), on="user_id", how="semi")


def with_sequence(events: pl.LazyFrame) -> pl.LazyFrame:
    """Events numbered 0, 1, ... per user in time order (`_seq`), the basis of `recent_history`."""
    return events.sort("user_id", "timestamp", "item_id").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).over("user_id").alias("_seq")
    )


def recent_history(profiles: pl.LazyFrame, events: pl.LazyFrame, n: int) -> pl.LazyFrame:
    """For each (user_id, timestamp) in `profiles`, the user's last `n` events strictly before it.

    Returns the profile columns plus `h_item`, `h_time`, `h_value` and `h_back` (0 = most recent).
    Linear in profiles x n: the count of earlier events comes from an as-of join on the event
    sequence, and the last n are joined by sequence number rather than by filtering all history.
    """
    sequenced = with_sequence(users_events(events, profiles))
    # One row per (user, timestamp): with ties, the as-of join must see the count after all of them.
    counts = sequenced.group_by("user_id", "timestamp").agg((pl.col("_seq").max() + 1).alias("_before"))
    keyed = profiles.with_row_index("_profile")
    known = asof_before(keyed, counts, "user_id").with_columns(pl.col("_before").fill_null(0))
    steps = known.with_columns(pl.int_ranges(0, pl.min_horizontal(pl.col("_before"), n)).alias("h_back"))
    steps = steps.explode("h_back").drop_nulls("h_back")
    steps = steps.with_columns((pl.col("_before") - 1 - pl.col("h_back")).alias("_seq"))
    value = pl.col("value") if "value" in events.collect_schema() else pl.lit(1.0)
    history = sequenced.select(
        "user_id", "_seq", pl.col("item_id").alias("h_item"), pl.col("timestamp").alias("h_time"), value.alias("h_value")
    )
    return steps.join(history, on=["user_id", "_seq"], how="inner").drop("_seq", "_before")
