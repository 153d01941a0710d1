"""Ranking metrics, computed per request and then averaged over requests.

`ranked` holds one row per (request, item) with a `score`; `truth` the relevant items per request.
Relevant items that were never candidates still count in the denominators (recall, ideal DCG), so a
ranker cannot look good by ranking a short candidate list.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def evaluate(
    ranked: pl.DataFrame, truth: pl.DataFrame, keys: list[str], ks: tuple[int, ...] = (5, 10), catalogue_size: int | None = None
) -> dict[str, float]:
    """NDCG@k, Recall@k, HR@k, MRR@10, group AUC and coverage@10, averaged over the requests in `truth`."""
    return summarise(request_metrics(ranked, truth, keys, ks), truth, keys, ks, catalogue_size)


def request_metrics(ranked: pl.DataFrame, truth: pl.DataFrame, keys: list[str], ks: tuple[int, ...] = (5, 10)) -> pl.DataFrame:
    """Each ranked request's sums (DCG, hits, reciprocal rank, the AUC's rank sums, its top 10 items).

    Requests are independent, so the ranked rows may come a part at a time: `summarise` the parts'
    frames concatenated to get `evaluate` of all of them. Ties in score go to the smaller item id."""
    positions = (
        ranked.sort([*keys, "score", "item_id"], descending=[False] * len(keys) + [True, False])
        .with_columns(pl.int_range(1, pl.len() + 1).over(keys).alias("_pos"))
        .join(truth.select(*keys, "item_id").with_columns(pl.lit(True).alias("_hit")), on=[*keys, "item_id"], how="left")
        .with_columns(pl.col("_hit").fill_null(False))
    )
    return _request_metrics(positions, keys, ks).join(_auc_sums(positions, keys), on=keys, how="left")


def summarise(per_request: pl.DataFrame, truth: pl.DataFrame, keys: list[str], ks: tuple[int, ...] = (5, 10),
              catalogue_size: int | None = None) -> dict[str, float]:
    """`request_metrics`' frame averaged over the requests in `truth` (a request with relevant items but
    no ranked row scores 0)."""
    relevant = truth.group_by(keys).agg(pl.len().alias("_relevant")).sort(keys)
    sums = relevant.join(per_request.drop("_top", "p", "n", "rs"), on=keys, how="left").fill_null(0.0)
    out: dict[str, float] = {}
    for k in ks:
        # Ideal DCG of n relevant items at the top: a lookup by min(n, k).
        ideal = np.concatenate([[0.0], np.cumsum(1 / np.log2(np.arange(2, k + 2)))])
        idcg = ideal[sums["_relevant"].clip(upper_bound=k).cast(pl.Int64).to_numpy()]
        out[f"ndcg@{k}"] = float((sums[f"_dcg@{k}"] / idcg).mean())
        out[f"recall@{k}"] = float((sums[f"_hits@{k}"] / sums["_relevant"]).mean())
        out[f"hr@{k}"] = float((sums[f"_hits@{k}"] > 0).mean())
    out["mrr@10"] = float(sums["_rr@10"].mean())
    out["auc"] = _group_auc(per_request.join(relevant.select(keys), on=keys, how="semi"))
    if catalogue_size:
        out["coverage@10"] = per_request["_top"].explode().drop_nulls().n_unique() / catalogue_size
    out["requests"] = float(sums.height)
    return out


def _request_metrics(positions: pl.DataFrame, keys: list[str], ks: tuple[int, ...]) -> pl.DataFrame:
    gain = pl.when(pl.col("_hit")).then(1.0 / (pl.col("_pos") + 1).log(2)).otherwise(0.0)
    aggs = []
    for k in ks:
        within = pl.col("_pos") <= k
        aggs.append(gain.filter(within).sum().alias(f"_dcg@{k}"))
        aggs.append((pl.col("_hit") & within).sum().cast(pl.Float64).alias(f"_hits@{k}"))
    first_hit = pl.col("_pos").filter(pl.col("_hit") & (pl.col("_pos") <= 10)).min()
    aggs.append((1.0 / first_hit).fill_null(0.0).alias("_rr@10"))
    aggs.append(pl.col("item_id").filter(pl.col("_pos") <= 10).alias("_top"))
    return positions.group_by(keys).agg(aggs)


def _auc_sums(positions: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Per request: positives, negatives and the positives' rank sum among its candidates."""
    ranked = positions.with_columns(pl.col("score").rank("average").over(keys).alias("_r"))
    return ranked.group_by(keys).agg(
        pl.col("_hit").sum().alias("p"), (~pl.col("_hit")).sum().alias("n"), pl.col("_r").filter(pl.col("_hit")).sum().alias("rs"))


def _group_auc(per_request: pl.DataFrame) -> float:
    """Mean over requests with both classes among their candidates of P(score(pos) > score(neg))."""
    per = per_request.filter((pl.col("p") > 0) & (pl.col("n") > 0))
    if per.height == 0:
        return float("nan")
    auc = (pl.col("rs") - pl.col("p") * (pl.col("p") + 1) / 2) / (pl.col("p") * pl.col("n"))
    return float(per.select(auc).to_series().sort().mean())
