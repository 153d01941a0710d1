"""tuned_interest (#15): a text space tuned on what users took next, as a learned part: it learns the
synthetic users' clusters, only from events before the window's end, and the model carries it."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from recengine import Ranker
from recengine.core.data import Dataset
from recengine.errors import ConfigError
from recengine.parts.context import FeatureContext, compute_features, fit_learned
from recengine.features.interest import InterestScores
from recengine.features.tuned import TunedInterest
from recengine.parts.featureset import FeatureSet
from recengine.learning.training import train

from conftest import DEVICE
from synthetic import THEMES, WORDS, catalogue, interactions


def part(tiny_bert, **extra) -> TunedInterest:
    params = {"encoder_params": {"model": str(tiny_bert), "device": DEVICE}, "recent": 5, "history": 10,
              "epochs": 4, "batch_size": 64, "lr": 0.01, "temperature": 0.1, **extra}
    return TunedInterest(**params)


def noisy_catalogue(n_items: int = 60, seed: int = 0) -> pl.DataFrame:
    """Titles of a theme word and three random words: in the frozen space the noise words weigh three
    times the theme, which is what users follow."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame({"item_id": np.arange(n_items),
                         "title": [" ".join([THEMES[i % len(THEMES)], *rng.choice(WORDS, 3)]) for i in range(n_items)]})


