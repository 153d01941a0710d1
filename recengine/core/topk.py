"""Top k, one way everywhere: the highest score first, scores compared after rounding to
`DECIMALS` places, and ties broken by the smaller item id.

Rounding makes scores that differ only by float noise (a sum added in another order, a product
that BLAS blocked differently) compare equal, so the item id, not that noise, decides their order.
Every ranking in recengine (candidate sources, the ranker's top k, `Ranker.rank`) goes through here.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import polars as pl

DECIMALS = 9

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def rounded(score: str = "score") -> pl.Expr:
    """The score as it is compared."""
    return pl.col(score).round(DECIMALS)


def top_k(rows: Frame, keys: Sequence[str], k: int, score: str = "score", item: str = "item_id") -> Frame:
    """The best `k` rows per `keys`, in order, with `rank` (1 = best) added; a null score ranks last."""
    keys = list(keys)
    # Rows below the k-th score of their group go first (ties kept): sorting what is left is cheaper.
    rows = rows.filter((rounded(score).rank("min", descending=True).over(keys) <= k) | pl.col(score).is_null())
    ordered = rows.sort([*keys, rounded(score), item], descending=[False] * len(keys) + [True, False], nulls_last=True)
    ranked = ordered.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.UInt32).over(keys).alias("rank"))
    return ranked.filter(pl.col("rank") <= k)


def order(scores: np.ndarray, item_ids: Sequence) -> np.ndarray:
    """Positions of `scores` best first, ties by item id (ids of one type: all numbers or all strings)."""
    key = np.round(np.asarray(scores, dtype=np.float64), DECIMALS)
    ids = np.asarray(item_ids)
    return np.lexsort((ids, -key)) if len(key) else np.empty(0, dtype=np.int64)


def top_k_dense(scores: np.ndarray, k: int, item_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best `k` columns of a dense (rows, items) score matrix, best first.

    `item_rank[j]` is column j's position in item-id order (the tie-break). Returns `(rows, columns)`
    of the kept entries, row by row, each row's entries in rank order.
    """
    key = np.round(scores.astype(np.float64, copy=False), DECIMALS)
    k = min(k, key.shape[1])
    if not k or not key.shape[0]:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    kth = np.partition(key, key.shape[1] - k, axis=1)[:, key.shape[1] - k]
    rows, cols = np.nonzero(key >= kth[:, None])  # each row's k best and everything tied with its k-th
    ranked = np.lexsort((item_rank[cols], -key[rows, cols], rows))
    rows, cols = rows[ranked], cols[ranked]
    starts = np.searchsorted(rows, rows, side="left")
    keep = np.arange(len(rows)) - starts < k
    return rows[keep], cols[keep]
