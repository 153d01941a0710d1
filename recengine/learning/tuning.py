"""Tuning a text encoder's space on behaviour (issue #15): what a user took next supervises how items
and users are embedded.

- `next_item_pairs`: from a window of events, (context, target) pairs: the context is the user's last
  events strictly before an event (what `recengine.core.pit.recent_history` gives a request at that time),
  the target is that event's item. Sampled deterministically (a seed), capped in number.
- `tune_head`: the `head` mode: a d x d linear map, initialised at the identity, trained on frozen
  (cached) item embeddings and the pairs' pooled context vectors with InfoNCE over in-batch negatives:
  a duplicate of the target elsewhere in the batch is never a negative, and each negative's logit is
  corrected by the log of its frequency as a target (logQ), so popular items are not pushed away just
  for being everywhere. Early stopping on a later held-out slice (next-item recall@K against the whole
  catalogue); the returned map is the best one seen, the identity included.
- `tune_lora`: the `lora` mode: peft adapters on the attention projections of a copy of a transformers
  encoder's model, the same loss; returns the adapters' weights (the best epoch's), the base untouched.
  The `adalora` mode (Zhang et al. 2023) is the same loop with peft's AdaLoRA: SVD-shaped adapters
  that start at `init_rank` per module and are pruned, as peft's schedule says, to an average of `rank`
  where the loss is most sensitive (`AdaloraSchedule`); the `full` mode trains every weight.
- `tune_offsets`: the `offset` mode (after "Let It Go? Not Quite", RecSys 2025): the frozen embeddings
  stay, and each item that training pairs hold gets a trainable offset, bounded in norm, added to its
  own; an item no pair holds (a new release) keeps its frozen vector, so cold items stay in the space
  the warm ones were tuned in, where fine-tuning the encoder moves the warm items away from them.

How a user is embedded is not defined here: the caller passes the contexts already pooled (the
interest profile, `recengine.features.interest.InterestScores.profiles`), so tuning and the features
read users the same way. torch is imported only when tuning runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from recengine.core.pit import recent_history
from recengine.core.topk import top_k_dense
from recengine.errors import DataError
from recengine.parts.adapters import AdaloraSchedule, encode_catalogue, encode_with, lora_model


def next_item_pairs(events: pl.DataFrame, context: int = 10, max_pairs: int = 100_000, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Pairs `(_profile, user_id, timestamp, item_id)` (item_id: the target), one per event that has an
    earlier event of its user, at most `max_pairs` of them chosen with `seed`, in time order; and their
    contexts: the user's last `context` events strictly before each (`recent_history`'s columns)."""
    ordered = events.select("user_id", "item_id", "timestamp").sort("timestamp", "user_id", "item_id")
    # rank "min" is 1 for a user's earliest time (ties included): those events have no context.
    ordered = ordered.filter(pl.col("timestamp").rank("min").over("user_id") > 1)
    if ordered.height > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(ordered.height, max_pairs, replace=False))
        ordered = ordered[keep]
    pairs = ordered.with_row_index("_profile").with_columns(pl.col("_profile").cast(pl.Int64))
    history = recent_history(pairs.lazy().select("user_id", "timestamp"), events.lazy(), context).collect()
    return pairs, history.with_columns(pl.col("_profile").cast(pl.Int64))


def tuning_window(events: pl.DataFrame, until: datetime | None = None) -> tuple[pl.DataFrame, datetime]:
    """The events a tuning learns from (those before `until`; all of them without it) and the end its
    adapter records: just after the window's last event. An adapter serves requests at or after its end,
    so an `until` far past the last event (or in the future) must not keep it from every request before
    that date: nothing happened between the last event and `until` for it to have learnt."""
    window = events if until is None else events.filter(pl.col("timestamp") < until)
    if window.height == 0:
        first = events["timestamp"].min()
        raise DataError(f"--until {until}: no event is before it (the first is at {first}); give a later time, or leave "
                        "--until out to tune on every event.")
    return window, window["timestamp"].max() + timedelta(milliseconds=1)


