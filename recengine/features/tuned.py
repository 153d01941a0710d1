"""Interest in a space tuned on behaviour (issue #15), as a learned part: `tuned_interest`.

`fit` embeds the catalogue's text with the frozen encoder, builds next-item pairs from the window's
events (`recengine.learning.tuning.next_item_pairs`: the user's events strictly before each event, and the
item taken), and tunes a linear head on them (`recengine.learning.tuning.tune_head`, mode `head`). The state
is the head, a d x d map in fixed point (whole multiples of 2^-16, as int32), and the tuning's
held-out recall@K and loss per epoch.

The features are the `interest` features read in the tuned space, computed by `InterestScores`
itself: `tuned_<field>_mean`, the cosine between the item's tuned embedding and the user's tuned
profile, and `tuned_<field>_max`, the highest cosine to one of the user's `recent` items. A user is
embedded one way, in tuning and in the features: the interest profile (the mean, optionally recency-
and value-weighted, of the history's frozen embeddings, `InterestScores.profiles`), then projected.
Item vectors and profiles sit on the 2^-16 grid and so does the head, so every product is exact:
batch and serving agree to the bit. Null for requests before the window's end.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from recengine.core.grid import on_grid
from recengine.errors import ConfigError, DataError
from recengine.features.interest import EmbeddingSource, InterestScores, ItemEmbeddings, item_embeddings
from recengine.learning.tuning import adalora_ranks, next_item_pairs, tune_head, tune_lora, tune_offsets
from recengine.parts.adapters import AdaloraSchedule, Adapter, naive_utc, tensors_digest
from recengine.parts.adapters import AdaptedEncoder as _AdaptedEncoder
from recengine.parts.context import learned_state
from recengine.parts.encoders import EmbeddingCache, create_encoder
from recengine.parts.hookspecs import hookimpl
from recengine.parts.plugins import check_number

SCALE = 2.0**16  # the head's fixed point: the embeddings' grid, so products with them are exact
MODES = ("head", "lora", "adalora", "full", "offset")
PREFIX = {"lora": "lora:", "adalora": "adalora:", "full": "weights:"}  # the state's names of the encoder's tuned weights
# The largest LoRA / AdaLoRA rank: beyond it an adapter is no longer low-rank, and memory and time grow
# with the rank (two d x rank matrices per adapted module, d x rank gradients and optimiser state).
MAX_RANK = 256


def project(vectors: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Rows of `vectors` mapped by the head, L2-normalised, on the grid (a NaN row stays NaN)."""
    mapped = vectors @ projection
    with np.errstate(invalid="ignore", divide="ignore"):
        return on_grid(mapped / np.linalg.norm(mapped, axis=1, keepdims=True))


@dataclass
class TunedEmbeddings(ItemEmbeddings):
    """Tuned item vectors (rows as `base`'s) with the frozen ones and the head that maps them."""

    base: ItemEmbeddings | None = None
    projection: np.ndarray | None = None


class _TunedSpace(InterestScores):
    """`InterestScores` whose item vectors and profiles are the tuned ones: its transform, prepare,
    serve and serve_whole then compute the tuned features, exactly as they do the frozen ones."""

    def __init__(self, owner: "TunedInterest", **kwargs: Any):
        super().__init__(**kwargs)
        self.owner = owner
        # InterestScores keys a serving state's tables by encoder name: the tuned space has its own.
        self.encoder_name = f"tuned:{owner.fit_key!r}"

    def embeddings(self, context, field: str) -> TunedEmbeddings:
        state, until = learned_state(context, self.owner)

        def build() -> TunedEmbeddings:
            if self.owner.mode in PREFIX:
                encoder = self.owner.adapted(state)
                items = context.item_field(field, "tuned interest")
                tuned = item_embeddings(items, field, encoder, context.cache, context.progress)
                return TunedEmbeddings(tuned.item_ids, tuned.matrix, tuned.encoder_id)
            base = self.owner.frozen.embeddings(context, field)
            if self.owner.mode == "offset":  # pooled as interest pools, like lora's tuned items
                return TunedEmbeddings(base.item_ids, offset_items(base, state), f"{base.encoder_id}+offset", base=base)
            projection = state["projection"].astype(np.float64) / SCALE
            return TunedEmbeddings(base.item_ids, project(base.matrix, projection), f"{base.encoder_id}+tuned",
                                   base=base, projection=projection)

        return context.memo(("tuned_embeddings", self.owner.fit_key, field, until), build)

    def profiles(self, history: pl.DataFrame, n_profiles: int, emb: TunedEmbeddings) -> tuple[np.ndarray, pl.DataFrame]:
        if emb.projection is None:  # lora, full: the tuned items themselves, pooled as interest pools
            return InterestScores.profiles(self, history, n_profiles, emb)
        profile, seen = InterestScores.profiles(self, history, n_profiles, emb.base)
        return project(profile, emb.projection), seen


