"""Interest: a user's history and an item's text (or image, or any field an encoder embeds), compared
through an encoder's embeddings; the interest features and the embedding candidate source.

For a request by user u at time t, the history is u's last `history` events strictly before t:
- `interest_<field>_mean`: cosine between the item and the (optionally recency- and value-weighted)
  mean of the history's embeddings;
- `interest_<field>_max`: the highest cosine between the item and any of u's last `recent` items.
A user with no history, or an item with no text, gets null (LightGBM treats it as missing); so does an
item whose value the encoder gave no embedding (an unreadable image with `bad_images = "null"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp

from recengine.core.data import TIMESTAMP
from recengine.core.grid import on_grid
from recengine.core.pit import DAY, recent_history
from recengine.core.topk import top_k_dense
from recengine.errors import BadValue, ConfigError, DataError
from recengine.parts.encoders import create_encoder, embed
from recengine.parts.hookspecs import hookimpl
from recengine.parts.plugins import check_number


@dataclass
class ItemEmbeddings:
    """Row i of `matrix` embeds item `item_ids[i]` (on the grid); items without text (or without an
    embedding: a NaN row from the encoder) are left out."""

    item_ids: pl.Series
    matrix: np.ndarray
    encoder_id: str

    def index(self) -> pl.DataFrame:
        return pl.DataFrame({"item_id": self.item_ids, "_idx": np.arange(len(self.item_ids), dtype=np.int64)})


def item_embeddings(items: pl.LazyFrame, field: str, encoder: Any, cache=None, progress: bool = False) -> ItemEmbeddings:
    """Embed the items' `field` (null or empty: no embedding) through the cache. A value the encoder
    rejects (`BadValue`, e.g. an image path that is not an image) stops it with an error naming the
    items that hold it; a value it gives a NaN row leaves its item out."""
    schema = items.collect_schema()
    if field not in schema:
        raise ConfigError(f"interest scores: the items have no field '{field}'; they have {schema.names()}.")
    texts = (
        items.select("item_id", pl.col(field).cast(pl.String).str.strip_chars().alias("_text"))
        .filter(pl.col("_text").is_not_null() & (pl.col("_text") != ""))
        .collect()
    )
    try:
        matrix, _ = embed(texts["_text"].to_list(), encoder, cache, progress=progress)
    except BadValue as exc:
        raise _bad_items(texts, field, exc) from exc
    embedded = np.isfinite(matrix).all(axis=1)  # a NaN row: the encoder gave that value no embedding
    return ItemEmbeddings(texts["item_id"].filter(pl.Series(embedded)), on_grid(matrix[embedded]), encoder.id)


def _bad_items(texts: pl.DataFrame, field: str, exc: BadValue) -> DataError:
    """The encoder's complaint about a value, with the items whose `field` holds it (the encoder sees only values)."""
    ids = texts.filter(pl.col("_text") == exc.value)["item_id"]
    named = ", ".join(map(repr, ids.head(5).to_list())) + (f" and {ids.len() - 5} more" if ids.len() > 5 else "")
    return DataError(f"item_id {named or '(none)'}, field '{field}' = {exc.value!r}: {exc}")


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
        self.history_depth = recent
        self.encoders = [(encoder, self.encoder_params)]

    def embeddings(self, context, field: str) -> ItemEmbeddings:
        key = ("embeddings", self.encoder_name, repr(sorted(self.encoder_params.items())), field)

        def build() -> ItemEmbeddings:
            items = context.item_field(field, "interest scores and embedding candidates")
            return item_embeddings(items, field, self.encoder(context), context.cache, context.progress)

        return context.memo(key, build)

    def encoder(self, context):
        """The part's encoder, built once per context (an adapter file is read once)."""
        name, params = self.encoders[0]  # (encoder_name may be a subclass's key of its own space)
        return context.memo(("encoder", name, repr(sorted(params.items()))), lambda: create_encoder(name, params))

    def until(self, context):
        """The end of the encoder's tuning window when it is an adapted (tuned) encoder, else None: it
        has seen events up to then, so requests before it get nothing from it (as from a learned part)."""
        return getattr(self.encoder(context), "until", None)

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
        until = self.until(context)
        if until is not None:  # point in time: nothing from an encoder tuned on events after the request
            out = out.with_columns(pl.when(keys["timestamp"] >= until).then(pl.col(c)).alias(c) for c in self.columns)
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

    # -- serving: the same cosines, per request, from tables built once per state -------------------

    def prepare(self, snapshot) -> dict:
        """Per field: item embeddings in the state's item order (zero rows where an item has no text,
        and one more for unknown items, so index -1 reads "no text"), which items have one, and every
        known user's profile as of the state's time, by `profiles` itself."""
        until = self.until(snapshot.context)
        tables: dict = {"snapshot": snapshot, "early": until is not None and snapshot.at < until}
        for field in self.fields:
            emb = self.embeddings(snapshot.context, field)
            key = ("embeddings", self.encoder_name, repr(sorted(self.encoder_params.items())), field)
            matrix, has = snapshot.memo(key, lambda: _aligned(emb, snapshot))
            users = snapshot.users
            at = pl.DataFrame({"user_id": users, "timestamp": pl.Series([snapshot.at] * len(users), dtype=TIMESTAMP)})
            history = recent_history(at.lazy(), snapshot.context.events, self.history).collect()
            profile, _ = self.profiles(history, len(users), emb)
            found = np.isfinite(profile).all(axis=1)
            tables[field] = (matrix, has, dict(zip(users.filter(pl.Series(found)).to_list(), profile[found])))
        return tables

    def serve(self, tables, user, idx: np.ndarray, sims: dict | None = None) -> dict[str, np.ndarray]:
        """Cosine to the user's profile and the best cosine to a recent item. `sims`, when given, holds
        each field's similarities of `idx` to the user's targets and whether the first is the profile
        (`serve_whole` computes them for many users in one product)."""
        if tables.get("early"):  # the state's time is before the encoder's tuning window's end
            return {c: np.full(len(idx), np.nan) for c in self.columns}
        out = {}
        for field in self.fields:
            matrix, has, _ = tables[field]
            known = has[idx]
            if sims is not None:
                found, with_profile = sims[field]
            else:
                targets, with_profile = self._targets(tables, field, user)
                # One product against the profile and the recent items together: the gathered
                # candidate vectors are the costly part, so they are read once.
                found = matrix[idx] @ targets.T
            mean = np.where(known, found[:, 0], np.nan) if with_profile else np.full(len(idx), np.nan)
            tail = found[:, int(with_profile):]
            best = np.where(known, tail.max(axis=1), np.nan) if tail.shape[1] else np.full(len(idx), np.nan)
            out[f"interest_{field}_mean"], out[f"interest_{field}_max"] = mean, best
        return out

    def serve_whole(self, tables, users: list) -> dict:
        """`serve` over every item index (then the unknown item) for many users: one matrix product per
        field for all of them, 4x faster than a product per user."""
        sims: dict = {u: {} for u in users}
        for field in self.fields:
            matrix = tables[field][0]
            targets = [self._targets(tables, field, u) for u in users]
            sizes = np.array([len(t) for t, _ in targets])
            product = np.vstack([t for t, _ in targets]) @ matrix.T
            for u, hi, size, (_, with_profile) in zip(users, np.cumsum(sizes), sizes, targets):
                sims[u][field] = (product[hi - size:hi].T, with_profile)
        every = np.append(np.arange(len(tables["snapshot"].item_ids)), -1)
        return {u: self.serve(tables, u, every, sims[u]) for u in users}

    def _targets(self, tables, field: str, user) -> tuple[np.ndarray, bool]:
        """The vectors a candidate is compared with: the user's profile (if any), then recent items."""
        matrix, has, profiles = tables[field]
        history = tables["snapshot"].histories.get(user)
        recent = history["item"][: self.recent] if history is not None else np.empty(0, dtype=np.int64)
        recent = recent[has[recent]]
        profile = profiles.get(user)
        return (matrix[recent] if profile is None else np.vstack([profile, matrix[recent]])), profile is not None

    def _weights(self, seen: pl.DataFrame) -> np.ndarray:
        weight = pl.lit(1.0)
        if self.half_life_days:
            tau = self.half_life_days / math.log(2)
            age = (pl.col("timestamp") - pl.col("h_time")).dt.total_milliseconds() / (DAY.total_seconds() * 1000)
            weight = weight * (-age / tau).exp()
        if self.weight_by_value:
            weight = weight * pl.col("h_value").fill_null(1.0)
        return seen.with_columns(weight.cast(pl.Float64).alias("_w"))["_w"].to_numpy()





