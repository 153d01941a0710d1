"""recengine against collaborative-filtering peers on MovieLens ml-latest-small, rolling origin.

Protocol (`recengine.core.rolling`): cutoffs at the 0.50, 0.55, ..., 0.95 quantiles of all event times. At
each cutoff c every method (recengine's features and training, each peer's fit) sees only the events
before c; the catalogue is the items released by c's year (the year in the title) plus any item with
an event before c; the requests are the users with at least 5 events before c and at least one
catalogue item new to them in [c, next cutoff) (the last window runs to the end), and those items are
the truth. Each method gives its top 10 without the user's seen items; NDCG@10, Recall@10, HR@10 and
MRR@10 are computed per (cutoff, user) and averaged over all pairs. Cold recall: of the truth rows
whose item had no event before c, the share found in the top 10.

Peers, each over a small grid whose best setting is picked on the test itself (which flatters them):
popularity (counts before c, all time or a recent window), ItemKNN cosine, ALS and BPR (`implicit`),
EASE (closed form, Steck 2019, over the items with at least `--ease-min-count` events before c), and
SASRec (`benchmarks/sasrec.py`: the paper's model over item ids, one setting). recengine: one training
per cutoff and labels seed. Every method with randomness (recengine, ALS, BPR, SASRec) runs once per
seed 0..`--seeds`-1 at every cutoff; its row is the seed whose NDCG@10 over all pairs is the median, and
a grid's best setting is the one with the best median. Candidate recall: the share of the truth that the feature set's candidate union
proposes at all, and where the rest is lost (never proposed, or proposed and ranked below 10).

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python benchmarks/movielens.py [--feature-set features/movielens.toml] [--cutoffs 10] [--seeds 3]
    .venv/bin/python benchmarks/movielens.py --no-peers --cutoffs 3 --seeds 3 \\
        --feature-set features/movielens.toml --feature-set features/tuned.toml    # frozen against tuned
    .venv/bin/python benchmarks/movielens.py --peers popularity,itemknn,ease   # the quick peers only (no ALS, BPR, SASRec)
    .venv/bin/python benchmarks/movielens.py --engine ray [--address HEAD:6379] ...   # cutoffs x seeds as Ray tasks
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recengine.core import rolling
from recengine.core.data import Dataset
from recengine.core.datasets import movielens
from recengine.parts.encoders import DEFAULT_CACHE_DIR, EmbeddingCache
from recengine.parts.context import FeatureContext
from recengine.parts.featureset import FeatureSet
from recengine.core.metrics import evaluate
from recengine.parts.protocol import candidate_columns
from recengine.core.rolling import Window
from recengine.core.topk import top_k
from recengine.learning.training import train

METRICS = ("ndcg@10", "recall@10", "hr@10", "mrr@10")
KEYS = ["cutoff", "user_id"]
DEFAULT_FEATURE_SET = Path(__file__).resolve().parents[1] / "features" / "movielens.toml"
TOP = 10
PEERS = frozenset({"popularity", "itemknn", "als", "bpr", "ease", "sasrec"})  # every peer family


def protocol(cutoffs: int) -> tuple[list[Window], pl.DataFrame, str]:
    """ml-latest-small's rolling windows (`cutoffs` of them, evenly spaced), their truth tagged by cutoff,
    and a line that says what they hold."""
    data = movielens()
    chosen = rolling.spread(rolling.windows(data.events, data.items), cutoffs)
    truth = pl.concat([tagged(w.truth, w) for w in chosen])
    described = (f"ml-latest-small, rolling origin: {len(chosen)} cutoffs ({', '.join(w.label for w in chosen)}), "
                 f"{truth.select(KEYS).n_unique()} (cutoff, user) pairs, {truth.height:,} truth rows "
                 f"({truth['cold'].sum():,} cold)")
    return chosen, truth, described


def tagged(frame: pl.DataFrame, window: Window) -> pl.DataFrame:
    """`frame` with the window's cutoff as the first column: (cutoff, user) names a request."""
    return frame.select(pl.lit(window.cutoff).alias("cutoff"), pl.all())


def score(top: pl.DataFrame, truth: pl.DataFrame) -> dict[str, float]:
    """Metrics per (cutoff, user) averaged over every pair of the truth, and cold recall."""
    metrics = evaluate(top.select(*KEYS, "item_id", "score"), truth, KEYS, (TOP,))
    metrics.update(cold_recall(top, truth))
    return metrics


