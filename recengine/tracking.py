"""MLflow tracking: one run per training, the model logged from code, registered, aliased.

The store defaults to SQLite inside ./mlruns (`sqlite:///mlruns/mlflow.db`, artifacts under
mlruns/artifacts); `MLFLOW_TRACKING_URI` points elsewhere. Open the UI with

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recengine.featureset import FeatureSet
from recengine.training import TrainResult

STORE_DIR = Path("mlruns")
CHAMPION = "champion"
PRIMARY_METRIC = "ndcg_at_10"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else SQLite in ./mlruns (created on first use)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    STORE_DIR.mkdir(exist_ok=True)
    return _default_uri()


def _default_uri() -> str:
    return f"sqlite:///{STORE_DIR.resolve() / 'mlflow.db'}"


def metric_key(name: str) -> str:
    # MLflow metric names may not hold '@'.
    return name.replace("@", "_at_")


@dataclass
class LoggedRun:
    run_id: str
    experiment_id: str
    model_uri: str
    registered: str | None
    version: str | None
    champion: bool


def log_training(
    result: TrainResult,
    feature_set: FeatureSet,
    experiment: str = "recengine",
    model_name: str | None = None,
    promote: bool = False,
) -> LoggedRun:
    """Log `result` as a run of `experiment`; register the model under `model_name` (if given) and move
    `@champion` to it when `promote` is set, when there is none yet, or when it beats the champion."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment(mlflow, experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{feature_set.name}-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.set_tags({"feature_set": feature_set.name, "dataset": result.lineage["dataset"],
                         "recengine_version": result.model.spec["recengine_version"]})
        mlflow.log_params(_flat_params(feature_set, result))
        mlflow.log_text(feature_set.source_text or _toml_free_note(feature_set), "feature_set.toml")
        _log_history(mlflow, run.info.run_id, result.history)
        mlflow.log_metrics({metric_key(k): v for k, v in result.metrics.items()})
        for name, values in result.baselines.items():
            mlflow.log_metrics({f"{name}_{metric_key(k)}": v for k, v in values.items() if k != "requests"})
        mlflow.log_metrics({f"time_{k}_s": v for k, v in result.timings.items()})
        mlflow.log_text(result.importance.write_csv(), "feature_importance.csv")
        _log_figures(mlflow, result)
        _log_datasets(mlflow, result)
        model_info = _log_model(mlflow, result)
        logged = LoggedRun(run.info.run_id, experiment_id, model_info.model_uri, None, None, False)
    if model_name:
        logged = _register(mlflow, logged, model_name, result.metrics.get("ndcg@10", float("nan")), promote)
    return logged


def _experiment(mlflow, name: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    # (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so compare the URI, not the variable.)
    if mlflow.get_tracking_uri() == _default_uri():
        location = (STORE_DIR.resolve() / "artifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def _flat_params(feature_set: FeatureSet, result: TrainResult) -> dict[str, Any]:
    params: dict[str, Any] = {"feature_set": feature_set.name, "exclude_seen": feature_set.exclude_seen}
    for section in ("candidates", "features"):
        for name, values in getattr(feature_set, section).items():
            params[f"{section}.{name}"] = ",".join(f"{k}={v}" for k, v in values.items()) or "defaults"
    params.update({f"labels.{k}": v for k, v in feature_set.labels.items()})
    params.update({f"ranker.{k}": v for k, v in feature_set.ranker.items()})
    params.update({f"data.{k}": v for k, v in result.lineage.items()})
    params["features"] = len(result.model.features)
    params["best_iteration"] = result.model.spec["best_iteration"]
    params["early_stopped_at"] = result.model.spec["early_stopped_at"]
    params["encoders"] = ",".join(result.model.spec["encoders"]) or "none"
    return params


def _toml_free_note(feature_set: FeatureSet) -> str:
    return f"# feature set '{feature_set.name}' was built in code, not loaded from a file\n# {feature_set.to_dict()}\n"


def _log_history(mlflow, run_id: str, history: dict[str, list[float]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(name), float(v), now, step) for name, values in history.items() for step, v in enumerate(values, 1)]
    client = mlflow.MlflowClient()
    for start in range(0, len(metrics), 1000):  # log_batch's limit per call
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _log_figures(mlflow, result: TrainResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = result.importance.head(25)
    fig, ax = plt.subplots(figsize=(7, 0.3 * top.height + 1))
    ax.barh(top["feature"].to_list()[::-1], top["gain"].to_list()[::-1])
    ax.set_xlabel("total gain")
    ax.set_title("Feature importance (gain)")
    fig.tight_layout()
    mlflow.log_figure(fig, "feature_importance.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in result.history.items():
        ax.plot(range(1, len(values) + 1), values, label=name)
    ax.axvline(result.model.spec["early_stopped_at"], color="grey", linestyle="--", label="early stopping")
    ax.set_xlabel("boosting iteration")
    ax.set_ylabel("validation NDCG")
    ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "ndcg_by_iteration.png")
    plt.close(fig)


def _log_datasets(mlflow, result: TrainResult) -> None:
    """Lineage in MLflow's dataset panel: the labelled example tables, with digests and schemas."""
    for context, split in (("training", result.train), ("validation", result.validation)):
        if split is None:
            continue
        dataset = mlflow.data.from_polars(
            split.rows, targets="label", name=f"{result.lineage['dataset']}@{result.lineage['digest']}-{context}"
        )
        mlflow.log_input(dataset, context=context)


def _log_model(mlflow, result: TrainResult):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import lightgbm

    signature = ModelSignature(
        inputs=Schema([ColSpec("double", name, required=False) for name in result.model.features]),
        outputs=Schema([ColSpec("double", "score")]),
    )
    example = None
    if result.validation is not None:
        example = result.validation.rows.head(3).select(result.model.features).to_pandas()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow nudges towards type-hinted predict(); the explicit signature above serves instead.
        warnings.filterwarnings("ignore", message=".*type hints.*")
        folder = result.model.save(Path(tmp) / "ranker")
        return mlflow.pyfunc.log_model(
            name="ranker",
            python_model=str(MODEL_CODE),
            artifacts={"ranker": str(folder)},
            signature=signature,
            input_example=example,
            pip_requirements=[f"lightgbm=={lightgbm.__version__}", f"mlflow=={mlflow.__version__}", "numpy", "pandas"],
        )


def _register(mlflow, logged: LoggedRun, name: str, score: float, promote: bool) -> LoggedRun:
    from mlflow.exceptions import MlflowException

    version = mlflow.register_model(logged.model_uri, name).version
    client = mlflow.MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        best = client.get_run(current.run_id).data.metrics.get(PRIMARY_METRIC, float("-inf"))
    except MlflowException:
        current, best = None, float("-inf")
    champion = promote or current is None or score > best
    if champion:
        client.set_registered_model_alias(name, CHAMPION, version)
    logged.registered, logged.version, logged.champion = name, str(version), champion
    return logged
