"""recengine against the collaborative-filtering peers on MovieLens ml-latest-small.

Protocol: each user's events in time order; the last 20% are the test, the request time is the
user's first test event (1 ms into its second when training events share that second), and
everything (recengine's features and training, the peers' fits) sees only the earlier 80%. Every
method ranks the full catalogue, top 10, without the user's training items; metrics are per user,
then averaged.

Peers (from `implicit`, each over a small grid; the best setting is picked on the test split
itself, which flatters the peers): ItemKNN cosine, ALS, BPR, and popularity (training counts).
SASRec (RecBole) needs numpy<2 and is quoted from its measurement on this protocol: 0.133.

The peers above are fit once on all users' training events, so a user whose request is in 1996 is
ranked with similarities learnt from other users' events up to 2018; recengine's features see only
events before each request. "ItemKNN, point in time" refits ItemKNN per user on the events before
that user's request (about a minute per K): the peer held to recengine's information.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/movielens.py [--feature-set features/movielens.toml] [--seeds 3] [--no-peers]
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recengine.data import Dataset
from recengine.datasets import movielens
from recengine.encoders import DEFAULT_CACHE_DIR, EmbeddingCache
from recengine.extractors import FeatureContext
from recengine.featureset import FeatureSet
from recengine.metrics import evaluate
from recengine.training import train

SASREC_NDCG10 = 0.133
METRICS = ("ndcg@10", "recall@10", "hr@10", "mrr@10")


def split(events: pl.DataFrame, test_fraction: float = 0.2) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Per-user chronological split: (train events, test truth, requests at each user's first test event)."""
    ordered = events.sort("user_id", "timestamp", "item_id").with_columns(
        pl.int_range(pl.len()).over("user_id").alias("_pos"), pl.len().over("user_id").alias("_n")
    )
    is_test = pl.col("_pos") >= (pl.col("_n") * (1 - test_fraction)).floor().cast(pl.Int64)
    train_events = ordered.filter(~is_test).drop("_pos", "_n")
    test = ordered.filter(is_test)
    requests = test.group_by("user_id").agg(pl.col("timestamp").min()).sort("user_id")
    # Timestamps are whole seconds and the 80% cut can fall inside one: a user's training events in the
    # first test event's second are, in the protocol's order, before the request, as the peers see
    # them. Features see events strictly before the request time, so the request goes 1 ms into that
    # second for those users. Only training events are in any context, so no test event can leak.
    last = train_events.group_by("user_id").agg(pl.col("timestamp").max().alias("_last"))
    requests = requests.join(last, on="user_id", how="left").select(
        "user_id",
        pl.when(pl.col("_last") == pl.col("timestamp")).then(pl.col("timestamp") + timedelta(milliseconds=1))
        .otherwise(pl.col("timestamp")).alias("timestamp"),
    )
    seen = train_events.select("user_id", "item_id").unique()
    truth = test.select("user_id", "item_id").unique().join(seen, on=["user_id", "item_id"], how="anti")
    return train_events, truth, requests.filter(pl.col("user_id").is_in(truth["user_id"].implode()))


def run_recengine(train_events, items, requests, seen, feature_set: FeatureSet) -> tuple[pl.DataFrame, dict[str, float]]:
    started = time.perf_counter()
    result = train(Dataset(train_events.lazy(), items), feature_set, cache=EmbeddingCache(DEFAULT_CACHE_DIR), progress=False, say=lambda _: None)
    trained = time.perf_counter() - started
    context = FeatureContext.from_frames(train_events, items, cache=EmbeddingCache(DEFAULT_CACHE_DIR))
    # k=60 then the top 10 not seen: a safety net, as every training event is before its user's request.
    ranked = result.model.recommend(requests, context, k=60).join(seen, on=["user_id", "item_id"], how="anti")
    ranked = ranked.sort("user_id", "rank").group_by("user_id", maintain_order=True).head(10)
    return ranked.select("user_id", "item_id", "score"), {"train_s": trained, "total_s": time.perf_counter() - started,
                                                         "validation_ndcg@10": result.metrics["ndcg@10"]}


