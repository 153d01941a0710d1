"""`recengine rank --engine ray` and `recengine embed --engine ray`: the local job's answer, byte for byte,
on a local Ray of 2 CPUs with an actor pool of 1 (one CPU stays free for the read and shuffle tasks);
an actor or a driver killed mid-job loses and duplicates nothing; a simulated cluster of several Ray
nodes on this machine spreads the chunks over its nodes."""

import importlib
import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

ray = pytest.importorskip("ray")

from recengine.running.batch import rank_file  # noqa: E402
from recengine.running.distributed import rank_on_ray  # noqa: E402
from recengine.parts.context import FeatureContext  # noqa: E402

from synthetic import catalogue, feature_set, feature_set_toml, interactions, ranking_job  # noqa: E402

OBJECT_STORE = 150 << 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory, local_cluster):
    # One LightGBM thread: on a small shared machine its OpenMP threads spin against everything else
    # (measured on 2 busy cores: 12-16 s to train this model with two, 0.5 s with one).
    ranker = feature_set(num_boost_round=20, num_threads=1)
    # Users 120-149 have no event; no timestamp: ranked as of just after the last event (the nightly
    # job, the serving-state path).
    return ranking_job(tmp_path_factory.mktemp("ray"), interactions(n_users=120, per_user=20), ranker, per_user=30,
                       timestamped=False)


@pytest.fixture(scope="module")
def local_cluster():
    """A local Ray of 2 CPUs (a scoring actor, and a CPU left for the read and shuffle tasks), started as
    the head of a `ray.cluster_utils.Cluster`, so that the simulated-cluster test adds a node to it
    instead of starting a second Ray."""
    from ray.cluster_utils import Cluster

    # Workers started for every driver that connects (the killed-driver test's is a second one), and
    # the first two loaded with what the job's tasks import, while the model trains: as on a cluster
    # that is already up, the tests time the jobs, not Ray's start.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": OBJECT_STORE,
                                                            "include_dashboard": False,
                                                            "_system_config": {"enable_worker_prestart": True}})
    ray.init(address=cluster.address, log_to_driver=False)
    warm = [ray.remote(lambda: importlib.import_module("recengine.running.distributed") and None).remote() for _ in range(2)]
    yield cluster
    ray.get(warm)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray(local_cluster):
    return local_cluster.address


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The local job's output: top 5, chunks of 300 rows."""
    folder, model, events = setup
    out = tmp_path_factory.mktemp("local") / "local.parquet"
    return rank_file(model, folder / "candidates.parquet", out, context_of(events), k=5, chunk_rows=300, progress=False)


def context_of(events):
    return FeatureContext.from_frames(events, catalogue())


def test_ray_output_is_the_local_jobs_byte_for_byte(setup, local_ray, reference, tmp_path):
    folder, model, events = setup
    ran = rank_on_ray(model, folder / "candidates.parquet", tmp_path / "ray.parquet", context_of(events), k=5,
                      chunk_rows=300, progress=False, actors=1)
    assert ran.chunks == reference.chunks > 10 and ran.actors == 1 and sum(ran.nodes.values()) == ran.chunks
    assert ran.output.read_bytes() == reference.output.read_bytes()
    assert (ran.rows, ran.requests) == (reference.rows, reference.requests)
    assert not (tmp_path / ".ray.parquet.parts").exists()


def test_the_cli_runs_the_same_job_on_ray(setup, local_ray, reference, cli_run, tmp_path):
    # The input given as a URI (file:// here; s3:// and the like the same way): Ray and the driver's
    # checks read it through pyarrow's filesystem.
    folder, _, _ = setup
    uri = (folder / "candidates.parquet").resolve().as_uri()
    args = ["rank", "--model", str(folder / "model"), "--events", str(folder / "events.parquet"), "--items",
            str(folder / "items.parquet"), "--input", uri, "--k", "5", "--chunk-rows", "300"]
    result = cli_run(*args, "--output", str(tmp_path / "ray.parquet"), "--engine", "ray")
    assert result.exit_code == 0, result.output
    assert f"in {reference.chunks} chunk(s)" in result.output
    assert (tmp_path / "ray.parquet").read_bytes() == reference.output.read_bytes()


