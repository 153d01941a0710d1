"""`Ranker`: a trained model plus its serving state, for services that rank per request.

    from recengine import Ranker
    ranker = Ranker.load("models:/recengine-movielens@champion", events=events, items=items)
    ranker.rank(user_id=42, candidate_item_ids=[1, 2, 3])   # [(item_id, score), ...] best first

Loading checks the model's plugins; the state (histories, item statistics, embeddings from the
cache) is built once and swapped whole on `refresh`/`append`, so concurrent `rank` calls are safe.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from recengine.core.data import TIMESTAMP
from recengine.core.topk import order
from recengine.errors import ConfigError, DataError
from recengine.learning.model import LEARNED_STATES, RankerModel, load_model
from recengine.parts import policy as new_items
from recengine.parts.encoders import EmbeddingCache


class Ranker:
    def __init__(self, model: RankerModel, events, items=None, cache: EmbeddingCache | None = None, learned: str = "refit"):
        if learned not in LEARNED_STATES:
            raise ConfigError(f"learned = {learned!r}; give one of {LEARNED_STATES}.")
        # "refit": learned parts (a collaborative model) are fit again on each snapshot's events, the
        # freshest state; "saved": the state saved with the model at training is used as it is.
        self.model, self.cache, self.learned = model, cache, learned
        feature_set = model.feature_set()
        self.policy = new_items.NewItemPolicy.of(feature_set)  # None: the ranker's order alone
        self._exclude_seen = feature_set.exclude_seen
        self._lock = threading.Lock()  # serialises writers; readers take the current state lock-free
        self._events = None
        self._items = items.lazy().collect() if items is not None else None
        self._state = None
        self.refresh(events)

    @classmethod
    def load(cls, uri: str | Path, events, items=None, cache: EmbeddingCache | None = None, learned: str = "refit") -> "Ranker":
        """A model folder or MLflow URI, checked against the installed plugins, with a state built from
        `events` (the behaviour log snapshot) and `items` (the catalogue); `learned` as in `__init__`.
        (Loading checks the plugins, as for every command that loads a model.)"""
        return cls(load_model(uri), events, items, cache, learned)

    @property
    def at(self) -> datetime:
        """The time requests are ranked as of: just after the state's last event."""
        return self._state.at

    def refresh(self, events, items=None) -> None:
        """Rebuild the state from a new events snapshot (and catalogue), then swap it in."""
        from recengine.parts.context import FeatureContext
        from recengine.running.serving import ServingState

        with self._lock:
            frame = events.lazy().collect()
            catalogue = items.lazy().collect() if items is not None else self._items
            context = FeatureContext.from_frames(frame, catalogue, cache=self.cache)
            if self.learned == "saved":
                self.model.use_saved_state(context)
            state = ServingState(self.model.feature_set(), self.model.features, context)
            self._events, self._items, self._state = frame, catalogue, state

    def append(self, new_events) -> None:
        """Add events that happened since the snapshot (same columns) and rebuild the state. Their columns
        are cast to the snapshot's types where that loses nothing (string ids "42" to integer ids, say),
        and refused otherwise: the state's types never change, so its ids keep matching requests."""
        frame = new_events.lazy().collect()
        missing = [c for c in self._events.columns if c not in frame.columns]
        if missing:
            raise DataError(f"Ranker.append: the new events lack the column(s) {missing}; give the snapshot's columns "
                            f"{self._events.columns}.")
        frame = frame.select(_cast_column(frame[c], self._events.schema[c], "Ranker.append") for c in self._events.columns)
        self.refresh(pl.concat([self._events, frame]))

    def rank(self, user_id: Any, candidate_item_ids: Sequence[Any], at: datetime | None = None,
             context: dict | None = None, k: int | None = None) -> list[tuple[Any, float]]:
        """(item_id, score) for each candidate, best first (the best `k` only, when given). Features are as
        of the state's time; an `at` other than that is ranked exactly by the batch pipeline (slower).
        `context` is accepted for request attributes and ignored by the built-in features. With the
        model's [policy], new items take the last slots of the first `k` (10 when k is not given; the
        candidates after them follow in the ranker's order), as in the batch job and `recommend`."""
        state = self._state  # read once: a concurrent refresh swaps in a new one
        schema = state.context.events.collect_schema()
        items = [_id(item, schema["item_id"], f"candidate {i}") for i, item in enumerate(candidate_item_ids)]
        user_id = _id(user_id, schema["user_id"], "user_id")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise DataError(f"Ranker.rank: k = {k!r}; give a whole number, 0 or more, or leave it out for every candidate.")
        if not items:
            return []
        at = _moment(at)
        if at is not None and at != state.at:
            rows = self._rows(state, user_id, items, at)
            matrix = self.model.matrix(self.model.feature_set().given_rows(rows, ["user_id", "timestamp"], state.context))
            scores = self.model.predict(matrix)
        else:
            # One thread: for a few hundred rows, waking a thread pool costs more than it saves.
            matrix = state.feature_matrix(user_id, items)
            scores = self.model.predict(matrix, num_threads=1)
        if self.policy is None:
            best = order(scores, items)
            return [(items[i], float(scores[i])) for i in (best if k is None else best[:k])]
        return self._with_policy(state, user_id, items, at or state.at, scores, matrix, k)

    def _with_policy(self, state, user_id, items, at, scores, matrix, k: int | None) -> list[tuple[Any, float]]:
        """The policy's top k by the batch job's own code (`recengine.parts.policy.top`), so the two agree;
        without `k`, the other candidates after it in the ranker's order."""
        rows = self._rows(state, user_id, items, at).with_columns(
            pl.Series("_position", range(len(items)), dtype=pl.Int64), pl.Series("score", scores, dtype=pl.Float64))
        rows = new_items.with_policy_score(rows, matrix, self.model.features, self.policy)
        placed = new_items.top(rows, ["user_id", "timestamp"], new_items.DEFAULT_K if k is None else k, self.policy,
                               state.context, self._exclude_seen)["_position"].to_list()
        if k is None:
            taken = set(placed)
            placed += [int(i) for i in order(scores, items) if int(i) not in taken]
        return [(items[i], float(scores[i])) for i in placed]

    @staticmethod
    def _rows(state, user_id, items, at) -> pl.DataFrame:
        """The request's candidate rows, ids as the log's types."""
        schema = state.context.events.collect_schema()
        rows = pl.DataFrame({"user_id": [user_id] * len(items), "item_id": items, "timestamp": [at] * len(items)})
        return rows.with_columns(pl.col("user_id").cast(schema["user_id"]), pl.col("item_id").cast(schema["item_id"]),
                                 pl.col("timestamp").cast(TIMESTAMP))



