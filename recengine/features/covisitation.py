"""Co-visitation: items seen within a few events of each other in one user's log.

One primitive, `pair_blocks`, finds the pairs from shifted index arrays over the events in
(user, time, item) order, a block of later events at a time (about `PAIR_ROWS` pairs), so no form needs
every pair at once unless it keeps them: the dated pair table (point-in-time joins, the one form that
holds all pairs), the all-time totals (a sparse item x item matrix, grown block by block: what a request
after the last pair sees), the totals as of each of a few times (snapshot requests), and the time of the
last pair. Each is built once per feature context. The extractor and the candidate source below both
read them.

Undirected counts are symmetric, so their matrices hold each pair once, at (smaller index, larger
index): half the memory of the largest thing a run keeps. `counts_at`, `times_counts` and
`both_ways` read them as the whole matrix.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import polars as pl
import scipy.sparse as sp

from recengine.core.pit import cumulative, recent_history, totals_before
from recengine.core.topk import DECIMALS
from recengine.errors import ConfigError
from recengine.features.popularity import item_counts
from recengine.parts.candidates import source_top_k
from recengine.parts.context import FIXED_POINT, RESOLUTION, exact_sum, exact_sum_expr
from recengine.parts.hookspecs import hookimpl
from recengine.parts.plugins import check_number


# Requests per distinct time above which the source scores them as of each time (snapshot requests).
SHARED_TIME = 20
# Distinct times few enough to step the context's totals to, whatever the requests, once those totals
# are at or before the first of them (the last chunks of a run, however small): each step copies the
# totals once, while the other way, the dated pair table, is events x 2 x window rows held for the run.
FEW_TIMES = 4
# Rows of the point-in-time pair join the co-visitation source holds at once (about 40 bytes each).
JOIN_ROWS = 5_000_000
# Pairs found at once (24 bytes each) when they are summed into totals rather than kept.
PAIR_ROWS = 5_000_000
# Score cells (requests x catalogue items, 8 bytes each) the source holds at once. A request's row of
# scores spans most of the catalogue (79,000 of 89,430 items at 20M events), so blocks of scores are
# dense arrays: 8 bytes a cell, not a sparse matrix's 12 a stored score and its copies through sums.
# Requests scored at once: `SCORE_CELLS` / items (at least one, at most `SCORE_REQUESTS`).
SCORE_CELLS = 8_000_000
SCORE_REQUESTS = 250
# Requests whose lower-half term (one read of every stored pair) is built at once, as an items x
# requests array of `LOWER_CELLS` at most: fewer groups read the stored pairs fewer times (163M at
# 20M events), smaller ones hold less.
LOWER_CELLS = 30_000_000
LOWER_REQUESTS = 1_000
# Stored pairs of the lower term's products on one thread at a time.
PRODUCT_PAIRS = 20_000_000
# Threads the scoring's pieces run on, each on its own rows of the output: scipy's products and numpy's
# array operations release the GIL, and scoring is most of a training chunk's time.
THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def check_window(window: int, part: str) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"{part}: window = {window!r}; give a whole number of events, 1 or more.")


class Sequences(NamedTuple):
    """Events sorted by (user, time, item) as arrays: the sorted item ids, then per event a user run
    number, the item's index in those ids, and the time."""

    ids: pl.Series
    user: np.ndarray
    item: np.ndarray
    times: pl.Series

    @classmethod
    def of(cls, events: pl.LazyFrame) -> "Sequences":
        # Run numbers and item indices as int32: a log of 2^31 events is far off, and these arrays are
        # kept for the run (8 bytes an event, not 16).
        ordered = events.sort("user_id", "timestamp", "item_id").select(
            pl.col("user_id").rle_id().cast(pl.Int32), "item_id", (pl.col("item_id").rank("dense") - 1).cast(pl.Int32).alias("_i"),
            "timestamp",
        ).collect()
        return cls(ordered["item_id"].unique().sort(), ordered["user_id"].to_numpy(), ordered["_i"].to_numpy(), ordered["timestamp"])


