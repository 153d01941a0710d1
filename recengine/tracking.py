"""MLflow tracking: one run per training, the model logged from code, registered, aliased.

The store defaults to SQLite inside ./mlruns (`sqlite:///mlruns/mlflow.db`, artifacts under
mlruns/artifacts); `MLFLOW_TRACKING_URI` points elsewhere. Open the UI with

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

and go to http://127.0.0.1:5000/#/experiments?workflowType=machine_learning: MLflow 3 opens on its GenAI
view, and `workflowType` (or the "Model training" toggle at the top left) selects the training one.

A run covers the whole training: open `training_run(...)` before reading the data and call
`log_training(...)` inside it (or call `log_training` alone, which opens a run just for the logging).
What a person comparing runs sees:
- the run's name: the feature-set file's stem plus what differs from the experiment's previous run
  (`movielens-variant (learning_rate=0.1)`), its description: the TOML's `description` and that
  difference; tags for the feature-set file, its digest, the git commit and the data digest;
- the ranker's headline validation metrics at the top level (`ndcg_at_10`, the champion's metric),
  and everything else grouped by prefix: `baseline/popularity/...`, `baseline/source_NAME/...`,
  `ranker/...` (the other cut-offs), `curve/lightgbm_validation_ndcg_at_K` (LightGBM's own NDCG per
  boosting iteration, a curve), `time/..._s`, and MLflow's `system/...` (CPU, memory, disk, network);
- the datasets: the raw data with a digest of its content only, and the labelled example tables
  with a digest of that and the feature set's digest, so the same data shows the same digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from recengine.errors import ConfigError
from recengine.featureset import FeatureSet
from recengine.store import STORE_DIR, default_uri, tracking_uri
from recengine.training import TrainResult, early_stopping_metric

CHAMPION = "champion"
PRIMARY_METRIC = "ndcg_at_10"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# The ranker's metrics shown at the top level; its others go under ranker/.
HEADLINE = ("ndcg@10", "ndcg@5", "recall@10", "hr@10", "mrr@10", "auc", "coverage@10")
# Seconds between samples of MLflow's system metrics: short trainings still record a few.
SYSTEM_METRICS_INTERVAL_S = 2
NAME_DIFFERENCES = 3  # differences spelled out in a run name; the description lists them all


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
    run_name: str = ""


@dataclass
class TrainingRun:
    """The open MLflow run of one training, as `training_run` yields it."""

    run_id: str
    experiment_id: str
    name: str
    started: float


@contextmanager
def training_run(
    feature_set: FeatureSet,
    experiment: str = "recengine",
    feature_set_path: str | Path | None = None,
    run_name: str | None = None,
) -> Iterator[TrainingRun]:
    """An MLflow run around a whole training (data, features, fit, evaluation, logging), with MLflow's
    system metrics. Named, described and tagged from the feature set at once; the feature set's
    parameters are logged at once too, so a training that fails shows what it tried. An exception
    ends the run FAILED with the message in the `error` tag. Nothing is written to the artifact
    store until `log_training`: a failed training leaves no files."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment(mlflow, experiment)
    params = feature_set_params(feature_set)
    previous = _previous_run(mlflow, experiment_id)
    differences = param_differences(previous.data.params, params) if previous is not None else []
    stem = Path(feature_set_path).stem if feature_set_path else feature_set.name
    name = run_name or run_name_for(stem, differences)
    tags = {"feature_set": feature_set.name, "feature_set.digest": feature_set_digest(feature_set),
            **_git_tags(Path(feature_set_path) if feature_set_path else None)}
    if feature_set_path:
        tags["feature_set.path"] = _shown_path(feature_set_path)
    _quiet_system_metrics_messages()
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    description = _description(feature_set, stem, previous, differences)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags, description=description,
                          log_system_metrics=True) as run:
        mlflow.log_params(params)
        started = time.time()
        try:
            yield TrainingRun(run.info.run_id, experiment_id, name, started)
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:4000])
            raise
        _await_a_system_sample(started)