def hard_negatives(items: np.ndarray, count: int, block: int = 1024) -> np.ndarray:
    """(n, count) rows: each item's `count` nearest other items in the frozen space. Offered as extra
    negatives of a pair whose target is that item: the near misses in-batch negatives rarely are.
    Ties go to the smaller row (rows are the caller's order), so the table is the same on any machine."""
    vectors = np.asarray(items, dtype=np.float64)
    found = np.empty((len(vectors), count), dtype=np.int64)
    order = np.arange(len(vectors))
    for start in range(0, len(vectors), block):
        sims = vectors[start : start + block] @ vectors.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf  # never the item itself
        rows, cols = top_k_dense(sims, count, order)
        found[start + rows, np.arange(len(rows)) - np.searchsorted(rows, rows)] = cols
    return found


@contextmanager
def torch_settings(torch, threads: int | None = 1, warn_only: bool = False):
    """Deterministic algorithms (`warn_only`: a warning, not an error, where one has no deterministic
    form) and a fixed thread count, which fixes the sums' order (None: as set); restored afterwards."""
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.set_num_threads(threads or was_threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)


@dataclass
class TuneResult:
    """The tuned map and how it got there: training loss per epoch, held-out recall@K before tuning
    (first) and after each epoch, the epoch whose map is kept (0: the identity), the whole run's
    seconds and training pairs per second (the held-out evaluations left out)."""

    projection: np.ndarray
    losses: list[float] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    pairs_per_second: float = 0.0
    ranks: list[dict[str, int]] = field(default_factory=list)  # adalora: each module's rank, when recall was read


def tune_head(items: np.ndarray, contexts: np.ndarray, targets: np.ndarray, held_out: np.ndarray, *,
              temperature: float = 0.05, epochs: int = 10, batch_size: int = 256, lr: float = 1e-3,
              patience: int = 2, k: int = 10, seed: int = 0, progress: bool = False, threads: int = 1,
              hard: int = 0) -> TuneResult:
    """A linear map W (d x d) so that normalise(context @ W) points at normalise(items[target] @ W).

    `items`: (n, d) frozen item embeddings; `contexts`: (m, d) pooled user contexts; `targets`: (m,)
    row of each pair's next item in `items`; `held_out`: (m,) bool, the pairs early stopping reads
    (the latest ones: the caller splits by time). Repeatable: one seed gives the same W on one machine.
    `hard`: hard negatives per pair, the target's nearest items in the frozen space (`hard_negatives`).
    `threads`: torch's CPU threads while tuning. The head's products are small: on 2 busy cores one
    thread ran 20x faster than two, and a fixed count keeps the sums' order the same on any machine.
    """
    import torch

    with torch_settings(torch, threads):
        return _tune_head(torch, items, contexts, targets, held_out, temperature=temperature, epochs=epochs,
                          batch_size=batch_size, lr=lr, patience=patience, k=k, seed=seed, progress=progress, hard=hard)


def _tune_head(torch, items, contexts, targets, held_out, *, temperature, epochs, batch_size, lr, patience, k, seed, progress, hard) -> TuneResult:
    started = time.perf_counter()
    torch.manual_seed(seed)
    shuffler = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(items, dtype=np.float32))
    train, valid = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    ctx = torch.as_tensor(np.asarray(contexts[train], dtype=np.float32))
    tgt = torch.as_tensor(targets[train].astype(np.int64))
    # logQ: how often each item is a target, i.e. how often the in-batch sampler offers it as a negative.
    log_q = torch.log(torch.bincount(tgt, minlength=len(x)).double().clamp(min=1) / max(len(tgt), 1)).float()
    near = torch.as_tensor(hard_negatives(items, hard)) if hard else None
    weight = torch.nn.Parameter(torch.eye(x.shape[1]))
    optimizer = torch.optim.Adam([weight], lr=lr)
    result = TuneResult(projection=np.empty((0, 0), dtype=np.float32))

    def batches() -> list:
        order = torch.randperm(len(tgt), generator=shuffler)
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def step(rows) -> float | None:
        loss = _info_nce(torch, x, ctx[rows], tgt[rows], log_q, weight, temperature, None if near is None else near[tgt[rows]])
        return None if loss is None else _descend(optimizer, loss)

    best = _fit_epochs(result, epochs=epochs, patience=patience, batches=batches, step=step,
                       evaluate=lambda: _recall(torch, x, contexts[valid], targets[valid], weight.detach(), k),
                       snapshot=lambda: weight.detach().clone(), desc="tuning", progress=progress)
    result.projection = best.numpy().astype(np.float32)
    result.seconds = time.perf_counter() - started
    return result


