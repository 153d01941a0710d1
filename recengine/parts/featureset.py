"""Feature sets: a TOML file naming the candidate sources, feature extractors, labels and ranker.

    name = "movielens"
    [candidates.popular]        # table name = a registered candidate source (or give source = "...")
    k = 100
    [features.item_popularity]  # table name = a registered extractor (or give extractor = "...")
    windows_days = [1, 7, 30]
    [labels]                    # how training requests and their positives are drawn
    [ranker]                    # LightGBM parameters, plus num_boost_round, early_stopping_rounds, refit

Unknown names and parameters, values of the wrong type and values out of range fail at load, before
any data is read, naming the table, the parameter and what is expected.

The bundled feature sets (the repository's `features/*.toml`, installed as the package data
`recengine.feature_sets`) can be named instead of a path: `movielens`, `impressions`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.resources
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from recengine.errors import ConfigError, RecengineError
from recengine.parts import plugins

# `learned_fraction`: with learned parts (a collaborative model, a tuned encoder), they are fit on the
# events before this quantile of event times, and the ranker's training requests come after it.
LABEL_DEFAULTS = {"samples_per_user": 2, "min_history": 5, "window_days": 0, "validation_fraction": 0.2, "seed": 0,
                  "learned_fraction": 0.5,
                  # Bounded training tables: every positive, and per group at most `negatives_per_group`
                  # negatives (0: all), a `hard_negative_share` of them the sources' best ranked, the rest
                  # at random; at most `max_training_groups` / `max_validation_groups` requests (0: all),
                  # drawn so that each week keeps its share. The rows then grow with what they teach.
                  "negatives_per_group": 100, "hard_negative_share": 0.5,
                  "max_training_groups": 100_000, "max_validation_groups": 10_000}
RANKER_DEFAULTS = {
    "objective": "lambdarank",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambdarank_truncation_level": 20,
    "eval_at": [5, 10],
    "seed": 0,
    "num_boost_round": 500,
    "early_stopping_rounds": 50,
    # After early stopping, train again on training + validation groups (the latest requests, the
    # ones most like tomorrow's) for proportionally more rounds. Validation metrics are measured
    # before the refit, since the refit model has seen those labels.
    "refit": True,
    "early_stopping_metric": "ndcg@10",  # the validation metric early stopping watches: the champion's
}
OBJECTIVES = ("lambdarank", "rank_xendcg")
# [ranker] keys that are recengine's own, not LightGBM's.
OWN_RANKER_KEYS = ("num_boost_round", "early_stopping_rounds", "refit", "early_stopping_metric")
# LightGBM parameters recengine sets itself on every training, or names with its own keys: a value given
# for one of these would be overridden or would fight recengine's, so it is refused with the reason.
RESERVED_RANKER_KEYS = {
    "metric": "recengine always evaluates NDCG at eval_at",
    "num_iterations": "use num_boost_round",
    "early_stopping_round": "use early_stopping_rounds",
    "verbosity": "recengine keeps LightGBM quiet and reports progress itself",
    "deterministic": "recengine always trains deterministically",
    "force_row_wise": "recengine sets it",
    "force_col_wise": "recengine sets force_row_wise, and LightGBM refuses both",
}
# LightGBM parameters that make training read or write files, or open network sockets (distributed
# training binds a port and waits for peers, and segfaults when none come): a feature set, or the spec
# of a model folder someone sent, must not reach the file system or the network through them.
UNSAFE_RANKER_KEYS = {
    "config": "it reads a LightGBM configuration file",
    "task": "recengine runs the training task itself",
    "data": "it names a training data file to read; recengine builds the training data itself",
    "valid": "it names validation data files to read; recengine builds the validation data itself",
    "input_model": "it reads a model file to continue training from",
    "output_model": "it writes a model file; recengine writes the model folder itself",
    "snapshot_freq": "it writes model snapshots to files",
    "save_binary": "it writes the training data to a binary file",
    "output_result": "it writes predictions to a file",
    "convert_model": "it writes the model as code to a file",
    "convert_model_language": "it writes the model as code to a file",
    "forcedsplits_filename": "it reads a file of forced splits",
    "forcedbins_filename": "it reads a file of bin bounds",
    "parser_config_file": "it reads a parser configuration file",
    "machines": "distributed training opens network sockets",
    "machine_list_filename": "it reads a file of machines for distributed training, which opens network sockets",
    "local_listen_port": "distributed training opens network sockets",
    "time_out": "distributed training opens network sockets",
    "pre_partition": "it is for distributed training, which opens network sockets",
}
# Allowed only at the value that keeps training on this machine: (the value, why).
LOCAL_RANKER_VALUES = {
    "tree_learner": ("serial", "the other tree learners are distributed training, which opens network sockets"),
    "num_machines": (1, "more machines is distributed training, which opens network sockets"),
}
FRACTION = {"above": 0, "maximum": 1}
MAX_THREADS = 256  # more threads than any machine has cores; LightGBM segfaults creating 100,000
MAX_BINS = 65_535  # histogram bins per feature (default 255); memory grows with it
RANKER_RANGES: dict[str, dict[str, Any]] = {
    "learning_rate": {"above": 0},
    "num_leaves": {"integer": True, "minimum": 2, "maximum": 131_072},  # LightGBM's own bound
    "num_threads": {"integer": True, "maximum": MAX_THREADS},  # 0 or less: LightGBM's default
    "max_depth": {"integer": True},
    "min_data_in_leaf": {"integer": True, "minimum": 0},
    "min_sum_hessian_in_leaf": {"minimum": 0},
    "feature_fraction": FRACTION,
    "feature_fraction_bynode": FRACTION,
    "bagging_fraction": FRACTION,
    "bagging_freq": {"integer": True, "minimum": 0},
    "lambda_l1": {"minimum": 0},
    "lambda_l2": {"minimum": 0},
    "min_gain_to_split": {"minimum": 0},
    "max_bin": {"integer": True, "minimum": 2, "maximum": MAX_BINS},
    "lambdarank_truncation_level": {"integer": True, "minimum": 1},
    "seed": {"integer": True, "minimum": 0, "maximum": 2**31 - 1},
    "num_boost_round": {"integer": True, "minimum": 1},
    "early_stopping_rounds": {"integer": True, "minimum": 1},
}
LABEL_RANGES: dict[str, dict[str, Any]] = {
    "samples_per_user": {"integer": True, "minimum": 1},
    "min_history": {"integer": True, "minimum": 1},
    "window_days": {"minimum": 0},
    "validation_fraction": {"above": 0, "below": 1},
    "seed": {"integer": True, "minimum": 0},
    "learned_fraction": {"above": 0, "below": 1},
    "negatives_per_group": {"integer": True, "minimum": 0},
    "hard_negative_share": {"minimum": 0, "maximum": 1},
    "max_training_groups": {"integer": True, "minimum": 0},
    "max_validation_groups": {"integer": True, "minimum": 0},
}


def bundled_names() -> list[str]:
    """Names of the feature sets shipped with recengine, sorted."""
    return sorted(entry.name[: -len(".toml")] for entry in _bundled_folder().iterdir() if entry.name.endswith(".toml"))


def _bundled_folder():
    try:  # an installed package: the TOML files are package data of recengine.feature_sets
        return importlib.resources.files("recengine.feature_sets")
    except ModuleNotFoundError:  # a source checkout (or an editable install): the repository's features/
        return Path(__file__).resolve().parents[2] / "features"


def bundled(name: str):
    """The file of the bundled feature set `name` (a Path, or a Traversable inside an archive)."""
    if name not in bundled_names():
        raise ConfigError(f"{name}: no such feature set file, and no bundled feature set of that name. Give the "
                          f"path of a TOML file, or one of the bundled names: {', '.join(bundled_names())}.")
    return _bundled_folder() / f"{name}.toml"


def resolve(feature_set: str | Path):
    """A feature set file: `feature_set` itself if it is a file, else the bundled feature set of that name."""
    path = Path(feature_set)
    return path if path.is_file() else bundled(str(feature_set))


@dataclass
class FeatureSet:
    name: str
    candidates: dict[str, dict[str, Any]]
    features: dict[str, dict[str, Any]]
    labels: dict[str, Any] = field(default_factory=lambda: dict(LABEL_DEFAULTS))
    ranker: dict[str, Any] = field(default_factory=lambda: dict(RANKER_DEFAULTS))
    exclude_seen: bool = True
    description: str = ""
    source_text: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        """A feature set from a TOML file, or a bundled one by name (`movielens`)."""
        resolved = resolve(path)
        source = str(path)
        try:
            text = resolved.read_text()
            raw = tomllib.loads(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read the feature set: {exc}.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}.") from exc
        return cls.from_dict(raw, source, text)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "feature set", text: str = "") -> "FeatureSet":
        """Check every table and build every part, so any mistake stops here, before data is read."""
        known = {"name", "description", "candidates", "features", "labels", "ranker", "exclude_seen"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown top-level keys {unknown}; expected some of {sorted(known)}.")
        _check_top_level(raw, source)
        labels = {**LABEL_DEFAULTS, **raw.get("labels", {})}
        bad = sorted(set(labels) - set(LABEL_DEFAULTS))
        if bad:
            raise ConfigError(f"{source}: unknown [labels] keys {bad}; expected some of {sorted(LABEL_DEFAULTS)}.")
        for key, bounds in LABEL_RANGES.items():
            plugins.check_number(f"{source}: [labels]", key, labels[key], **bounds)
        ranker = _check_ranker(raw.get("ranker", {}), source)
        feature_set = cls(
            name=raw.get("name", Path(source).stem),
            description=raw.get("description", ""),
            candidates=raw.get("candidates", {}),
            features=raw.get("features", {}),
            labels=labels,
            ranker=ranker,
            exclude_seen=raw.get("exclude_seen", True),
            source_text=text,
        )
        feature_set.build_sources(source)
        feature_set._check_columns(source)
        feature_set._check_encoders(source)
        return feature_set

    def _check_encoders(self, source: str) -> None:
        """Parts that embed text create their encoder only when data arrives: check its name and
        parameters now."""
        for table, parts in (("candidates", self.candidates), ("features", self.features)):
            for name, params in parts.items():
                if "encoder" not in params and "encoder_params" not in params:
                    continue
                # `adapter` (tuned weights, recengine.parts.adapters) applies to any encoder: create_encoder takes it.
                encoder_params = {k: v for k, v in dict(params.get("encoder_params") or {}).items() if k != "adapter"}
                try:
                    plugins.check_params(plugins.get("encoders", params.get("encoder", "transformers")), encoder_params)
                except RecengineError as exc:
                    raise ConfigError(f"{source}: [{table}.{name}]: {exc}") from None

    def _check_columns(self, source: str) -> None:
        """Two extractors writing the same feature column would silently shadow one another."""
        owners: dict[str, str] = {}
        for name, extractor in zip(self.features, self.build_extractors(source)):
            for column in extractor.columns:
                if column in owners:
                    raise ConfigError(f"{source}: [features.{name}] and [features.{owners[column]}] both produce column "
                                      f"'{column}'; give one of them different parameters or drop it.")
                owners[column] = name

    def columns(self) -> list[str]:
        """The model's inputs, in order: each source's score and rank, then each extractor's columns."""
        from recengine.parts.protocol import candidate_columns

        columns = [c for name in self.candidates for c in candidate_columns(name)]
        return columns + [c for extractor in self.build_extractors() for c in extractor.columns]

    def to_dict(self) -> dict[str, Any]:
        """The plain-data form `from_dict` reads back: what a model spec stores."""
        keys = ("name", "description", "candidates", "features", "labels", "ranker", "exclude_seen")
        return {key: getattr(self, key) for key in keys}

    def candidate_rows(self, requests, context):
        """Candidates for `requests` (user_id, timestamp, ...) from the sources, seen items dropped if
        `exclude_seen`, with every extractor's features as of each request's timestamp."""
        from recengine.parts.candidates import generate
        from recengine.parts.context import compute_features

        rows = generate(requests, self.build_sources(), context, self.exclude_seen)
        return compute_features(rows, self.build_extractors(), context)

    def given_rows(self, rows, keys: list[str], context):
        """Features for given candidate rows (`keys` naming each request, user_id, item_id, timestamp):
        each source's score and rank where it would have proposed the item, then every extractor's."""
        from recengine.core.data import TIMESTAMP
        from recengine.parts.candidates import generate
        from recengine.parts.context import compute_features

        rows = rows.with_columns(pl.col("timestamp").cast(TIMESTAMP))
        requests = rows.select(list(dict.fromkeys([*keys, "user_id", "timestamp"]))).unique(keys, maintain_order=True)
        proposed = generate(requests, self.build_sources(), context, exclude_seen=False)
        rows = rows.join(proposed.drop([c for c in ("user_id", "timestamp") if c not in keys]), on=[*keys, "item_id"],
                         how="left", maintain_order="left")
        return compute_features(rows, self.build_extractors(), context)

    def build_extractors(self, source: str = "feature set") -> list:
        built = []
        for name, params in self.features.items():
            part = self._build("feature_extractors", "extractor", name, params, source)
            part.key = f"features.{name}"  # names its learned state, if it has one
            built.append(part)
        return built

    def build_sources(self, source: str = "feature set") -> list:
        if not self.candidates:
            raise ConfigError(f"{source}: no candidate sources; add a [candidates.NAME] table (e.g. [candidates.popular]).")
        built = []
        for name, params in self.candidates.items():
            part = self._build("candidate_sources", "source", name, params, source)
            part.name, part.key = name, f"candidates.{name}"
            built.append(part)
        return built

    @staticmethod
    def _build(kind: str, alias_key: str, name: str, params: dict[str, Any], source: str):
        params = dict(params)
        registered = params.pop(alias_key, name)
        try:
            return plugins.create(kind, registered, params)
        except RecengineError as exc:  # unknown part or parameter, wrong type, value out of range
            table = f"[{'features' if kind == 'feature_extractors' else 'candidates'}.{name}]"
            raise ConfigError(f"{source}: {table}: {exc}") from None


