"""The MLflow store under faults, with real processes (issue #25): two trainings promoting at once, two
first trainings creating the store at once, SIGTERM and SIGKILL mid-run, a killed promotion, and a
store with no room left (a real write failure: RLIMIT_FSIZE, as a full disk fails a write).

Each test starts workers (this file's WORKER script, run by the test's Python) against one fresh
SQLite store; they meet at barrier files, so what overlaps does not depend on timing."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TIMEOUT_S = 240

WORKER = r'''
import json, os, signal, sys, time
from pathlib import Path

sys.path.insert(0, os.environ["RECENGINE_TESTS"])
mode, folder = sys.argv[1], Path(sys.argv[2])

FEATURES = {
    # two feature sets of the one data set, scoring differently
    "wide": {"name": "race-wide", "candidates": {"popular": {"k": 30}, "covisitation": {"k": 30, "window": 3}},
             "features": {"item_popularity": {"windows_days": [7, 30]}, "covisitation": {"window": 3},
                          "user_activity": {}},
             "labels": {"samples_per_user": 2}, "ranker": {"num_boost_round": 20, "early_stopping_rounds": 5,
                                                          "min_data_in_leaf": 10}},
    "narrow": {"name": "race-narrow", "candidates": {"popular": {"k": 30}, "covisitation": {"k": 30, "window": 3}},
             "features": {"item_popularity": {"windows_days": [30]}},
             "labels": {"samples_per_user": 2}, "ranker": {"num_boost_round": 5, "min_data_in_leaf": 50,
                                                          "num_leaves": 2}},
}


def feature_set(kind="wide"):
    from recengine.parts.featureset import FeatureSet

    return FeatureSet.from_dict(FEATURES[kind])


def fit(kind="wide"):
    from recengine.core.data import Dataset
    from recengine.learning.training import train
    from synthetic import catalogue, interactions

    data = Dataset(interactions(n_users=30, per_user=12).lazy(), catalogue().lazy())
    return train(data, feature_set(kind), progress=False, say=lambda _: None)


def barrier(name, parties, timeout_s=None):
    """Wait until `parties` workers have reached barrier `name` (or `timeout_s` has passed)."""
    place = folder / name
    place.mkdir(exist_ok=True)
    (place / str(os.getpid())).touch()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while len(list(place.iterdir())) < parties and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.02)


def say(**values):
    print(json.dumps(values), flush=True)


if mode == "race":
    # Two trainings that read @champion at the same moment: each waits after reading it until the other
    # has read it too. Under the promotion lock the other cannot read before this one has moved it, so
    # that wait ends at its (short) timeout instead.
    import mlflow
    from recengine.interfaces.tracking import log_training

    kind = sys.argv[3]
    result = fit(kind)
    read = mlflow.MlflowClient.get_model_version_by_alias

    def read_then_wait(self, *args, **kwargs):
        try:
            return read(self, *args, **kwargs)
        finally:
            barrier("read", 2, timeout_s=6)

    mlflow.MlflowClient.get_model_version_by_alias = read_then_wait
    barrier("trained", 2)
    logged = log_training(result, feature_set(kind), "race", "racer")
    say(kind=kind, score=result.metrics["ndcg@10"], version=logged.version, champion=logged.champion)

elif mode == "open":
    # Two first trainings into a store that does not exist yet.
    from recengine.interfaces.tracking import training_run

    barrier("start", 2)
    with training_run(feature_set(), "first") as run:
        pass
    say(run_id=run.run_id)

elif mode == "block":
    # A training that stops half way (after a logged model was started, as log_model starts one) until
    # it is signalled: `recengine train` itself, its fit replaced by one that blocks.
    import mlflow
    import recengine.learning.training
    from recengine.interfaces.cli import cli

    def blocking_fit(*args, **kwargs):
        mlflow.initialize_logged_model(name="ranker")
        say(run_id=mlflow.active_run().info.run_id, pid=os.getpid())
        sys.stdin.read()

    recengine.learning.training.train = blocking_fit
    cli(["train", "--events", "events.csv", "--items", "items.csv", "--feature-set", "fs.toml", "--model-name", "m"])

elif mode == "kill-after-version":
    # A process killed right after the registry created its model version.
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
    from recengine.interfaces.tracking import log_training

    create = SqlAlchemyStore.create_model_version

    def create_then_die(self, *args, **kwargs):
        version = create(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return version

    SqlAlchemyStore.create_model_version = create_then_die
    log_training(fit(), feature_set(), "killed", "m")

elif mode == "full":
    # The store's files may not grow past a few hundred kB once the model is trained: every write beyond
    # that fails with EFBIG, as a full disk fails one with ENOSPC.
    import resource
    from recengine.errors import RecengineError
    from recengine.interfaces.tracking import log_training, training_run

    try:
        with training_run(feature_set(), "full") as run:
            result = fit()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
            log_training(result, feature_set(), "full", "m")
    except RecengineError as exc:
        say(error=str(exc), type=type(exc).__name__, run_id=run.run_id)
'''


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh store (not created yet) for workers run in `tmp_path`; the test's own MLflow calls use it too."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("RECENGINE_TESTS", str(TESTS))
    monkeypatch.setenv("RECENGINE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "worker.py").write_text(WORKER)
    return uri


def start(folder: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(folder / "worker.py"), args[0], str(folder), *args[1:]], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(worker: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = worker.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        worker.kill()
        out, err = worker.communicate()
        pytest.fail(f"worker timed out\n{out}\n{err}")
    return worker.returncode, out, err


def said(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri, registry_uri=uri)


def test_two_trainings_promoting_at_once_leave_the_better_one_champion(store, tmp_path):
    client(store).search_experiments()  # the store exists (creating it at once is the next test's)
    workers = [start(tmp_path, "race", kind) for kind in ("wide", "narrow")]
    results = []
    for worker in workers:
        code, out, err = finish(worker)
        assert code == 0, err
        results.append(said(out))
    assert results[0]["score"] != results[1]["score"]
    best = max(results, key=lambda r: r["score"])
    versions = client(store).search_model_versions("name = 'racer'")
    champion = client(store).get_model_version_by_alias("racer", "champion")
    assert str(champion.version) == best["version"], (results, [v.tags["champion_decision"] for v in versions])
    decisions = [v.tags["champion_decision"] for v in versions]
    assert sum("first version" in d for d in decisions) == 1, decisions
    # Every version says why, and says it in its description too.
    assert all(v.description and v.tags["ndcg_at_10"] in v.description for v in versions)


def test_two_first_trainings_create_the_store_once(store, tmp_path):
    workers = [start(tmp_path, "open") for _ in range(2)]
    runs = []
    for worker in workers:
        code, out, err = finish(worker)
        assert code == 0, err
        runs.append(said(out)["run_id"])
    experiment = client(store).get_experiment_by_name("first")
    found = client(store).search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in found) == sorted(runs)
    assert {r.info.status for r in found} == {"FINISHED"}


def _blocked_train(folder: Path) -> tuple[subprocess.Popen, dict]:
    """`recengine train` in `folder`, stopped half way; what it said when it stopped."""
    from test_cli_errors import SMALL_FEATURE_SET, write_valid

    write_valid(folder)
    (folder / "fs.toml").write_text(SMALL_FEATURE_SET)
    worker = start(folder, "block", stdin=subprocess.PIPE)
    line = worker.stdout.readline()
    if not line:
        _, out, err = finish(worker)
        pytest.fail(f"the worker ended before training\n{out}\n{err}")
    return worker, json.loads(line)


def _logged_models(uri: str, run) -> list:
    return client(uri).search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")


def test_sigterm_mid_training_ends_the_run_killed_saying_so(store, tmp_path):
    worker, where = _blocked_train(tmp_path)
    worker.send_signal(signal.SIGTERM)
    code, out, err = finish(worker)
    assert code == 1 and "Aborted." in err and "Traceback" not in err, err  # as Ctrl-C stops it
    run = client(store).get_run(where["run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["error"].startswith("Terminated: SIGTERM")
    assert (run.data.tags["recengine.pid"], run.data.tags["recengine.host"]) == (str(where["pid"]), socket.gethostname())
    assert [str(m.status) for m in _logged_models(store, run)] == ["FAILED"]


def test_a_run_whose_process_was_killed_is_ended_by_the_next_training(store, tmp_path):
    from recengine.interfaces.tracking import training_run

    from synthetic import feature_set

    worker, where = _blocked_train(tmp_path)
    worker.kill()
    worker.wait(timeout=TIMEOUT_S)
    worker.stdout.close(), worker.stderr.close(), worker.stdin.close()
    run = client(store).get_run(where["run_id"])
    assert run.info.status == "RUNNING"  # SIGKILL leaves it so: nothing runs in a killed process
    assert [str(m.status) for m in _logged_models(store, run)] == ["PENDING"]
    assert (run.data.tags["recengine.pid"], run.data.tags["recengine.host"]) == (str(where["pid"]), socket.gethostname())
    with pytest.raises(ValueError), training_run(feature_set(), "next"):
        raise ValueError("only opened")
    run = client(store).get_run(where["run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["error"].startswith(f"Killed: process {where['pid']} on {socket.gethostname()} ended")
    assert [str(m.status) for m in _logged_models(store, run)] == ["FAILED"]


def test_a_live_process_keeps_its_run(store, tmp_path):
    from recengine.interfaces.tracking import end_abandoned_runs

    worker, where = _blocked_train(tmp_path)
    try:
        assert end_abandoned_runs(client(store)) == []
        assert client(store).get_run(where["run_id"]).info.status == "RUNNING"
    finally:
        worker.kill()
        finish(worker)


def test_a_promotion_killed_after_the_version_was_created_leaves_it_described(store, tmp_path):
    from recengine.interfaces.tracking import training_run

    from synthetic import feature_set

    worker = start(tmp_path, "kill-after-version")
    code, _, err = finish(worker)
    assert code == -signal.SIGKILL, err
    version = client(store).get_model_version("m", "1")
    assert "validation NDCG@10" in version.description and version.tags["champion_decision"]
    with pytest.raises(ValueError), training_run(feature_set(), "next"):
        raise ValueError("only opened")
    version = client(store).get_model_version("m", "1")
    assert client(store).get_run(version.run_id).info.status == "KILLED"
    # It said it would be the champion, but the process died before moving @champion to it.
    assert version.tags["champion_decision"].endswith("killed before @champion moved here; @champion did not move")
    assert "champion" not in version.aliases


def test_a_store_with_no_room_left_says_so_and_keeps_the_model(store, tmp_path):
    from recengine.learning.model import load_model

    worker = start(tmp_path, "full", str(256 * 1024))
    code, out, err = finish(worker)
    assert code == 0, err
    got = said(out)
    message = got["error"]
    assert got["type"] == "StoreError" and "\n" not in message
    assert str(tmp_path / "store" / "mlflow.db") in message and "free space" in message
    kept = Path(message.split("The trained model is kept in ")[1].split(":")[0])
    try:
        assert kept.is_relative_to(tempfile.gettempdir())
        assert load_model(kept).features  # the trained model, whole
    finally:
        import shutil

        shutil.rmtree(kept.parent, ignore_errors=True)
