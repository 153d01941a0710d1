"""Feature extraction: the context extractors read, running them over requests, and the exact sums
both paths of a feature share.

An extractor (see `recengine.parts`) receives requests `(_row, user_id, item_id, timestamp, ...)` as
a LazyFrame and returns `_row` plus its `columns`. It may read anything in the `FeatureContext`, but
only events strictly before each request's timestamp may shape that request's values: build on
`recengine.core.pit`. The built-in extractors live in `recengine.features`, one module per family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl

from recengine.core.data import TIMESTAMP
from recengine.core.pit import DAY
from recengine.errors import ConfigError
from recengine.parts.encoders import EmbeddingCache
from recengine.parts.protocol import FeatureExtractor, learns


@dataclass
class FeatureContext:
    """What extractors read: the event log, the catalogue, the embedding cache, shared work.

    With impression logs, `events` holds what users did (rows without a label, or with label > 0)
    and `impressions` what they were shown (rows with a label, clicked or not).
    """

    events: pl.LazyFrame
    items: pl.LazyFrame | None = None
    impressions: pl.LazyFrame | None = None
    cache: EmbeddingCache | None = None
    progress: bool = False
    # Learned parts' states by part key, fit on events before `learned_until` (see recengine.parts).
    learned: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    learned_until: datetime | None = None
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_frames(cls, events: pl.LazyFrame | pl.DataFrame, items=None, **kwargs: Any) -> "FeatureContext":
        # Collected once: every extractor re-reads the events, and a scan would re-parse the file. In time
        # order, so the running totals kept for a run (`recengine.core.pit.RunningTotals`) slice them.
        events = events.lazy().with_columns(pl.col("timestamp").cast(TIMESTAMP)).sort("timestamp", maintain_order=True).collect()
        items = items.lazy().collect().lazy() if items is not None else None
        impressions = None
        if "label" in events.columns:
            # An item shown and not clicked is not something the user did: it feeds CTR only.
            impressions = events.filter(pl.col("label").is_not_null()).lazy()
            events = events.filter(pl.col("label").is_null() | (pl.col("label") > 0))
        return cls(events=events.lazy(), items=items, impressions=impressions, **kwargs)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """Compute shared work (pair tables, embeddings) once per context."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def item_field(self, field: str, part: str) -> pl.LazyFrame:
        """The catalogue, checked to hold `field`, or an error saying what `part` needs."""
        if self.items is None:
            raise ConfigError(f"{part} reads the item field '{field}', but no items table was given; pass --items "
                              "(a catalogue with item_id and that field) or drop it from the feature set.")
        schema = self.items.collect_schema()
        if field not in schema:
            raise ConfigError(f"{part}: the items have no field '{field}'; they have {schema.names()}.")
        return self.items

    def has(self, column: str) -> bool:
        return column in self.events.collect_schema()


def compute_features(
    requests: pl.DataFrame, extractors: Sequence[FeatureExtractor], context: FeatureContext
) -> pl.DataFrame:
    """`requests` (user_id, item_id, timestamp, ...) with every extractor's columns added, same row order."""
    keyed = requests.with_row_index("_row").with_columns(pl.col("timestamp").cast(TIMESTAMP))
    lazy = keyed.lazy()
    out = keyed
    for extractor in extractors:
        values = extractor.transform(lazy, context).collect()
        # Features are numbers to LightGBM; one dtype keeps model inputs and logged schemas uniform.
        values = values.select("_row", pl.col(extractor.columns).cast(pl.Float64))
        out = out.join(values, on="_row", how="left", maintain_order="left")
    return out.drop("_row")


# Fixed point at 2^-30 (about 1e-9): scaling by a power of two is exact, so whole numbers stay whole
# and numpy and polars do the very same float operations.
FIXED_POINT, RESOLUTION = 2.0**30, 2.0**-30


def exact_sum_expr(expr: pl.Expr) -> pl.Expr:
    """A sum of floats in fixed point (2^-30): integer addition does not depend on the order a parallel
    group-by adds in, so the same data always gives the same features, and the same model."""
    return (expr * FIXED_POINT).round().cast(pl.Int64).sum() * RESOLUTION


def exact_sum(terms: np.ndarray, axis: int = 0) -> np.ndarray:
    """`exact_sum_expr` over a numpy axis: the same fixed point, so a serving path equals batch to the bit."""
    return np.round(terms * FIXED_POINT).sum(axis=axis) * RESOLUTION


def days(expr: pl.Expr) -> pl.Expr:
    """A duration expression in (fractional) days."""
    return expr.dt.total_milliseconds().cast(pl.Float64) / DAY.total_seconds() / 1000


def fit_learned(parts: Sequence[Any], context: FeatureContext, until: datetime, keep: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Fit the learned parts among `parts` on the context's events strictly before `until`; the context
    then serves their states to every request at or after `until` (`keep` adds to the states it has)."""
    learned = [part for part in parts if learns(part)]
    if not keep:
        context.learned = {}
    if learned:
        window = context.events.filter(pl.col("timestamp") < until).collect()
        items = context.items.collect() if context.items is not None else None
        fitted: dict[Any, dict[str, np.ndarray]] = {}  # parts with one `fit_key` (same model, same settings) fit once
        for part in learned:
            share = getattr(part, "fit_key", None)
            state = fitted.get(share) if share is not None else None
            if state is None:
                state = part.fit(window, items)
                if share is not None:
                    fitted[share] = state
            context.learned[getattr(part, "key", type(part).__name__)] = state
    context.learned_until = until
    return context.learned


def learned_state(context: Any, part: Any) -> tuple[dict[str, Any], Any]:
    """The part's fitted state in `context` and the end of its fitting window (requests before it
    must not read the state). A context that holds none (ranking with a trained model) fits every
    learned part on all its events once: the freshest state, as a nightly refit would have."""
    key = getattr(part, "key", type(part).__name__)
    if key not in context.learned:
        # At the boundary the context's other parts were fit at, if any: moving it would change what
        # they may serve.
        until = context.learned_until
        if until is None:
            last = context.events.select(pl.col("timestamp").max()).collect().item()
            until = (last or datetime(1970, 1, 1)) + timedelta(milliseconds=1)
        fit_learned([part], context, until=until, keep=True)
    return context.learned[key], context.learned_until