def test_an_input_uri_is_checked_and_digested_as_the_local_path_is(setup, tmp_path):
    # No Ray needed: the driver's own reads of a URI. Its digest is the local job's for the same bytes
    # (so a job started on the local path can be finished from the URI), its errors name the URI.
    from recengine.running.batch import _file_digest
    from recengine.running.distributed import _checked_uri, input_uri
    from recengine.errors import DataError

    folder, _, events = setup
    parts = tmp_path / "parts"
    (parts / "day=2").mkdir(parents=True)
    rows = pl.read_parquet(folder / "candidates.parquet")
    rows.head(100).write_parquet(parts / "a.parquet")
    rows.slice(100).write_parquet(parts / "day=2" / "b.parquet")
    (parts / "_SUCCESS").write_text("")
    for path in (parts, parts / "a.parquet"):
        total, first, empty, keys, digest = _checked_uri(path.as_uri(), False, {}, context_of(events))
        assert digest == _file_digest(path) and keys == ["user_id", "timestamp"]
        assert total == (rows.height if path == parts else 100) and first.height == 1 and empty.height == 0
    assert input_uri(Path(parts.as_uri())) == parts.as_uri()  # the CLI's Path("file:///x") is "file:/x"
    with pytest.raises(DataError, match="missing.parquet: no such file"):
        _checked_uri((tmp_path / "missing.parquet").as_uri(), False, {}, context_of(events))
    rows.with_columns(pl.lit(None).alias("item_id")).write_parquet(tmp_path / "nulls.parquet")
    with pytest.raises(DataError) as bad:
        _checked_uri((tmp_path / "nulls.parquet").as_uri(), False, {}, context_of(events))
    assert (tmp_path / "nulls.parquet").as_uri() in str(bad.value) and "recengine-input-" not in str(bad.value)


def test_embed_on_ray_encodes_only_what_the_cache_lacks(local_ray, tiny_bert, tmp_path):
    from recengine.parts.encoders import EmbeddingCache, create_encoder, embed, text_keys
    from recengine.running.distributed import embed_on_ray

    params = {"model": str(tiny_bert), "device": "cpu"}
    encoder = create_encoder("transformers", params)
    titles = catalogue()["title"].to_list()  # 120 titles, some repeated
    distinct = list(dict.fromkeys(titles))
    expected, _ = embed(distinct, encoder)  # no cache: the local encoder's vectors
    cache = EmbeddingCache(tmp_path / "cache")
    embed(distinct[:40], encoder, cache)  # a run before this one (or a concurrent writer) encoded these
    encoder_id, stats = embed_on_ray(titles, "transformers", params, cache, batch_rows=16, progress=False)
    assert encoder_id == encoder.id and (stats.hits, stats.misses) == (40, len(distinct) - 40)
    fresh = EmbeddingCache(tmp_path / "cache")  # what is on disk now
    vectors, found = fresh.lookup(encoder.id, text_keys(distinct))
    assert found.all()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert embed_on_ray(titles, "transformers", params, fresh, progress=False)[1].misses == 0


def test_a_folder_of_parts_with_timestamps_and_request_ids(setup, local_ray, tmp_path):
    # Rows with their own times take the point-in-time pipeline; the folder is read as one table.
    folder, model, events = setup
    candidates = pl.read_parquet(folder / "candidates.parquet").filter(pl.col("user_id") < 60)
    at = events["timestamp"].max() + timedelta(hours=2)
    rows = candidates.with_columns(pl.lit(at).alias("timestamp"), (pl.col("user_id") * 10).alias("request_id"))
    rows.write_parquet(tmp_path / "single.parquet")
    (tmp_path / "parts").mkdir()
    rows.head(700).write_parquet(tmp_path / "parts" / "a.parquet")
    rows.slice(700).write_parquet(tmp_path / "parts" / "b.parquet")
    local = rank_file(model, tmp_path / "single.parquet", tmp_path / "local.parquet", context_of(events), k=3,
                      chunk_rows=600, progress=False)
    ran = rank_on_ray(model, tmp_path / "parts", tmp_path / "ray.parquet", context_of(events), k=3, chunk_rows=600,
                      progress=False, actors=1, share_state=False)
    assert pl.read_parquet(ran.output).columns[0] == "request_id"
    assert ran.output.read_bytes() == local.output.read_bytes()


