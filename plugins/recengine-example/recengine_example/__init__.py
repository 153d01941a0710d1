"""A template recengine plugin: one encoder and two feature extractors.

`TextLength` depends on the item alone and says so (`scope = "item"`): serving computes it once per
item. `TitleOverlap` depends on user and item; its `prepare`/`serve` pair is its fast path for
online requests, which `recengine.parts.contract.check_extractor` holds equal to its `transform`.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import polars as pl
import scipy.sparse as sp

import recengine
from recengine.core.pit import recent_history

_WORD = re.compile(r"\w+")


class HashingEncoder:
    """Bag of words hashed into `dim` buckets, L2-normalised: a text encoder with no model."""

    def __init__(self, dim: int = 256):
        self.dim = dim
        # The id keys the embedding cache: change it whenever the output would change.
        self.id = f"hashing-v1-dim{dim}"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                # crc32, not hash(): Python salts str hashes per process, and the cache outlives it.
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


class TextLength:
    """Number of words in an item field, as feature `text_length_<field>`."""

    scope = "item"  # serving precomputes it for every item through `transform`

    def __init__(self, field: str = "title"):
        self.field = field
        self.columns = [f"text_length_{field}"]

    def transform(self, requests: pl.LazyFrame, context) -> pl.LazyFrame:
        lengths = context.items.select(
            "item_id", pl.col(self.field).str.count_matches(r"\w+").alias(self.columns[0])
        )
        return requests.select("_row", "item_id").join(lengths, on="item_id", how="left").drop("item_id")


class TitleOverlap:
    """Words the item's title shares with the title of the user's latest item before t."""

    history_depth = 1  # serve reads the user's latest event from the snapshot

    def __init__(self, field: str = "title"):
        self.field = field
        self.columns = [f"{field}_overlap_latest"]

    def _words(self, items: pl.LazyFrame) -> pl.LazyFrame:
        return items.select("item_id", pl.col(self.field).str.to_lowercase().str.extract_all(r"\w+").list.unique().alias("_w"))

    def transform(self, requests: pl.LazyFrame, context) -> pl.LazyFrame:
        words = self._words(context.items)
        keys = requests.select("_row", "user_id", "item_id", "timestamp")
        latest = recent_history(keys.select("user_id", "timestamp").unique(), context.events, 1)
        latest = latest.join(words.rename({"item_id": "h_item", "_w": "_seen"}), on="h_item").select("user_id", "timestamp", "_seen")
        joined = keys.join(words, on="item_id", how="left").join(latest, on=["user_id", "timestamp"], how="left")
        shared = pl.col("_w").list.set_intersection(pl.col("_seen")).list.len().cast(pl.Float64)
        return joined.select("_row", pl.when(pl.col("_seen").is_not_null() & pl.col("_w").is_not_null()).then(shared)
                             .alias(self.columns[0]))

    def prepare(self, snapshot) -> dict:
        """Once per serving state: items x words (0/1, sparse) by item index, and which items have a
        title; the last row is for items the state does not know."""
        words = self._words(snapshot.context.items).collect()
        has = np.zeros(snapshot.size + 1, dtype=bool)
        has[snapshot.index(words.drop_nulls("_w")["item_id"])] = True
        pairs = words.explode("_w").drop_nulls("_w")
        vocabulary = pairs["_w"].unique().sort()
        rows = snapshot.index(pairs["item_id"])
        cols = pairs["_w"].replace_strict(vocabulary, np.arange(len(vocabulary)), return_dtype=pl.Int64).to_numpy()
        matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(snapshot.size + 1, len(vocabulary)))
        return {"words": matrix, "has": has, "histories": snapshot.histories}

    def serve(self, tables, user, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Per request: the same value as `transform` at the state's time, for item indices `idx`."""
        history = tables["histories"].get(user)
        out = np.full(len(idx), np.nan)
        if history is not None and tables["has"][history["item"][0]]:
            shared = tables["words"][idx] @ tables["words"][history["item"][0]].T  # words in both titles
            out = np.where(tables["has"][idx], shared.toarray().ravel(), np.nan)
        return {self.columns[0]: out}


@recengine.hookimpl
def register_encoders(register):
    register("hashing", HashingEncoder, description="Hashed bag of words; no model needed.")


@recengine.hookimpl
def register_feature_extractors(register):
    register("text_length", TextLength, description="Words in an item text field.")
    register("title_overlap", TitleOverlap, description="Title words shared with the user's latest item.")