def pair_blocks(seq: Sequences, window: int, directed: bool = False, later: np.ndarray | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`(a, b, at)` blocks: item b came within `window` events after item a in one user's log (both
    ways unless `directed`), as indices into `seq.ids`; `at` is the position of the later event, whose
    time dates the pair. Only pairs whose later event is in `later` (sorted positions; default all),
    taken a block of about `PAIR_ROWS` pairs at a time."""
    later = np.arange(len(seq.user)) if later is None else later
    step = max(1, PAIR_ROWS // (window * (1 if directed else 2)))
    for start in range(0, len(later), step):
        a, b, at = [], [], []
        for lag in range(1, window + 1):
            block = later[start : start + step]
            block = block[block >= lag]
            block = block[(seq.user[block - lag] == seq.user[block]) & (seq.item[block - lag] != seq.item[block])]
            a.append(seq.item[block - lag])
            b.append(seq.item[block])
            at.append(block)
        a, b, at = np.concatenate(a), np.concatenate(b), np.concatenate(at)
        yield (a, b, at) if directed else (np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([at, at]))


def stored_blocks(seq: Sequences, window: int, directed: bool = False, later: np.ndarray | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`pair_blocks` as the count matrices store them: undirected pairs once each, at (smaller index,
    larger index) (the pair a-b and b-a are one count)."""
    for a, b, at in pair_blocks(seq, window, directed=True, later=later):
        yield (a, b, at) if directed else (np.minimum(a, b), np.maximum(a, b), at)


def counts_at(totals: sp.csr_matrix, a: np.ndarray, b: np.ndarray, directed: bool) -> np.ndarray:
    """The counts of the pairs (a[i], b[i]) in a stored count matrix (0 for a pair it does not hold).

    One binary search over every pair's row at once, each step halving every open range (as many steps
    as the longest row has bits). scipy's `totals[a, b]` scans each pair's whole row whenever there are
    fewer pairs than a tenth of the stored entries: 16 s of a 42-s validation chunk at 20M events."""
    if not directed:
        a, b = np.minimum(a, b), np.maximum(a, b)
    if not totals.has_sorted_indices:  # the sums built here keep rows sorted; a copy rather than a change to shared totals
        totals = totals.sorted_indices()
    lo, end = totals.indptr[a].astype(np.int64), totals.indptr[a + 1].astype(np.int64)
    hi = end.copy()
    open_ = np.flatnonzero(lo < hi)
    while len(open_):
        mid = (lo[open_] + hi[open_]) // 2
        right = totals.indices[mid] < b[open_]
        lo[open_[right]] = mid[right] + 1
        hi[open_[~right]] = mid[~right]
        open_ = open_[lo[open_] < hi[open_]]
    hit = lo < end
    hit[hit] = totals.indices[lo[hit]] == b[hit]
    counts = np.zeros(len(a), dtype=totals.dtype)
    counts[hit] = totals.data[lo[hit]]
    return counts


def times_counts(weights: sp.csr_matrix, totals: sp.csr_matrix, directed: bool, rows: int, group: int | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, product as an array): weights x the whole count matrix, `rows` rows of weights at a
    time. With the upper half U stored, weights x U + (U x weights^T)^T; the second term is built for
    `group` rows at a time (default: all), as U x anything reads every stored pair: fewer groups cost
    fewer reads, smaller ones less memory."""
    group = max(group or weights.shape[0], rows)
    # scipy casts both sides' values to one type inside every product: the counts as floats once here
    # (8 bytes a stored pair, shared by the threads), not a copy of them in each product.
    totals = sp.csr_matrix((totals.data.astype(weights.dtype), totals.indices, totals.indptr), shape=totals.shape)
    for start in range(0, weights.shape[0], group):
        part = weights[start : start + group]
        lower = None if directed else _times_transposed(totals, part)
        for lo in range(0, part.shape[0], rows):
            block = _times(part[lo : lo + rows], totals)
            if lower is not None:
                def add(a: int, b: int) -> None:
                    block[a:b] += lower[:, lo + a : lo + b].T
                in_threads(add, block.shape[0])
            yield start + lo, block
            del block  # (a generator's locals outlive the yield: the next block is built without this one)
        del lower  # the next group's is built without this one


def _times(weights: sp.csr_matrix, totals: sp.csr_matrix) -> np.ndarray:
    """weights x totals as an array, a run of weights' rows on each thread."""
    out = np.empty((weights.shape[0], totals.shape[1]))

    def rows(a: int, b: int) -> None:
        (weights[a:b] @ totals).toarray(out=out[a:b])

    in_threads(rows, weights.shape[0])
    return out


