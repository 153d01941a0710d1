"""Feature extractors: the interface, the context they read, and the built-in behaviour features.

An extractor receives requests `(_row, user_id, item_id, timestamp, ...)` as a LazyFrame and returns
`_row` plus its `columns`. It may read anything in the `FeatureContext`, but only events strictly
before each request's timestamp may shape that request's values: build on `recengine.pit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

import recengine
from recengine.data import TIMESTAMP
from recengine.encoders import EmbeddingCache
from recengine.errors import ConfigError
from recengine.plugins import check_number
from recengine.pit import DAY, asof_before, cumulative, recent_history, totals_before


class FeatureExtractor(Protocol):
    columns: list[str]

    def transform(self, requests: pl.LazyFrame, context: "FeatureContext") -> pl.LazyFrame:
        """`_row` plus `self.columns` for each request row."""


@dataclass
class FeatureContext:
    """What extractors read: the event log, the catalogue, the embedding cache, shared work.

    With impression logs, `events` holds what users did (rows without a label, or with label > 0)
    and `impressions` what they were shown (rows with a label, clicked or not).
    """

    events: pl.LazyFrame
    items: pl.LazyFrame | None = None
    impressions: pl.LazyFrame | None = None
    cache: EmbeddingCache | None = None
    progress: bool = False
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_frames(cls, events: pl.LazyFrame | pl.DataFrame, items=None, **kwargs: Any) -> "FeatureContext":
        # Collected once: every extractor re-reads the events, and a scan would re-parse the file.
        events = events.lazy().with_columns(pl.col("timestamp").cast(TIMESTAMP)).collect()
        items = items.lazy().collect().lazy() if items is not None else None
        impressions = None
        if "label" in events.columns:
            # An item shown and not clicked is not something the user did: it feeds CTR only.
            impressions = events.filter(pl.col("label").is_not_null()).lazy()
            events = events.filter(pl.col("label").is_null() | (pl.col("label") > 0))
        return cls(events=events.lazy(), items=items, impressions=impressions, **kwargs)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """Compute shared work (pair tables, embeddings) once per context."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def item_field(self, field: str, part: str) -> pl.LazyFrame:
        """The catalogue, checked to hold `field`, or an error saying what `part` needs."""
        if self.items is None:
            raise ConfigError(f"{part} reads the item field '{field}', but no items table was given; pass --items "
                              "(a catalogue with item_id and that field) or drop it from the feature set.")
        schema = self.items.collect_schema()
        if field not in schema:
            raise ConfigError(f"{part}: the items have no field '{field}'; they have {schema.names()}.")
        return self.items

    def has(self, column: str) -> bool:
        return column in self.events.collect_schema()

    def covisitation_pairs(self, window: int, directed: bool = False) -> pl.LazyFrame:
        """The co-visitation pair table, built once per context, window and direction."""
        return self.memo(("covis_pairs", window, directed), lambda: covisitation_pairs(self.events, window, directed).collect().lazy())

    def covisitation_totals(self, window: int, directed: bool = False) -> tuple[pl.Series, sp.csr_matrix]:
        """Every pair's count over all events, as a sparse item x item matrix, and the item ids of its
        rows and columns: what a request after the last pair sees. Built once per context."""
        return self.memo(("covis_totals", window, directed), lambda: covisitation_totals(self._sequences(), window, directed))

    def covisitation_last(self, window: int) -> Any:
        """When the latest co-visitation pair formed (either direction): requests after it see all pairs."""
        return self.memo(("covis_last", window), lambda: covisitation_last(self._sequences(), window))

    def _sequences(self) -> Sequences:
        return self.memo("covis_sequences", lambda: Sequences.of(self.events))


def compute_features(
    requests: pl.DataFrame, extractors: Sequence[FeatureExtractor], context: FeatureContext
) -> pl.DataFrame:
    """`requests` (user_id, item_id, timestamp, ...) with every extractor's columns added, same row order."""
    keyed = requests.with_row_index("_row").with_columns(pl.col("timestamp").cast(TIMESTAMP))
    lazy = keyed.lazy()
    out = keyed
    for extractor in extractors:
        values = extractor.transform(lazy, context).collect()
        # Features are numbers to LightGBM; one dtype keeps model inputs and logged schemas uniform.
        values = values.select("_row", pl.col(extractor.columns).cast(pl.Float64))
        out = out.join(values, on="_row", how="left", maintain_order="left")
    return out.drop("_row")


