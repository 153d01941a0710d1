"""Model folders on disk: saving never deletes anything but an older model, loading refuses a damaged
folder with a message (never a crash inside LightGBM), and files follow the umask."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from recengine.core.data import Dataset
from recengine.errors import ConfigError
from recengine.learning.model import MODEL_FILE, SPEC_DIGEST, SPEC_FILE, RankerModel, check_model_destination, check_writable
from recengine.learning.training import train

from synthetic import catalogue, feature_set, interactions


@pytest.fixture(scope="module")
def model() -> RankerModel:
    events = interactions(n_users=40, per_user=15)
    return train(Dataset(events.lazy(), catalogue().lazy()), feature_set(num_boost_round=10, early_stopping_rounds=5),
                 progress=False, say=lambda _: None).model


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_saving_into_a_folder_that_holds_other_files_refuses_and_keeps_them(model, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a recengine model.*todo.txt.*new folder"):
        model.save(notes)
    assert files(notes) == {"todo.txt": b"keep me"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        model.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes"]  # no staging folder left


def test_saving_over_an_older_model_replaces_it_whole(model, tmp_path):
    folder = tmp_path / "model"
    model.save(folder)
    (folder / MODEL_FILE).write_text("stale")
    model.save(folder)
    assert RankerModel.load(folder).booster.num_trees() == model.booster.num_trees()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sorted(p.name for p in model.save(empty).iterdir()) == [MODEL_FILE, SPEC_FILE]


def test_model_folder_and_files_follow_the_umask(model, tmp_path):
    previous = os.umask(0o022)
    try:
        folder = model.save(tmp_path / "model")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def test_the_spec_records_the_model_files_digest_and_a_changed_file_is_refused(model, tmp_path):
    folder = model.save(tmp_path / "model")
    spec = json.loads((folder / SPEC_FILE).read_text())
    assert set(spec["files"]) == {MODEL_FILE} and len(spec["files"][MODEL_FILE]) == 64
    text = (folder / MODEL_FILE).read_text()
    # Same length, still parseable by LightGBM (an edit in its parameters section): only the digest can tell.
    assert "[boosting: gbdt]" in text
    (folder / MODEL_FILE).write_text(text.replace("[boosting: gbdt]", "[boosting: dart]"))
    with pytest.raises(ConfigError, match=r"model\.txt.*does not match the sha256.*train the model again"):
        RankerModel.load(folder)


def test_a_model_saved_without_digests_still_loads(model, tmp_path):
    folder = model.save(tmp_path / "model")
    spec = json.loads((folder / SPEC_FILE).read_text())
    del spec["files"], spec[SPEC_DIGEST]  # as a spec.json written before either digest was recorded
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    loaded = RankerModel.load(folder)
    matrix = np.random.default_rng(0).random((5, len(model.features)))
    assert np.array_equal(loaded.predict(matrix), model.predict(matrix))


@pytest.mark.parametrize("content, expect", [
    ("{\"format\": 1, \"features\": [", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("{\"format\": 1, \"feature_set\": {}}", "'features'"),
    ("{\"format\": 1, \"features\": [\"a\"], \"feature_set\": {}, \"files\": \"x\"}", "'files'"),
])
def test_an_invalid_spec_is_a_clear_error(model, tmp_path, content, expect):
    folder = model.save(tmp_path / "model")
    (folder / SPEC_FILE).write_text(content)
    with pytest.raises(ConfigError, match=expect):
        RankerModel.load(folder)


def test_a_model_text_lightgbm_rejects_is_a_clear_error(model, tmp_path):
    folder = model.save(tmp_path / "model")
    spec = json.loads((folder / SPEC_FILE).read_text())
    del spec["files"], spec[SPEC_DIGEST]
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    text = (folder / MODEL_FILE).read_text()
    (folder / MODEL_FILE).write_text("tree\nversion=v4\n\nend of trees\n")
    with pytest.raises(ConfigError, match="incomplete LightGBM model"):
        RankerModel.load(folder)
    # Well formed, but its parameters are not what LightGBM's reader turns into JSON.
    assert "\n[eval_at: 5,10]\n" in text
    (folder / MODEL_FILE).write_text(text.replace("\n[eval_at: 5,10]\n", "\n[eval_at: x]\n"))
    with pytest.raises(ConfigError, match="LightGBM cannot read it"):
        RankerModel.load(folder)


def test_the_digest_names_the_content(model, tmp_path):
    folder = model.save(tmp_path / "model")
    assert RankerModel.load(folder).digest() == RankerModel.load(model.save(tmp_path / "again")).digest()
    other = RankerModel(model.booster, {**model.spec, "best_iteration": 1})
    assert other.digest() != model.digest()


def test_unwritable_destinations_are_refused_before_any_work(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(ConfigError, match="blocker is a file, not a folder"):
        check_model_destination(tmp_path / "blocker" / "model")
    if Path("/proc/self").is_dir():  # a folder no one can create files in, root included
        with pytest.raises(ConfigError, match="cannot write in folder /proc"):
            check_writable(Path("/proc/recengine"), "--output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="cannot write in folder"):
        check_model_destination(locked / "model")


def test_recommend_aligns_string_ids_and_says_which_requests_got_nothing(model, tmp_path, monkeypatch, cli_run):
    import polars as pl

    monkeypatch.chdir(tmp_path)
    model.save("model")
    interactions(n_users=40, per_user=15).write_csv("events.csv")
    catalogue().write_csv("items.csv")
    # String ids against the events' integers; the third request is before any event.
    pl.DataFrame({"user_id": ["1", "2", "3"], "timestamp": ["2025-01-01", "2025-01-01", "2020-01-01"]}).write_parquet("requests.parquet")
    done = cli_run("recommend", "--model", "model", "--events", "events.csv", "--items", "items.csv",
                   "--requests", "requests.parquet", "--k", "3", "--output", "recs.parquet")
    assert done.exit_code == 0, done.output
    recs = pl.read_parquet("recs.parquet")
    assert recs.schema["user_id"] == pl.Int64 and recs.group_by("user_id").len().sort("user_id").rows() == [(1, 3), (2, 3)]
    assert "warning: 1 of 3 requests got no recommendations (1 of them at or before the first event" in done.output


def test_a_model_folder_with_adapters_is_a_model_folder_again_for_the_next_train_output(tmp_path):
    from recengine.learning.model import check_model_destination

    folder = tmp_path / "model"
    (folder / "learned").mkdir(parents=True)
    (folder / "adapters").mkdir()
    (folder / "model.txt").write_text("tree")
    (folder / "spec.json").write_text("{}")
    check_model_destination(folder)  # was refused as "not a recengine model (it holds adapters)"
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="notes.txt"):
        check_model_destination(folder)