def test_an_actor_killed_mid_job_is_restarted_and_its_chunk_retried(setup, local_ray, reference, tmp_path, monkeypatch):
    # The scoring actor is SIGKILLed on its second chunk (its first is finished), once: mid-job at the
    # same point on every run. The scorer is the job's own, its class defined here so that Ray ships
    # it to the actor by value; a marker file records the kill, so the restarted actor goes on.
    from recengine.running import distributed

    folder, model, events = setup
    driver, marker = os.getpid(), tmp_path / "killed"

    class KilledOnItsSecondChunk(distributed._ChunkScorer):
        def __call__(self, batch):
            if os.getpid() != driver:  # not the driver's dry run
                self.calls = getattr(self, "calls", 0) + 1
                if self.calls == 2 and not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    monkeypatch.setattr(distributed, "_ChunkScorer", KilledOnItsSecondChunk)
    ran = rank_on_ray(model, folder / "candidates.parquet", tmp_path / "ray.parquet", context_of(events), k=5,
                      chunk_rows=300, progress=False, actors=1)
    assert marker.exists() and int(marker.read_text()) != driver and ran.chunks > 10
    assert sum(ran.nodes.values()) == ran.chunks  # every chunk's result recorded once
    assert ran.output.read_bytes() == reference.output.read_bytes()


RUN = """
import os
import signal
import sys
import polars as pl
import ray
from recengine.running import batch
from recengine.running.distributed import rank_on_ray
from recengine.parts.context import FeatureContext
from recengine.learning.model import RankerModel
folder, out, address, die_after = sys.argv[1:]
finish = batch._Manifest.finish

def finish_then_die(manifest, chunk, rows, duplicates=0):
    # SIGKILL right after the manifest records its `die_after`th chunk: mid-job, the same point every run.
    finish(manifest, chunk, rows, duplicates)
    if len(manifest.rows) == int(die_after):
        os.kill(os.getpid(), signal.SIGKILL)

batch._Manifest.finish = finish_then_die
ray.init(address=address, log_to_driver=False)
context = FeatureContext.from_frames(pl.read_parquet(f"{folder}/events.parquet"), pl.read_parquet(f"{folder}/items.parquet"))
rank_on_ray(RankerModel.load(f"{folder}/model"), f"{folder}/candidates.parquet", out, context, k=5,
            chunk_rows=300, progress=False, actors=1)
"""


def test_a_driver_killed_mid_job_resumes_skipping_finished_chunks(setup, local_ray, reference, tmp_path):
    # The driver, in its own process, is killed after two chunks are recorded; the same job run again
    # (here, in this process, on the same Ray) skips them and writes the local job's output.
    folder, model, events = setup
    script = tmp_path / "run.py"
    script.write_text(RUN)
    target = tmp_path / "ray.parquet"
    manifest = tmp_path / ".ray.parquet.parts" / "manifest.json"
    killed = subprocess.run([sys.executable, str(script), str(folder), str(target), local_ray, "2"])
    assert killed.returncode == -signal.SIGKILL and not target.exists()
    assert _chunks_done(manifest) == 2
    ran = rank_on_ray(model, folder / "candidates.parquet", target, context_of(events), k=5, chunk_rows=300,
                      progress=False, actors=1)
    assert ran.skipped == 2 and sum(ran.nodes.values()) == ran.chunks - 2 == reference.chunks - 2
    assert target.read_bytes() == reference.output.read_bytes()
    assert not (tmp_path / ".ray.parquet.parts").exists()


def test_a_simulated_cluster_spreads_the_chunks_over_its_nodes(setup, local_cluster, reference, tmp_path):
    # A second Ray node on this machine joins the local Ray (the head, 2 CPUs: a scoring actor, and the
    # read and shuffle tasks), with 1 CPU for a second scoring actor; Ray spreads the actors over the
    # nodes. One node added, not more: each costs seconds to start.
    folder, model, events = setup
    added = local_cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    try:
        local_cluster.wait_for_nodes()
        ran = rank_on_ray(model, folder / "candidates.parquet", tmp_path / "ray.parquet", context_of(events), k=5,
                          chunk_rows=300, progress=False, actors=2)
        assert sorted(ran.nodes) == sorted([local_cluster.head_node.node_id, added.node_id])
        assert min(ran.nodes.values()) >= 2 and sum(ran.nodes.values()) == ran.chunks
        assert ran.output.read_bytes() == reference.output.read_bytes()
    finally:
        local_cluster.remove_node(added)


def _chunks_done(manifest: Path) -> int:
    try:
        return len(json.loads(manifest.read_text())["rows"])
    except (FileNotFoundError, ValueError):
        return 0