def _check_top_level(raw: dict[str, Any], source: str) -> None:
    """Each top-level key has its type, and each part's table is a table."""
    types = {"name": (str, "a string"), "description": (str, "a string"), "exclude_seen": (bool, "true or false"),
             "candidates": (dict, "a table"), "features": (dict, "a table"), "labels": (dict, "a table"),
             "ranker": (dict, "a table")}
    for key, (kind, wanted) in types.items():
        if key in raw and not isinstance(raw[key], kind):
            raise ConfigError(f"{source}: {key} = {raw[key]!r} should be {wanted}.")
    for table in ("candidates", "features"):
        for name, params in raw.get(table, {}).items():
            if not isinstance(params, dict):
                raise ConfigError(f"{source}: {table}.{name} = {params!r}; a part is a table: write [{table}.{name}] "
                                  "on its own line and its parameters below it.")


def _check_ranker(given: dict[str, Any], source: str) -> dict[str, Any]:
    """[ranker] over the defaults, every key known to LightGBM or recengine, aliases turned into
    LightGBM's main names (so `eta` replaces the default learning_rate instead of fighting it), every
    value checked, and finally the whole set parsed by LightGBM itself."""
    aliases = _lightgbm_aliases()
    main_of = {alias: main for main, names in aliases.items() for alias in names}
    ranker = dict(RANKER_DEFAULTS)
    named: dict[str, str] = {}
    for key in given:
        main = key if key in OWN_RANKER_KEYS else main_of.get(key)
        if main is None:
            close = difflib.get_close_matches(key, sorted({*main_of, *OWN_RANKER_KEYS}), n=1, cutoff=0.75)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: [ranker] {key} is not a LightGBM parameter nor one of recengine's "
                              f"({', '.join(OWN_RANKER_KEYS)}).{hint} LightGBM's parameters: "
                              "https://lightgbm.readthedocs.io/en/latest/Parameters.html")
        if main in RESERVED_RANKER_KEYS:
            raise ConfigError(f"{source}: [ranker] {key} cannot be set: {RESERVED_RANKER_KEYS[main]}. Remove it.")
        _check_local(source, key, main, given[key])
        if main in named:
            raise ConfigError(f"{source}: [ranker] {named[main]} and {key} are the same LightGBM parameter "
                              f"({main}); keep one of them.")
        named[main] = key
        ranker[main] = given[key]
    for main, key in named.items():
        _check_ranker_value(f"{source}: [ranker]", key, main, ranker[main])
    if set(named) - {*RANKER_RANGES, "objective", "refit", "eval_at"}:  # parameters only LightGBM can judge
        _lightgbm_accepts(ranker, source)
    return ranker


