"""The new-item policy: a bounded share of each top k for new items the text model matches to the user.

A ranker learns from behaviour, so an item nobody has taken yet rarely reaches its top k, however well
its text fits the user. With a feature set's `[policy]` on (`slots` > 0), each request's top k is:

1. the ranker's first `k - slots` items, untouched;
2. then the ranker's next items, and in the last `p` positions (p <= slots) the `p` best *new* items
   outside those first `k - slots`, best by the policy's `score` column (rounded as every top k,
   then the smaller item id), among those whose score is at least `min_score`. A slot no such item
   fills stays with the ranker.

An item is new for a request at t when, counting only events strictly before t, it has fewer than
`max_events` events (so an item nobody took is always new) or its first event is less than
`max_age_days` before t. The policy never places an item the user took before t (with the feature
set's `exclude_seen`), an item outside the catalogue, or (with `release_field`) an item released
after t. Every row keeps the ranker's score; `rank` is its position.

One implementation (`top`, on polars frames) serves every ranking path: the batch and Ray jobs
(`_ChunkScorer.top`), `RankerModel.recommend` and `Ranker.rank`, so they cannot drift apart. It lives
in `parts` (not `running`) because `recommend` is in `learning`, below `running`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import polars as pl

from recengine.core.data import TIMESTAMP, _parse_iso
from recengine.core.pit import cumulative, totals_before
from recengine.core.topk import DECIMALS, top_k
from recengine.errors import DataError
from recengine.parts.context import days

# The column `top` reads the policy's score from: callers add it (`with_policy_score`) from the feature matrix.
SCORE = "_policy_score"
# The list `Ranker.rank` applies the policy to when it is asked for every candidate (no k): the commands' --k.
DEFAULT_K = 10


@dataclass(frozen=True)
class NewItemPolicy:
    """A feature set's `[policy]` table, checked by `recengine.parts.featureset` at load."""

    slots: int
    score: str
    min_score: float = 0.0
    max_age_days: float = 0.0
    max_events: int = 1
    release_field: str = ""

    @classmethod
    def of(cls, feature_set: Any) -> "NewItemPolicy | None":
        """The feature set's policy, or None when it is off (no [policy], or slots = 0)."""
        config = getattr(feature_set, "policy", None) or {}
        return cls(**config) if config.get("slots", 0) > 0 else None


def with_policy_score(rows: pl.DataFrame, matrix: np.ndarray, features: Sequence[str],
                      policy: NewItemPolicy | None) -> pl.DataFrame:
    """`rows` with the policy's score column read from their feature matrix (the model's columns): every
    path has that matrix, and the serving paths have no frame of features. Unchanged when the policy is off."""
    if policy is None:
        return rows
    values = matrix[:, list(features).index(policy.score)] if len(matrix) else np.empty(0)
    return rows.with_columns(pl.Series(SCORE, values, dtype=pl.Float64, nan_to_null=True))


def top(rows: pl.DataFrame, keys: Sequence[str], k: int, policy: NewItemPolicy | None, context: Any,
        exclude_seen: bool = True) -> pl.DataFrame:
    """The top `k` rows per request (`keys`) by `score`, with `rank`, and the policy's new items in the
    last slots (see the module's docstring). `rows` hold user_id, item_id, timestamp, score and, with
    a policy, its score (`with_policy_score`). Without a policy: `core.topk.top_k`, unchanged."""
    keys = list(keys)
    if policy is None:
        return top_k(rows, keys, k)
    best = top_k(rows, keys, k)
    columns = [c for c in best.columns if c != SCORE]
    slots = min(policy.slots, k)
    item = [*keys, "item_id"]
    # The ranker's first k - slots positions are never touched, so the cost to its accuracy is bounded.
    protected = best.filter(pl.col("rank") <= k - slots).select(item)
    pool = (rows.filter(pl.col(SCORE).round(DECIMALS) >= policy.min_score)
            .join(protected, on=item, how="anti")
            .unique(item, keep="first", maintain_order=True))  # a candidate given twice is placed once
    picked = top_k(eligible(pool, policy, context, exclude_seen), keys, slots, score=SCORE) if pool.height else pool
    if not picked.height:  # nothing to place (often, per request): the ranker's list as it is
        return best.select(columns)
    sizes = best.group_by(keys).agg(pl.len().cast(pl.Int64).alias("_n"))  # min(k, candidates): the list's length
    placed = picked.group_by(keys).agg(pl.len().cast(pl.Int64).alias("_p"))
    counted = sizes.join(placed, on=keys, how="left").with_columns(pl.col("_p").fill_null(0))
    rest = best.join(picked.select(item), on=item, how="anti").sort([*keys, "rank"])
    rest = rest.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.UInt32).over(keys).alias("rank"))
    rest = rest.join(counted, on=keys, how="left").filter(pl.col("rank") <= pl.col("_n") - pl.col("_p"))
    new = picked.join(counted, on=keys, how="left").with_columns(
        (pl.col("_n") - pl.col("_p") + pl.col("rank")).cast(pl.UInt32).alias("rank"))
    return pl.concat([rest.select(columns), new.select(columns)]).sort([*keys, "rank"])