def offset_items(base: ItemEmbeddings, state: dict[str, np.ndarray]) -> np.ndarray:
    """The frozen vectors with the state's offsets added to the items it moved, those rows normalised;
    every other item (one no training pair held: a new release) keeps its frozen vector to the bit."""
    ids = pl.Series("item_id", state["offset_ids"]).cast(base.item_ids.dtype, strict=False)
    rows = ids.replace_strict(base.item_ids, np.arange(len(base.item_ids)), default=-1, return_dtype=pl.Int64).to_numpy()
    known = rows >= 0  # an item gone from the catalogue since the tuning has no row
    matrix = base.matrix.copy()
    moved = matrix[rows[known]] + state["offsets"][known].astype(np.float64) / SCALE
    matrix[rows[known]] = on_grid(moved / np.linalg.norm(moved, axis=1, keepdims=True))
    return matrix


class _ReadOnlyCache:
    """The default embedding cache, read but never written: `fit` is given no context, hence no cache
    of the run's own; reading the default one spares re-encoding a catalogue already embedded."""

    def __init__(self):
        self.cache = EmbeddingCache()

    def lookup(self, encoder_id: str, keys: np.ndarray):
        return self.cache.lookup(encoder_id, keys)

    def store(self, encoder_id: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        pass


class TunedInterest:
    """`tuned_<field>_mean` and `tuned_<field>_max`: interest in a text space tuned on what users took next."""

    part = "tuned interest"

    def __init__(self, encoder: str = "transformers", encoder_params: dict[str, Any] | None = None, field: str = "title",
                 recent: int = 10, history: int = 50, half_life_days: float | None = None, weight_by_value: bool = False,
                 mode: str = "head", temperature: float = 0.05, epochs: int = 10, batch_size: int = 256,
                 lr: float = 1e-3, patience: int = 2, recall_k: int = 10, max_pairs: int = 100_000, holdout: float = 0.1,
                 seed: int = 0, lora_rank: int = 8, lora_alpha: int = 16, hard_negatives: int = 0,
                 adalora_init_rank: int = 12, adalora_warmup: float = 0.1, adalora_final: float = 0.2,
                 adalora_interval: int = 1, adalora_orth_weight: float = 0.5, max_offset: float = 0.5):
        if mode not in MODES:
            raise ConfigError(f"tuned interest: mode = {mode!r}; give one of {', '.join(MODES)} (head: a linear map "
                              "on the frozen, cached embeddings; lora: adapters in the encoder's attention; adalora: "
                              "adapters whose ranks are allocated where tuning needs them; full: every weight of the encoder; offset: a "
                              "bounded offset per warm item on the frozen embeddings, new items left where the text puts them).")
        if "adapter" in (encoder_params or {}):
            raise ConfigError("tuned interest: encoder_params has an adapter; tuning starts from a base encoder, so "
                              "leave the adapter out (tune the base model again on the events it should learn from).")
        check_number(self.part, "lora_rank", lora_rank, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(self.part, "lora_alpha", lora_alpha, integer=True, minimum=1)
        self.mode, self.lora = mode, {"rank": lora_rank, "alpha": lora_alpha}
        self.adalora = None
        if mode == "adalora":
            check_number(self.part, "adalora_init_rank", adalora_init_rank, integer=True, minimum=lora_rank, maximum=MAX_RANK)
            check_number(self.part, "adalora_interval", adalora_interval, integer=True, minimum=1)
            check_number(self.part, "adalora_warmup", adalora_warmup, minimum=0, below=1)
            check_number(self.part, "adalora_final", adalora_final, minimum=0, below=1)
            check_number(self.part, "adalora_orth_weight", adalora_orth_weight, minimum=0)
            if adalora_warmup + adalora_final >= 1:
                raise ConfigError(f"tuned interest: adalora_warmup + adalora_final = {adalora_warmup + adalora_final:g} "
                                  "leaves no steps in which AdaLoRA allocates the ranks; keep their sum below 1 "
                                  "(defaults 0.1 and 0.2).")
            self.adalora = AdaloraSchedule(adalora_init_rank, adalora_warmup, adalora_final, adalora_interval,
                                           adalora_orth_weight)
        check_number(self.part, "temperature", temperature, above=0)
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience), ("recall_k", recall_k),
                            ("max_pairs", max_pairs), ("seed", seed), ("hard_negatives", hard_negatives)):
            check_number(self.part, name, value, integer=True, minimum=2 if name == "batch_size" else (0 if name in ("seed", "hard_negatives") else 1))
        check_number(self.part, "lr", lr, above=0)
        check_number(self.part, "max_offset", max_offset, above=0)
        self.max_offset = max_offset
        check_number(self.part, "holdout", holdout, above=0, below=1)
        self.encoder_name, self.encoder_params, self.field = encoder, dict(encoder_params or {}), field
        self.tuning = {"temperature": temperature, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                       "patience": patience, "k": recall_k, "seed": seed, "hard": hard_negatives}  # k: the held-out recall@K that stops early
        self.max_pairs, self.holdout = max_pairs, holdout
        self.columns = [f"tuned_{field}_mean", f"tuned_{field}_max"]
        self.history_depth = recent
        self.encoders = [(encoder, self.encoder_params)]
        self.fit_key = ("tuned_interest", encoder, repr(sorted(self.encoder_params.items())), field, recent, history,
                        half_life_days, weight_by_value, mode, repr(sorted(self.tuning.items())), max_pairs, holdout,
                        repr(sorted(self.lora.items())) if mode in PREFIX else None, self.adalora,
                        max_offset if mode == "offset" else None)
        interest = {"encoder": encoder, "encoder_params": self.encoder_params, "fields": [field], "recent": recent,
                    "history": history, "half_life_days": half_life_days, "weight_by_value": weight_by_value}
        self.frozen = InterestScores(**interest)  # the frozen embeddings, shared with `interest` in a context
        self.space = _TunedSpace(self, **interest)
        self._encoder, self._adapted = None, {}

    # -- learning ------------------------------------------------------------------------------------

    def fit(self, events: pl.DataFrame, items: pl.DataFrame | None) -> dict[str, np.ndarray]:
        if items is None or self.field not in items.columns:
            raise ConfigError(f"tuned interest tunes on the items' text field '{self.field}', but "
                              f"{'no items table was given' if items is None else 'the items have no such field'}; "
                              "pass --items with that field or drop tuned_interest from the feature set.")
        base = item_embeddings(items.lazy(), self.field, self.encoder(), _ReadOnlyCache())
        if self.mode in PREFIX:
            return self._fit_encoder(events, items, base)
        if self.mode == "offset":
            return self._fit_offsets(events, items, base)
        contexts, targets, held_out = self.training_pairs(events, base)
        self._check_pairs(len(targets), events)
        result = tune_head(base.matrix, contexts, targets, held_out, **self.tuning)
        self.last_tuning = (result, len(targets))  # the run's seconds, pairs/s and pairs, for `recengine tune`
        return {"projection": np.round(result.projection.astype(np.float64) * SCALE).astype(np.int32),
                "recall": np.asarray(result.recalls, dtype=np.float64), "loss": np.asarray(result.losses, dtype=np.float64)}

    def _check_pairs(self, pairs: int, events: pl.DataFrame) -> None:
        """Fewer than two pairs teach nothing (no negative in a batch): refuse, in `recengine tune` and in a
        training alike, rather than hand the ranker an untuned space under a tuned name."""
        if pairs >= 2:
            return
        last = events["timestamp"].max() if events.height else None
        raise DataError(
            f"tuned interest ({self.mode}, field '{self.field}'): only {pairs} next-item pair(s) in the {events.height:,} "
            f"events it may learn from (up to {last}; a pair is a user's event after an earlier one of theirs, on an "
            f"item with a '{self.field}' text); tuning learns from many thousands. Give more events (in a training: "
            "a later [labels] learned_fraction, so more events come before the boundary), or drop the tuned parts.")

    def training_pairs(self, events: pl.DataFrame, base: ItemEmbeddings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pooled contexts (the interest profile before each event), target rows in `base`, and which
        pairs are held out: the latest `holdout` share, so early stopping reads the window's future."""
        pairs, history = next_item_pairs(events, context=self.space.history, max_pairs=self.max_pairs, seed=self.tuning["seed"])
        profile, _ = InterestScores.profiles(self.space, history, pairs.height, base)
        targets = pairs.join(base.index(), on="item_id", how="left", maintain_order="left")["_idx"]
        usable = np.isfinite(profile).all(axis=1) & targets.is_not_null().to_numpy()
        kept = int(usable.sum())
        held_out = np.arange(kept) >= kept - int(round(kept * self.holdout))
        return profile[usable], targets.to_numpy()[usable].astype(np.int64), held_out

    def encoder(self):
        if self._encoder is None:
            self._encoder = create_encoder(self.encoder_name, self.encoder_params)
        return self._encoder

    def _fit_encoder(self, events: pl.DataFrame, items: pl.DataFrame, base: ItemEmbeddings) -> dict[str, np.ndarray]:
        """Adapters (or, full, every weight) tuned on pairs whose users are the profile weights of their items (interest's)."""
        texts, weights, targets, held_out = self.encoder_pairs(events, items, base)
        self._check_pairs(len(targets), events)
        adapters, result = tune_lora(self.encoder(), texts, weights, targets, held_out, rank=self.lora["rank"],
                                     alpha=self.lora["alpha"], full=self.mode == "full", adalora=self.adalora, **self.tuning)
        self.last_tuning = (result, len(targets))
        state = {**{PREFIX[self.mode] + name: value for name, value in adapters.items()},
                 "recall": np.asarray(result.recalls, dtype=np.float64), "loss": np.asarray(result.losses, dtype=np.float64)}
        if result.ranks:  # adalora: each module's rank (columns in the modules' name order) at each held-out reading
            state["ranks"] = np.array([[ranks[m] for m in sorted(ranks)] for ranks in result.ranks], dtype=np.int64)
        return state

    def _fit_offsets(self, events: pl.DataFrame, items: pl.DataFrame, base: ItemEmbeddings) -> dict[str, np.ndarray]:
        """Offsets of the items the pairs hold, in fixed point, with their ids; the others stay frozen."""
        _, weights, targets, held_out = self.encoder_pairs(events, items, base)
        self._check_pairs(len(targets), events)
        offsets, result = tune_offsets(base.matrix, weights, targets, held_out, max_norm=self.max_offset, **self.tuning)
        self.last_tuning = (result, len(targets))
        moved = np.flatnonzero(np.abs(offsets).sum(axis=1) > 0)
        ids = base.item_ids.gather(moved)
        return {"offset_ids": np.asarray(ids.to_list(), dtype=str if ids.dtype == pl.String else np.int64),
                "offsets": np.round(offsets[moved].astype(np.float64) * SCALE).astype(np.int32),
                "recall": np.asarray(result.recalls, dtype=np.float64), "loss": np.asarray(result.losses, dtype=np.float64)}

    def encoder_pairs(self, events: pl.DataFrame, items: pl.DataFrame, base: ItemEmbeddings):
        """The catalogue's texts (rows as `base`'s), each pair's profile weights over them (sparse),
        target rows and the held-out latest pairs: what `tune_lora` reads."""
        pairs, history = next_item_pairs(events, context=self.space.history, max_pairs=self.max_pairs, seed=self.tuning["seed"])
        seen = history.join(base.index(), left_on="h_item", right_on="item_id", how="inner").sort("_profile", "h_back")
        weights = sp.csr_matrix((self.space._weights(seen), (seen["_profile"].to_numpy(), seen["_idx"].to_numpy())),
                                shape=(pairs.height, len(base.item_ids)))
        targets = pairs.join(base.index(), on="item_id", how="left", maintain_order="left")["_idx"]
        usable = (np.diff(weights.indptr) > 0) & targets.is_not_null().to_numpy()
        kept = int(usable.sum())
        held_out = np.arange(kept) >= kept - int(round(kept * self.holdout))
        texts = pl.DataFrame({"item_id": base.item_ids}).join(
            items.select("item_id", pl.col(self.field).cast(pl.String).str.strip_chars()), on="item_id", how="left",
            maintain_order="left")[self.field].to_list()
        return texts, weights[usable], targets.to_numpy()[usable].astype(np.int64), held_out

    def settings(self) -> dict[str, Any]:
        """Every setting, flat, as MLflow parameters (the tuning run's) and an adapter's record."""
        space = self.space
        params = {"mode": self.mode, "encoder": self.encoder_name,
                  "encoder_params": json.dumps(self.encoder_params, sort_keys=True), "field": self.field,
                  "recent": space.recent, "history": space.history, "half_life_days": space.half_life_days,
                  "weight_by_value": space.weight_by_value, "max_pairs": self.max_pairs, "holdout": self.holdout,
                  **{{"k": "recall_k", "hard": "hard_negatives"}.get(k, k): v for k, v in self.tuning.items() if k != "progress"}}
        if self.mode in PREFIX:
            params.update(lora_rank=self.lora["rank"], lora_alpha=self.lora["alpha"])
        if self.mode == "offset":
            params.update(max_offset=self.max_offset)
        if self.adalora is not None:
            params.update({f"adalora_{k}": v for k, v in vars(self.adalora).items()})
        return params

    def ranks(self, state: dict[str, np.ndarray]) -> dict[str, int]:
        """adalora: each adapted module's final rank in a learned state (empty for the other modes)."""
        if self.mode != "adalora":
            return {}
        return adalora_ranks(state)

    def adapter(self, state: dict[str, np.ndarray], until: datetime) -> Adapter:
        """The adapter file's content for a learned state: what `recengine tune` writes and training logs."""
        if self.mode in PREFIX:
            tensors = {name.removeprefix(PREFIX[self.mode]): value for name, value in state.items()
                       if name.startswith(PREFIX[self.mode])}
        elif self.mode == "offset":  # ids may be strings, which safetensors cannot hold: the metadata records them
            tensors = {"offsets": np.asarray(state["offsets"], dtype=np.int32)}
        else:
            tensors = {"projection": np.asarray(state["projection"], dtype=np.int32)}
        ids = {"offset_ids": json.dumps(state["offset_ids"].tolist())} if self.mode == "offset" else {}
        return Adapter(tensors=tensors, encoder=self.encoder_name, encoder_params=self.encoder_params, mode=self.mode,
                       until=naive_utc(until), field=self.field, base_id=self.encoder().id, lora_rank=self.lora["rank"],
                       lora_alpha=self.lora["alpha"], extra={"settings": json.dumps(self.settings(), sort_keys=True),
                                                             **({"ranks": json.dumps(self.ranks(state))} if self.adalora else {}),
                                                             **ids})

    def adapted(self, state: dict[str, np.ndarray]) -> "_AdaptedEncoder":
        prefix = PREFIX[self.mode]
        adapters = {name.removeprefix(prefix): value for name, value in sorted(state.items()) if name.startswith(prefix)}
        digest = tensors_digest(adapters)[:24]  # as an adapter file of these tensors names them
        if digest not in self._adapted:
            self._adapted = {digest: _AdaptedEncoder(self.encoder(), adapters, digest, mode=self.mode, **self.lora)}
        return self._adapted[digest]

    # -- features --------------------------------------------------------------------------------------

    def _renamed(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {f"tuned_{self.field}_{kind}": values[f"interest_{self.field}_{kind}"] for kind in ("mean", "max")}

    def transform(self, requests: pl.LazyFrame, context) -> pl.LazyFrame:
        _, until = learned_state(context, self)
        values = self.space.transform(requests, context).collect()
        times = requests.select("_row", "timestamp").collect()
        values = values.join(times, on="_row", how="left", maintain_order="left")
        usable = pl.col("timestamp") >= until  # nothing from a head tuned after the request
        return values.select("_row", *(pl.when(usable).then(pl.col(f"interest_{self.field}_{kind}")).alias(f"tuned_{self.field}_{kind}")
                                       for kind in ("mean", "max"))).lazy()

    def prepare(self, snapshot) -> dict:
        _, until = learned_state(snapshot.context, self)
        return {"space": self.space.prepare(snapshot), "usable": snapshot.at >= until}

    def serve(self, tables, user, idx: np.ndarray) -> dict[str, np.ndarray]:
        if not tables["usable"]:
            return {c: np.full(len(idx), np.nan) for c in self.columns}
        return self._renamed(self.space.serve(tables["space"], user, idx))

    def serve_whole(self, tables, users: list) -> dict:
        if not tables["usable"]:
            size = len(tables["space"]["snapshot"].item_ids) + 1
            return {u: {c: np.full(size, np.nan) for c in self.columns} for u in users}
        return {u: self._renamed(values) for u, values in self.space.serve_whole(tables["space"], users).items()}


class TunedEmbeddingSource:
    """`tuned_embedding`: the `embedding` source in the tuned space: the nearest items to the user's
    tuned profile, never-taken ones included (`new_items = true`: only those). It takes the tuning
    settings of `tuned_interest` and, given the same ones in one feature set, shares its fit."""

    def __init__(self, k: int = 100, new_items: bool = False, **tuning: Any):
        self.tuned = TunedInterest(**tuning)
        self.tuned.key = type(self).__name__  # until the feature set names it: the space must read this part's state
        self.name, self.k, self.fit_key, self.encoders = "tuned_embedding", k, self.tuned.fit_key, self.tuned.encoders
        space = self.tuned.space
        self.finder = EmbeddingSource(k, space.encoder_name, space.encoder_params, field=self.tuned.field,
                                      history=space.history, half_life_days=space.half_life_days, new_items=new_items)
        self.finder.scorer = space  # the same search, over tuned item vectors and tuned profiles

    # The feature set names the part's learned state (`key`); the tuned space reads it through `tuned`.
    @property
    def key(self) -> str:
        return self.tuned.key

    @key.setter
    def key(self, value: str) -> None:
        self.tuned.key = value

    def fit(self, events: pl.DataFrame, items: pl.DataFrame | None) -> dict[str, np.ndarray]:
        return self.tuned.fit(events, items)

    def settings(self) -> dict[str, Any]:
        return self.tuned.settings()

    def adapter(self, state: dict[str, np.ndarray], until: datetime) -> Adapter:
        return self.tuned.adapter(state, until)

    def generate(self, requests: pl.LazyFrame, context) -> pl.LazyFrame:
        _, until = learned_state(context, self)
        return self.finder.generate(requests.filter(pl.col("timestamp") >= until), context)  # nothing from a later tuning


# Its parameters, as the feature set's checks read them: the source's own and every tuning setting.
TunedEmbeddingSource.__signature__ = inspect.Signature([
    *list(inspect.signature(TunedEmbeddingSource.__init__).parameters.values())[1:3],
    *list(inspect.signature(TunedInterest.__init__).parameters.values())[1:]])


@hookimpl
def register_candidate_sources(register):
    register("tuned_embedding", TunedEmbeddingSource,
             "Nearest items to the user's profile in a text space tuned on what users took next (learned; new_items: only untaken ones).")


@hookimpl
def register_feature_extractors(register):
    register("tuned_interest", TunedInterest,
             "Interest (cosine to the user's profile, max to recent items) in a text space tuned on what users took next (learned).")
