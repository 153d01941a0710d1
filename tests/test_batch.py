"""`recengine rank`: chunked, atomic, resumable batch ranking, and input errors that write nothing."""

import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from recengine.running.batch import rank_file
from recengine.errors import ConfigError, DataError
from recengine.parts.context import FeatureContext

from synthetic import catalogue, feature_set, interactions, ranking_job


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ranking_job(tmp_path_factory.mktemp("batch"), interactions(), feature_set(), per_user=40)


def context_of(events):
    return FeatureContext.from_frames(events, catalogue())


def test_chunked_output_equals_ranking_everything_at_once(setup, tmp_path):
    folder, model, events = setup
    one = rank_file(model, folder / "candidates.parquet", tmp_path / "one.parquet", context_of(events), k=5, chunk_rows=10**9, progress=False)
    many = rank_file(model, folder / "candidates.parquet", tmp_path / "many.parquet", context_of(events), k=5, chunk_rows=700, progress=False)
    assert one.chunks == 1 and many.chunks > 5
    a = pl.read_parquet(one.output).sort("user_id", "rank")
    b = pl.read_parquet(many.output).sort("user_id", "rank")
    assert a.equals(b)
    assert a.columns == ["user_id", "timestamp", "item_id", "rank", "score"]
    assert a.group_by("user_id").len()["len"].max() == 5 and a["user_id"].n_unique() == 150
    assert not (tmp_path / ".many.parquet.parts").exists()


def test_rows_ranked_now_take_the_serving_path_and_score_as_the_point_in_time_pipeline(setup, tmp_path):
    # Rows without a timestamp are ranked just after the last event, from a serving state built once;
    # rows with one go through the point-in-time pipeline. Both must give the same scores.
    folder, model, events = setup
    candidates = pl.read_parquet(folder / "candidates.parquet")
    later = candidates.filter(pl.col("user_id") < 20).with_columns(pl.col("user_id") + 1000)  # unknown users
    pl.concat([candidates, later]).drop("timestamp").write_parquet(tmp_path / "now.parquet")
    context = context_of(events)
    fast = pl.read_parquet(rank_file(model, tmp_path / "now.parquet", tmp_path / "a.parquet", context, k=40, progress=False).output)
    now = events["timestamp"].max() + timedelta(seconds=1)
    rows = pl.concat([candidates, later]).with_columns(pl.lit(now).alias("timestamp"))
    exact = rows.with_columns(pl.Series("score", model.score(model.feature_set().given_rows(rows, ["user_id", "timestamp"], context))))
    joined = fast.join(exact, on=["user_id", "item_id"], suffix="_exact")
    assert joined.height == fast.height == exact.group_by("user_id").head(40).height
    np.testing.assert_allclose(joined["score"], joined["score_exact"], rtol=1e-9, atol=1e-9)


def test_generate_mode_ranks_the_sources_candidates(setup, tmp_path):
    folder, model, events = setup
    pl.DataFrame({"request_id": ["a", "b"], "user_id": [3, 999]}).write_csv(tmp_path / "requests.csv")
    report = rank_file(model, tmp_path / "requests.csv", tmp_path / "out.parquet", context_of(events), k=4, generate=True, progress=False)
    out = pl.read_parquet(report.output)
    assert out.group_by("request_id").len().sort("request_id")["len"].to_list() == [4, 4]
    assert out.join(events.select("user_id", "item_id"), on=["user_id", "item_id"]).height == 0


RUN = """
import sys
from recengine.running.batch import rank_file
from recengine.parts.context import FeatureContext
from recengine.learning.model import RankerModel
import polars as pl
folder, out = sys.argv[1], sys.argv[2]
context = FeatureContext.from_frames(pl.read_parquet(f"{folder}/events.parquet"), pl.read_parquet(f"{folder}/items.parquet"))
rank_file(RankerModel.load(f"{folder}/model"), f"{folder}/candidates.parquet", out, context, k=5, chunk_rows=400, progress=False)
"""


