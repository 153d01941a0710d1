"""A collaborative model as learned parts: EASE (Steck 2019), a closed-form item-item ridge
regression, fit on a window of events (`fit`), then read point in time: a request's user history is
the user's events before the request, scored against the item-item weights learnt before the
window's end. `ease` scores every candidate (its score, and its rank among all items the user has
not taken); the `ease` source proposes the best of those.

The weights are stored in fixed point (whole multiples of 2^-20, as int32): every score is an exact
sum, the same in batch and serving and in any order.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from recengine.core.pit import recent_history
from recengine.parts.candidates import source_top_k
from recengine.parts.context import learned_state
from recengine.parts.hookspecs import hookimpl
from recengine.parts.plugins import check_number

SCALE = 2.0**20


def fit_ease(events: pl.DataFrame, l2: float, max_items: int) -> dict[str, np.ndarray]:
    """EASE's item-item weights B = -P / diag(P), P = (X'X + l2 I)^-1, over the `max_items` items
    most users took (ties by id), X the binary user x item matrix of `events`."""
    pairs = events.select("user_id", "item_id").unique()
    top = pairs.group_by("item_id").len().sort(["len", "item_id"], descending=[True, False]).head(max_items)
    ids = top["item_id"].sort()
    kept = pairs.join(top.select("item_id"), on="item_id").sort("user_id", "item_id")
    users = kept["user_id"].rank("dense").cast(pl.Int64).to_numpy() - 1
    items = kept["item_id"].replace_strict(ids, np.arange(len(ids)), return_dtype=pl.Int64).to_numpy()
    x = sp.csr_matrix((np.ones(len(items)), (users, items)), shape=(int(users.max(initial=-1)) + 1, len(ids)))
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += l2
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    item_ids = np.asarray(ids.to_list(), dtype=str if ids.dtype == pl.String else np.int64)
    return {"item_ids": item_ids, "weights": np.round(weights * SCALE).astype(np.int32)}


class _EASE:
    """What the extractor and the source share: the fit, the state's item index, the scores."""

    def __init__(self, l2: float, max_items: int, history: int):
        check_number(self.part, "l2", l2, above=0)
        check_number(self.part, "max_items", max_items, integer=True, minimum=2)
        check_number(self.part, "history", history, integer=True, minimum=1)
        self.l2, self.max_items, self.history = l2, max_items, history
        self.history_depth = history
        self.fit_key = ("ease", l2, max_items)  # the extractor and the source with equal settings fit once

    def fit(self, events: pl.DataFrame, items: pl.DataFrame | None) -> dict[str, np.ndarray]:
        return fit_ease(events, self.l2, self.max_items)

    @staticmethod
    def _index(state: dict[str, np.ndarray], ids: pl.Series) -> np.ndarray:
        known = pl.Series(state["item_ids"]).cast(ids.dtype, strict=False)
        return ids.replace_strict(known, np.arange(len(known)), default=-1, return_dtype=pl.Int64).to_numpy()

    def _weights(self, context, state) -> np.ndarray:
        # float64 copy of the whole-number weights: products with 0/1 histories add up exactly.
        return context.memo(("ease_weights", self.fit_key, context.learned_until), lambda: state["weights"].astype(np.float64))

    def _profile_scores(self, context, state, history: pl.DataFrame, n_profiles: int) -> tuple[np.ndarray, sp.csr_matrix]:
        """Scores of every state item per profile (history rows carry `_profile`), and the 0/1 history."""
        seen = history.with_columns(pl.Series("_i", self._index(state, history["h_item"]))).filter(pl.col("_i") >= 0)
        seen = seen.select("_profile", "_i").unique().sort("_profile", "_i")
        taken = sp.csr_matrix((np.ones(seen.height), (seen["_profile"].to_numpy(), seen["_i"].to_numpy())),
                              shape=(n_profiles, len(state["item_ids"])))
        return (taken @ self._weights(context, state)) / SCALE, taken

    @staticmethod
    def _ranks(scores: np.ndarray, taken: sp.csr_matrix) -> np.ndarray:
        """Each item's rank (1 = best) among the items the profile has not taken; taken items rank last."""
        masked = np.where(taken.toarray() > 0, -np.inf, scores)
        order = np.argsort(-masked, axis=1, kind="stable")  # exact scores: ties keep item-id order
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
        return ranks


