"""Candidates: which items a request ranks.

A source (see `recengine.parts`) gets requests `(_request, user_id, timestamp)` and returns
`(_request, item_id, score)`, its best `k` per request, from events strictly before each request's
timestamp. `generate` takes the union, keeps each source's score and rank as features
(`candidate_columns`; null where the source did not propose the item), keeps only items of the
catalogue when there is one, and drops items the user already interacted with. The built-in
sources live beside the features they share work with, in `recengine.features`.
"""

from __future__ import annotations

from typing import Sequence

import polars as pl

from recengine.core.data import TIMESTAMP
from recengine.core.pit import cumulative, totals_before, users_events
from recengine.core.topk import rounded, top_k
from recengine.errors import ConfigError
from recengine.parts.context import FeatureContext
from recengine.parts.protocol import CandidateSource, candidate_columns


def source_top_k(scored: pl.LazyFrame, k: int, by: str = "_request") -> pl.LazyFrame:
    """A source's best `k` per request (or per `by`), ties by item id. The score kept is the one
    compared: rounded below the float noise of summation order."""
    return top_k(scored.with_columns(rounded()), [by], k).drop("rank")


def generate(
    requests: pl.DataFrame, sources: Sequence[CandidateSource], context: FeatureContext, exclude_seen: bool = True
) -> pl.DataFrame:
    """Union of the sources' candidates for `requests` (user_id, timestamp, ...), one row per request-item.

    Returns the request columns, `item_id`, and each source's `candidate_columns` (score, rank).
    """
    if not sources:
        raise ConfigError("no candidate sources configured; add at least one [candidates.NAME] table.")
    keyed = requests.with_row_index("_request").lazy().with_columns(pl.col("timestamp").cast(TIMESTAMP))
    found = None
    for source in sources:
        top = source.generate(keyed.select("_request", "user_id", "timestamp"), context)
        top = top_k(top, ["_request"], source.k)
        score, rank = candidate_columns(source.name)
        top = top.select("_request", "item_id", pl.col("score").cast(pl.Float64).alias(score), pl.col("rank").cast(pl.Float64).alias(rank))
        found = top if found is None else found.join(top, on=["_request", "item_id"], how="full", coalesce=True)
    rows = keyed.join(found, on="_request")
    if context.items is not None:  # an item the catalogue lacks (withdrawn, or a logging error) is never proposed
        rows = rows.join(context.items.select("item_id"), on="item_id", how="semi")
    if exclude_seen:
        rows = drop_seen(rows, context.events)
    return rows.sort("_request", "item_id").drop("_request").collect()


def drop_seen(rows: pl.LazyFrame, events: pl.LazyFrame) -> pl.LazyFrame:
    """Rows whose user had no event with the item strictly before the row's timestamp."""
    theirs = users_events(events, rows)
    table = cumulative(theirs.select("user_id", "item_id", "timestamp"), ["user_id", "item_id"], {"n": pl.len()})
    keyed = rows.collect().with_row_index("_row").lazy()  # numbered once: it is read twice below
    seen = totals_before(keyed, table, ["user_id", "item_id"], ["n"])
    return keyed.join(seen, on="_row").filter(pl.col("n") == 0).drop("_row", "n")
