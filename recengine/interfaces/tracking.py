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

Faults (issue #25): a run records its process (`recengine.host`, `recengine.pid`, and on Linux the pid
namespace and the process's start) so that a later run on the machine can end a run whose process died
(SIGKILL, out of memory) as KILLED; SIGTERM ends the run KILLED as Ctrl-C does; `@champion` is compared
and moved under a lock; a store with no room left gives a `StoreError` saying where the model was kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from recengine.core.store import (
    STORE_DIR,
    StoreError,
    default_uri,
    open_store,
    out_of_space,
    sqlite_file,
    store_full,
    store_lock,
)
from recengine.errors import ConfigError
from recengine.learning.training import TrainResult, early_stopping_metric
from recengine.parts.featureset import FeatureSet

CHAMPION = "champion"
PRIMARY_METRIC = "ndcg_at_10"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# The ranker's metrics shown at the top level; its others go under ranker/.
HEADLINE = ("ndcg@10", "ndcg@5", "recall@10", "hr@10", "mrr@10", "auc", "coverage@10")
# Seconds between samples of MLflow's system metrics: short trainings still record a few.
SYSTEM_METRICS_INTERVAL_S = 2
NAME_DIFFERENCES = 3  # differences spelled out in a run name; the description lists them all
# A promotion waits this long for another one of the same model on a store without a local lock file.
PROMOTION_WAIT_S = 120
# A registry lock older than this is taken to be left by a process that died holding it.
PROMOTION_LOCK_STALE_S = 600
LOCK_SUFFIX = ".promotion-lock"
log = logging.getLogger(__name__)


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

    mlflow.set_tracking_uri(open_store())
    end_abandoned_runs(mlflow.MlflowClient())
    experiment_id = _experiment(mlflow, experiment)
    params = feature_set_params(feature_set)
    previous = _previous_run(mlflow, experiment_id)
    differences = param_differences(previous.data.params, params) if previous is not None else []
    stem = Path(feature_set_path).stem if feature_set_path else feature_set.name
    name = run_name or run_name_for(stem, differences)
    tags = {"feature_set": feature_set.name, "feature_set.digest": feature_set_digest(feature_set),
            **_git_tags(Path(feature_set_path) if feature_set_path else None), **process_tags()}
    if feature_set_path:
        tags["feature_set.path"] = _shown_path(feature_set_path)
    _quiet_system_metrics_messages()
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    description = _description(feature_set, stem, previous, differences)
    with _open_run(mlflow, experiment_id=experiment_id, run_name=name, tags=tags, description=description,
                   log_system_metrics=True) as run:
        mlflow.log_params(params)
        started = time.time()
        yield TrainingRun(run.info.run_id, experiment_id, name, started)
        _await_a_system_sample(started)


def log_training(
    result: TrainResult,
    feature_set: FeatureSet,
    experiment: str = "recengine",
    model_name: str | None = None,
    promote: bool = False,
    feature_set_path: str | Path | None = None,
    run_name: str | None = None,
    model_folder: str | Path | None = None,
) -> LoggedRun:
    """Log `result` into the open `training_run` (or a run opened for it now, in `experiment`);
    register the model under `model_name` (if given) and move `@champion` to it when `promote` is set,
    when there is none yet, or when it beats the champion's validation NDCG@10. A store with no room
    left raises `StoreError`, the trained model kept in `model_folder` (where it was saved already) or
    else in a new temporary folder, which the message names."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        with training_run(feature_set, experiment, feature_set_path, run_name) as opened:
            return _log(mlflow, result, feature_set, opened, model_name, promote, model_folder)
    opened = TrainingRun(run.info.run_id, run.info.experiment_id, run.info.run_name, run.info.start_time / 1000)
    return _log(mlflow, result, feature_set, opened, model_name, promote, model_folder)


def _log(mlflow, result: TrainResult, feature_set: FeatureSet, run: TrainingRun, model_name: str | None,
         promote: bool, model_folder: str | Path | None) -> LoggedRun:
    try:
        return _log_all(mlflow, result, feature_set, run, model_name, promote)
    except Exception as exc:
        reason = out_of_space(exc)
        if reason is None:
            raise
        raise store_full(mlflow.get_tracking_uri(), reason, run.run_id, _keep_model(result, model_folder)) from exc


def _keep_model(result: TrainResult, model_folder: str | Path | None) -> Path | None:
    """Where the trained model survives a store that had no room for it: the folder it was saved to
    already, else a new folder under the system's temporary folder (None when that has no room either)."""
    if model_folder is not None and (Path(model_folder) / "model.txt").is_file():
        return Path(model_folder)
    try:
        return Path(result.model.save(Path(tempfile.mkdtemp(prefix="recengine-model-")) / "model"))
    except OSError:
        return None


def _log_all(mlflow, result: TrainResult, feature_set: FeatureSet, run: TrainingRun, model_name: str | None,
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
    ends it FAILED with the message in the `error` tag (SIGTERM or Ctrl-C: KILLED)."""
    import mlflow

    mlflow.set_tracking_uri(open_store())
    end_abandoned_runs(mlflow.MlflowClient())
    with _open_run(mlflow, experiment_id=_experiment(mlflow, experiment), run_name=run_name,
                   tags={**(tags or {}), **process_tags()}) as run:
        yield run.info.run_id


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
    from recengine.learning.tuning import adalora_ranks

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

    from recengine.parts.adapters import save_adapter

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
                              tags={"learned_parts": ",".join(keys), "learned_until": until.isoformat(),
                                    **process_tags()}):
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
    # The new-item policy only when on ({} when off): runs of sets without it keep their parameters and
    # names. An unset release_field ("") is left out: MLflow stores no empty values.
    params.update({f"policy.{k}": v for k, v in getattr(feature_set, "policy", {}).items() if v != ""})
    return params


def feature_set_digest(feature_set: FeatureSet) -> str:
    """A digest of what the feature set computes (its tables and values, not its name, description,
    comments or layout)."""
    content = {k: v for k, v in feature_set.to_dict().items() if k not in ("name", "description")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def param_differences(before: dict[str, str], after: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """(key, old, new) for each feature-set parameter that differs from a previous run's, in the new
    feature set's order, then the removed ones; None where a side lacks the key."""
    tracked = ("candidates.", "features.", "labels.", "ranker.", "policy.", "exclude_seen")
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
    """The experiment's latest finished training: a child run (a tuned part's curves, logged inside a
    training) is part of its parent, not a training to compare with."""
    client, token = mlflow.MlflowClient(), None
    while True:
        runs = client.search_runs([experiment_id], "attributes.status = 'FINISHED'", max_results=100,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        found = next((run for run in runs if "mlflow.parentRunId" not in run.data.tags), None)
        if found is not None or not runs.token:
            return found
        token = runs.token


def _shown_path(path: str | Path) -> str:
    """The feature-set file relative to the working folder when it lies inside it, else absolute."""
    try:
        from recengine.parts.featureset import resolve

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
        # A head of the rows: the training rows may be millions, in parts on disk; the digest names them all.
        dataset = mlflow.data.from_polars(split.head(EXAMPLE_ROWS), targets="label", name=f"{lineage['dataset']} {context} examples",
                                          digest=digest)
        mlflow.log_input(dataset, context=context)


EXAMPLE_ROWS = 10_000  # rows of each split logged as the run's dataset inputs


def _log_model(mlflow, result: TrainResult):
    import lightgbm
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("double", name, required=False) for name in result.model.features]),
        outputs=Schema([ColSpec("double", "score")]),
    )
    example = None
    if result.validation is not None:
        example = result.validation.head(3).select(result.model.features).to_pandas()
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
    """Register the logged model; the version says what it scored and why it is (not) the champion.
    Reading the champion, creating the version (its description and decision in the same call, so no
    interruption leaves a version without them) and moving `@champion` happen under the promotion lock,
    so two trainings finishing together compare with each other: the better one ends as champion and
    only one is "the first version". SIGTERM waits until the step is done."""
    client = mlflow.MlflowClient()
    score = result.metrics.get("ndcg@10", float("nan"))
    tags = {"ndcg_at_10": f"{score:.4f}", "run_name": logged.run_name, "feature_set": feature_set.name,
            "feature_set.digest": feature_set_digest(feature_set), "data.digest": result.lineage["digest"]}
    with _promotion_lock(mlflow, client, name), _sigterm_deferred():
        reason, champion = _decision(client, name, score, promote)
        tags["champion_decision"] = f"@{CHAMPION}: {reason}" if champion else reason
        description = (f"Run `{logged.run_name}` ({logged.run_id}), feature set {feature_set.name}, data "
                       f"{result.lineage['dataset']} (digest {result.lineage['digest']}): validation NDCG@10 "
                       f"{score:.4f}. {reason[0].upper()}{reason[1:]}.")
        version = _create_version(client, name, logged, tags, description)
        if champion:
            client.set_registered_model_alias(name, CHAMPION, version)
    logged.registered, logged.version, logged.champion = name, version, champion
    return logged


