"""What the user did before t, whatever the item: `scope = "user"`, so serving computes it once per
state for every known user (and once for an unknown one), through `transform`."""

from __future__ import annotations

import polars as pl

from recengine.core.pit import asof_before, cumulative, users_events
from recengine.parts.context import days
from recengine.parts.hookspecs import hookimpl


class UserActivity:
    """The user's events before t: count, days since the last and the first, mean value."""

    scope = "user"

    columns = ["user_count", "user_days_since_last", "user_days_active", "user_value_mean"]

    def transform(self, requests, context):
        value = pl.col("value") if context.has("value") else pl.lit(None, pl.Float64)
        theirs = users_events(context.events, requests)
        table = cumulative(theirs.with_columns(value.alias("_v")), "user_id", {"n": pl.len(), "v": pl.col("_v").sum()})
        table = table.with_columns(pl.col("timestamp").alias("_last"))
        first = theirs.group_by("user_id").agg(pl.col("timestamp").min().alias("_first"))
        keys = requests.select("_row", "user_id", "timestamp")
        joined = asof_before(keys, table.select("user_id", "timestamp", "n", "v", "_last"), "user_id")
        joined = joined.join(first, on="user_id", how="left")
        seen = pl.col("n").is_not_null()
        return joined.select(
            "_row",
            pl.col("n").fill_null(0).cast(pl.Float64).alias("user_count"),
            pl.when(seen).then(days(pl.col("timestamp") - pl.col("_last"))).alias("user_days_since_last"),
            pl.when(seen).then(days(pl.col("timestamp") - pl.col("_first"))).alias("user_days_active"),
            pl.when(seen & (pl.col("v") != 0)).then(pl.col("v") / pl.col("n")).alias("user_value_mean"),
        )


@hookimpl
def register_feature_extractors(register):
    register("user_activity", UserActivity, "User's event count, recency, tenure and mean value.")