def cold_recall(top: pl.DataFrame, truth: pl.DataFrame) -> dict[str, float]:
    """Cold recall two ways: pooled (the cold truth rows found in the top lists, over all cold truth rows)
    and per request (each request's share of its own cold truth found, averaged over the requests that
    have any), which counts a user with 2 new items as much as one with 40."""
    found = top.select(*KEYS, "item_id").with_columns(pl.lit(True).alias("_found"))
    hits = (truth.filter(pl.col("cold")).join(found, on=[*KEYS, "item_id"], how="left")
            .with_columns(pl.col("_found").fill_null(False)))
    if not hits.height:
        return {"cold_recall": float("nan"), "cold_recall_req": float("nan")}
    per_request = hits.group_by(KEYS).agg(pl.col("_found").mean())["_found"].mean()
    return {"cold_recall": hits["_found"].sum() / hits.height, "cold_recall_req": per_request}


# --- recengine -----------------------------------------------------------------------------------

def with_seed(loaded: FeatureSet, source: str, seed: int) -> FeatureSet:
    raw = loaded.to_dict()
    return FeatureSet.from_dict({**raw, "labels": {**raw["labels"], "seed": seed}}, source, loaded.source_text)


def scored_candidates(window: Window, feature_set: FeatureSet, cache: EmbeddingCache):
    """Train on the window's past and score every candidate of its requests, as model.recommend does but
    keeping them all. Returns the training result, the context (the events before the cutoff), the rows
    (`_request_id`, user_id, timestamp, item_id, every feature, `score`; seen items dropped), their
    feature matrix (the model's columns, row for row) and the training seconds."""
    started = time.perf_counter()
    result = train(Dataset(window.events.lazy(), window.items.lazy()), feature_set, cache=cache, progress=False,
                   say=lambda _: None)
    trained = time.perf_counter() - started
    model = result.model
    context = FeatureContext.from_frames(window.events, window.items, cache=cache)
    keyed = window.requests.with_row_index("_request_id")
    rows = model.feature_set().candidate_rows(keyed, context)
    seen = window.events.select("user_id", "item_id").unique()
    rows = rows.join(seen, on=["user_id", "item_id"], how="anti")  # the protocol excludes seen items whatever the feature set says
    matrix = model.matrix(rows)
    return result, context, rows.with_columns(pl.Series("score", model.predict(matrix))), matrix, trained


def run_recengine(window: Window, feature_set: FeatureSet, cache: EmbeddingCache) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Train on the window's past, rank every candidate of its requests.

    Returns the top 10 per request, the truth rows with where each ended (`rank` among the request's
    candidates, null if never proposed; `sources` that proposed it) and timings."""
    started = time.perf_counter()
    result, _, rows, _, trained = scored_candidates(window, feature_set, cache)
    model = result.model
    ranked = top_k(rows, ["_request_id"], max(rows.height, 1))
    names = list(model.feature_set().candidates)
    proposed_by = pl.concat_list([pl.when(pl.col(candidate_columns(n)[0]).is_not_null()).then(pl.lit(n)) for n in names]
                                 ).list.drop_nulls().alias("sources")
    places = ranked.select("user_id", "item_id", "rank", proposed_by)
    popularity = window.events.group_by("item_id").agg(pl.len().alias("item_events"))
    fate = window.truth.join(places, on=["user_id", "item_id"], how="left").join(popularity, on="item_id", how="left").with_columns(
        pl.col("sources").fill_null(pl.lit([], dtype=pl.List(pl.String))), pl.col("item_events").fill_null(0))
    top = ranked.filter(pl.col("rank") <= TOP).select("user_id", "item_id", "score")
    info = {"train_s": trained, "rank_s": time.perf_counter() - started - trained,
            "candidates": rows.height / max(window.requests.height, 1), "sources": names,
            "validation_ndcg@10": result.metrics.get("ndcg@10", float("nan"))}
    return tagged(top, window), tagged(fate, window), info


# --- peers ---------------------------------------------------------------------------------------

def user_item_matrix(events: pl.DataFrame) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The binary user x item matrix of `events`, with the user and item ids of its rows and columns."""
    pairs = events.select("user_id", "item_id").unique()
    users = np.sort(pairs["user_id"].unique().to_numpy())
    items = np.sort(pairs["item_id"].unique().to_numpy())
    rows = np.searchsorted(users, pairs["user_id"].to_numpy())
    cols = np.searchsorted(items, pairs["item_id"].to_numpy())
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(users), len(items))), users, items