def test_requests_all_before_the_first_event_are_refused_before_any_work(setup, local_ray, tmp_path):
    from recengine.errors import DataError

    folder, model, events = setup
    early = pl.DataFrame({"user_id": [1, 2], "timestamp": [events["timestamp"].min() - timedelta(days=1)] * 2})
    early.write_parquet(tmp_path / "early.parquet")
    with pytest.raises(DataError, match="every request is at or before the first event"):
        rank_on_ray(model, tmp_path / "early.parquet", tmp_path / "out.parquet", context_of(events), k=5, generate=True,
                    progress=False, actors=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["early.parquet"]  # nothing written


def test_the_address_check_passes_a_real_ray_head(local_ray):
    # The driver's bounded check (a TCP connection and an HTTP/2 greeting) must let a real head through.
    from recengine.running.distributed import _check_answers, check_address

    assert check_address(local_ray)[1] == int(local_ray.rsplit(":", 1)[1])
    _check_answers(local_ray, 10)


def test_a_damaged_part_left_by_a_local_job_is_set_aside_and_redone_on_ray(setup, local_ray, reference, tmp_path,
                                                                           monkeypatch, capsys):
    # The engines share the manifest: a local job stopped before its merge, one part truncated, is
    # finished on Ray, which ranks that chunk again (said once) and writes the local job's bytes.
    from recengine.running import batch

    folder, model, events = setup
    target = tmp_path / "ray.parquet"

    def stop(*_):
        raise RuntimeError("stopped before the merge")

    with monkeypatch.context() as patched:
        patched.setattr(batch, "merge_parts", stop)
        with pytest.raises(RuntimeError):
            rank_file(model, folder / "candidates.parquet", target, context_of(events), k=5, chunk_rows=300, progress=False)
    part = tmp_path / ".ray.parquet.parts" / "part-00003.parquet"
    part.write_bytes(part.read_bytes()[:-20])
    capsys.readouterr()
    ran = rank_on_ray(model, folder / "candidates.parquet", target, context_of(events), k=5, chunk_rows=300,
                      progress=False, actors=1)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("recengine:")]
    assert len(said) == 1 and f"{part} is damaged" in said[0] and "ranking chunk 3 again" in said[0], said
    assert ran.skipped == ran.chunks - 1 and sum(ran.nodes.values()) == 1
    assert target.read_bytes() == reference.output.read_bytes()


# Training on Ray: the chunks of training requests are Ray tasks; the parts, and so the model, are the
# local training's to the byte.

@pytest.fixture(scope="module")
def local_training():
    from recengine.core.data import Dataset
    from recengine.learning.training import train

    data = Dataset(interactions(n_users=120, per_user=20).lazy(), catalogue().lazy())
    fs = feature_set(num_boost_round=20, num_threads=1)
    return data, fs, train(data, fs, progress=False, say=lambda *_: None, chunk_requests=40)


def test_training_on_ray_gives_the_local_model_byte_for_byte(local_training, local_ray):
    from recengine.learning.training import train
    from recengine.running.distributed import ray_chunks

    data, fs, local = local_training
    runner = ray_chunks()
    ran = train(data, fs, progress=False, say=lambda *_: None, chunk_requests=40, run_chunks=runner)
    assert len(ran.train.parts) == len(local.train.parts) > 3 and len(ran.validation.parts) == len(local.validation.parts) > 1
    assert sum(runner.nodes.values()) == len(ran.train.parts) + len(ran.validation.parts)  # validation's chunks too
    for split in ("train", "validation"):
        assert [p.read_bytes() for p in getattr(ran, split).parts] == [p.read_bytes() for p in getattr(local, split).parts]
    assert ran.model.booster.model_to_string() == local.model.booster.model_to_string()
    assert ran.metrics == local.metrics


def test_training_on_a_simulated_cluster_uses_both_nodes(local_training, local_cluster):
    from recengine.learning.training import train
    from recengine.running.distributed import ray_chunks

    data, fs, local = local_training
    added = local_cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    try:
        local_cluster.wait_for_nodes()
        runner = ray_chunks()
        ran = train(data, fs, progress=False, say=lambda *_: None, chunk_requests=20, run_chunks=runner)
        assert sorted(runner.nodes) == sorted([local_cluster.head_node.node_id, added.node_id])
        # Another chunk size, the same model: the parts concatenate to the same table.
        assert ran.model.booster.model_to_string() == local.model.booster.model_to_string()
    finally:
        local_cluster.remove_node(added)


