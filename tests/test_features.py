"""Point-in-time features, interest scores, candidates and metrics on small logs where the truth is known."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recengine.parts.candidates import generate
from recengine.parts.context import FeatureContext, compute_features
from recengine.features.activity import UserActivity
from recengine.features.attributes import ItemAttribute
from recengine.features.categories import CategoryAffinity
from recengine.features.covisitation import (Covisitation, CovisitationSource, both_ways, last_pair, pair_table,
                                             pair_totals)
from recengine.core.grid import on_grid
from recengine.features.interest import EmbeddingSource, InterestScores
from recengine.features.popularity import (
    ItemAge, ItemCTR, ItemPopularity, ItemTrend, ItemValue, PopularSource, decayed_counts,
)
from recengine.core.metrics import evaluate

T0 = datetime(2024, 1, 10)
DAY = timedelta(days=1)
ITEMS = pl.DataFrame({
    "item_id": [1, 2, 3, 4, 5],
    "title": ["star war", "space robot war", "love story", "paris kiss love", "dark future"],
    "genres": ["scifi|action", "scifi", "romance", "romance|comedy", "scifi|drama"],
    "year": [1977, 1999, 1942, 2001, 2015],
})


def log(rows):
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "value"], orient="row")


BASE = log([
    (1, 1, T0 - 5 * DAY, 4.0), (1, 2, T0 - 3 * DAY, 5.0), (1, 3, T0 - 1 * DAY, 2.0),
    (2, 1, T0 - 20 * DAY, 3.0), (2, 3, T0 - 2 * DAY, 5.0), (2, 4, T0 - 2 * DAY, 4.0),
    (3, 5, T0 - 400 * DAY, 1.0),
])
REQUESTS = pl.DataFrame({"user_id": [1, 1, 2, 9, 1], "item_id": [2, 4, 1, 1, 99], "timestamp": [T0, T0, T0, T0, T0]})


def context(events, **kwargs):
    return FeatureContext.from_frames(events, ITEMS, **kwargs)


def extractors(tiny_bert):
    return [
        ItemPopularity(windows_days=(1, 7, 30), half_lives_days=(7,)), ItemTrend(3, 30), ItemAge(), ItemValue(),
        ItemCTR(), UserActivity(), CategoryAffinity(), Covisitation(window=2, recent=3),
        Covisitation(window=2, recent=3, directed=True), ItemAttribute(["year"], recent=2),
        InterestScores(encoder_params={"model": str(tiny_bert), "device": "cpu"}, fields=["title", "genres"], recent=2),
    ]


def test_events_at_or_after_t_change_no_feature(tiny_bert):
    # The leakage test: copy the log, add events exactly at t and after t for the requested users and
    # items (and clicks for CTR); every feature of every request at t must stay the same.
    future = log([(u, i, T0 + d * DAY, 5.0) for u in (1, 2, 9) for i in (1, 2, 3, 4, 99) for d in (0, 1, 30)])
    before = compute_features(REQUESTS, extractors(tiny_bert), context(BASE))
    after = compute_features(REQUESTS, extractors(tiny_bert), context(pl.concat([BASE, future])))
    assert before.columns == after.columns
    assert len(before.columns) == 3 + sum(len(e.columns) for e in extractors(tiny_bert))
    for column in before.columns:
        assert before[column].to_list() == after[column].to_list(), column


def test_item_attribute_gap_to_recent_items():
    out = compute_features(REQUESTS, [ItemAttribute(["year"], recent=2)], context(BASE))
    # User 1's last two items before T0 are 2 (1999) and 3 (1942): mean 1970.5.
    assert out["item_year"].to_list() == [1999, 2001, 1977, 1977, None]
    assert out["user_gap_year"].to_list()[:2] == [28.5, 30.5]
    assert out["user_gap_year"][3] is None  # unknown user: no history


def test_popularity_windows_and_decay_match_a_direct_count():
    features = compute_features(REQUESTS, [ItemPopularity(windows_days=(1, 4, 30), half_lives_days=(7,))], context(BASE))
    item1 = features.row(2, named=True)  # item 1: events 5 and 20 days before t
    assert (item1["item_count_all"], item1["item_count_4d"], item1["item_count_30d"]) == (2, 0, 2)
    expected = 0.5 ** (5 / 7) + 0.5 ** (20 / 7)
    assert item1["item_decay_7d"] == pytest.approx(expected)


def test_decay_spans_decades_without_overflow():
    events = pl.DataFrame({"item_id": [1] * 3, "timestamp": [datetime(1990, 1, 1), datetime(2010, 1, 1), datetime(2024, 1, 1)]})
    requests = pl.DataFrame({"_row": [0, 1], "item_id": [1, 1], "timestamp": [datetime(2010, 1, 2), datetime(2024, 1, 2)]})
    out = decayed_counts(requests.lazy(), events.lazy(), "item_id", 1.0).sort("_row").collect()["decayed"].to_list()
    assert out == pytest.approx([0.5, 0.5], rel=1e-9)


def test_user_activity_and_unknown_user():
    features = compute_features(REQUESTS, [UserActivity()], context(BASE))
    user1, unknown = features.row(0, named=True), features.row(3, named=True)
    assert user1["user_count"] == 3 and user1["user_days_since_last"] == pytest.approx(1.0)
    assert user1["user_days_active"] == pytest.approx(5.0) and user1["user_value_mean"] == pytest.approx(11 / 3)
    assert unknown["user_count"] == 0 and unknown["user_days_since_last"] is None


def test_category_affinity_is_the_share_of_history_in_the_items_categories():
    features = compute_features(REQUESTS, [CategoryAffinity()], context(BASE))
    # user 1 saw scifi twice, action once, romance once out of 3; item 4 is romance|comedy.
    row = features.row(1, named=True)
    assert row["affinity_genres_mean"] == pytest.approx((1 / 3 + 0) / 2) and row["affinity_genres_max"] == pytest.approx(1 / 3)


def test_running_totals_equal_the_whole_time_indexed_table_to_the_bit():
    # The context keeps a cursor per lane (a row per key) instead of a row per key and event time. Read
    # in chunks in time order (stepping), with shared times (snapshots), backwards (starting over), in
    # two lanes, or with every request at once, it gives `cumulative`'s totals, float sums included.
    from recengine.core.pit import RunningTotals, cumulative, totals_before

    rng = np.random.default_rng(4)
    n = 2_000
    # Values in half stars, as ratings: a time's sum is exact whichever order its events come in.
    events = pl.DataFrame({"item_id": rng.integers(0, 30, n), "value": rng.integers(1, 11, n) / 2,
                           "timestamp": [T0 + timedelta(hours=int(h)) for h in rng.integers(0, 24 * 60, n)]})
    sums = {"n": pl.len(), "v": pl.col("value").sum()}
    whole = cumulative(events.lazy(), "item_id", sums).collect().lazy()
    requests = pl.DataFrame({"item_id": rng.integers(0, 32, 600),  # items 30, 31: no events
                             "timestamp": [T0 + timedelta(hours=int(h)) for h in np.sort(rng.integers(-5, 24 * 62, 600))]})
    requests = requests.with_columns(pl.when(pl.int_range(600) % 7 < 3).then(pl.lit(T0 + DAY * 20)).otherwise(
        pl.col("timestamp")).alias("timestamp")).with_row_index("_row")  # many share one time
    running = RunningTotals(events.sample(fraction=1.0, shuffle=True, seed=0), "item_id", sums)  # not in time order: sorted
    week_ago = pl.col("timestamp") - DAY * 7
    expected = {lane: totals_before(requests.lazy(), whole, "item_id", ["n", "v"], at=at).collect().sort("_row")
                for lane, at in ((None, None), (7, week_ago))}
    ordered = requests.sort("timestamp", "_row")
    for chunks in ([ordered.slice(i, 50) for i in range(0, 600, 50)],  # time order: the cursor steps
                   [ordered.slice(i, 200) for i in range(400, -1, -200)],  # backwards: each starts over
                   [ordered.filter(pl.col("timestamp") == T0 + DAY * 20)] * 2,  # one shared time, twice
                   [requests]):
        for lane, at in ((None, None), (7, week_ago)):
            for chunk in chunks:
                got = totals_before(chunk.lazy(), running, "item_id", ["n", "v"], at=at, lane=lane).collect().sort("_row")
                assert got.equals(expected[lane].join(chunk, on="_row", how="semi")), (lane, len(chunks))
    assert len(running._cursors[None][1]) <= 30  # what is kept: a row per item, not per event time


def test_covisitation_source_scores_the_same_a_block_of_requests_at_a_time(monkeypatch):
    # Requests after the last pair are scored by blocks of SCORE_REQUESTS (memory follows the block).
    from recengine.features import covisitation

    rng = np.random.default_rng(5)
    events = pl.DataFrame({"user_id": rng.integers(0, 40, 800), "item_id": rng.integers(0, 60, 800),
                           "timestamp": [T0 + DAY * int(d) for d in rng.integers(0, 50, 800)]})
    requests = pl.DataFrame({"user_id": np.arange(40), "timestamp": [T0 + DAY * 60] * 40})
    source = CovisitationSource(k=15, window=3, recent=5)
    whole = generate(requests, [source], FeatureContext.from_frames(events.lazy()), exclude_seen=False)
    monkeypatch.setattr(covisitation, "SCORE_REQUESTS", 3)
    blocks = generate(requests, [source], FeatureContext.from_frames(events.lazy()), exclude_seen=False)
    assert whole.height > 40 * 10 and blocks.equals(whole)


def test_covisitation_counts_pairs_seen_before_t():
    features = compute_features(REQUESTS, [Covisitation(window=1, recent=3)], context(BASE))
    # user 2 at t has recent items 3, 4, 1; item 1 was next to 3 in user 2's log (1 then 3): once.
    assert features.row(2, named=True)["covis_w1_r3_sum"] == 1


def test_covisitation_weights_by_seed_recency_and_popularity_and_can_follow_time():
    both = compute_features(REQUESTS, [Covisitation(window=1, recent=3)], context(BASE))
    ahead = compute_features(REQUESTS, [Covisitation(window=1, recent=3, directed=True)], context(BASE))
    # User 1 (recent: 3, 2, 1) and item 4: 4 sat next to 3, the latest seed; 3 has 2 events, 4 has 1.
    row = both.row(1, named=True)
    assert (row["covis_w1_r3_sum"], row["covis_w1_r3_wsum"]) == (1, 1)
    assert row["covis_w1_r3_cos"] == pytest.approx(1 / np.sqrt(2 * 1))
    assert ahead.row(1, named=True)["covis_next_w1_r3_sum"] == 1  # 4 came after 3
    # User 2 (recent: 4, 3, 1) and item 1: next to 3, the second seed, so weighed 1/2; but 1 came
    # before 3, never after it, so the directed count is 0.
    row = both.row(2, named=True)
    assert row["covis_w1_r3_wsum"] == pytest.approx(0.5) and row["covis_w1_r3_cos"] == pytest.approx(1 / np.sqrt(2 * 2))
    assert ahead.row(2, named=True)["covis_next_w1_r3_sum"] == 0
    assert both.row(3, named=True)["covis_w1_r3_cos"] is None  # unknown user: no seeds



@pytest.mark.parametrize("pair_rows", [None, 7])
@pytest.mark.parametrize("directed", [False, True])
def test_covisitation_pairs_totals_and_last_time_match_the_definition(directed, pair_rows, monkeypatch):
    # The pairs come from shifted index arrays for speed; they must be exactly the definition's (b within
    # 3 events after a in one user's log, a != b), with string user ids and events sharing a timestamp;
    # in blocks of a few pairs (pair_rows = 7: a block of one or two later events) as in one block.
    from recengine.features import covisitation

    if pair_rows:
        monkeypatch.setattr(covisitation, "PAIR_ROWS", pair_rows)
    rng = np.random.default_rng(2)
    events = pl.DataFrame({"user_id": rng.choice(["ann", "bob", "cy"], 300), "item_id": rng.integers(0, 25, 300),
                           "timestamp": [T0 + DAY * int(d) for d in rng.integers(0, 40, 300)]})
    ordered = events.sort("user_id", "timestamp", "item_id")
    expected = []
    for lag in (1, 2, 3):
        earlier = pl.col("item_id").shift(lag).over("user_id")
        expected.append(ordered.select(earlier.alias("a"), pl.col("item_id").alias("b"), "timestamp"))
        if not directed:
            expected.append(ordered.select(pl.col("item_id").alias("a"), earlier.alias("b"), "timestamp"))
    expected = pl.concat(expected).drop_nulls().filter(pl.col("a") != pl.col("b")).sort("a", "b", "timestamp")
    ctx = FeatureContext.from_frames(events.lazy())
    assert pair_table(ctx, 3, directed).collect().sort("a", "b", "timestamp").equals(expected)
    ids, totals = pair_totals(ctx, 3, directed)
    at = {item: j for j, item in enumerate(ids.to_list())}
    counts = np.zeros(totals.shape)
    for a, b, n in expected.group_by("a", "b").len().iter_rows():
        counts[at[a], at[b]] = n
    np.testing.assert_array_equal(both_ways(totals, directed).toarray(), counts)
    # Undirected counts are stored once a pair, in the upper half: what a run keeps is half the matrix.
    np.testing.assert_array_equal(totals.toarray(), counts if directed else np.triu(counts))
    assert last_pair(ctx, 3) == expected["timestamp"].max()
    if not directed:  # the totals as of a few times (snapshot requests): the pairs dated strictly before each,
        # in one call, in calls that resume the context's cursor (times after its last), and in calls that
        # must start over (a time before it) or stay (the same time again)
        days = [(0, 5, 17, 17.5, 39, 45), (0, 5), (17, 17.5), (39,), (39, 45), (5,), (17, 45)]
        for chunk in days:
            times = pl.Series([T0 + DAY * d for d in chunk]).cast(events["timestamp"].dtype)
            for time, ids_as_of, as_of in covisitation.totals_as_of(ctx, 3, times):
                counts = np.zeros(totals.shape)
                for a, b, n in expected.filter(pl.col("timestamp") < time).group_by("a", "b").len().iter_rows():
                    counts[at[a], at[b]] = n
                assert ids_as_of.equals(ids)
                np.testing.assert_array_equal(both_ways(as_of, False).toarray(), counts)


@pytest.mark.parametrize("directed", [False, True])
def test_pair_counts_and_products_read_a_stored_matrix_as_the_whole_one(directed):
    # `counts_at` (a binary search of every pair's row at once) and `times_counts` (the upper half and
    # its transpose) must read a stored count matrix exactly as the whole dense matrix: long and empty
    # rows, pairs not stored, pairs on the diagonal, weights split into blocks of rows.
    from recengine.features.covisitation import counts_at, times_counts

    rng = np.random.default_rng(5)
    n = 40
    a, b = rng.integers(0, n, 900), rng.integers(0, n, 900)
    a[:300] = 3  # one long row (and column)
    keep = (a != b) & (a != 17) & (b != 17)  # item 17 in no pair: an empty row
    a, b = a[keep], b[keep]
    if not directed:
        a, b = np.minimum(a, b), np.maximum(a, b)
    stored = sp.csr_matrix((np.ones(len(a), dtype=np.int32), (a, b)), shape=(n, n))
    whole = both_ways(stored, directed).toarray()
    qa, qb = rng.integers(0, n, 5_000), rng.integers(0, n, 5_000)
    found = counts_at(stored, qa, qb, directed)
    np.testing.assert_array_equal(found, whole[qa, qb])
    assert found.dtype == np.int32 and (found == 0).any() and found.max() > 1
    np.testing.assert_array_equal(counts_at(sp.csr_matrix((n, n), dtype=np.int32), qa, qb, directed), 0)
    weights = sp.random(11, n, density=0.2, random_state=5, format="csr")
    # Blocks of 4 rows; the lower half's term for all rows at once, or for groups of 5 or 8 rows.
    for group, starts in ((None, [0, 4, 8]), (5, [0, 4, 5, 9, 10]), (8, [0, 4, 8])):
        blocks = [(lo, product) for lo, product in times_counts(weights, stored, directed, 4, group)]
        assert [lo for lo, _ in blocks] == starts
        np.testing.assert_allclose(np.vstack([product for _, product in blocks]), weights.toarray() @ whole)


def test_interest_scores_equal_a_direct_computation(tiny_bert):
    ctx = context(BASE)
    scorer = InterestScores(encoder_params={"model": str(tiny_bert), "device": "cpu"}, fields=["title"], recent=2)
    features = compute_features(REQUESTS, [scorer], ctx)
    emb = scorer.embeddings(ctx, "title")
    vector = dict(zip(emb.item_ids.to_list(), emb.matrix))
    profile = vector[1] + vector[2] + vector[3]
    profile = on_grid(profile / np.linalg.norm(profile))  # profiles sit on the grid, like embeddings
    row = features.row(1, named=True)  # user 1, item 4
    assert row["interest_title_mean"] == float(profile @ vector[4])  # exact: products of grid values
    assert row["interest_title_max"] == pytest.approx(max(vector[3] @ vector[4], vector[2] @ vector[4]), abs=1e-5)
    assert features.row(3, named=True)["interest_title_mean"] is None  # no history
    assert features.row(4, named=True)["interest_title_max"] is None  # item without text


def test_recency_and_value_weights_enter_the_profile(tiny_bert):
    ctx = context(BASE)
    scorer = InterestScores(encoder_params={"model": str(tiny_bert), "device": "cpu"}, fields=["title"],
                            half_life_days=2.0, weight_by_value=True)
    features = compute_features(REQUESTS, [scorer], ctx)
    vector = dict(zip(*(lambda e: (e.item_ids.to_list(), e.matrix))(scorer.embeddings(ctx, "title"))))
    # user 1: items 1, 2, 3 at 5, 3, 1 days before t with values 4, 5, 2.
    profile = sum(value * 0.5 ** (age / 2.0) * vector[item] for item, age, value in [(1, 5, 4.0), (2, 3, 5.0), (3, 1, 2.0)])
    expected = float(on_grid(profile / np.linalg.norm(profile)) @ vector[4])
    assert features["interest_title_mean"][1] == pytest.approx(expected, abs=1e-12)


def test_candidates_exclude_seen_items_and_keep_source_scores(tiny_bert):
    ctx = context(BASE, cache=None)
    sources = [PopularSource(k=10), CovisitationSource(k=10, window=2),
               EmbeddingSource(k=10, encoder_params={"model": str(tiny_bert), "device": "cpu"})]
    requests = pl.DataFrame({"user_id": [1, 2], "timestamp": [T0, T0]})
    out = generate(requests, sources, ctx)
    seen = {(1, 1), (1, 2), (1, 3), (2, 1), (2, 3), (2, 4)}
    assert not seen & set(zip(out["user_id"], out["item_id"]))
    assert {"cand_popular_score", "cand_covisitation_rank", "cand_embedding_score"} <= set(out.columns)
    assert set(out.filter(pl.col("user_id") == 1)["item_id"]) == {4, 5}  # 5 only via embeddings
    assert out.filter((pl.col("user_id") == 1) & (pl.col("item_id") == 5))["cand_popular_score"].item() is None


def test_popular_source_ignores_the_request_day_and_after():
    events = log([(5, 3, T0 + DAY, 1.0), (6, 3, T0, 1.0), (7, 2, T0 - DAY, 1.0), (8, 2, T0 - DAY, 1.0), (9, 1, T0 - 2 * DAY, 1.0)])
    out = generate(pl.DataFrame({"user_id": [1], "timestamp": [T0 + timedelta(hours=12)]}), [PopularSource(k=2)], context(events))
    assert out.sort("cand_popular_rank")["item_id"].to_list() == [2, 1]


def test_metrics_by_hand():
    ranked = pl.DataFrame({"user_id": [1, 1, 1, 2, 2], "item_id": [10, 11, 12, 20, 21], "score": [3.0, 2.0, 1.0, 2.0, 1.0]})
    truth = pl.DataFrame({"user_id": [1, 1, 2, 3], "item_id": [11, 99, 21, 30]})  # 99, 30: never candidates
    m = evaluate(ranked, truth, ["user_id"], ks=(10,))
    ideal2 = 1 + 1 / np.log2(3)
    ndcg = [(1 / np.log2(3)) / ideal2, (1 / np.log2(3)) / 1, 0.0]
    assert m["ndcg@10"] == pytest.approx(np.mean(ndcg))
    assert m["recall@10"] == pytest.approx(np.mean([0.5, 1.0, 0.0]))
    assert m["hr@10"] == pytest.approx(2 / 3) and m["mrr@10"] == pytest.approx(np.mean([0.5, 0.5, 0.0]))
    assert m["auc"] == pytest.approx(np.mean([0.5, 0.0])) and m["requests"] == 3


def test_metrics_of_parts_summed_equal_the_whole_and_ties_go_to_the_smaller_item():
    from recengine.core.metrics import request_metrics, summarise

    rng = np.random.default_rng(0)
    n = 600
    ranked = pl.DataFrame({"user_id": rng.integers(0, 40, n), "item_id": rng.integers(0, 80, n),
                           "score": rng.integers(0, 4, n).astype(float)}).unique(["user_id", "item_id"]).sort("user_id", "item_id")
    truth = pl.DataFrame({"user_id": rng.integers(0, 45, 200), "item_id": rng.integers(0, 80, 200)}).unique().sort("user_id", "item_id")
    whole = evaluate(ranked, truth, ["user_id"], (5, 10), catalogue_size=80)
    parts = [request_metrics(ranked.filter(pl.col("user_id") % 3 == r), truth, ["user_id"], (5, 10)) for r in range(3)]
    assert summarise(pl.concat(parts), truth, ["user_id"], (5, 10), 80) == whole  # to the bit
    # Scores tie a lot here: the smaller item id wins each tie, whatever order the rows come in.
    assert evaluate(ranked.sample(fraction=1.0, shuffle=True, seed=1), truth, ["user_id"], (5, 10), 80) == whole
    tied = pl.DataFrame({"user_id": [1, 1], "item_id": [7, 3], "score": [1.0, 1.0]})
    assert evaluate(tied, pl.DataFrame({"user_id": [1], "item_id": [3]}), ["user_id"], (1,))["hr@1"] == 1.0


def test_candidates_never_include_an_item_the_catalogue_lacks():
    # Item 6 has events (the most popular, next to user 1's items) but no catalogue row: withdrawn.
    events = pl.concat([BASE, log([(4, 6, T0 - 2 * DAY, 5.0), (5, 6, T0 - 2 * DAY, 5.0), (1, 6, T0 - 4 * DAY, 3.0)])])
    requests = pl.DataFrame({"user_id": [2, 3], "timestamp": [T0, T0]})
    sources = [PopularSource(k=10), CovisitationSource(k=10, window=2)]
    with_catalogue = generate(requests, sources, context(events))
    without = generate(requests, sources, FeatureContext.from_frames(events))
    assert 6 in without["item_id"].to_list()
    assert 6 not in with_catalogue["item_id"].to_list()
    assert set(with_catalogue["item_id"]) <= set(ITEMS["item_id"])


def test_the_new_items_source_proposes_only_items_nobody_took_before_t(tiny_bert):
    ctx = context(BASE, cache=None)
    source = EmbeddingSource(k=10, new_items=True, encoder_params={"model": str(tiny_bert), "device": "cpu"})
    requests = pl.DataFrame({"user_id": [1, 2, 3], "timestamp": [T0, T0, T0 - 300 * DAY]})
    out = generate(requests, [source], ctx, exclude_seen=False)
    assert out.filter(pl.col("timestamp") == T0).height == 0  # by T0 every catalogue item had been taken
    # 300 days before T0 only item 5 had been taken (by user 3, 400 days before): items 1-4 were new.
    assert set(out.filter(pl.col("user_id") == 3)["item_id"]) == {1, 2, 3, 4}
    everything = generate(requests, [EmbeddingSource(k=10, encoder_params={"model": str(tiny_bert), "device": "cpu"})],
                          ctx, exclude_seen=False)
    assert set(everything.filter(pl.col("user_id") == 1)["item_id"]) == {1, 2, 3, 4, 5}