def test_a_job_killed_at_random_points_resumes_to_identical_bytes(setup, tmp_path):
    folder, _, _ = setup
    script = tmp_path / "run.py"
    script.write_text(RUN)
    reference = tmp_path / "reference.parquet"
    subprocess.run([sys.executable, str(script), str(folder), str(reference)], check=True)
    target = tmp_path / "resumed.parquet"
    manifest = tmp_path / ".resumed.parquet.parts" / "manifest.json"
    rng = random.Random(7)
    kills, finished = 0, 0
    for _ in range(4):
        # Let the job finish at least one more chunk, then kill it at a random moment (often mid-chunk).
        job = subprocess.Popen([sys.executable, str(script), str(folder), str(target)])
        while job.poll() is None and _chunks_done(manifest) <= finished:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.15))
        if job.poll() is None:
            job.send_signal(signal.SIGKILL)
            kills += 1
        job.wait()
        finished = _chunks_done(manifest)
        assert not target.exists() or job.returncode == 0  # never a partial output file
    assert kills >= 3
    subprocess.run([sys.executable, str(script), str(folder), str(target)], check=True)
    assert target.read_bytes() == reference.read_bytes()
    assert not list(tmp_path.glob(".resumed.parquet.parts"))


def _chunks_done(manifest) -> int:
    import json

    try:
        return len(json.loads(manifest.read_text())["rows"])
    except (FileNotFoundError, ValueError):
        return 0


def test_bad_input_stops_before_any_output(setup, tmp_path):
    folder, model, events = setup
    out = tmp_path / "out.parquet"
    pl.DataFrame({"user": [1], "item_id": [2]}).write_parquet(tmp_path / "nouser.parquet")
    with pytest.raises(DataError, match="user_id"):
        rank_file(model, tmp_path / "nouser.parquet", out, context_of(events), progress=False)
    pl.DataFrame({"user_id": [1, None], "item_id": [2, 3]}).write_parquet(tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match="null"):
        rank_file(model, tmp_path / "nulls.parquet", out, context_of(events), progress=False)
    no_items = FeatureContext.from_frames(events)  # the feature set needs the items' genres
    with pytest.raises(ConfigError, match="genres"):
        rank_file(model, folder / "candidates.parquet", out, no_items, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))


def test_a_model_needing_a_missing_plugin_names_it(setup, tmp_path):
    from recengine.learning.model import RankerModel

    folder, model, events = setup
    spec = {**model.spec, "parts": [*model.spec["parts"], {"kind": "feature_extractors", "name": "sentiment",
                                                           "plugin": "recengine-sentiment", "version": "1.2.0"}]}
    with pytest.raises(ConfigError, match="recengine-sentiment"):
        RankerModel(model.booster, spec).check_plugins()
    changed = {**model.spec, "parts": [{**model.spec["parts"][0], "version": "0.0.1"}]}
    with pytest.raises(ConfigError, match="0.0.1"):
        RankerModel(model.booster, changed).check_plugins()


PARTIAL = """
import sys
from recengine.running.batch import rank_file
from recengine.parts.context import FeatureContext
from recengine.learning.model import RankerModel
import polars as pl
folder, events, items, out = sys.argv[1:]
context = FeatureContext.from_frames(pl.read_parquet(events), pl.read_parquet(items))
rank_file(RankerModel.load(f"{folder}/model"), f"{folder}/candidates.parquet", out, context, k=5, chunk_rows=400, progress=False)
"""


def test_a_resume_with_other_items_or_events_is_refused_and_never_mixes_old_parts_in(setup, tmp_path):
    folder, model, events = setup
    # Same row counts, same last event: only a digest of the content tells these apart.
    other_items = catalogue().with_columns(pl.col("genres").reverse())
    first = events["timestamp"].arg_min()
    other_events = events.with_columns(pl.when(pl.int_range(pl.len()) == first).then(pl.col("item_id") + 1)
                                       .otherwise(pl.col("item_id")).alias("item_id"))
    assert other_events["timestamp"].max() == events["timestamp"].max() and other_events.height == events.height
    script = tmp_path / "run.py"
    script.write_text(PARTIAL)
    target = tmp_path / "out.parquet"
    manifest = tmp_path / ".out.parquet.parts" / "manifest.json"
    job = subprocess.Popen([sys.executable, str(script), str(folder), str(folder / "events.parquet"),
                            str(folder / "items.parquet"), str(target)])
    while job.poll() is None and _chunks_done(manifest) < 1:
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL and not target.exists()
    done = _chunks_done(manifest)
    assert done >= 1

    def run(out, events_, items_):
        return rank_file(model, folder / "candidates.parquet", out, FeatureContext.from_frames(events_, items_),
                         k=5, chunk_rows=400, progress=False)

    with pytest.raises(DataError, match="unfinished job whose items differ.*delete"):
        run(target, events, other_items)
    with pytest.raises(DataError, match="unfinished job whose events differ"):
        run(target, other_events, catalogue())
    assert not target.exists() and _chunks_done(manifest) == done  # the earlier job's parts are kept
    # The same command as before finishes the earlier job, as if it had never stopped.
    assert run(target, events, catalogue()).skipped == done
    assert target.read_bytes() == run(tmp_path / "fresh.parquet", events, catalogue()).output.read_bytes()