def ranked_frame(request_users: np.ndarray, ids: np.ndarray, items: np.ndarray) -> pl.DataFrame:
    """(user_id, item_id, score = -position) from a (users, 10) matrix of column indices, -1 = none."""
    keep = ids.ravel() >= 0
    return pl.DataFrame({
        "user_id": np.repeat(request_users, ids.shape[1]),
        "item_id": items[np.where(keep, ids.ravel(), 0)],
        "score": -np.tile(np.arange(ids.shape[1], dtype=np.float64), len(request_users)),
    }).filter(pl.Series(keep))


def implicit_top(model, matrix: sp.csr_matrix, users: np.ndarray, items: np.ndarray, request_users: np.ndarray) -> pl.DataFrame:
    rows = np.searchsorted(users, request_users)
    model.fit(matrix, show_progress=False)
    ids, scores = model.recommend(rows, matrix[rows], N=TOP, filter_already_liked_items=True)
    # Fewer than 10 items to offer: implicit pads with id -1 and score -inf.
    return ranked_frame(request_users, np.where(np.isfinite(scores), ids, -1), items)


def implicit_peers(matrix, users, items, request_users, seeds: int, only: frozenset[str] = PEERS
                   ) -> Iterator[tuple[str, str, int | None, pl.DataFrame]]:
    from implicit.als import AlternatingLeastSquares
    from implicit.bpr import BayesianPersonalizedRanking
    from implicit.nearest_neighbours import CosineRecommender

    for k in (20, 50, 100, 200, 400) if "itemknn" in only else ():
        yield "ItemKNN cosine", f"K={k}", None, implicit_top(CosineRecommender(K=k), matrix, users, items, request_users)
    grid = itertools.product((32, 64, 128), (0.01, 1.0), (1.0, 10.0)) if "als" in only else ()
    for (factors, reg, alpha), seed in itertools.product(grid, range(seeds)):
        model = AlternatingLeastSquares(factors=factors, regularization=reg, alpha=alpha, iterations=15, random_state=seed)
        yield "ALS", f"f={factors} r={reg} a={alpha}", seed, implicit_top(model, matrix, users, items, request_users)
    grid = itertools.product((32, 64, 128), (0.01, 0.05)) if "bpr" in only else ()
    for (factors, lr), seed in itertools.product(grid, range(seeds)):
        model = BayesianPersonalizedRanking(factors=factors, learning_rate=lr, regularization=0.01, iterations=100, random_state=seed)
        yield "BPR", f"f={factors} lr={lr}", seed, implicit_top(model, matrix, users, items, request_users)


def sasrec_peers(window: Window, request_users: np.ndarray, seeds: int) -> Iterator[tuple[str, str, int | None, pl.DataFrame]]:
    """SASRec (`benchmarks/sasrec.py`, ids only) at one setting: a grid costs about 40 s a fit here."""
    from sasrec import Settings, top_items

    settings = Settings(maxlen=50, epochs=30, loss="ce")
    for seed in range(seeds):
        ids, items = top_items(window.events, request_users, settings, seed, TOP)
        yield "SASRec", settings.label() + f" {settings.loss}", seed, ranked_frame(request_users, ids, items)


