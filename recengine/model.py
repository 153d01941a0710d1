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
import math
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

from recengine.errors import ConfigError, DataError, PluginError, RecengineError
from recengine.store import tracking_uri
from recengine.topk import top_k

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
        from recengine.featureset import FeatureSet

        raw = _with_adapters(self.spec["feature_set"], self.adapters)
        return FeatureSet.from_dict(raw, source or f"the model's feature set '{self.spec['feature_set'].get('name')}'")

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
    from recengine.adapters import parse_adapter

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


# -- LightGBM's text model, checked before LightGBM parses it ----------------------------------------------
# LightGBM's parser (src/boosting/gbdt_model_text.cpp, src/io/tree.cpp) trusts the text: a tree line
# without '=', an array shorter than its tree says, a tree offset past the end, a child or feature
# index out of range, a parameter line without ':' make it read or jump outside its buffers, or loop,
# when loading or predicting. That aborts or crashes the process: there is no exception to catch.
# `check_model_text` accepts the layout LightGBM writes and nothing looser, so its reads stay in bounds.
_INT = r"-?[0-9]{1,10}"
_FLOAT = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?inf"
_TOKEN = {"int": re.compile(_INT), "float": re.compile(_FLOAT)}
_ARRAY = {kind: re.compile(rf"(?:(?:{token})(?: (?:{token}))*)?") for kind, token in (("int", _INT), ("float", _FLOAT))}
_SPACED = ("leaf_features", "leaf_coeff")  # a linear tree's per-leaf lists, each followed by a space (LightGBM skips them)
_HEADER_KEYS = ("version", "num_class", "num_tree_per_iteration", "label_index", "max_feature_idx", "objective",
                "average_output", "feature_names", "monotone_constraints", "feature_infos", "tree_sizes")
_RANKING_OBJECTIVES = ("lambdarank", "rank_xendcg")  # what recengine trains (featureset.OBJECTIVES)
MAX_LEAVES = 131_072  # LightGBM's own bound on num_leaves
# Each tree's arrays: the type of their entries and how many (in leaves, internal nodes, ...).
_TREE_ARRAYS = {
    "split_feature": ("int", "internal"), "split_gain": ("float", "internal"), "threshold": ("float", "internal"),
    "decision_type": ("int", "internal"), "left_child": ("int", "internal"), "right_child": ("int", "internal"),
    "internal_value": ("float", "internal"), "internal_weight": ("float", "internal"), "internal_count": ("int", "internal"),
    "leaf_value": ("float", "leaves"), "leaf_weight": ("float", "leaves"), "leaf_count": ("int", "leaves"),
    "cat_boundaries": ("int", "categories"), "cat_threshold": ("int", "category_words"),
    "leaf_const": ("float", "leaves"), "num_features": ("int", "leaves"),
    "leaf_features": ("int", "linear_terms"), "leaf_coeff": ("float", "linear_terms"),
}
_TREE_SCALARS = ("num_leaves", "num_cat", "is_linear", "shrinkage")
_MAX_TREE_LINES = 22  # LightGBM reads no more lines of one tree
_PARAMETER_LINE = re.compile(r"\[[A-Za-z0-9_]+: [^\"\\\n]*\]")
_IMPORTANCE_LINE = re.compile(rf"[^=\s]+=(?:{_FLOAT})")


class _Unsafe(Exception):
    """What is wrong with a model text; `check_model_text` turns it into the user's message."""

    def __init__(self, reason: str, truncated: bool = False):
        super().__init__(reason)
        self.truncated = truncated


def check_model_text(text: str, file: Path | str = MODEL_FILE) -> tuple[list[str], int]:
    """The feature names and tree count of a LightGBM ranking model text, once it is known that
    LightGBM's parser and predictor will stay in bounds on it; a ConfigError naming `file` otherwise."""
    try:
        return _check_model_text(text.encode())
    except _Unsafe as exc:
        if exc.truncated:
            raise ConfigError(f"{file}: an incomplete LightGBM model ({exc}: the file is truncated or changed); "
                              f"{_DAMAGED}") from None
        raise ConfigError(f"{file}: not a LightGBM ranking model that can be loaded safely ({exc}); {_DAMAGED}") from None


