"""Interest scores: a user's history and an item's text, compared through an encoder's embeddings.

For a request by user u at time t, the history is u's last `history` events strictly before t:
- `interest_<field>_mean`: cosine between the item and the (optionally recency- and value-weighted)
  mean of the history's embeddings;
- `interest_<field>_max`: the highest cosine between the item and any of u's last `recent` items.
A user with no history, or an item with no text, gets null (LightGBM treats it as missing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

import recengine
from recengine.encoders import create_encoder, embed
from recengine.errors import ConfigError
from recengine.plugins import check_number
from recengine.pit import DAY, recent_history


# Embeddings and profiles sit on a grid of 2^-16 (far finer than any ranking needs) and are held in
# float64. A product of two grid values is a multiple of 2^-32, and float64 holds any sum of up to 2^21
# such products exactly. So every cosine is exact: the same bits whatever BLAS kernel, block size or row
# placement computes it, and batch, serving and two processes agree to the last bit.
GRID = 2.0**16


def on_grid(matrix: np.ndarray) -> np.ndarray:
    """`matrix` (rows of norm <= 1) rounded to the grid, as float64: what every cosine multiplies."""
    return np.round(np.asarray(matrix, dtype=np.float64) * GRID) / GRID


@dataclass
class ItemEmbeddings:
    """Row i of `matrix` embeds item `item_ids[i]` (on the grid); items without text are left out."""

    item_ids: pl.Series
    matrix: np.ndarray
    encoder_id: str

    def index(self) -> pl.DataFrame:
        return pl.DataFrame({"item_id": self.item_ids, "_idx": np.arange(len(self.item_ids), dtype=np.int64)})


def item_embeddings(items: pl.LazyFrame, field: str, encoder: Any, cache=None, progress: bool = False) -> ItemEmbeddings:
    """Embed the items' `field` (null or empty text: no embedding) through the cache."""
    schema = items.collect_schema()
    if field not in schema:
        raise ConfigError(f"interest scores: the items have no text field '{field}'; they have {schema.names()}.")
    texts = (
        items.select("item_id", pl.col(field).cast(pl.String).str.strip_chars().alias("_text"))
        .filter(pl.col("_text").is_not_null() & (pl.col("_text") != ""))
        .collect()
    )
    matrix, _ = embed(texts["_text"].to_list(), encoder, cache, progress=progress)
    return ItemEmbeddings(texts["item_id"], on_grid(matrix), encoder.id)