def log_training(
    result: TrainResult,
    feature_set: FeatureSet,
    experiment: str = "recengine",
    model_name: str | None = None,
    promote: bool = False,
    feature_set_path: str | Path | None = None,
    run_name: str | None = None,
) -> LoggedRun:
    """Log `result` into the open `training_run` (or a run opened for it now, in `experiment`);
    register the model under `model_name` (if given) and move `@champion` to it when `promote` is set,
    when there is none yet, or when it beats the champion's validation NDCG@10."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        with training_run(feature_set, experiment, feature_set_path, run_name) as opened:
            return _log(mlflow, result, feature_set, opened, model_name, promote)
    opened = TrainingRun(run.info.run_id, run.info.experiment_id, run.info.run_name, run.info.start_time / 1000)
    return _log(mlflow, result, feature_set, opened, model_name, promote)


def _log(mlflow, result: TrainResult, feature_set: FeatureSet, run: TrainingRun, model_name: str | None,
         promote: bool) -> LoggedRun:
    clock = time.perf_counter()
    spec = result.model.spec
    mlflow.set_tags({"dataset": result.lineage["dataset"], "data.digest": result.lineage["digest"],
                     "recengine_version": spec["recengine_version"]})
    mlflow.log_params(_result_params(result))
    mlflow.log_text(feature_set.source_text or _toml_free_note(feature_set), "feature_set.toml")
    _log_curves(mlflow, run.run_id, result.history)
    mlflow.log_metrics(result_metrics(result))
    mlflow.log_text(result.importance.write_csv(), "feature_importance.csv")
    _log_figures(mlflow, result, run.name, feature_set)
    _log_datasets(mlflow, run.run_id, result, feature_set)
    _log_learned_parts(mlflow, result, feature_set, run)
    model_info = _log_model(mlflow, result)
    logged = LoggedRun(run.run_id, run.experiment_id, model_info.model_uri, None, None, False, run.name)
    if model_name:
        logged = _register(mlflow, logged, model_name, result, feature_set, promote)
    mlflow.log_metrics({"time/logging_s": time.perf_counter() - clock, "time/total_s": time.time() - run.started})
    return logged


def check_model_name(name: str) -> None:
    """Refuse, before any training, a registered model name the MLflow registry would refuse after it."""
    bad = [c for c in ("/", ":") if c in name]
    if not name.strip() or bad or name == "." or name.startswith(".."):
        why = f"it holds {' and '.join(repr(c) for c in bad)}" if bad else "it is blank, '.', or starts with '..'"
        raise ConfigError(f"--model-name {name!r}: the MLflow registry refuses it ({why}). Give a name of letters, digits, "
                          "'-', '_' and '.', such as recengine-shop.")


# -- tuning runs (issue #15) -------------------------------------------------------------------------

@contextmanager
def tuning_run(experiment: str = "recengine-tuning", run_name: str | None = None, tags: dict[str, str] | None = None):
    """An MLflow run for one `recengine tune`, in the project's store; yields the run's id. A failure
    ends it FAILED with the message in the `error` tag."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(experiment_id=_experiment(mlflow, experiment), run_name=run_name, tags=tags) as run:
        try:
            yield run.info.run_id
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:4000])
            raise


def log_tuning(mlflow, params: dict[str, Any], state: dict[str, Any], adapter: Path | None = None,
               metrics: dict[str, float] | None = None) -> None:
    """One tuning in the active run: its settings; `tune_loss` per epoch (steps 1, 2, ...) and the held-out
    `tune_recall_at_K` (step 0: the frozen encoder's, then after each epoch), curves in the MLflow UI;
    `metrics` (seconds, pairs/s); the adapter file as an artifact."""
    from mlflow.entities import Metric

    mlflow.log_params({k: ("none" if v is None else v) for k, v in params.items()})
    now, run_id = int(time.time() * 1000), mlflow.active_run().info.run_id
    k = params.get("recall_k", 10)
    curves = [Metric("tune_loss", float(v), now, step) for step, v in enumerate(state["loss"], 1)]
    curves += [Metric(f"tune_recall_at_{k}", float(v), now, step) for step, v in enumerate(state["recall"])]
    for start in range(0, len(curves), 1000):  # log_batch's limit per call
        mlflow.MlflowClient().log_batch(run_id, metrics=curves[start : start + 1000])
    if metrics:
        mlflow.log_metrics(metrics)
    if "ranks" in state:
        _log_ranks(mlflow, state)
    if adapter is not None:
        mlflow.log_artifact(str(adapter))


