"""Tuning on behaviour (recengine.learning.tuning): next-item pairs point in time, and the head's InfoNCE
learning a structure the frozen embeddings hide, repeatably."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from recengine.learning.tuning import next_item_pairs, tune_head

GROUPS, PER_GROUP, DIM = 4, 10, 16


def hidden_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Item embeddings where the group (what users follow) is a faint signal in two dimensions under
    loud noise in the rest: the frozen space barely ranks a user's group first; a linear map can."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(GROUPS), PER_GROUP)
    angle = 2 * np.pi * group / GROUPS
    items = np.hstack([0.4 * np.c_[np.cos(angle), np.sin(angle)], rng.normal(size=(len(group), DIM - 2))])
    return items / np.linalg.norm(items, axis=1, keepdims=True), group


def group_pairs(items: np.ndarray, group: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Contexts (the normalised mean of 3 items of a group) and a next item from the same group."""
    rng = np.random.default_rng(seed)
    owners = rng.integers(0, GROUPS, n)
    members = [np.flatnonzero(group == g) for g in range(GROUPS)]
    history = np.stack([rng.choice(members[g], 3, replace=False) for g in owners])
    contexts = items[history].mean(axis=1)
    contexts /= np.linalg.norm(contexts, axis=1, keepdims=True)
    return contexts, np.array([rng.choice(members[g]) for g in owners])


def test_the_head_learns_what_users_take_next_loss_falls_and_held_out_recall_rises():
    items, group = hidden_groups()
    contexts, targets = group_pairs(items, group, 2000, seed=1)
    held_out = np.arange(len(targets)) >= 1600
    result = tune_head(items, contexts, targets, held_out, epochs=6, lr=0.01, batch_size=128, k=10, temperature=0.1, patience=3)
    assert result.losses[-1] < result.losses[0]
    assert result.recalls[result.best_epoch] > result.recalls[0] + 0.2, result.recalls
    assert result.best_epoch > 0 and result.projection.shape == (DIM, DIM) and result.projection.dtype == np.float32
    assert result.pairs_per_second > 0


def test_one_seed_gives_identical_weights_and_another_seed_different_ones():
    items, group = hidden_groups()
    contexts, targets = group_pairs(items, group, 800, seed=2)
    held_out = np.arange(len(targets)) >= 700
    run = lambda seed: tune_head(items, contexts, targets, held_out, epochs=2, lr=0.01, batch_size=64, seed=seed, patience=5)
    first, second, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first.projection, second.projection)
    assert first.losses == second.losses and first.recalls == second.recalls
    assert not np.array_equal(first.projection, other.projection)


def test_no_improvement_keeps_the_identity_and_stops_early():
    # Targets unrelated to contexts: nothing to learn; held-out recall cannot beat chance for long.
    rng = np.random.default_rng(3)
    items = rng.normal(size=(30, 8))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    contexts, targets = items[rng.integers(0, 30, 400)], rng.integers(0, 30, 400)
    held_out = np.zeros(400, dtype=bool)  # no held-out pairs: recall stays 0, the identity is kept
    result = tune_head(items, contexts, targets, held_out, epochs=10, patience=2, lr=0.01)
    assert len(result.losses) == 2 and result.best_epoch == 0
    np.testing.assert_array_equal(result.projection, np.eye(8, dtype=np.float32))


def test_a_duplicate_target_in_the_batch_is_not_a_negative():
    import torch

    from recengine.learning.tuning import _info_nce

    x = torch.eye(3)
    ctx = torch.eye(3)[[0, 0, 1]]
    tgt = torch.tensor([0, 0, 1])
    log_q = torch.zeros(3)
    loss = _info_nce(torch, x, ctx, tgt, log_q, torch.eye(3), temperature=1.0)
    # Rows 0 and 1 (same target): each positive competes with item 1 (cosine 0) only, never with its
    # duplicate (cosine 1). Row 2 competes with both other targets (item 0, twice, cosine 0).
    expected = (2 * np.log(1 + 1 / np.e) + np.log(1 + 2 / np.e)) / 3
    assert abs(float(loss) - expected) < 1e-6
    # logQ: a target seen more often is discounted as a negative (and as a positive), which moves the loss.
    skewed = _info_nce(torch, x, ctx, tgt, torch.log(torch.tensor([2 / 3, 1e-9, 1 / 3])), torch.eye(3), 1.0)
    assert abs(float(skewed) - expected) > 1e-3


def test_next_item_pairs_take_the_context_strictly_before_each_event_capped_and_seeded():
    t0 = datetime(2024, 1, 1)
    rows = [(1, 10, t0), (1, 11, t0 + timedelta(hours=1)), (1, 12, t0 + timedelta(hours=1)), (1, 13, t0 + timedelta(hours=2)),
            (2, 20, t0), (3, 30, t0 + timedelta(hours=5)), (3, 31, t0 + timedelta(hours=6))]
    events = pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("ms")}, orient="row")
    pairs, history = next_item_pairs(events, context=2)
    # A user's first moment has no context; events sharing a time do not see each other.
    assert pairs.select("user_id", "item_id").rows() == [(1, 11), (1, 12), (1, 13), (3, 31)]
    contexts = history.sort("_profile", "h_back").group_by("_profile", maintain_order=True).agg("h_item")
    assert contexts["h_item"].to_list() == [[10], [10], [12, 11], [30]] or contexts["h_item"].to_list() == [[10], [10], [11, 12], [30]]
    capped, _ = next_item_pairs(events, context=2, max_pairs=2, seed=7)
    again, _ = next_item_pairs(events, context=2, max_pairs=2, seed=7)
    assert capped.height == 2 and capped.equals(again)
    assert capped["timestamp"].is_sorted()


def test_held_out_recall_breaks_ties_by_item_row_so_equal_scores_are_not_all_hits():
    import torch

    from recengine.learning.tuning import _recall

    items = np.tile([1.0, 0.0], (30, 1))  # every item the same vector: every score ties
    contexts = np.tile([1.0, 0.0], (30, 1))
    targets = np.arange(30)
    # Ties go to the smaller row: only targets 0..9 are in a top 10 (it was 1.0, every tie a hit).
    assert _recall(torch, torch.as_tensor(items, dtype=torch.float32), contexts, targets, torch.eye(2), k=10) == 10 / 30
    distinct = np.c_[np.cos(np.linspace(0, 1, 30)), np.sin(np.linspace(0, 1, 30))]
    # Each context is its own target's vector: the target scores highest, always a hit.
    assert _recall(torch, torch.as_tensor(distinct, dtype=torch.float32), distinct, targets, torch.eye(2), k=1) == 1.0
