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
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from recengine.errors import ConfigError, DataError, PluginError
from recengine.store import tracking_uri
from recengine.topk import top_k

SPEC_FORMAT = 1
MODEL_FILE, SPEC_FILE, LEARNED_DIR, ADAPTER_DIR = "model.txt", "spec.json", "learned", "adapters"
LEARNED_STATES = ("refit", "saved")  # how ranking gets learned parts' states: fit on its events, or the model's


class RankerModel:
    """A LightGBM booster and the spec that says which features it reads, in which order."""

    def __init__(self, booster: lgb.Booster, spec: dict[str, Any], learned: dict[str, dict[str, np.ndarray]] | None = None,
                 adapters: dict[str, str] | None = None):
        # `learned`: the learned parts' states (arrays by part key), fit on the training events.
        # `adapters`: the feature set's adapter references (a path or an MLflow URI) -> the copy in the
        # model folder that a loaded model reads instead, so it needs no other store or file.
        self.booster, self.spec, self.learned = booster, spec, dict(learned or {})
        self.adapters = dict(adapters or {})

    @property
    def features(self) -> list[str]:
        return list(self.spec["features"])

    def feature_set(self):
        from recengine.featureset import FeatureSet

        raw = _with_adapters(self.spec["feature_set"], self.adapters)
        return FeatureSet.from_dict(raw, f"the model's feature set '{self.spec['feature_set']['name']}'")

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

    def use_saved_state(self, context) -> None:
        """Rank with the learned parts' states saved at training, instead of refitting them on the
        context's events (the default, done on first use)."""
        if self.learned:
            context.learned = dict(self.learned)
            context.learned_until = datetime.fromisoformat(self.spec["learned_until"])

    def digest(self) -> str:
        """sha256 of the model's content (its trees and spec): equal for the same model however loaded."""
        content = hashlib.sha256(self.booster.model_to_string().encode())
        content.update(json.dumps({k: v for k, v in self.spec.items() if k not in ("files", "adapters")}, sort_keys=True, default=str).encode())
        return content.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write model.txt and spec.json (with model.txt's sha256) into `path`, atomically: they are
        written into a new sibling folder that then takes the place of `path`. Only an older model
        folder is ever replaced; any other existing file or folder is refused (`check_model_destination`)."""
        path = Path(path)
        check_model_destination(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: that makes the folder 0700; a model folder follows the umask like any other.
        staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        staging.mkdir()
        try:
            text = self.booster.model_to_string().encode()
            _write_synced(staging / MODEL_FILE, text)
            files, adapters = {MODEL_FILE: _sha256(text)}, {}
            for key in sorted(self.learned):
                (staging / LEARNED_DIR).mkdir(exist_ok=True)
                data = arrays_to_npz(self.learned[key])
                _write_synced(staging / LEARNED_DIR / f"{key}.npz", data)
                files[f"{LEARNED_DIR}/{key}.npz"] = _sha256(data)
            for reference in adapter_references(self.spec["feature_set"]):
                data = self._adapter_bytes(reference)
                name = f"{ADAPTER_DIR}/{_sha256(data)[:24]}.safetensors"
                (staging / ADAPTER_DIR).mkdir(exist_ok=True)
                _write_synced(staging / name, data)
                files[name] = _sha256(data)
                adapters[reference] = name
            spec = {**self.spec, "files": files, "adapters": adapters}
            _write_synced(staging / SPEC_FILE, json.dumps(spec, indent=2, default=str).encode())
            _move_into_place(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # after a swap it holds the replaced model
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RankerModel":
        """The model in folder `path`, its files checked against the digests spec.json records (models
        saved before digests were recorded get a structural check of model.txt instead)."""
        path = Path(path)
        if not (path / MODEL_FILE).is_file() or not (path / SPEC_FILE).is_file():
            raise ConfigError(f"{path}: not a recengine model folder (expected {MODEL_FILE} and {SPEC_FILE}); "
                              "give the folder `recengine train --output` wrote, or an MLflow model URI.")
        spec = _read_spec(path / SPEC_FILE)
        text = _read_model_text(path / MODEL_FILE, spec)
        try:
            booster = lgb.Booster(model_str=text)
        except lgb.basic.LightGBMError as exc:
            raise ConfigError(f"{path / MODEL_FILE}: LightGBM cannot read it ({str(exc).strip()}); {_DAMAGED}") from None
        if booster.num_feature() != len(spec["features"]):
            raise ConfigError(f"{path / MODEL_FILE} reads {booster.num_feature()} features but {path / SPEC_FILE} lists "
                              f"{len(spec['features'])}: the two files are from different models; {_DAMAGED}")
        learned = {name[len(LEARNED_DIR) + 1:-len(".npz")]: _read_arrays(path / name, digest)
                   for name, digest in spec.get("files", {}).items() if name.startswith(f"{LEARNED_DIR}/")}
        for reference, name in spec.get("adapters", {}).items():
            _read_checked(path / name, spec["files"].get(name, ""))
        adapters = {reference: str((path / name).resolve()) for reference, name in spec.get("adapters", {}).items()}
        return cls(booster, spec, learned, adapters)

    def _adapter_bytes(self, reference: str) -> bytes:
        """The adapter file a feature-set reference names (or this model's copy of it), checked."""
        from recengine.adapters import adapter_bytes, parse_adapter

        data = adapter_bytes(self.adapters.get(reference, reference))
        parse_adapter(data, reference)  # digest and format, or a DataError saying what is wrong
        return data


_DAMAGED = "the model folder is damaged: train the model again (recengine train --output) or download it again."


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """A learned state as .npz bytes that depend on the arrays alone (fixed entry times and order), so
    the same state always has the same digest. Read back with `np.load(..., allow_pickle=False)`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    return buffer.getvalue()


def adapter_references(raw: Any) -> list[str]:
    """Every `adapter` value (a path or an MLflow URI) in a feature set's parameters, sorted, once each."""
    if isinstance(raw, dict):
        found = [raw["adapter"]] if isinstance(raw.get("adapter"), str) else []
        return sorted({*found, *(ref for value in raw.values() for ref in adapter_references(value))})
    if isinstance(raw, list):
        return sorted({ref for value in raw for ref in adapter_references(value)})
    return []


def _with_adapters(raw: Any, adapters: dict[str, str]) -> Any:
    """The feature set with each adapter reference replaced by the model's own copy."""
    if not adapters:
        return raw
    if isinstance(raw, dict):
        return {key: (adapters.get(value, value) if key == "adapter" and isinstance(value, str) else _with_adapters(value, adapters))
                for key, value in raw.items()}
    if isinstance(raw, list):
        return [_with_adapters(value, adapters) for value in raw]
    return raw


def _read_checked(file: Path, digest: str) -> bytes:
    """A file of the model folder, checked against the digest spec.json records for it."""
    data = file.read_bytes() if file.is_file() else b""
    if _sha256(data) != digest:
        raise ConfigError(f"{file}: missing, or its content does not match the sha256 in {file.parents[1] / SPEC_FILE}; {_DAMAGED}")
    return data


def _read_arrays(file: Path, digest: str) -> dict[str, np.ndarray]:
    """A learned state written by `arrays_to_npz`, checked against its digest; objects are refused."""
    data = _read_checked(file, digest)
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _read_spec(file: Path) -> dict[str, Any]:
    """spec.json, parsed and checked for the keys loading needs."""
    try:
        spec = json.loads(file.read_bytes())
    except ValueError as exc:  # bad JSON or bad UTF-8: a truncated or overwritten file
        raise ConfigError(f"{file}: not valid JSON ({exc}); {_DAMAGED}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{file}: expected a JSON object, found {type(spec).__name__}; {_DAMAGED}")
    if spec.get("format") != SPEC_FORMAT:
        raise ConfigError(f"{file}: spec format {spec.get('format')!r}; this recengine reads format {SPEC_FORMAT}.")
    # `files` is optional: models saved before digests were recorded lack it.
    problems = [f"'{key}' (a JSON {kind.__name__})" for key, kind in (("features", list), ("feature_set", dict), ("files", dict))
                if (key in spec or key != "files") and not isinstance(spec.get(key), kind)]
    if problems:
        raise ConfigError(f"{file}: missing or malformed {', '.join(problems)}; {_DAMAGED}")
    return spec


def _read_model_text(file: Path, spec: dict[str, Any]) -> str:
    """model.txt's text, only once it is known to be whole: LightGBM's parser aborts or segfaults the
    process on a truncated file instead of raising."""
    data = file.read_bytes()
    expected = spec.get("files", {}).get(MODEL_FILE)
    if expected is not None and _sha256(data) != expected:
        raise ConfigError(f"{file}: its content does not match the sha256 recorded in {file.parent / SPEC_FILE} "
                          f"(the file was truncated or changed after the model was saved); {_DAMAGED}")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not a LightGBM text model (not UTF-8 text); {_DAMAGED}") from None
    if expected is None:
        _check_whole(text, file)  # a model saved before digests were recorded
    return text


def _check_whole(text: str, file: Path) -> None:
    """A LightGBM text model declares its trees' sizes (`tree_sizes=`): they must add up to the text
    from the first tree to `end of trees`, which a truncated file lacks."""
    end = text.find("\nend of trees")
    sizes = re.search(r"^tree_sizes=(.*)$", text, re.MULTILINE)
    first = text.find("Tree=0\n")
    declared = sum(int(n) for n in sizes.group(1).split() if n.isdigit()) if sizes else None
    if end < 0 or (declared is not None and (first < 0 or declared != end + 1 - first)):
        raise ConfigError(f"{file}: an incomplete LightGBM model (its trees do not end where it says they do: "
                          f"the file is truncated or changed); {_DAMAGED}")


def _write_synced(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename folder `staging` to `path`. An existing (model) folder at `path` is swapped with it in
    one step where the OS allows (Linux renameat2), so `path` always holds a whole model; elsewhere
    the old folder is moved aside first. Either way the old model ends up in `staging`."""
    if not path.exists():
        os.replace(staging, path)
    elif not _exchange(staging, path):
        aside = path.with_name(f"{staging.name}.old")
        os.replace(path, aside)
        os.replace(staging, path)
        os.replace(aside, staging)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 with RENAME_EXCHANGE); False where the OS cannot."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # an old kernel, or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def check_model_destination(path: str | Path) -> None:
    """Refuse, before any training, a model destination that saving would damage or cannot write:
    an existing file, or a folder holding anything but a recengine model (model.txt, spec.json, learned/,
    adapters/: a model saved there before, which saving replaces)."""
    path = Path(path)
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in (MODEL_FILE, SPEC_FILE, LEARNED_DIR, ADAPTER_DIR))
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise ConfigError(f"{path}: the folder exists and is not a recengine model (it holds {shown}); saving the "
                              "model there would delete that. Choose a new folder for --output.")
    elif path.exists() or path.is_symlink():
        raise ConfigError(f"{path}: exists and is a file, not a model folder; choose a new folder for --output.")
    check_writable(path.parent, "--output")


def check_writable(folder: str | Path, option: str) -> None:
    """Fail now, not after the work, when files cannot be created in `folder` (or, if it does not
    exist yet, in the nearest existing folder above it, where it would be created)."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), Path.cwd())
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, not a folder, so nothing can be written under it; "
                          f"choose another location for {option}.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".recengine-write-check.", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write in folder {existing.resolve()} ({exc.strerror}); choose a writable location "
                          f"for {option}, or change that folder's permissions.") from None


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


    mlflow.set_tracking_uri(tracking_uri())
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri)))
    except MlflowException as exc:
        raise ConfigError(f"model '{uri}': MLflow could not resolve it ({exc.message}); "
                          f"check the name, version or alias against tracking store {tracking_uri()}.") from None
    return RankerModel.load(downloaded / "artifacts" / "ranker")
