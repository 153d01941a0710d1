"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) as a benchmark peer.

Written for the benchmark from the paper, independent of recengine's own sequential part
(`recengine/features/sequential.py`, which reads item text): this peer knows item ids only, as in the
paper. Each user's items ordered by time (ties by item id), the last `maxlen` + 1 kept; at every position
the model reads the items so far (learnt item and position embeddings, `blocks` pre-norm causal
self-attention blocks of `heads` heads) and is trained to score the next item above one item drawn
uniformly from the catalogue (`loss = "bce"`, binary cross-entropy, the paper's loss; a draw equal to the
target is drawn again) or, with `loss = "ce"` (what movielens.py runs: it scored higher here), by a
softmax over every item. A user's top 10 is the items closest (dot product) to the last position's output, the items they
took excluded, ties by item id. Seeded: torch's generator and the negative draws come from `seed`.

    .venv/bin/python benchmarks/sasrec.py        # one fit on ml-latest-small's last cutoff, with its NDCG@10
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch


@dataclass(frozen=True)
class Settings:
    maxlen: int = 100
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    epochs: int = 60
    batch_size: int = 128
    learning_rate: float = 1e-3
    loss: str = "bce"  # "bce": the paper's, one sampled negative per position; "ce": softmax over every item

    def label(self) -> str:
        return f"maxlen={self.maxlen} d={self.dim} epochs={self.epochs}"


class SASRec(torch.nn.Module):
    def __init__(self, n_items: int, s: Settings):
        super().__init__()
        self.items = torch.nn.Embedding(n_items + 1, s.dim, padding_idx=0)  # row 0: padding
        self.positions = torch.nn.Embedding(s.maxlen, s.dim)
        self.dropout = torch.nn.Dropout(s.dropout)
        layer = torch.nn.TransformerEncoderLayer(s.dim, s.heads, dim_feedforward=s.dim, dropout=s.dropout,
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, s.blocks, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(s.dim)
        self.scale = math.sqrt(s.dim)
        # Small embeddings at the start (torch's default is N(0, 1)): a dot product with a normalised
        # output of width 64 would start with logits of about 8 and training would stall.
        for embedding in (self.items, self.positions):
            torch.nn.init.normal_(embedding.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """(batch, maxlen) item rows, left-padded with 0 -> (batch, maxlen, dim) outputs."""
        length = sequences.shape[1]
        hidden = self.items(sequences) * self.scale + self.positions.weight[:length]
        padding = sequences == 0
        hidden = self.dropout(hidden) * ~padding.unsqueeze(-1)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=hidden.dtype)
        # Left padding: a user's first real position attends to itself at least, so no row of the
        # attention is all masked; padded positions are never read.
        hidden = self.blocks(hidden, mask=causal, is_causal=True)
        return self.norm(hidden)


def sequences(events: pl.DataFrame, maxlen: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, table): the sorted user and item ids and each user's last `maxlen` + 1 item rows
    (1-based column of `items`), oldest first, left-padded with 0."""
    items = np.sort(events["item_id"].unique().to_numpy())
    ordered = (events.select("user_id", "item_id", "timestamp").sort("user_id", "timestamp", "item_id")
               .group_by("user_id", maintain_order=True).agg(pl.col("item_id").tail(maxlen + 1)))
    users = ordered["user_id"].to_numpy()
    table = np.zeros((len(users), maxlen + 1), dtype=np.int64)
    for row, taken in enumerate(ordered["item_id"].to_list()):  # one row per user, not per event
        table[row, maxlen + 1 - len(taken):] = np.searchsorted(items, taken) + 1
    return users, items, table


def fit(events: pl.DataFrame, settings: Settings, seed: int) -> tuple[SASRec, np.ndarray, np.ndarray, np.ndarray]:
    """The model trained on `events`, with the (users, items, table) of `sequences`."""
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    users, items, table = sequences(events, settings.maxlen)
    model = SASRec(len(items), settings)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98))
    inputs, targets = torch.from_numpy(table[:, :-1]), torch.from_numpy(table[:, 1:])
    for _ in range(settings.epochs):
        model.train()
        for batch in np.array_split(generator.permutation(len(users)), max(1, math.ceil(len(users) / settings.batch_size))):
            seq, positive = inputs[batch], targets[batch]
            negative = torch.from_numpy(generator.integers(1, len(items) + 1, size=positive.shape))
            clash = negative == positive
            negative[clash] = torch.from_numpy(generator.integers(1, len(items) + 1, size=int(clash.sum())))
            hidden = model(seq)
            real = (positive > 0) & (seq > 0)
            if settings.loss == "ce":  # (the negatives are drawn all the same: one seed, one stream, either loss)
                logits = hidden[real] @ model.items.weight[1:].T
                loss = torch.nn.functional.cross_entropy(logits, positive[real] - 1)
            else:
                pos_logit = (hidden * model.items(positive)).sum(-1)[real]
                neg_logit = (hidden * model.items(negative)).sum(-1)[real]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    torch.cat([pos_logit, neg_logit]), torch.cat([torch.ones_like(pos_logit), torch.zeros_like(neg_logit)]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model, users, items, table


@torch.no_grad()
def recommend(model: SASRec, users: np.ndarray, items: np.ndarray, table: np.ndarray, request_users: np.ndarray,
              seen: pl.DataFrame, top: int) -> np.ndarray:
    """(requests, top) column indices of `items`, -1 where fewer are left; the (user_id, item_id) pairs of
    `seen` excluded. Users without events get no items."""
    model.eval()
    rows = np.searchsorted(users, request_users)
    known = (rows < len(users)) & (users[np.minimum(rows, len(users) - 1)] == request_users)
    found = np.full((len(request_users), top), -1, dtype=np.int64)
    rows = rows[known]
    history = torch.from_numpy(table[rows, 1:])  # the last maxlen items, the latest at the end
    user_vectors = model(history)[:, -1]
    scores = (user_vectors @ model.items.weight[1:].T).double().numpy()
    scores = np.round(scores, 6)
    places = pl.DataFrame({"user_id": request_users[known], "row": np.arange(len(rows))}).join(seen, on="user_id")
    scores[places["row"].to_numpy(), np.searchsorted(items, places["item_id"].to_numpy())] = -np.inf
    # Ties by item id: a stable sort of the columns, which are in item id order.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    order = np.where(np.isfinite(np.take_along_axis(scores, order, axis=1)), order, -1)
    found[np.flatnonzero(known)] = order
    return found


def top_items(events: pl.DataFrame, request_users: np.ndarray, settings: Settings, seed: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(column indices (requests, top), items) of a fit on `events`, every item a user took excluded."""
    with torch.random.fork_rng():
        model, users, items, table = fit(events, settings, seed)
        seen = events.select("user_id", "item_id").unique()
        return recommend(model, users, items, table, request_users, seen, top), items


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from movielens import TOP, protocol, ranked_frame, score, tagged

    chosen, truth, described = protocol(1)
    window = chosen[-1]
    print(described)
    started = time.perf_counter()
    ids, items = top_items(window.events, window.requests["user_id"].to_numpy(), Settings(), 0, TOP)
    top = tagged(ranked_frame(window.requests["user_id"].to_numpy(), ids, items), window)
    print(f"SASRec {Settings().label()}: fit and ranked in {time.perf_counter() - started:.1f} s, "
          f"NDCG@10 {score(top, truth)['ndcg@10']:.4f}")