# LightGBM on Ray Train: one worker is the local training; several train LightGBM's data-parallel
# learner, each on whole request groups, and stop at the same round.

def _fit_on_ray(local, workers=None):
    from recengine.learning.training import REQUEST_KEYS, fit
    from recengine.running.ray_lightgbm import ray_lightgbm

    ranker = local.model.spec["feature_set"]["ranker"]
    runner = ray_lightgbm(workers=workers)
    booster, history = fit(local.train, local.validation, local.model.spec["features"], REQUEST_KEYS, ranker, False, runner)
    return booster, history, runner.workers


def test_lightgbm_on_one_ray_worker_is_the_local_model_byte_for_byte(local_training, local_ray):
    from recengine.learning.training import train
    from recengine.running.ray_lightgbm import ray_lightgbm

    data, fs, local = local_training
    ran = train(data, fs, progress=False, say=lambda *_: None, chunk_requests=40, run_boost=ray_lightgbm())
    assert ran.model.spec["early_stopped_at"] == local.model.spec["early_stopped_at"]
    assert ran.model.booster.model_to_string() == local.model.booster.model_to_string()  # the refit's too
    assert ran.history == local.history and ran.metrics == local.metrics


def test_lightgbm_on_a_simulated_2_node_cluster_is_reproducible_and_learns_as_well(local_training, local_cluster):
    data, fs, local = local_training
    added = local_cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    try:
        local_cluster.wait_for_nodes()
        booster, history, workers = _fit_on_ray(local)  # one worker per node
        again, _, _ = _fit_on_ray(local)
    finally:
        local_cluster.remove_node(added)
    text = booster.model_to_string()
    assert workers == 2 and "[tree_learner: data]" in text and "[num_machines: 2]" in text
    assert "[machines: ]" in text  # the run's ports are not part of the model
    assert text == again.model_to_string()
    # The shards hold different groups than one machine bins, so the trees differ; the early-stopped
    # validation NDCG@10 stays within what tiny data varies by.
    best, local_best = max(history["validation_ndcg@10"]), max(local.history["validation_ndcg@10"])
    assert text != local.model.booster.model_to_string() and best >= 0.9 * local_best, (best, local_best)


def test_more_lightgbm_workers_than_training_parts_are_fewer_workers(local_training, local_ray):
    from recengine.running.ray_lightgbm import _shards
    from recengine.learning.training import REQUEST_KEYS, Boost

    data, fs, local = local_training
    job = Boost({}, local.train, None, local.model.spec["features"], REQUEST_KEYS, 1)
    shards = _shards(job, Path("unused"), 100)
    assert [part for shard in shards for part in shard] == [str(p) for p in local.train.parts]  # whole parts, in order
    assert len(shards) == len(local.train.parts) and all(len(shard) == 1 for shard in shards)
    two = _shards(job, Path("unused"), 2)
    assert [part for shard in two for part in shard] == [str(p) for p in local.train.parts]
    rows = {str(p): pl.read_parquet(p).filter((pl.col("label") > 0).any().over("user_id", "timestamp")).height
            for p in local.train.parts}
    sums = [sum(rows[p] for p in shard) for shard in two]
    assert len(two) == 2 and abs(sums[0] - sums[1]) <= max(rows.values()), sums  # balanced by the rows LightGBM learns from


def test_the_cli_trains_on_ray(local_training, local_ray, cli_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run goes to this folder's mlruns/
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data, fs, local = local_training
    events, items = tmp_path / "events.parquet", tmp_path / "items.parquet"
    data.events.collect().write_parquet(events)
    data.items.collect().write_parquet(items)
    toml = tmp_path / "fs.toml"
    toml.write_text(feature_set_toml(num_boost_round=20, num_threads=1))
    result = cli_run("train", "--events", str(events), "--items", str(items), "--feature-set", str(toml), "--no-register",
                     "--output", str(tmp_path / "model"), "--chunk-requests", "40", "--engine", "ray")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model" / "model.txt").read_text().split("\nparameters:")[0] == \
        local.model.booster.model_to_string().split("\nparameters:")[0]



def test_more_lightgbm_workers_than_the_cluster_has_cpus_are_refused(local_training, local_ray):
    from recengine.errors import ConfigError

    data, fs, local = local_training
    with pytest.raises(ConfigError, match=r"--workers 5: the Ray cluster has 2 CPU\(s\).*--workers 2 or fewer"):
        _fit_on_ray(local, workers=5)