def _times_transposed(totals: sp.csr_matrix, weights: sp.csr_matrix) -> np.ndarray:
    """totals x weights^T as an (items x weight rows) array, a run of about `PRODUCT_PAIRS` stored
    pairs of totals' rows on each thread (views of its arrays), each run's product written into its rows."""
    right = weights.T.tocsr()
    out = np.empty((totals.shape[0], weights.shape[0]))

    def rows(a: int, b: int) -> None:
        first, last = totals.indptr[a], totals.indptr[b]
        run = sp.csr_matrix((totals.data[first:last], totals.indices[first:last], totals.indptr[a : b + 1] - first),
                            shape=(b - a, totals.shape[1]))
        (run @ right).toarray(out=out[a:b])

    bounds = np.searchsorted(totals.indptr, np.arange(PRODUCT_PAIRS, totals.nnz, PRODUCT_PAIRS))
    in_threads(rows, np.concatenate([[0], bounds, [totals.shape[0]]]))
    return out


def in_threads(work: Callable[[int, int], None], bounds: int | np.ndarray) -> None:
    """work(a, b) for each run of rows between consecutive `bounds` (empty runs skipped), or for
    `THREADS` even runs of `bounds` rows when it is a count, on up to `THREADS` threads. Each run
    writes only its own rows, so the result does not depend on timing."""
    if isinstance(bounds, int):
        bounds = np.linspace(0, bounds, THREADS + 1).astype(int)
    runs = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if THREADS < 2 or len(runs) < 2:
        for a, b in runs:
            work(a, b)
        return
    with ThreadPoolExecutor(min(THREADS, len(runs))) as pool:
        for done in [pool.submit(work, a, b) for a, b in runs]:
            done.result()  # (raises a run's error here)


def both_ways(totals: sp.csr_matrix, directed: bool) -> sp.csr_matrix:
    """The whole count matrix of a stored one (for serving states, which read rows)."""
    return totals if directed else (totals + totals.T).tocsr()


def summed(blocks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int,
           totals: sp.csr_matrix | None = None) -> sp.csr_matrix:
    """`totals` (default empty) plus every pair of `blocks` counted once, as an n x n matrix. Partial sums
    merge like a binary counter (a new one into the last while it is no smaller than half of it), so each
    count is copied O(log blocks) times, not once per block as adding every block to one total would."""
    stack: list[sp.csr_matrix] = []
    for a, b, _ in blocks:
        # Counts as int32 (8 bytes a stored pair with its index, not float64's 12): exact, and far below 2^31.
        part = sp.csr_matrix((np.ones(len(a), dtype=np.int32), (a, b)), shape=(n, n))  # duplicates summed
        while stack and 2 * part.nnz >= stack[-1].nnz:
            part = stack.pop() + part
        stack.append(part)
    # The new pairs summed first (the smaller partial sums into the larger), then added to `totals` once:
    # each addition to the totals copies them whole (at 20M events the wide window's hold 160M pairs,
    # 1.3 GB), and the one before it is still held by the caller, so one addition, not one per partial sum.
    new = None
    for part in reversed(stack):
        new = part if new is None else new + part
    if new is None:
        return sp.csr_matrix((n, n), dtype=np.int32) if totals is None else totals
    return new if totals is None else totals + new


def _sequences(context) -> Sequences:
    return context.memo("covis_sequences", lambda: Sequences.of(context.events))


def pair_table(context, window: int, directed: bool = False) -> pl.LazyFrame:
    """(a, b, timestamp): every dated pair, as item ids. Millions of rows for a wide window: build it
    only when a request comes before the last pair."""
    def build() -> pl.DataFrame:
        seq = _sequences(context)
        return pl.concat([pl.DataFrame({"a": seq.ids.gather(a), "b": seq.ids.gather(b), "timestamp": seq.times.gather(at)})
                          for a, b, at in pair_blocks(seq, window, directed)], rechunk=True)

    return context.memo(("covis_pairs", window, directed), build).lazy()