def eligible(rows: pl.DataFrame, policy: NewItemPolicy, context: Any, exclude_seen: bool = True) -> pl.DataFrame:
    """The rows whose item the policy may place for its request: new at the request's time, in the
    catalogue, released, and (with `exclude_seen`) not taken by the user before it. Point in time:
    only events strictly before each row's timestamp count."""
    at = pl.col("timestamp").cast(TIMESTAMP)  # compared in the events' unit; the rows keep their own columns
    # Per (item, time), not per row: a job's rows ranked "now" share one time, so this is per item.
    moments = rows.select("item_id", at).unique(maintain_order=True).with_row_index("_row")
    counts = context.memo(("policy", "item_counts"),
                          lambda: cumulative(context.events.select("item_id", "timestamp"), "item_id", {"n": pl.len()}).collect())
    firsts = context.memo(("policy", "item_first"), lambda: context.events.group_by("item_id").agg(
        pl.col("timestamp").min().alias("_first")).collect())
    # Only the candidates' items: the as-of join sorts what it is given.
    counts = counts.join(moments.select("item_id").unique(), on="item_id", how="semi")
    before = totals_before(moments.lazy(), counts.lazy(), "item_id", ["n"]).collect()
    stats = moments.join(before, on="_row").join(firsts, on="item_id", how="left")
    young = (days(pl.col("timestamp") - pl.col("_first")) < policy.max_age_days) & (pl.col("_first") < pl.col("timestamp"))
    new = (pl.col("n") < policy.max_events) | young.fill_null(False)
    if policy.release_field:
        stats = _with_released(stats, policy.release_field, context)
        new = new & (pl.col("_released").fill_null(False) | (pl.col("n") > 0))  # an item someone took is out
    fresh = stats.filter(new).select("item_id", pl.col("timestamp").alias("_at"))
    out = rows.with_columns(at.alias("_at")).join(fresh, on=["item_id", "_at"], how="semi")
    if context.items is not None:  # an item the catalogue lacks (withdrawn, or a logging error) is never placed
        catalogue = context.memo(("policy", "catalogue"), lambda: context.items.select("item_id").collect())
        out = out.join(catalogue, on="item_id", how="semi")
    if exclude_seen and out.height:
        taken = context.memo(("policy", "first_taken"), lambda: context.events.group_by("user_id", "item_id").agg(
            pl.col("timestamp").min().alias("_taken")).collect())
        out = out.join(taken, on=["user_id", "item_id"], how="left", maintain_order="left")
        out = out.filter(pl.col("_taken").is_null() | (pl.col("_taken") >= pl.col("_at"))).drop("_taken")
    return out.drop("_at")


def _with_released(stats: pl.DataFrame, field: str, context: Any) -> pl.DataFrame:
    """`stats` (item_id, timestamp, ...) with `_released`: whether the item's `field` says it was out by
    the timestamp; null where the field is null (not known to be out) or the item has no catalogue row.
    A date or datetime (or an ISO 8601 string) is compared with the time; a whole number is a year, as in
    the rolling protocol (`core.rolling`): out from its first day."""
    items = context.item_field(field, "[policy] release_field")
    dtype = items.collect_schema()[field]
    value = pl.col(field)
    if dtype.is_integer():
        released = value <= pl.col("timestamp").dt.year()
    else:
        if dtype == pl.String:
            value = _parse_iso(value)  # the data contract's own ISO 8601 forms
        elif isinstance(dtype, pl.Datetime) and dtype.time_zone:
            value = value.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        elif not (dtype == pl.Date or isinstance(dtype, pl.Datetime)):
            raise DataError(f"[policy] release_field '{field}' holds {dtype}; give a date, a datetime, an ISO 8601 "
                            "string or a year (a whole number) per item, or drop release_field.")
        released = value.cast(TIMESTAMP) <= pl.col("timestamp")
    table = context.memo(("policy", "released", field), lambda: items.select("item_id", field).collect())
    return stats.join(table, on="item_id", how="left").with_columns(released.alias("_released")).drop(field)