def _check_model_text(data: bytes) -> tuple[list[str], int]:
    if b"\0" in data or b"\r" in data:
        raise _Unsafe("it holds NUL or carriage-return characters, which LightGBM never writes")
    first = data.find(b"\nTree=")
    end = data.find(b"\nend of trees\n", max(first, 0))
    if first < 0 or end < 0:
        raise _Unsafe("no trees, or no 'end of trees' after them", truncated=True)
    header = _check_header(data[:first].decode())
    trees = _tree_blocks(data[first + 1 : end + 1], header.get("tree_sizes"))
    names, last_feature = header["feature_names"], len(header["feature_names"]) - 1
    for number, block in enumerate(trees):
        _check_tree(block.decode(), number, last_feature)
    _check_tail(data[end + 1 :].decode())
    return names, len(trees)


def _check_header(text: str) -> dict[str, Any]:
    """The lines before the first tree: `tree`, then LightGBM's keys once each."""
    lines = [line for line in text.split("\n") if line]
    if not lines or lines[0] != "tree":
        raise _Unsafe("it does not start with LightGBM's 'tree' line")
    values: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if key not in _HEADER_KEYS or key in values or (not sep and key != "average_output"):
            raise _Unsafe(f"header line {line[:60]!r}")
        if "=" in value and key not in ("feature_names", "monotone_constraints"):
            raise _Unsafe(f"header line {line[:60]!r}")
        values[key] = value
    needed = ("num_class", "label_index", "max_feature_idx", "feature_names", "feature_infos")  # LightGBM's own
    missing = [key for key in needed if key not in values]
    if missing:
        raise _Unsafe(f"its header lacks {', '.join(missing)}", truncated=True)
    # One score per row: a ranker's model. num_tree_per_iteration 0 would divide by zero in LightGBM.
    if values["num_class"] != "1" or values.get("num_tree_per_iteration", "1") != "1":
        raise _Unsafe("num_class and num_tree_per_iteration must be 1, as in a ranking model")
    if values.get("objective", _RANKING_OBJECTIVES[0]) not in _RANKING_OBJECTIVES:
        raise _Unsafe(f"objective {values['objective'][:40]!r} is not one of {', '.join(_RANKING_OBJECTIVES)}")
    _whole_number(values["label_index"], "label_index", 0, 2**31 - 2)
    features = _whole_number(values["max_feature_idx"], "max_feature_idx", 0, 2**31 - 2)
    names = values["feature_names"].split(" ")
    if len(names) != features + 1 or not all(names) or len(values["feature_infos"].split(" ")) != features + 1 \
            or not all(values["feature_infos"].split(" ")):
        raise _Unsafe(f"feature_names and feature_infos must each list max_feature_idx + 1 = {features + 1} entries")
    if "monotone_constraints" in values:
        constraints = _numbers(values["monotone_constraints"], "int", "monotone_constraints")
        if len(constraints) != features + 1 or any(c not in (-1, 0, 1) for c in constraints):
            raise _Unsafe("monotone_constraints must hold -1, 0 or 1 for each feature")
    parsed: dict[str, Any] = {"feature_names": names}
    if "tree_sizes" in values:
        parsed["tree_sizes"] = _numbers(values["tree_sizes"], "int", "tree_sizes")
    return parsed


def _tree_blocks(body: bytes, sizes: list[int] | None) -> list[bytes]:
    """The text of each tree (`Tree=N` to the next), in order, agreeing with `tree_sizes` where given
    (LightGBM reads tree N at the offset those sizes add up to, wherever that lands)."""
    starts = [0] + [match.start() + 1 for match in re.finditer(rb"\nTree=", body)]
    blocks = [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)])]
    if sizes is not None and sizes != [len(block) for block in blocks]:
        raise _Unsafe("its trees do not end where tree_sizes says they do", truncated=True)
    return blocks