def _check_local(source: str, key: str, main: str, value: Any) -> None:
    """Refuse LightGBM options that read or write files or open sockets (UNSAFE_RANKER_KEYS)."""
    if main in UNSAFE_RANKER_KEYS:
        raise ConfigError(f"{source}: [ranker] {key} = {value!r} cannot be set: {UNSAFE_RANKER_KEYS[main]}, and "
                          "recengine trains on this machine, from memory, writing only its model folder. Remove it.")
    if main in LOCAL_RANKER_VALUES:
        allowed, why = LOCAL_RANKER_VALUES[main]
        if value != allowed or isinstance(value, bool):
            raise ConfigError(f"{source}: [ranker] {key} = {value!r} cannot be set: {why}. Remove it, or give "
                              f"{key} = {allowed!r}.")


def _check_ranker_value(part: str, key: str, main: str, value: Any) -> None:
    if main == "objective":
        if value not in OBJECTIVES:
            raise ConfigError(f"{part} objective '{value}' is not one of {OBJECTIVES}.")
    elif main == "refit":
        if not isinstance(value, bool):
            raise ConfigError(f"{part}: refit = {value!r}; give true or false.")
    elif main == "eval_at":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{part}: eval_at = {value!r}; give a list of cut-offs, e.g. [5, 10].")
        for cutoff in value:
            plugins.check_number(part, key, cutoff, integer=True, minimum=1)
    elif main == "max_bin_by_feature":
        if not isinstance(value, list):
            raise ConfigError(f"{part}: {key} = {value!r}; give a list of bin counts, one per feature.")
        for bins in value:
            plugins.check_number(part, key, bins, integer=True, minimum=2, maximum=MAX_BINS)
    elif main in RANKER_RANGES:
        plugins.check_number(part, key, value, **RANKER_RANGES[main])
    elif not _plain(value):
        raise ConfigError(f"{part}: {key} = {value!r}; give a number, a string, true/false or a list of numbers.")


