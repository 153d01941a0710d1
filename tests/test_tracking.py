"""MLflow tracking against a real SQLite store in ./mlruns, and the tracking server's REST API."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

from recengine.core.data import Dataset
from recengine.errors import ConfigError
from recengine.parts.featureset import FeatureSet
from recengine.learning.model import load_model
from recengine.learning.training import train

from synthetic import catalogue, feature_set, feature_set_toml, interactions

BASE = feature_set_toml()
# A variant file as a person makes one: the same TOML, another objective and learning rate.
VARIANT = (BASE.replace('name = "synthetic"', 'name = "synthetic-xendcg"')
           .replace("Popular and", "Cross-entropy ranking over popular and")
           .replace("min_data_in_leaf = 20", 'min_data_in_leaf = 20\nobjective = "rank_xendcg"\nlearning_rate = 0.01'))


def _git(folder, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True, capture_output=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trainings of two feature-set files in a git checkout, each inside its MLflow run, logged to
    the default store under a fresh cwd. Also yields each training's own wall time."""
    from recengine.interfaces.tracking import log_training, training_run

    folder = tmp_path_factory.mktemp("project")
    (folder / "features").mkdir()
    (folder / "features" / "synthetic.toml").write_text(BASE)
    (folder / "features" / "synthetic-xendcg.toml").write_text(VARIANT)
    _git(folder, "init", "-q")
    _git(folder, "add", "features")
    _git(folder, "commit", "-q", "-m", "feature sets")
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        data = Dataset(interactions().lazy(), catalogue().lazy())
        paths = ["features/synthetic.toml", "features/synthetic-xendcg.toml"]
        sets = [FeatureSet.load(p) for p in paths]
        results, logged, walls = [], [], []
        for fs, path in zip(sets, paths):
            with training_run(fs, "compare", feature_set_path=path):
                start = time.time()
                results.append(train(data, fs, progress=False, say=lambda _: None))
                walls.append(time.time() - start)
                logged.append(log_training(results[-1], fs, "compare", "synthetic-ranker"))
        assert not [w for w in caught if "type hints" in str(w.message)], "MLflow's type-hint warning is back"
        yield folder, results, logged, sets, walls


def test_runs_land_in_sqlite_inside_mlruns(runs):
    folder, _, logged, *_ = runs
    assert (folder / "mlruns" / "mlflow.db").is_file()
    run_dir = folder / "mlruns" / "artifacts" / logged[0].run_id / "artifacts"
    names = {p.name for p in run_dir.iterdir()}
    assert {"feature_set.toml", "feature_importance.csv", "feature_importance.png", "ndcg_by_iteration.png"} <= names
    assert not list((folder / "mlruns").rglob("*.pkl"))


def test_run_holds_params_metrics_history_and_lineage(runs):
    import mlflow

    folder, results, logged, *_ = runs
    client = mlflow.MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")
    run = client.get_run(logged[0].run_id)
    assert run.data.params["feature_set"] == "synthetic"
    assert run.data.params["candidates.covisitation"] == "k=60,window=3,recent=5"
    assert run.data.metrics["ndcg_at_10"] == pytest.approx(results[0].metrics["ndcg@10"])
    # The headline at the top level, everything else grouped by prefix; the per-iteration curve is a curve.
    top = {k for k in run.data.metrics if "/" not in k}
    assert top == {"ndcg_at_10", "ndcg_at_5", "recall_at_10", "hr_at_10", "mrr_at_10", "auc", "coverage_at_10"}
    assert "baseline/popularity/ndcg_at_10" in run.data.metrics and "baseline/source_covisitation/ndcg_at_10" in run.data.metrics
    assert {"time/data_s", "time/lightgbm_s", "time/total_s"} <= set(run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics), "MLflow's system metrics were not logged"
    history = client.get_metric_history(logged[0].run_id, "curve/lightgbm_validation_ndcg_at_10")
    assert [m.step for m in history] == list(range(1, len(results[0].history["validation_ndcg@10"]) + 1))
    spec = results[0].model.spec
    assert run.data.params["best_iteration"] == str(spec["early_stopped_at"])  # LightGBM's best, not the refit's
    assert run.data.params["final_model_rounds"] == str(spec["best_iteration"])
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"raw data", "training", "validation"}