def _check_tree(block: str, number: int, last_feature: int) -> None:
    lines = block.split("\n")
    if lines[0] != f"Tree={number}" or not block.endswith("\n\n"):
        raise _Unsafe(f"tree {number} is not a 'Tree={number}' line, its fields and a blank line", truncated=True)
    fields: dict[str, str] = {}
    body = lines[1 : lines.index("")]
    if any(lines[len(body) + 1 :]) or not 0 < len(body) <= _MAX_TREE_LINES:
        raise _Unsafe(f"tree {number} has lines after its blank line, or too many or no fields")
    for line in body:
        key, sep, value = line.partition("=")
        if not sep or key in fields or (key not in _TREE_ARRAYS and key not in _TREE_SCALARS):
            raise _Unsafe(f"tree {number}: line {line[:60]!r}")
        fields[key] = value
    where = f"tree {number}"
    leaves = _whole_number(fields.get("num_leaves", ""), f"{where} num_leaves", 1, MAX_LEAVES)
    categories = _whole_number(fields.get("num_cat", ""), f"{where} num_cat", 0, leaves - 1)
    linear = _whole_number(fields.get("is_linear", "0"), f"{where} is_linear", 0, 1)
    if "shrinkage" in fields and not _finite(_numbers(fields["shrinkage"], "float", f"{where} shrinkage")):
        raise _Unsafe(f"{where}: shrinkage must be one finite number")
    arrays = {name: _numbers(value, _TREE_ARRAYS[name][0], f"{where} {name}", spaced=name in _SPACED)
              for name, value in fields.items() if name in _TREE_ARRAYS}
    required = ["leaf_value"] + (["left_child", "right_child", "split_feature", "threshold"] if leaves > 1 else [])
    required += ["cat_boundaries", "cat_threshold"] if categories else []
    required += ["leaf_const", "num_features", "leaf_features", "leaf_coeff"] if linear else []
    missing = [name for name in required if name not in arrays]
    if missing:
        raise _Unsafe(f"{where} lacks {', '.join(missing)}", truncated=True)
    _check_lengths(arrays, where, leaves, categories, linear)
    for name in ("leaf_value", "leaf_const", "leaf_coeff"):
        if name in arrays and not _finite(arrays[name]):
            raise _Unsafe(f"{where}: {name} holds NaN or infinite values")
    if leaves > 1:
        _check_nodes(arrays, where, leaves, categories, last_feature)
    if linear and any(f < 0 or f > last_feature for f in arrays["leaf_features"]):
        raise _Unsafe(f"{where}: leaf_features names a feature beyond max_feature_idx = {last_feature}")


def _check_lengths(arrays: dict[str, list], where: str, leaves: int, categories: int, linear: int) -> None:
    """Each array LightGBM will read has exactly the entries the tree's counts say (it reads that many,
    past the end of a shorter one)."""
    if categories and (arrays["cat_boundaries"][:1] != [0] or arrays["cat_boundaries"] != sorted(arrays["cat_boundaries"])):
        raise _Unsafe(f"{where}: cat_boundaries must start at 0 and never decrease")
    if linear and any(n < 0 for n in arrays["num_features"]):
        raise _Unsafe(f"{where}: num_features must not be negative")
    counts = {"leaves": leaves, "internal": leaves - 1, "categories": categories + 1,
              "category_words": arrays["cat_boundaries"][-1] if categories else None,
              "linear_terms": sum(arrays["num_features"]) if linear and "num_features" in arrays else None}
    for name, values in arrays.items():
        read = leaves > 1 or linear or name in ("leaf_value", "leaf_count")  # all a one-leaf tree reads
        expected = counts[_TREE_ARRAYS[name][1]]
        if read and expected is not None and len(values) != expected:
            raise _Unsafe(f"{where}: {name} has {len(values)} entries where the tree needs {expected}", truncated=True)


