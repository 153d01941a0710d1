"""Where MLflow keeps runs and models: `MLFLOW_TRACKING_URI`, else SQLite in ./mlruns (artifacts in
./mlruns/artifacts). Its own module, so that loading a model (`recengine.model`) and logging a
training (`recengine.tracking`) read one definition without importing each other."""

from __future__ import annotations

import os
from pathlib import Path

STORE_DIR = Path("mlruns")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else SQLite in ./mlruns (created on first use)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    STORE_DIR.mkdir(exist_ok=True)
    return default_uri()


def default_uri() -> str:
    return f"sqlite:///{STORE_DIR.resolve() / 'mlflow.db'}"