def _aligned(emb: ItemEmbeddings, snapshot) -> tuple[np.ndarray, np.ndarray]:
    rows = snapshot.index(emb.item_ids)
    matrix = np.zeros((snapshot.size + 1, emb.matrix.shape[1]), dtype=emb.matrix.dtype)
    matrix[rows] = emb.matrix
    has = np.zeros(snapshot.size + 1, dtype=bool)
    has[rows] = True
    return matrix, has


# Requests scored against every item at once: the dense block and its top-k copies take about 20
# bytes a request and item (1.8 GB for 1,024 requests x 89k items; 256 keep it under half a GB).
SCORE_ROWS = 256


class EmbeddingSource:
    """Nearest items to the user's history profile in an encoder's space; reaches never-seen items.
    With `new_items = true`, only items nobody had taken before the request: the new releases whose
    text fits the user, which no behaviour-based source can propose."""

    def __init__(self, k: int = 100, encoder: str = "transformers", encoder_params: dict | None = None,
                 field: str = "title", history: int = 50, half_life_days: float | None = None, new_items: bool = False):
        check_number("embedding source", "k", k, integer=True, minimum=1)
        self.name, self.k, self.field, self.new_items = "embedding", k, field, new_items
        self.scorer = InterestScores(encoder, encoder_params, [field], recent=1, history=history, half_life_days=half_life_days)
        self.encoders = self.scorer.encoders

    def generate(self, requests, context):
        until = self.scorer.until(context)
        if until is not None:  # no candidates from an encoder tuned on events after the request
            requests = requests.filter(pl.col("timestamp") >= until)
        keyed = requests.collect()
        history = recent_history(keyed.lazy().select("user_id", "timestamp"), context.events, self.scorer.history).collect()
        emb = self.scorer.embeddings(context, self.field)
        profile, _ = self.scorer.profiles(history, keyed.height, emb)
        known = ~np.isnan(profile).any(axis=1)
        item_rank = emb.item_ids.rank("ordinal").to_numpy()
        first = self._first_events(context, emb) if self.new_items else None
        at_ms = keyed["timestamp"].dt.epoch("ms").to_numpy()
        rows, items, scores = [], [], []
        for start in range(0, keyed.height, SCORE_ROWS):
            block = np.flatnonzero(known[start : start + SCORE_ROWS]) + start
            if not len(block):
                continue
            sims = profile[block] @ emb.matrix.T  # exact (embeddings on the grid): no BLAS noise to tie-break
            if first is not None:  # items someone took before the request are not new
                sims[first[None, :] < at_ms[block, None]] = -np.inf
            at, top = top_k_dense(sims, self.k, item_rank)
            keep = np.isfinite(sims[at, top])
            rows.append(block[at][keep])
            items.append(top[keep])
            scores.append(sims[at, top][keep])
        if not rows:
            return pl.LazyFrame(schema={"_request": pl.UInt32, "item_id": emb.item_ids.dtype, "score": pl.Float64})
        found = pl.DataFrame({"_p": np.concatenate(rows), "item_id": emb.item_ids.gather(np.concatenate(items)), "score": np.concatenate(scores)})
        return found.join(keyed.with_row_index("_p").select(pl.col("_p").cast(pl.Int64), "_request"), on="_p").drop("_p").lazy()

    @staticmethod
    def _first_events(context, emb: ItemEmbeddings) -> np.ndarray:
        """Each embedded item's first event time (epoch ms; the largest int64 for items nobody took)."""
        first = context.memo("item_first_event", lambda: context.events.group_by("item_id").agg(
            pl.col("timestamp").min().dt.epoch("ms").alias("_first")).collect())
        aligned = emb.index().join(first, on="item_id", how="left").sort("_idx")["_first"]
        return aligned.fill_null(np.iinfo(np.int64).max).to_numpy()


@hookimpl
def register_feature_extractors(register):
    register("interest", InterestScores, "Cosine of the item's text embedding to the user's history (mean profile, max over recent).")


@hookimpl
def register_candidate_sources(register):
    register("embedding", EmbeddingSource, "Nearest items to the user's text-embedding profile.")