def _check_nodes(arrays: dict[str, list], where: str, leaves: int, categories: int, last_feature: int) -> None:
    """Every split reads a feature the model has, every child index is in range, and the nodes form one
    tree from the root: each internal node and each leaf reached exactly once (no cycle to loop on)."""
    if any(f < 0 or f > last_feature for f in arrays["split_feature"]):
        raise _Unsafe(f"{where}: split_feature names a feature beyond max_feature_idx = {last_feature}")
    left, right = arrays["left_child"], arrays["right_child"]
    seen_nodes, seen_leaves, stack = set(), set(), [0]
    while stack:
        node = stack.pop()
        if node in seen_nodes:
            raise _Unsafe(f"{where}: node {node} is reached twice (a cycle)")
        seen_nodes.add(node)
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= leaves - 1:
                    raise _Unsafe(f"{where}: child node {child} does not exist")
                stack.append(child)
            elif ~child >= leaves or ~child in seen_leaves:
                raise _Unsafe(f"{where}: leaf {~child} does not exist or is reached twice")
            else:
                seen_leaves.add(~child)
    if len(seen_nodes) != leaves - 1 or len(seen_leaves) != leaves:
        raise _Unsafe(f"{where}: not every node and leaf hangs from the root")
    for node, kind in enumerate(arrays.get("decision_type", [0] * (leaves - 1))):
        # Bit 0: categorical; bit 1: missing values go left; bits 2-3: the missing type (0, 1 or 2).
        if not 0 <= kind < 12:
            raise _Unsafe(f"{where}: decision_type {kind} at node {node}")
        if kind & 1 and not (float(arrays["threshold"][node]).is_integer() and 0 <= arrays["threshold"][node] < categories):
            raise _Unsafe(f"{where}: categorical split {node} points past the tree's {categories} category sets")


def _check_tail(text: str) -> None:
    """After `end of trees`: feature importances, LightGBM's parameters (each `[key: value]`: a line
    without ':' overruns LightGBM's reader) and `pandas_categorical:null`, nothing else."""
    section = "importances"
    for line in text.split("\n")[1:]:
        if not line or (section == "importances" and (line == "feature_importances:" or _IMPORTANCE_LINE.fullmatch(line))):
            continue
        if section == "importances" and line == "parameters:":
            section = "parameters"
        elif section == "parameters" and line == "end of parameters":
            section = "after"
        elif section == "parameters" and _PARAMETER_LINE.fullmatch(line):
            continue
        elif section in ("importances", "after") and line == "pandas_categorical:null":
            section = "done"
        else:
            raise _Unsafe(f"line {line[:60]!r} after the trees")
    if section == "parameters":
        raise _Unsafe("its parameters have no 'end of parameters'", truncated=True)


def _numbers(value: str, kind: str, what: str, spaced: bool = False) -> list:
    """A LightGBM array (single spaces between entries, or any number of them if `spaced`) as ints or
    floats; a refusal naming `what` for anything else."""
    tokens = value.split() if spaced else value.split(" ") if value else []
    if not (all(_TOKEN[kind].fullmatch(t) for t in tokens) if spaced else _ARRAY[kind].fullmatch(value)):
        raise _Unsafe(f"{what} is not a list of {'whole ' if kind == 'int' else ''}numbers")
    parsed = [int(v) if kind == "int" else float(v) for v in tokens]
    if kind == "int" and any(not -(2**31) <= v < 2**32 for v in parsed):
        raise _Unsafe(f"{what} holds a number beyond 32 bits")
    return parsed


def _whole_number(value: str, what: str, low: int, high: int) -> int:
    if not re.fullmatch(_INT, value) or not low <= int(value) <= high:
        raise _Unsafe(f"{what} = {value[:20]!r}, expected a whole number from {low} to {high}")
    return int(value)


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


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
