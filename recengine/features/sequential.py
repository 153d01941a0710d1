"""A sequential, text-aware user model as learned parts (issue #22): `sequential`, a small SASRec-style
transformer (Kang & McAuley 2018) over the user's last `history` items.

The model. An item's vector is the unit-norm sum of its text embedding (the encoder's, frozen, read
through the embedding cache) mapped by a trained linear layer and, with `id_embedding = true`, a trained
embedding of its id for the items the training sequences hold. An item nobody took (a new release) has
no id embedding: its text alone places it, so it is scored and proposed like any other. The user is the
last position of causal self-attention (pre-norm blocks of `heads` heads, learnt positions, `layers`
deep, width `dim`) over the vectors of their last `history` items, oldest first, unit-normalised; a score
is the cosine between user and item.

Training (`fit`, on the learned window's events): next-item prediction at every position of the users'
sequences, cut into windows of `history` + 1 items from each user's latest event back (the most recent
`max_sequences` windows, sampled with `seed` when there are more), with in-batch InfoNCE: each
position's logits are its cosines (over `temperature`) to the distinct items the batch's positions take
next, minus the log of each item's frequency as a target (logQ: popular items are not pushed away for
being everywhere in the batches). `id_dropout` of a batch's items are seen by their text alone, so the
text map learns to stand without ids. Seeded, CPU by default, one torch thread, deterministic algorithms:
one seed gives the same state arrays on one machine.

Cost. Time per epoch O(S * N * (N + d) * d * layers + S * N * U * d) with S windows (at most
`max_sequences`), N = `history`, d = `dim` and U <= `batch_size` * N the batch's distinct targets;
memory: the S x (N + 1) window table, the catalogue's text embeddings, and one batch's activations
(`batch_size` x N x d per layer) and logits (`batch_size` * N x U floats: 64 x 50 positions x at most
3,200 targets, 40 MB at the defaults). On ml-latest-small (90k events, 9.7k titles) the defaults fit in
about a minute on one CPU thread, once the titles' embeddings are cached. Reading: a user costs one
forward pass over N positions (BLOCK users at a time); ranks and the source compare each user with
every item the model places, in blocks of at most SCORES scores.

The state is plain arrays: every weight of the transformer as float32 (`weight:<name>`), `item_ids` (the
ids that have an id embedding, rows of `weight:ids.weight`) and `loss` per epoch. It is rebuilt into
torch tensors (float64) to read: item vectors and user vectors are unit-normalised and rounded to the
2^-16 grid (`recengine.core.grid`), so every score is an exact cosine, the same in batch and serving
whatever the batch a user was computed in.

The parts. `sequential` (extractor): `seq_score`, the cosine of the candidate to the user's vector from
their events strictly before the request, and `seq_rank`, the candidate's rank (1 = best, ties by item
id) among every item the model can place (the catalogue's items with text, and the items with an id
embedding), the user's last `history` items ranked last: a rank against the catalogue, not against the
request's other candidates, so it does not depend on which candidates a request has. `sequential`
(source): the `k` items with the best score. By default (`exclude_history = true`) it skips the items
among the user's last `history`, which the ranking would drop as already seen (the framework drops
every seen item anyway); `exclude_history = false` for logs where users take items again and the
feature set keeps seen items (`exclude_seen = false`). Both answer nothing (null, no proposal) for users
with no known item before the request, and for requests before the learned window's end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from recengine.core.data import TIMESTAMP
from recengine.core.grid import on_grid
from recengine.core.pit import recent_history
from recengine.core.topk import DECIMALS, top_k_dense
from recengine.errors import ConfigError, DataError
from recengine.features.interest import InterestScores, ItemEmbeddings, item_embeddings
from recengine.features.tuned import _ReadOnlyCache
from recengine.learning.tuning import torch_settings
from recengine.parts.candidates import source_top_k
from recengine.parts.context import learned_state
from recengine.parts.encoders import create_encoder
from recengine.parts.hookspecs import hookimpl
from recengine.parts.plugins import check_number

WEIGHT = "weight:"  # the state's names of the transformer's weights
BLOCK = 512  # users encoded at a time: bounds the forward pass's memory
SCORES = 2**24  # at most this many (user, item) scores at once (128 MB): users compared with the catalogue in blocks


def _blocks(rows: np.ndarray, n_items: int):
    """`rows` in consecutive blocks of at most BLOCK users and SCORES scores."""
    size = max(1, min(BLOCK, SCORES // max(n_items, 1)))
    return (rows[start : start + size] for start in range(0, len(rows), size))


# -- the model, as functions of a dict of tensors (the state's arrays, or the parameters in training) ------

def _item_vectors(torch, weights: dict, text, text_row, id_row, drop=None):
    """Unit item vectors: text embedding (row `text_row`, -1: none) through the linear map, plus the id
    embedding (row `id_row`, -1: none; `drop`: rows whose id is left out this time)."""
    f = torch.nn.functional
    has_text = (text_row >= 0).to(text.dtype)[:, None]
    x = f.linear(text[text_row.clamp(min=0)], weights["text.weight"], weights["text.bias"]) * has_text
    if "ids.weight" in weights:
        use = id_row >= 0
        if drop is not None:
            use = use & ~(drop & (text_row >= 0))  # an item without text always keeps its id
        x = x + weights["ids.weight"][id_row.clamp(min=0)] * use.to(x.dtype)[:, None]
    return f.normalize(x, dim=1)


def _encode(torch, weights: dict, inputs, real, heads: int, layers: int, dropout: float = 0.0, training: bool = False):
    """(batch, N, d) outputs of causal self-attention over the (batch, N, d) item vectors `inputs`, left
    padded (`real`: which positions hold an item). A position attends to itself and the items before it."""
    f = torch.nn.functional
    batch, n, d = inputs.shape
    x = inputs * real[..., None].to(inputs.dtype) + weights["pos.weight"][None, -n:]
    x = f.dropout(x, dropout, training)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool, device=inputs.device))[None] & real[:, None, :]
    allowed = allowed | torch.eye(n, dtype=torch.bool, device=inputs.device)[None]  # a padded query sees itself
    hd = d // heads
    for layer in range(layers):
        w = {name.removeprefix(f"{layer}."): value for name, value in weights.items() if name.startswith(f"{layer}.")}
        h = f.layer_norm(x, (d,), w["ln1.weight"], w["ln1.bias"])
        q, k, v = f.linear(h, w["qkv.weight"], w["qkv.bias"]).view(batch, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attention = attention.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        attention = f.dropout(attention, dropout, training)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, n, d)
        x = x + f.dropout(f.linear(mixed, w["out.weight"], w["out.bias"]), dropout, training)
        h = f.layer_norm(x, (d,), w["ln2.weight"], w["ln2.bias"])
        x = x + f.dropout(f.linear(f.gelu(f.linear(h, w["ff1.weight"], w["ff1.bias"])), w["ff2.weight"], w["ff2.bias"]),
                          dropout, training)
    return f.layer_norm(x, (d,), weights["final.weight"], weights["final.bias"])


def _initial_weights(torch, generator, text_dim: int, n_ids: int, n: int, dim: int, layers: int) -> dict:
    """Seeded initial weights: a random text map (which roughly keeps the text's cosines), small id and
    position embeddings, identity layer norms, N(0, 0.02) projections and zero biases."""
    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=generator) * std

    weights = {"text.weight": normal(dim, text_dim, std=1 / math.sqrt(text_dim)), "text.bias": torch.zeros(dim),
               "pos.weight": normal(n, dim), "final.weight": torch.ones(dim), "final.bias": torch.zeros(dim)}
    if n_ids:
        weights["ids.weight"] = normal(n_ids, dim, std=0.01)
    for layer in range(layers):
        weights.update({f"{layer}.ln1.weight": torch.ones(dim), f"{layer}.ln1.bias": torch.zeros(dim),
                        f"{layer}.qkv.weight": normal(3 * dim, dim), f"{layer}.qkv.bias": torch.zeros(3 * dim),
                        f"{layer}.out.weight": normal(dim, dim), f"{layer}.out.bias": torch.zeros(dim),
                        f"{layer}.ln2.weight": torch.ones(dim), f"{layer}.ln2.bias": torch.zeros(dim),
                        f"{layer}.ff1.weight": normal(2 * dim, dim), f"{layer}.ff1.bias": torch.zeros(2 * dim),
                        f"{layer}.ff2.weight": normal(dim, 2 * dim), f"{layer}.ff2.bias": torch.zeros(dim)})
    return weights


@dataclass
class TrainResult:
    weights: dict[str, np.ndarray]
    losses: list[float]
    seconds: float
    windows: int
    targets: int


def train_sequential(text: np.ndarray, text_row: np.ndarray, id_row: np.ndarray, sequences: np.ndarray, *,
                     dim: int, heads: int, layers: int, epochs: int, batch_size: int, lr: float, temperature: float,
                     dropout: float, id_dropout: float, seed: int, device: str = "cpu", threads: int = 1) -> TrainResult:
    """Fit the transformer on `sequences` ((S, N + 1) rows of the item table, -1 where a window is shorter,
    left padded): each position predicts the next item, in-batch InfoNCE with logQ. The item table's row
    r is text row `text_row[r]` of `text` (-1: no text) plus id embedding `id_row[r]` (-1: none)."""
    import torch

    started = time.perf_counter()
    n = sequences.shape[1] - 1
    n_ids = int(id_row.max(initial=-1)) + 1
    with torch_settings(torch, threads), torch.random.fork_rng(devices=[] if device == "cpu" else None):
        torch.manual_seed(seed)  # dropout's draws; restored on the way out (fork_rng)
        generator = torch.Generator().manual_seed(seed)  # initial weights, batch order, id dropout
        weights = {name: torch.nn.Parameter(value.to(device))
                   for name, value in _initial_weights(torch, generator, text.shape[1], n_ids, n, dim, layers).items()}
        optimizer = torch.optim.Adam(list(weights.values()), lr=lr)
        text_t = torch.as_tensor(np.asarray(text, dtype=np.float32), device=device)
        text_row_t = torch.as_tensor(text_row, device=device)
        id_row_t = torch.as_tensor(id_row, device=device)
        seqs = torch.as_tensor(sequences, dtype=torch.int64)
        targets = seqs[:, 1:][(seqs[:, :-1] >= 0) & (seqs[:, 1:] >= 0)]
        # logQ: how often each item is a target, i.e. how often the in-batch sampler offers it.
        log_q = torch.log(torch.bincount(targets, minlength=len(text_row)).double().clamp(min=1) / max(len(targets), 1))
        log_q = log_q.float().to(device)
        losses = []
        for _ in range(epochs):
            order = torch.randperm(len(seqs), generator=generator)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = seqs[order[start : start + batch_size]]
                loss = _batch_loss(torch, weights, batch, text_t, text_row_t, id_row_t, log_q, heads=heads, layers=layers,
                                   temperature=temperature, dropout=dropout, id_dropout=id_dropout, generator=generator,
                                   device=device)
                if loss is None:
                    continue
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()), count + 1
            losses.append(total / max(count, 1))
        state = {name: value.detach().cpu().numpy().astype(np.float32) for name, value in weights.items()}
    return TrainResult(state, losses, time.perf_counter() - started, len(sequences), len(targets))


def _batch_loss(torch, weights, batch, text, text_row, id_row, log_q, *, heads, layers, temperature, dropout, id_dropout,
                generator, device):
    """Mean InfoNCE of a batch of windows: each position against the batch's distinct next items."""
    inputs, nexts = batch[:, :-1], batch[:, 1:]
    real = inputs >= 0
    valid = real & (nexts >= 0)
    if int(valid.sum()) < 2:
        return None
    used, local = torch.unique(torch.cat([inputs[real], nexts[valid]]), return_inverse=True)
    drop = torch.rand(len(used), generator=generator) < id_dropout if id_dropout > 0 else None
    used_d = used.to(device)
    vectors = _item_vectors(torch, weights, text, text_row[used_d], id_row[used_d], None if drop is None else drop.to(device))
    slots = torch.zeros(inputs.shape, dtype=torch.int64)
    slots[real] = local[: int(real.sum())]
    out = _encode(torch, weights, vectors[slots.to(device)], real.to(device), heads, layers, dropout, training=True)
    users = torch.nn.functional.normalize(out[valid.to(device)], dim=1)
    target_local = local[int(real.sum()):]
    candidates, label = torch.unique(target_local, return_inverse=True)
    candidates_d = candidates.to(device)
    logits = users @ vectors[candidates_d].T / temperature - log_q[used_d[candidates_d]][None, :]
    return torch.nn.functional.cross_entropy(logits, label.to(device))


def training_windows(events: pl.DataFrame, n: int, max_sequences: int, seed: int) -> pl.DataFrame:
    """`(_window, _slot, item_id)`: each user's events in time order (ties by item id) cut into windows of
    n + 1 items from the latest back (consecutive windows share one item: the older one's last input is
    the newer one's first), right-aligned in slots 0..n; windows of one item dropped; at most
    `max_sequences` of them, chosen with `seed`, numbered 0, 1, ... in (user, time) order."""
    ordered = events.select("user_id", "item_id", "timestamp").sort("user_id", "timestamp", "item_id")
    back = ordered.with_columns((pl.len().over("user_id") - 1 - pl.int_range(pl.len()).over("user_id")).alias("_back"))
    back = back.with_columns((pl.col("_back") // n).alias("_w"))
    # An item n, 2n, ... back ends its window and starts the newer one.
    shared = back.filter((pl.col("_back") % n == 0) & (pl.col("_back") >= n)).with_columns(pl.col("_w") - 1)
    rows = pl.concat([back, shared]).with_columns((n - (pl.col("_back") - pl.col("_w") * n)).alias("_slot"))
    rows = rows.filter(pl.len().over("user_id", "_w") >= 2)
    windows = rows.select("user_id", "_w").unique().sort("user_id", pl.col("_w"), descending=[False, True])
    if windows.height > max_sequences:
        keep = np.sort(np.random.default_rng(seed).choice(windows.height, max_sequences, replace=False))
        windows = windows[keep]
    windows = windows.with_row_index("_window")
    return rows.join(windows, on=["user_id", "_w"]).select("_window", pl.col("_slot").cast(pl.Int64), "item_id").sort("_window", "_slot")


# -- the items a state can place, and the users it reads --------------------------------------------------

@dataclass
class ItemTable:
    """The items a state places (sorted by id, so position order is the tie-break order): their unit
    vectors on the grid (float64), and the text row / id row each was built from."""

    item_ids: pl.Series
    text_row: np.ndarray
    id_row: np.ndarray
    vectors: np.ndarray | None = None

    def index(self, ids: pl.Series) -> np.ndarray:
        """Rows of `ids` in the table (-1: an item it cannot place)."""
        ids = ids.cast(self.item_ids.dtype, strict=False)
        return ids.replace_strict(self.item_ids, np.arange(len(self.item_ids)), default=-1, return_dtype=pl.Int64).to_numpy()


def item_table(text_ids: pl.Series, id_ids: pl.Series) -> ItemTable:
    """Every item with a text embedding (rows of `text_ids`) or an id embedding (rows of `id_ids`)."""
    if len(id_ids) and len(text_ids) and id_ids.dtype != text_ids.dtype:
        id_ids = id_ids.cast(text_ids.dtype, strict=False).drop_nulls()
    text_ids, id_ids = text_ids.alias("item_id"), id_ids.alias("item_id")
    ids = pl.concat([text_ids, id_ids]).unique().sort() if len(id_ids) else text_ids.unique().sort()
    frame = pl.DataFrame({"item_id": ids})
    text = frame.join(pl.DataFrame({"item_id": text_ids, "_t": np.arange(len(text_ids))}), on="item_id", how="left",
                      maintain_order="left")["_t"].fill_null(-1).to_numpy().astype(np.int64)
    idr = frame.join(pl.DataFrame({"item_id": id_ids, "_d": np.arange(len(id_ids))}, schema_overrides={"item_id": ids.dtype}),
                     on="item_id", how="left", maintain_order="left")["_d"].fill_null(-1).to_numpy().astype(np.int64)
    return ItemTable(ids, text, idr)


def _ranks(scores: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """Each column's rank (1 = best) per row, scores compared as every top k compares them (rounded),
    ties by column (the item-id order); `taken` columns rank last."""
    key = np.round(scores, DECIMALS)
    key[taken] = -np.inf
    order = np.argsort(-key, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
    return ranks


class _Sequential:
    """What the extractor and the source share: settings, the fit, the item table and user vectors."""

    part = "sequential"

    def __init__(self, field: str, encoder: str, encoder_params: dict[str, Any] | None, history: int, dim: int, heads: int,
                 layers: int, epochs: int, batch_size: int, lr: float, temperature: float, dropout: float,
                 id_embedding: bool, id_dropout: float, max_sequences: int, seed: int, device: str):
        if not isinstance(field, str) or not field:
            raise ConfigError(f"{self.part}: field = {field!r}; name the items' text field, e.g. \"title\".")
        for name, value, minimum in (("history", history, 1), ("dim", dim, 2), ("heads", heads, 1), ("layers", layers, 1),
                                     ("epochs", epochs, 1), ("batch_size", batch_size, 2), ("max_sequences", max_sequences, 1),
                                     ("seed", seed, 0)):
            check_number(self.part, name, value, integer=True, minimum=minimum)
        check_number(self.part, "history", history, integer=True, maximum=1000)
        check_number(self.part, "dim", dim, integer=True, maximum=4096)
        if dim % heads:
            raise ConfigError(f"{self.part}: dim = {dim} is not a multiple of heads = {heads}; each head takes dim / heads "
                              f"dimensions: give e.g. dim = {heads * max(1, round(dim / heads))}.")
        check_number(self.part, "lr", lr, above=0)
        check_number(self.part, "temperature", temperature, above=0)
        check_number(self.part, "dropout", dropout, minimum=0, below=1)
        check_number(self.part, "id_dropout", id_dropout, minimum=0, below=1)
        if not isinstance(id_embedding, bool):
            raise ConfigError(f"{self.part}: id_embedding = {id_embedding!r}; give true or false.")
        if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
            raise ConfigError(f"{self.part}: device = {device!r}; give \"cpu\" or \"cuda\" (where the model trains; it "
                              "is always read on the CPU).")
        self.field, self.encoder_name, self.encoder_params = field, encoder, dict(encoder_params or {})
        self.history = history
        self.model = {"dim": dim, "heads": heads, "layers": layers}
        self.training = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "temperature": temperature,
                         "dropout": dropout, "id_dropout": id_dropout if id_embedding else 0.0, "seed": seed, "device": device}
        self.id_embedding, self.max_sequences = id_embedding, max_sequences
        self.encoders = [(encoder, self.encoder_params)]
        # The extractor and the source with equal settings fit once (the device is left out: it moves no result).
        self.fit_key = ("sequential", encoder, repr(sorted(self.encoder_params.items())), field, history,
                        repr(sorted(self.model.items())), repr(sorted((k, v) for k, v in self.training.items() if k != "device")),
                        id_embedding, max_sequences)
        # The frozen text embeddings, through the context's cache: shared with `interest` over the same encoder.
        self.text = InterestScores(encoder, self.encoder_params, [field], recent=1, history=history)
        self._encoder = None

    # -- learning ------------------------------------------------------------------------------------------

    def fit(self, events: pl.DataFrame, items: pl.DataFrame | None) -> dict[str, np.ndarray]:
        if items is None or self.field not in items.columns:
            raise ConfigError(f"{self.part}: the model reads the items' text field '{self.field}', but "
                              f"{'no items table was given' if items is None else 'the items have no such field'}; "
                              "pass --items with that field or drop the sequential parts from the feature set.")
        if self.training["device"].startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"{self.part}: device = {self.training['device']!r}, but torch sees no CUDA device here; "
                                  "use device = \"cpu\".")
        if self._encoder is None:
            self._encoder = create_encoder(self.encoder_name, self.encoder_params)
        text = item_embeddings(items.lazy(), self.field, self._encoder, _ReadOnlyCache())
        usable = events if self.id_embedding else events.join(pl.DataFrame({"item_id": text.item_ids}), on="item_id", how="semi")
        if len(text.item_ids) and usable.height:
            usable = usable.with_columns(pl.col("item_id").cast(text.item_ids.dtype, strict=False)).drop_nulls("item_id")
        windows = training_windows(usable, self.history, self.max_sequences, self.training["seed"])
        id_ids = windows["item_id"].unique().sort() if self.id_embedding else text.item_ids[:0]
        table = item_table(text.item_ids, id_ids)
        sequences = np.full((int(windows["_window"].max() or 0) + 1 if windows.height else 0, self.history + 1), -1, dtype=np.int64)
        sequences[windows["_window"].to_numpy(), windows["_slot"].to_numpy()] = table.index(windows["item_id"])
        targets = int(((sequences[:, :-1] >= 0) & (sequences[:, 1:] >= 0)).sum())
        if targets < 2:
            last = events["timestamp"].max() if events.height else None
            raise DataError(f"{self.part}: only {targets} next-item example(s) in the {events.height:,} events it may learn "
                            f"from (up to {last}; an example is a user's event after an earlier one of theirs, on an item "
                            f"with a '{self.field}' text or an id); the model learns from thousands. Give more events (in "
                            "a training: a later [labels] learned_fraction), or drop the sequential parts.")
        result = train_sequential(text.matrix, table.text_row, table.id_row, sequences, **self.model,
                                  **{k: v for k, v in self.training.items()})
        self.last_fit = result  # seconds, windows and targets, for a caller who measures
        item_ids = np.asarray(id_ids.to_list(), dtype=str if id_ids.dtype == pl.String else np.int64)
        return {**{WEIGHT + name: value for name, value in result.weights.items()}, "item_ids": item_ids,
                "loss": np.asarray(result.losses, dtype=np.float64)}

    # -- reading the state -----------------------------------------------------------------------------------

    def _until(self, context, until):
        """The learned window's end, or the text encoder's own tuning end (an adapter file) if later."""
        tuned = self.text.until(context)
        return until if tuned is None or (until is not None and until >= tuned) else tuned

    def _weights(self, context, state, until) -> dict:
        import torch

        def build() -> dict:
            return {name.removeprefix(WEIGHT): torch.as_tensor(np.asarray(value, dtype=np.float64))
                    for name, value in state.items() if name.startswith(WEIGHT)}

        return context.memo(("sequential_weights", self.fit_key, until), build)

    def items(self, context, state, until) -> ItemTable:
        """The items the state places in this context's catalogue, with their unit vectors on the grid."""
        import torch

        def build() -> ItemTable:
            emb: ItemEmbeddings = self.text.embeddings(context, self.field)
            ids = pl.Series("item_id", state["item_ids"])
            table = item_table(emb.item_ids, ids if len(ids) else emb.item_ids[:0])
            weights = self._weights(context, state, until)
            with torch_settings(torch), torch.no_grad():
                vectors = _item_vectors(torch, weights, torch.as_tensor(np.asarray(emb.matrix, dtype=np.float64)),
                                        torch.as_tensor(table.text_row), torch.as_tensor(table.id_row))
            table.vectors = on_grid(vectors.numpy())
            return table

        return context.memo(("sequential_items", self.fit_key, until), build)

    def users(self, context, state, until, table: ItemTable, profiles: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Unit user vectors on the grid for `profiles` (user_id, timestamp), NaN rows for those with no
        item the table places among their last `history` events strictly before the timestamp; and those
        items as (profile, table row) pairs."""
        import torch

        history = recent_history(profiles.lazy().select("user_id", "timestamp"), context.events, self.history).collect()
        seen = history.select("_profile", "h_back", pl.Series("_i", table.index(history["h_item"]))).filter(pl.col("_i") >= 0)
        seen = seen.sort("_profile", "h_back").with_columns(pl.int_range(pl.len()).over("_profile").alias("_k"))
        n = self.history
        sequences = np.full((profiles.height, n), -1, dtype=np.int64)
        profile, item = seen["_profile"].to_numpy().astype(np.int64), seen["_i"].to_numpy().astype(np.int64)
        sequences[profile, n - 1 - seen["_k"].to_numpy()] = item
        out = np.full((profiles.height, self.model["dim"]), np.nan)
        known = np.flatnonzero((sequences >= 0).any(axis=1))
        weights = self._weights(context, state, until)
        vectors = torch.as_tensor(table.vectors)
        with torch_settings(torch), torch.no_grad():
            for start in range(0, len(known), BLOCK):
                rows = known[start : start + BLOCK]
                seq = torch.as_tensor(sequences[rows])
                encoded = _encode(torch, weights, vectors[seq.clamp(min=0)], seq >= 0, self.model["heads"], self.model["layers"])
                out[rows] = on_grid(torch.nn.functional.normalize(encoded[:, -1], dim=1).numpy())
        return out, np.stack([profile, item], axis=1) if len(profile) else np.empty((0, 2), dtype=np.int64)

    @staticmethod
    def _taken(pairs: np.ndarray, rows: np.ndarray, n_items: int) -> np.ndarray:
        """(len(rows), n_items) bools: which items each of the profiles `rows` has among its history."""
        taken = np.zeros((len(rows), n_items), dtype=bool)
        position = np.full(int(max(rows.max(initial=-1), pairs[:, 0].max(initial=-1))) + 1, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        mine = position[pairs[:, 0]] >= 0
        taken[position[pairs[mine, 0]], pairs[mine, 1]] = True
        return taken


class SequentialScores(_Sequential):
    """`seq_score`, the model's cosine between the candidate and the user's vector from their events
    strictly before t, and `seq_rank`, its rank among every item the model places (the user's last
    `history` items last); null for an item the model cannot place, a user without a known item before t,
    and a request before the learned window's end."""

    def __init__(self, field: str = "title", encoder: str = "transformers", encoder_params: dict[str, Any] | None = None,
                 history: int = 50, dim: int = 64, heads: int = 2, layers: int = 2, epochs: int = 10, batch_size: int = 64,
                 lr: float = 1e-3, temperature: float = 0.1, dropout: float = 0.2, id_embedding: bool = True,
                 id_dropout: float = 0.25, max_sequences: int = 20_000, seed: int = 0, device: str = "cpu"):
        super().__init__(field, encoder, encoder_params, history, dim, heads, layers, epochs, batch_size, lr, temperature,
                         dropout, id_embedding, id_dropout, max_sequences, seed, device)
        self.columns = ["seq_score", "seq_rank"]

    def transform(self, requests: pl.LazyFrame, context) -> pl.LazyFrame:
        state, until = learned_state(context, self)
        until = self._until(context, until)
        keys = requests.select("_row", "user_id", "item_id", "timestamp").collect()
        score, rank = np.full(keys.height, np.nan), np.full(keys.height, np.nan)
        # Only requests at or after the window's end read the model (earlier ones stay null).
        profiles = keys.filter(pl.col("timestamp") >= until).select("user_id", "timestamp").unique().sort("user_id", "timestamp")
        if profiles.height:
            table = self.items(context, state, until)
            users, pairs = self.users(context, state, until, table, profiles)
            found = keys.with_row_index("_at").join(profiles.with_row_index("_profile"), on=["user_id", "timestamp"])
            found = found.with_columns(pl.Series("_i", table.index(found["item_id"])))
            found = found.filter(pl.Series(np.isfinite(users[:, 0])[found["_profile"].to_numpy()]) & (pl.col("_i") >= 0))
            at, p, i = (found[c].to_numpy().astype(np.int64) for c in ("_at", "_profile", "_i"))
            score[at] = (users[p] * table.vectors[i]).sum(axis=1)  # exact: grid vectors, products of 2^-32
            order = np.argsort(p, kind="stable")
            for block in _blocks(np.unique(p), len(table.item_ids)):
                ranks = _ranks(users[block] @ table.vectors.T, self._taken(pairs, block, len(table.item_ids)))
                lo, hi = np.searchsorted(p[order], [block[0], block[-1] + 1])
                rows = order[lo:hi]
                rank[at[rows]] = ranks[np.searchsorted(block, p[rows]), i[rows]]
        return keys.select("_row").with_columns(pl.Series("seq_score", score, nan_to_null=True),
                                                pl.Series("seq_rank", rank, nan_to_null=True)).lazy()

    def prepare(self, snapshot) -> dict:
        state, until = learned_state(snapshot.context, self)
        until = self._until(snapshot.context, until)
        if snapshot.at < until or not len(snapshot.users):
            return {"usable": False}
        context = snapshot.context
        table = self.items(context, state, until)
        at = pl.DataFrame({"user_id": snapshot.users, "timestamp": pl.Series([snapshot.at] * len(snapshot.users), dtype=TIMESTAMP)})
        users, pairs = self.users(context, state, until, table, at)
        pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
        bounds = np.searchsorted(pairs[:, 0], np.arange(len(users) + 1))
        ids = snapshot.users.to_list()
        by_user = {ids[row]: (users[row], pairs[bounds[row] : bounds[row + 1], 1])
                   for row in np.flatnonzero(np.isfinite(users[:, 0]))}
        to_table = np.append(table.index(snapshot.item_ids), -1)  # the last slot: an item the state does not know
        return {"usable": True, "table": table, "users": by_user, "to_table": to_table}

    def serve(self, tables, user, idx: np.ndarray) -> dict[str, np.ndarray]:
        empty = {c: np.full(len(idx), np.nan) for c in self.columns}
        if not tables["usable"] or user not in tables["users"]:
            return empty
        vector, taken = tables["users"][user]
        table = tables["table"]
        scores = table.vectors @ vector
        mask = np.zeros((1, len(scores)), dtype=bool)
        mask[0, taken] = True
        ranks = _ranks(scores[None, :], mask)[0]
        i = tables["to_table"][idx]
        known = i >= 0
        j = np.maximum(i, 0)
        return {"seq_score": np.where(known, scores[j], np.nan), "seq_rank": np.where(known, ranks[j], np.nan).astype(np.float64)}


class SequentialSource(_Sequential):
    """The `k` items with the best score for the user's vector from their events before t (without the
    user's last `history` items, unless `exclude_history = false`)."""

    def __init__(self, k: int = 100, exclude_history: bool = True, field: str = "title", encoder: str = "transformers",
                 encoder_params: dict[str, Any] | None = None, history: int = 50, dim: int = 64, heads: int = 2,
                 layers: int = 2, epochs: int = 10, batch_size: int = 64, lr: float = 1e-3, temperature: float = 0.1,
                 dropout: float = 0.2, id_embedding: bool = True, id_dropout: float = 0.25, max_sequences: int = 20_000,
                 seed: int = 0, device: str = "cpu"):
        self.part = "sequential source"
        check_number(self.part, "k", k, integer=True, minimum=1)
        if not isinstance(exclude_history, bool):
            raise ConfigError(f"{self.part}: exclude_history = {exclude_history!r}; give true or false.")
        super().__init__(field, encoder, encoder_params, history, dim, heads, layers, epochs, batch_size, lr, temperature,
                         dropout, id_embedding, id_dropout, max_sequences, seed, device)
        self.name, self.k, self.exclude_history = "sequential", k, exclude_history

    def generate(self, requests: pl.LazyFrame, context) -> pl.LazyFrame:
        state, until = learned_state(context, self)
        until = self._until(context, until)
        schema = {"_request": pl.UInt32, "item_id": context.events.collect_schema()["item_id"], "score": pl.Float64}
        keyed = requests.collect().filter(pl.col("timestamp") >= until)  # nothing from a model fit after the request
        if not keyed.height:
            return pl.LazyFrame(schema=schema)
        table = self.items(context, state, until)
        users, pairs = self.users(context, state, until, table, keyed.select("user_id", "timestamp"))
        known = np.flatnonzero(np.isfinite(users[:, 0]))  # no known item before t: nothing to propose
        rows, columns, scores = [], [], []
        positions = np.arange(len(table.item_ids))  # the table is in item-id order: ties by id
        for block in _blocks(known, len(table.item_ids)):
            sims = users[block] @ table.vectors.T  # exact: grid vectors
            if self.exclude_history:
                sims[self._taken(pairs, block, len(table.item_ids))] = -np.inf
            at, top = top_k_dense(sims, self.k, positions)
            keep = np.isfinite(sims[at, top])
            rows.append(block[at[keep]])
            columns.append(top[keep])
            scores.append(sims[at, top][keep])
        if not rows or not sum(len(r) for r in rows):
            return pl.LazyFrame(schema=schema)
        rows, columns = np.concatenate(rows), np.concatenate(columns)
        out = pl.DataFrame({"_request": keyed["_request"].gather(rows),
                            "item_id": table.item_ids.gather(columns).cast(schema["item_id"], strict=False),
                            "score": np.concatenate(scores)}, schema=schema)
        return source_top_k(out.lazy(), self.k)


@hookimpl
def register_feature_extractors(register):
    register("sequential", SequentialScores,
             "Score and rank of the item by a sequential transformer over the user's last items, fed their text (learned).")


@hookimpl
def register_candidate_sources(register):
    register("sequential", SequentialSource,
             "Best items for a sequential transformer over the user's last items, fed their text; reaches untaken items (learned).")