def _id(value: Any, dtype: pl.DataType, what: str) -> Any:
    """`value` as an id of the log's type: cast when nothing is lost (the string "42" or the float 42.0 for
    integer ids, 42 for string ids); anything else (None, "4x", 4.5, True) is refused, never scored as
    an unknown user or item."""
    if dtype.is_integer():
        if isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        elif _numpy_integer(value):
            return int(value)
    elif dtype == pl.String:
        if isinstance(value, str):
            return value
        if (isinstance(value, int) and not isinstance(value, bool)) or _numpy_integer(value):
            return str(int(value))
    else:
        return value
    raise DataError(f"Ranker.rank: {what} = {value!r} is not an id of this log, whose ids are {dtype}; give "
                    f"{'a whole number' if dtype.is_integer() else 'a string'}.")


def _numpy_integer(value: Any) -> bool:
    return getattr(getattr(value, "dtype", None), "kind", None) in ("i", "u")


def _moment(at: Any) -> datetime | None:
    """`at` as a datetime: a datetime as given, an ISO 8601 string parsed; anything else refused."""
    if at is None or isinstance(at, datetime):
        return at
    if isinstance(at, str):
        try:
            return datetime.fromisoformat(at)
        except ValueError:
            pass
    raise DataError(f"Ranker.rank: at = {at!r} is not a time; give a datetime or an ISO 8601 string such as "
                    "'2024-01-31T12:00:00', or leave it out to rank as of the state's time.")


def _cast_column(column: pl.Series, dtype: pl.DataType, where: str) -> pl.Series:
    """`column` cast to `dtype`, refused (naming the column, row and value) where a value would be lost."""
    if column.dtype == dtype:
        return column
    cast = column.cast(dtype, strict=False)
    lost = cast.is_null() & column.is_not_null()  # not castable ("4x" as an integer)
    if column.dtype.is_numeric() and dtype.is_numeric():  # 4.5 -> 4: castable, but not the same number
        lost = lost | (cast.cast(column.dtype, strict=False) != column).fill_null(False)
    if lost.any():
        row = int(lost.arg_max())
        raise DataError(f"{where}: column '{column.name}' is {column.dtype} and the snapshot's is {dtype}; row {row} "
                        f"({column[row]!r}) cannot be cast without loss. Give the new events the snapshot's types.")
    return cast