def _log_ranks(mlflow, state: dict[str, Any]) -> None:
    """AdaLoRA's rank allocation: the kept state's rank per module as a parameter, the total rank per
    held-out reading as a curve (`adalora_rank_total`, step 0: before tuning), and the whole table
    (module -> rank at each reading) as `adalora_ranks.json`."""
    from recengine.tuning import adalora_ranks

    final = adalora_ranks(state)
    table = np.asarray(state["ranks"])
    modules = sorted(final)
    mlflow.log_param("adalora_final_ranks", json.dumps(final)[:6000])
    for step, row in enumerate(table):
        mlflow.log_metric("adalora_rank_total", float(row.sum()), step=step)
    mlflow.log_dict({"modules": modules, "ranks_per_reading": {m: table[:, i].tolist() for i, m in enumerate(modules)},
                     "final": final}, "adalora_ranks.json")


def _log_learned_parts(mlflow, result: TrainResult, feature_set: FeatureSet, run: TrainingRun) -> None:
    """A child run of the training's per learned state that holds tuning curves (parts sharing one fit:
    one run), logged by `log_tuning`, with the tuned part's adapter file (the state the model carries,
    tuned on every training event)."""
    from datetime import datetime

    from recengine.adapters import save_adapter

    states = result.model.learned
    curved = [key for key in sorted(states) if "loss" in states[key] and "recall" in states[key]]
    if not curved:
        return
    parts = {p.key: p for p in [*feature_set.build_sources(), *feature_set.build_extractors()]}
    tables = {f"{section}.{name}": values for section in ("candidates", "features")
              for name, values in getattr(feature_set, section).items()}
    until = datetime.fromisoformat(result.model.spec["learned_until"])
    logged: list[int] = []
    for key in curved:
        state = states[key]
        if id(state) in logged:
            continue
        logged.append(id(state))
        keys = [k for k in curved if states[k] is state]
        part = parts.get(key)
        # A part that tunes an encoder says so by exporting its state as an adapter (and its settings).
        tuned = part if callable(getattr(part, "adapter", None)) and callable(getattr(part, "settings", None)) else None
        params = tuned.settings() if tuned is not None else {k: json.dumps(v) for k, v in tables.get(key, {}).items()}
        with mlflow.start_run(experiment_id=run.experiment_id, run_name=f"{run.name} / {' + '.join(keys)}", nested=True,
                              tags={"learned_parts": ",".join(keys), "learned_until": until.isoformat()}):
            with tempfile.TemporaryDirectory() as folder:
                adapter = None
                if tuned is not None:
                    adapter = save_adapter(Path(folder) / "adapter.safetensors", tuned.adapter(state, until))
                log_tuning(mlflow, {**params, "tuned_until": until.isoformat()}, state, adapter)


