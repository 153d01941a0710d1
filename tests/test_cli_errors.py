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
DATA_CASES: list[Case] = []

# -- models and outputs: train --output, model loading, rank/recommend outputs -------------------------
MODEL_CASES: list[Case] = []

# -- feature sets and parameters, encoders and the embedding cache ------------------------------------
CONFIG_CASES: list[Case] = []

CASES = DATA_CASES + MODEL_CASES + CONFIG_CASES


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
    return subprocess.run([sys.executable, "-c", "from recengine.cli import cli; cli()", *args], cwd=folder,
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