def test_registry_keeps_champion_unless_beaten_or_promoted(runs):
    import mlflow
    from recengine.interfaces.tracking import log_training

    folder, results, logged, sets, _ = runs
    assert logged[0].champion and logged[0].version == "1"
    better = results[1].metrics["ndcg@10"] > results[0].metrics["ndcg@10"]
    assert logged[1].champion == better
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        forced = log_training(results[0], sets[0], "compare", "synthetic-ranker", promote=True)
        client = mlflow.MlflowClient()
        assert forced.champion and str(client.get_model_version_by_alias("synthetic-ranker", "champion").version) == "3"
        # Each version says what it scored and why it is, or is not, the champion.
        first, second, third = (client.get_model_version("synthetic-ranker", v) for v in ("1", "2", "3"))
    assert f"{results[0].metrics['ndcg@10']:.4f}" in first.description and logged[0].run_name in first.description
    assert first.tags["champion_decision"] == "@champion: the first version: no champion yet"
    assert second.tags["ndcg_at_10"] == f"{results[1].metrics['ndcg@10']:.4f}"
    assert ("beats the champion, version 1" if better else "does not beat the champion, version 1") in second.tags["champion_decision"]
    assert third.tags["champion_decision"].startswith("@champion: promoted with --promote although it does not beat")
    assert second.tags["data.digest"] == first.tags["data.digest"] == results[0].lineage["digest"]


def test_logged_model_holds_no_local_paths(runs):
    import yaml

    folder, _, logged, *_ = runs
    model_id = logged[0].model_uri.removeprefix("models:/")
    flavor = yaml.safe_load((folder / "mlruns" / "artifacts" / "models" / model_id / "artifacts" / "MLmodel").read_text())
    flavor = flavor["flavors"]["python_function"]
    assert flavor["model_code_path"] == "mlflow_model.py"
    assert flavor["artifacts"]["ranker"] == {"path": "artifacts/ranker", "uri": "artifacts/ranker"}


def test_models_load_by_alias_and_as_pyfunc_and_score_alike(runs):
    import mlflow

    folder, results, logged, *_ = runs
    rows = results[0].validation.rows.head(50)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        by_version = load_model("models:/synthetic-ranker/1")
        pyfunc = mlflow.pyfunc.load_model(logged[0].model_uri)
    expected = results[0].model.score(rows)
    assert np.array_equal(by_version.score(rows), expected)
    assert np.allclose(pyfunc.predict(rows.select(by_version.features).to_pandas())["score"].to_numpy(), expected)