def _decision(client, name: str, score: float, promote: bool) -> tuple[str, bool]:
    """Why a version scoring `score` is (not) the champion, and whether it is."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        best = client.get_run(current.run_id).data.metrics.get(PRIMARY_METRIC, float("-inf"))
    except MlflowException:
        return "the first version: no champion yet", True
    if score > best:
        return f"beats the champion, version {current.version} (validation NDCG@10 {best:.4f})", True
    reason = f"does not beat the champion, version {current.version} (validation NDCG@10 {best:.4f})"
    return (f"promoted with --promote although it {reason}", True) if promote else (reason, False)


def _create_version(client, name: str, logged: LoggedRun, tags: dict[str, str], description: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    model_id = logged.model_uri.removeprefix("models:/")
    return str(client.create_model_version(name, logged.model_uri, run_id=logged.run_id, tags=tags,
                                           description=description, model_id=model_id).version)


# -- concurrent promotions ---------------------------------------------------------------------------

@contextmanager
def _promotion_lock(mlflow, client, name: str) -> Iterator[None]:
    """One promotion of a store at a time: a lock file beside a local SQLite registry; for other stores
    (a tracking server, a database server) an entry the registry creates for one caller only."""
    uri = mlflow.get_registry_uri()
    if sqlite_file(uri) is not None:
        with store_lock(uri):
            yield
    else:
        with registry_lock(client, name):
            yield


@contextmanager
def registry_lock(client, name: str, wait_s: float = PROMOTION_WAIT_S) -> Iterator[None]:
    """Hold the registered model `<name>.promotion-lock`, which only one caller can create (the registry
    refuses a second with RESOURCE_ALREADY_EXISTS); deleted when done. One whose process is gone, or
    older than PROMOTION_LOCK_STALE_S, is taken away."""
    from mlflow.exceptions import MlflowException

    lock, deadline = f"{name}{LOCK_SUFFIX}", time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags=process_tags(), description=(
                f"Held while a recengine training moves @{CHAMPION} of {name}; deleted when it is done."))
            break
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        if _stale_lock(client, lock):
            with suppress(MlflowException):  # (another waiter may have taken it away first)
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise StoreError(f"Another training has been moving @{CHAMPION} of {name} for over {wait_s:.0f} s (it "
                             f"holds the registered model {lock}). Wait for it and train again; if no training is "
                             f"running, delete {lock} in the MLflow UI first.")
        time.sleep(0.2)
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except MlflowException as exc:
            log.warning("could not delete the registry lock %s (%s); delete it in the MLflow UI if promotions of %s "
                        "wait for it", lock, exc, name)


def _stale_lock(client, lock: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(lock)
    except MlflowException:
        return False  # released meanwhile: try again
    age_s = time.time() - held.creation_timestamp / 1000
    return age_s > PROMOTION_LOCK_STALE_S or process_gone(held.tags)


# -- processes that ended without closing their run (issue #25) ---------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a run (`timeout`, a container stop, `kill`): raised where Ctrl-C raises
    KeyboardInterrupt, so the run ends KILLED and the CLI stops as it does on Ctrl-C."""


