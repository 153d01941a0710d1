"""Item popularity and item statistics: counts, windows, decay, trend, age, value, CTR, and the
popular source. Every part here depends on the item alone (`scope = "item"`): serving computes each
once per state for every item, through `transform`."""

from __future__ import annotations

import math
from typing import Sequence

import polars as pl

from recengine.core.pit import DAY, RunningTotals, cumulative, totals_before
from recengine.parts.candidates import source_top_k
from recengine.parts.context import FIXED_POINT, RESOLUTION, days
from recengine.parts.hookspecs import hookimpl
from recengine.parts.plugins import check_number


class ItemPopularity:
    """Events per item before t: all time, in trailing windows, and exponentially decayed."""

    scope = "item"

    def __init__(self, windows_days: Sequence[float] = (1, 7, 30, 365), half_lives_days: Sequence[float] = (14,)):
        for window in windows_days:
            check_number("item_popularity", "windows_days", window, above=0)
        for half_life in half_lives_days:
            check_number("item_popularity", "half_lives_days", half_life, above=0)
        self.windows = list(windows_days)
        self.half_lives = list(half_lives_days)
        self.columns = (
            ["item_count_all"]
            + [f"item_count_{w:g}d" for w in self.windows]
            + [f"item_decay_{h:g}d" for h in self.half_lives]
        )

    def transform(self, requests, context):
        table = item_counts(context)
        keys = requests.select("_row", "item_id", "timestamp")
        out = totals_before(keys, table, "item_id", ["n"]).rename({"n": "item_count_all"})
        for window in self.windows:
            # A lane per window: each window's start moves forward chunk after chunk.
            start = totals_before(keys, table, "item_id", ["n"], at=pl.col("timestamp") - DAY * window, lane=window)
            out = out.join(start, on="_row").with_columns(
                (pl.col("item_count_all") - pl.col("n")).alias(f"item_count_{window:g}d")
            ).drop("n")
        for half_life in self.half_lives:
            decayed = decayed_counts(keys, context.events, "item_id", half_life, context)
            out = out.join(decayed.rename({"decayed": f"item_decay_{half_life:g}d"}), on="_row")
        return out


def item_counts(context) -> RunningTotals:
    """Events per item before any time, kept by the context (popularity and co-visitation read it)."""
    return context.memo("item_counts", lambda: RunningTotals(context.events, "item_id", {"n": pl.len()}))


def decayed_counts(requests: pl.LazyFrame, events: pl.LazyFrame, by: str, half_life_days: float, context=None) -> pl.LazyFrame:
    """sum(exp(-(t - ts) / tau)) over events before t, per `by`, without overflow.

    The sum factors as exp(-t/tau) * sum(exp(ts/tau)), but over years exp(ts/tau) overflows. So time is
    cut into epochs of 200 tau, each with its own origin: an event counts in its own epoch's running
    sum and, re-based, in the next epoch's total. Older events weigh under exp(-200) and are dropped.
    With `context` (whose events `events` are), the running sums are kept for the context's next calls.
    """
    tau = half_life_days / math.log(2) * DAY.total_seconds() * 1000
    span = 200 * tau
    ms = pl.col("timestamp").dt.epoch("ms").cast(pl.Float64)
    epoch = (ms / span).floor()
    origin = (epoch + 1) * span
    derive = [epoch.alias("_epoch"), ((ms - origin) / tau).exp().alias("w"), ((ms - origin - span) / tau).exp().alias("w_next")]
    # Every event of one time has one weight, so a time's total is that weight times the count, and
    # the running totals add the times in time order: no float sum depends on a group-by's order.
    sums = {"w": pl.col("w").first() * pl.len(), "w_next": pl.col("w_next").first() * pl.len()}
    build = lambda: RunningTotals(events.select(by, "timestamp"), [by, "_epoch"], sums, derive)  # noqa: E731
    # Kept by the context (whose events `events` are): chunk after chunk steps it instead of regrouping the log.
    running = context.memo(("decayed_sums", by, half_life_days), build) if context is not None else build()
    keyed = requests.with_columns(epoch.alias("_epoch"))
    same = totals_before(keyed, running, [by, "_epoch"], ["w"])
    # The previous epoch's total, re-based to this one: all of it is before the request.
    carried = totals_before(keyed.with_columns(pl.col("_epoch") - 1), running, [by, "_epoch"], ["w_next"])
    scale = (((pl.col("_epoch") + 1) * span - ms) / tau).exp()
    return (
        keyed.join(same, on="_row")
        .join(carried.rename({"w_next": "carry"}), on="_row")
        # On the fixed-point grid (2^-30): the last bits of this product were seen to differ between
        # two builds of the same rows (1 in 5 runs), and a feature must not depend on the run.
        .select("_row", (((scale * (pl.col("w") + pl.col("carry"))) * FIXED_POINT).round() * RESOLUTION).alias("decayed"))
    )


