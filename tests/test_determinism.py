"""A ranking is a pure function of (model, data, request): the same on every path, every load and
every process, even where many items tie (duplicate titles embed to identical vectors)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl

from recengine import Ranker
from recengine.parts.candidates import generate
from recengine.core.data import Dataset
from recengine.parts.encoders import EmbeddingCache
from recengine.parts.context import FeatureContext
from recengine.features.interest import EmbeddingSource
from recengine.core.topk import order, top_k, top_k_dense

from conftest import DEVICE
from synthetic import THEMES, catalogue, interactions


def duplicated_catalogue(n_items: int = 120) -> pl.DataFrame:
    """A third of the titles repeat another item's exactly (editions, variants)."""
    items = catalogue(n_items)
    copies = [f"{THEMES[i % len(THEMES)]} story" for i in range(n_items)]
    return items.with_columns(pl.when(pl.col("item_id") % 3 == 0).then(pl.Series(copies)).otherwise(pl.col("title")).alias("title"))


def test_top_k_breaks_ties_by_item_id_after_rounding():
    rows = pl.DataFrame({"q": [1] * 5, "item_id": [5, 3, 9, 1, 7], "score": [0.5, 0.5 + 1e-12, 0.9, 0.5, None]})
    ranked = top_k(rows, ["q"], 4)
    assert ranked["item_id"].to_list() == [9, 1, 3, 5]  # 0.5 and 0.5 + 1e-12 tie: smaller id first; null last
    assert ranked["rank"].to_list() == [1, 2, 3, 4]
    assert order(np.array([0.2, 0.7, 0.2 - 1e-13, 0.7]), [4, 8, 2, 1]).tolist() == [3, 1, 2, 0]


def test_dense_top_k_keeps_k_per_row_ties_by_item_id():
    scores = np.array([[0.1, 0.3, 0.3, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0, 0.0]])
    item_rank = np.array([4, 3, 0, 1, 2])  # column 2 holds the smallest item id
    rows, cols = top_k_dense(scores, 2, item_rank)
    assert rows.tolist() == [0, 0, 1, 1]
    assert cols.tolist() == [2, 3, 2, 3]


def test_embedding_candidates_do_not_depend_on_which_requests_share_a_product(tiny_bert):
    """Batch (all users in one product) and one user at a time propose the same items, in the same order."""
    events, items = interactions(n_users=60), duplicated_catalogue()
    dataset = Dataset(events.lazy(), items.lazy())
    context = FeatureContext.from_frames(dataset.events, dataset.items)
    source = EmbeddingSource(k=25, encoder_params={"model": str(tiny_bert), "device": DEVICE})
    at = events["timestamp"].max() + timedelta(seconds=1)
    users = pl.DataFrame({"user_id": sorted(events["user_id"].unique().to_list())}).with_columns(pl.lit(at).alias("timestamp"))
    together = generate(users, [source], context, exclude_seen=False)
    alone = pl.concat([generate(users[i : i + 1], [source], context, exclude_seen=False) for i in range(0, users.height, 7)])
    reversed_ = generate(users.reverse(), [source], context, exclude_seen=False)
    key = ["user_id", "item_id"]
    assert together.sort(key).equals(reversed_.sort(key))
    assert together.filter(pl.col("user_id").is_in(alone["user_id"].unique().implode())).sort(key).equals(alone.sort(key))


def test_serving_equals_batch_and_two_loads_agree_with_duplicate_titles(tiny_bert, tmp_path):
    from test_ranker import batch_features, full_feature_set

    from recengine.learning.training import train

    events, items = interactions(n_users=60), duplicated_catalogue()
    cache = EmbeddingCache(tmp_path / "cache")
    result = train(Dataset(events.lazy(), items.lazy()), full_feature_set(tiny_bert), cache=cache, progress=False, say=lambda _: None)
    folder = result.model.save(tmp_path / "model")
    first, second = (Ranker.load(folder, events, items, cache=cache) for _ in range(2))
    candidates = items["item_id"].to_list()
    for user in (0, 7, 31, 59, 999):
        served = first._state.feature_matrix(user, candidates)
        assert np.array_equal(served, second._state.feature_matrix(user, candidates), equal_nan=True)
        batch = batch_features(first, user, candidates, first.at)
        assert np.array_equal(served, batch, equal_nan=True), f"user {user}: serving and batch features differ"
        assert first.rank(user, candidates) == second.rank(user, candidates)


TRAIN_AND_RANK = """
import sys
from pathlib import Path
import polars as pl
from recengine.core.data import Dataset
from recengine.parts.encoders import EmbeddingCache
from recengine.parts.context import FeatureContext
from recengine.learning.model import RankerModel
from recengine.learning.training import train
sys.path.insert(0, {tests!r})
from test_determinism import duplicated_catalogue
from test_ranker import full_feature_set
from synthetic import interactions

out = Path(sys.argv[1])
events, items = interactions(n_users=60), duplicated_catalogue()
cache = EmbeddingCache(out / "cache")
result = train(Dataset(events.lazy(), items.lazy()), full_feature_set({bert!r}), cache=cache, progress=False, say=lambda _: None)
result.model.save(out / "model")
result.train.rows.write_parquet(out / "train-rows.parquet")
model = RankerModel.load(out / "model")
context = FeatureContext.from_frames(events, items, cache=cache)
requests = events.group_by("user_id").agg(pl.col("timestamp").max()).sort("user_id")
model.recommend(requests, context, k=10).write_parquet(out / "recommendations.parquet")
"""


def test_two_fresh_processes_train_and_rank_byte_identically(tiny_bert, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(TRAIN_AND_RANK.format(tests=str(Path(__file__).parent), bert=str(tiny_bert)))
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONHASHSEED": name == "a" and "1" or "2"})
        assert done.returncode == 0, done.stderr[-3000:]
        files = ["model/model.txt", "train-rows.parquet", "recommendations.parquet"]
        digests.append({f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1]
    assert pl.read_parquet(tmp_path / "a" / "recommendations.parquet").height > 0
