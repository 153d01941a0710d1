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
    relevant = truth.group_by(keys).agg(pl.len().alias("_relevant"))
    positions = (
        ranked.sort([*keys, "score"], descending=[False] * len(keys) + [True])
        .with_columns(pl.int_range(1, pl.len() + 1).over(keys).alias("_pos"))
        .join(truth.with_columns(pl.lit(True).alias("_hit")), on=[*keys, "item_id"], how="left")
        .with_columns(pl.col("_hit").fill_null(False))
    )
    per_request = relevant.join(_request_metrics(positions, keys, ks), on=keys, how="left").fill_null(0.0)
    out: dict[str, float] = {}
    for k in ks:
        # Ideal DCG of n relevant items at the top: a lookup by min(n, k).
        ideal = np.concatenate([[0.0], np.cumsum(1 / np.log2(np.arange(2, k + 2)))])
        idcg = ideal[per_request["_relevant"].clip(upper_bound=k).cast(pl.Int64).to_numpy()]
        out[f"ndcg@{k}"] = float((per_request[f"_dcg@{k}"] / idcg).mean())
        out[f"recall@{k}"] = float((per_request[f"_hits@{k}"] / per_request["_relevant"]).mean())
        out[f"hr@{k}"] = float((per_request[f"_hits@{k}"] > 0).mean())
    out["mrr@10"] = float(per_request["_rr@10"].mean())
    out["auc"] = _group_auc(positions, keys)
    if catalogue_size:
        top = positions.filter(pl.col("_pos") <= 10)["item_id"].n_unique()
        out["coverage@10"] = top / catalogue_size
    out["requests"] = float(per_request.height)
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
    return positions.group_by(keys).agg(aggs)


def _group_auc(positions: pl.DataFrame, keys: list[str]) -> float:
    """Mean over requests with both classes among their candidates of P(score(pos) > score(neg))."""
    ranked = positions.with_columns(pl.col("score").rank("average").over(keys).alias("_r"))
    per = ranked.group_by(keys).agg(
        pl.col("_hit").sum().alias("p"), (~pl.col("_hit")).sum().alias("n"), pl.col("_r").filter(pl.col("_hit")).sum().alias("rs")
    ).filter((pl.col("p") > 0) & (pl.col("n") > 0))
    if per.height == 0:
        return float("nan")
    auc = (pl.col("rs") - pl.col("p") * (pl.col("p") + 1) / 2) / (pl.col("p") * pl.col("n"))
    return float(per.select(auc.mean()).item())
