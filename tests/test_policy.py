"""The new-item policy ([policy] in a feature set, recengine/parts/policy.py): a bounded share of each top k
for new items the user's score column rates at least `min_score`; never a seen, unreleased or
uncatalogued item; the same lists from the batch job, `recommend`, `Ranker.rank` and the Ray job; with
the policy off, today's output byte for byte; bad [policy] tables refused at load."""

import json
from datetime import datetime, timedelta

import polars as pl
import pytest

from recengine.core.topk import DECIMALS, top_k
from recengine.errors import ConfigError
from recengine.learning.model import RankerModel
from recengine.parts.context import FeatureContext
from recengine.parts.featureset import FeatureSet
from recengine.parts.policy import SCORE, NewItemPolicy, eligible, top
from recengine.running.batch import rank_file

from synthetic import catalogue, feature_set, interactions, ranking_job

K, SLOTS, MIN_SCORE = 10, 3, 0.08
# The synthetic set has no encoder: the user's genre share stands in for the text model's score. The ranker
# already ranks new items of the user's own genre high, so the policy brings in those of the genres the
# user takes less (a share of 0.08 or more), some requests having fewer of them than slots.
COLUMN = "affinity_genres_max"
POLICY = {"slots": SLOTS, "score": COLUMN, "min_score": MIN_SCORE, "max_age_days": 30, "max_events": 2}
KEYS = ["user_id", "timestamp"]


def policy_events() -> pl.DataFrame:
    """Items 108-119 nobody took (new by count); items 96-107 taken only in the log's last 20 days (young)."""
    events = interactions(n_users=120, per_user=20)
    last = events["timestamp"].max()
    young = pl.col("item_id").is_between(96, 107)
    return events.filter((pl.col("item_id") < 108) & (~young | (pl.col("timestamp") >= last - timedelta(days=20))))


