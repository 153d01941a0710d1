"""The requests of `recengine recommend`: read from a file and checked, or every user as of just after the
last event; and what to say of requests that got nothing. Beside the code they protect, not in the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from recengine.core.data import TIMESTAMP, Dataset, load_requests
from recengine.errors import DataError
from recengine.running.batch import align_ids


@dataclass
class Requests:
    frame: pl.DataFrame  # user_id, timestamp: one row per request
    first_event: datetime
    repeats: int = 0  # rows of the file dropped as repeats of an earlier request


def recommend_requests(dataset: Dataset, path: str | Path | None, columns: dict[str, str] | None = None,
                       timestamp_unit: str = "auto") -> Requests:
    """The requests in `path` (user_id, timestamp), their ids aligned with the events', each once; without
    a path, every user as of just after the last event (the nightly job's case)."""
    first = dataset.events.select(pl.col("timestamp").min()).collect().item()
    if path is None:
        last = dataset.events.select(pl.col("timestamp").max()).collect().item()
        # In the events' time unit (a bare Python datetime would be microseconds): every later join matches.
        users = dataset.events.select("user_id").unique().sort("user_id").with_columns(
            pl.lit(last + timedelta(seconds=1)).cast(TIMESTAMP).alias("timestamp")).collect()
        return Requests(users, first)
    requests = load_requests(path, columns, timestamp_unit)
    requests = align_ids(requests, dataset.events.collect_schema(), str(path)).collect()
    _refuse_requests_before_every_event(requests, first, path)
    # A request given twice would get its top k twice over, each item twice.
    unique = requests.unique(["user_id", "timestamp"], keep="first", maintain_order=True)
    return Requests(unique, first, requests.height - unique.height)


def _refuse_requests_before_every_event(requests: pl.DataFrame, first: datetime, source: str | Path) -> None:
    """Features come only from events before a request: requests all at or before the first event
    would give an empty output, which must not pass for a result."""
    if requests.filter(pl.col("timestamp") > first).height == 0:
        raise DataError(
            f"{source}: all {requests.height:,} requests are at or before the first event ({first}); recommendations "
            "use only events before a request, so none of them can get any. Give request times after the first "
            "event, or leave out --requests to recommend for every user as of just after the last event.")


def unserved(requests: Requests, ranked: pl.DataFrame) -> str | None:
    """How many requests got no recommendation at all, and how many of those came too early; None if none."""
    missing = requests.frame.join(ranked.select("user_id", "timestamp").unique(), on=["user_id", "timestamp"], how="anti")
    if not missing.height:
        return None
    early = missing.filter(pl.col("timestamp") <= requests.first_event).height
    return (f"warning: {missing.height:,} of {requests.frame.height:,} requests got no recommendations ({early:,} of "
            f"them at or before the first event, {requests.first_event}, when nothing is known yet).")
