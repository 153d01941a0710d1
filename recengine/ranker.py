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

from recengine.encoders import EmbeddingCache
from recengine.errors import ConfigError
from recengine.model import LEARNED_STATES, RankerModel, load_model
from recengine.topk import order


class Ranker:
    def __init__(self, model: RankerModel, events, items=None, cache: EmbeddingCache | None = None, learned: str = "refit"):
        if learned not in LEARNED_STATES:
            raise ConfigError(f"learned = {learned!r}; give one of {LEARNED_STATES}.")
        # "refit": learned parts (a collaborative model) are fit again on each snapshot's events, the
        # freshest state; "saved": the state saved with the model at training is used as it is.
        self.model, self.cache, self.learned = model, cache, learned
        self._lock = threading.Lock()  # serialises writers; readers take the current state lock-free
        self._events = None
        self._items = items.lazy().collect() if items is not None else None
        self._state = None
        self.refresh(events)

    @classmethod
    def load(cls, uri: str | Path, events, items=None, cache: EmbeddingCache | None = None, learned: str = "refit") -> "Ranker":
        """A model folder or MLflow URI, checked against the installed plugins, with a state built from
        `events` (the behaviour log snapshot) and `items` (the catalogue); `learned` as in `__init__`."""
        model = load_model(uri)
        model.check_plugins()
        return cls(model, events, items, cache, learned)

    @property
    def at(self) -> datetime:
        """The time requests are ranked as of: just after the state's last event."""
        return self._state.at

    def refresh(self, events, items=None) -> None:
        """Rebuild the state from a new events snapshot (and catalogue), then swap it in."""
        from recengine.extractors import FeatureContext
        from recengine.serving import ServingState

        with self._lock:
            frame = events.lazy().collect()
            catalogue = items.lazy().collect() if items is not None else self._items
            context = FeatureContext.from_frames(frame, catalogue, cache=self.cache)
            if self.learned == "saved":
                self.model.use_saved_state(context)
            state = ServingState(self.model.feature_set(), self.model.features, context)
            self._events, self._items, self._state = frame, catalogue, state

    def append(self, new_events) -> None:
        """Add events that happened since the snapshot (same columns) and rebuild the state."""
        frame = new_events.lazy().collect()
        self.refresh(pl.concat([self._events, frame.select(self._events.columns)], how="vertical_relaxed"))

    def rank(self, user_id: Any, candidate_item_ids: Sequence[Any], at: datetime | None = None,
             context: dict | None = None) -> list[tuple[Any, float]]:
        """(item_id, score) for each candidate, best first. Features are as of the state's time; an
        `at` other than that is ranked exactly by the batch pipeline (slower). `context` is accepted
        for request attributes and ignored by the built-in features."""
        items = list(candidate_item_ids)
        if not items:
            return []
        state = self._state  # read once: a concurrent refresh swaps in a new one
        if at is not None and at != state.at:
            scores = self._scores_at(state, user_id, items, at)
        else:
            # One thread: for a few hundred rows, waking a thread pool costs more than it saves.
            scores = self.model.predict(state.feature_matrix(user_id, items), num_threads=1)
        return [(items[i], float(scores[i])) for i in order(scores, items)]

    def _scores_at(self, state, user_id, items, at):
        schema = state.context.events.collect_schema()
        rows = pl.DataFrame({"user_id": [user_id] * len(items), "item_id": items, "timestamp": [at] * len(items)})
        rows = rows.with_columns(pl.col("user_id").cast(schema["user_id"]), pl.col("item_id").cast(schema["item_id"]))
        return self.model.score(self.model.feature_set().given_rows(rows, ["user_id", "timestamp"], state.context))

