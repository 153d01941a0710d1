"""What a part sees when it serves: the events before T, indexed once for every part's `prepare`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable

import numpy as np
import polars as pl

from recengine.core.data import TIMESTAMP
from recengine.core.pit import recent_history
from recengine.parts.context import FeatureContext


class Snapshot:
    """The events before T, indexed once for every part's `prepare`.

    `item_ids` (sorted) are the catalogue's items and every item with an event; index i stands for
    `item_ids[i]` and -1 for an item the state does not know, which every per-item table answers in
    an extra last slot. `histories[user]` holds the user's latest events, most recent first: `item`
    (indices), `id`, `time`, `value`.
    """

    def __init__(self, context: FeatureContext, depth: int):
        events = context.events.collect()
        self.context, self.events = context, events
        last = events["timestamp"].max() if events.height else datetime(1970, 1, 1)
        self.at = last + timedelta(seconds=1)
        catalogue = context.items.select("item_id").collect()["item_id"] if context.items is not None else events["item_id"][:0]
        self.item_ids = pl.concat([catalogue, events["item_id"]]).unique().sort()
        self.size = len(self.item_ids)
        self.item_index: dict[Any, int] = dict(zip(self.item_ids.to_list(), range(self.size)))
        counts = events.group_by("user_id").len().sort("user_id")
        self.users = counts["user_id"]
        self.user_index: dict[Any, int] = dict(zip(self.users.to_list(), range(len(self.users))))
        self.user_events: dict[Any, int] = dict(counts.iter_rows())
        # Events per item index: every event is before T, so these are the counts "before t".
        self.item_events = np.bincount(self.index(events["item_id"]), minlength=self.size + 1).astype(np.float64)
        self.histories = self._histories(depth)
        self._memo: dict[Any, Any] = {}

    def index(self, ids: pl.Series) -> np.ndarray:
        """Item indices of `ids` (-1 where unknown)."""
        ids = ids.cast(self.item_ids.dtype, strict=False)
        return ids.replace_strict(self.item_ids, np.arange(self.size), default=-1, return_dtype=pl.Int64).to_numpy()

    def user_rows(self, ids: pl.Series) -> np.ndarray:
        """Positions of known users' ids in `users`."""
        return ids.replace_strict(self.users, np.arange(len(self.users)), return_dtype=pl.Int64).to_numpy()

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """Tables several parts share (embeddings, pair counts in this index), built once."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def _histories(self, depth: int) -> dict[Any, dict[str, Any]]:
        """Each user's last `depth` events before T, most recent first (the batch `recent_history`)."""
        at = pl.DataFrame({"user_id": self.users, "timestamp": pl.Series([self.at] * len(self.users), dtype=TIMESTAMP)})
        rows = recent_history(at.lazy(), self.events.lazy(), depth).collect().sort("user_id", "h_back")
        rows = rows.with_columns(pl.Series("_i", self.index(rows["h_item"])))
        out = {}
        for (user,), group in rows.group_by("user_id", maintain_order=True):
            out[user] = {"item": group["_i"].to_numpy(), "id": group["h_item"], "time": group["h_time"],
                         "value": group["h_value"].to_numpy()}
        return out
