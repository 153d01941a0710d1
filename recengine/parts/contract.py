"""Contract checks every part must pass, built-in or plugin (in the manner of scikit-learn's
`check_estimator`). A plugin author runs them in their own tests:

    from recengine.parts.contract import check_extractor, check_source
    def test_my_extractor():
        check_extractor(MyExtractor, {"field": "title"})

`check_extractor` asserts that `transform` gives one row per request with the declared columns, the
same on a second call and whatever the request order; that no event at or after a request's time
changes its values; that a declared `scope` holds; and, for a part with `prepare`/`serve`, that
serving equals `transform` at the serving time, to the bit, for known and unknown users and items
(and `serve_whole` equals `serve`). `check_source` asserts the same of a candidate source's
proposals. Each failure is an AssertionError that says what differs.

Both run on a small sample log (`sample_events`, `sample_items`: titles from a small vocabulary, a
category field, a year and a price) unless given data of your own.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

import numpy as np
import polars as pl

from recengine.core.data import Dataset
from recengine.parts.candidates import generate
from recengine.parts.context import FeatureContext, compute_features, fit_learned
from recengine.parts.protocol import history_depth, learns, scope_of, serves

WORDS = ("space star war alien love story romance robot galaxy heart wedding comedy drama action "
         "adventure ship planet kiss paris summer night dark future time travel").split()
START = datetime(2024, 1, 1)


def sample_items(n_items: int = 60, seed: int = 0) -> pl.DataFrame:
    """A catalogue: two-word titles (some repeated), a category field, a year and a price with gaps."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=(n_items, 2))
    return pl.DataFrame({
        "item_id": np.arange(n_items),
        "title": [f"{a} {b}" for a, b in words],
        "genres": [f"{WORDS[i % 5]}|{WORDS[5 + i % 3]}" if i % 4 else WORDS[i % 5] for i in range(n_items)],
        "year": 1960 + rng.integers(0, 60, n_items),
        "price": [None if i % 11 == 0 else float(np.round(rng.uniform(1, 30), 2)) for i in range(n_items)],
    })


