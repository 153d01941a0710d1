"""The rolling-origin split: evaluate a recommender at several moments in time, each method seeing only
the past.

At each cutoff c (by default the 0.50, 0.55, ..., 0.95 quantiles of all event times):

- **training data**: every event strictly before c; nothing at or after c reaches a method's fit;
- **the catalogue at c**: items released by c's year (the year in the title, "Heat (1995)") plus any
  item with an event before c; an item whose title has no year is in it only once it has an event;
- **requests** `(user, c)`: users with at least `min_history` events before c and at least one
  catalogue item new to them in `[c, next cutoff)` (the last window runs to the end of the log);
- **truth**: those items, each flagged `cold` when nobody had an event with it before c.

    from recengine.core.rolling import windows
    for window in windows(events, items):
        model = fit(window.events, window.items)             # only the past
        ranked = model.top10(window.requests)                 # user_id, timestamp = window.cutoff
        ...compare with window.truth (user_id, item_id, cold)

`windows` returns every cutoff of the protocol; `spread(windows, n)` keeps n of them, evenly spaced,
for a quick run (each window still runs to the next cutoff of the full protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import numpy as np
import polars as pl

from recengine.core.data import TIMESTAMP
from recengine.errors import DataError

QUANTILES: tuple[float, ...] = tuple(round(0.50 + 0.05 * i, 2) for i in range(10))
MIN_HISTORY = 5
# The release year as MovieLens writes it: the last "(YYYY)" of the title.
TITLE_YEAR = pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int32)


@dataclass(frozen=True)
class Window:
    """One cutoff of the rolling protocol: what a method may learn from, and what it is judged on."""

    cutoff: datetime
    end: datetime | None  # the next cutoff; None for the last window (it runs to the end of the log)
    events: pl.DataFrame  # every event strictly before the cutoff
    items: pl.DataFrame  # the catalogue at the cutoff (the item table's rows, all columns)
    requests: pl.DataFrame  # user_id, timestamp (= cutoff), sorted by user
    truth: pl.DataFrame  # user_id, item_id, cold: the catalogue items new to the user in [cutoff, end)

    @property
    def label(self) -> str:
        return self.cutoff.strftime("%Y-%m-%d")


def cutoffs(events: pl.DataFrame | pl.LazyFrame, quantiles: Sequence[float] = QUANTILES) -> list[datetime]:
    """The event-time quantiles, each an event's own timestamp (nearest), in time order."""
    times = events.lazy().select(pl.col("timestamp").cast(TIMESTAMP))
    values = times.select([pl.col("timestamp").quantile(q, "nearest").alias(str(i)) for i, q in enumerate(quantiles)])
    return sorted(values.collect().row(0))


def catalogue_at(items: pl.DataFrame | pl.LazyFrame, events: pl.DataFrame | pl.LazyFrame, cutoff: datetime,
                 released: pl.Expr = TITLE_YEAR) -> pl.DataFrame:
    """The items released by the cutoff's year, plus any item with an event before the cutoff."""
    items = items.lazy()
    if "title" not in items.collect_schema().names() and released is TITLE_YEAR:
        raise DataError("the rolling split reads each item's release year from its title ('Heat (1995)'), and the "
                        "items have no 'title' column; add one, or pass released= an expression giving the year.")
    with_events = events.lazy().filter(pl.col("timestamp").cast(TIMESTAMP) < cutoff).select("item_id").unique()
    known = items.join(with_events.with_columns(pl.lit(True).alias("_had_event")), on="item_id", how="left")
    return (known.filter((released <= cutoff.year).fill_null(False) | pl.col("_had_event").fill_null(False))
            .drop("_had_event").sort("item_id").collect())


def window_at(events: pl.DataFrame, items: pl.DataFrame | pl.LazyFrame, cutoff: datetime, end: datetime | None,
              min_history: int = MIN_HISTORY, released: pl.Expr = TITLE_YEAR) -> Window:
    """The training events, catalogue, requests and truth of one cutoff (see the module's docstring)."""
    events = events.with_columns(pl.col("timestamp").cast(TIMESTAMP))
    before = events.filter(pl.col("timestamp") < cutoff)
    after = events.filter(pl.col("timestamp") >= cutoff)
    if end is not None:
        after = after.filter(pl.col("timestamp") < end)
    catalogue = catalogue_at(items, before, cutoff, released)
    active = before.group_by("user_id").len().filter(pl.col("len") >= min_history).select("user_id")
    seen = before.select("user_id", "item_id").unique()
    had_event = before.select("item_id").unique().with_columns(pl.lit(False).alias("cold"))
    truth = (after.select("user_id", "item_id").unique()
             .join(active, on="user_id", how="semi")
             .join(catalogue.select("item_id"), on="item_id", how="semi")
             .join(seen, on=["user_id", "item_id"], how="anti")
             .join(had_event, on="item_id", how="left").with_columns(pl.col("cold").fill_null(True))
             .sort("user_id", "item_id"))
    requests = truth.select("user_id").unique().sort("user_id").with_columns(pl.lit(cutoff).cast(TIMESTAMP).alias("timestamp"))
    return Window(cutoff, end, before, catalogue, requests, truth)


def windows(events: pl.DataFrame | pl.LazyFrame, items: pl.DataFrame | pl.LazyFrame,
            quantiles: Sequence[float] = QUANTILES, min_history: int = MIN_HISTORY,
            released: pl.Expr = TITLE_YEAR) -> list[Window]:
    """One `Window` per cutoff, in time order; each runs to the next cutoff, the last to the end."""
    events = events.lazy().collect()
    items = items.lazy().collect()
    times = cutoffs(events, quantiles)
    ends: list[datetime | None] = [*times[1:], None]
    return [window_at(events, items, c, end, min_history, released) for c, end in zip(times, ends)]


def spread(chosen: Sequence[Window], n: int | None) -> list[Window]:
    """`n` of the windows, evenly spaced from the first to the last (all of them when n is None or larger)."""
    if n is None or n >= len(chosen):
        return list(chosen)
    if n < 1:
        raise ValueError(f"need at least one cutoff, got {n}")
    positions = sorted({int(p) for p in np.round(np.linspace(0, len(chosen) - 1, n))})
    return [chosen[p] for p in positions]