def theme_events(n_users: int = 120, per_user: int = 10, n_items: int = 60, seed: int = 0) -> pl.DataFrame:
    """Each user takes items of one theme, an hour apart."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        start = datetime(2024, 1, 1) + timedelta(days=float(rng.uniform(0, 100)))
        own = rng.permutation(np.arange(user % len(THEMES), n_items, len(THEMES)))[:per_user]
        rows += [(user, int(item), start + timedelta(hours=step)) for step, item in enumerate(own)]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("ms")}, orient="row")


def test_tuning_learns_that_users_follow_the_theme_and_the_head_moves_the_space(tiny_bert):
    tuned = part(tiny_bert, lr=0.05, recall_k=5)
    state = tuned.fit(theme_events(), noisy_catalogue())
    # Users who take "space ..." titles take "space ..." titles next: held-out recall@5 rises well
    # above the frozen space's (0.16 here).
    assert state["recall"].max() > state["recall"][0] + 0.1, state["recall"]
    assert state["loss"][-1] < state["loss"][0]
    assert state["projection"].dtype == np.int32 and not np.array_equal(state["projection"], np.eye(32) * 2**16)
    again = tuned.fit(theme_events(), noisy_catalogue())
    assert all(np.array_equal(state[name], again[name]) for name in state)  # one seed: the same bytes


def events_and_boundary():
    events = Dataset(theme_events().lazy()).events.collect()
    return events, events["timestamp"].quantile(0.5, interpolation="lower")


def features(tiny_bert, events: pl.DataFrame, requests: pl.DataFrame, boundary) -> pl.DataFrame:
    tuned = part(tiny_bert, lr=0.05, recall_k=5)
    frozen = InterestScores(encoder_params=tuned.encoder_params, recent=5, history=10)
    context = FeatureContext.from_frames(events, noisy_catalogue().lazy())
    fit_learned([tuned, frozen], context, boundary)
    return compute_features(requests, [tuned, frozen], context).sort("user_id", "timestamp", "item_id")


def test_only_events_before_the_boundary_shape_the_tuned_features_and_earlier_requests_get_null(tiny_bert):
    events, boundary = events_and_boundary()
    # An hour after each user's last event: the users active after the boundary, each with a history.
    users = events.filter(pl.col("timestamp") >= boundary).group_by("user_id").agg(pl.col("timestamp").max() + timedelta(hours=1))
    users = users.sort("user_id").head(12)
    requests = users.join(pl.DataFrame({"item_id": [0, 1, 6, 7, 30]}), how="cross")
    early = requests.with_columns(pl.col("timestamp") - timedelta(days=400))
    before = features(tiny_bert, events, pl.concat([requests, early]), boundary)
    later = before.filter(pl.col("timestamp") >= boundary)
    assert later["tuned_title_mean"].drop_nulls().len() == later.height
    assert before.filter(pl.col("timestamp") < boundary)[["tuned_title_mean", "tuned_title_max"]].null_count().sum_horizontal().item() \
        == 2 * early.height
    # Tuned, not frozen: the head changed the cosines.
    assert not np.allclose(later["tuned_title_mean"].to_numpy(), later["interest_title_mean"].to_numpy())
    # New users pairing clusters, after every request: only a head tuned after the boundary could see them.
    late = pl.DataFrame([(10_000 + u, item, events["timestamp"].max() + timedelta(days=1 + step))
                         for u in range(40) for step, item in enumerate((u % 6, (u + 1) % 6, u % 6 + 6, (u + 1) % 6 + 6))],
                        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Datetime("ms")}, orient="row")
    with_late = features(tiny_bert, pl.concat([events, late]), requests, boundary)
    assert later.equals(with_late)
    shifted = late.with_columns(pl.col("timestamp") - (late["timestamp"].max() - events["timestamp"].min()) - timedelta(days=10))
    assert not later.equals(features(tiny_bert, pl.concat([shifted, events]), requests, boundary))


def test_a_trained_model_carries_the_head_and_ranks_the_same_from_the_saved_state(tiny_bert, tmp_path):
    encoder = {"model": str(tiny_bert), "device": DEVICE}
    fs = FeatureSet.from_dict({
        "name": "tuned",
        "candidates": {"popular": {"k": 30}},
        "features": {"tuned_interest": {"encoder_params": encoder, "recent": 5, "history": 10, "epochs": 2, "batch_size": 64},
                     "item_popularity": {"windows_days": [7]}},
        "labels": {"samples_per_user": 2, "learned_fraction": 0.5},
        "ranker": {"num_boost_round": 20, "early_stopping_rounds": 5, "min_data_in_leaf": 10},
    })
    events, items = interactions(n_users=60), catalogue()
    model = train(Dataset(events.lazy(), items.lazy()), fs, progress=False, say=lambda _: None).model
    assert set(model.learned["features.tuned_interest"]) == {"projection", "recall", "loss"}
    candidates = items["item_id"].to_list()[:40]
    saved, refit = Ranker(model, events, items, learned="saved"), Ranker(model, events, items)
    for user in (0, 7):
        assert saved.rank(user, candidates) == refit.rank(user, candidates)


def test_an_unknown_mode_and_bad_settings_stop_at_load():
    with pytest.raises(ConfigError, match="give one of head, lora, adalora, full, offset"):
        TunedInterest(mode="qlora")
    with pytest.raises(ConfigError, match="holdout"):
        TunedInterest(holdout=1.5)
    with pytest.raises(ConfigError, match="no items table"):
        TunedInterest().fit(interactions(n_users=5), None)


def test_lora_trains_only_the_adapters_and_moves_the_embeddings(tiny_bert):
    pytest.importorskip("peft")
    import scipy.sparse as sp
    import torch

    from recengine.parts.encoders import create_encoder
    from recengine.features.interest import item_embeddings
    from recengine.learning.tuning import encode_with, lora_model, next_item_pairs, tune_lora

    encoder = create_encoder("transformers", {"model": str(tiny_bert), "device": DEVICE})
    items = noisy_catalogue()
    frozen = item_embeddings(items.lazy(), "title", encoder)
    pairs, history = next_item_pairs(theme_events(n_users=60), context=5, max_pairs=800)
    seen = history.join(frozen.index(), left_on="h_item", right_on="item_id")
    contexts = sp.csr_matrix((np.ones(seen.height), (seen["_profile"].to_numpy(), seen["_idx"].to_numpy())),
                             shape=(pairs.height, len(frozen.item_ids)))
    targets = pairs.join(frozen.index(), on="item_id", how="left", maintain_order="left")["_idx"].to_numpy()
    base_weights = {name: value.clone() for name, value in encoder._load().state_dict().items()}
    adapters, result = tune_lora(encoder, items["title"].to_list(), contexts, targets,
                                 np.arange(pairs.height) >= pairs.height * 0.8, epochs=4, batch_size=32, lr=5e-3, patience=4, k=5)
    assert max(result.recalls) > result.recalls[0] + 0.05 and result.best_epoch > 0, (result.recalls, result.losses)
    assert adapters and all("lora_" in name for name in adapters)
    assert any(np.abs(value).max() > 0 for name, value in adapters.items() if "lora_B" in name)  # B starts at zero
    assert result.losses[-1] < result.losses[0] and result.pairs_per_second > 0
    again, _ = tune_lora(encoder, items["title"].to_list(), contexts, targets, np.arange(pairs.height) >= pairs.height * 0.8,
                         epochs=result.best_epoch, batch_size=32, lr=5e-3, patience=4, k=5)
    assert all(np.array_equal(adapters[name], again[name]) for name in adapters)  # one seed: the same adapters
    after = encoder._load().state_dict()
    assert all(torch.equal(base_weights[name], after[name]) for name in base_weights)  # the encoder's model untouched
    # The adapters, loaded into a fresh copy, move the catalogue's embeddings away from the frozen ones.
    model = lora_model(encoder)
    fresh = {name: p for name, p in model.named_parameters()}
    with torch.no_grad():
        untuned = encode_with(torch, model.eval(), encoder, encoder.token_ids(items["title"].to_list()), np.arange(items.height)).float().cpu().numpy()
        for name, value in adapters.items():
            fresh[name].copy_(torch.as_tensor(value))
        tuned = encode_with(torch, model, encoder, encoder.token_ids(items["title"].to_list()), np.arange(items.height)).float().cpu().numpy()
    # bf16/fp16 (CUDA's default) rounds a padded batch's sums differently: a looser match, a larger move.
    atol = 1e-4 if encoder.precision == "fp32" else 2e-2
    np.testing.assert_allclose(untuned, frozen.matrix, atol=atol)
    assert np.abs(tuned - frozen.matrix).max() > 10 * atol, np.abs(tuned - frozen.matrix).max()


@pytest.mark.parametrize("mode", ["lora", "adalora", "full"])
def test_lora_and_full_modes_pass_the_part_contract_and_move_the_features(tiny_bert, mode):
    pytest.importorskip("peft")
    from recengine.parts.contract import check_extractor

    params = {"encoder_params": {"model": str(tiny_bert), "device": DEVICE}, "mode": mode, "recent": 3, "history": 8,
              "epochs": 2, "batch_size": 32, "lr": 0.03 if mode == "adalora" else 5e-3, "patience": 2, "seed": 1}
    check_extractor(TunedInterest, params)  # (adalora's singular values start at zero: it wants a larger step)
    events, boundary = events_and_boundary()
    users = events.filter(pl.col("timestamp") >= boundary).group_by("user_id").agg(pl.col("timestamp").max() + timedelta(hours=1))
    requests = users.sort("user_id").head(6).join(pl.DataFrame({"item_id": [0, 1, 6, 7]}), how="cross")
    tuned = TunedInterest(**{**params, "recent": 5, "history": 10, "epochs": 3})
    frozen = InterestScores(encoder_params=tuned.encoder_params, recent=5, history=10)
    context = FeatureContext.from_frames(events, noisy_catalogue().lazy())
    fit_learned([tuned, frozen], context, boundary)
    prefix = {"lora": "lora:", "adalora": "adalora:", "full": "weights:"}[mode]
    assert any(name.startswith(prefix) for name in context.learned["TunedInterest"])
    if mode == "full":  # every weight of the model, none of them an adapter's
        assert not any("lora_" in name for name in context.learned["TunedInterest"])
        assert "weights:embeddings.word_embeddings.weight" in context.learned["TunedInterest"]
    rows = compute_features(requests, [tuned, frozen], context)
    assert rows["tuned_title_mean"].drop_nulls().len() == rows.height
    assert not np.allclose(rows["tuned_title_mean"].to_numpy(), rows["interest_title_mean"].to_numpy())


def test_the_tuned_source_proposes_the_users_theme_shares_the_extractors_fit_and_nothing_before_the_boundary(tiny_bert):
    from recengine.parts.candidates import generate
    from recengine.features.interest import EmbeddingSource
    from recengine.features.tuned import TunedEmbeddingSource

    events, boundary = events_and_boundary()
    settings = {"encoder_params": {"model": str(tiny_bert), "device": DEVICE}, "recent": 5, "history": 10,
                "epochs": 4, "batch_size": 64, "lr": 0.05, "temperature": 0.1, "recall_k": 5}
    extractor, source = TunedInterest(**settings), TunedEmbeddingSource(k=6, **settings)
    frozen = EmbeddingSource(k=6, encoder_params=settings["encoder_params"], history=10)
    extractor.key, source.key, frozen.name = "features.tuned_interest", "candidates.tuned_embedding", "embedding"
    source.name = "tuned_embedding"
    context = FeatureContext.from_frames(events, noisy_catalogue().lazy())
    fit_learned([extractor, source, frozen], context, boundary)
    assert context.learned["candidates.tuned_embedding"] is context.learned["features.tuned_interest"]  # one fit
    users = events.filter(pl.col("timestamp") >= boundary).group_by("user_id").agg(pl.col("timestamp").max() + timedelta(hours=1))
    just_before = users.sort("user_id").with_columns(pl.lit(boundary - timedelta(hours=1)).cast(pl.Datetime("ms")).alias("timestamp"))
    requests = pl.concat([users.sort("user_id"), just_before])
    rows = generate(requests, [source, frozen], context, exclude_seen=False)

    def on_theme(column: str) -> float:  # share of a source's proposals in the user's own theme
        found = rows.filter(pl.col(column).is_not_null())
        return ((found["item_id"] % len(THEMES)) == (found["user_id"] % len(THEMES))).mean()

    assert on_theme("cand_tuned_embedding_score") > on_theme("cand_embedding_score") + 0.1  # here 1.0 against 0.86
    early = rows.filter(pl.col("timestamp") < boundary)
    assert early["cand_tuned_embedding_score"].drop_nulls().len() == 0  # a tuning after the request is never read
    assert early["cand_embedding_score"].drop_nulls().len() > 0


def test_hard_negatives_are_each_items_nearest_others_and_tuning_with_them_learns_the_theme(tiny_bert):
    from recengine.learning.tuning import hard_negatives

    rng = np.random.default_rng(0)
    items = np.round(rng.normal(size=(50, 8)) * 4) / 4  # coarse values: many tied cosines
    items[7] = items[3]  # a duplicate: each is the other's nearest, itself never
    items /= np.linalg.norm(items, axis=1, keepdims=True)  # unit vectors, as embeddings are
    near = hard_negatives(items, 4, block=16)
    for row in range(len(items)):
        sims = np.round(items @ items[row], 9)
        sims[row] = -np.inf
        expected = np.lexsort((np.arange(len(items)), -sims))[:4]  # best first, ties to the smaller row
        assert near[row].tolist() == expected.tolist(), row
    assert near[3][0] == 7 and near[7][0] == 3
    tuned = part(tiny_bert, lr=0.05, recall_k=5, hard_negatives=3)
    state = tuned.fit(theme_events(), noisy_catalogue())
    assert state["recall"].max() > state["recall"][0] + 0.1 and state["loss"][-1] < state["loss"][0]
    again = tuned.fit(theme_events(), noisy_catalogue())
    assert np.array_equal(state["projection"], again["projection"])
    plain = part(tiny_bert, lr=0.05, recall_k=5).fit(theme_events(), noisy_catalogue())
    assert not np.array_equal(state["projection"], plain["projection"])  # the extra negatives changed the tuning
    with pytest.raises(ConfigError, match="hard_negatives"):
        TunedInterest(hard_negatives=-1)


def test_the_offset_mode_moves_only_warm_items_within_its_bound_and_learns_the_theme(tiny_bert):
    # "Let It Go? Not Quite": a bounded offset per warm item on the frozen vectors; an item no pair
    # holds (items 60-69 here, never taken) keeps its frozen vector to the bit.
    from recengine.features.tuned import SCALE, offset_items

    catalogue_ = noisy_catalogue(n_items=70)
    tuned = part(tiny_bert, mode="offset", lr=0.05, recall_k=5, max_offset=0.4)
    state = tuned.fit(theme_events(), catalogue_)
    assert state["recall"].max() > state["recall"][0] + 0.1, state["recall"]
    assert set(state["offset_ids"].tolist()) <= set(range(60)) and len(state["offset_ids"]) > 50
    assert state["offsets"].dtype == np.int32
    assert np.linalg.norm(state["offsets"] / SCALE, axis=1).max() <= 0.4 + 1e-4
    again = tuned.fit(theme_events(), catalogue_)
    assert all(np.array_equal(state[name], again[name]) for name in state)  # one seed: the same bytes
    frozen = InterestScores(encoder_params=tuned.encoder_params).embeddings(FeatureContext.from_frames(
        theme_events().lazy(), catalogue_.lazy()), "title")
    moved = offset_items(frozen, state)
    cold = frozen.item_ids.is_in(list(range(60, 70))).to_numpy()
    np.testing.assert_array_equal(moved[cold], frozen.matrix[cold])
    assert not np.allclose(moved[~cold], frozen.matrix[~cold])
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-4)


def test_the_offset_mode_passes_the_part_contract_and_a_model_ranks_the_same_from_its_saved_offsets(tiny_bert, tmp_path):
    from recengine.parts.adapters import AdaptedEncoder, load_adapter, save_adapter
    from recengine.parts.contract import check_extractor
    from recengine.parts.encoders import create_encoder

    encoder = {"model": str(tiny_bert), "device": DEVICE}
    check_extractor(TunedInterest, {"encoder_params": encoder, "mode": "offset", "recent": 3, "history": 8, "epochs": 2,
                                    "batch_size": 32, "lr": 0.01, "seed": 1})
    fs = FeatureSet.from_dict({
        "name": "offset",
        "candidates": {"popular": {"k": 30}},
        "features": {"tuned_interest": {"encoder_params": encoder, "mode": "offset", "recent": 5, "history": 10,
                                        "epochs": 2, "batch_size": 64},
                     "item_popularity": {"windows_days": [7]}},
        "labels": {"samples_per_user": 2, "learned_fraction": 0.5},
        "ranker": {"num_boost_round": 20, "early_stopping_rounds": 5, "min_data_in_leaf": 10},
    })
    events, items = interactions(n_users=60), catalogue()
    model = train(Dataset(events.lazy(), items.lazy()), fs, progress=False, say=lambda _: None).model
    state = model.learned["features.tuned_interest"]
    assert set(state) == {"offset_ids", "offsets", "recall", "loss"}
    candidates = items["item_id"].to_list()[:40]
    saved, refit = Ranker(model, events, items, learned="saved"), Ranker(model, events, items)
    for user in (0, 7):
        assert saved.rank(user, candidates) == refit.rank(user, candidates)
    # Its adapter file records the tuning (ids in the metadata) but is no encoder: it moves ids, not texts.
    tuned = fs.build_extractors()[0]
    written = save_adapter(tmp_path / "offset.safetensors", tuned.adapter(state, datetime(2024, 1, 1)))
    adapter = load_adapter(str(written))
    assert adapter.mode == "offset" and adapter.extra["offset_ids"].startswith("[")
    with pytest.raises(ConfigError, match="offset adapter moves items by their ids"):
        AdaptedEncoder.from_adapter(create_encoder("transformers", encoder), adapter, str(written))