def tune_offsets(items: np.ndarray, contexts, targets: np.ndarray, held_out: np.ndarray, *, max_norm: float = 0.5,
                 temperature: float = 0.05, epochs: int = 10, batch_size: int = 256, lr: float = 1e-3, patience: int = 2,
                 k: int = 10, seed: int = 0, progress: bool = False, threads: int = 1, hard: int = 0
                 ) -> tuple[np.ndarray, TuneResult]:
    """Offsets (n, d) so that an item is normalise(items[i] + offset[i]) and a user the normalised
    weighted sum of their items so (`contexts`: (m, n) sparse profile weights, as `tune_lora` reads them),
    trained by the same InfoNCE. After each step every offset is shrunk back to norm `max_norm` at most
    (the frozen vectors are unit: 0.5 moves an item by at most about 30 degrees). Rows of items in no
    training pair stay exactly zero (no gradient reaches them and Adam moves nothing without one).
    Returns the best epoch's offsets (zeros: the frozen space, epoch 0) and the run's record."""
    import torch

    with torch_settings(torch, threads):
        return _tune_offsets(torch, items, contexts.tocsr(), targets, held_out, max_norm=max_norm, temperature=temperature,
                             epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, k=k, seed=seed,
                             progress=progress, hard=hard)


def _tune_offsets(torch, items, contexts, targets, held_out, *, max_norm, temperature, epochs, batch_size, lr, patience,
                  k, seed, progress, hard):
    started = time.perf_counter()
    torch.manual_seed(seed)
    shuffler = torch.Generator().manual_seed(seed)
    f = torch.nn.functional
    base = torch.as_tensor(np.asarray(items, dtype=np.float32))
    train, valid = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    tgt_all = torch.as_tensor(targets.astype(np.int64))
    log_q = torch.log(torch.bincount(tgt_all[train], minlength=len(base)).double().clamp(min=1) / max(len(train), 1)).float()
    near = hard_negatives(items, hard) if hard else None
    offsets = torch.nn.Parameter(torch.zeros_like(base))
    optimizer = torch.optim.Adam([offsets], lr=lr)

    def catalogue():
        return f.normalize(base + offsets, dim=1)

    def recall() -> float:
        if not len(valid):
            return 0.0
        with torch.no_grad():
            vectors = catalogue()
            users = np.asarray(contexts[valid] @ vectors.numpy())
        return _recall(torch, vectors, users, targets[valid], torch.eye(vectors.shape[1]), k)

    def batches() -> list:
        order = train[torch.randperm(len(train), generator=shuffler).numpy()]
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def moved(rows: np.ndarray):
        at = torch.as_tensor(rows)
        return f.normalize(base[at] + offsets[at], dim=1)

    def step(pairs) -> float | None:
        # Only the batch's own items are moved into the tuned space: each once, gathered by position.
        loss = _batch_loss(torch, pairs, contexts, targets, near, log_q, temperature, moved)
        if loss is None:
            return None
        value = _descend(optimizer, loss)
        with torch.no_grad():  # back inside the ball: a small move, never a new item
            norms = offsets.norm(dim=1, keepdim=True)
            offsets.mul_(torch.clamp(max_norm / norms.clamp(min=1e-12), max=1.0))
        return value

    result = TuneResult(projection=np.empty((0, 0), dtype=np.float32))
    best = _fit_epochs(result, epochs=epochs, patience=patience, batches=batches, step=step, evaluate=recall,
                       snapshot=lambda: offsets.detach().clone(), desc="offset", progress=progress)
    result.seconds = time.perf_counter() - started
    return best.numpy(), result