def user_item_matrix(train_events: pl.DataFrame, before=None) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The binary user x item matrix of the training events (only those before `before`, if given),
    and the user and item ids of its rows and columns: every training user and item either way."""
    users = np.sort(train_events["user_id"].unique().to_numpy())
    items = np.sort(train_events["item_id"].unique().to_numpy())
    known = train_events if before is None else train_events.filter(pl.col("timestamp") < before)
    pairs = known.select("user_id", "item_id").unique()
    rows = np.searchsorted(users, pairs["user_id"].to_numpy())
    cols = np.searchsorted(items, pairs["item_id"].to_numpy())
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(users), len(items))), users, items


def implicit_top10(model, matrix, users, items, request_users) -> pl.DataFrame:
    rows = np.searchsorted(users, request_users)
    model.fit(matrix, show_progress=False)
    ids, scores = model.recommend(rows, matrix[rows], N=10, filter_already_liked_items=True)
    # A fit on few events can have fewer than 10 items to offer: implicit pads with id -1, score -inf.
    keep = (ids.ravel() >= 0) & np.isfinite(scores.ravel())
    return pl.DataFrame({
        "user_id": np.repeat(request_users, ids.shape[1]),
        "item_id": items[ids.ravel()],
        "score": -np.tile(np.arange(ids.shape[1], dtype=np.float64), len(rows)),  # rank order
    }).filter(pl.Series(keep))


def peers(train_events: pl.DataFrame, request_users: np.ndarray):
    """(name, params, top-10 frame) for every peer setting in the grid."""
    from implicit.als import AlternatingLeastSquares
    from implicit.bpr import BayesianPersonalizedRanking
    from implicit.nearest_neighbours import CosineRecommender

    matrix, users, items = user_item_matrix(train_events)
    for k in (20, 50, 100, 200):
        yield "ItemKNN cosine", f"K={k}", implicit_top10(CosineRecommender(K=k), matrix, users, items, request_users)
    for factors, reg, alpha in itertools.product((32, 64, 128), (0.01, 0.1), (1.0, 10.0)):
        model = AlternatingLeastSquares(factors=factors, regularization=reg, alpha=alpha, iterations=15, random_state=0)
        yield "ALS", f"factors={factors} reg={reg} alpha={alpha}", implicit_top10(model, matrix, users, items, request_users)
    for factors, lr in itertools.product((32, 64, 128), (0.01, 0.05)):
        model = BayesianPersonalizedRanking(factors=factors, learning_rate=lr, regularization=0.01, iterations=100, random_state=0)
        yield "BPR", f"factors={factors} lr={lr}", implicit_top10(model, matrix, users, items, request_users)


def point_in_time_peers(train_events: pl.DataFrame, requests: pl.DataFrame):
    """(name, params, top-10 frame) for peers refit per user on the events before that user's request.

    recengine's features see only events before each request; the peers above are fit once on every
    user's training events, including other users' events after the request (in ml-latest-small a
    1996 request is ranked with similarities learnt from 2018). These rows hold the peers to
    recengine's information: one fit per user, so only ItemKNN (quick to fit) and only its grid.
    """
    from implicit.nearest_neighbours import CosineRecommender

    grid = (20, 50, 100, 200)
    tops: dict[int, list[pl.DataFrame]] = {k: [] for k in grid}
    started = time.perf_counter()
    for n, (user, at) in enumerate(requests.select("user_id", "timestamp").iter_rows(), 1):
        matrix, users, items = user_item_matrix(train_events, before=at)
        for k in grid:
            tops[k].append(implicit_top10(CosineRecommender(K=k), matrix, users, items, np.array([user])))
        if n % 100 == 0 or n == requests.height:
            print(f"point-in-time ItemKNN: {n}/{requests.height} users, {time.perf_counter() - started:.0f} s", flush=True)
    for k in grid:
        yield "ItemKNN, point in time", f"K={k}, refit per user", pl.concat(tops[k])


def popularity(train_events: pl.DataFrame, requests: pl.DataFrame, seen: pl.DataFrame) -> pl.DataFrame:
    counts = train_events.group_by("item_id").len().sort("len", "item_id", descending=[True, False]).head(500)
    ranked = requests.select("user_id").join(counts, how="cross").join(seen, on=["user_id", "item_id"], how="anti")
    ranked = ranked.sort("user_id", "len", "item_id", descending=[False, True, False]).group_by("user_id", maintain_order=True).head(10)
    return ranked.select("user_id", "item_id", pl.col("len").cast(pl.Float64).alias("score"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feature-set", default=str(Path(__file__).resolve().parents[1] / "features" / "movielens.toml"))
    parser.add_argument("--no-peers", action="store_true", help="Only recengine (quicker, for tuning).")
    parser.add_argument("--seeds", type=int, default=3, help="Training runs with [labels] seed 0..N-1; the median is shown.")
    parser.add_argument("--as-of-training-end", action="store_true",
                        help="Diagnostic, not the protocol: rank every user as of the end of the training data, so "
                             "recengine sees what the peers see (other users' training events after the user's request).")
    args = parser.parse_args()

    data = movielens()
    events, items = data.events.collect(), data.items
    train_events, truth, requests = split(events)
    seen = train_events.select("user_id", "item_id").unique()
    catalogue = items.select(pl.len()).collect().item()
    print(f"ml-latest-small: {train_events.height:,} training events, {truth.height:,} test items, {requests.height} users")

    rows = []
    score = lambda ranked: evaluate(ranked, truth, ["user_id"], (10,), catalogue)  # noqa: E731
    if args.as_of_training_end:
        requests = requests.with_columns(pl.lit(train_events["timestamp"].max() + timedelta(seconds=1)).alias("timestamp"))
    # Which requests the training groups sample moves test NDCG@10 by about +-0.007, so the table shows
    # the run with the median NDCG@10 over `--seeds` sampling seeds ([labels] seed 0, 1, ...).
    runs = []
    for seed in range(args.seeds):
        feature_set = FeatureSet.load(args.feature_set)
        feature_set.labels["seed"] = seed
        ranked, info = run_recengine(train_events, items, requests, seen, feature_set)
        runs.append((score(ranked), info))
        print(f"recengine, labels seed {seed}: NDCG@10 {runs[-1][0]['ndcg@10']:.4f}; trained in {info['train_s']:.1f} s, "
              f"trained + ranked in {info['total_s']:.1f} s (validation NDCG@10 {info['validation_ndcg@10']:.4f})", flush=True)
    metrics, info = sorted(runs, key=lambda r: r[0]["ndcg@10"])[len(runs) // 2]
    setting = Path(args.feature_set).name + (" (as of training end)" if args.as_of_training_end else "")
    rows.append(("recengine", setting + (f", median of {args.seeds} seeds" if args.seeds > 1 else ""), metrics))
    rows.append(("popularity", "training counts", score(popularity(train_events, requests, seen))))
    if not args.no_peers:
        best: dict[str, tuple[str, dict]] = {}
        # implicit's cosine fit converts its own normalised matrix and warns about it, once per fit.
        warnings.filterwarnings("ignore", message="Method expects CSR input")
        settings = itertools.chain(peers(train_events, requests["user_id"].to_numpy()), point_in_time_peers(train_events, requests))
        with threadpool_limits(1, user_api="blas"):  # implicit's advice: BLAS threads fight its own
            for name, params, top in settings:
                metrics = score(top)
                if name not in best or metrics["ndcg@10"] > best[name][1]["ndcg@10"]:
                    best[name] = (params, metrics)
        rows += [(name, f"best of grid: {params}", metrics) for name, (params, metrics) in best.items()]

    peer_best = max(m["ndcg@10"] for name, _, m in rows if name != "recengine")
    ours = rows[0][2]["ndcg@10"]
    print(f"\n{'method':24}{'setting':42}" + "".join(f"{m:>11}" for m in METRICS) + f"{'vs best':>9}")
    for name, setting, m in rows:
        print(f"{name:24}{setting:42}" + "".join(f"{m[k]:11.4f}" for k in METRICS) + f"{m['ndcg@10'] / peer_best:8.2f}x")
    print(f"{'SASRec (quoted)':24}{'RecBole, hidden 64, measured elsewhere':42}{SASREC_NDCG10:11.4f}" + " " * 33
          + f"{SASREC_NDCG10 / peer_best:8.2f}x")
    print(f"\nrecengine NDCG@10 {ours:.4f}: {ours / peer_best:.2f}x the best peer run here, "
          f"{ours / max(peer_best, SASREC_NDCG10):.2f}x the best including SASRec's {SASREC_NDCG10}")
    same_information = [m["ndcg@10"] for name, _, m in rows if "point in time" in name]
    if same_information:
        print(f"recengine NDCG@10 {ours:.4f}: {ours / max(same_information):.2f}x the best peer held to the same "
              f"information (events before each request)")


if __name__ == "__main__":
    main()