# Fixed point at 2^-30 (about 1e-9): scaling by a power of two is exact, so whole numbers stay whole
# and numpy and polars do the very same float operations.
FIXED_POINT, RESOLUTION = 2.0**30, 2.0**-30


def _exact_sum(expr: pl.Expr) -> pl.Expr:
    """A sum of floats in fixed point (2^-30): integer addition does not depend on the order a parallel
    group-by adds in, so the same data always gives the same features, and the same model."""
    return (expr * FIXED_POINT).round().cast(pl.Int64).sum() * RESOLUTION


def exact_sum(terms: np.ndarray, axis: int = 0) -> np.ndarray:
    """`_exact_sum` over a numpy axis: the same fixed point, so a serving path equals batch to the bit."""
    return np.round(terms * FIXED_POINT).sum(axis=axis) * RESOLUTION


def _days(expr: pl.Expr) -> pl.Expr:
    return expr.dt.total_milliseconds().cast(pl.Float64) / DAY.total_seconds() / 1000


class ItemPopularity:
    """Events per item before t: all time, in trailing windows, and exponentially decayed."""

    def __init__(self, windows_days: Sequence[float] = (1, 7, 30, 365), half_lives_days: Sequence[float] = (14,)):
        for days in windows_days:
            check_number("item_popularity", "windows_days", days, above=0)
        for days in half_lives_days:
            check_number("item_popularity", "half_lives_days", days, above=0)
        self.windows = list(windows_days)
        self.half_lives = list(half_lives_days)
        self.columns = (
            ["item_count_all"]
            + [f"item_count_{w:g}d" for w in self.windows]
            + [f"item_decay_{h:g}d" for h in self.half_lives]
        )

    def transform(self, requests, context):
        table = context.memo("item_counts", lambda: cumulative(context.events, "item_id", {"n": pl.len()}).collect()).lazy()
        keys = requests.select("_row", "item_id", "timestamp")
        out = totals_before(keys, table, "item_id", ["n"]).rename({"n": "item_count_all"})
        for window in self.windows:
            start = totals_before(keys, table, "item_id", ["n"], at=pl.col("timestamp") - DAY * window)
            out = out.join(start, on="_row").with_columns(
                (pl.col("item_count_all") - pl.col("n")).alias(f"item_count_{window:g}d")
            ).drop("n")
        for half_life in self.half_lives:
            decayed = decayed_counts(keys, context.events, "item_id", half_life)
            out = out.join(decayed.rename({"decayed": f"item_decay_{half_life:g}d"}), on="_row")
        return out


def decayed_counts(requests: pl.LazyFrame, events: pl.LazyFrame, by: str, half_life_days: float) -> pl.LazyFrame:
    """sum(exp(-(t - ts) / tau)) over events before t, per `by`, without overflow.

    The sum factors as exp(-t/tau) * sum(exp(ts/tau)), but over years exp(ts/tau) overflows. So time is
    cut into epochs of 200 tau, each with its own origin: an event counts in its own epoch's running
    sum and, re-based, in the next epoch's total. Older events weigh under exp(-200) and are dropped.
    """
    tau = half_life_days / math.log(2) * DAY.total_seconds() * 1000
    span = 200 * tau
    ms = pl.col("timestamp").dt.epoch("ms").cast(pl.Float64)
    epoch = (ms / span).floor()
    origin = (epoch + 1) * span
    weighted = events.select(by, "timestamp", epoch.alias("_epoch"), ((ms - origin) / tau).exp().alias("w"),
                             ((ms - origin - span) / tau).exp().alias("w_next"))
    # Every event of one time has one weight, so a time's total is that weight times the count, and
    # the running totals add the times in time order: no float sum depends on a group-by's order.
    sums = {"w": pl.col("w").first() * pl.len(), "w_next": pl.col("w_next").first() * pl.len()}
    running = cumulative(weighted, [by, "_epoch"], sums)
    carried = running.group_by(by, (pl.col("_epoch") + 1).alias("_epoch")).agg(pl.col("w_next").last().alias("carry"))
    keyed = requests.with_columns(epoch.alias("_epoch"))
    same = totals_before(keyed, running, [by, "_epoch"], ["w"])
    scale = (((pl.col("_epoch") + 1) * span - ms) / tau).exp()
    return (
        keyed.join(same, on="_row")
        .join(carried, on=[by, "_epoch"], how="left")
        .select("_row", (scale * (pl.col("w") + pl.col("carry").fill_null(0))).alias("decayed"))
    )


