"""MLflow tracking against a real SQLite store in ./mlruns, and the tracking server's REST API."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from recengine.data import Dataset
from recengine.model import load_model
from recengine.training import train

from synthetic import catalogue, feature_set, interactions


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trainings with different feature sets, logged to the default store under a fresh cwd."""
    from recengine.tracking import log_training

    folder = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        data = Dataset(interactions().lazy(), catalogue().lazy())
        sets = [feature_set(), feature_set(objective="rank_xendcg", learning_rate=0.01)]
        sets[1].name = "synthetic-xendcg"
        results = [train(data, fs, progress=False, say=lambda _: None) for fs in sets]
        logged = [log_training(r, fs, "compare", "synthetic-ranker") for r, fs in zip(results, sets)]
        yield folder, results, logged, sets


def test_runs_land_in_sqlite_inside_mlruns(runs):
    folder, _, logged, _ = runs
    assert (folder / "mlruns" / "mlflow.db").is_file()
    run_dir = folder / "mlruns" / "artifacts" / logged[0].run_id / "artifacts"
    names = {p.name for p in run_dir.iterdir()}
    assert {"feature_set.toml", "feature_importance.csv", "feature_importance.png", "ndcg_by_iteration.png"} <= names
    assert not list((folder / "mlruns").rglob("*.pkl"))


def test_run_holds_params_metrics_history_and_lineage(runs):
    import mlflow

    folder, results, logged, _ = runs
    client = mlflow.MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")
    run = client.get_run(logged[0].run_id)
    assert run.data.params["feature_set"] == "synthetic"
    assert run.data.params["candidates.covisitation"] == "k=60,window=3,recent=5"
    assert run.data.metrics["ndcg_at_10"] == pytest.approx(results[0].metrics["ndcg@10"])
    assert "popularity_ndcg_at_10" in run.data.metrics and "source_covisitation_ndcg_at_10" in run.data.metrics
    history = client.get_metric_history(logged[0].run_id, "validation_ndcg_at_10")
    assert [m.step for m in history] == list(range(1, len(results[0].history["validation_ndcg@10"]) + 1))
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation"}


def test_registry_keeps_champion_unless_beaten_or_promoted(runs):
    import mlflow
    from recengine.tracking import log_training

    folder, results, logged, sets = runs
    assert logged[0].champion and logged[0].version == "1"
    better = results[1].metrics["ndcg@10"] > results[0].metrics["ndcg@10"]
    assert logged[1].champion == better
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        forced = log_training(results[0], sets[0], "compare", "synthetic-ranker", promote=True)
        client = mlflow.MlflowClient()
        assert forced.champion and str(client.get_model_version_by_alias("synthetic-ranker", "champion").version) == "3"


def test_models_load_by_alias_and_as_pyfunc_and_score_alike(runs):
    import mlflow

    folder, results, logged, _ = runs
    rows = results[0].validation.rows.head(50)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        by_version = load_model("models:/synthetic-ranker/1")
        pyfunc = mlflow.pyfunc.load_model(logged[0].model_uri)
    expected = results[0].model.score(rows)
    assert np.array_equal(by_version.score(rows), expected)
    assert np.allclose(pyfunc.predict(rows.select(by_version.features).to_pandas())["score"].to_numpy(), expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_tracking_server_shows_both_runs_side_by_side(runs):
    folder, results, logged, _ = runs
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/mlruns/mlflow.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        found = _call(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [logged[0].experiment_id]})
        by_id = {run["info"]["run_id"]: run["data"] for run in found["runs"]}
        assert {logged[0].run_id, logged[1].run_id} <= set(by_id)
        for run, result, objective in zip(logged, results, ("lambdarank", "rank_xendcg")):
            params = {p["key"]: p["value"] for p in by_id[run.run_id]["params"]}
            metrics = {m["key"]: m["value"] for m in by_id[run.run_id]["metrics"]}
            assert params["ranker.objective"] == objective
            assert metrics["ndcg_at_10"] == pytest.approx(result.metrics["ndcg@10"])
        history = _call(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={logged[1].run_id}&metric_key=validation_ndcg_at_10")
        assert len(history["metrics"]) == len(results[1].history["validation_ndcg@10"])
    finally:
        server.terminate()
        server.wait(timeout=30)