class ItemTrend:
    """Recent against longer-run popularity: daily rate in the short window over that in the long one."""

    scope = "item"

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

    scope = "item"

    columns = ["item_age_days"]

    def transform(self, requests, context):
        first = context.events.group_by("item_id").agg(pl.col("timestamp").min().alias("_first"))
        joined = requests.select("_row", "item_id", "timestamp").join(first, on="item_id", how="left")
        age = pl.when(pl.col("_first") < pl.col("timestamp")).then(days(pl.col("timestamp") - pl.col("_first")))
        return joined.select("_row", age.alias("item_age_days"))


class ItemValue:
    """Mean event value (e.g. rating) of the item before t, shrunk towards the global mean before t."""

    scope = "item"

    columns = ["item_value_mean"]

    def __init__(self, prior_weight: float = 5.0):
        check_number("item_value", "prior_weight", prior_weight, minimum=0)
        self.prior_weight = prior_weight

    def transform(self, requests, context):
        if not context.has("value"):
            return requests.select("_row", pl.lit(None, pl.Float64).alias("item_value_mean"))
        keys = requests.select("_row", "item_id", "timestamp", pl.lit(0).alias("_all"))
        sums = {"n": pl.len(), "v": pl.col("value").sum()}
        # Kept by the context, as `item_counts`: chunk after chunk steps them instead of regrouping the log.
        per_item = context.memo("item_value_sums", lambda: RunningTotals(context.events, "item_id", sums))
        item = totals_before(keys, per_item, "item_id", ["n", "v"])
        everyone = context.memo("value_sums", lambda: RunningTotals(
            context.events, "_all", sums, derive=[pl.lit(0).alias("_all")]))
        prior = totals_before(keys, everyone, "_all", ["n", "v"]).rename({"n": "gn", "v": "gv"})
        mean = (pl.col("v") + self.prior_weight * pl.col("gv") / pl.col("gn")) / (pl.col("n") + self.prior_weight)
        return item.join(prior, on="_row").select("_row", pl.when(pl.col("gn") > 0).then(mean).alias("item_value_mean"))


class ItemCTR:
    """Clicks per impression of the item before t, with a Beta prior at the global rate before t."""

    scope = "item"

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


class PopularSource:
    """Items with the most events in the days before the request's day, decayed by a half-life."""

    scope = "item"

    def __init__(self, k: int = 100, half_life_days: float = 14.0):
        check_number("popular source", "k", k, integer=True, minimum=1)
        check_number("popular source", "half_life_days", half_life_days, above=0)
        self.name, self.k, self.half_life = "popular", k, half_life_days

    def generate(self, requests, context):
        # Counted per whole day up to the request's own day, so one table serves all requests of a day.
        daily = context.events.group_by("item_id", pl.col("timestamp").dt.truncate("1d").alias("_day")).agg(pl.len().alias("n"))
        keyed = requests.select("_request", pl.col("timestamp").dt.truncate("1d").alias("_on"))
        on_days = keyed.select("_on").unique()
        horizon = DAY * self.half_life * 10
        window = on_days.join_where(daily, pl.col("_day") < pl.col("_on"), pl.col("_day") >= pl.col("_on") - horizon)
        age = (pl.col("_on") - pl.col("_day")).dt.total_days()
        scored = window.group_by("_on", "item_id").agg((pl.col("n") * (-math.log(2) * age / self.half_life).exp()).sum().alias("score"))
        best = source_top_k(scored, self.k, by="_on")
        return keyed.join(best, on="_on").select("_request", "item_id", "score")


@hookimpl
def register_feature_extractors(register):
    register("item_popularity", ItemPopularity, "Item event counts before t: all time, windows, decayed.")
    register("item_trend", ItemTrend, "Item daily rate in a short window over a long one.")
    register("item_age", ItemAge, "Days since the item's first event.")
    register("item_value", ItemValue, "Item's mean event value (rating), shrunk to the global mean.")
    register("item_ctr", ItemCTR, "Item clicks per impression with a Beta prior (impression logs).")


@hookimpl
def register_candidate_sources(register):
    register("popular", PopularSource, "Most events in the days before the request, decayed.")
