"""Serving state: everything a per-request ranking needs, precomputed from an events snapshot.

A request is ranked as of the state's time T (just after its last event), so features that depend
only on the item (popularity, age, CTR, the popular source) or only on the user (activity) are
computed once, for every item and user, by the very extractors that computed them in training.
Features of a user-item pair are computed per request in numpy from the user's recent history and
precomputed tables (co-visitation counts, category counts, item embeddings); a test checks them
against the batch extractors. A third-party extractor without a fast path is run as in batch.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

import numpy as np
import polars as pl
import scipy.sparse as sp

from recengine.candidates import PopularSource, generate
from recengine.data import TIMESTAMP
from recengine.extractors import (
    CategoryAffinity, Covisitation, FeatureContext, ItemAge, ItemAttribute, ItemCTR, ItemPopularity, ItemTrend,
    ItemValue, UserActivity, compute_features, exact_sum,
)
from recengine.interest import InterestScores
from recengine.pit import recent_history

ITEM_ONLY = (ItemPopularity, ItemTrend, ItemAge, ItemValue, ItemCTR)
USER_ONLY = (UserActivity,)


class ServingState:
    """Immutable once built: `Ranker` swaps in a new one on refresh, so readers never see a half state."""

    # A user with rows for at least this share of the catalogue is computed once per catalogue item,
    # then read per row: no embedding is gathered per row, and the interest products of many such
    # users go into one. (On MovieLens batches of 1,000-3,000 rows per user: 25% faster than per row.)
    whole_share = 1 / 8

    def __init__(self, feature_set, features: list[str], context: FeatureContext):
        events = context.events.collect()
        self.context, self.features = context, features
        last = events["timestamp"].max() if events.height else datetime(1970, 1, 1)
        self.at = last + timedelta(seconds=1)
        catalogue = context.items.select("item_id").collect()["item_id"] if context.items is not None else events["item_id"][:0]
        ids = pl.concat([catalogue, events["item_id"]]).unique().sort()
        self.item_ids = ids
        self.item_index: dict[Any, int] = dict(zip(ids.to_list(), range(len(ids))))
        self.extractors = feature_set.build_extractors()
        self.sources = feature_set.build_sources()
        self._columns: dict[str, np.ndarray] = {}  # item-only features, one value per item index
        self._user_columns: dict[str, dict[Any, float]] = {}
        self._precompute_item_and_user(events)
        depth = max([getattr(e, "recent", 0) for e in self.extractors] + [1])
        self.history = self._histories(events, depth)
        self.user_events = dict(events.group_by("user_id").len().iter_rows())
        self._user_dtype = events["user_id"].dtype
        self._pairs: dict[tuple[int, bool], sp.csr_matrix] = {}
        # Events per item index: every event is before T, so these are the counts "before t".
        self._item_events = np.bincount(events["item_id"].replace_strict(self.item_index, return_dtype=pl.Int64).to_numpy(),
                                        minlength=len(ids) + 1).astype(np.float64)
        self._tables: dict[tuple, Any] = {}  # embeddings, profiles, item attributes: built once, then read
        self._categories: dict[tuple, tuple[sp.csr_matrix, dict]] = {}
        self._proposals, self._proposal_columns = self._propose(events)
        self._fast = [(e, *self._fast_path(e)) for e in self.extractors if not isinstance(e, ITEM_ONLY)]
        self._warm()

    # -- building -------------------------------------------------------------------------------

    def _precompute_item_and_user(self, events: pl.DataFrame) -> None:
        any_user = events["user_id"][0] if events.height else 0
        per_item = pl.DataFrame({"user_id": pl.Series([any_user] * len(self.item_ids), dtype=events["user_id"].dtype),
                                 "item_id": self.item_ids, "timestamp": [self.at] * len(self.item_ids)})
        item_only = [e for e in self.extractors if isinstance(e, ITEM_ONLY)]
        if item_only:
            # The last row is an item no event or catalogue row has: what an unknown item gets.
            probe = per_item.head(1).with_columns(pl.lit(_absent(self.item_ids)).cast(per_item["item_id"].dtype).alias("item_id"))
            table = compute_features(pl.concat([per_item, probe]), item_only, self.context)
            for column in (c for e in item_only for c in e.columns):
                values = table[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
                self._columns[column] = values  # the probe's value, last: what index -1 reads
        popular = [s for s in self.sources if isinstance(s, PopularSource)]
        if popular:
            one = per_item.head(1).select("user_id", "timestamp")
            proposed = generate(one, popular, self.context, exclude_seen=False)
            index = pl.DataFrame({"item_id": self.item_ids, "_i": np.arange(len(self.item_ids))})
            joined = index.join(proposed.drop("user_id", "timestamp"), on="item_id", how="left", maintain_order="left")
            for s in popular:
                for kind in ("score", "rank"):
                    column = f"cand_{s.name}_{kind}"
                    self._columns[column] = np.append(joined[column].cast(pl.Float64).fill_null(np.nan).to_numpy(), np.nan)
        user_only = [e for e in self.extractors if isinstance(e, USER_ONLY)]
        users = events.select("user_id").unique()
        if user_only and users.height:
            requests = users.with_columns(pl.lit(self.item_ids[0]).alias("item_id"), pl.lit(self.at).alias("timestamp"))
            table = compute_features(requests, user_only, self.context)
            for column in (c for e in user_only for c in e.columns):
                self._user_columns[column] = dict(zip(table["user_id"].to_list(), table[column].fill_null(np.nan).to_list()))
        self._unknown_user = {}
        if user_only:
            # Features of a user with no events, from the same extractors.
            probe = pl.DataFrame({"user_id": pl.Series([None], dtype=events["user_id"].dtype), "item_id": [self.item_ids[0]],
                                  "timestamp": [self.at]})
            table = compute_features(probe, user_only, self.context)
            self._unknown_user = {c: table[c].fill_null(np.nan)[0] for e in user_only for c in e.columns}

    def _propose(self, events: pl.DataFrame) -> tuple[dict[Any, tuple[np.ndarray, np.ndarray]], list[str]]:
        """What each user-dependent source proposes to every known user at T, by the batch `generate`:
        per user, the proposed item indices (sorted) and their score/rank columns."""
        sources = [s for s in self.sources if not isinstance(s, PopularSource)]
        columns = [f"cand_{s.name}_{k}" for s in sources for k in ("score", "rank")]
        if not sources or not events.height:
            return {}, columns
        # Sorted: the order users are generated in must not matter, and must not vary.
        users = events.select("user_id").unique().sort("user_id").with_columns(pl.lit(self.at).cast(TIMESTAMP).alias("timestamp"))
        proposed = generate(users, sources, self.context, exclude_seen=False)
        proposed = proposed.with_columns(pl.col("item_id").replace_strict(self.item_index, return_dtype=pl.Int64).alias("_i"))
        proposed = proposed.sort("user_id", "_i")
        out = {}
        for (user,), group in proposed.group_by("user_id", maintain_order=True):
            out[user] = (group["_i"].to_numpy(), group.select(pl.col(columns).cast(pl.Float64)).fill_null(np.nan).to_numpy())
        return out, columns

    def _histories(self, events: pl.DataFrame, depth: int) -> dict[Any, dict[str, np.ndarray]]:
        """Each user's last `depth` events before T, most recent first (the batch `recent_history`)."""
        profiles = events.select("user_id").unique().with_columns(pl.lit(self.at).cast(events["timestamp"].dtype).alias("timestamp"))
        rows = recent_history(profiles.lazy(), events.lazy(), depth).collect().sort("user_id", "h_back")
        rows = rows.with_columns(pl.col("h_item").replace_strict(self.item_index, return_dtype=pl.Int64).alias("_i"))
        out = {}
        for (user,), group in rows.group_by("user_id", maintain_order=True):
            out[user] = {"item": group["_i"].to_numpy(), "id": group["h_item"], "time": group["h_time"],
                         "value": group["h_value"].to_numpy()}
        return out

    def _pair_counts(self, window: int, directed: bool = False) -> sp.csr_matrix:
        """The context's pair totals (shared with the co-visitation source) in this state's item index."""
        if (window, directed) not in self._pairs:
            ids, totals = self.context.covisitation_totals(window, directed)
            at = ids.replace_strict(self.item_index, return_dtype=pl.Int64).to_numpy()
            pairs = totals.tocoo()
            n = len(self.item_ids) + 1  # the last row and column: unknown items, which no pair has
            self._pairs[window, directed] = sp.csr_matrix((pairs.data, (at[pairs.row], at[pairs.col])), shape=(n, n))
        return self._pairs[window, directed]

    def _embedding(self, scorer: InterestScores, field: str) -> tuple[np.ndarray, np.ndarray]:
        """Item embeddings in item-index order (zero rows where an item has no text), and which have one;
        one more zero row at the end, so index -1 (an unknown item) reads "no text" without a mask."""
        key = (scorer.encoder_name, repr(sorted(scorer.encoder_params.items())), field)
        if key not in self._tables:
            emb = scorer.embeddings(self.context, field)
            rows = emb.item_ids.replace_strict(self.item_index, return_dtype=pl.Int64).to_numpy()
            aligned = np.zeros((len(self.item_ids) + 1, emb.matrix.shape[1]), dtype=emb.matrix.dtype)
            aligned[rows] = emb.matrix
            has = np.zeros(len(self.item_ids) + 1, dtype=bool)
            has[rows] = True
            self._tables[key] = (aligned, has, emb)
        return self._tables[key][:2]

    def _profiles(self, scorer: InterestScores, field: str) -> dict[Any, np.ndarray]:
        """Every known user's profile as of T, by the batch code (`InterestScores.profiles`)."""
        key = ("profiles", id(scorer), field)
        if key not in self._tables:
            self._embedding(scorer, field)
            emb = self._tables[(scorer.encoder_name, repr(sorted(scorer.encoder_params.items())), field)][2]
            users = list(self.history)
            profiles = pl.DataFrame({"user_id": pl.Series(users, dtype=self._user_dtype),
                                     "timestamp": pl.Series([self.at] * len(users), dtype=TIMESTAMP)})
            history = recent_history(profiles.lazy(), self.context.events, scorer.history).collect()
            matrix, _ = scorer.profiles(history, len(users), emb)
            self._tables[key] = {u: matrix[j] for j, u in enumerate(users) if np.isfinite(matrix[j]).all()}
        return self._tables[key]

    def _category_matrix(self, field: str, separator: str) -> tuple[sp.csr_matrix, dict]:
        key = (field, separator)
        if key not in self._categories:
            items = self.context.item_field(field, "category_affinity").select(
                "item_id", pl.col(field).cast(pl.String).str.split(separator).alias("_cat")).explode("_cat").filter(
                pl.col("_cat").is_not_null() & (pl.col("_cat") != "")).collect()
            items = items.filter(pl.col("item_id").is_in(self.item_ids.implode()))
            names = {c: j for j, c in enumerate(items["_cat"].unique().sort().to_list())}
            rows = items["item_id"].replace_strict(self.item_index, return_dtype=pl.Int64).to_numpy()
            cols = items["_cat"].replace_strict(names, return_dtype=pl.Int64).to_numpy()
            # The last row, empty, is what unknown items (index -1) read.
            matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(self.item_ids) + 1, len(names)))
            self._categories[key] = (matrix, names)
        return self._categories[key]

    def _warm(self) -> None:
        """Build every lazily made table now, so requests only read (and threads never race to build)."""
        for part in [*self.extractors, *self.sources]:
            if isinstance(part, Covisitation):
                self._pair_counts(part.window, part.directed)
            if isinstance(part, CategoryAffinity):
                self._user_category_table(part, self._category_matrix(part.field, part.separator)[0])
            if isinstance(part, ItemAttribute):
                self._attribute_table(part)
            if isinstance(part, InterestScores):
                for f in part.fields:
                    self._profiles(part, f)

    def _fast_path(self, extractor) -> tuple[Callable, bool]:
        """How the extractor's columns are read, as `path(user, idx, ids, sims)`, and whether that path
        takes item indices alone (so a user's values can be computed once per catalogue item)."""
        if isinstance(extractor, USER_ONLY):
            return (lambda user, idx, ids, sims: {c: np.full(len(idx), self._user_value(c, user)) for c in extractor.columns}), False
        if isinstance(extractor, InterestScores):
            return (lambda user, idx, ids, sims: self._interest(extractor, user, idx, sims)), True
        paths = {Covisitation: self._covisitation, CategoryAffinity: self._affinity, ItemAttribute: self._attribute}
        if type(extractor) in paths:
            return (lambda user, idx, ids, sims: paths[type(extractor)](extractor, user, idx)), True
        return (lambda user, idx, ids, sims: self._batch(extractor, user, ids)), False

    # -- per request ------------------------------------------------------------------------------

    def feature_matrix(self, user_id: Any, item_ids: list) -> np.ndarray:
        """(len(item_ids), len(features)) in the model's order; unknown users and items give what they can."""
        idx = np.fromiter((self.item_index.get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))
        values = {**self._item_values(idx), **self._user_values(user_id, idx, item_ids)}
        out = np.empty((len(idx), len(self.features)))
        for j, column in enumerate(self.features):
            out[:, j] = values[column]
        return out

    def feature_rows(self, user_ids: pl.Series, item_ids: pl.Series) -> np.ndarray:
        """The feature matrix of many (user, item) rows at T, in their order: what a batch job at T
        needs. Item-only columns are read for all rows at once, the rest a user at a time (all the
        user's rows, from however many requests, together); rows sorted by user need no reordering."""
        items = item_ids.cast(self.item_ids.dtype, strict=False)
        idx = items.replace_strict(self.item_ids, np.arange(len(self.item_ids)), default=-1, return_dtype=pl.Int64).to_numpy()
        out = np.empty((len(idx), len(self.features)), order="F")  # a user's rows of a column are contiguous
        position = {c: j for j, c in enumerate(self.features)}
        for column, values in self._item_values(idx).items():
            if column in position:
                out[:, position[column]] = values
        by_user = pl.DataFrame({"user_id": user_ids, "_row": np.arange(len(idx))}).sort("user_id", maintain_order=True)
        order = by_user["_row"].to_numpy()
        ordered = np.array_equal(order, np.arange(len(idx)))
        runs = by_user["user_id"].rle()
        ends = np.cumsum(runs.struct.field("len").to_numpy())
        sorted_idx, sorted_items = (idx, items) if ordered else (idx[order], items.gather(order))
        users, sizes = runs.struct.field("value").to_list(), runs.struct.field("len").to_numpy()
        whole = [u for u, size in zip(users, sizes) if self._whole(size)]
        # Users computed whole get their interest similarities 64 at a time, in one product each.
        groups = {group[0]: group for group in (whole[i:i + 64] for i in range(0, len(whole), 64))}
        blocks: dict = {}
        for user, lo, hi in zip(users, ends - sizes, ends):
            if user in groups:
                blocks = {id(e): self._interest_blocks(e, groups[user]) for e in self.extractors if isinstance(e, InterestScores)}
            rows = slice(lo, hi) if ordered else order[lo:hi]
            for column, values in self._user_values(user, sorted_idx[lo:hi], sorted_items[lo:hi], blocks).items():
                if column in position:
                    out[rows, position[column]] = values
        return out

    def _item_values(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Columns that depend on the item alone: item-only extractors and the popular source."""
        return {c: self._columns[c][idx] for c in self._columns}

    def _user_values(self, user_id: Any, idx: np.ndarray, item_ids, blocks: dict | None = None) -> dict[str, np.ndarray]:
        """Columns that depend on the user: user-only extractors, sources' proposals, user-item features.
        A user with many rows (`whole_share` of the catalogue or more: a batch) gets the per-item
        columns computed once per catalogue item (plus one unknown item), then read per row;
        `blocks` may hold that user's interest similarities, computed with other users'."""
        values = self._source_values(user_id, idx)
        whole = self._whole(len(idx))
        catalogue = np.append(np.arange(len(self.item_ids)), -1) if whole else None
        for extractor, path, per_item in self._fast:
            if per_item and whole:
                sims = (blocks or {}).get(id(extractor), {}).get(user_id)
                # Values for every item index, then the unknown item's last, where index -1 reads it.
                values.update((c, v[idx]) for c, v in path(user_id, catalogue, None, sims).items())
            else:
                values.update(path(user_id, idx, item_ids, None))
        return values

    def _whole(self, rows: int) -> bool:
        """Whether a user's `rows` are cheaper computed once per catalogue item, then read per row."""
        return rows >= self.whole_share * len(self.item_ids)

    def _user_value(self, column: str, user: Any) -> float:
        return self._user_columns.get(column, {}).get(user, self._unknown_user.get(column, np.nan))

    def _source_values(self, user, idx) -> dict[str, np.ndarray]:
        """Each user-dependent source's score and rank for the candidates, from the proposals at T."""
        out = {c: np.full(len(idx), np.nan) for c in self._proposal_columns}
        found = self._proposals.get(user)
        if found is not None:
            items, values = found
            at = np.minimum(np.searchsorted(items, idx), len(items) - 1)
            hit = (items[at] == idx) & (idx >= 0)
            for j, column in enumerate(self._proposal_columns):
                out[column][hit] = values[at[hit], j]
        return out

    def _covisitation(self, ext: Covisitation, user, idx) -> dict[str, np.ndarray]:
        history = self.history.get(user)
        if history is None:
            return {c: np.full(len(idx), np.nan) for c in ext.columns}
        seeds = history["item"][: ext.recent]
        # A few dense rows then a gather: much cheaper than sparse column indexing per request.
        counts = self._pair_counts(ext.window, ext.directed)[seeds].toarray()[:, idx]
        # Weighted sums in the batch extractor's fixed point (the same divisions, then exact integer sums).
        by_recency = exact_sum(counts / (1 + np.arange(len(seeds)))[:, None])
        by_popularity = exact_sum(counts / np.sqrt(np.maximum(self._item_events[seeds], 1))[:, None])
        cosine = by_popularity / np.sqrt(np.maximum(self._item_events[idx], 1))
        return dict(zip(ext.columns, (counts.sum(axis=0), counts.max(axis=0), by_recency, cosine)))

    def _affinity(self, ext: CategoryAffinity, user, idx) -> dict[str, np.ndarray]:
        total = self.user_events.get(user, 0)
        if not total:
            return {c: np.full(len(idx), np.nan) for c in ext.columns}
        matrix, _ = self._category_matrix(ext.field, ext.separator)
        # Category counts over all the user's events: the history kept may be shorter than that.
        per_category = self._user_category_counts(ext, user, matrix)
        rows = matrix[idx]  # candidates x categories, sparse: a catalogue may have many categories
        counts = np.diff(rows.indptr)
        has = counts > 0
        best = np.full(len(idx), np.nan)
        if has.any():
            # Each non-empty row's entries run from its start to the next non-empty row's start.
            best[has] = np.maximum.reduceat(per_category[rows.indices], rows.indptr[:-1][has])
        mean = np.where(has, (rows @ per_category) / np.maximum(counts, 1), np.nan)
        return {ext.columns[0]: mean / total, ext.columns[1]: best / total}

    def _user_category_counts(self, ext, user, matrix) -> np.ndarray:
        per_user, users = self._user_category_table(ext, matrix)
        return per_user[users[user]].toarray().ravel()

    def _user_category_table(self, ext, matrix) -> tuple[sp.csr_matrix, dict]:
        key = ("category_counts", ext.field, ext.separator)
        if key not in self._categories:
            events = self.context.events.select("user_id", "item_id").collect()
            rows = events["user_id"].to_list()
            users = {u: j for j, u in enumerate(dict.fromkeys(rows))}
            u = np.fromiter((users[r] for r in rows), dtype=np.int64, count=len(rows))
            i = events["item_id"].replace_strict(self.item_index, return_dtype=pl.Int64).to_numpy()
            per_user = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(len(users), len(self.item_ids) + 1)) @ matrix
            self._categories[key] = (sp.csr_matrix(per_user), users)
        return self._categories[key]

    def _interest(self, ext: InterestScores, user, idx, sims: dict[str, tuple[np.ndarray, bool]] | None = None) -> dict[str, np.ndarray]:
        """Cosine to the user's profile and the best cosine to a recent item. `sims`, when given, holds
        each field's similarities of `idx` to the user's targets and whether the first is the profile
        (`_interest_blocks` computes them for many users in one product)."""
        out = {}
        for field in ext.fields:
            matrix, has = self._embedding(ext, field)
            known = has[idx]
            if sims is not None:
                found, with_profile = sims[field]
            else:
                targets, with_profile = self._interest_targets(ext, field, user)
                # One product against the profile and the recent items together: the gathered
                # candidate vectors are the costly part, so they are read once.
                found = matrix[idx] @ targets.T if len(targets) else np.empty((len(idx), 0), dtype=np.float32)
            mean = np.where(known, found[:, 0], np.nan) if with_profile else np.full(len(idx), np.nan)
            tail = found[:, int(with_profile):]
            best = np.where(known, tail.max(axis=1), np.nan) if tail.shape[1] else np.full(len(idx), np.nan)
            out[f"interest_{field}_mean"], out[f"interest_{field}_max"] = mean, best
        return out

    def _interest_targets(self, ext: InterestScores, field: str, user) -> tuple[np.ndarray, bool]:
        """The vectors a candidate is compared with: the user's profile (if any) then recent items."""
        matrix, has = self._embedding(ext, field)
        history = self.history.get(user)
        recent = history["item"][: ext.recent] if history is not None else np.empty(0, dtype=np.int64)
        recent = recent[has[recent]]
        profile = self._profiles(ext, field).get(user)
        return (matrix[recent] if profile is None else np.vstack([profile, matrix[recent]])), profile is not None

    def _interest_blocks(self, ext: InterestScores, users: list) -> dict[Any, dict[str, tuple[np.ndarray, bool]]]:
        """For users computed whole: every item's (and the unknown item's) similarities to each user's
        targets, and whether the first is the profile, in one matrix product per field for all of
        them (a product per user is 4x slower)."""
        blocks: dict[Any, dict[str, tuple[np.ndarray, bool]]] = {u: {} for u in users}
        for field in ext.fields:
            matrix, _ = self._embedding(ext, field)
            targets = [self._interest_targets(ext, field, u) for u in users]
            sizes = np.array([len(t) for t, _ in targets])
            product = np.vstack([t for t, _ in targets]) @ matrix.T if sizes.sum() else np.empty((0, len(matrix)), dtype=np.float32)
            for u, hi, size, (_, with_profile) in zip(users, np.cumsum(sizes), sizes, targets):
                blocks[u][field] = (product[hi - size:hi].T, with_profile)
        return blocks

    def _attribute_table(self, ext: ItemAttribute) -> np.ndarray:
        key = ("attributes", tuple(ext.fields))
        if key not in self._tables:
            values = self.context.items.select("item_id", *(pl.col(f).cast(pl.Float64) for f in ext.fields)).collect()
            table = np.full((len(self.item_ids) + 1, len(ext.fields)), np.nan)  # the last row: unknown items
            rows = values["item_id"].replace_strict(self.item_index, return_dtype=pl.Int64).to_numpy()
            table[rows] = values.select(ext.fields).fill_null(np.nan).to_numpy()
            self._tables[key] = table
        return self._tables[key]

    def _attribute(self, ext: ItemAttribute, user, idx) -> dict[str, np.ndarray]:
        table = self._attribute_table(ext)
        history = self.history.get(user)
        out = {}
        for j, f in enumerate(ext.fields):
            item = table[idx, j]
            mean = np.nan
            if history is not None:
                recent = table[history["item"][: ext.recent], j]
                known = recent[np.isfinite(recent)]
                mean = exact_sum(known) / len(known) if len(known) else np.nan
            out[f"item_{f}"], out[f"user_gap_{f}"] = item, np.abs(item - mean)
        return out

    def _batch(self, extractor, user, item_ids) -> dict[str, np.ndarray]:
        requests = pl.DataFrame({"user_id": [user] * len(item_ids), "item_id": item_ids, "timestamp": [self.at] * len(item_ids)})
        table = compute_features(requests, [extractor], self.context)
        return {c: table[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in extractor.columns}


def _absent(ids: pl.Series) -> Any:
    """An id of the same type that is not in `ids`."""
    if ids.dtype == pl.String:
        return "\x00recengine-unknown-item"
    return (ids.max() or 0) + 1
