"""Candidate sources: which items a request ranks.

A source gets requests `(_request, user_id, timestamp)` and returns `(_request, item_id, score)`,
its best `k` per request, from events strictly before each request's timestamp. `generate` takes
the union, keeps each source's score and rank as features (`cand_<name>_score`, `cand_<name>_rank`;
null where the source did not propose the item) and drops items the user already interacted with.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

import recengine
from recengine.data import TIMESTAMP
from recengine.errors import ConfigError
from recengine.extractors import FIXED_POINT, RESOLUTION, FeatureContext, _exact_sum, check_window
from recengine.interest import InterestScores
from recengine.pit import DAY, cumulative, recent_history, totals_before
from recengine.plugins import check_number
from recengine.topk import DECIMALS, rounded, top_k, top_k_dense


class CandidateSource(Protocol):
    name: str
    k: int

    def generate(self, requests: pl.LazyFrame, context: FeatureContext) -> pl.LazyFrame:
        """`(_request, item_id, score)`, at most `k` rows per request, higher score = better."""


def _top_k(scored: pl.LazyFrame, k: int, by: str = "_request") -> pl.LazyFrame:
    # The score kept is the one compared: rounded below the float noise of summation order.
    return top_k(scored.with_columns(rounded()), [by], k).drop("rank")


class PopularSource:
    """Items with the most events in the days before the request's day, decayed by a half-life."""

    def __init__(self, k: int = 100, half_life_days: float = 14.0):
        check_number("popular source", "k", k, integer=True, minimum=1)
        check_number("popular source", "half_life_days", half_life_days, above=0)
        self.name, self.k, self.half_life = "popular", k, half_life_days

    def generate(self, requests, context):
        # Counted per whole day up to the request's own day, so one table serves all requests of a day.
        days = context.events.group_by("item_id", pl.col("timestamp").dt.truncate("1d").alias("_day")).agg(pl.len().alias("n"))
        keyed = requests.select("_request", pl.col("timestamp").dt.truncate("1d").alias("_on"))
        on_days = keyed.select("_on").unique()
        horizon = DAY * self.half_life * 10
        window = on_days.join_where(days, pl.col("_day") < pl.col("_on"), pl.col("_day") >= pl.col("_on") - horizon)
        age = (pl.col("_on") - pl.col("_day")).dt.total_days()
        scored = window.group_by("_on", "item_id").agg((pl.col("n") * (-math.log(2) * age / self.half_life).exp()).sum().alias("score"))
        best = _top_k(scored, self.k, by="_on")
        return keyed.join(best, on="_on").select("_request", "item_id", "score")


class CovisitationSource:
    """Items most often seen within `window` events of the user's last `recent` items, before t."""

    def __init__(self, k: int = 100, window: int = 5, recent: int = 10):
        check_window(window, "covisitation source")
        check_number("covisitation source", "k", k, integer=True, minimum=1)
        check_number("covisitation source", "recent", recent, integer=True, minimum=1)
        self.name, self.k, self.window, self.recent = "covisitation", k, window, recent

    def generate(self, requests, context):
        history = recent_history(requests.select("user_id", "timestamp"), context.events, self.recent)
        seeds = requests.join(history, on=["user_id", "timestamp"]).select(
            "_request", "timestamp", pl.col("h_item").alias("a"), (1.0 / (1 + pl.col("h_back"))).alias("w")
        ).collect()
        last = context.covisitation_last(self.window)
        now = (pl.col("timestamp") > last) if last is not None else pl.lit(True)
        found = [self._after_all_pairs(seeds.filter(now), context)]
        before = seeds.filter(~now)
        if before.height:  # the pair table (millions of rows for a wide window) only when a request needs it
            pairs = context.covisitation_pairs(self.window).rename({"timestamp": "_pair_at"})
            hits = before.lazy().join(pairs, on="a").filter(pl.col("_pair_at") < pl.col("timestamp"))
            found.append(hits.group_by("_request", pl.col("b").alias("item_id")).agg(_exact_sum(pl.col("w")).alias("score")))
        return _top_k(pl.concat(found), self.k)

    def _after_all_pairs(self, seeds: pl.DataFrame, context: FeatureContext) -> pl.LazyFrame:
        """Requests after the last pair (ranking "now") see every pair, so their scores are one sparse
        product, seed weights x pair totals, instead of a join as long as seeds x neighbours."""
        schema = {"_request": pl.UInt32, "item_id": context.events.collect_schema()["item_id"], "score": pl.Float64}
        if not seeds.height:
            return pl.LazyFrame(schema=schema)
        ids, totals = context.covisitation_totals(self.window)
        # Seeds are events, so every one has a row (empty for an item in no pair: it adds nothing).
        col = seeds["a"].replace_strict(ids, np.arange(len(ids)), return_dtype=pl.Int64).to_numpy()
        requests, row = np.unique(seeds["_request"].to_numpy(), return_inverse=True)
        # Weights in the fixed point of `_exact_sum` (whole numbers held in floats): every sum of their
        # products with the counts is exact, so the order scipy adds in cannot change a score.
        fixed = np.round(seeds["w"].to_numpy() * FIXED_POINT)
        weights = sp.csr_matrix((fixed, (row, col)), shape=(len(requests), totals.shape[0]))
        scores = (weights @ totals).tocsr() * RESOLUTION
        keep = _at_least_top_k(scores, self.k)
        hit_rows = np.repeat(np.arange(len(requests)), np.diff(scores.indptr))[keep]
        return pl.DataFrame({"_request": requests[hit_rows], "item_id": ids.gather(scores.indices[keep]),
                             "score": scores.data[keep]}, schema=schema).lazy()


