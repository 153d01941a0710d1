"""The rolling-origin split (recengine.core.rolling) on a small synthetic log, checked against a brute-force
reading of the protocol: no training event at or after the cutoff, the catalogue at c, the requests,
and a truth without seen or unreleased items."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from recengine.core import rolling
from recengine.errors import DataError

START = datetime(2020, 7, 1)


def synthetic_log(n_events: int = 1001, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Events 13 hours apart from mid-2020 to 2021 (distinct times, so quantiles are exact events), by
    25 users on 60 items; titles carry years 2019-2022, and a few carry none."""
    rng = np.random.default_rng(seed)
    step = timedelta(hours=13)
    events = pl.DataFrame({
        "user_id": rng.integers(0, 25, n_events),
        # The catalogue grows: items 40..59 first appear over time, so some truth is cold.
        "item_id": (rng.random(n_events) * (40 + 20 * np.arange(n_events) / n_events)).astype(np.int64),
        "timestamp": [START + i * step for i in range(n_events)],
        "value": rng.integers(1, 6, n_events).astype(float),
    })
    years = [2019 + i % 4 for i in range(60)]
    items = pl.DataFrame({
        "item_id": np.arange(60),
        "title": [f"Film {i}" if i % 11 == 0 else f"Film {i} ({years[i]})" for i in range(60)],
    })
    # Items 60..64 never get an event: released ones are in every catalogue of their year on.
    extra = pl.DataFrame({"item_id": np.arange(60, 65), "title": [f"Quiet {i} (2020)" for i in range(60, 65)]})
    return events, pl.concat([items, extra])


def year_of(title: str) -> int | None:
    return int(title[-5:-1]) if title.endswith(")") else None


def test_cutoffs_are_the_event_time_quantiles():
    events, _ = synthetic_log()
    times = events["timestamp"].to_list()
    # 1001 events: the q-quantile is exactly event number 1000 q.
    assert rolling.cutoffs(events) == [times[round(1000 * q)] for q in rolling.QUANTILES]
    assert rolling.QUANTILES == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_windows_follow_the_protocol():
    events, items = synthetic_log()
    windows = rolling.windows(events, items)
    cuts = rolling.cutoffs(events)
    assert [w.cutoff for w in windows] == cuts
    assert [w.end for w in windows] == [*cuts[1:], None]
    titles = dict(items.select("item_id", "title").iter_rows())
    rows = events.sort("timestamp").iter_rows(named=True)
    log = [(r["user_id"], r["item_id"], r["timestamp"]) for r in rows]
    total_requests = unreleased_dropped = 0
    for w in windows:
        c, end = w.cutoff, w.end
        past = [(u, i) for u, i, t in log if t < c]
        # Training data: every event before c, none at or after it.
        assert w.events.height == len(past)
        assert w.events["timestamp"].max() < c
        # The catalogue: released by c's year, or with an event before c.
        with_event = {i for _, i in past}
        expected = {i for i, title in titles.items()
                    if (year_of(title) is not None and year_of(title) <= c.year) or i in with_event}
        assert set(w.items["item_id"].to_list()) == expected
        assert w.items.columns == items.columns
        # Truth: catalogue items new to the user in [c, end), for users with 5+ events before c.
        seen = set(past)
        history = {u: sum(1 for v, _ in past if v == u) for u, _ in past}
        later = {(u, i) for u, i, t in log if t >= c and (end is None or t < end)}
        truth = {(u, i) for u, i in later if history.get(u, 0) >= 5 and (u, i) not in seen and i in expected}
        unreleased_dropped += len({(u, i) for u, i in later if history.get(u, 0) >= 5 and (u, i) not in seen} - truth)
        got = set(w.truth.select("user_id", "item_id").iter_rows())
        assert got == truth and w.truth.height == len(truth)
        assert not got & seen  # nothing the user had seen before c
        for _, item in got:  # nothing unreleased at c (unless it already had an event)
            year = year_of(titles[item])
            assert item in with_event or (year is not None and year <= c.year)
        cold = {i for _, i, is_cold in w.truth.iter_rows() if is_cold}
        assert cold == {i for _, i in truth} - with_event
        # Requests: each user with truth, once, at the cutoff.
        assert w.requests["user_id"].to_list() == sorted({u for u, _ in truth})
        assert w.requests["timestamp"].to_list() == [c] * w.requests.height
        total_requests += w.requests.height
    assert total_requests > 50 and unreleased_dropped > 0  # the log is big enough to test something
    assert any(w.truth["cold"].any() for w in windows) and not all(w.truth["cold"].all() for w in windows)


def test_unreleased_items_are_left_out_until_they_have_an_event():
    events, items = synthetic_log()
    windows = rolling.windows(events, items)
    first = windows[0]  # early 2021: the 2022 titles are unreleased
    unreleased = items.filter(pl.col("title").str.ends_with("(2022)"))["item_id"].to_list()
    had_event = set(first.events["item_id"].to_list())
    in_catalogue = set(first.items["item_id"].to_list())
    assert {i for i in unreleased if i not in had_event}.isdisjoint(in_catalogue)
    assert {i for i in unreleased if i in had_event} <= in_catalogue
    assert {60, 61, 62, 63, 64} <= in_catalogue  # released 2020, never an event


def test_spread_keeps_evenly_spaced_cutoffs_with_their_full_windows():
    events, items = synthetic_log()
    windows = rolling.windows(events, items)
    assert [w.cutoff for w in rolling.spread(windows, 2)] == [windows[0].cutoff, windows[-1].cutoff]
    five = rolling.spread(windows, 5)
    assert [w.cutoff for w in five] == [windows[i].cutoff for i in (0, 2, 4, 7, 9)]
    assert five[0].end == windows[1].cutoff  # a window still ends at the protocol's next cutoff
    assert rolling.spread(windows, None) == windows and rolling.spread(windows, 20) == windows


def test_items_without_titles_are_refused():
    events, items = synthetic_log()
    with pytest.raises(DataError, match="title"):
        rolling.windows(events, items.drop("title"))