def ease_peers(matrix: sp.csr_matrix, users: np.ndarray, items: np.ndarray, request_users: np.ndarray,
               lambdas: tuple[float, ...], min_count: int) -> Iterator[tuple[str, str, int | None, pl.DataFrame]]:
    """EASE: B = I - P / diag(P), P = (X^T X + lambda I)^-1 (Steck 2019), over the items with at least
    `min_count` users (an inverse over every item costs about 15 s per lambda on 2 cores)."""
    from scipy.linalg import lapack

    kept = np.flatnonzero(np.asarray(matrix.sum(axis=0)).ravel() >= min_count)
    x = matrix[:, kept]
    gram = (x.T @ x).toarray().astype(np.float64)
    history = x[np.searchsorted(users, request_users)].toarray().astype(np.float64)
    for lam in lambdas:
        regularised = gram.copy()
        regularised[np.diag_indices_from(regularised)] += lam
        factor, info = lapack.dpotrf(regularised, lower=False, overwrite_a=True)
        upper, info2 = lapack.dpotri(factor, lower=False, overwrite_c=True)
        if info or info2:
            raise RuntimeError(f"EASE: Cholesky inverse failed (lambda={lam}, info {info}/{info2})")
        diagonal = np.diag(upper).copy()
        upper = np.triu(upper)
        # history @ P with P given by its upper triangle: U + U^T - diag(U).
        product = history @ upper + history @ upper.T - history * diagonal
        scores = history - product / diagonal
        scores[history > 0] = -np.inf  # seen items (the diagonal of B is 0, so their score is not their own)
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :TOP]
        ids = np.where(np.isfinite(np.take_along_axis(scores, ids, axis=1)), ids, -1)
        yield "EASE", f"lambda={lam:g}, {len(kept):,} items", None, ranked_frame(request_users, ids, items[kept])


def popularity_peers(window: Window) -> Iterator[tuple[str, str, int | None, pl.DataFrame]]:
    """Counts of events before the cutoff (all time, or the last `days`), seen items excluded."""
    seen = window.events.select("user_id", "item_id").unique()
    for days in (None, 365, 90, 30):
        recent = window.events if days is None else window.events.filter(pl.col("timestamp") >= window.cutoff - timedelta(days=days))
        counts = recent.group_by("item_id").len().sort("len", "item_id", descending=[True, False]).head(500)
        ranked = window.requests.select("user_id").join(counts, how="cross").join(seen, on=["user_id", "item_id"], how="anti")
        top = top_k(ranked.with_columns(pl.col("len").cast(pl.Float64).alias("score")), ["user_id"], TOP)
        yield "popularity", "all time" if days is None else f"last {days} days", None, top.select("user_id", "item_id", "score")


def peers(window: Window, lambdas: tuple[float, ...], ease_min_count: int, seeds: int, only: frozenset[str] = PEERS
          ) -> Iterator[tuple[str, str, int | None, pl.DataFrame]]:
    """(name, setting, seed or None, top 10) of every peer setting at one cutoff (of the families in
    `only`), each fit on the events before it; the peers with randomness once per seed 0..seeds-1."""
    request_users = window.requests["user_id"].to_numpy()
    if "popularity" in only:
        yield from popularity_peers(window)
    matrix, users, items = user_item_matrix(window.events)
    warnings.filterwarnings("ignore", message="Method expects CSR input")  # implicit's cosine, once per fit
    with threadpool_limits(1, user_api="blas"):  # implicit's advice: BLAS threads fight its own
        yield from implicit_peers(matrix, users, items, request_users, seeds, only)
    if "ease" in only:
        yield from ease_peers(matrix, users, items, request_users, lambdas, ease_min_count)
    if "sasrec" in only:
        yield from sasrec_peers(window, request_users, seeds)