def _at_least_top_k(scores: sp.csr_matrix, k: int) -> np.ndarray:
    """A mask over the stored scores keeping each row's k best and every score tied with the k-th
    (after the same rounding as `_top_k`), so the exact tie-break by item_id happens there."""
    keep = np.ones(scores.nnz, dtype=bool)
    for r in np.flatnonzero(np.diff(scores.indptr) > k):
        lo, hi = scores.indptr[r], scores.indptr[r + 1]
        row = np.round(scores.data[lo:hi], DECIMALS)
        keep[lo:hi] = row >= np.partition(row, len(row) - k)[len(row) - k]
    return keep


class EmbeddingSource:
    """Nearest items to the user's history profile in an encoder's space; reaches never-seen items."""

    def __init__(self, k: int = 100, encoder: str = "transformers", encoder_params: dict | None = None,
                 field: str = "title", history: int = 50, half_life_days: float | None = None):
        check_number("embedding source", "k", k, integer=True, minimum=1)
        self.name, self.k, self.field = "embedding", k, field
        self.scorer = InterestScores(encoder, encoder_params, [field], recent=1, history=history, half_life_days=half_life_days)

    def generate(self, requests, context):
        keyed = requests.collect()
        history = recent_history(keyed.lazy().select("user_id", "timestamp"), context.events, self.scorer.history).collect()
        emb = self.scorer.embeddings(context, self.field)
        profile, _ = self.scorer.profiles(history, keyed.height, emb)
        known = ~np.isnan(profile).any(axis=1)
        item_rank = emb.item_ids.rank("ordinal").to_numpy()
        rows, items, scores = [], [], []
        for start in range(0, keyed.height, 1024):
            block = np.flatnonzero(known[start : start + 1024]) + start
            if not len(block):
                continue
            sims = profile[block] @ emb.matrix.T  # exact (embeddings on the grid): no BLAS noise to tie-break
            at, top = top_k_dense(sims, self.k, item_rank)
            rows.append(block[at])
            items.append(top)
            scores.append(sims[at, top])
        if not rows:
            return pl.LazyFrame(schema={"_request": pl.UInt32, "item_id": emb.item_ids.dtype, "score": pl.Float64})
        found = pl.DataFrame({"_p": np.concatenate(rows), "item_id": emb.item_ids.gather(np.concatenate(items)), "score": np.concatenate(scores)})
        return found.join(keyed.with_row_index("_p").select(pl.col("_p").cast(pl.Int64), "_request"), on="_p").drop("_p").lazy()


def generate(
    requests: pl.DataFrame, sources: Sequence[CandidateSource], context: FeatureContext, exclude_seen: bool = True
) -> pl.DataFrame:
    """Union of the sources' candidates for `requests` (user_id, timestamp, ...), one row per request-item.

    Returns the request columns, `item_id`, and `cand_<source>_score` / `cand_<source>_rank` per source.
    """
    if not sources:
        raise ConfigError("no candidate sources configured; add at least one [candidates.NAME] table.")
    keyed = requests.with_row_index("_request").lazy().with_columns(pl.col("timestamp").cast(TIMESTAMP))
    found = None
    for source in sources:
        top = source.generate(keyed.select("_request", "user_id", "timestamp"), context)
        top = top_k(top, ["_request"], source.k)
        top = top.select("_request", "item_id", pl.col("score").cast(pl.Float64).alias(f"cand_{source.name}_score"),
                         pl.col("rank").cast(pl.Float64).alias(f"cand_{source.name}_rank"))
        found = top if found is None else found.join(top, on=["_request", "item_id"], how="full", coalesce=True)
    rows = keyed.join(found, on="_request")
    if context.items is not None:  # an item the catalogue lacks (withdrawn, or a logging error) is never proposed
        rows = rows.join(context.items.select("item_id"), on="item_id", how="semi")
    if exclude_seen:
        rows = drop_seen(rows, context.events)
    return rows.sort("_request", "item_id").drop("_request").collect()


def drop_seen(rows: pl.LazyFrame, events: pl.LazyFrame) -> pl.LazyFrame:
    """Rows whose user had no event with the item strictly before the row's timestamp."""
    table = cumulative(events.select("user_id", "item_id", "timestamp"), ["user_id", "item_id"], {"n": pl.len()})
    keyed = rows.with_row_index("_row")
    seen = totals_before(keyed, table, ["user_id", "item_id"], ["n"])
    return keyed.join(seen, on="_row").filter(pl.col("n") == 0).drop("_row", "n")


@recengine.hookimpl
def register_candidate_sources(register):
    register("popular", PopularSource, "Most events in the days before the request, decayed.")
    register("covisitation", CovisitationSource, "Co-visited with the user's recent items.")
    register("embedding", EmbeddingSource, "Nearest items to the user's text-embedding profile.")