def _descend(optimizer, loss) -> float:
    """One optimiser step on `loss`; its value."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _fit_epochs(result: TuneResult, *, epochs: int, patience: int, batches, step, evaluate, snapshot, desc: str,
                progress: bool):
    """The epochs every mode runs: each epoch's `batches()` (in a seeded order) through `step(batch)`
    (the loss after one optimiser step, None for a batch it skipped) under a progress bar with the mean
    loss and pairs/s; `evaluate()` (the held-out recall) before the first epoch and after each. Returns
    the best epoch's `snapshot()`, stopping after `patience` epochs without a better recall, and fills
    `result`'s losses, recalls, best epoch and training pairs/s."""
    from tqdm.auto import tqdm

    best = snapshot()
    result.recalls.append(evaluate())
    seen, stale, training = 0, 0, 0.0  # training: seconds in training steps, for pairs/s
    for epoch in range(1, epochs + 1):
        bar = tqdm(batches(), desc=f"{desc} epoch {epoch}", unit="batch", disable=not progress)
        total, count, epoch_started = 0.0, 0, time.perf_counter()
        for batch in bar:
            loss = step(batch)
            if loss is None:
                continue
            total, count, seen = total + loss, count + 1, seen + len(batch)
            rate = seen / (training + time.perf_counter() - epoch_started)
            bar.set_postfix(loss=f"{total / count:.4f}", pairs_per_s=f"{rate:.1f}")
        bar.close()
        training += time.perf_counter() - epoch_started
        result.losses.append(total / max(count, 1))
        result.recalls.append(evaluate())
        if result.recalls[-1] > max(result.recalls[:-1]):
            best, result.best_epoch, stale = snapshot(), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    result.pairs_per_second = seen / training if training else math.inf
    return best


def _info_nce(torch, x, ctx, tgt, log_q, weight, temperature, hard_ids=None):
    """Mean InfoNCE of a batch: each context against every target in the batch, its own the positive,
    and against its own hard negatives (`hard_ids`: (batch, h) item rows) if given."""
    if len(tgt) < 2:
        return None  # no negative to learn from
    f = torch.nn.functional
    hard = None if hard_ids is None else f.normalize(x[hard_ids] @ weight, dim=2)
    return _info_nce_vectors(torch, f.normalize(ctx @ weight, dim=1), f.normalize(x[tgt] @ weight, dim=1), tgt, log_q,
                             temperature, hard, hard_ids)


def _info_nce_vectors(torch, users, positives, tgt, log_q, temperature, hard=None, hard_ids=None):
    """InfoNCE of unit user vectors against the batch's unit target vectors (row i's target: column i)
    and, optionally, each row's own hard negatives (`hard`: (batch, h, d) unit vectors of `hard_ids`)."""
    f = torch.nn.functional
    logits = users @ positives.T / temperature - log_q[tgt][None, :]
    # The same item as another pair's target is that pair's positive too, not a negative.
    duplicate = (tgt[:, None] == tgt[None, :]) & ~torch.eye(len(tgt), dtype=torch.bool, device=tgt.device)
    logits = logits.masked_fill(duplicate, float("-inf"))
    if hard is not None:  # not sampled by popularity, so no logQ correction; never the target itself
        extra = (users[:, None, :] * hard).sum(dim=2) / temperature
        logits = torch.cat([logits, extra.masked_fill(hard_ids == tgt[:, None], float("-inf"))], dim=1)
    return f.cross_entropy(logits, torch.arange(len(tgt), device=tgt.device))


def _recall(torch, x, contexts: np.ndarray, targets: np.ndarray, weight, k: int, block: int = 1024) -> float:
    """Share of pairs whose target ranks in the top k of the whole catalogue for its context, ties broken
    as every top k breaks them: by item row, the smaller first (a target tied with everything is a hit
    only if fewer than k items come before it, never because nothing scores higher)."""
    if not len(targets):
        return 0.0
    f = torch.nn.functional
    with torch.no_grad():
        catalogue = f.normalize(x @ weight, dim=1)
        hits = 0
        for start in range(0, len(targets), block):
            users = f.normalize(torch.as_tensor(np.asarray(contexts[start : start + block], dtype=np.float32)) @ weight, dim=1)
            scores = users @ catalogue.T
            tgt = torch.as_tensor(targets[start : start + block].astype(np.int64))
            own = scores.gather(1, tgt[:, None])
            # The k-th best score settles most rows at once (5x faster than counting every item above):
            # below the target's own, the target is in; above it, out; equal, the ties decide.
            kth = scores.topk(min(k, scores.shape[1]), dim=1).values[:, -1:]
            hits += int((kth < own).sum())
            tied = (kth == own).squeeze(1)
            if tied.any():
                rows, mine, row_tgt = scores[tied], own[tied], tgt[tied, None]
                before = torch.arange(scores.shape[1])[None, :] < row_tgt
                ahead = (rows > mine).sum(1) + ((rows == mine) & before).sum(1)
                hits += int((ahead < k).sum())
    return hits / len(targets)


