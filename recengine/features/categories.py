"""Category affinity: the share of the user's events before t that fell in each of the item's
categories. Both paths read one split of the item field into categories (`item_categories`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from recengine.core.pit import cumulative, totals_before, users_events
from recengine.errors import ConfigError
from recengine.parts.hookspecs import hookimpl


def item_categories(context, field: str, separator: str, part: str = "category_affinity") -> pl.LazyFrame:
    """`(item_id, _cat)`: one row per item and category named in its `field`."""
    split = pl.col(field).cast(pl.String).str.split(separator).alias("_cat")
    return (context.item_field(field, part).select("item_id", split).explode("_cat")
            .filter(pl.col("_cat").is_not_null() & (pl.col("_cat") != "")))


class CategoryAffinity:
    """Share of the user's events before t that fell in each of the item's categories (mean, max)."""

    def __init__(self, field: str = "genres", separator: str = "|"):
        if not separator:
            raise ConfigError("category_affinity: separator = ''; give the string between categories, e.g. \"|\".")
        self.field, self.separator = field, separator
        self.columns = [f"affinity_{field}_mean", f"affinity_{field}_max"]

    def transform(self, requests, context):
        categories = item_categories(context, self.field, self.separator)
        theirs = users_events(context.events, requests)
        per_user = cumulative(theirs.select("user_id", "timestamp"), "user_id", {"total": pl.len()})
        per_cat = cumulative(
            theirs.select("user_id", "item_id", "timestamp").join(categories, on="item_id"),
            ["user_id", "_cat"],
            {"hits": pl.len()},
        )
        keys = requests.select("_row", "user_id", "item_id", "timestamp")
        total = totals_before(keys, per_user, "user_id", ["total"])
        # Numbered once (collected): it is read twice below, and a lazy join's row order may differ between reads.
        exploded = keys.join(categories, on="item_id").collect().with_row_index("_pair").rename({"_row": "_request"}).lazy()
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

    def prepare(self, snapshot) -> dict[str, Any]:
        """Items x categories (the last row, empty, for unknown items) and users x category counts."""
        items = item_categories(snapshot.context, self.field, self.separator).collect()
        names = items["_cat"].unique().sort()
        rows = snapshot.index(items["item_id"])
        cols = items["_cat"].replace_strict(names, np.arange(len(names)), return_dtype=pl.Int64).to_numpy()
        known = rows >= 0
        matrix = sp.csr_matrix((np.ones(known.sum()), (rows[known], cols[known])), shape=(snapshot.size + 1, len(names)))
        # Category counts over all the user's events: the history a state keeps may be shorter.
        events = snapshot.events
        user = snapshot.user_rows(events["user_id"])
        per_user = sp.csr_matrix((np.ones(len(user)), (user, snapshot.index(events["item_id"]))),
                                 shape=(len(snapshot.users), snapshot.size + 1)) @ matrix
        return {"matrix": matrix, "per_user": sp.csr_matrix(per_user), "snapshot": snapshot}

    def serve(self, tables, user, idx: np.ndarray) -> dict[str, np.ndarray]:
        snapshot = tables["snapshot"]
        total = snapshot.user_events.get(user, 0)
        if not total:
            return {c: np.full(len(idx), np.nan) for c in self.columns}
        matrix = tables["matrix"]
        per_category = tables["per_user"][snapshot.user_index[user]].toarray().ravel()
        rows = matrix[idx]  # candidates x categories, sparse: a catalogue may have many categories
        counts = np.diff(rows.indptr)
        has = counts > 0
        best = np.full(len(idx), np.nan)
        if has.any():
            # Each non-empty row's entries run from its start to the next non-empty row's start.
            best[has] = np.maximum.reduceat(per_category[rows.indices], rows.indptr[:-1][has])
        mean = np.where(has, (rows @ per_category) / np.maximum(counts, 1), np.nan)
        return {self.columns[0]: mean / total, self.columns[1]: best / total}


@hookimpl
def register_feature_extractors(register):
    register("category_affinity", CategoryAffinity, "User's share of events in the item's categories.")
