"""A template recengine plugin: one encoder and one feature extractor."""

from __future__ import annotations

import re
import zlib

import numpy as np
import polars as pl

import recengine

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

    def __init__(self, field: str = "title"):
        self.field = field
        self.columns = [f"text_length_{field}"]

    def fit(self, context) -> "TextLength":
        return self

    def transform(self, requests: pl.LazyFrame, context) -> pl.LazyFrame:
        lengths = context.items.select(
            "item_id", pl.col(self.field).str.count_matches(r"\w+").alias(self.columns[0])
        )
        return requests.select("_row", "item_id").join(lengths, on="item_id", how="left").drop("item_id")


@recengine.hookimpl
def register_encoders(register):
    register("hashing", HashingEncoder, description="Hashed bag of words; no model needed.")


@recengine.hookimpl
def register_feature_extractors(register):
    register("text_length", TextLength, description="Words in an item text field.")
