"""The trained ranker as files: a LightGBM text model plus a JSON spec, never a pickle.

    model_dir/
      model.txt    LightGBM's own text format
      spec.json    feature set, feature columns, encoder ids, plugin versions, training lineage,
                   and the sha256 of model.txt (`files`), checked at load

`RankerModel` scores feature rows and, given a `FeatureContext`, turns requests into ranked items.
A damaged model folder is refused with a message, never handed to LightGBM's parser, which crashes
the process on a truncated file. Saving never deletes anything but an older model in the same folder.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from recengine.errors import ConfigError, DataError, PluginError
from recengine.topk import top_k

SPEC_FORMAT = 1
MODEL_FILE, SPEC_FILE = "model.txt", "spec.json"


class RankerModel:
    """A LightGBM booster and the spec that says which features it reads, in which order."""

    def __init__(self, booster: lgb.Booster, spec: dict[str, Any]):
        self.booster, self.spec = booster, spec

    @property
    def features(self) -> list[str]:
        return list(self.spec["features"])

    def feature_set(self):
        from recengine.featureset import FeatureSet

        return FeatureSet.from_dict(self.spec["feature_set"], f"the model's feature set '{self.spec['feature_set']['name']}'")

    def check_plugins(self) -> None:
        """Every part the model was trained with must be registered now, by a plugin of the same version."""
        from recengine import plugins

        versions = plugins.plugin_versions()
        for part in self.spec.get("parts", []):
            try:
                registration = plugins.get(part["kind"], part["name"])
            except PluginError:
                raise ConfigError(
                    f"the model needs {part['kind'].replace('_', ' ')[:-1]} '{part['name']}' from plugin '{part['plugin']}' "
                    f"{part['version']}, which is not installed or not loaded; install that plugin (and check "
                    "RECENGINE_LOAD_PLUGINS) before loading this model."
                ) from None
            found = versions.get(registration.plugin, "unknown")
            if found != part["version"]:
                raise ConfigError(
                    f"the model was trained with plugin '{part['plugin']}' {part['version']} for '{part['name']}', but "
                    f"{found} is installed; install {part['plugin']}=={part['version']} or retrain the model."
                )

    def score(self, rows: pl.DataFrame) -> np.ndarray:
        """One score per row of `rows`, which must hold every feature column (nulls are missing values)."""
        return self.predict(self.matrix(rows))

    def matrix(self, rows: pl.DataFrame) -> np.ndarray:
        """The feature columns of `rows` as a float matrix in the spec's order (nulls become NaN)."""
        missing = [name for name in self.features if name not in rows.columns]
        if missing:
            raise DataError(f"rows to score lack the model's feature columns {missing}; compute them with its feature set.")
        return rows.select(pl.col(self.features).cast(pl.Float64)).to_numpy()

    def predict(self, matrix: np.ndarray, num_threads: int = 0) -> np.ndarray:
        """Scores for a feature matrix in the spec's column order, using the best iteration."""
        return self.booster.predict(matrix, num_iteration=self.spec.get("best_iteration") or None, num_threads=num_threads)

    def recommend(self, requests: pl.DataFrame, context, k: int = 10) -> pl.DataFrame:
        """Top `k` items per request `(user_id, timestamp)`: candidates from the feature set's sources,
        seen items excluded, features as of each timestamp, scored. Adds `item_id`, `rank`, `score`."""
        keyed = requests.with_row_index("_request_id")
        rows = self.feature_set().candidate_rows(keyed, context)
        best = top_k(rows.with_columns(pl.Series("score", self.score(rows))), ["_request_id"], k)
        return best.sort("_request_id", "rank").select(*requests.columns, "item_id", "rank", "score")

    def save(self, path: str | Path) -> Path:
        """Write model.txt and spec.json into `path`, replacing it whole only once both are written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.booster.save_model(staging / MODEL_FILE)
            (staging / SPEC_FILE).write_text(json.dumps(self.spec, indent=2, default=str))
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(staging, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RankerModel":
        path = Path(path)
        if not (path / MODEL_FILE).is_file() or not (path / SPEC_FILE).is_file():
            raise ConfigError(f"{path}: not a recengine model folder (expected {MODEL_FILE} and {SPEC_FILE}); "
                              "give the folder `recengine train --output` wrote, or an MLflow model URI.")
        spec = json.loads((path / SPEC_FILE).read_text())
        if spec.get("format") != SPEC_FORMAT:
            raise ConfigError(f"{path / SPEC_FILE}: spec format {spec.get('format')!r}; this recengine reads format {SPEC_FORMAT}.")
        return cls(lgb.Booster(model_file=str(path / MODEL_FILE)), spec)


def load_model(uri: str | Path) -> RankerModel:
    """A model from a local folder, or from an MLflow URI (`models:/name@champion`, `runs:/id/ranker`)."""
    local = Path(uri)
    if local.exists():
        folder = local / "artifacts" / "ranker" if (local / "MLmodel").is_file() else local
        return RankerModel.load(folder)
    if ":/" not in str(uri):
        raise ConfigError(f"model '{uri}': no such folder, and not an MLflow URI such as models:/NAME@champion.")
    import mlflow
    from mlflow.exceptions import MlflowException

    from recengine.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri)))
    except MlflowException as exc:
        raise ConfigError(f"model '{uri}': MLflow could not resolve it ({exc.message}); "
                          f"check the name, version or alias against tracking store {tracking_uri()}.") from None
    return RankerModel.load(downloaded / "artifacts" / "ranker")