@dataclass
class _Sigterm:
    deferred: bool = False
    pending: bool = False
    raised: bool = False


_sigterm = _Sigterm()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a run is open, SIGTERM raises `Terminated` instead of ending the process on the spot (which
    leaves the run RUNNING). Only where SIGTERM's handler is the default one and only in the main thread
    (the one place Python runs signal handlers); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        if _sigterm.deferred:
            _sigterm.pending = True
        elif not _sigterm.raised:  # a second SIGTERM lets the first one's cleanup finish
            _sigterm.raised = True
            raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm.deferred = _sigterm.pending = _sigterm.raised = False


@contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """SIGTERM waits until the block is done (a promotion: version, description and alias together)."""
    _sigterm.deferred = True
    try:
        yield
    finally:
        _sigterm.deferred = False
    if _sigterm.pending and not _sigterm.raised:
        _sigterm.pending, _sigterm.raised = False, True
        raise Terminated("SIGTERM")


@contextmanager
def _open_run(mlflow, **start: Any) -> Iterator[Any]:
    """`mlflow.start_run(**start)`, ended FINISHED; on an exception ended FAILED (SIGTERM or Ctrl-C: KILLED)
    with the reason in the `error` tag and its pending logged models marked FAILED. A store that cannot
    be written at the start raises StoreError."""
    with _sigterm_raises():
        try:
            run = mlflow.start_run(**start)
        except Exception as exc:
            reason = out_of_space(exc)
            if reason is None:
                raise
            raise StoreError(f"The MLflow store {mlflow.get_tracking_uri()} cannot take a new run ({reason}). Free "
                             "space on its disk, or set MLFLOW_TRACKING_URI to a store elsewhere.") from exc
        try:
            yield run
        except BaseException as exc:
            _end_failed(mlflow, run.info, exc)
            raise
        mlflow.end_run()


