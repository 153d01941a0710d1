"""Every bad input, through the real CLI in a subprocess, as a user meets it: exit code 2, one
paragraph that names the file, column, row or value and says what to do, no traceback, and the
working folder exactly as it was (no output file left, no existing file touched).

A case is a folder-building function plus the command line to run in that folder. The cases are
grouped by the part of the engine that must catch them; each group is one list below.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import polars as pl
import pytest

from synthetic import catalogue, interactions


@dataclass
class Case:
    id: str
    args: list[str]                     # after `recengine`
    make: Callable[[Path], None]        # writes the case's inputs into the (empty) working folder
    expect: list[str]                   # substrings the message must contain (case-insensitive)
    needs_model: bool = False           # a trained model folder is copied to ./model first
    env: dict[str, str] = field(default_factory=dict)


def write_valid(folder: Path, events: pl.DataFrame | None = None, items: pl.DataFrame | None = None) -> None:
    """A small valid data set: events.csv and items.csv."""
    (events if events is not None else interactions(n_users=30, per_user=12)).write_csv(folder / "events.csv")
    (items if items is not None else catalogue()).write_csv(folder / "items.csv")


# -- data contract: reading and validating events, items, users, requests --------------------------
DATA_CASES: list[Case] = [
    Case("epoch-seconds-and-milliseconds-mixed", ["validate", "--events", "events.csv", "--items", "items.csv"],
         lambda f: _epoch_events(f, millis_rows=[5]),
         ["events.csv", "'timestamp' mixes epoch seconds (row 0:", "epoch milliseconds (row 5:", "--timestamp-unit"]),
    Case("text-in-value-after-row-10000", ["validate", "--events", "events.csv"],
         lambda f: _long_events(f, "value", "good"), ["events.csv", "'value'", "row 10050: 'good'", "fix or drop"]),
    Case("text-in-timestamp-after-row-10000", ["validate", "--events", "events.csv"],
         lambda f: _long_events(f, "timestamp", "yesterday"), ["events.csv", "row 10050: 'yesterday'", "fix or drop"]),
    Case("text-in-value-after-row-10000-train", ["train", "--events", "events.csv", "--output", "model"],
         lambda f: _long_events(f, "value", "good"), ["events.csv", "row 10050: 'good'"]),
    Case("line-with-an-extra-field", ["validate", "--events", "events.csv"],
         lambda f: _long_events(f, "value", "1.0,7"), ["events.csv", "cannot be read", "more fields", "(first at row 10050, line 10052 of the file)", "well formed"]),
    Case("event-in-the-year-2100", ["validate", "--events", "events.csv", "--items", "items.csv"],
         lambda f: _epoch_events(f, future_rows=[3]),
         ["events.csv", "later than now plus one day", "row 3: 4102444800 (2100-01-01 00:00:00)", "drop those rows"]),
    Case("mapping-entry-no-file-has", ["validate", "--events", "events.csv", "--items", "items.csv", "--columns",
                                       "userId=user_id"], write_valid,
         ["mapping entry userId=user_id", "events.csv has ['user_id', 'item_id', 'timestamp', 'value']",
          "items.csv has ['item_id', 'title', 'genres'", "drop the entry"]),
    Case("semicolon-separated-csv", ["validate", "--events", "events.csv"],
         lambda f: _separated(f, ";"), ["events.csv", "separated by semicolons", "convert it to comma-separated"]),
    Case("tab-separated-csv", ["validate", "--events", "events.csv"],
         lambda f: _separated(f, "\t"), ["events.csv", "separated by tabs", "rename it to .tsv"]),
    Case("items-is-a-folder", ["validate", "--events", "events.csv", "--items", "catalogue"],
         lambda f: (write_valid(f), (f / "catalogue").mkdir(), catalogue().write_csv(f / "catalogue" / "items.csv")),
         ["catalogue: is a folder", "a file is expected (.parquet, .csv, .tsv or .ndjson)"]),
    Case("catalogue-ids-equal-but-for-spaces", ["validate", "--events", "events.csv", "--items", "items.csv"],
         lambda f: write_valid(f, items=pl.DataFrame({"item_id": ["1", " 1 ", "2"], "title": ["a", "b", "c"]})),
         ["items.csv", "duplicate item_id values (compared with surrounding spaces stripped): '1' (2 rows)"]),
    Case("items-without-events", ["validate", "--items", "items.csv"], write_valid,
         ["--items, --users and --columns need --events", "pass the events file with --events"]),
]


def _epoch_events(folder: Path, millis_rows: list[int] = (), future_rows: list[int] = ()) -> None:
    """The valid data set with integer epoch-second timestamps; `millis_rows` in milliseconds,
    `future_rows` at 2100-01-01."""
    events = interactions(n_users=30, per_user=12).with_columns(pl.col("timestamp").dt.epoch("s"))
    row = pl.int_range(pl.len())
    events = events.with_columns(
        pl.when(row.is_in(list(millis_rows))).then(pl.col("timestamp") * 1000)
        .when(row.is_in(list(future_rows))).then(pl.lit(4_102_444_800))
        .otherwise(pl.col("timestamp")).alias("timestamp")
    )
    write_valid(folder, events=events)


def _long_events(folder: Path, column: str, value: str, row: int = 10_050, rows: int = 10_100) -> None:
    """events.csv of `rows` valid events (more than the 10,000 rows polars once inferred types
    from) whose `column` holds the raw text `value` at data row `row`."""
    events = pl.DataFrame({"user_id": pl.int_range(rows, eager=True) % 50, "item_id": pl.int_range(rows, eager=True) % 70,
                           "timestamp": 1_600_000_000 + pl.int_range(rows, eager=True), "value": [1.0] * rows})
    lines = events.write_csv().splitlines()
    fields = lines[row + 1].split(",")
    fields[events.columns.index(column)] = value
    lines[row + 1] = ",".join(fields)
    (folder / "events.csv").write_text("\n".join(lines) + "\n")


def _separated(folder: Path, separator: str) -> None:
    """The valid events written with another separator, under a .csv name."""
    interactions(n_users=30, per_user=12).write_csv(folder / "events.csv", separator=separator)


# -- models and outputs: train --output, model loading, rank/recommend outputs -------------------------
def _training_data(prepare: Callable[[Path], object] = lambda folder: None) -> Callable[[Path], None]:
    """Valid data and a small feature set fs.toml, then `prepare(folder)`."""
    def make(folder: Path) -> None:
        write_valid(folder)
        (folder / "fs.toml").write_text(SMALL_FEATURE_SET)
        prepare(folder)
    return make


def _with_files(**files: str) -> Callable[[Path], None]:
    """Valid data plus the given files (name=content; a name ending in '/' is a folder)."""
    def make(folder: Path) -> None:
        write_valid(folder)
        for name, content in files.items():
            path = folder / name.replace("__", "/").replace("_dot_", ".")
            if content == "/":
                path.mkdir(parents=True)
            else:
                path.write_text(content)
    return make


def _damaged_model(damage: str) -> Callable[[Path], None]:
    """Valid data and a model folder ./damaged, saved by recengine and then damaged (`damage`)."""
    def make(folder: Path) -> None:
        import json

        import lightgbm as lgb
        import numpy as np

        from recengine.learning.model import RankerModel

        write_valid(folder)
        rng = np.random.default_rng(0)
        booster = lgb.train({"objective": "regression", "verbose": -1}, lgb.Dataset(rng.random((200, 4)), rng.random(200)), 20)
        saved = RankerModel(booster, {"format": 1, "features": ["a", "b", "c", "d"], "feature_set": {"name": "x"}}).save(folder / "damaged")
        spec, text = json.loads((saved / "spec.json").read_text()), (saved / "model.txt").read_text()
        if damage == "truncated-legacy":  # saved before digests were recorded
            del spec["files"]
            (saved / "spec.json").write_text(json.dumps(spec))
        if damage.startswith("truncated"):
            (saved / "model.txt").write_text(text[: len(text) // 3])
        elif damage == "bad-json":
            (saved / "spec.json").write_text(json.dumps(spec)[:40])
        elif damage == "no-features":
            del spec["features"]
            (saved / "spec.json").write_text(json.dumps(spec))
    return make


DATA = ["--events", "events.csv", "--items", "items.csv"]
TRAIN = ["train", *DATA, "--feature-set", "fs.toml", "--no-register"]
RECOMMEND_DAMAGED = ["recommend", "--model", "damaged", *DATA, "--output", "out.parquet"]
CANDIDATES = "user_id,item_id\n1,2\n1,3\n"
NAMED = "user_id,item_id,timestamp\nu1,2,2025-01-01\nu2,3,2025-01-01\n"

MODEL_CASES: list[Case] = [
    Case("train-output-folder-with-files", [*TRAIN, "--output", "notes"],
         _training_data(lambda f: ((f / "notes").mkdir(), (f / "notes" / "todo.txt").write_text("keep"))),
         ["notes", "not a recengine model", "todo.txt", "choose a new folder"]),
    Case("train-output-is-a-file", [*TRAIN, "--output", "notes.txt"],
         _training_data(lambda f: (f / "notes.txt").write_text("keep")), ["notes.txt", "is a file", "new folder"]),
    Case("train-output-under-a-file", [*TRAIN, "--output", "notes.txt/model"],
         _training_data(lambda f: (f / "notes.txt").write_text("keep")), ["notes.txt is a file, not a folder"]),
    Case("train-output-unwritable", [*TRAIN, "--output", "/proc/recengine-model"], _training_data(),
         ["cannot write in folder /proc", "--output"]),
    Case("model-txt-truncated", RECOMMEND_DAMAGED, _damaged_model("truncated"),
         ["damaged/model.txt", "does not match the sha256", "train the model again"]),
    Case("model-txt-truncated-no-digest", RECOMMEND_DAMAGED, _damaged_model("truncated-legacy"),
         ["damaged/model.txt", "incomplete LightGBM model", "train the model again"]),
    Case("evaluate-model-txt-truncated", ["evaluate", "--model", "damaged", *DATA], _damaged_model("truncated"),
         ["damaged/model.txt", "does not match the sha256"]),
    Case("spec-json-invalid", RECOMMEND_DAMAGED, _damaged_model("bad-json"),
         ["damaged/spec.json", "not valid JSON", "train the model again"]),
    Case("spec-json-without-features", RECOMMEND_DAMAGED, _damaged_model("no-features"),
         ["damaged/spec.json", "'features'"]),
    Case("rank-output-is-a-folder", ["rank", "--model", "model", *DATA, "--input", "candidates.csv", "--output", "ranked"],
         _with_files(candidates_dot_csv=CANDIDATES, ranked="/"), ["ranked is an existing folder", "file path"],
         needs_model=True),
    Case("recommend-output-is-a-folder", ["recommend", "--model", "model", *DATA, "--output", "recs"],
         _with_files(recs="/"), ["recs is an existing folder"], needs_model=True),
    Case("recommend-output-unwritable", ["recommend", "--model", "model", *DATA, "--output", "/proc/recs.parquet"],
         _with_files(), ["cannot write in folder /proc"], needs_model=True),
    Case("rank-output-unwritable", ["rank", "--model", "model", *DATA, "--input", "candidates.csv", "--output",
                                    "/proc/ranked.parquet"],
         _with_files(candidates_dot_csv=CANDIDATES), ["cannot write in folder /proc"], needs_model=True),
    Case("recommend-requests-all-before-the-first-event",
         ["recommend", "--model", "model", *DATA, "--requests", "early.csv", "--output", "out.parquet"],
         _with_files(early_dot_csv="user_id,timestamp\n1,2020-01-01\n2,2023-12-31T23:00:00Z\n"),
         ["early.csv", "all 2 requests are at or before the first event"], needs_model=True),
    Case("recommend-string-user-ids", ["recommend", "--model", "model", *DATA, "--requests", "named.csv", "--output",
                                       "out.parquet"],
         _with_files(named_dot_csv=NAMED), ["named.csv", "'user_id'", "not integers", "'u1'"], needs_model=True),
    Case("rank-string-user-ids", ["rank", "--model", "model", *DATA, "--input", "named.csv", "--output", "out.parquet"],
         _with_files(named_dot_csv=NAMED), ["named.csv", "'user_id'", "not integers"], needs_model=True),
    Case("rank-generate-requests-all-before-the-first-event",
         ["rank", "--model", "model", *DATA, "--generate", "--input", "early.csv", "--output", "out.parquet"],
         _with_files(early_dot_csv="user_id,timestamp\n1,2020-01-01\n2,2023-12-31T23:00:00Z\n"),
         ["early.csv", "every request is at or before the first event"], needs_model=True),
    Case("rank-k-zero", ["rank", "--model", "model", *DATA, "--input", "candidates.csv", "--output", "out.parquet", "--k", "0"],
         _with_files(candidates_dot_csv=CANDIDATES), ["--k", "0 is not in the range x>=1", "recengine rank --help"],
         needs_model=True),
    Case("recommend-k-negative", ["recommend", "--model", "model", *DATA, "--output", "out.parquet", "--k", "-3"],
         _with_files(), ["--k", "-3 is not in the range x>=1"], needs_model=True),
    Case("train-model-name-the-registry-refuses", ["train", *DATA, "--feature-set", "fs.toml", "--model-name", "shop/v2"],
         _training_data(), ["--model-name 'shop/v2'", "registry refuses", "'/'"]),
    Case("train-workers-without-ray", [*TRAIN, "--workers", "2"], _training_data(),
         ["--workers 2", "--engine local", "add --engine ray"]),
    Case("an-unknown-option", ["train", "--epochs", "3"], _with_files(), ["no such option", "--epochs", "recengine train --help"]),
    Case("rank-local-engine-with-a-uri", ["rank", "--model", "model", *DATA, "--input", "s3://bucket/candidates.parquet",
                                          "--output", "out.parquet"],
         _with_files(), ["--input s3://bucket/candidates.parquet", "local engine reads local files", "--engine ray"],
         needs_model=True),
]

# -- feature sets and parameters, encoders and the embedding cache ------------------------------------
def _bad_feature_set(toml: str) -> Callable[[Path], None]:
    """bad.toml with `toml`, beside an events.csv that is itself invalid: the feature set must be judged
    (and refused) before any data is read, so the message is about the TOML."""
    def make(folder: Path) -> None:
        write_valid(folder)
        (folder / "events.csv").write_text("not,the,columns\n1,2,3\n")
        (folder / "bad.toml").write_text(toml)
    return make


def _train_with(toml: str, case_id: str, expect: list[str]) -> Case:
    return Case(case_id, ["train", "--events", "events.csv", "--items", "items.csv", "--feature-set", "bad.toml"],
                _bad_feature_set("[candidates.popular]\n" + toml), ["bad.toml", *expect])


CONFIG_CASES: list[Case] = [
    _train_with("k = \"ten\"\n", "config-k-not-a-number", ["[candidates.popular]", "k = 'ten'", "whole number"]),
    _train_with("k = -5\n", "config-k-negative", ["[candidates.popular]", "k = -5", "1 or more"]),
    _train_with("[features.item_popularity]\nwindows_days = \"7\"\n", "config-windows-a-string",
                ["[features.item_popularity]", "windows_days = '7'", "list of numbers"]),
    _train_with("[ranker]\nlearning_rate = -0.1\n", "config-learning-rate-negative", ["[ranker]", "learning_rate = -0.1", "above 0"]),
    _train_with("[labels]\nvalidation_fraction = 1.5\n", "config-validation-fraction", ["[labels]", "validation_fraction = 1.5"]),
    _train_with("[ranker]\nnum_leavs = 63\n", "config-ranker-key-misspelt", ["[ranker]", "num_leavs", "did you mean 'num_leaves'"]),
    _train_with("[ranker]\nextra_trees = \"maybe\"\n", "config-ranker-lightgbm-refuses", ["[ranker]", "extra_trees", "maybe"]),
    _train_with("[features.interest]\nencoder_params = { max_lenght = 8 }\n", "config-encoder-param-misspelt",
                ["[features.interest]", "max_lenght", "did you mean 'max_length'"]),
    Case("config-feature-set-unknown-name", ["train", "--feature-set", "nosuch"], lambda folder: None,
         ["nosuch", "no bundled feature set", "collaborative, impressions, movielens, tuned"]),
    Case("config-embed-param-out-of-range", ["embed", "--items", "items.csv", "--param", "max_length=0"], write_valid,
         ["transformers encoder", "max_length = 0", "1 or more"]),
]

# -- issue #25, one list per topic ------------------------------------------------------------------------
# the MLflow store: runs, registry, promotion
STORE_CASES: list[Case] = [
    Case("store-is-not-a-database", TRAIN, _training_data(lambda f: (f / "notes.txt").write_text("my notes\n")),
         ["notes.txt", "MLFLOW_TRACKING_URI", "is not an SQLite database", "new file name"],
         env={"MLFLOW_TRACKING_URI": "sqlite:///notes.txt"}),
    Case("store-is-a-folder", TRAIN, _training_data(lambda f: (f / "runs").mkdir()),
         ["runs", "is a folder, not an SQLite file", "runs/mlflow.db"], env={"MLFLOW_TRACKING_URI": "sqlite:///runs"}),
    Case("store-in-a-folder-that-cannot-be-made", TRAIN, _training_data(),
         ["cannot write in folder /proc/recengine", "MLFLOW_TRACKING_URI"],
         env={"MLFLOW_TRACKING_URI": "sqlite:////proc/recengine/mlflow.db"}),
]

# the model folder as data from outside: spec.json, paths, model.txt, adapters, [ranker] options, plugins
def _forged_model(change: Callable[[dict], object] | None = None, crafted: str | None = None, digests: bool = True):
    """Valid data and a model folder ./model (test_model_trust.quick_model), then `change(spec)` or the
    `crafted` model.txt of test_model_trust.CRAFTED, every digest rewritten to match (not if `digests` is
    False: an edit by hand)."""
    def make(folder: Path) -> None:
        from test_model_trust import CRAFTED, edited, forged, quick_model

        write_valid(folder)
        saved = quick_model(folder / "model", SMALL_FEATURE_SET)
        if not digests:
            edited(saved, change)
            return
        text = CRAFTED[crafted][0]((saved / "model.txt").read_text()) if crafted else None
        forged(saved, change, text)
    return make


def _old_plugin(spec: dict) -> None:
    spec["parts"][0]["version"] = "0.0.1"


RECOMMEND_MODEL = ["recommend", "--model", "model", *DATA, "--output", "out.parquet"]
PLUGIN_AT_ANOTHER_VERSION = ["model was trained with plugin", "0.0.1", "is installed", "retrain the model"]
MODEL_FOLDER_CASES: list[Case] = [
    Case("model-spec-path-outside-the-folder", RECOMMEND_MODEL,
         _forged_model(lambda spec: spec["files"].update({"learned/../../events.npz": "0" * 64})),
         ["model/spec.json", "'learned/../../events.npz'", "outside the model folder"]),
    Case("model-adapter-absolute-path", ["evaluate", "--model", "model", *DATA],
         _forged_model(lambda spec: (spec["files"].update({"/etc/hostname": "0" * 64}), spec["adapters"].update({"a": "/etc/hostname"}))),
         ["model/spec.json", "'/etc/hostname'", "outside the model folder"]),
    Case("model-txt-truncated-digests-rewritten", RECOMMEND_MODEL, _forged_model(crafted="truncated"),
         ["model/model.txt", "incomplete LightGBM model", "train the model again"]),
    Case("model-txt-child-out-of-range-digests-rewritten", ["rank", "--model", "model", *DATA, "--input", "candidates.csv",
                                                             "--output", "out.parquet"],
         lambda f: (_forged_model(crafted="child-out-of-range")(f), (f / "candidates.csv").write_text(CANDIDATES)),
         ["model/model.txt", "child node 999 does not exist", "train the model again"]),
    Case("spec-json-k-edited", RECOMMEND_MODEL,
         _forged_model(lambda spec: spec["feature_set"]["candidates"]["popular"].update(k=5), digests=False),
         ["model/spec.json", "does not match the 'spec_sha256'", "edited", "train the model again"]),
    Case("spec-json-exclude-seen-edited", ["evaluate", "--model", "model", *DATA],
         _forged_model(lambda spec: spec["feature_set"].update(exclude_seen=False), digests=False),
         ["model/spec.json", "does not match the 'spec_sha256'"]),
    Case("spec-json-unknown-key", RECOMMEND_MODEL, _forged_model(lambda spec: spec.update(k=5)),
         ["model/spec.json", "unknown key 'k'"]),
    Case("spec-json-ranker-machines", RECOMMEND_MODEL,
         _forged_model(lambda spec: spec["feature_set"]["ranker"].update(machines="127.0.0.1:12400")),
         ["model/spec.json (its feature_set)", "[ranker] machines = '127.0.0.1:12400' cannot be set", "network sockets"]),
    _train_with("[ranker]\nmachines = \"127.0.0.1:12400,127.0.0.1:12401\"\n", "train-ranker-machines",
                ["[ranker] machines", "cannot be set", "network sockets", "remove it"]),
    _train_with("[ranker]\ntree_learner = \"data\"\n", "train-ranker-tree-learner-data",
                ["[ranker] tree_learner = 'data'", "tree_learner = 'serial'"]),
    _train_with("[ranker]\nforcedbins_filename = \"/etc/passwd\"\n", "train-ranker-reads-a-file",
                ["[ranker] forcedbins_filename", "it reads a file"]),
    _train_with("[ranker]\nnum_threads = 100000\n", "train-ranker-num-threads", ["num_threads = 100000", "at most 256"]),
    Case("rank-plugin-at-another-version", ["rank", "--model", "model", *DATA, "--input", "candidates.csv", "--output",
                                            "out.parquet"],
         lambda f: (_forged_model(_old_plugin)(f), (f / "candidates.csv").write_text(CANDIDATES)), PLUGIN_AT_ANOTHER_VERSION),
    Case("recommend-plugin-at-another-version", RECOMMEND_MODEL, _forged_model(_old_plugin), PLUGIN_AT_ANOTHER_VERSION),
    Case("evaluate-plugin-at-another-version", ["evaluate", "--model", "model", *DATA], _forged_model(_old_plugin),
         PLUGIN_AT_ANOTHER_VERSION),
]

# batch resume state and the Ray engine
def _ray_input(folder: Path, second: pl.DataFrame | None = None) -> None:
    """Valid data and candidates.parquet; with `second`, a folder parts/ of a.parquet and b.parquet = `second`."""
    write_valid(folder)
    pl.DataFrame({"user_id": [1, 1, 2], "item_id": [2, 3, 4]}).write_parquet(folder / "candidates.parquet")
    if second is not None:
        (folder / "parts").mkdir()
        pl.read_parquet(folder / "candidates.parquet").write_parquet(folder / "parts" / "a.parquet")
        second.write_parquet(folder / "parts" / "b.parquet")


RANK_RAY = ["rank", "--engine", "ray", "--model", "model", *DATA, "--output", "out.parquet"]
# sitecustomize.py in the working folder (on PYTHONPATH) limits the CLI's own writes to 1 KiB: a real
# write failure (EFBIG), as a full disk gives (ENOSPC), with root as without.
FULL_DISK = {"sitecustomize_dot_py": "import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, "
                                     "(1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"}
FULL_DISK_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")])),
                 "PYTHONDONTWRITEBYTECODE": "1"}

JOB_CASES: list[Case] = [
    Case("rank-ray-address-not-an-address", [*RANK_RAY, "--input", "candidates.parquet", "--address", "not an address"],
         _ray_input, ["--address 'not an address'", "not a Ray cluster's address", "host:port"], needs_model=True),
    Case("rank-ray-address-nothing-listens", [*RANK_RAY, "--input", "candidates.parquet", "--address", "127.0.0.1:1"],
         _ray_input, ["--address 127.0.0.1:1", "connection refused", "ray start --head"], needs_model=True),
    Case("rank-ray-input-folder-mixing-schemas", [*RANK_RAY, "--input", "parts"],
         lambda f: _ray_input(f, pl.DataFrame({"user_id": ["3"], "item_id": [5]})),
         ["parts: its parquet files differ", "column 'user_id' is int64 in a.parquet, but large_string in b.parquet",
          "same columns"], needs_model=True),
    Case("rank-ray-input-not-parquet", [*RANK_RAY, "--input", "candidates.csv"], _with_files(candidates_dot_csv=CANDIDATES),
         ["candidates.csv", "--engine ray reads parquet input only", "--engine local"], needs_model=True),
    Case("recommend-disk-full", ["recommend", "--model", "model", *DATA, "--output", "out.parquet"],
         _with_files(**FULL_DISK), ["cannot write out.parquet: no room left (File too large",
                                    "free space there, then run the command again"],
         needs_model=True, env=FULL_DISK_ENV),
]

# tuning, learned parts, disk space
def _events_with(value: float) -> Callable[[Path], None]:
    """Valid data whose events' value column holds `value` at row 7."""
    def make(folder: Path) -> None:
        events = interactions(n_users=30, per_user=12)
        events = events.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(value).otherwise(pl.col("value")).alias("value"))
        write_valid(folder, events=events)
    return make