def pair_totals(context, window: int, directed: bool = False) -> tuple[pl.Series, sp.csr_matrix]:
    """Every pair's count over all events as a sparse item x item matrix (stored: undirected pairs in
    the upper half), and the item ids of its rows and columns: what a request after the last pair sees."""
    def build() -> tuple[pl.Series, sp.csr_matrix]:
        seq = _sequences(context)
        return seq.ids, summed(stored_blocks(seq, window, directed), len(seq.ids))

    return context.memo(("covis_totals", window, directed), build)


def totals_as_of(context, window: int, times: pl.Series, directed: bool = False) -> Iterator[tuple[Any, pl.Series, sp.csr_matrix]]:
    """(time, ids, totals) for each of `times` (sorted, distinct): the pair counts dated strictly before
    it (stored as `pair_totals`'), grown from the previous time's by the pairs whose later event falls between the two. Memory:
    one matrix of totals and a block of pairs, never every pair.

    The context keeps the last time's totals as a cursor, so calls in time order (training chunks,
    which go in time order for this) each add only the pairs since the previous call's last time:
    O(pairs) over all the calls, not O(pairs) per call. A call for an earlier time starts over."""
    seq = _sequences(context)
    n = len(seq.ids)
    at, order = context.memo("covis_time_order", lambda: _time_order(seq))
    # The last time's (time, events before it, totals), read and replaced whole: one consistent state
    # even if two threads share the context.
    cursor = context.memo(("covis_cursor", window, directed), dict)
    stamps = _stamps(times)
    last = _resumable(context, window, directed, stamps)
    if last is not None:
        _, start, totals = last
    else:
        start, totals = 0, sp.csr_matrix((n, n), dtype=np.int32)
    for time, stamp in zip(times, stamps):
        end = int(np.searchsorted(at, stamp, side="left"))  # the events strictly before this time
        totals = summed(stored_blocks(seq, window, directed, later=np.sort(order[start:end])), n, totals)
        cursor["last"] = (stamp, end, totals)
        start = end
        yield time, seq.ids, totals


def as_of_pays(context, window: int, directed: bool, times: pl.Series, requests: int) -> bool:
    """Whether requests at `times` (sorted, distinct) should read the totals as of each time rather
    than join with every dated pair: when many requests share each time, or when the totals kept from
    the last call are at or before the first time and the times are few (chunks in time order)."""
    if times.len() * SHARED_TIME < requests:
        return True
    return times.len() <= FEW_TIMES and _resumable(context, window, directed, _stamps(times)) is not None


def _stamps(times: pl.Series) -> np.ndarray:
    return times.cast(pl.Datetime("ms")).to_numpy().astype(np.int64)


def _resumable(context, window: int, directed: bool, stamps: np.ndarray) -> tuple | None:
    """The kept (time, events before it, totals), if they are at or before the first of `stamps`
    (sorted ms), so the totals as of those times grow from them instead of from the first event."""
    last = context.memo(("covis_cursor", window, directed), dict).get("last")
    return last if last is not None and len(stamps) and last[0] <= stamps[0] else None


def _time_order(seq: Sequences) -> tuple[np.ndarray, np.ndarray]:
    """The events' times (ms) sorted, and their positions in that order (ties in position order)."""
    stamps = _stamps(seq.times)
    order = np.argsort(stamps, kind="stable")
    return stamps[order], order.astype(np.int32 if len(order) < 2**31 else np.int64)


def last_pair(context, window: int) -> Any:
    """When the latest pair formed (None without pairs): requests after it see all pairs."""
    def build() -> Any:
        seq = _sequences(context)
        # The other direction has the same times.
        latest = [seq.times.gather(at).max() for _, _, at in pair_blocks(seq, window, directed=True) if len(at)]
        return max(latest) if latest else None

    return context.memo(("covis_last", window), build)


