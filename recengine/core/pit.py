"""Point-in-time primitives: what was known strictly before each request's timestamp.

Every feature and candidate source is built from these, so "an event at or after t is never seen
by a request at t" is enforced in one place: as-of joins with `allow_exact_matches=False`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Sequence

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


def cumulative(events: pl.LazyFrame, by: str | list[str], sums: dict[str, pl.Expr],
               start: pl.DataFrame | None = None) -> pl.LazyFrame:
    """Per `by`, running totals of `sums` at each distinct timestamp (ties summed together), in time
    order (each key's rows in time order within it). As-of joins need the table sorted by time: a table
    kept for the run (a context's memo) is then sorted once, not once per chunk of requests.

    `start` (keys, timestamp, sums; dated before every event) is where the totals begin: the running
    sums then go on adding in the order they would have from the first event, to the same bits."""
    keys = [by] if isinstance(by, str) else list(by)
    per_time = events.group_by(*keys, "timestamp").agg(**sums)
    if start is not None:
        per_time = pl.concat([start.lazy(), per_time], how="vertical_relaxed")
    running = per_time.sort(*keys, "timestamp").with_columns(pl.col(name).cum_sum().over(keys) for name in sums)
    return running.sort("timestamp", maintain_order=True)


class RunningTotals:
    """Per key, the totals of `sums` over the events strictly before any time: what a feature context
    keeps for a run in place of `cumulative`'s table, which holds a row per key and event time (the
    log's size, per table).

    It keeps one row per key as of the last time it was read, a cursor per `lane` (a lane per offset,
    e.g. each trailing window's start, so each moves forward). Requests at times from t0 to t1 read the
    cursor stepped to t0 and a running table of the events in [t0, t1) only: chunks in time order
    (training's, a batch's single "now") cost the events between them, and snapshot chunks, whose
    requests share a time, no table at all. A request before the cursor starts its lane over.

    The steps continue `cumulative`'s additions in its order (`start`), so the totals are its bits.
    `derive` adds columns to the events (e.g. weights) before the sums read them."""

    def __init__(self, events: pl.LazyFrame | pl.DataFrame, by: str | list[str], sums: dict[str, pl.Expr],
                 derive: Sequence[pl.Expr] = ()):
        self.keys = [by] if isinstance(by, str) else list(by)
        self.sums, self.derive = sums, list(derive)
        events = events.lazy().collect()
        # Steps slice the events by time; a context's events already come in time order (no copy).
        self.events = events if events["timestamp"].is_sorted() else events.sort("timestamp", maintain_order=True)
        self._cursors: dict[Any, tuple[Any, pl.DataFrame]] = {}

    def _between(self, start: Any, end: Any) -> pl.LazyFrame:
        """The events at or after `start` (None: the first) and strictly before `end`, derived columns added."""
        times = self.events["timestamp"]
        lo = 0 if start is None else times.search_sorted(start, side="left")
        hi = times.search_sorted(end, side="left")
        return self.events.slice(lo, max(0, hi - lo)).lazy().with_columns(*self.derive)

    def _as_of(self, time: Any, lane: Any) -> pl.DataFrame:
        """The totals strictly before `time` (keys, timestamp of each key's last event, sums; a row per
        key seen by then), stepped from the lane's cursor."""
        at, totals = self._cursors.get(lane, (None, None))
        if at is not None and at > time:  # the cursor is past this time: start over from the first event
            at, totals = None, None
        if at is None or at < time:
            running = cumulative(self._between(at, time), self.keys, self.sums, totals)
            # Each key's last running total (one row per key and time, so the latest is one row).
            totals = running.group_by(self.keys).agg(pl.all().sort_by("timestamp").last()).collect()
            self._cursors[lane] = (time, totals)
        return totals

    def before(self, requests: pl.LazyFrame, names: list[str], at: pl.Expr | None = None, lane: Any = None) -> pl.LazyFrame:
        """`_row` plus the totals `names` strictly before `at` (default: each request's timestamp)."""
        left = requests.select("_row", *self.keys, (at if at is not None else pl.col("timestamp")).alias("_at")).collect()
        span = left.select(pl.col("_at").min().alias("lo"), pl.col("_at").max().alias("hi"))
        lo, hi = span["lo"].item(), span["hi"].item()
        if lo is None:  # no requests: an empty table, for the columns' types
            table = cumulative(self.events.clear().lazy().with_columns(*self.derive), self.keys, self.sums)
        else:
            table = cumulative(self._between(lo, hi), self.keys, self.sums, self._as_of(lo, lane))
        return _totals_joined(left.lazy(), table, self.keys, names)


def totals_before(
    requests: pl.LazyFrame,
    table: "pl.LazyFrame | RunningTotals",
    by: str | list[str],
    names: list[str],
    at: pl.Expr | None = None,
    lane: Any = None,
) -> pl.LazyFrame:
    """`_row` plus the running totals `names` of `table` (from `cumulative`, or `RunningTotals` with
    its `lane`) strictly before `at`."""
    if isinstance(table, RunningTotals):
        return table.before(requests, names, at, lane)
    keys = [by] if isinstance(by, str) else list(by)
    left = requests.select("_row", *keys, (at if at is not None else pl.col("timestamp")).alias("_at"))
    return _totals_joined(left, table, keys, names)


def _totals_joined(left: pl.LazyFrame, table: pl.LazyFrame, keys: list[str], names: list[str]) -> pl.LazyFrame:
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