class ItemTrend:
    """Recent against longer-run popularity: daily rate in the short window over that in the long one."""

    def __init__(self, short_days: float = 7, long_days: float = 90):
        check_number("item_trend", "short_days", short_days, above=0)
        check_number("item_trend", "long_days", long_days, above=short_days)
        self.short, self.long = short_days, long_days
        self.columns = [f"item_trend_{short_days:g}d_{long_days:g}d"]

    def transform(self, requests, context):
        counts = ItemPopularity(windows_days=(self.short, self.long), half_lives_days=()).transform(requests, context)
        short, long = pl.col(f"item_count_{self.short:g}d"), pl.col(f"item_count_{self.long:g}d")
        return counts.select("_row", ((short / self.short) / ((long + 1) / self.long)).alias(self.columns[0]))


class ItemAge:
    """Days since the item's first event, if that was before t (else null: not yet seen)."""

    columns = ["item_age_days"]

    def transform(self, requests, context):
        first = context.events.group_by("item_id").agg(pl.col("timestamp").min().alias("_first"))
        joined = requests.select("_row", "item_id", "timestamp").join(first, on="item_id", how="left")
        age = pl.when(pl.col("_first") < pl.col("timestamp")).then(_days(pl.col("timestamp") - pl.col("_first")))
        return joined.select("_row", age.alias("item_age_days"))


class ItemValue:
    """Mean event value (e.g. rating) of the item before t, shrunk towards the global mean before t."""

    columns = ["item_value_mean"]

    def __init__(self, prior_weight: float = 5.0):
        check_number("item_value", "prior_weight", prior_weight, minimum=0)
        self.prior_weight = prior_weight

    def transform(self, requests, context):
        if not context.has("value"):
            return requests.select("_row", pl.lit(None, pl.Float64).alias("item_value_mean"))
        keys = requests.select("_row", "item_id", "timestamp", pl.lit(0).alias("_all"))
        sums = {"n": pl.len(), "v": pl.col("value").sum()}
        item = totals_before(keys, cumulative(context.events, "item_id", sums), "item_id", ["n", "v"])
        everyone = cumulative(context.events.with_columns(pl.lit(0).alias("_all")), "_all", sums)
        prior = totals_before(keys, everyone, "_all", ["n", "v"]).rename({"n": "gn", "v": "gv"})
        mean = (pl.col("v") + self.prior_weight * pl.col("gv") / pl.col("gn")) / (pl.col("n") + self.prior_weight)
        return item.join(prior, on="_row").select("_row", pl.when(pl.col("gn") > 0).then(mean).alias("item_value_mean"))


class ItemCTR:
    """Clicks per impression of the item before t, with a Beta prior at the global rate before t."""

    columns = ["item_ctr", "item_impressions"]

    def __init__(self, prior_weight: float = 20.0):
        check_number("item_ctr", "prior_weight", prior_weight, minimum=0)
        self.prior_weight = prior_weight

    def transform(self, requests, context):
        if context.impressions is None:
            return requests.select("_row", *(pl.lit(None, pl.Float64).alias(c) for c in self.columns))
        shown = context.impressions.with_columns(pl.lit(0).alias("_all"))
        sums = {"imp": pl.len(), "clk": (pl.col("label") > 0).sum()}
        keys = requests.select("_row", "item_id", "timestamp", pl.lit(0).alias("_all"))
        item = totals_before(keys, cumulative(shown, "item_id", sums), "item_id", ["imp", "clk"])
        prior = totals_before(keys, cumulative(shown, "_all", sums), "_all", ["imp", "clk"]).rename({"imp": "gi", "clk": "gc"})
        rate = pl.when(pl.col("gi") > 0).then(pl.col("gc") / pl.col("gi")).otherwise(0.0)
        ctr = (pl.col("clk") + self.prior_weight * rate) / (pl.col("imp") + self.prior_weight)
        return item.join(prior, on="_row").select("_row", ctr.alias("item_ctr"), pl.col("imp").cast(pl.Float64).alias("item_impressions"))