def _end_failed(mlflow, info, exc: BaseException) -> None:
    """End the active run after `exc`; when the store cannot be written (no room left) the run stays
    RUNNING, and the next run on this machine ends it, its process being gone."""
    if isinstance(exc, Terminated):
        why = "Terminated: SIGTERM (a `timeout`, a container stop or `kill`) stopped the process"
    elif isinstance(exc, KeyboardInterrupt):
        why = "KeyboardInterrupt: stopped with Ctrl-C"
    else:
        why = f"{type(exc).__name__}: {exc}"[:4000]
    # (Failures here are logged at debug level only: `exc` is what the user needs to read.)
    try:
        mlflow.set_tag("error", why)
        _fail_pending_models(mlflow.MlflowClient(), info.experiment_id, info.run_id, why)
    except Exception as error:
        log.debug("could not record why run %s ended: %s", info.run_id, error)
    try:
        mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
    except Exception as error:
        log.debug("could not end run %s: %s", info.run_id, error)


def process_tags() -> dict[str, str]:
    """The run's process: host and pid, and on Linux its pid namespace and start (boot id and start
    tick), so that a later run can tell a dead process from a live one that reuses the pid."""
    tags = {"recengine.host": socket.gethostname(), "recengine.pid": str(os.getpid())}
    namespace, start = _pid_namespace(), _process_start(os.getpid())
    if namespace:
        tags["recengine.pid_namespace"] = namespace
    if start:
        tags["recengine.process_start"] = start
    return tags


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process `process_tags` recorded has ended: only for one on this host and pid namespace
    (another machine's or container's processes cannot be seen from here)."""
    if tags.get("recengine.host") != socket.gethostname() or not tags.get("recengine.pid", "").isdigit():
        return False
    if tags.get("recengine.pid_namespace", _pid_namespace()) != _pid_namespace():
        return False
    pid = int(tags["recengine.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _process_start(pid)
    recorded = tags.get("recengine.process_start")
    return start == "zombie" or (recorded is not None and start is not None and start != recorded)


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """`<boot id>:<start tick>` of a process (Linux), "zombie" for one that ended and awaits its parent."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return "zombie" if fields[0] in ("Z", "X") else f"{boot}:{fields[19]}"