TUNING_CASES: list[Case] = [
    Case("validate-nan-value", ["validate", *DATA], _events_with(float("nan")),
         ["events.csv", "'value'", "not finite", "row 7"]),
    Case("train-infinite-value", [*TRAIN], _training_data(_events_with(float("inf"))),
         ["events.csv", "'value'", "not finite", "row 7: inf"]),
    Case("tune-from-an-adapter", ["tune", *DATA, "--encoder-param", "adapter=old.safetensors"], _with_files(),
         ["encoder_params has an adapter", "base encoder"]),
]

CASES = DATA_CASES + MODEL_CASES + CONFIG_CASES + STORE_CASES + MODEL_FOLDER_CASES + JOB_CASES + TUNING_CASES


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its content and its mode."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {oct(path.stat().st_mode)}"
        elif path.is_dir():
            out[str(path.relative_to(folder)) + "/"] = oct(path.stat().st_mode)
    return out


def run_cli(folder: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "RECENGINE_CACHE_DIR": str(folder.parent / "cache"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{folder.parent / 'mlflow.db'}", **(env or {})}
    return subprocess.run([sys.executable, "-c", "from recengine.interfaces.cli import cli; cli()", *args], cwd=folder,
                          capture_output=True, text=True, env=environ, timeout=300)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A small model folder trained once through the CLI, for the cases that need one."""
    folder = tmp_path_factory.mktemp("trained")
    write_valid(folder)
    (folder / "fs.toml").write_text(SMALL_FEATURE_SET)
    done = run_cli(folder, ["train", "--events", "events.csv", "--items", "items.csv", "--feature-set", "fs.toml",
                            "--output", "model"])
    assert done.returncode == 0, done.stderr
    return folder / "model"


SMALL_FEATURE_SET = """
name = "small"
[candidates.popular]
k = 30
[candidates.covisitation]
k = 30
window = 3
[features.item_popularity]
windows_days = [7, 30]
[features.covisitation]
window = 3
[features.user_activity]
[labels]
samples_per_user = 2
[ranker]
num_boost_round = 20
early_stopping_rounds = 5
min_data_in_leaf = 10
"""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_paragraph_and_nothing_changes(case: Case, tmp_path, request):
    work = tmp_path / "work"
    work.mkdir()
    case.make(work)
    if case.needs_model:
        import shutil

        shutil.copytree(request.getfixturevalue("trained_model"), work / "model")
    before = snapshot(work)
    done = run_cli(work, case.args, case.env)
    message = done.stderr.strip()
    assert done.returncode == 2, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert message.startswith("Error: "), message
    assert "\n\n" not in message, message  # one paragraph
    for expected in case.expect:
        assert expected.lower() in message.lower(), f"{expected!r} not in: {message}"
    assert snapshot(work) == before, "the working folder changed"
