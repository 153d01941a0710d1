"""Serving state: everything a per-request ranking needs, precomputed from an events snapshot.

A request is ranked as of the state's time T (just after its last event). The state knows no
concrete part; it reads what each part declares (`recengine.parts`):
- item- and user-scoped extractors, and item-scoped sources, are computed once for every item and
  user, by their own `transform`/`generate`, exactly as in training;
- the other sources propose to every known user once, by `generate`;
- a user-item extractor with `prepare`/`serve` builds its tables once and serves each request from
  them (`recengine.parts.contract.check_extractor` holds `serve` equal to `transform`); one without them
  runs the batch pipeline per request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from recengine.core.data import TIMESTAMP
from recengine.parts.candidates import generate
from recengine.parts.context import FeatureContext, compute_features
from recengine.parts.protocol import candidate_columns, history_depth, scope_of, serves
from recengine.parts.snapshot import Snapshot


class ServingState:
    """Immutable once built: `Ranker` swaps in a new one on refresh, so readers never see a half state."""

    # A user with rows for at least this share of the catalogue is computed once per catalogue item,
    # then read per row (and parts with `serve_whole` compute many such users at once). On MovieLens
    # batches of 1,000-3,000 rows per user this is 25% faster than per row.
    whole_share = 1 / 8

    def __init__(self, feature_set, features: list[str], context: FeatureContext):
        self.extractors = feature_set.build_extractors()
        self.sources = feature_set.build_sources()
        depth = max([history_depth(e) for e in self.extractors] + [1])
        self.snapshot = Snapshot(context, depth)
        self.context, self.features, self.at = context, features, self.snapshot.at
        self.item_ids, self.item_index = self.snapshot.item_ids, self.snapshot.item_index
        self._columns: dict[str, np.ndarray] = {}  # item-scoped columns, one value per item index, unknown last
        self._user_columns: dict[str, dict[Any, float]] = {}
        self._unknown_user: dict[str, float] = {}
        self._precompute_items()
        self._precompute_users()
        self._proposals, self._proposal_columns = self._propose()
        # Every table a request reads is built now, so requests only read and threads never race.
        self._paths = [(e, e.prepare(self.snapshot) if serves(e) else None)
                       for e in self.extractors if scope_of(e) == "user_item"]

    # -- building -------------------------------------------------------------------------------

    def _at_all(self, users: pl.Series, items: pl.Series) -> pl.DataFrame:
        return pl.DataFrame({"user_id": users, "item_id": items, "timestamp": pl.Series([self.at] * len(items), dtype=TIMESTAMP)})

    def _precompute_items(self) -> None:
        """Item-scoped extractors and sources, for every item and (in the last slot) an unknown one."""
        snap = self.snapshot
        extractors = [e for e in self.extractors if scope_of(e) == "item"]
        if extractors:
            # The last row is an item no event or catalogue row has: what index -1 reads.
            items = pl.concat([self.item_ids, pl.Series([_absent(self.item_ids)], dtype=self.item_ids.dtype)])
            anyone = pl.Series([snap.users[0] if len(snap.users) else 0] * len(items), dtype=snap.events["user_id"].dtype)
            table = compute_features(self._at_all(anyone, items), extractors, self.context)
            for column in (c for e in extractors for c in e.columns):
                self._columns[column] = table[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
        sources = [s for s in self.sources if scope_of(s) == "item"]
        if sources:
            one = pl.DataFrame({"user_id": snap.users[:1] if len(snap.users) else [0], "timestamp": [self.at]})
            proposed = generate(one, sources, self.context, exclude_seen=False)
            index = pl.DataFrame({"item_id": self.item_ids})
            joined = index.join(proposed.drop("user_id", "timestamp"), on="item_id", how="left", maintain_order="left")
            for column in (c for s in sources for c in candidate_columns(s.name)):
                self._columns[column] = np.append(joined[column].cast(pl.Float64).fill_null(np.nan).to_numpy(), np.nan)

    def _precompute_users(self) -> None:
        """User-scoped extractors, for every known user and once for a user with no events."""
        extractors = [e for e in self.extractors if scope_of(e) == "user"]
        if not extractors:
            return
        users = pl.concat([self.snapshot.users, pl.Series([None], dtype=self.snapshot.users.dtype)])
        table = compute_features(self._at_all(users, pl.Series([self.item_ids[0]] * len(users), dtype=self.item_ids.dtype)),
                                 extractors, self.context)
        for column in (c for e in extractors for c in e.columns):
            values = table[column].cast(pl.Float64).fill_null(np.nan)
            self._user_columns[column] = dict(zip(self.snapshot.users.to_list(), values[:-1].to_list()))
            self._unknown_user[column] = values[-1]

    def _propose(self) -> tuple[dict[Any, tuple[np.ndarray, np.ndarray]], list[str]]:
        """What each user-dependent source proposes to every known user at T, by the batch `generate`:
        per user, the proposed item indices (sorted) and their score/rank columns."""
        sources = [s for s in self.sources if scope_of(s) != "item"]
        columns = [c for s in sources for c in candidate_columns(s.name)]
        if not sources or not len(self.snapshot.users):
            return {}, columns
        users = pl.DataFrame({"user_id": self.snapshot.users}).with_columns(pl.lit(self.at).cast(TIMESTAMP).alias("timestamp"))
        proposed = generate(users, sources, self.context, exclude_seen=False)
        proposed = proposed.with_columns(pl.Series("_i", self.snapshot.index(proposed["item_id"]))).sort("user_id", "_i")
        out = {}
        for (user,), group in proposed.group_by("user_id", maintain_order=True):
            out[user] = (group["_i"].to_numpy(), group.select(pl.col(columns).cast(pl.Float64)).fill_null(np.nan).to_numpy())
        return out, columns

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
        needs. Item-scoped columns are read for all rows at once, the rest a user at a time (all the
        user's rows, from however many requests, together); rows sorted by user need no reordering."""
        items = item_ids.cast(self.item_ids.dtype, strict=False)
        idx = self.snapshot.index(items)
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
        # Users computed whole are served 64 at a time by parts that can (one product for all of them).
        groups = {group[0]: group for group in (whole[i:i + 64] for i in range(0, len(whole), 64))}
        blocks: dict = {}
        for user, lo, hi in zip(users, ends - sizes, ends):
            if user in groups:
                blocks = {id(part): part.serve_whole(tables, groups[user]) for part, tables in self._paths
                          if tables is not None and callable(getattr(part, "serve_whole", None))}
            rows = slice(lo, hi) if ordered else order[lo:hi]
            for column, values in self._user_values(user, sorted_idx[lo:hi], sorted_items[lo:hi], blocks).items():
                if column in position:
                    out[rows, position[column]] = values
        return out

    def _item_values(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {c: self._columns[c][idx] for c in self._columns}

    def _user_values(self, user_id: Any, idx: np.ndarray, item_ids, blocks: dict | None = None) -> dict[str, np.ndarray]:
        """Columns that depend on the user: user-scoped ones, the sources' proposals, user-item features.
        A user with many rows (`whole_share` of the catalogue or more: a batch) gets each served part's
        columns once per catalogue item (plus the unknown item), then read per row; `blocks` may hold
        them already, from `serve_whole`."""
        values = self._source_values(user_id, idx)
        for column, per_user in self._user_columns.items():
            values[column] = np.full(len(idx), per_user.get(user_id, self._unknown_user[column]))
        whole = self._whole(len(idx))
        every = np.append(np.arange(len(self.item_ids)), -1) if whole else None
        for part, tables in self._paths:
            if tables is None:
                values.update(self._batch(part, user_id, item_ids))
            elif whole:
                found = (blocks or {}).get(id(part), {}).get(user_id)
                served = found if found is not None else part.serve(tables, user_id, every)
                values.update((c, v[idx]) for c, v in served.items())  # index -1 reads the unknown item, last
            else:
                values.update(part.serve(tables, user_id, idx))
        return values

    def _whole(self, rows: int) -> bool:
        """Whether a user's `rows` are cheaper computed once per catalogue item, then read per row."""
        return rows >= self.whole_share * len(self.item_ids)

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

    def _batch(self, extractor, user, item_ids) -> dict[str, np.ndarray]:
        """A part without a serving path: the batch pipeline, for this request's rows."""
        requests = pl.DataFrame({"user_id": [user] * len(item_ids), "item_id": item_ids, "timestamp": [self.at] * len(item_ids)})
        table = compute_features(requests, [extractor], self.context)
        return {c: table[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in extractor.columns}


def _absent(ids: pl.Series) -> Any:
    """An id of the same type that is not in `ids`."""
    if ids.dtype == pl.String:
        return "\x00recengine-unknown-item"
    return (ids.max() or 0) + 1