def with_policy(model: RankerModel, **policy) -> RankerModel:
    """The same trees with another [policy] in the spec's feature set (as a training with it would record)."""
    raw = {**model.spec["feature_set"], "policy": policy}
    spec = {**model.spec, "feature_set": FeatureSet.from_dict(raw).to_dict()}
    return RankerModel(model.booster, spec, model.learned, model.adapters)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    # One LightGBM thread and few rounds: a small model trains in a second on a busy 2-core machine.
    folder, model, events = ranking_job(tmp_path_factory.mktemp("policy"), policy_events(),
                                        feature_set(num_boost_round=20, num_threads=1), per_user=40, timestamped=False)
    # The same candidates with times: users below 60 an hour after the last event, the others mid-log.
    candidates = pl.read_parquet(folder / "candidates.parquet")
    last, middle = events["timestamp"].max(), events["timestamp"].sort()[events.height // 2]
    at = pl.when(pl.col("user_id") < 60).then(pl.lit(last + timedelta(hours=1))).otherwise(pl.lit(middle))
    candidates.with_columns(at.cast(pl.Datetime("ms")).alias("timestamp")).write_parquet(folder / "timed.parquet")
    return folder, model, events


def context_of(events, items=None):
    return FeatureContext.from_frames(events, catalogue() if items is None else items)


def rank(model, folder, name, out, events, k=K, items=None, **options):
    report = rank_file(model, folder / name, out, context_of(events, items), k=k, progress=False, **options)
    return pl.read_parquet(report.output)


def lists(frame: pl.DataFrame, keys=KEYS) -> dict:
    return {key: group.sort("rank")["item_id"].to_list() for key, group in frame.group_by(keys, maintain_order=True)}


# -- the reference: the rules written out plainly, one request at a time ---------------------------------


def expected_lists(model, folder, name, events, tmp_path, policy=POLICY, exclude_seen=True):
    """What each request's top K must be, from the ranker's full order (the job with the policy off and
    k covering every candidate), the score column from the point-in-time pipeline, and the events."""
    full = rank(model, folder, name, tmp_path / "full.parquet", events, k=1000)
    rows = pl.read_parquet(folder / name)
    if "timestamp" not in rows.columns:
        rows = rows.with_columns(pl.lit(events["timestamp"].max() + timedelta(seconds=1)).cast(pl.Datetime("ms")).alias("timestamp"))
    scored = model.feature_set().given_rows(rows, KEYS, context_of(events))
    column = {(u, t, i): s for u, t, i, s in scored.select("user_id", "timestamp", "item_id", policy["score"]).iter_rows()}
    history = events.sort("timestamp")
    out = {}
    for (user, at), items in lists(full).items():
        before = history.filter(pl.col("timestamp") < at)
        counts = dict(before.group_by("item_id").len().iter_rows())
        first = dict(before.group_by("item_id").agg(pl.col("timestamp").min()).iter_rows())
        seen = set(before.filter(pl.col("user_id") == user)["item_id"].to_list()) if exclude_seen else set()

        def new(item):
            young = item in first and (at - first[item]) < timedelta(days=policy["max_age_days"])
            return counts.get(item, 0) < policy["max_events"] or young

        slots = min(policy["slots"], K)
        pool = [i for i in items[K - slots:] if column.get((user, at, i)) is not None
                and round(column[(user, at, i)], DECIMALS) >= policy["min_score"] and new(i) and i not in seen]
        picked = sorted(pool, key=lambda i: (-round(column[(user, at, i)], DECIMALS), i))[:slots]
        length = min(K, len(items))
        out[(user, at)] = ([i for i in items if i not in picked][:length - len(picked)] + picked, picked)
    return out


@pytest.mark.parametrize("name", ["candidates.parquet", "timed.parquet"])  # the serving-state path, point in time
def test_the_batch_job_places_what_the_rules_say_and_nothing_else(job, tmp_path, name):
    folder, model, events = job
    on = rank(with_policy(model, **POLICY), folder, name, tmp_path / "on.parquet", events)
    off = lists(rank(model, folder, name, tmp_path / "off.parquet", events))
    expected = expected_lists(model, folder, name, events, tmp_path)
    got = lists(on)
    assert got.keys() == expected.keys()
    for key, (items, picked) in expected.items():
        assert got[key] == items, key
        assert got[key][:K - SLOTS] == off[key][:K - SLOTS]  # the ranker's first k - slots are untouched
        assert len(picked) <= SLOTS and got[key][len(got[key]) - len(picked):] == picked
    placed = sum(len(picked) for _, picked in expected.values())
    full = sum(len(picked) == SLOTS for _, picked in expected.values())
    # Not vacuous: items were placed, and some requests had fewer new items above the threshold than slots.
    assert placed > 50 and 0 < full < len(expected)
    # Checked apart from the reference: every item the policy brought in (not in the ranker's own top k) is
    # above the threshold and was not taken by the user before the request.
    brought = on.join(pl.DataFrame([(u, t, i) for (u, t), items in off.items() for i in items],
                                   schema={"user_id": pl.Int64, "timestamp": pl.Datetime("ms"), "item_id": pl.Int64},
                                   orient="row"), on=[*KEYS, "item_id"], how="anti")
    scored = model.feature_set().given_rows(brought.drop("rank", "score"), KEYS, context_of(events))
    assert brought.height and (scored[COLUMN] >= MIN_SCORE).all()
    taken = brought.join(events, on=["user_id", "item_id"], suffix="_event").filter(pl.col("timestamp_event") < pl.col("timestamp"))
    assert taken.height == 0


def test_never_more_than_the_slots_and_nothing_below_the_threshold(job, tmp_path):
    folder, model, events = job
    off = rank(model, folder, "timed.parquet", tmp_path / "off.parquet", events)
    # A threshold nothing reaches: every slot stays with the ranker, byte for byte.
    above = rank(with_policy(model, **{**POLICY, "min_score": 1.01}), folder, "timed.parquet", tmp_path / "a.parquet", events)
    assert above.equals(off)
    # Every candidate new and any score allowed: the policy fills its slots, and never touches another position;
    # slots beyond k take at most the k positions.
    greedy = {**POLICY, "slots": 2, "min_score": -1.0, "max_events": 10**6}
    wide = lists(rank(with_policy(model, **greedy), folder, "timed.parquet", tmp_path / "w.parquet", events))
    ranked = lists(off)
    for key, items in ranked.items():
        assert len(wide[key]) == len(items) and wide[key][:K - 2] == items[:K - 2]
    assert sum(wide[key][K - 2:] != items[K - 2:] for key, items in ranked.items()) > len(ranked) // 2
    every = lists(rank(with_policy(model, **{**greedy, "slots": 50}), folder, "timed.parquet", tmp_path / "e.parquet", events))
    assert all(len(every[key]) == len(items) for key, items in ranked.items())


def test_the_policy_never_places_an_unreleased_item(job, tmp_path):
    folder, model, events = job
    last = events["timestamp"].max()
    # Items 112-119 are released a week after the requests; without release_field the policy places them.
    items = catalogue().with_columns(pl.when(pl.col("item_id") >= 112).then(pl.lit(last + timedelta(days=7)))
                                     .otherwise(pl.lit(datetime(2000, 1, 1))).cast(pl.Datetime("ms")).alias("released"))
    off = lists(rank(model, folder, "candidates.parquet", tmp_path / "off.parquet", events, items=items))

    def brought(policy, out):
        got = lists(rank(with_policy(model, **policy), folder, "candidates.parquet", tmp_path / out, events, items=items))
        return {i for key, its in got.items() for i in its if i not in off[key]}

    assert brought(POLICY, "free.parquet") & set(range(112, 120))
    held = brought({**POLICY, "release_field": "released"}, "held.parquet")
    assert held and not held & set(range(112, 120))


def test_batch_recommend_ranker_and_generate_give_the_same_lists(job, tmp_path):
    from recengine import Ranker

    folder, model, events = job
    policy = with_policy(model, **POLICY)
    policy.save(tmp_path / "model")
    loaded = RankerModel.load(tmp_path / "model")  # through spec.json: the policy is recorded and read back
    assert loaded.feature_set().policy == policy.feature_set().policy and NewItemPolicy.of(loaded.feature_set())
    ranker = Ranker(loaded, events, catalogue())
    candidates = pl.read_parquet(folder / "candidates.parquet")
    now = lists(rank(loaded, folder, "candidates.parquet", tmp_path / "now.parquet", events), ["user_id"])
    off = lists(rank(model, folder, "candidates.parquet", tmp_path / "off.parquet", events), ["user_id"])
    assert sum(now[u] != off[u] for u in now) > 10
    for (user,), group in candidates.group_by("user_id", maintain_order=True):
        items = group["item_id"].to_list()
        assert [i for i, _ in ranker.rank(user, items, k=K)] == now[(user,)], user
        every = ranker.rank(user, items)  # no k: the policy's first 10, then the rest in the ranker's order
        assert [i for i, _ in every[:K]] == now[(user,)] and sorted(i for i, _ in every) == sorted(items)
    # Point in time: a request at another time than the state's is ranked by the batch pipeline, as the job ranks it.
    timed = lists(rank(loaded, folder, "timed.parquet", tmp_path / "timed.parquet", events))
    for (user, at), items in list(timed.items())[::10]:
        given = pl.read_parquet(folder / "timed.parquet").filter(pl.col("user_id") == user)["item_id"].to_list()
        assert [i for i, _ in ranker.rank(user, given, at=at, k=K)] == items
    # recommend (the sources' candidates) equals the batch job's generate mode, and the policy changed lists there
    # too. The sources propose items someone took, so "new" here is fewer than 20 events (about half the items).
    requests = pl.DataFrame({"user_id": list(range(0, 120, 3))}).with_columns(
        pl.lit(events["timestamp"].max() + timedelta(hours=1)).cast(pl.Datetime("ms")).alias("timestamp"))
    requests.write_parquet(tmp_path / "requests.parquet")
    lesser = with_policy(model, **{**POLICY, "max_events": 20})
    recommended = lesser.recommend(requests, context_of(events), k=K)
    generated = rank_file(lesser, tmp_path / "requests.parquet", tmp_path / "gen.parquet", context_of(events), k=K,
                          generate=True, progress=False)
    assert recommended.equals(pl.read_parquet(generated.output).select(recommended.columns))
    plain = model.recommend(requests, context_of(events), k=K)
    assert not recommended.equals(plain) and recommended.height == plain.height


def test_with_the_policy_off_the_output_is_todays_byte_for_byte(job, tmp_path):
    folder, model, events = job
    # slots = 0 is off, whatever else the table says; the model then records no [policy] at all.
    off = with_policy(model, **{**POLICY, "slots": 0})
    assert "policy" not in off.spec["feature_set"] and off.digest() == model.digest()
    for name in ("candidates.parquet", "timed.parquet"):
        a = rank_file(model, folder / name, tmp_path / "a.parquet", context_of(events), k=K, chunk_rows=500, progress=False)
        b = rank_file(off, folder / name, tmp_path / "b.parquet", context_of(events), k=K, chunk_rows=500, progress=False)
        assert a.output.read_bytes() == b.output.read_bytes()
    rows = pl.DataFrame({"user_id": [1, 1, 2], "timestamp": [datetime(2024, 1, 1)] * 3, "item_id": [3, 4, 5],
                         "score": [0.1, 0.2, None]})
    assert top(rows, KEYS, 2, None, None).equals(top_k(rows, KEYS, 2))


def test_ray_writes_the_local_jobs_bytes_with_the_policy_on(job, tmp_path):
    ray = pytest.importorskip("ray")
    from recengine.running.distributed import rank_on_ray

    folder, model, events = job
    policy = with_policy(model, **POLICY)
    local = rank_file(policy, folder / "candidates.parquet", tmp_path / "local.parquet", context_of(events), k=K,
                      chunk_rows=400, progress=False)
    # A Ray of this test's own (as tests/test_ray.py starts it), never one another process left running here.
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 150 << 20,
                                                            "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        ran = rank_on_ray(policy, folder / "candidates.parquet", tmp_path / "ray.parquet", context_of(events), k=K,
                          chunk_rows=400, progress=False, actors=1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert ran.chunks == local.chunks > 1
    assert ran.output.read_bytes() == local.output.read_bytes()
    plain = rank_file(model, folder / "candidates.parquet", tmp_path / "plain.parquet", context_of(events), k=K,
                      chunk_rows=400, progress=False)
    assert plain.output.read_bytes() != local.output.read_bytes()  # the policy did place items in this job


# -- the rules on a log small enough to read -------------------------------------------------------------

T0 = datetime(2024, 1, 1)


def small_context(items=None):
    events = pl.DataFrame({"user_id": [1, 2, 2, 3, 3, 4], "item_id": [10, 10, 11, 12, 11, 13],
                           "timestamp": [T0, T0, T0 + timedelta(days=1), T0 + timedelta(days=9), T0 + timedelta(days=1),
                                         T0 + timedelta(days=10)]})
    return FeatureContext.from_frames(events, pl.DataFrame({"item_id": list(range(10, 20))}) if items is None else items)


def request(user, items, scores, policy_scores, at=T0 + timedelta(days=10)):
    return pl.DataFrame({"user_id": [user] * len(items), "timestamp": [at] * len(items), "item_id": items,
                         "score": [float(s) for s in scores], SCORE: policy_scores}).with_columns(pl.col("timestamp").cast(pl.Datetime("ms")))


def test_new_means_few_events_or_young_as_of_the_request_and_only_what_may_be_placed():
    context = small_context()
    # At day 10: 10 has 2 events (first day 0), 11 has 2 (first day 1), 12 has 1 (day 9), 13's only event is AT
    # the request (not before it: it counts for nothing), 14-15 none; 99 has no catalogue row.
    rows = request(1, [10, 11, 12, 13, 14, 99], range(6), [0.9] * 6)
    policy = NewItemPolicy(slots=1, score="x", max_events=2)
    assert sorted(eligible(rows, policy, context)["item_id"]) == [12, 13, 14]
    policy = NewItemPolicy(slots=1, score="x", max_events=1, max_age_days=9.5)  # 11 is 9 days old, 10 ten days
    assert sorted(eligible(rows, policy, context)["item_id"]) == [11, 12, 13, 14]
    # Seen: user 3 took 11 and 12 before day 10; user 4 took 13 only at day 10, so it is not seen yet.
    seen = NewItemPolicy(slots=1, score="x", max_events=10)
    assert sorted(eligible(request(3, [11, 12, 14], range(3), [0.9] * 3), seen, context)["item_id"]) == [14]
    assert sorted(eligible(request(3, [11, 12, 14], range(3), [0.9] * 3), seen, context, exclude_seen=False)["item_id"]) == [11, 12, 14]
    assert sorted(eligible(request(4, [13, 14], range(2), [0.9] * 2), seen, context)["item_id"]) == [13, 14]


@pytest.mark.parametrize("released", [
    [datetime(2024, 2, 1), datetime(2024, 1, 5), None, datetime(2024, 2, 1)],  # datetimes
    ["2024-02-01T00:00:00Z", "2024-01-05", None, "2024-02-01 08:00"],  # ISO 8601 strings
])
def test_release_field_keeps_out_items_released_after_the_request(released):
    items = pl.DataFrame({"item_id": [12, 14, 15, 16], "released": released})
    context = small_context(items)
    rows = request(1, [12, 14, 15, 16], range(4), [0.9] * 4)
    policy = NewItemPolicy(slots=2, score="x", release_field="released")
    # At 2024-01-11: 12 had an event (so it is out, whatever the field says), 14 is out by its date; 15 (no
    # date) and 16 (out in February) are not.
    assert sorted(eligible(rows, NewItemPolicy(slots=2, score="x", max_events=5, release_field="released"), context)["item_id"]) == [12, 14]
    assert sorted(eligible(rows, policy, context)["item_id"]) == [14]
    years = small_context(pl.DataFrame({"item_id": [14, 15], "released": [2024, 2025]}))
    assert sorted(eligible(request(1, [14, 15], range(2), [0.9] * 2), policy, years)["item_id"]) == [14]


def test_the_new_items_take_the_last_slots_best_score_first_ties_by_id():
    context = small_context()
    # The ranker: 10 > 11 > ... > 18. New and catalogued: 12 (1 event) and 13-18 (none).
    rows = request(2, list(range(10, 19)), range(9, 0, -1), [0.1, 0.9, 0.8, 0.95, 0.7, 0.7, None, 0.2, 0.99])
    policy = NewItemPolicy(slots=2, score="x", min_score=0.5, max_events=2)
    ranked = top(rows, KEYS, 5, policy, context)
    # 10-12 keep their places (k - slots = 3); of 13-18, 13 (0.95) and 18 (0.99) score highest: 18 then 13.
    assert ranked["item_id"].to_list() == [10, 11, 12, 18, 13] and ranked["rank"].to_list() == [1, 2, 3, 4, 5]
    assert ranked.columns == [c for c in rows.columns if c != SCORE] + ["rank"]
    # A tie at the policy's score goes to the smaller id (here, against the ranker's preference for 15).
    one = NewItemPolicy(slots=1, score="x", min_score=0.5, max_events=2)
    tied = top(request(2, [10, 11, 15, 14], [4, 3, 2, 1], [None, None, 0.7, 0.7]), KEYS, 3, one, context)
    assert tied["item_id"].to_list() == [10, 11, 14]
    # A slot without a new item above the threshold stays with the ranker.
    few = top(request(2, [10, 11, 14, 15, 16], [5, 4, 3, 2, 1], [None, None, 0.6, 0.1, 0.2]), KEYS, 4, policy, context)
    assert few["item_id"].to_list() == [10, 11, 15, 14]  # one slot to 14 (the last), the other to the ranker's 15
    assert top(request(2, [10], [1], [0.9]), KEYS, 5, policy, context)["item_id"].to_list() == [10]


# -- configuration ------------------------------------------------------------------------------------------


def synthetic_with(policy) -> dict:
    return {**feature_set().to_dict(), "policy": policy}


@pytest.mark.parametrize("policy, message", [
    ({"slot": 2}, r"unknown \[policy\] keys \['slot'\]; expected some of \['max_age_days', 'max_events'"),
    ({"slots": -1, "score": COLUMN}, r"\[policy\]: slots = -1; give a whole number 0 or more"),
    ({"slots": 1.5, "score": COLUMN}, r"\[policy\]: slots = 1.5; give a whole number"),
    ({"slots": True, "score": COLUMN}, r"\[policy\]: slots = True"),
    ({"slots": 2}, r"\[policy\] slots = 2 needs score = \"COLUMN\""),
    ({"slots": 2, "score": "interest_title_max"}, r"\[policy\] score = 'interest_title_max' is not a column this "
                                                   r"feature set computes; give one of \[.*'affinity_genres_max'"),
    ({"slots": 2, "score": COLUMN, "min_score": "high"}, r"\[policy\]: min_score = 'high'; give a number"),
    ({"slots": 2, "score": COLUMN, "min_score": float("nan")}, r"min_score = nan"),
    ({"slots": 2, "score": COLUMN, "max_age_days": -3}, r"max_age_days = -3; give a number 0 or more"),
    ({"slots": 2, "score": COLUMN, "max_events": 0}, r"max_events = 0; give a whole number 1 or more"),
    ({"slots": 2, "score": COLUMN, "release_field": 2024}, r"\[policy\] release_field = 2024 should be a string"),
    ({"slots": 0, "score": COLUMN, "max_events": 0}, r"max_events = 0"),  # checked even while off: a typo is a typo
])
def test_a_bad_policy_table_is_refused_at_load_naming_the_key(policy, message):
    with pytest.raises(ConfigError, match=message):
        FeatureSet.from_dict(synthetic_with(policy), "shop.toml")


def test_a_policy_that_is_not_a_table_is_refused(tmp_path):
    (tmp_path / "shop.toml").write_text('policy = 2\n[candidates.popular]\n')
    with pytest.raises(ConfigError, match=r"shop.toml: policy = 2 should be a table"):
        FeatureSet.load(tmp_path / "shop.toml")


def test_the_policy_round_trips_through_the_spec_and_its_absence_changes_nothing(tmp_path):
    from recengine.interfaces.tracking import feature_set_digest, feature_set_params, param_differences

    plain = feature_set()
    on = FeatureSet.from_dict(synthetic_with({"slots": 2, "score": COLUMN, "min_score": 0, "max_age_days": 7}))
    assert on.policy == {"slots": 2, "score": COLUMN, "min_score": 0.0, "max_age_days": 7.0, "max_events": 1,
                         "release_field": ""}
    again = FeatureSet.from_dict(json.loads(json.dumps(on.to_dict())))  # as a model spec stores and reads it
    assert again.policy == on.policy and again.to_dict() == on.to_dict()
    # Off (absent, or slots = 0) records nothing: the spec, the digest and the MLflow parameters stay as they were.
    off = FeatureSet.from_dict(synthetic_with({"slots": 0}))
    assert "policy" not in plain.to_dict() and off.to_dict() == plain.to_dict()
    assert feature_set_digest(off) == feature_set_digest(plain) and feature_set_digest(on) != feature_set_digest(plain)
    assert feature_set_params(off) == feature_set_params(plain)
    params = feature_set_params(on)
    assert {k: v for k, v in params.items() if k.startswith("policy.")} == {
        "policy.slots": 2, "policy.score": COLUMN, "policy.min_score": 0.0, "policy.max_age_days": 7.0, "policy.max_events": 1}
    assert ("policy.slots", None, "2") in param_differences({k: str(v) for k, v in feature_set_params(plain).items()}, params)
    # A TOML file's [policy] table, as a user writes it.
    (tmp_path / "shop.toml").write_text('[candidates.popular]\n[features.category_affinity]\nfield = "genres"\n'
                                        f'[policy]\nslots = 2\nscore = "{COLUMN}"\nmin_score = 0.3\nmax_events = 5\n')
    assert NewItemPolicy.of(FeatureSet.load(tmp_path / "shop.toml")) == NewItemPolicy(2, COLUMN, 0.3, 0.0, 5, "")
    assert NewItemPolicy.of(plain) is None


def test_a_model_saved_before_the_policy_existed_loads_with_it_off(job, tmp_path):
    folder, model, events = job
    spec = json.loads((folder / "model" / "spec.json").read_text())
    assert "policy" not in spec["feature_set"]  # as every model trained without [policy] (and before it) records
    loaded = RankerModel.load(folder / "model")
    assert NewItemPolicy.of(loaded.feature_set()) is None and loaded.digest() == model.digest()