class Covisitation:
    """How often the item was seen next to each of the user's last `recent` items, before t.

    Columns: the sum and max over those seed items; the sum weighted by 1 / (1 + position) so the
    latest seeds count most; and a cosine-like sum, each count over sqrt(seed events x item events),
    which keeps the blockbusters every history shares from dominating. `directed` counts only
    pairs where the item came after the seed.
    """

    def __init__(self, window: int = 5, recent: int = 10, directed: bool = False):
        check_window(window, "covisitation")
        check_number("covisitation", "recent", recent, integer=True, minimum=1)
        self.window, self.recent, self.directed = window, recent, directed
        self.history_depth = recent
        # Named by their parameters, so one feature set can use two neighbourhoods side by side.
        stem = f"covis{'_next' if directed else ''}_w{window}_r{recent}"
        self.columns = [f"{stem}_{kind}" for kind in ("sum", "max", "wsum", "cos")]

    def counts(self, context) -> pl.LazyFrame:
        """Running pair counts (a, b, timestamp, n), built once per context."""
        return context.memo(
            ("covis_counts", self.window, self.directed),
            lambda: cumulative(pair_table(context, self.window, self.directed), ["a", "b"], {"n": pl.len()}).collect(),
        ).lazy()

    def transform(self, requests, context):
        counts = item_counts(context)
        keys = requests.select("_row", "user_id", "item_id", "timestamp")
        profiles = keys.select("user_id", "timestamp").unique()
        # Collected before numbering: a lazy join's row order may differ between the two reads below.
        history = recent_history(profiles, context.events, self.recent).select(
            "user_id", "timestamp", pl.col("h_item").alias("a"), "h_back").collect().with_row_index("_row").lazy()
        seed_events = totals_before(history.rename({"a": "item_id"}), counts, "item_id", ["n"]).rename({"n": "_na"})
        history = history.join(seed_events, on="_row").drop("_row")
        expanded = keys.join(history, on=["user_id", "timestamp"]).rename({"item_id": "b", "_row": "_request"})
        times = requests.select(pl.col("timestamp").unique().sort()).collect().to_series()
        if as_of_pays(context, self.window, self.directed, times, profiles.select(pl.len()).collect().item()):
            # Collected before numbering, as `history` above: both reads below must see one row order.
            expanded = expanded.collect().with_row_index("_row").lazy()
            found = self._counts_as_of(expanded.select("_row", "timestamp", "a", "b").collect(), times, context)
        else:
            expanded = expanded.collect().with_row_index("_row").lazy()  # numbered once, as above
            found = totals_before(expanded, self.counts(context), ["a", "b"], ["n"])
        n = pl.col("n").cast(pl.Float64)
        per_request = (
            expanded.select("_row", "_request", "h_back", "_na").join(found, on="_row")
            .group_by("_request").agg(
                n.sum().alias(self.columns[0]), n.max().alias(self.columns[1]),
                exact_sum_expr(n / (1 + pl.col("h_back"))).alias(self.columns[2]),
                exact_sum_expr(n / pl.col("_na").clip(lower_bound=1).sqrt()).alias("_cos"),
            )
            .rename({"_request": "_row"})
        )
        item_events = totals_before(keys, counts, "item_id", ["n"]).rename({"n": "_nb"})
        return keys.select("_row").join(per_request, on="_row", how="left").join(item_events, on="_row").select(
            "_row", *(pl.col(c) for c in self.columns[:3]),
            (pl.col("_cos") / pl.col("_nb").clip(lower_bound=1).sqrt()).alias(self.columns[3]),
        )

    def _counts_as_of(self, expanded: pl.DataFrame, times: pl.Series, context) -> pl.LazyFrame:
        """(`_row`, n): each (seed a, candidate b) row's pair count before its time, read from the totals
        as of each of `times` (requests sharing few times: snapshots, a batch "now") instead of the
        running counts of every dated pair, which `counts` holds all at once."""
        found = []
        for time, ids, totals in totals_as_of(context, self.window, times, self.directed):
            rows = expanded.filter(pl.col("timestamp") == time)
            a, b = (rows[c].replace_strict(ids, np.arange(len(ids)), default=-1, return_dtype=pl.Int64).to_numpy()
                    for c in ("a", "b"))
            n = np.zeros(len(rows), dtype=np.uint32)
            known = (a >= 0) & (b >= 0)  # an item in no pair (or unknown) has no count
            n[known] = counts_at(totals, a[known], b[known], self.directed)
            found.append(pl.DataFrame({"_row": rows["_row"], "n": n}))
        return pl.concat(found).lazy() if found else pl.LazyFrame(schema={"_row": pl.UInt32, "n": pl.UInt32})

    def prepare(self, snapshot) -> dict:
        """The pair totals in the state's item index (the last row and column: unknown items, in no pair)."""
        def build() -> sp.csr_matrix:
            ids, totals = pair_totals(snapshot.context, self.window, self.directed)
            at = snapshot.index(ids)
            pairs = both_ways(totals, self.directed).tocoo()
            n = snapshot.size + 1
            return sp.csr_matrix((pairs.data, (at[pairs.row], at[pairs.col])), shape=(n, n))

        return {"pairs": snapshot.memo(("covis_pairs", self.window, self.directed), build), "snapshot": snapshot}

    def serve(self, tables, user, idx: np.ndarray) -> dict[str, np.ndarray]:
        snapshot = tables["snapshot"]
        history = snapshot.histories.get(user)
        if history is None:
            return {c: np.full(len(idx), np.nan) for c in self.columns}
        seeds = history["item"][: self.recent]
        # A few dense rows then a gather: much cheaper than sparse column indexing per request.
        counts = tables["pairs"][seeds].toarray()[:, idx]
        # Weighted sums in `transform`'s fixed point (the same divisions, then exact integer sums).
        by_recency = exact_sum(counts / (1 + np.arange(len(seeds)))[:, None])
        by_popularity = exact_sum(counts / np.sqrt(np.maximum(snapshot.item_events[seeds], 1))[:, None])
        cosine = by_popularity / np.sqrt(np.maximum(snapshot.item_events[idx], 1))
        return dict(zip(self.columns, (counts.sum(axis=0), counts.max(axis=0), by_recency, cosine)))


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
        last = last_pair(context, self.window)
        now = (pl.col("timestamp") > last) if last is not None else pl.lit(True)
        found = [self._after_all_pairs(seeds.filter(now), context)]
        before = seeds.filter(~now)
        if before.height:  # the pair table (millions of rows for a wide window) only when a request needs it
            found.extend(self._before_pairs(before, context))
        return source_top_k(pl.concat(found), self.k)

    def _before_pairs(self, seeds: pl.DataFrame, context) -> list[pl.LazyFrame]:
        """Requests before the last pair. When many requests share few times (snapshot training
        requests), the pair totals as of each time, as a sparse matrix grown time after time, times the
        seed weights; otherwise each seed joined with its item's dated pairs."""
        times = seeds["timestamp"].unique().sort()
        if as_of_pays(context, self.window, False, times, seeds["_request"].n_unique()):
            return self._as_of_times(seeds, times, context)
        return self._joined_pairs(seeds, context)

    def _as_of_times(self, seeds: pl.DataFrame, times: pl.Series, context) -> list[pl.LazyFrame]:
        """Scores of the requests at each of `times`: seed weights x the pair counts dated before it, as
        `_after_all_pairs` does with all pairs. Cost per time: the pairs added since the last one."""
        return [self._scores(seeds.filter(pl.col("timestamp") == time), ids, totals, context)
                for time, ids, totals in totals_as_of(context, self.window, times)]

    def _joined_pairs(self, seeds: pl.DataFrame, context) -> list[pl.LazyFrame]:
        """Requests before the last pair: each seed joined with its item's dated pairs, kept when
        dated before the request. That join has as many rows as the seeds' items have pairs over all
        time, so requests go through it in batches of about `JOIN_ROWS` joined rows (a request whole
        in one batch, its own top k taken there): memory follows the batch, not the pair table."""
        pairs = pair_table(context, self.window).rename({"timestamp": "_pair_at"})
        per_item = context.memo(("covis_pairs_per_item", self.window), lambda: pairs.group_by("a").len().collect())
        rows = seeds.join(per_item, on="a", how="left").group_by("_request").agg(pl.col("len").fill_null(0).sum())
        batch = rows.sort("_request").select("_request", (pl.col("len").cum_sum() // JOIN_ROWS).alias("_batch"))
        seeds = seeds.join(batch, on="_request")
        found = []
        for number in batch["_batch"].unique().sort():
            hits = seeds.filter(pl.col("_batch") == number).lazy().join(pairs, on="a")
            hits = hits.filter(pl.col("_pair_at") < pl.col("timestamp"))
            scored = hits.group_by("_request", pl.col("b").alias("item_id")).agg(exact_sum_expr(pl.col("w")).alias("score"))
            found.append(source_top_k(scored, self.k).collect().lazy())
        return found

    def _after_all_pairs(self, seeds: pl.DataFrame, context) -> pl.LazyFrame:
        """Requests after the last pair (ranking "now") see every pair, so their scores are one sparse
        product, seed weights x pair totals, instead of a join as long as seeds x neighbours."""
        if not seeds.height:  # the totals over every pair (a matrix kept for the run) only when a request needs them
            return self._scores(seeds, None, None, context)
        ids, totals = pair_totals(context, self.window)
        return self._scores(seeds, ids, totals, context)

    def _scores(self, seeds: pl.DataFrame, ids: pl.Series, totals: sp.csr_matrix, context) -> pl.LazyFrame:
        """Each request's top k of seed weights x `totals` (an item x item matrix over `ids`)."""
        schema = {"_request": pl.UInt32, "item_id": context.events.collect_schema()["item_id"], "score": pl.Float64}
        if not seeds.height:
            return pl.LazyFrame(schema=schema)
        # Seeds are events, so every one has a row (empty for an item in no pair: it adds nothing).
        col = seeds["a"].replace_strict(ids, np.arange(len(ids)), return_dtype=pl.Int64).to_numpy()
        requests, row = np.unique(seeds["_request"].to_numpy(), return_inverse=True)
        # Weights in the fixed point of `exact_sum_expr` (whole numbers held in floats): every sum of their
        # products with the counts is exact, so the order scipy adds in cannot change a score.
        fixed = np.round(seeds["w"].to_numpy() * FIXED_POINT)
        weights = sp.csr_matrix((fixed, (row, col)), shape=(len(requests), totals.shape[0]))
        found = []
        # A block of requests at a time, as many as `SCORE_CELLS` allows: a request's scores are a row of
        # the product, the product of many requests (every neighbour of every seed) the largest thing
        # this source builds.
        rows = max(1, min(SCORE_REQUESTS, SCORE_CELLS // max(1, len(ids))))
        group = max(rows, min(LOWER_REQUESTS, LOWER_CELLS // max(1, len(ids))))
        for lo, scores in times_counts(weights, totals, False, rows, group):
            scores *= RESOLUTION
            hit_rows, hit_items = np.nonzero(_at_least_top_k(scores, self.k))  # row by row, items in order
            found.append(pl.DataFrame({"_request": requests[lo + hit_rows], "item_id": ids.gather(hit_items),
                                       "score": scores[hit_rows, hit_items]}, schema=schema))
            del scores, hit_rows, hit_items  # a block's arrays gone before the next's
        return pl.concat(found).lazy()


def _at_least_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """A mask over a block of scores (0: no pair) keeping each row's k best and every score tied with
    the k-th (after the rounding of `recengine.core.topk`), so the exact tie-break by item_id happens
    there. Every pair's score is positive, so a row with fewer than k of them keeps them all."""
    keep = scores > 0
    n = scores.shape[1]
    if n <= k:
        return keep

    def rows(a: int, b: int) -> None:
        rounded = np.round(scores[a:b], DECIMALS)
        kth = np.partition(rounded, n - k, axis=1)[:, n - k].copy()  # (the partitioned copy freed at once)
        keep[a:b] &= rounded >= kth[:, None]

    in_threads(rows, scores.shape[0])
    return keep


@hookimpl
def register_feature_extractors(register):
    register("covisitation", Covisitation, "Co-visitation of the item with the user's recent items.")


@hookimpl
def register_candidate_sources(register):
    register("covisitation", CovisitationSource, "Co-visited with the user's recent items.")