class UserActivity:
    """The user's events before t: count, days since the last and the first, mean value."""

    columns = ["user_count", "user_days_since_last", "user_days_active", "user_value_mean"]

    def transform(self, requests, context):
        value = pl.col("value") if context.has("value") else pl.lit(None, pl.Float64)
        table = cumulative(context.events.with_columns(value.alias("_v")), "user_id", {"n": pl.len(), "v": pl.col("_v").sum()})
        table = table.with_columns(pl.col("timestamp").alias("_last"))
        first = context.events.group_by("user_id").agg(pl.col("timestamp").min().alias("_first"))
        keys = requests.select("_row", "user_id", "timestamp")
        joined = asof_before(keys, table.select("user_id", "timestamp", "n", "v", "_last"), "user_id")
        joined = joined.join(first, on="user_id", how="left")
        seen = pl.col("n").is_not_null()
        return joined.select(
            "_row",
            pl.col("n").fill_null(0).cast(pl.Float64).alias("user_count"),
            pl.when(seen).then(_days(pl.col("timestamp") - pl.col("_last"))).alias("user_days_since_last"),
            pl.when(seen).then(_days(pl.col("timestamp") - pl.col("_first"))).alias("user_days_active"),
            pl.when(seen & (pl.col("v") != 0)).then(pl.col("v") / pl.col("n")).alias("user_value_mean"),
        )


class CategoryAffinity:
    """Share of the user's events before t that fell in each of the item's categories (mean, max)."""

    def __init__(self, field: str = "genres", separator: str = "|"):
        if not separator:
            raise ConfigError("category_affinity: separator = ''; give the string between categories, e.g. \"|\".")
        self.field, self.separator = field, separator
        self.columns = [f"affinity_{field}_mean", f"affinity_{field}_max"]

    def transform(self, requests, context):
        categories = (
            context.item_field(self.field, "category_affinity").select("item_id", pl.col(self.field).cast(pl.String).str.split(self.separator).alias("_cat"))
            .explode("_cat")
            .filter(pl.col("_cat").is_not_null() & (pl.col("_cat") != ""))
        )
        per_user = cumulative(context.events.select("user_id", "timestamp"), "user_id", {"total": pl.len()})
        per_cat = cumulative(
            context.events.select("user_id", "item_id", "timestamp").join(categories, on="item_id"),
            ["user_id", "_cat"],
            {"hits": pl.len()},
        )
        keys = requests.select("_row", "user_id", "item_id", "timestamp")
        total = totals_before(keys, per_user, "user_id", ["total"])
        exploded = keys.join(categories, on="item_id").with_row_index("_pair").rename({"_row": "_request"})
        hits = totals_before(exploded.rename({"_pair": "_row"}), per_cat, ["user_id", "_cat"], ["hits"])
        share = (
            exploded.join(hits.rename({"_row": "_pair"}), on="_pair")
            .group_by("_request")
            .agg(pl.col("hits").mean().alias("_mean"), pl.col("hits").max().alias("_max"))
            .rename({"_request": "_row"})
        )
        out = total.join(share, on="_row", how="left")
        ratio = lambda c: pl.when(pl.col("total") > 0).then(pl.col(c) / pl.col("total"))  # noqa: E731
        return out.select("_row", ratio("_mean").alias(self.columns[0]), ratio("_max").alias(self.columns[1]))


