"""The trained ranker as files: a LightGBM text model plus a JSON spec, never a pickle.

    model_dir/
      model.txt    LightGBM's own text format
      spec.json    feature set, feature columns, encoder ids, plugin versions, training lineage,
                   the sha256 of every other file (`files`) and of the spec itself (`spec_sha256`)
      learned/     the learned parts' states (.npz), adapters/ the tuned encoders' weights (.safetensors)

`RankerModel` scores feature rows and, given a `FeatureContext`, turns requests into ranked items.

A model folder is data from outside (downloaded, copied, sent): loading trusts nothing in it. spec.json
is checked against a schema and its own digest, every path it names must stay inside the folder,
model.txt is checked structurally before LightGBM's parser sees it (that parser crashes the process on
a truncated or crafted file instead of raising), arrays and tensors must be finite, the feature set
passes the checks a feature set file gets, and every plugin must be installed at the version the model
was trained with. Anything else is refused with a message. Saving never deletes anything but an older
model in the same folder; a save that fails (a full disk) keeps the model in a temporary folder.
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
from typing import Any, Callable

import lightgbm as lgb
import numpy as np
import polars as pl

from recengine.core.store import tracking_uri
from recengine.errors import ConfigError, DataError, PluginError, RecengineError
from recengine.learning.model_text import check_model_text

SPEC_FORMAT = 1
MODEL_FILE, SPEC_FILE, LEARNED_DIR, ADAPTER_DIR = "model.txt", "spec.json", "learned", "adapters"
LEARNED_STATES = ("refit", "saved")  # how ranking gets learned parts' states: fit on its events, or the model's
# spec.json's digest of its own other keys (canonical JSON): an edit of `k`, `exclude_seen` or the
# feature order would otherwise change every result silently. Older folders lack it.
SPEC_DIGEST = "spec_sha256"
# Learned-state arrays that record how a fit went (a tuning's held-out recall and loss per epoch) and
# are never computed with: NaN is a value they may hold. Every other float array must be finite.
DIAGNOSTIC_ARRAYS = ("recall", "loss")


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

    def feature_set(self, source: str | None = None):
        from recengine.parts.featureset import FeatureSet

        raw = _with_adapters(self.spec["feature_set"], self.adapters)
        return FeatureSet.from_dict(raw, source or f"the model's feature set '{self.spec['feature_set'].get('name')}'")

    def check_plugins(self) -> None:
        """Every part the model was trained with must be registered now, by a plugin of the same version."""
        from recengine.parts import plugins

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
        seen items excluded, features as of each timestamp, scored. Adds `item_id`, `rank`, `score`. With
        the feature set's [policy], new items take the last slots (`recengine.parts.policy`)."""
        from recengine.parts import policy as new_items

        feature_set = self.feature_set()
        policy = new_items.NewItemPolicy.of(feature_set)  # None: plain top k
        keyed = requests.with_row_index("_request_id")
        rows = feature_set.candidate_rows(keyed, context)
        matrix = self.matrix(rows)
        scored = new_items.with_policy_score(rows, matrix, self.features, policy)
        best = new_items.top(scored.with_columns(pl.Series("score", self.predict(matrix))), ["_request_id"], k, policy,
                             context, feature_set.exclude_seen)
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
        content.update(json.dumps({k: v for k, v in self.spec.items() if k not in ("files", "adapters", SPEC_DIGEST)},
                                  sort_keys=True, default=str).encode())
        return content.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write model.txt and spec.json (with model.txt's sha256) into `path`, atomically: they are
        written into a new sibling folder that then takes the place of `path`. Only an older model
        folder is ever replaced; any other existing file or folder is refused (`check_model_destination`)."""
        path = Path(path)
        check_model_destination(path)
        try:
            return self._write(path)
        except OSError as exc:  # a full disk, a quota, a file size limit: the training must not be lost
            raise self._kept_elsewhere(path, exc) from None

    def _write(self, path: Path) -> Path:
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
            spec = {k: v for k, v in self.spec.items() if k != SPEC_DIGEST} | {"files": files, "adapters": adapters}
            spec = json.loads(json.dumps(spec, default=str))  # as it will be read back, so the digest matches
            spec[SPEC_DIGEST] = spec_digest(spec)
            _write_synced(staging / SPEC_FILE, json.dumps(spec, indent=2).encode())
            _move_into_place(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # after a swap it holds the replaced model
        return path

    def _kept_elsewhere(self, path: Path, failure: OSError) -> RecengineError:
        """The error for a model folder that could not be written, once the model is saved in a new
        temporary folder instead (under the system's temporary directory), which the message names."""
        reason = failure.strerror or str(failure)
        if failure.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
            reason += ": the disk is full, or a quota or file size limit was reached"
        rescue = None
        try:
            rescue = Path(tempfile.mkdtemp(prefix="recengine-model-"))
            kept = self._write(rescue / (path.name or "model"))
        except OSError as again:
            if rescue is not None:
                shutil.rmtree(rescue, ignore_errors=True)
            return RecengineError(
                f"cannot write the model folder {path} ({reason}), nor keep the model in {tempfile.gettempdir()} "
                f"({again.strerror or again}): this training's model is lost. Free disk space, or give --output a "
                "folder on another disk, and train again.")
        return RecengineError(
            f"cannot write the model folder {path} ({reason}). The trained model was kept, whole, in {kept}: free "
            f"space, then move that folder to {path}, or use it from where it is.")

    @classmethod
    def load(cls, path: str | Path) -> "RankerModel":
        """The model in folder `path`, every file checked (see the module's docstring) and every plugin it
        was trained with installed at the same version: what every command that uses a model relies on."""
        path = Path(path)
        spec, text = read_model_files(path)
        booster = _parse_booster(text, path / MODEL_FILE)
        files = spec.get("files", {})
        learned = {name[len(LEARNED_DIR) + 1:-len(".npz")]: _read_arrays(inside(path, name), digest)
                   for name, digest in files.items() if name.startswith(f"{LEARNED_DIR}/")}
        adapters = {reference: _read_adapter(path, name, files.get(name, ""))
                    for reference, name in spec.get("adapters", {}).items()}
        model = cls(booster, spec, learned, adapters)
        model.check_plugins()
        model._check_feature_set(path / SPEC_FILE)
        return model

    def _check_feature_set(self, spec_file: Path) -> None:
        """The spec's feature set passes every check a feature set file gets (its parts, their parameters,
        the [ranker] options) and computes exactly the model's features, in the model's order."""
        try:
            columns = self.feature_set(f"{spec_file} (its feature_set)").columns()
        except ConfigError as exc:
            raise ConfigError(f"{exc} This model cannot be used as it is: train it again (recengine train --output) "
                              "with a feature set that passes.") from None
        if columns != self.features:
            raise ConfigError(f"{spec_file}: its feature set computes other columns than its 'features' list "
                              f"({_first_difference(columns, self.features)}, the feature set against the list): the "
                              f"file was edited; {_DAMAGED}")

    def _adapter_bytes(self, reference: str) -> bytes:
        """The adapter file a feature-set reference names (or this model's copy of it), checked."""
        from recengine.parts.adapters import adapter_bytes, parse_adapter

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


def read_model_files(folder: str | Path) -> tuple[dict[str, Any], str]:
    """spec.json and model.txt of model folder `folder`, checked: the spec against its schema and its own
    digest, model.txt against its digest and LightGBM's format (`check_model_text`), and the two
    against each other. What any loader of the folder needs before it hands model.txt to LightGBM."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / SPEC_FILE).is_file():
        raise ConfigError(f"{folder}: not a recengine model folder (expected {MODEL_FILE} and {SPEC_FILE}); "
                          "give the folder `recengine train --output` wrote, or an MLflow model URI.")
    spec = _read_spec(inside(folder, SPEC_FILE))
    for name in [*spec.get("files", {}), *spec.get("adapters", {}).values()]:
        _check_name(folder, name)
    text, names, trees = _read_model_text(inside(folder, MODEL_FILE), spec)
    _check_spec_digest(spec, folder / SPEC_FILE)
    _check_agree(spec, names, trees, folder)
    return spec, text


def inside(folder: Path, name: str) -> Path:
    """The file `name` (as spec.json records it) in `folder`, resolved. A name that leads anywhere else
    (an absolute path, '..', a symbolic link pointing out) is refused: the folder came from outside, and
    its spec must not make recengine read other files."""
    root = folder.resolve()
    target = (root / name).resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not target.is_relative_to(root):
        raise ConfigError(f"{folder / SPEC_FILE}: it names the file {name!r}, which is outside the model folder "
                          f"{folder} (a model reads only its own files); {_DAMAGED}")
    return target


def _check_name(folder: Path, name: str) -> None:
    """A file name spec.json records: inside the folder, and one of the files a model holds."""
    inside(folder, name)
    if not _FILE_NAME.fullmatch(name):
        raise ConfigError(f"{folder / SPEC_FILE}: it names the file {name!r}, which is none of the files a model holds "
                          f"({MODEL_FILE}, {LEARNED_DIR}/NAME.npz, {ADAPTER_DIR}/NAME.safetensors); {_DAMAGED}")


def spec_digest(spec: dict[str, Any]) -> str:
    """sha256 of spec.json's content apart from the digest itself, as canonical JSON (sorted keys)."""
    content = {k: v for k, v in spec.items() if k != SPEC_DIGEST}
    return _sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def _check_spec_digest(spec: dict[str, Any], file: Path) -> None:
    recorded = spec.get(SPEC_DIGEST)
    if recorded is not None and spec_digest(spec) != recorded:  # None: saved before the spec had a digest
        raise ConfigError(f"{file}: its content does not match the '{SPEC_DIGEST}' recorded in it: the file was edited "
                          "after the model was saved (a changed k, exclude_seen or feature order would change every "
                          "result without a word). Restore the file as it was saved, or train the model again "
                          "(recengine train --output).")


def _read_checked(file: Path, digest: str) -> bytes:
    """A file of the model folder, checked against the digest spec.json records for it."""
    data = file.read_bytes() if file.is_file() else b""
    if _sha256(data) != digest:
        raise ConfigError(f"{file}: missing, or its content does not match the sha256 in {SPEC_FILE}; {_DAMAGED}")
    return data


def _read_arrays(file: Path, digest: str) -> dict[str, np.ndarray]:
    """A learned state written by `arrays_to_npz`, checked against its digest; objects (pickles) and
    non-finite values (apart from DIAGNOSTIC_ARRAYS) are refused."""
    data = _read_checked(file, digest)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            loaded = {name: arrays[name] for name in arrays.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise ConfigError(f"{file}: not a learned state recengine wrote ({type(exc).__name__}: {exc}); {_DAMAGED}") from None
    for name, array in loaded.items():
        if name not in DIAGNOSTIC_ARRAYS and array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise ConfigError(f"{file}: array '{name}' holds {int((~np.isfinite(array)).sum()):,} NaN or infinite "
                              f"values, which would turn scores into NaN; {_DAMAGED}")
    return loaded


def _read_adapter(folder: Path, name: str, digest: str) -> str:
    """The path of an adapter the model carries, once its digest, format and tensors are checked."""
    from recengine.parts.adapters import parse_adapter

    file = inside(folder, name)
    parse_adapter(_read_checked(file, digest), str(file))  # a DataError naming the file if it is not whole
    return str(file)


# spec.json's keys: what each must be, and a test of it. Only format, features and feature_set are
# required: older model folders lack the rest. A key added to the spec must be added here.
def _whole(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _moment(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(datetime.fromisoformat(value))
    except ValueError:
        return False


_FILE_NAME = re.compile(rf"{re.escape(MODEL_FILE)}|{LEARNED_DIR}/[^/\\\x00]+\.npz|{ADAPTER_DIR}/[^/\\\x00]+\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
SPEC_SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "format": (f"the number {SPEC_FORMAT}", _whole),
    "recengine_version": ("a string", lambda v: isinstance(v, str)),
    "feature_set": ("a JSON object: the feature set", lambda v: isinstance(v, dict)),
    "features": ("a JSON list of distinct feature names without spaces",
                 lambda v: _texts(v) and len(set(v)) == len(v) and not any(c.isspace() for name in v for c in name)),
    "group_keys": ("a list of column names", _texts),
    "best_iteration": ("a whole number, 0 or more, or null", lambda v: v is None or _whole(v)),
    "early_stopped_at": ("a whole number, 0 or more, or null", lambda v: v is None or _whole(v)),
    "early_stopping_metric": ("a string", lambda v: isinstance(v, str)),
    "metrics_measured": ("a string", lambda v: isinstance(v, str)),
    "metrics": ("an object of metric names and numbers",
                lambda v: isinstance(v, dict) and all(_number(x) for x in v.values())),
    "parts": ("a list of objects with the strings kind, name, plugin and version",
              lambda v: isinstance(v, list) and all(isinstance(p, dict) and set(p) == {"kind", "name", "plugin", "version"}
                                                    and all(isinstance(x, str) for x in p.values()) for p in v)),
    "encoders": ("a list of encoder ids", _texts),
    "trained_on": ("a JSON object", lambda v: isinstance(v, dict)),
    "learned_until": ("a date and time (ISO 8601)", _moment),
    "files": ("a JSON object of the folder's files and their sha256 digests",
              lambda v: isinstance(v, dict) and all(isinstance(d, str) and _SHA256.fullmatch(d) for d in v.values())),
    "adapters": ("a JSON object of adapter references and the names of their files",
                 lambda v: isinstance(v, dict) and all(isinstance(n, str) for n in v.values())),
    SPEC_DIGEST: ("a sha256 digest", lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v))),
}
REQUIRED_SPEC_KEYS = ("format", "features", "feature_set")


def _read_spec(file: Path) -> dict[str, Any]:
    """spec.json, parsed and checked against SPEC_SCHEMA."""
    try:
        spec = json.loads(file.read_bytes())
    except ValueError as exc:  # bad JSON or bad UTF-8: a truncated or overwritten file
        raise ConfigError(f"{file}: not valid JSON ({exc}); {_DAMAGED}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{file}: expected a JSON object, found {type(spec).__name__}; {_DAMAGED}")
    if spec.get("format") != SPEC_FORMAT or not _whole(spec.get("format")):
        raise ConfigError(f"{file}: spec format {spec.get('format')!r}; this recengine reads format {SPEC_FORMAT}.")
    unknown = sorted(set(spec) - set(SPEC_SCHEMA))
    if unknown:
        raise ConfigError(f"{file}: unknown key {unknown[0]!r}{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}"
                          f" (a model spec holds only {', '.join(SPEC_SCHEMA)}): the file was edited, or written by a "
                          "newer recengine; upgrade recengine, or train the model again (recengine train --output).")
    problems = [f"'{key}' ({wanted})" for key, (wanted, valid) in SPEC_SCHEMA.items()
                if (key in spec or key in REQUIRED_SPEC_KEYS) and not valid(spec.get(key))]
    if problems:
        raise ConfigError(f"{file}: missing or malformed {', '.join(problems)}; {_DAMAGED}")
    unfiled = sorted(set(spec.get("adapters", {}).values()) - set(spec.get("files", {})))
    if unfiled:
        raise ConfigError(f"{file}: 'adapters' names {unfiled[0]!r}, which 'files' does not list with its sha256; {_DAMAGED}")
    return spec


def _read_model_text(file: Path, spec: dict[str, Any]) -> tuple[str, list[str], int]:
    """model.txt's text, its feature names and tree count, only once it is known to be whole and well
    formed: LightGBM's parser aborts or segfaults the process on a truncated or crafted file instead of raising."""
    data = file.read_bytes()
    expected = spec.get("files", {}).get(MODEL_FILE)
    if expected is not None and _sha256(data) != expected:
        raise ConfigError(f"{file}: its content does not match the sha256 in {SPEC_FILE} (the file was truncated or "
                          f"changed after the model was saved); {_DAMAGED}")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not a LightGBM text model (not UTF-8 text); {_DAMAGED}") from None
    names, trees = check_model_text(text, file)
    return text, names, trees


def _check_agree(spec: dict[str, Any], names: list[str], trees: int, folder: Path) -> None:
    """spec.json describes the model.txt beside it: the same features in the same order (a matrix in
    another order scores every row wrongly), and no more rounds than it has trees."""
    if names != spec["features"]:
        raise ConfigError(f"{folder / SPEC_FILE}: its 'features' differ from those {folder / MODEL_FILE} was trained on "
                          f"({_first_difference(spec['features'], names)}, {SPEC_FILE} against {MODEL_FILE}): the files "
                          f"do not belong together, or one was edited; {_DAMAGED}")
    if (spec.get("best_iteration") or 0) > trees:
        raise ConfigError(f"{folder / SPEC_FILE}: best_iteration = {spec['best_iteration']}, but {folder / MODEL_FILE} "
                          f"holds {trees} trees; {_DAMAGED}")


def _first_difference(these: list[str], those: list[str]) -> str:
    """Where two lists of names part: their counts when they differ, else the first position."""
    if len(these) != len(those):
        return f"{len(these)} names against {len(those)}"
    at = next(i for i, (a, b) in enumerate(zip(these, those)) if a != b)
    return f"position {at + 1}: {these[at]!r} against {those[at]!r}"


def _parse_booster(text: str, file: Path) -> lgb.Booster:
    try:
        return lgb.Booster(model_str=text)
    except (lgb.basic.LightGBMError, ValueError) as exc:  # ValueError: its parameters' JSON, pandas_categorical
        raise ConfigError(f"{file}: LightGBM cannot read it ({str(exc).strip()}); {_DAMAGED}") from None


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
