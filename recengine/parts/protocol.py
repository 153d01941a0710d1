"""The part protocol: what a feature extractor or candidate source is, and what it may declare.

Required, as ever:
- an extractor has `columns` and `transform(requests, context)`: the batch path, point in time;
- a source has `name`, `k` and `generate(requests, context)`.

Optional members, read through the functions below (a part that declares nothing is treated as a
third-party part always was: it depends on user and item, and serves through the batch pipeline):
- `scope`: "item" (depends on the item alone), "user" (on the user alone) or "user_item" (default).
  Serving precomputes item- and user-scoped columns once per state through `transform`.
- `history_depth`: how many of the user's latest events `serve` reads from `snapshot.histories`.
- `encoders`: the `(encoder name, parameters)` pairs the part embeds text with; the model records them.
- `prepare(snapshot) -> tables` once per serving state, and `serve(tables, user, idx) -> {column: values}`
  per request: the part's own fast path, which `recengine.parts.contract.check_extractor` holds equal to
  `transform`. `idx` are item indices in `snapshot.item_ids` (-1: an item the state does not know).
- `serve_whole(tables, users) -> {user: {column: values over every item index, then the unknown item}}`:
  an optional batched form for users with rows for much of the catalogue (a batch job's users).
- `fit(events, items) -> {name: array}`: a learned part (a collaborative model, a tuned encoder) learns
  a state of plain arrays from a window of events. Training fits it on the events before a boundary
  and samples the ranker's requests after it; the state is saved with the model (npz, with its
  digest in the spec, never pickled). The part reads it with `learned_state(context, self)`, and
  answers null (proposes nothing) for a request before the window's end: never from later events.
"""

from __future__ import annotations

from typing import Any, Protocol

import polars as pl

SCOPES = ("item", "user", "user_item")


class FeatureExtractor(Protocol):
    columns: list[str]

    def transform(self, requests: pl.LazyFrame, context: Any) -> pl.LazyFrame:
        """`_row` plus `self.columns` for each request row, from events strictly before its timestamp."""


class CandidateSource(Protocol):
    name: str
    k: int

    def generate(self, requests: pl.LazyFrame, context: Any) -> pl.LazyFrame:
        """`(_request, item_id, score)`, at most `k` rows per request, higher score = better."""


def scope_of(part: Any) -> str:
    scope = getattr(part, "scope", "user_item")
    if scope not in SCOPES:
        raise ValueError(f"{type(part).__name__}.scope = {scope!r}; it must be one of {SCOPES}.")
    return scope


def history_depth(part: Any) -> int:
    return int(getattr(part, "history_depth", 0))


def encoders_of(part: Any) -> list[tuple[str, dict[str, Any]]]:
    return list(getattr(part, "encoders", []))


def serves(part: Any) -> bool:
    """Whether the part has its own per-request fast path."""
    return callable(getattr(part, "prepare", None)) and callable(getattr(part, "serve", None))


def learns(part: Any) -> bool:
    """Whether the part has a state fit on a window of events."""
    return callable(getattr(part, "fit", None))


def candidate_columns(source_name: str) -> list[str]:
    """The feature columns a candidate source adds: its score and its rank for each proposed item."""
    return [f"cand_{source_name}_score", f"cand_{source_name}_rank"]