class ItemAttribute:
    """Numeric item fields (a release year, a price) as features, and their distance to the mean of
    the user's last `recent` items before t: how far the item sits from what the user just chose."""

    def __init__(self, fields: Sequence[str] = ("year",), recent: int = 10):
        if not fields:
            raise ConfigError("item_attribute: fields = []; name at least one numeric item field.")
        check_number("item_attribute", "recent", recent, integer=True, minimum=1)
        self.fields, self.recent = list(fields), recent
        self.columns = [f"{kind}_{f}" for f in self.fields for kind in ("item", "user_gap")]

    def transform(self, requests, context):
        for f in self.fields:
            if not context.item_field(f, "item_attribute").collect_schema()[f].is_numeric():
                raise ConfigError(f"item_attribute: item field '{f}' is not numeric; give numeric fields only.")
        values = context.items.select("item_id", *(pl.col(f).cast(pl.Float64) for f in self.fields))
        keys = requests.select("_row", "user_id", "item_id", "timestamp")
        history = recent_history(keys.select("user_id", "timestamp").unique(), context.events, self.recent)
        # Means from exact sums: the same in any row order, and equal to the serving path's.
        means = history.join(values, left_on="h_item", right_on="item_id").group_by("user_id", "timestamp").agg(
            pl.when(pl.col(f).count() > 0).then(_exact_sum(pl.col(f)) / pl.col(f).count()).alias(f"_mean_{f}")
            for f in self.fields
        )
        joined = keys.join(values, on="item_id", how="left").join(means, on=["user_id", "timestamp"], how="left")
        return joined.select("_row", *(
            e for f in self.fields
            for e in (pl.col(f).alias(f"item_{f}"), (pl.col(f) - pl.col(f"_mean_{f}")).abs().alias(f"user_gap_{f}"))
        ))


def check_window(window: int, part: str) -> None:
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"{part}: window = {window!r}; give a whole number of events, 1 or more.")


def covisitation_pairs(events: pl.LazyFrame, window: int, directed: bool = False) -> pl.LazyFrame:
    """(a, b, timestamp): b followed a within `window` of one user's events, dated when the later one
    happened; both ways unless `directed` (then only earlier a, later b: what comes next)."""
    ordered = events.sort("user_id", "timestamp", "item_id").select("user_id", "item_id", "timestamp")
    pairs = []
    for lag in range(1, window + 1):
        earlier = pl.col("item_id").shift(lag).over("user_id")
        pairs.append(ordered.select(earlier.alias("a"), pl.col("item_id").alias("b"), "timestamp"))
        if not directed:
            pairs.append(ordered.select(pl.col("item_id").alias("a"), earlier.alias("b"), "timestamp"))
    return pl.concat(pairs).drop_nulls().filter(pl.col("a") != pl.col("b"))


def covisitation_totals(sequences: Sequences, window: int, directed: bool = False) -> tuple[pl.Series, sp.csr_matrix]:
    """The pairs of `covisitation_pairs` counted over all time, as a sparse item x item matrix, and the
    item ids of its rows and columns. Built from shifted index arrays, not the pair table: for a wide
    window that table has millions of rows, and grouping them costs 2.5x more."""
    ids, user, item, _ = sequences
    earlier, later = [], []
    for lag in range(1, window + 1):
        paired = _paired(user, item, lag)
        earlier.append(item[:-lag][paired])
        later.append(item[lag:][paired])
    a, b = np.concatenate(earlier), np.concatenate(later)
    following = sp.csr_matrix((np.ones(len(a)), (a, b)), shape=(len(ids), len(ids)))  # duplicates summed
    totals = following if directed else (following + following.T).tocsr()
    totals.sum_duplicates()
    return ids, totals


def covisitation_last(sequences: Sequences, window: int) -> Any:
    """The time of the latest pair of `covisitation_pairs` (None without pairs), without the table."""
    _, user, item, times = sequences
    later = np.zeros(len(item), dtype=bool)
    for lag in range(1, window + 1):
        later[lag:] |= _paired(user, item, lag)
    return times.filter(pl.Series(later)).max() if later.any() else None


class Sequences(NamedTuple):
    """Events in the pair tables' order as arrays: the sorted item ids, then per event a user run
    number, the item's index in those ids, and the time. Read by both the totals and the last time."""

    ids: pl.Series
    user: np.ndarray
    item: np.ndarray
    times: pl.Series

    @classmethod
    def of(cls, events: pl.LazyFrame) -> Sequences:
        ordered = events.sort("user_id", "timestamp", "item_id").select(
            pl.col("user_id").rle_id(), "item_id", (pl.col("item_id").rank("dense") - 1).cast(pl.Int64).alias("_i"), "timestamp",
        ).collect()
        return cls(ordered["item_id"].unique().sort(), ordered["user_id"].to_numpy(), ordered["_i"].to_numpy(), ordered["timestamp"])