def test_a_pyfunc_model_with_a_damaged_model_file_refuses_to_load(runs, tmp_path):
    import shutil

    import mlflow

    folder, _, logged, *_ = runs
    model_id = logged[0].model_uri.removeprefix("models:/")
    copy = tmp_path / "model"
    shutil.copytree(folder / "mlruns" / "artifacts" / "models" / model_id / "artifacts", copy)
    text = (copy / "artifacts" / "ranker" / "model.txt").read_bytes()
    (copy / "artifacts" / "ranker" / "model.txt").write_bytes(text[: len(text) // 2])
    with pytest.raises(Exception, match="does not match the sha256 in spec.json"):
        mlflow.pyfunc.load_model(str(copy))


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
    folder, results, logged, _, walls = runs
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
        by_id = {run["info"]["run_id"]: run for run in found["runs"]}
        assert {logged[0].run_id, logged[1].run_id} <= set(by_id)
        seen = []
        for run, result, objective, wall in zip(logged, results, ("lambdarank", "rank_xendcg"), walls):
            info, data = by_id[run.run_id]["info"], by_id[run.run_id]["data"]
            params = {p["key"]: p["value"] for p in data["params"]}
            metrics = {m["key"]: m["value"] for m in data["metrics"]}
            tags = {t["key"]: t["value"] for t in data["tags"]}
            assert params["ranker.objective"] == objective
            assert metrics["ndcg_at_10"] == pytest.approx(result.metrics["ndcg@10"])
            # The run covers the training, not only the logging after it.
            assert (int(info["end_time"]) - int(info["start_time"])) / 1000 >= wall
            assert info["status"] == "FINISHED"
            seen.append((info["run_name"], tags))
        (first, first_tags), (second, second_tags) = seen
        # Runs a person can tell apart: the file's stem and what differs, the TOML's description, the file.
        assert first == "synthetic"
        assert second == "synthetic-xendcg (objective=rank_xendcg, learning_rate=0.01)"
        assert first_tags["mlflow.note.content"].startswith("Popular and co-visitation candidates")
        assert second_tags["mlflow.note.content"].startswith("Cross-entropy ranking over popular")
        assert "`ranker.learning_rate`: 0.05 → 0.01" in second_tags["mlflow.note.content"]
        assert (first_tags["feature_set.path"], second_tags["feature_set.path"]) == (
            "features/synthetic.toml", "features/synthetic-xendcg.toml")
        assert first_tags["feature_set.digest"] != second_tags["feature_set.digest"]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout.strip()
        assert first_tags["mlflow.source.git.commit"] == second_tags["mlflow.source.git.commit"] == commit
        # Same data, same digest, whatever the feature set.
        assert first_tags["data.digest"] == second_tags["data.digest"] == results[0].lineage["digest"]
        history = _call(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={logged[1].run_id}"
                        "&metric_key=curve/lightgbm_validation_ndcg_at_10")
        assert len(history["metrics"]) == len(results[1].history["validation_ndcg@10"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_early_stopping_follows_the_configured_metric_where_the_peaks_differ():
    """Through LightGBM itself, with validation NDCG@5 peaking at round 3 and NDCG@10 at round 9
    (curves given as LightGBM evals): the stop and the best iteration follow the named metric."""
    import lightgbm as lgb

    from recengine.learning.training import StopOnMetric

    rounds = np.arange(1, 41)
    curves = {"ndcg@5": 0.5 - np.abs(rounds - 3) / 100, "ndcg@10": 0.5 - np.abs(rounds - 9) / 100}
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 3)), rng.integers(0, 2, 200)
    train_set = lgb.Dataset(x, y)
    valid_set = lgb.Dataset(x[:50], y[:50], reference=train_set)
    for metric, peak in (("ndcg@5", 3), ("ndcg@10", 9)):
        evaluated: list[int] = []

        def feval(_preds, _data):
            i = len(evaluated)
            evaluated.append(i)
            return [("ndcg@5", curves["ndcg@5"][i], True), ("ndcg@10", curves["ndcg@10"][i], True)]

        booster = lgb.train({"objective": "binary", "metric": "None", "verbosity": -1}, train_set, 40,
                            valid_sets=[valid_set], valid_names=["validation"], feval=feval,
                            callbacks=[StopOnMetric(metric, 5)])
        assert booster.best_iteration == peak and len(evaluated) == peak + 5  # 5 rounds past its peak


@pytest.mark.parametrize("metric", ["ndcg@5", None])
def test_training_stops_on_the_configured_metric(metric):
    """The same through `train`: NDCG@10 (the champion's metric) by default."""
    data = Dataset(interactions(n_users=120, per_user=20).lazy(), catalogue().lazy())
    extra = {"early_stopping_metric": metric} if metric else {}
    fs = feature_set(num_boost_round=60, early_stopping_rounds=15, refit=False, **extra)
    result = train(data, fs, progress=False, say=lambda _: None)
    curve = result.history[f"validation_{metric or 'ndcg@10'}"]
    best = int(np.argmax(curve)) + 1
    assert result.model.spec["early_stopped_at"] == result.model.spec["best_iteration"] == best
    assert len(curve) == min(best + 15, 60)  # stopped 15 rounds after its peak
    assert result.model.spec["early_stopping_metric"] == (metric or "ndcg@10")


def test_unknown_early_stopping_metric_is_refused_before_training():
    fs = feature_set(early_stopping_metric="map@10")
    with pytest.raises(ConfigError, match=r"early_stopping_metric = 'map@10'.*ndcg@10"):
        train(Dataset(interactions(n_users=20).lazy(), catalogue().lazy()), fs, progress=False, say=lambda _: None)


def test_failed_training_ends_its_run_failed_with_the_reason(tmp_path, monkeypatch):
    import mlflow
    from recengine.interfaces.tracking import training_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError), training_run(feature_set(), "failing") as run:
        raise ValueError("the data ran out")
    got = mlflow.MlflowClient().get_run(run.run_id)
    assert got.info.status == "FAILED" and got.data.tags["error"] == "ValueError: the data ran out"
    assert got.data.params["ranker.learning_rate"] == "0.05"  # what it tried is there
    assert not (tmp_path / "mlruns" / "artifacts").exists()  # and no file was written


def test_run_names_spell_out_what_differs():
    from recengine.interfaces.tracking import param_differences, run_name_for

    before = {"candidates.covisitation": "k=60,window=3", "features.interest": "recent=10", "ranker.learning_rate": "0.05",
              "data.events": "100"}
    after = {"candidates.covisitation": "k=60,window=50", "candidates.embedding": "k=100", "ranker.learning_rate": 0.1}
    differences = param_differences(before, after)
    assert run_name_for("variant", differences) == "variant (covisitation(window=50), +embedding, learning_rate=0.1, +1 more)"
    assert run_name_for("variant", []) == "variant"
    assert differences[-1] == ("features.interest", "recent=10", None)


def test_data_digest_is_the_same_in_another_process():
    from recengine.learning.training import data_digest

    code = ("import sys; sys.path.insert(0, 'tests'); from synthetic import catalogue, interactions; "
            "from recengine.learning.training import data_digest; print(data_digest(interactions(), catalogue().lazy()))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parents[1]).stdout.strip()
    assert other == data_digest(interactions().sample(fraction=1.0, shuffle=True, seed=3), catalogue())


def test_a_run_is_compared_with_the_previous_training_not_its_nested_runs(tmp_path, monkeypatch):
    """A tuned training logs its tuning as a child run, which starts after its parent: the next training
    compares itself with the parent (a training), not with that child."""
    import mlflow
    from mlflow.entities import Param
    from recengine.interfaces.tracking import feature_set_params, training_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.create_experiment("nested")
    parent = client.create_run(experiment, start_time=1_000, run_name="before")
    params = feature_set_params(feature_set(learning_rate=0.1))
    client.log_batch(parent.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    child = client.create_run(experiment, start_time=2_000, run_name="before / tuned_interest",
                              tags={"mlflow.parentRunId": parent.info.run_id})
    client.log_param(child.info.run_id, "mode", "head")
    for run in (parent, child):
        client.set_terminated(run.info.run_id)
    with pytest.raises(ValueError), training_run(feature_set(), "nested") as opened:
        raise ValueError("only named")
    assert opened.name == "synthetic (learning_rate=0.05)"
    assert f"previous run `before` ({parent.info.run_id})" in client.get_run(opened.run_id).data.tags["mlflow.note.content"]


def test_the_registry_lock_admits_one_holder_and_takes_over_a_dead_ones(tmp_path, monkeypatch):
    """The promotion lock of stores without a local lock file (a tracking server): a registered model
    only one caller can create."""
    import mlflow
    from recengine.core.store import StoreError, open_store
    from recengine.interfaces.tracking import process_tags, registry_lock

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = open_store()
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    with registry_lock(client, "shop"):
        with pytest.raises(StoreError, match="Another training has been moving @champion of shop .*shop.promotion-lock"):
            with registry_lock(client, "shop", wait_s=0.3):
                pass
    assert not client.search_registered_models("name = 'shop.promotion-lock'")  # released
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait(timeout=60)
    client.create_registered_model("shop.promotion-lock", tags={**process_tags(), "recengine.pid": str(ended.pid)})
    with registry_lock(client, "shop", wait_s=0.3):  # its holder is gone: taken over at once
        assert client.get_registered_model("shop.promotion-lock").tags["recengine.pid"] == str(os.getpid())
