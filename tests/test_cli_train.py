"""The train → recommend → evaluate workflow from the command line alone, on files."""

import polars as pl
import pytest

from synthetic import catalogue, interactions

FEATURES = """
name = "cli"
[candidates.popular]
k = 40
[candidates.covisitation]
k = 60
window = 3
[features.item_popularity]
windows_days = [7, 30]
[features.category_affinity]
field = "genres"
[features.covisitation]
window = 3
[labels]
samples_per_user = 3
[ranker]
num_boost_round = 60
early_stopping_rounds = 20
min_data_in_leaf = 20
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    events = interactions().rename({"user_id": "uid", "item_id": "iid"})
    events.with_columns(pl.col("timestamp").dt.epoch("s")).write_csv("events.csv")
    catalogue().rename({"item_id": "iid"}).write_parquet("items.parquet")
    (tmp_path / "cli.toml").write_text(FEATURES)
    return tmp_path


def test_train_then_recommend_then_evaluate(project, cli_run):
    data = ["--events", "events.csv", "--items", "items.parquet", "--columns", "uid=user_id,iid=item_id"]
    trained = cli_run("train", *data, "--feature-set", "cli.toml", "--experiment", "cli", "--output", "model")
    assert trained.exit_code == 0, trained.output
    assert "run id:" in trained.output and "models:/recengine-cli/1" in trained.output
    assert "@champion now points here" in trained.output
    assert (project / "model" / "model.txt").is_file()

    pl.DataFrame({"uid": [0, 1, 5], "timestamp": ["2025-01-01T00:00:00Z"] * 3}).write_csv("requests.csv")
    out = cli_run("recommend", "--model", "models:/recengine-cli@champion", *data, "--requests", "requests.csv",
                  "--k", "5", "--output", "out/recs.parquet")
    assert out.exit_code == 0, out.output
    recs = pl.read_parquet(project / "out" / "recs.parquet")
    assert recs.columns == ["user_id", "timestamp", "item_id", "rank", "score"]
    assert recs.group_by("user_id").len()["len"].to_list() == [5, 5, 5]
    seen = interactions().select("user_id", "item_id")
    assert recs.join(seen, on=["user_id", "item_id"]).height == 0

    # Without --requests (the quickstart's and the nightly job's case): every user, just after the last event.
    everyone = cli_run("recommend", "--model", "model", *data, "--k", "3", "--output", "out/everyone.parquet")
    assert everyone.exit_code == 0, everyone.output
    assert pl.read_parquet(project / "out" / "everyone.parquet")["user_id"].n_unique() == interactions()["user_id"].n_unique()

    evaluated = cli_run("evaluate", "--model", "model", *data, "--since", "2024-05-01")
    assert evaluated.exit_code == 0, evaluated.output
    assert "ranker" in evaluated.output and "popularity" in evaluated.output
    assert "optimistic" in evaluated.output  # the model saw the window: the command says so


def test_bad_inputs_fail_clearly_and_write_nothing(project, cli_run):
    missing = cli_run("recommend", "--model", "models:/nope@champion", "--output", "x.parquet")
    assert missing.exit_code == 2 and "nope" in missing.output
    bad_set = cli_run("train", "--feature-set", "absent.toml")
    assert bad_set.exit_code == 2 and "absent.toml" in bad_set.output
    data = ["--events", "events.csv", "--columns", "uid=user_id,iid=item_id"]
    no_items = cli_run("train", *data, "--feature-set", "cli.toml", "--no-register")
    assert no_items.exit_code == 2 and "genres" in no_items.output and "--items" in no_items.output
    data += ["--items", "items.parquet"]
    trained = cli_run("train", *data, "--feature-set", "cli.toml", "--output", "model", "--no-register")
    assert trained.exit_code == 0, trained.output
    pl.DataFrame({"user": [1]}).write_csv("requests.csv")
    wrong = cli_run("recommend", "--model", "model", *data, "--requests", "requests.csv", "--output", "y.parquet")
    assert wrong.exit_code == 2 and "user_id" in wrong.output
    assert not (project / "x.parquet").exists() and not (project / "y.parquet").exists()