def _paired(user: np.ndarray, item: np.ndarray, lag: int) -> np.ndarray:
    """Which events `lag` places apart (by the later one) are one user's two different items."""
    return (user[:-lag] == user[lag:]) & (item[:-lag] != item[lag:])


class Covisitation:
    """How often the item was seen next to each of the user's last `recent` items, before t.

    Columns: the sum and max over those seed items; the sum weighted by 1 / (1 + position) so the
    latest seeds count most; and a cosine-like sum, each count over sqrt(seed events x item events),
    which keeps the blockbusters every history shares from dominating. `directed` counts only
    pairs where the item came after the seed.
    """

    def __init__(self, window: int = 5, recent: int = 10, directed: bool = False):
        check_window(window, "covisitation")
        check_number("covisitation", "recent", recent, integer=True, minimum=1)
        self.window, self.recent, self.directed = window, recent, directed
        # Named by their parameters, so one feature set can use two neighbourhoods side by side.
        stem = f"covis{'_next' if directed else ''}_w{window}_r{recent}"
        self.columns = [f"{stem}_{kind}" for kind in ("sum", "max", "wsum", "cos")]

    def counts(self, context: "FeatureContext") -> pl.LazyFrame:
        """Running pair counts (a, b, timestamp, n), built once per context."""
        return context.memo(
            ("covis_counts", self.window, self.directed),
            lambda: cumulative(context.covisitation_pairs(self.window, self.directed), ["a", "b"], {"n": pl.len()}).collect(),
        ).lazy()

    def transform(self, requests, context):
        item_counts = context.memo("item_counts", lambda: cumulative(context.events, "item_id", {"n": pl.len()}).collect()).lazy()
        keys = requests.select("_row", "user_id", "item_id", "timestamp")
        profiles = keys.select("user_id", "timestamp").unique()
        # Collected before numbering: a lazy join's row order may differ between the two reads below.
        history = recent_history(profiles, context.events, self.recent).select(
            "user_id", "timestamp", pl.col("h_item").alias("a"), "h_back").collect().with_row_index("_row").lazy()
        seed_events = totals_before(history.rename({"a": "item_id"}), item_counts, "item_id", ["n"]).rename({"n": "_na"})
        history = history.join(seed_events, on="_row").drop("_row")
        expanded = keys.join(history, on=["user_id", "timestamp"]).rename({"item_id": "b", "_row": "_request"})
        expanded = expanded.with_row_index("_row")
        found = totals_before(expanded, self.counts(context), ["a", "b"], ["n"])
        n = pl.col("n").cast(pl.Float64)
        per_request = (
            expanded.select("_row", "_request", "h_back", "_na").join(found, on="_row")
            .group_by("_request").agg(
                n.sum().alias(self.columns[0]), n.max().alias(self.columns[1]),
                _exact_sum(n / (1 + pl.col("h_back"))).alias(self.columns[2]),
                _exact_sum(n / pl.col("_na").clip(lower_bound=1).sqrt()).alias("_cos"),
            )
            .rename({"_request": "_row"})
        )
        item_events = totals_before(keys, item_counts, "item_id", ["n"]).rename({"n": "_nb"})
        return keys.select("_row").join(per_request, on="_row", how="left").join(item_events, on="_row").select(
            "_row", *(pl.col(c) for c in self.columns[:3]),
            (pl.col("_cos") / pl.col("_nb").clip(lower_bound=1).sqrt()).alias(self.columns[3]),
        )


@recengine.hookimpl
def register_feature_extractors(register):
    register("item_popularity", ItemPopularity, "Item event counts before t: all time, windows, decayed.")
    register("item_trend", ItemTrend, "Item daily rate in a short window over a long one.")
    register("item_age", ItemAge, "Days since the item's first event.")
    register("item_value", ItemValue, "Item's mean event value (rating), shrunk to the global mean.")
    register("item_ctr", ItemCTR, "Item clicks per impression with a Beta prior (impression logs).")
    register("user_activity", UserActivity, "User's event count, recency, tenure and mean value.")
    register("category_affinity", CategoryAffinity, "User's share of events in the item's categories.")
    register("covisitation", Covisitation, "Co-visitation of the item with the user's recent items.")
    register("item_attribute", ItemAttribute, "Numeric item fields, and their gap to the user's recent items' mean.")