def end_abandoned_runs(client) -> list[str]:
    """End as KILLED the RUNNING runs of this machine whose process is gone (killed with SIGKILL, out of
    memory, a crash): the `error` tag says so, their pending logged models are marked FAILED, and a
    registration they left half done is described. Returns their ids. Called as each run starts; a
    store that cannot be searched is left as it is (the run's own start reports it)."""
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        query = f"attributes.status = 'RUNNING' AND tags.`recengine.host` = '{socket.gethostname()}'"
        runs = client.search_runs(experiments, query, max_results=1000) if experiments else []
    except Exception as exc:
        log.warning("could not look for runs left RUNNING: %s", (str(exc).strip().splitlines() or [repr(exc)])[0])
        return []
    ended = []
    for run in runs:
        if process_gone(run.data.tags):
            _end_abandoned(client, run)
            ended.append(run.info.run_id)
    return ended


def _end_abandoned(client, run) -> None:
    tags, run_id = run.data.tags, run.info.run_id
    why = (f"Killed: process {tags['recengine.pid']} on {tags['recengine.host']} ended without closing this run "
           "(SIGKILL, out of memory, a crash or a power loss); marked KILLED by a later recengine run at "
           f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
    client.set_tag(run_id, "error", tags.get("error") or why)
    client.set_tag(run_id, "recengine.ended", why)
    _fail_pending_models(client, run.info.experiment_id, run_id, why)
    _settle_versions(client, run_id)
    client.set_terminated(run_id, "KILLED", end_time=_last_seen(client, run))


def _fail_pending_models(client, experiment_id: str, run_id: str, why: str) -> None:
    """Mark FAILED the run's logged models still PENDING (their files may be partial: a truncated model.txt)."""
    # (Filtered here: the SQL store keeps the status as a number, and `status = 'PENDING'` finds nothing.)
    models = client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'")
    for model in [m for m in models if str(m.status) == "PENDING"]:
        client.set_logged_model_tags(model.model_id, {"error": f"not complete: {why}"})
        client.finalize_logged_model(model.model_id, "FAILED")


def _settle_versions(client, run_id: str) -> None:
    """A registration the killed process left half done: a version without its description, or one
    that says it is the champion although the process died before moving @champion to it."""
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        name, number = version.name, version.version
        claimed = (version.tags.get("champion_decision") or "").startswith(f"@{CHAMPION}")
        if not version.description:
            client.update_model_version(name, number, description=(
                f"Registered by run {run_id}, whose process was killed before the registration was finished: "
                f"not compared with @{CHAMPION}, which did not move here."))
            client.set_model_version_tag(name, number, "champion_decision", "undecided: the process was killed")
        elif claimed and CHAMPION not in version.aliases:
            note = f"its process was killed before @{CHAMPION} moved here; @{CHAMPION} did not move"
            client.update_model_version(name, number, description=f"{version.description} But {note}.")
            decision = f"{version.tags['champion_decision']}; {note}"
            client.set_model_version_tag(name, number, "champion_decision", decision)


def _last_seen(client, run) -> int | None:
    """When the run was last alive (its last system metric sample, in ms), else None (now)."""
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    return max((m.timestamp for m in history), default=None)