class InterestScores:
    def __init__(
        self,
        encoder: str = "transformers",
        encoder_params: dict[str, Any] | None = None,
        fields: Sequence[str] = ("title",),
        recent: int = 10,
        history: int = 200,
        half_life_days: float | None = None,
        weight_by_value: bool = False,
    ):
        if not fields:
            raise ConfigError("interest: fields = []; name at least one text field of the items, e.g. [\"title\"].")
        check_number("interest", "recent", recent, integer=True, minimum=1)
        check_number("interest", "history", history, integer=True, minimum=1)
        if half_life_days is not None:
            check_number("interest", "half_life_days", half_life_days, above=0)
        self.encoder_name, self.encoder_params = encoder, dict(encoder_params or {})
        self.fields = list(fields)
        self.recent, self.history = recent, max(history, recent)
        self.half_life_days, self.weight_by_value = half_life_days, weight_by_value
        self.columns = [f"interest_{f}_{kind}" for f in self.fields for kind in ("mean", "max")]

    def embeddings(self, context, field: str) -> ItemEmbeddings:
        key = ("embeddings", self.encoder_name, repr(sorted(self.encoder_params.items())), field)

        def build() -> ItemEmbeddings:
            encoder = context.memo(("encoder", key[1], key[2]), lambda: create_encoder(self.encoder_name, self.encoder_params))
            items = context.item_field(field, "interest scores and embedding candidates")
            return item_embeddings(items, field, encoder, context.cache, context.progress)

        return context.memo(key, build)

    def transform(self, requests: pl.LazyFrame, context) -> pl.LazyFrame:
        keys = requests.select("_row", "user_id", "item_id", "timestamp").collect()
        profiles = keys.select("user_id", "timestamp").unique(maintain_order=True)
        history = recent_history(profiles.lazy(), context.events, self.history).collect()
        keys = keys.join(profiles.with_row_index("_profile"), on=["user_id", "timestamp"], maintain_order="left")
        out = keys.select("_row")
        for field in self.fields:
            scores = self._scores(keys, history, profiles.height, self.embeddings(context, field))
            out = out.with_columns(
                pl.Series(f"interest_{field}_{kind}", values, dtype=pl.Float64, nan_to_null=True)
                for kind, values in scores.items()
            )
        return out.lazy()

    def profiles(self, history: pl.DataFrame, n_profiles: int, emb: ItemEmbeddings) -> tuple[np.ndarray, pl.DataFrame]:
        """Unit-norm weighted mean of each profile's history embeddings, on the grid (NaN rows: no
        history), and the history rows that have an embedding (with `_idx`)."""
        # Sorted, so each profile's weighted sum adds its items in one order, however the join came out.
        seen = history.join(emb.index(), left_on="h_item", right_on="item_id", how="inner").sort("_profile", "h_back")
        shape = (n_profiles, len(emb.item_ids))
        weights = sp.csr_matrix((self._weights(seen), (seen["_profile"].to_numpy(), seen["_idx"].to_numpy())), shape=shape)
        profile = weights @ emb.matrix
        with np.errstate(invalid="ignore", divide="ignore"):
            return on_grid(profile / np.linalg.norm(profile, axis=1, keepdims=True)), seen

    def _scores(self, keys: pl.DataFrame, history: pl.DataFrame, n_profiles: int, emb: ItemEmbeddings) -> dict[str, np.ndarray]:
        matrix = emb.matrix
        profile, seen = self.profiles(history, n_profiles, emb)
        recent = np.full((n_profiles, self.recent), -1, dtype=np.int64)
        latest = seen.filter(pl.col("h_back") < self.recent)
        recent[latest["_profile"].to_numpy(), latest["h_back"].to_numpy()] = latest["_idx"].to_numpy()

        items = keys.join(emb.index(), on="item_id", how="left", maintain_order="left")["_idx"].fill_null(-1).to_numpy()
        owners = keys["_profile"].to_numpy()
        mean_cos = np.full(len(keys), np.nan)
        max_cos = np.full(len(keys), np.nan)
        # One small matrix product per profile (a request time), over its candidates: gathering
        # per-row copies of the neighbours' vectors would move far more memory.
        order = np.argsort(owners, kind="stable")
        bounds = np.searchsorted(owners[order], np.arange(n_profiles + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[p] : bounds[p + 1]]
            rows = rows[items[rows] >= 0]
            if not len(rows):
                continue
            vectors = matrix[items[rows]]
            if np.isfinite(profile[p]).all():
                mean_cos[rows] = vectors @ profile[p]
            neighbours = recent[p][recent[p] >= 0]
            if len(neighbours):
                max_cos[rows] = (vectors @ matrix[neighbours].T).max(axis=1)
        return {"mean": mean_cos, "max": max_cos}

    def _weights(self, seen: pl.DataFrame) -> np.ndarray:
        weight = pl.lit(1.0)
        if self.half_life_days:
            tau = self.half_life_days / math.log(2)
            age = (pl.col("timestamp") - pl.col("h_time")).dt.total_milliseconds() / (DAY.total_seconds() * 1000)
            weight = weight * (-age / tau).exp()
        if self.weight_by_value:
            weight = weight * pl.col("h_value").fill_null(1.0)
        return seen.with_columns(weight.cast(pl.Float64).alias("_w"))["_w"].to_numpy()


@recengine.hookimpl
def register_feature_extractors(register):
    register("interest", InterestScores, "Cosine of the item's text embedding to the user's history (mean profile, max over recent).")
