"""Numeric item fields (a release year, a price) and their gap to the user's recent items' mean."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from recengine.core.pit import recent_history
from recengine.errors import ConfigError
from recengine.parts.context import exact_sum, exact_sum_expr
from recengine.parts.hookspecs import hookimpl
from recengine.parts.plugins import check_number


class ItemAttribute:
    """Numeric item fields (a release year, a price) as features, and their distance to the mean of
    the user's last `recent` items before t: how far the item sits from what the user just chose."""

    def __init__(self, fields: Sequence[str] = ("year",), recent: int = 10):
        if not fields:
            raise ConfigError("item_attribute: fields = []; name at least one numeric item field.")
        check_number("item_attribute", "recent", recent, integer=True, minimum=1)
        self.fields, self.recent = list(fields), recent
        self.history_depth = recent
        self.columns = [f"{kind}_{f}" for f in self.fields for kind in ("item", "user_gap")]

    def _values(self, context) -> pl.LazyFrame:
        for f in self.fields:
            if not context.item_field(f, "item_attribute").collect_schema()[f].is_numeric():
                raise ConfigError(f"item_attribute: item field '{f}' is not numeric; give numeric fields only.")
        return context.items.select("item_id", *(pl.col(f).cast(pl.Float64) for f in self.fields))

    def transform(self, requests, context):
        values = self._values(context)
        keys = requests.select("_row", "user_id", "item_id", "timestamp")
        history = recent_history(keys.select("user_id", "timestamp").unique(), context.events, self.recent)
        # Means from exact sums: the same in any row order, and equal to the serving path's.
        means = history.join(values, left_on="h_item", right_on="item_id").group_by("user_id", "timestamp").agg(
            pl.when(pl.col(f).count() > 0).then(exact_sum_expr(pl.col(f)) / pl.col(f).count()).alias(f"_mean_{f}")
            for f in self.fields
        )
        joined = keys.join(values, on="item_id", how="left").join(means, on=["user_id", "timestamp"], how="left")
        return joined.select("_row", *(
            e for f in self.fields
            for e in (pl.col(f).alias(f"item_{f}"), (pl.col(f) - pl.col(f"_mean_{f}")).abs().alias(f"user_gap_{f}"))
        ))

    def prepare(self, snapshot) -> dict:
        """The fields per item index (NaN where missing; the last row: unknown items)."""
        values = self._values(snapshot.context).collect()
        table = np.full((snapshot.size + 1, len(self.fields)), np.nan)
        rows = snapshot.index(values["item_id"])
        table[rows[rows >= 0]] = values.filter(pl.Series(rows >= 0)).select(self.fields).fill_null(np.nan).to_numpy()
        return {"table": table, "snapshot": snapshot}

    def serve(self, tables, user, idx: np.ndarray) -> dict[str, np.ndarray]:
        table, history = tables["table"], tables["snapshot"].histories.get(user)
        out = {}
        for j, f in enumerate(self.fields):
            item = table[idx, j]
            mean = np.nan
            if history is not None:
                recent = table[history["item"][: self.recent], j]
                known = recent[np.isfinite(recent)]
                mean = exact_sum(known) / len(known) if len(known) else np.nan
            out[f"item_{f}"], out[f"user_gap_{f}"] = item, np.abs(item - mean)
        return out


@hookimpl
def register_feature_extractors(register):
    register("item_attribute", ItemAttribute, "Numeric item fields, and their gap to the user's recent items' mean.")