class EASEScores(_EASE):
    """`ease_score` of each candidate for the user's history before t, and its `ease_rank`."""

    part = "ease"

    def __init__(self, l2: float = 1000.0, max_items: int = 3000, history: int = 200):
        super().__init__(l2, max_items, history)
        self.columns = ["ease_score", "ease_rank"]

    def transform(self, requests, context):
        state, until = learned_state(context, self)
        keys = requests.select("_row", "user_id", "item_id", "timestamp").collect()
        profiles = keys.select("user_id", "timestamp").unique(maintain_order=True)
        history = recent_history(profiles.lazy(), context.events, self.history).collect()
        scores, taken = self._profile_scores(context, state, history, profiles.height)
        ranks = self._ranks(scores, taken)
        keys = keys.join(profiles.with_row_index("_profile"), on=["user_id", "timestamp"], maintain_order="left")
        p, i = keys["_profile"].to_numpy().astype(np.int64), self._index(state, keys["item_id"])
        # Null for items outside the model, users with no history in it, and requests before its window's end.
        usable = (i >= 0) & (np.diff(taken.indptr)[p] > 0) & (keys["timestamp"] >= until).to_numpy()
        score = np.where(usable, scores[p, np.maximum(i, 0)], np.nan)
        rank = np.where(usable, ranks[p, np.maximum(i, 0)], np.nan)
        return keys.select("_row").with_columns(pl.Series("ease_score", score, nan_to_null=True),
                                                pl.Series("ease_rank", rank.astype(np.float64), nan_to_null=True)).lazy()

    def prepare(self, snapshot) -> dict:
        state, until = learned_state(snapshot.context, self)
        ids = pl.Series(state["item_ids"])
        return {"state": state, "weights": self._weights(snapshot.context, state), "snapshot": snapshot,
                "usable": snapshot.at >= until,
                "to_state": self._index(state, snapshot.item_ids.cast(ids.dtype, strict=False)) if len(ids) else None}

    def serve(self, tables, user, idx: np.ndarray) -> dict[str, np.ndarray]:
        history = tables["snapshot"].histories.get(user)
        empty = {c: np.full(len(idx), np.nan) for c in self.columns}
        if history is None or not tables["usable"] or tables["to_state"] is None:
            return empty
        taken = np.unique(tables["to_state"][history["item"][: self.history]])
        taken = taken[taken >= 0]
        if not len(taken):
            return empty
        scores = tables["weights"][taken].sum(axis=0) / SCALE
        masked = scores.copy()
        masked[taken] = -np.inf
        ranks = np.empty(len(scores), dtype=np.int64)
        ranks[np.argsort(-masked, kind="stable")] = np.arange(1, len(scores) + 1)
        i = np.where(idx >= 0, tables["to_state"][idx], -1)
        known = i >= 0
        return {"ease_score": np.where(known, scores[i], np.nan), "ease_rank": np.where(known, ranks[i], np.nan)}


class EASESource(_EASE):
    """The items with the best EASE score for the user's history before t, among those not taken."""

    part = "ease source"

    def __init__(self, k: int = 100, l2: float = 1000.0, max_items: int = 3000, history: int = 200):
        check_number("ease source", "k", k, integer=True, minimum=1)
        super().__init__(l2, max_items, history)
        self.name, self.k = "ease", k

    def generate(self, requests, context):
        state, until = learned_state(context, self)
        keyed = requests.collect()
        schema = {"_request": pl.UInt32, "item_id": context.events.collect_schema()["item_id"], "score": pl.Float64}
        keyed = keyed.filter(pl.col("timestamp") >= until)  # nothing from a model fit after the request
        if not keyed.height or not len(state["item_ids"]):
            return pl.LazyFrame(schema=schema)
        history = recent_history(keyed.lazy().select("user_id", "timestamp"), context.events, self.history).collect()
        scores, taken = self._profile_scores(context, state, history, keyed.height)
        scores[taken.toarray() > 0] = -np.inf
        scores[np.diff(taken.indptr) == 0] = -np.inf  # no history in the model: nothing to propose
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        found = np.take_along_axis(scores, order, axis=1)
        rows, cols = np.nonzero(np.isfinite(found))
        items = pl.Series(state["item_ids"]).cast(schema["item_id"], strict=False).gather(order[rows, cols])
        out = pl.DataFrame({"_request": keyed["_request"].gather(rows), "item_id": items, "score": found[rows, cols]}, schema=schema)
        return source_top_k(out.lazy(), self.k)


@hookimpl
def register_feature_extractors(register):
    register("ease", EASEScores, "EASE collaborative score and rank of the item for the user's history (learned).")


@hookimpl
def register_candidate_sources(register):
    register("ease", EASESource, "Best EASE collaborative scores for the user's history (learned).")