def _plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return isinstance(value, (bool, int, float, str))


@functools.cache
def _lightgbm_aliases() -> dict[str, list[str]]:
    """LightGBM's parameters, each main name with its aliases (the main name first), from the library."""
    from lightgbm.basic import _ConfigAliases

    return _ConfigAliases._get_all_param_aliases()


def _lightgbm_accepts(params: dict[str, Any], source: str) -> None:
    """LightGBM's own parse of the parameters (types, ranges, conflicts), as training would do it, but
    now, before any data is read. The library prints its refusal on the process's stderr before raising
    it, so that file descriptor is pointed away meanwhile: the user sees one message, ours."""
    import ctypes

    from lightgbm import basic

    params = {key: value for key, value in params.items() if key not in OWN_RANKER_KEYS}
    count = ctypes.c_int(0)
    try:
        with _native_stderr_silenced():
            basic._safe_call(basic._LIB.LGBM_GetSampleCount(
                ctypes.c_int32(100), basic._c_str(basic._param_dict_to_str(params)), ctypes.byref(count)))
    except basic.LightGBMError as exc:
        reason = re.sub(r"\s+at \S+, line \d+\s*\.?\s*$", "", str(exc).strip())
        raise ConfigError(f"{source}: [ranker]: LightGBM refuses these parameters: {reason}. "
                          "Fix the value in [ranker].") from None


@contextlib.contextmanager
def _native_stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