def median_seed(runs: dict[int | None, pl.DataFrame], truth: pl.DataFrame) -> tuple[dict, pl.DataFrame, int | None]:
    """The (metrics, top, seed) of the seed whose NDCG@10 over all pairs is the median (recengine's rule)."""
    scored = sorted(((score(top, truth), top, seed) for seed, top in runs.items()), key=lambda r: r[0]["ndcg@10"])
    return scored[len(scored) // 2]


# --- report --------------------------------------------------------------------------------------

def loss_table(fate: pl.DataFrame) -> pl.DataFrame:
    """Per cutoff: truth rows (cold), the union's recall, the top 10's, and where the rest was lost."""
    share = lambda cond: (cond.sum() / pl.len()).alias  # noqa: E731
    proposed, top = pl.col("rank").is_not_null(), pl.col("rank") <= TOP
    return fate.group_by("cutoff").agg(
        pl.len().alias("truth"), pl.col("cold").sum().alias("cold"),
        share(proposed)("union_recall"),
        (proposed & pl.col("cold")).sum().truediv(pl.col("cold").sum()).alias("union_cold"),
        share(top.fill_null(False))("top10"),
        share(~proposed)("lost_unproposed"),
        share(proposed & (pl.col("rank") > TOP))("lost_ranked_low"),
    ).sort("cutoff")


def print_table(rows: list[tuple[str, str, dict]], best_peer: float) -> None:
    print(f"\n{'method':16}{'setting':72}" + "".join(f"{m:>11}" for m in METRICS) + f"{'cold rec':>10}{'per req':>9}{'vs best':>9}")
    for name, setting, m in rows:
        print(f"{name:16}{setting:72}" + "".join(f"{m[k]:11.4f}" for k in METRICS) + f"{m['cold_recall']:10.4f}"
              + f"{m['cold_recall_req']:9.4f}{m['ndcg@10'] / best_peer:8.2f}x")


def print_cutoffs(chosen: list[Window], fate: pl.DataFrame, infos: list[list[dict]], per_cutoff: pl.DataFrame) -> None:
    losses = loss_table(fate)
    print(f"\n{'cutoff':12}{'train ev':>9}{'catalog':>8}{'users':>6}{'truth':>6}{'cold':>5}{'cand/req':>9}"
          f"{'union rec':>10}{'union cold':>11}{'top10 rec':>10}{'unproposed':>11}{'ranked>10':>10}"
          f"{'NDCG ours':>10}{'NDCG peer':>10}{'train s (seeds)':>18}")
    for i, window in enumerate(chosen):
        loss = losses.filter(pl.col("cutoff") == window.cutoff).row(0, named=True)
        ndcg = per_cutoff.filter(pl.col("cutoff") == window.cutoff).row(0, named=True)
        seconds = "/".join(f"{run[i]['train_s']:.0f}" for run in infos)
        print(f"{window.label:12}{window.events.height:9,}{window.items.height:8,}{window.requests.height:6}"
              f"{loss['truth']:6}{loss['cold']:5}{infos[0][i]['candidates']:9.0f}{loss['union_recall']:10.3f}"
              f"{loss['union_cold']:11.3f}{loss['top10']:10.3f}{loss['lost_unproposed']:11.3f}{loss['lost_ranked_low']:10.3f}"
              f"{ndcg['ours']:10.4f}{ndcg['peer']:10.4f}{seconds:>18}")
    everything = loss_table(fate.with_columns(pl.lit(None, pl.Datetime("ms")).alias("cutoff"))).row(0, named=True)
    print(f"{'all':12}{'':9}{'':8}{'':6}{everything['truth']:6}{everything['cold']:5}{'':9}{everything['union_recall']:10.3f}"
          f"{everything['union_cold']:11.3f}{everything['top10']:10.3f}{everything['lost_unproposed']:11.3f}"
          f"{everything['lost_ranked_low']:10.3f}")
    sources = fate.explode("sources").drop_nulls("sources").group_by("sources").agg(
        pl.len().alias("n"), pl.col("cold").sum().alias("cold")).sort("sources")
    print("truth proposed by each source (rows, cold rows): " + ", ".join(
        f"{s} {n} ({c})" for s, n, c in sources.iter_rows()) + f" of {fate.height} ({fate['cold'].sum()} cold)")
    buckets = [(0, 0, "cold"), (1, 4, "1-4"), (5, 19, "5-19"), (20, 99, "20-99"), (100, None, "100+")]
    parts = []
    for low, high, name in buckets:
        rows = fate.filter(pl.col("item_events").is_between(low, high if high is not None else 10**12))
        if rows.height:
            got = rows.select(pl.col("rank").is_not_null().mean().alias("union"),
                              (pl.col("rank") <= TOP).fill_null(False).mean().alias("top")).row(0)
            parts.append(f"{name} {rows.height} ({got[0]:.3f} / {got[1]:.3f})")
    print("truth by the item's events before c: rows (union recall / top-10 recall): " + ", ".join(parts))
    proposed = fate.filter(pl.col("rank").is_not_null())
    if proposed.height:
        q = proposed["rank"].quantile
        print(f"rank of the proposed truth among its request's candidates: median {q(0.5, 'nearest'):.0f}, "
              f"quartiles {q(0.25, 'nearest'):.0f}-{q(0.75, 'nearest'):.0f}")


def per_cutoff_ndcg(top: pl.DataFrame, truth: pl.DataFrame, chosen: list[Window]) -> list[float]:
    return [score(top.filter(pl.col("cutoff") == w.cutoff), truth.filter(pl.col("cutoff") == w.cutoff))["ndcg@10"]
            for w in chosen]


def cutoff_runner(engine: str, address: str | None):
    """Runs `run_recengine` over (window, feature set, cache) jobs, yielding results in job order: here one
    after the other, or with `--engine ray` as Ray tasks, every cutoff and seed at once (each task sees
    only its window's events, as here)."""
    if engine == "local":
        return lambda jobs: (run_recengine(*job) for job in jobs)
    import ray

    from recengine.running.distributed import connect

    connect(address)
    task = ray.remote(num_cpus=1)(run_recengine)

    def run(jobs):
        refs = [task.remote(*job) for job in jobs]
        return (ray.get(ref) for ref in refs)

    return run


def run_feature_set(path: str, chosen: list[Window], truth: pl.DataFrame, seeds: int, cache: EmbeddingCache, runner=None):
    """recengine with one feature set at every cutoff, once per labels seed: the median seed's table row,
    its top 10, every seed's (metrics, top, fate, infos, seed) and the median seed's fate."""
    loaded = FeatureSet.load(path)
    runner = runner or cutoff_runner("local", None)
    results = runner([(window, with_seed(loaded, path, seed), cache) for seed in range(seeds) for window in chosen])
    runs = []
    for seed in range(seeds):
        parts, fates, infos = [], [], []
        for window in chosen:
            top, fate, info = next(results)
            parts.append(top), fates.append(fate), infos.append(info)
            print(f"{Path(path).name} seed {seed}, cutoff {window.label}: trained in {info['train_s']:.1f} s, ranked in "
                  f"{info['rank_s']:.1f} s, {info['candidates']:.0f} candidates per request, "
                  f"NDCG@10 {score(top, tagged(window.truth, window))['ndcg@10']:.4f}", flush=True)
        top = pl.concat(parts)
        runs.append((score(top, truth), top, pl.concat(fates), infos, seed))
        print(f"{Path(path).name} seed {seed}: NDCG@10 {runs[-1][0]['ndcg@10']:.4f} over all pairs", flush=True)
    metrics, top, fate, infos, seed = sorted(runs, key=lambda r: r[0]["ndcg@10"])[len(runs) // 2]
    setting = Path(path).name + (f", median of {seeds} seeds (seed {seed})" if seeds > 1 else "")
    return ("recengine", setting, metrics), top, runs, fate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feature-set", action="append",
                        help="A feature set to train at every cutoff; repeat it to compare several in one run "
                             "(each gets its row and its per-cutoff table). Default: features/movielens.toml.")
    parser.add_argument("--cutoffs", type=int, default=len(rolling.QUANTILES),
                        help="Evaluate N of the 10 cutoffs, evenly spaced (fast mode); windows keep their full-protocol ends.")
    parser.add_argument("--seeds", type=int, default=3, help="Training runs with [labels] seed 0..N-1; the median is shown.")
    parser.add_argument("--no-peers", action="store_true", help="Only recengine (quicker, for tuning).")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="Train recengine's cutoffs and seeds here one by one, or as parallel Ray tasks.")
    parser.add_argument("--address", help="With --engine ray: the cluster (default: a local Ray).")
    parser.add_argument("--no-recengine", action="store_true", help="Only the peers.")
    parser.add_argument("--peers", default=",".join(sorted(PEERS)),
                        help="The peer families to run, comma-separated (default: all of them).")
    parser.add_argument("--ease-lambdas", default="500,1000,2000,4000")
    parser.add_argument("--ease-min-count", type=int, default=2, help="EASE's items: those with at least N users before c.")
    args = parser.parse_args()

    only = frozenset(name.strip().lower() for name in args.peers.split(",") if name.strip())
    if only - PEERS:
        parser.error(f"--peers {args.peers}: unknown {', '.join(sorted(only - PEERS))}; give some of {', '.join(sorted(PEERS))}.")
    chosen, truth, described = protocol(args.cutoffs)
    print(described, flush=True)

    rows: list[tuple[str, str, dict]] = []
    tops: dict[tuple[str, str], pl.DataFrame] = {}
    ours: list[tuple[tuple[str, str, dict], list, pl.DataFrame]] = []  # (row, seeds' runs, fate) per feature set
    cache = EmbeddingCache(DEFAULT_CACHE_DIR)
    runner = cutoff_runner(args.engine, args.address)
    for path in ([] if args.no_recengine else args.feature_set or [str(DEFAULT_FEATURE_SET)]):
        row, top, runs, fate = run_feature_set(path, chosen, truth, args.seeds, cache, runner)
        rows.append(row)
        tops[row[:2]] = top
        ours.append((row, runs, fate))

    if not args.no_peers:
        lambdas = tuple(float(v) for v in args.ease_lambdas.split(","))
        found: dict[tuple[str, str], dict[int | None, list[pl.DataFrame]]] = {}
        started = time.perf_counter()
        for window in chosen:
            for name, setting, seed, top in peers(window, lambdas, args.ease_min_count, args.seeds, only):
                found.setdefault((name, setting.split(", ")[0]), {}).setdefault(seed, []).append(tagged(top, window))
            print(f"peers fit at {window.label} ({time.perf_counter() - started:.0f} s so far)", flush=True)
        best: dict[str, tuple[str, dict, pl.DataFrame]] = {}
        for (name, setting), runs in found.items():
            metrics, top, seed = median_seed({seed: pl.concat(parts) for seed, parts in runs.items()}, truth)
            if seed is not None and len(runs) > 1:
                setting += f", median of {len(runs)} seeds (seed {seed})"
            if name not in best or metrics["ndcg@10"] > best[name][1]["ndcg@10"]:
                best[name] = (setting, metrics, top)
        for name, (setting, metrics, top) in best.items():
            rows.append((name, f"best of grid: {setting}", metrics))
            tops[(name, setting)] = top
        if "EASE" in best:
            kept = [w.events.group_by("item_id").agg(pl.col("user_id").n_unique()).filter(pl.col("user_id") >= args.ease_min_count).height
                    for w in chosen]
            print(f"EASE over the items with at least {args.ease_min_count} users before c: {min(kept):,} to {max(kept):,} items")

    peer_rows = [r for r in rows if r[0] != "recengine"]
    best_peer = max((m["ndcg@10"] for _, _, m in peer_rows), default=float("nan"))
    print_table(rows, best_peer if peer_rows else rows[0][2]["ndcg@10"])
    peer_name = max(peer_rows, key=lambda r: r[2]["ndcg@10"]) if peer_rows else None
    for row, runs, fate in ours:
        ours_top = tops[row[:2]]
        reference = (peer_name[0], peer_name[1].removeprefix("best of grid: ")) if peer_name else ours[0][0][:2]
        per_cutoff = pl.DataFrame({"cutoff": [w.cutoff for w in chosen], "ours": per_cutoff_ndcg(ours_top, truth, chosen),
                                   "peer": per_cutoff_ndcg(tops[reference], truth, chosen)})
        print(f"\nper cutoff, {row[1]} (NDCG peer = {peer_name[0] if peer_name else reference[1]}; "
              f"union = every candidate the feature set's sources propose, seen items dropped):")
        print_cutoffs(chosen, fate, [r[3] for r in runs], per_cutoff)
        trained = [info["train_s"] for run in runs for info in run[3]]
        metrics = row[2]
        print(f"\n{row[1]}: NDCG@10 {metrics['ndcg@10']:.4f}" + (f" = {metrics['ndcg@10'] / best_peer:.2f}x the best peer "
              f"({peer_name[0]}, {best_peer:.4f})" if peer_rows else "") + f"; cold recall {metrics['cold_recall']:.4f}; "
              f"training per cutoff median {statistics.median(trained):.0f} s, max {max(trained):.0f} s; seeds' NDCG@10: "
              + ", ".join(f"{r[0]['ndcg@10']:.4f}" for r in runs))
    for row, _, _ in ours[1:]:  # each further feature set against the first, at equal information
        first = ours[0][0]
        cold = row[2]["cold_recall"] / first[2]["cold_recall"] if first[2]["cold_recall"] else float("inf")
        print(f"{row[1]} against {first[1]}: NDCG@10 {row[2]['ndcg@10'] / first[2]['ndcg@10']:.3f}x, cold recall "
              f"{row[2]['cold_recall']:.4f} against {first[2]['cold_recall']:.4f} ({cold:.2f}x)")


if __name__ == "__main__":
    main()