def tune_lora(encoder, texts: list[str], contexts, targets: np.ndarray, held_out: np.ndarray, *, rank: int = 8,
              alpha: int = 16, modules: tuple[str, ...] = ("query", "value"), temperature: float = 0.05, epochs: int = 3,
              batch_size: int = 32, lr: float = 1e-4, patience: int = 1, k: int = 10, seed: int = 0,
              progress: bool = False, threads: int | None = 1, full: bool = False, hard: int = 0,
              adalora: AdaloraSchedule | None = None) -> tuple[dict[str, np.ndarray], TuneResult]:
    """The `lora` mode: low-rank adapters (peft) on the attention projections `modules` of a copy of a
    transformers `encoder`'s model, trained by the same InfoNCE. `texts`: the catalogue's (row i, item
    i); `contexts`: a scipy sparse (pairs x items) matrix of profile weights (a user is the normalised
    weighted sum of their items' embeddings, as `InterestScores.profiles` pools them); `targets`,
    `held_out` as in `tune_head`. Returns the adapters' weights by parameter name (the state a part
    keeps; the base model is never changed) and the run's record; `projection` is left empty.
    `full`: the `full` mode: every weight of the copy trains, and all of them are returned. `adalora`:
    the `adalora` mode with this schedule, `rank` its target average rank; each module's rank per held-out
    reading lands in the record's `ranks`. `threads`:
    torch's CPU threads (None: as set). One by default: on shared cores, threads that wait on each
    other cost far more than they gain on a small model; a big model on a free machine wants more.
    """
    import torch

    # Strict on the CPU; on CUDA only a warning where cuBLAS would need CUBLAS_WORKSPACE_CONFIG set.
    with torch_settings(torch, threads, warn_only=True):
        return _tune_lora(torch, encoder, texts, contexts, targets, held_out, rank=rank, alpha=alpha, modules=modules,
                          temperature=temperature, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
                          k=k, seed=seed, progress=progress, full=full, hard=hard, adalora=adalora)


def adalora_ranks(tensors: dict[str, np.ndarray]) -> dict[str, int]:
    """Each adapted module's rank in AdaLoRA weights (parameter name -> values): its singular values
    (`lora_E`) that are not pruned to zero. Keyed by the module's path in the base model."""
    ranks = {}
    for name, value in sorted(tensors.items()):
        if ".lora_E" in name:
            # (a learned state prefixes its names with "adalora:"; parameter names hold no colon)
            module = name.split(":", 1)[-1].split(".lora_E")[0].removeprefix("base_model.model.")
            ranks[module] = int(np.count_nonzero(np.asarray(value)))
    return ranks


def allocated_ranks(model, init_rank: int) -> dict[str, int]:
    """Each module's rank as peft's allocator has set it so far (its rank pattern: which singular values
    it keeps), `init_rank` everywhere before the first allocation. Keyed as `adalora_ranks` keys them."""
    pattern = model.peft_config["default"].rank_pattern or {}
    modules = sorted({name.split(".lora_E")[0].removeprefix("base_model.model.") for name, _ in model.named_parameters()
                      if ".lora_E" in name})
    # peft keys the pattern by the singular values' name inside the base model: "<module>.lora_E.default"
    kept = {module: pattern.get(f"{module}.lora_E.default") for module in modules}
    return {module: init_rank if mask is None else int(sum(mask)) for module, mask in kept.items()}


def _orthogonality(torch, model):
    """peft's AdaLoRA penalty: how far each adapter's A rows and B columns are from orthonormal (mean of
    the Frobenius norms of A A^T - I and B^T B - I)."""
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and (".lora_A" in name or ".lora_B" in name):
            cov = p @ p.T if ".lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean() if terms else 0.0


