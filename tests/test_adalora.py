"""The adalora mode (#24): AdaLoRA adapters through peft, tuned like lora, their ranks allocated on the
way as peft's schedule says, saved and loaded like every adapter, logged with the ranks."""

import json
import os
import subprocess
import sys
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from recengine.parts.adapters import load_adapter, save_adapter
from recengine.parts.encoders import create_encoder
from recengine.errors import ConfigError
from recengine.features.tuned import TunedInterest
from recengine.learning.tuning import AdaloraSchedule, lora_model

from conftest import DEVICE
from test_adapters import tune_through_the_cli
from test_tuned import noisy_catalogue, theme_events

pytest.importorskip("peft")

# 4 adapted modules (query and value of 2 layers) at 6 each: 24; the target, 2 on average: 8 in all.
SETTINGS = {"mode": "adalora", "recent": 5, "history": 10, "epochs": 3, "batch_size": 64, "lr": 0.03,
            "patience": 5, "lora_rank": 2, "adalora_init_rank": 6, "temperature": 0.1, "seed": 0}


def adalora_part(tiny_bert, **extra) -> TunedInterest:
    return TunedInterest(encoder_params={"model": str(tiny_bert), "device": DEVICE}, **{**SETTINGS, **extra})


@pytest.fixture(scope="module")
def fitted(tiny_bert):
    part = adalora_part(tiny_bert)
    base = {name: value.detach().clone() for name, value in part.encoder()._load().named_parameters()}
    state = part.fit(theme_events(), noisy_catalogue())
    return part, state, base


def test_ranks_start_at_the_initial_rank_and_shrink_to_the_target_budget_as_peft_schedules_them(fitted):
    part, state, _ = fitted
    result, _ = part.last_tuning
    ranks = state["ranks"]  # one row per held-out reading: before tuning, then after each epoch
    assert ranks.shape == (len(state["recall"]), 4)
    assert ranks[0].tolist() == [6, 6, 6, 6]  # nothing allocated before the first step
    assert ranks[-1].sum() <= 8 < ranks[0].sum()  # the final phase holds the target budget
    assert len({tuple(row) for row in ranks}) >= 3  # moved more than once on the way (24 -> 12 -> 8 here)
    # The kept state is the best epoch's; its unpruned singular values are exactly the allocated ones.
    assert part.ranks(state) == dict(zip(sorted(part.ranks(state)), ranks[result.best_epoch].tolist()))
    # It learnt: users follow the theme, held-out recall@10 rises (0.40 -> 0.94 here).
    assert state["recall"].max() > state["recall"][0] + 0.2, state["recall"]


def test_only_the_adapter_weights_train_and_the_base_model_is_untouched(fitted, tiny_bert):
    part, state, base = fitted
    tuned = [name for name in state if name.startswith("adalora:")]
    others = [name for name in tuned if not any(f".{kind}." in name for kind in ("lora_A", "lora_B", "lora_E"))]
    assert tuned and not others, others
    after = dict(part.encoder()._load().named_parameters())
    assert all(np.array_equal(base[name].numpy(), after[name].detach().numpy()) for name in base)
    model = lora_model(part.encoder(), 2, 16, adalora=AdaloraSchedule(init_rank=6), total_steps=10)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    assert len(trainable) == 3 * 4  # A, E and B of each adapted module


def test_one_seed_gives_the_same_adapters(fitted, tiny_bert):
    _, state, _ = fitted
    again = adalora_part(tiny_bert).fit(theme_events(), noisy_catalogue())
    assert sorted(state) == sorted(again) and all(np.array_equal(state[k], again[k]) for k in state)


def test_the_adapter_file_round_trips_and_applies_as_an_encoder(fitted, tiny_bert, tmp_path):
    part, state, _ = fitted
    until = datetime(2024, 3, 1)
    path = save_adapter(tmp_path / "adalora.safetensors", part.adapter(state, until))
    adapter = load_adapter(path)
    assert adapter.mode == "adalora" and adapter.until == until and json.loads(adapter.extra["ranks"]) == part.ranks(state)
    encoder = create_encoder("transformers", {"model": str(tiny_bert), "device": DEVICE, "adapter": str(path)})
    assert "+adalora-6-2-16:" in encoder.id and encoder.until == until
    titles = noisy_catalogue()["title"].to_list()
    frozen = create_encoder("transformers", {"model": str(tiny_bert), "device": DEVICE}).encode(titles)
    tuned = encoder.encode(titles)
    assert np.abs(tuned - frozen).max() > 1e-3  # the adapters change the space
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(tuned, part.adapted(state).encode(titles))  # the part reads the same encoder


def test_adalora_settings_are_checked_before_any_data():
    with pytest.raises(ConfigError, match="adalora_init_rank"):
        TunedInterest(mode="adalora", lora_rank=8, adalora_init_rank=4)
    with pytest.raises(ConfigError, match="adalora_warmup \\+ adalora_final"):
        TunedInterest(mode="adalora", adalora_warmup=0.5, adalora_final=0.5)
    assert AdaloraSchedule(warmup=0.5, final=0.5).steps(2) == (0, 1)  # always one step of allocation
    assert AdaloraSchedule().steps(100) == (10, 20)


@pytest.fixture(scope="module")
def tuned_run(tiny_bert, tmp_path_factory):
    """`recengine tune --mode adalora` through the real CLI, into a fresh project folder's store."""
    folder = tmp_path_factory.mktemp("adalora-project")
    keys = ("epochs", "batch_size", "lr", "patience", "lora_rank", "adalora_init_rank", "recent", "history")
    return folder, *tune_through_the_cli(folder, tiny_bert, "adalora", {key: SETTINGS[key] for key in keys})


def test_recengine_tune_adalora_logs_the_ranks(tuned_run):
    import mlflow

    folder, uri, output = tuned_run
    assert "adalora ranks: " in output and "(from 24)" in output
    client = mlflow.MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")
    run_id = uri.split("/")[1]
    run = client.get_run(run_id)
    params = run.data.params
    assert params["mode"] == "adalora" and params["adalora_init_rank"] == "6" and params["lora_rank"] == "2"
    final = json.loads(params["adalora_final_ranks"])
    assert len(final) == 4 and sum(final.values()) <= 8
    totals = client.get_metric_history(run_id, "adalora_rank_total")
    assert [m.step for m in totals] == list(range(len(totals))) and totals[0].value == 24 and totals[-1].value <= 8
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["adalora_ranks.json", "adapter.safetensors"]


FRESH = """
import sys, numpy as np, polars as pl
from recengine.parts.encoders import create_encoder
encoder = create_encoder("transformers", {"model": sys.argv[1], "device": sys.argv[4], "adapter": sys.argv[2]})
np.save(sys.argv[3], encoder.encode(pl.read_parquet("items.parquet")["title"].to_list()))
"""


def test_an_adalora_adapter_loads_in_a_fresh_process_and_gives_identical_embeddings(tuned_run, tiny_bert):
    folder, uri, _ = tuned_run
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", FRESH, str(tiny_bert), uri, "fresh.npy", DEVICE], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    here = create_encoder("transformers", {"model": str(tiny_bert), "device": DEVICE,
                                           "adapter": str(folder / "adapter.safetensors")})
    titles = pl.read_parquet(folder / "items.parquet")["title"].to_list()
    np.testing.assert_array_equal(np.load(folder / "fresh.npy"), here.encode(titles))