def _experiment(mlflow, name: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    # (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so compare the URI, not the variable.)
    if mlflow.get_tracking_uri() == default_uri():
        location = (STORE_DIR.resolve() / "artifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


# -- telling runs apart ----------------------------------------------------------------------------

def feature_set_params(feature_set: FeatureSet) -> dict[str, Any]:
    """The feature set, flattened into MLflow parameters (what the compare view diffs)."""
    params: dict[str, Any] = {"feature_set": feature_set.name, "exclude_seen": feature_set.exclude_seen}
    for section in ("candidates", "features"):
        for name, values in getattr(feature_set, section).items():
            params[f"{section}.{name}"] = ",".join(f"{k}={v}" for k, v in values.items()) or "defaults"
    params.update({f"labels.{k}": v for k, v in feature_set.labels.items()})
    params.update({f"ranker.{k}": v for k, v in feature_set.ranker.items()})
    return params


def feature_set_digest(feature_set: FeatureSet) -> str:
    """A digest of what the feature set computes (its tables and values, not its name, description,
    comments or layout)."""
    content = {k: v for k, v in feature_set.to_dict().items() if k not in ("name", "description")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def param_differences(before: dict[str, str], after: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(key, old, new) for each feature-set parameter that differs from a previous run's, in the new
    feature set's order, then the removed ones; None where a side lacks the key."""
    tracked = ("candidates.", "features.", "labels.", "ranker.", "exclude_seen")
    old = {k: v for k, v in before.items() if k.startswith(tracked)}
    new = {k: str(v) for k, v in after.items() if k.startswith(tracked)}
    changed = [(k, old.get(k), v) for k, v in new.items() if old.get(k) != v]
    return changed + [(k, v, None) for k, v in sorted(old.items()) if k not in new]


def run_name_for(stem: str, differences: list[tuple[str, str | None, str | None]]) -> str:
    """`stem (what differs)`: the ranker and label values by name, parts added (+), removed (-) or
    with other parameters (the changed ones)."""
    if not differences:
        return stem
    shown = [_difference(*d) for d in differences[:NAME_DIFFERENCES]]
    more = len(differences) - NAME_DIFFERENCES
    return f"{stem} ({', '.join(shown)}{f', +{more} more' if more > 0 else ''})"


def _difference(key: str, old: str | None, new: str | None) -> str:
    section, _, name = key.partition(".")
    if section not in ("candidates", "features"):
        return f"{name or section}={new}" if new is not None else f"-{name or section}"
    if old is None:
        return f"+{name}"
    if new is None:
        return f"-{name}"
    before, after = _part_params(old), _part_params(new)
    changed = [f"{k}={v}" for k, v in after.items() if before.get(k) != v] + [f"-{k}" for k in before if k not in after]
    return f"{name}({','.join(changed)})"


def _part_params(text: str) -> dict[str, str]:
    return dict(pair.partition("=")[::2] for pair in text.split(",")) if text != "defaults" else {}


def _description(feature_set: FeatureSet, stem: str, previous, differences: list) -> str:
    """The TOML's description, then what differs from the previous run (markdown, shown on the run page)."""
    lines = [feature_set.description or f"Feature set {feature_set.name} (no description in the file)."]
    if previous is not None:
        if differences:
            lines += ["", f"Differs from the previous run `{previous.info.run_name}` ({previous.info.run_id}):"]
            lines += [f"- `{key}`: {old if old is not None else '(absent)'} → {new if new is not None else '(absent)'}"
                      for key, old, new in differences]
        else:
            lines += ["", f"Same feature set as the previous run `{previous.info.run_name}` ({previous.info.run_id})."]
    return "\n".join(lines)


def _previous_run(mlflow, experiment_id: str):
    runs = mlflow.MlflowClient().search_runs([experiment_id], "attributes.status = 'FINISHED'",
                                             order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _shown_path(path: str | Path) -> str:
    """The feature-set file relative to the working folder when it lies inside it, else absolute."""
    try:
        from recengine.featureset import resolve

        resolved = Path(resolve(path)).resolve()
    except Exception:  # an older featureset without bundled names, or a path that vanished
        resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(resolved)


def _git_tags(path: Path | None) -> dict[str, str]:
    """The commit of the git checkout holding the feature-set file (else the working folder), and
    whether it has uncommitted changes; nothing when there is no checkout or no git."""
    folder = (path.resolve().parent if path is not None and path.exists() else Path.cwd())

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def _await_a_system_sample(started: float) -> None:
    """MLflow's monitor logs a sample only after a whole sampling interval: a run shorter than that
    (a small data set) would end with none. Hold such a run open until one is logged (a few seconds
    at most), so every run shows its system metrics."""
    interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or SYSTEM_METRICS_INTERVAL_S)
    remaining = min(interval + 1.0, 6.0) - (time.time() - started)
    if remaining > 0:
        time.sleep(remaining)


def _quiet_system_metrics_messages() -> None:
    # MLflow announces starting and stopping its monitor at INFO on every run: noise in the CLI's output.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


# -- what the run holds ----------------------------------------------------------------------------

def _result_params(result: TrainResult) -> dict[str, Any]:
    spec = result.model.spec
    params: dict[str, Any] = {f"data.{k}": v for k, v in result.lineage.items()}
    params["features"] = len(result.model.features)
    # LightGBM's best validation iteration (early stopping), and the rounds of the model as saved
    # (the refit's, scaled up from the best iteration, when refit is on).
    params["best_iteration"] = spec["early_stopped_at"]
    params["final_model_rounds"] = spec["best_iteration"]
    params["encoders"] = ",".join(spec["encoders"]) or "none"
    return params


def result_metrics(result: TrainResult) -> dict[str, float]:
    """The run's metrics: the ranker's headline ones at the top level, the rest grouped by prefix."""
    metrics = {}
    for name, value in result.metrics.items():
        key = metric_key(name)
        metrics[key if name in HEADLINE else f"ranker/{'validation_requests' if name == 'requests' else key}"] = value
    for source, values in result.baselines.items():
        metrics.update({f"baseline/{source}/{metric_key(k)}": v for k, v in values.items() if k != "requests"})
    metrics.update({f"time/{k}_s": v for k, v in result.timings.items()})
    return metrics


def _log_curves(mlflow, run_id: str, history: dict[str, list[float]]) -> None:
    """LightGBM's own validation NDCG per boosting iteration (it counts only groups holding a positive,
    so it is not the headline `ndcg_at_10`): one step per iteration."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(curve_key(name), float(v), now, step)
               for name, values in history.items() for step, v in enumerate(values, 1)]
    client = mlflow.MlflowClient()
    for start in range(0, len(metrics), 1000):  # log_batch's limit per call
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def curve_key(history_name: str) -> str:
    """`validation_ndcg@10` (a LightGBM eval) → `curve/lightgbm_validation_ndcg_at_10`."""
    return f"curve/lightgbm_{metric_key(history_name)}"


def _toml_free_note(feature_set: FeatureSet) -> str:
    return f"# feature set '{feature_set.name}' was built in code, not loaded from a file\n# {feature_set.to_dict()}\n"


def _log_figures(mlflow, result: TrainResult, run_name: str, feature_set: FeatureSet) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whose = f"{run_name}  [feature set {feature_set.name}]"
    top = result.importance.head(25)
    fig, ax = plt.subplots(figsize=(7, 0.3 * top.height + 1.3))
    ax.barh(top["feature"].to_list()[::-1], top["gain"].to_list()[::-1])
    ax.set_xlabel("total gain")
    ax.set_title(f"{whose}\nFeature importance (gain)", fontsize=9)
    fig.tight_layout()
    mlflow.log_figure(fig, "feature_importance.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in result.history.items():
        ax.plot(range(1, len(values) + 1), values, label=name.removeprefix("validation_"))
    best = result.model.spec["early_stopped_at"]
    ax.axvline(best, color="grey", linestyle="--",
               label=f"best {early_stopping_metric(result.model.spec['feature_set']['ranker'])} (iteration {best})")
    ax.set_xlabel("boosting iteration")
    ax.set_ylabel("validation NDCG (LightGBM's)")
    ax.set_title(f"{whose}\nValidation NDCG by iteration", fontsize=9)
    ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "ndcg_by_iteration.png")
    plt.close(fig)


def _log_datasets(mlflow, run_id: str, result: TrainResult, feature_set: FeatureSet) -> None:
    """Lineage in MLflow's dataset panel: the raw data (digest of its content alone) and the labelled
    example tables (digest of the raw data's and the feature set's: equal for equal inputs, whatever
    the feature values' last bits)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    lineage = result.lineage
    raw = Dataset(name=lineage["dataset"], digest=lineage["digest"], source_type="recengine",
                  source=json.dumps({"dataset": lineage["dataset"]}),
                  profile=json.dumps({k: v for k, v in lineage.items() if k not in ("dataset", "digest")}))
    mlflow.MlflowClient().log_inputs(run_id, [DatasetInput(raw, [InputTag("mlflow.data.context", "raw data")])])
    fs_digest = feature_set_digest(feature_set)
    for context, split in (("training", result.train), ("validation", result.validation)):
        if split is None:
            continue
        digest = hashlib.sha256(f"{lineage['digest']}:{fs_digest}:{context}".encode()).hexdigest()[:16]
        dataset = mlflow.data.from_polars(split.rows, targets="label", name=f"{lineage['dataset']} {context} examples",
                                          digest=digest)
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
    with tempfile.TemporaryDirectory() as tmp:
        folder = result.model.save(Path(tmp) / "ranker")
        info = mlflow.pyfunc.log_model(
            name="ranker",
            python_model=str(MODEL_CODE),
            artifacts={"ranker": str(folder)},
            signature=signature,
            input_example=example,
            pip_requirements=[f"lightgbm=={lightgbm.__version__}", f"mlflow=={mlflow.__version__}", "numpy", "pandas"],
        )
        _drop_local_paths(mlflow, info, Path(tmp) / "MLmodel.d")
    return info


def _drop_local_paths(mlflow, info, scratch: Path) -> None:
    """MLmodel records where its files came from: a temporary folder and this checkout's source file,
    absolute paths of the training machine that mean nothing elsewhere. Loading reads only the file's
    name and the artifact's path inside the model, so keep those and upload the MLmodel again."""
    from mlflow.models import Model

    scratch.mkdir()
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    location = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location
    local = Path(get_artifact_repository(location).download_artifacts("MLmodel", dst_path=str(scratch)))
    model = Model.load(str(local))
    flavor = model.flavors["python_function"]
    if flavor.get("model_code_path"):
        flavor["model_code_path"] = Path(flavor["model_code_path"]).name
    for artifact in flavor.get("artifacts", {}).values():
        artifact["uri"] = artifact["path"]
    model.save(str(local))
    mlflow.MlflowClient().log_model_artifact(info.model_id, str(local))


def _register(mlflow, logged: LoggedRun, name: str, result: TrainResult, feature_set: FeatureSet,
              promote: bool) -> LoggedRun:
    """Register the logged model; the version says what it scored and why it is (not) the champion."""
    from mlflow.exceptions import MlflowException

    score = result.metrics.get("ndcg@10", float("nan"))
    tags = {"ndcg_at_10": f"{score:.4f}", "run_name": logged.run_name, "feature_set": feature_set.name,
            "feature_set.digest": feature_set_digest(feature_set), "data.digest": result.lineage["digest"]}
    version = str(mlflow.register_model(logged.model_uri, name, tags=tags).version)
    client = mlflow.MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        best = client.get_run(current.run_id).data.metrics.get(PRIMARY_METRIC, float("-inf"))
    except MlflowException:
        current, best = None, float("-inf")
    if current is None:
        reason, champion = "the first version: no champion yet", True
    elif score > best:
        reason, champion = f"beats the champion, version {current.version} (validation NDCG@10 {best:.4f})", True
    else:
        reason = f"does not beat the champion, version {current.version} (validation NDCG@10 {best:.4f})"
        reason, champion = (f"promoted with --promote although it {reason}", True) if promote else (reason, False)
    logged.registered, logged.version = name, version
    client.update_model_version(name, version, description=(
        f"Run `{logged.run_name}` ({logged.run_id}), feature set {feature_set.name}, data {result.lineage['dataset']} "
        f"(digest {result.lineage['digest']}): validation NDCG@10 {score:.4f}. {reason[0].upper()}{reason[1:]}."))
    client.set_model_version_tag(name, version, "champion_decision", f"@{CHAMPION}: {reason}" if champion else reason)
    if champion:
        client.set_registered_model_alias(name, CHAMPION, version)
    logged.champion = champion
    return logged