def test_an_output_that_is_a_folder_is_refused_before_anything_is_written(setup, tmp_path):
    folder, model, events = setup
    (tmp_path / "ranked").mkdir()
    with pytest.raises(ConfigError, match="ranked is an existing folder.*file path"):
        rank_file(model, folder / "candidates.parquet", tmp_path / "ranked", context_of(events), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranked"] and not list((tmp_path / "ranked").iterdir())


def test_string_ids_in_the_input_are_aligned_with_integer_events(setup, tmp_path):
    folder, model, events = setup
    candidates = pl.read_parquet(folder / "candidates.parquet").filter(pl.col("user_id") < 10)
    candidates.write_parquet(tmp_path / "ints.parquet")
    candidates.with_columns(pl.col("user_id", "item_id").cast(pl.String)).write_csv(tmp_path / "strings.csv")
    previous = os.umask(0o022)
    try:
        ints = rank_file(model, tmp_path / "ints.parquet", tmp_path / "a.parquet", context_of(events), k=5, progress=False)
        strings = rank_file(model, tmp_path / "strings.csv", tmp_path / "b.parquet", context_of(events), k=5, progress=False)
    finally:
        os.umask(previous)
    assert pl.read_parquet(strings.output).equals(pl.read_parquet(ints.output))
    assert oct(strings.output.stat().st_mode & 0o777) == oct(0o644)
    candidates.with_columns(pl.format("u{}", "user_id").alias("user_id")).write_csv(tmp_path / "named.csv")
    with pytest.raises(DataError, match=r"named\.csv: column 'user_id' holds ids that are not integers \(row 0: 'u"):
        rank_file(model, tmp_path / "named.csv", tmp_path / "c.parquet", context_of(events), progress=False)
    assert not (tmp_path / "c.parquet").exists()


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(setup, tmp_path):
    from recengine.running.batch import _exclusive, work_folder
    from recengine.errors import DataError

    folder, model, events = setup
    output = tmp_path / "ranked.parquet"
    work = work_folder(output)
    work.mkdir()
    running = _exclusive(work)  # what a running job holds (the kernel drops it if that job dies)
    with pytest.raises(DataError, match="another rank job is writing this output"):
        rank_file(model, folder / "candidates.parquet", output, context_of(events), k=5, chunk_rows=700, progress=False)
    assert not output.exists() and sorted(p.name for p in work.iterdir()) == ["lock"]
    running.close()
    done = rank_file(model, folder / "candidates.parquet", output, context_of(events), k=5, chunk_rows=700, progress=False)
    assert done.output.exists() and not work.exists()


def test_repeated_requests_and_candidates_are_dropped_once_counted_and_ranked_as_without_them(setup, tmp_path):
    folder, model, events = setup
    candidates = pl.read_parquet(folder / "candidates.parquet")
    doubled = pl.concat([candidates, candidates.head(300)])  # 300 candidate rows given twice
    doubled.write_parquet(tmp_path / "doubled.parquet")
    clean = rank_file(model, folder / "candidates.parquet", tmp_path / "clean.parquet", context_of(events), k=5, chunk_rows=700, progress=False)
    again = rank_file(model, tmp_path / "doubled.parquet", tmp_path / "again.parquet", context_of(events), k=5, chunk_rows=700, progress=False)
    assert clean.duplicates == 0 and again.duplicates == 300
    ranked = pl.read_parquet(again.output)
    assert ranked.equals(pl.read_parquet(clean.output))  # a repeated candidate no longer takes two ranks
    assert ranked.select("user_id", "item_id").is_duplicated().sum() == 0
    requests = pl.DataFrame({"user_id": [3, 3, 5, 3]}).with_columns(pl.lit(events["timestamp"].max() + timedelta(hours=1)).alias("timestamp"))
    requests.write_parquet(tmp_path / "requests.parquet")
    report = rank_file(model, tmp_path / "requests.parquet", tmp_path / "generated.parquet", context_of(events), k=10,
                       generate=True, progress=False)
    generated = pl.read_parquet(report.output)
    assert report.duplicates == 2 and report.requests == 2  # was: user 3's top 10 held 5 items, each twice
    assert generated.group_by("user_id").agg(pl.col("item_id").n_unique(), pl.len()).filter(pl.col("item_id") != pl.col("len")).height == 0
    assert generated.filter(pl.col("user_id") == 3).height == 10