def _tune_lora(torch, encoder, texts, contexts, targets, held_out, *, rank, alpha, modules, temperature, epochs,
               batch_size, lr, patience, k, seed, progress, full, hard, adalora):
    started = time.perf_counter()
    torch.manual_seed(seed)
    shuffler = torch.Generator().manual_seed(seed)
    train, valid = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    total_steps = epochs * math.ceil(len(train) / batch_size)  # AdaLoRA's schedule is laid out over the whole run
    model = lora_model(encoder, rank, alpha, modules, full, adalora, total_steps)
    model.train()
    token_ids = encoder.token_ids(texts)
    contexts = contexts.tocsr()
    device = next(model.parameters()).device
    tgt_all = torch.as_tensor(targets.astype(np.int64), device=device)
    log_q = torch.log(torch.bincount(tgt_all[train], minlength=len(texts)).double().clamp(min=1) / max(len(train), 1)).float()
    near = None
    if hard:  # mined once in the frozen space
        with torch.no_grad():
            near = hard_negatives(encode_catalogue(torch, model, encoder, token_ids), hard)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(adapters, lr=lr)

    def adapter_state() -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters() if p.requires_grad}

    steps = [0]  # optimiser steps so far: AdaLoRA's clock

    def recall() -> float:
        if adalora is not None:  # read at every held-out reading: how the ranks move as peft prunes them
            result.ranks.append(allocated_ranks(model, adalora.init_rank))
        if not len(valid):
            return 0.0
        model.eval()
        with torch.no_grad():
            catalogue = encode_catalogue(torch, model, encoder, token_ids)
        model.train()
        users = np.asarray(contexts[valid] @ catalogue)
        return _recall(torch, torch.as_tensor(catalogue), users, targets[valid], torch.eye(catalogue.shape[1]), k)

    def batches() -> list:
        order = train[torch.randperm(len(train), generator=shuffler).numpy()]
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    def step(pairs) -> float | None:
        # Each of the batch's items encoded once.
        loss = _batch_loss(torch, pairs, contexts, targets, near, log_q, temperature,
                           lambda rows: encode_with(torch, model, encoder, token_ids, rows), device)
        if loss is None:
            return None
        if adalora is None:
            return _descend(optimizer, loss)
        value = _descend(optimizer, loss + adalora.orth_weight * _orthogonality(torch, model))
        steps[0] += 1
        # After the step, before the next zero_grad: peft scores each singular value by its gradient.
        model.base_model.update_and_allocate(steps[0])
        return value

    result = TuneResult(projection=np.empty((0, 0), dtype=np.float32))
    best = _fit_epochs(result, epochs=epochs, patience=patience, batches=batches, step=step, evaluate=recall,
                       snapshot=adapter_state, desc="full" if full else ("adalora" if adalora else "lora"), progress=progress)
    result.seconds = time.perf_counter() - started
    return best, result


def _batch_loss(torch, pairs: np.ndarray, contexts, targets: np.ndarray, near: np.ndarray | None, log_q, temperature: float,
                vectors_of: Callable, device=None):
    """The in-batch InfoNCE of a batch of (history, next item) pairs (None under 2 pairs), its items'
    vectors made once each by `vectors_of(rows)` (their sorted indices): the offset and lora tunings'
    step, which differ only in how an item becomes a vector."""
    if len(pairs) < 2:
        return None
    weights = contexts[pairs]
    negatives = near[targets[pairs]] if near is not None else np.empty((len(pairs), 0), dtype=np.int64)
    rows = np.unique(np.concatenate([weights.indices, targets[pairs], negatives.ravel()]))
    vectors = vectors_of(rows)

    def of(ids: np.ndarray):  # the vectors of item ids, by their position in `rows`
        return vectors[torch.as_tensor(np.searchsorted(rows, ids), device=device)]

    users = torch.nn.functional.normalize(torch.as_tensor(sp_columns(weights, rows), dtype=torch.float32, device=device) @ vectors, dim=1)
    tgt = torch.as_tensor(targets[pairs].astype(np.int64), device=device)
    hard = (of(negatives), torch.as_tensor(negatives, device=device)) if near is not None else (None, None)
    return _info_nce_vectors(torch, users, of(targets[pairs]), tgt, log_q, temperature, *hard)


def sp_columns(matrix, columns: np.ndarray) -> np.ndarray:
    """The dense columns `columns` (sorted) of a sparse matrix: a batch's weights over its own items."""
    return matrix[:, columns].toarray()