def sample_events(n_users: int = 40, n_items: int = 60, per_user: int = 15, seed: int = 0) -> pl.DataFrame:
    """Users with tastes (a third of the catalogue each, mostly), hours apart, some events sharing a time."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    liked = (users % 3) * (n_items // 3) + rng.integers(0, n_items // 3, len(users))
    items = np.where(rng.random(len(users)) < 0.8, liked, rng.integers(0, n_items, len(users)))
    hours = np.concatenate([np.sort(rng.integers(0, 24 * 40, per_user)) for _ in range(n_users)])
    return pl.DataFrame({
        "user_id": users, "item_id": items,
        "timestamp": [START + timedelta(hours=int(h)) for h in hours],
        "value": rng.integers(1, 6, len(users)).astype(float),
    })


def _data(events: pl.DataFrame | None, items: pl.DataFrame | None) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    events = sample_events() if events is None else events
    items = sample_items() if items is None and events is not None else items
    dataset = Dataset(events.lazy(), items.lazy() if items is not None else None)
    return dataset.events.collect(), dataset.items.collect() if dataset.items is not None else None


def _requests(events: pl.DataFrame, items: pl.DataFrame | None, at: list[datetime], seed: int) -> pl.DataFrame:
    """Rows for known users and one unknown user, known items and one unknown item, at times `at`."""
    rng = np.random.default_rng(seed)
    users = events["user_id"].unique().sort()
    known_items = (items["item_id"] if items is not None else events["item_id"]).unique().sort()
    chosen_users = users.gather(rng.choice(len(users), min(6, len(users)), replace=False)).to_list()
    chosen_items = known_items.gather(rng.choice(len(known_items), min(12, len(known_items)), replace=False)).to_list()
    unknown_user, unknown_item = _absent(users), _absent(known_items)
    rows = [(u, i, t) for t in at for u in [*chosen_users, unknown_user] for i in [*chosen_items, unknown_item]]
    return pl.DataFrame(rows, schema={"user_id": users.dtype, "item_id": known_items.dtype, "timestamp": pl.Datetime("ms")},
                        orient="row")


def _absent(ids: pl.Series) -> Any:
    return "\x00absent" if ids.dtype == pl.String else int(ids.max()) + 1000


def _context(events: pl.DataFrame, items: pl.DataFrame | None, part: Any, until: datetime) -> FeatureContext:
    """A context over `events`; a learned part is fit on those before `until` (the window's end)."""
    context = FeatureContext.from_frames(events, items)
    if learns(part):
        fit_learned([part], context, until)
    return context


def _equal(a: pl.DataFrame, b: pl.DataFrame, columns: list[str], what: str) -> None:
    for column in columns:
        x, y = a[column].cast(pl.Float64).fill_nan(None), b[column].cast(pl.Float64).fill_nan(None)
        if not x.equals(y):
            diff = a.select("user_id", "item_id", "timestamp").with_columns(x.alias("first"), y.alias("second"))
            diff = diff.filter(~(pl.col("first").eq_missing(pl.col("second"))))
            raise AssertionError(f"{what}: column '{column}' differs in {diff.height} rows, e.g.\n{diff.head(5)}")


def _later_events(events: pl.DataFrame, requests: pl.DataFrame) -> pl.DataFrame:
    """Events at and after each request's time, for its user and item: what must change nothing."""
    keys = requests.select("user_id", "item_id", "timestamp").unique().sort("user_id", "item_id", "timestamp")
    extra = pl.concat([keys, keys.with_columns(pl.col("timestamp") + timedelta(days=3))])
    if "value" in events.columns:
        extra = extra.with_columns(pl.lit(5.0).alias("value"))
    return pl.concat([events, extra.select(events.columns)], how="vertical_relaxed")


def check_extractor(factory: Callable[..., Any], params: dict[str, Any] | None = None,
                    events: pl.DataFrame | None = None, items: pl.DataFrame | None = None) -> None:
    """Assert the feature-extractor contract for `factory(**params)` (see the module docstring)."""
    part = factory(**(params or {}))
    name = type(part).__name__
    columns = list(part.columns)
    assert columns and len(set(columns)) == len(columns), f"{name}.columns must be distinct names: {columns}"
    events, items = _data(events, items)
    span = events["timestamp"]
    at = [span.min() + (span.max() - span.min()) * f for f in (0.0, 0.5, 1.0)] + [span.max() + timedelta(seconds=1)]
    until = at[1]  # a learned part learns from the first half; a request before that must get nothing from it
    context = _context(events, items, part, until)
    requests = _requests(events, items, at, seed=1)
    first = compute_features(requests, [part], context)
    assert first.height == requests.height and set(columns) <= set(first.columns), f"{name}.transform: one row per request"
    _equal(first, compute_features(requests, [part], context), columns, f"{name}: transform twice")
    shuffled = requests.with_row_index("_order").sample(fraction=1.0, shuffle=True, seed=3)
    again = compute_features(shuffled.drop("_order"), [part], context).with_columns(shuffled["_order"]).sort("_order")
    _equal(first, again, columns, f"{name}: requests in another order")
    for t in at:  # one time at a time: an event after one request may be before the next
        now = pl.col("timestamp") == t
        later = compute_features(requests.filter(now), [part], _context(_later_events(events, requests.filter(now)), items, part, until))
        _equal(first.filter(now), later, columns, f"{name}: events at or after a request's time changed its values (leakage)")
    _check_scope(part, requests, first, context, columns)
    if serves(part):
        _check_serving(part, events, items, columns)


def _check_scope(part, requests: pl.DataFrame, values: pl.DataFrame, context, columns: list[str]) -> None:
    scope, name = scope_of(part), type(part).__name__
    if scope == "user_item":
        return
    # Item scope: the same item at the same time has the same values for every user (user scope: alike).
    key = "item_id" if scope == "item" else "user_id"
    other = "user_id" if scope == "item" else "item_id"
    swapped = requests.with_columns(pl.col(other).shuffle(seed=5).over(key, "timestamp"))
    _equal(values, compute_features(swapped, [part], context), columns,
           f"{name} declares scope '{scope}', but its values change with the {other.removesuffix('_id')}")


def _check_serving(part, events: pl.DataFrame, items: pl.DataFrame | None, columns: list[str]) -> None:
    from recengine.parts.snapshot import Snapshot

    name = type(part).__name__
    context = FeatureContext.from_frames(events, items)
    snapshot = Snapshot(context, max(history_depth(part), 1))
    tables = part.prepare(snapshot)
    requests = _requests(events, items, [snapshot.at], seed=2)
    batch = compute_features(requests, [part], FeatureContext.from_frames(events, items))
    served = []
    for (user,), rows in requests.with_row_index("_r").group_by("user_id", maintain_order=True):
        values = part.serve(tables, user, snapshot.index(rows["item_id"]))
        assert set(values) == set(columns), f"{name}.serve must return exactly its columns, got {sorted(values)}"
        served.append(rows.select("_r").with_columns(pl.Series(c, np.asarray(values[c], dtype=np.float64)) for c in columns))
        whole = getattr(part, "serve_whole", None)
        if callable(whole):
            every = whole(tables, [user])[user]
            for c in columns:
                expected = np.asarray(values[c], dtype=np.float64)
                got = np.asarray(every[c], dtype=np.float64)[snapshot.index(rows["item_id"])]
                assert np.array_equal(expected, got, equal_nan=True), f"{name}.serve_whole differs from serve in '{c}' (user {user!r})"
    served_frame = requests.with_row_index("_r").join(pl.concat(served), on="_r").sort("_r")
    _equal(batch, served_frame, columns, f"{name}: serve differs from transform at the serving time")


def check_source(factory: Callable[..., Any], params: dict[str, Any] | None = None,
                 events: pl.DataFrame | None = None, items: pl.DataFrame | None = None) -> None:
    """Assert the candidate-source contract for `factory(**params)` (see the module docstring)."""
    part = factory(**(params or {}))
    part.name = getattr(part, "name", "checked")
    name = type(part).__name__
    events, items = _data(events, items)
    span = events["timestamp"]
    at = [span.min() + (span.max() - span.min()) * f for f in (0.25, 0.75)] + [span.max() + timedelta(seconds=1)]
    until = span.min() + (span.max() - span.min()) * 0.5
    context = _context(events, items, part, until)
    users = events["user_id"].unique().sort()
    requests = pl.DataFrame({"user_id": [u for _ in at for u in [*users.head(8).to_list(), _absent(users)]],
                             "timestamp": [t for t in at for _ in range(9)]},
                            schema={"user_id": users.dtype, "timestamp": pl.Datetime("ms")})
    keyed = requests.with_row_index("_request").lazy()
    raw = part.generate(keyed, context).collect()
    assert {"_request", "item_id", "score"} <= set(raw.columns), f"{name}.generate must return _request, item_id, score"
    assert (raw.group_by("_request").len()["len"].max() or 0) <= part.k, f"{name}: more than k={part.k} rows for a request"
    assert raw.select("_request", "item_id").is_unique().all(), f"{name}: an item proposed twice to one request"
    first = generate(requests, [part], context, exclude_seen=False)
    key = ["user_id", "timestamp", "item_id"]
    _equal(first.sort(key), generate(requests.reverse(), [part], context, exclude_seen=False).sort(key),
           [c for c in first.columns if c.startswith("cand_")], f"{name}: requests in another order")
    for t in at:  # one time at a time: an event after one request may be before the next
        now = first.filter(pl.col("timestamp") == t).sort(key)
        later_events = _later_events(events, now.select("user_id", "item_id", "timestamp"))
        later = generate(requests.filter(pl.col("timestamp") == t), [part], _context(later_events, items, part, until),
                         exclude_seen=False).sort(key)
        assert now.select(key).equals(later.select(key)), f"{name}: events at or after a request's time changed which items it proposes (leakage)"
        _equal(now, later, [c for c in first.columns if c.startswith("cand_")],
               f"{name}: events at or after a request's time changed its candidates' scores (leakage)")
    if scope_of(part) == "item":
        per_time = first.group_by("timestamp").agg(pl.col("user_id").n_unique().alias("users"), pl.len().alias("rows"),
                                                    pl.col("item_id").n_unique().alias("items"))
        assert (per_time["rows"] == per_time["users"] * per_time["items"]).all(), \
            f"{name} declares scope 'item', but proposes different items to different users at one time"
