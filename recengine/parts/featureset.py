"""Feature sets: a TOML file naming the candidate sources, feature extractors, labels and ranker.

    name = "movielens"
    [candidates.popular]        # table name = a registered candidate source (or give source = "...")
    k = 100
    [features.item_popularity]  # table name = a registered extractor (or give extractor = "...")
    windows_days = [1, 7, 30]
    [labels]                    # how training requests and their positives are drawn
    [ranker]                    # LightGBM parameters, plus num_boost_round, early_stopping_rounds, refit
    [policy]                    # optional: slots of each top k for new items (recengine.parts.policy); off by default

Unknown names and parameters, values of the wrong type and values out of range fail at load, before
any data is read, naming the table, the parameter and what is expected.

The bundled feature sets (the repository's `features/*.toml`, installed as the package data
`recengine.feature_sets`) can be named instead of a path: `movielens`, `impressions`.

A file can give only what differs from another one:

    extends = "movielens"       # a bundled name, or a TOML file's path relative to this file (tried first)
    name = "wider"              # name and description are this file's (default: the file's stem, and none)
    remove = ["candidates.covis_wide", "features.item_trend"]
    [candidates.covisitation]   # a part the base has: these parameters replace the base's, key by key
    k = 400
    [candidates.new_items]      # a part the base lacks: added after the base's parts
    source = "embedding"
    new_items = true
    [ranker]                    # [labels] and [ranker] merge key by key too (an alias such as eta
    learning_rate = 0.1         # replaces the base's learning_rate)

Tables merge deeply, key by key (a list or a value is replaced whole), keeping the base's order.
`remove` lists dotted names dropped from the base before this file's tables apply: a part
(`candidates.covis_wide`), or a parameter of a part or of [labels] / [ranker] (`ranker.num_leaves`),
which then takes its default; a name the base does not have is refused. To replace a part whole (or
give it another `source`), remove it and give it again: it then comes after the base's parts. A base
may extend another one; a cycle is refused naming the chain, and an unknown base listing the bundled
names. The merged tables are checked as a whole file would be, errors naming the file and its chain
("tuned.toml (extends movielens): [ranker] ..."), and `to_dict()`, what a model spec records, is the
merged result with no `extends` left: a trained model never reads the base again. `source_text`
(what a training run logs) is this file's text followed by each base's, commented out.
"""

from __future__ import annotations

import contextlib
import copy
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
                  # Hard negatives default to none: on the rolling benchmark a share of 0.5 cost 7% of
                  # NDCG@10 against keeping every negative, random ones alone nothing (README).
                  "negatives_per_group": 100, "hard_negative_share": 0.0,
                  "max_training_groups": 100_000, "max_validation_groups": 10_000,
                  # How request times are drawn: "user_events" (at `samples_per_user` of each user's own
                  # events; positives: everything later, or within `window_days`) or "snapshots" (every
                  # `snapshot_every_days`, each user active before; positives within `horizon_days`).
                  "design": "user_events", "snapshot_every_days": 7, "horizon_days": 7}
DESIGNS = ("user_events", "snapshots")
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
    "snapshot_every_days": {"above": 0},
    "horizon_days": {"above": 0},
}
# [policy]: the new-item policy (recengine/parts/policy.py, README "New items: the policy"). slots = 0,
# the default, is off. `score` names a column the set computes; `release_field` an item field (or "").
POLICY_DEFAULTS = {"slots": 0, "score": "", "min_score": 0.0, "max_age_days": 0.0, "max_events": 1, "release_field": ""}
POLICY_RANGES: dict[str, dict[str, Any]] = {
    "slots": {"integer": True, "minimum": 0, "maximum": 1000},
    "min_score": {},
    "max_age_days": {"minimum": 0},
    "max_events": {"integer": True, "minimum": 1},  # 1: only items nobody took are new by count
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


# Top-level keys that say how a file is built on another one (the module docstring); none survives the merge.
EXTEND_KEYS = ("extends", "remove")


def _read(file, source: str) -> tuple[dict[str, Any], str]:
    """A feature set file's tables and its text; a file that cannot be read or parsed is refused, named `source`."""
    try:
        text = file.read_text()
        return tomllib.loads(text), text
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the feature set: {exc}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}.") from exc


def _identity(file) -> str:
    """One name for a file however a path reached it: a cycle is the same file met twice."""
    return str(file.resolve()) if isinstance(file, Path) else str(file)


def _folder_of(file):
    """The folder a file's relative `extends` is read from."""
    return file.parent if isinstance(file, Path) else _bundled_folder()


def _extended(raw: dict[str, Any], source: str, text: str, folder, identity: str | None) -> tuple[dict[str, Any], str, str]:
    """`raw` (read from `source` in `folder`) merged over the base it extends, and that base over its own:
    the full tables, with no `extends` or `remove` left; the name errors give it ("tuned.toml (extends
    movielens)"); and its text followed by each base's text, commented out (what the run logs)."""
    merged, label, texts = _extend(raw, source, folder, [(source, identity)])
    if text:
        for base_source, base_text in texts:
            text = (f"{text.rstrip()}\n\n# ---- {base_source}, the base extended above, as it read at load ----\n"
                    + "".join(f"# {line}".rstrip() + "\n" for line in base_text.splitlines()))
    return merged, label, text


def _extend(raw: dict[str, Any], source: str, folder, chain: list[tuple[str, str | None]]):
    _check_extension(raw, source)
    _check_top_level(raw, source)
    base, base_source = _base_file(raw["extends"], folder, source)
    names, identities = [name for name, _ in chain], [identity for _, identity in chain]
    if _identity(base) in identities:
        cycle = [*names[identities.index(_identity(base)):], base_source]
        raise ConfigError(f"{names[0]}: the feature sets extend one another in a cycle: {' extends '.join(cycle)}. "
                          "Make one of them a full feature set, without extends.")
    base_raw, base_text = _read(base, base_source)
    base_label, texts = base_source, [(base_source, base_text)]
    if any(key in base_raw for key in EXTEND_KEYS):
        base_raw, base_label, more = _extend(base_raw, base_source, _folder_of(base), [*chain, (base_source, _identity(base))])
        texts += more
    else:
        _check_top_level(base_raw, base_source)
    merged = _merge(_removed(base_raw, raw.get("remove", []), source, base_label),
                    {key: value for key, value in raw.items() if key not in EXTEND_KEYS})
    merged["name"] = raw.get("name", Path(source).stem)  # the child's, never the base's
    merged["description"] = raw.get("description", "")
    return merged, f"{source} (extends {base_label})", texts


def _check_extension(raw: dict[str, Any], source: str) -> None:
    extends, remove = raw.get("extends"), raw.get("remove", [])
    if "extends" not in raw:
        raise ConfigError(f"{source}: remove = {remove!r} drops parts of a base, but no extends = \"...\" names the base.")
    if not isinstance(extends, str) or not extends.strip():
        raise ConfigError(f"{source}: extends = {extends!r} should be the name of a bundled feature set "
                          f"({', '.join(bundled_names())}) or the path of a TOML file, relative to this file.")
    if not isinstance(remove, list) or not all(isinstance(path, str) and path.strip() for path in remove):
        raise ConfigError(f"{source}: remove = {remove!r} should be a list of what to drop from the base, e.g. "
                          "remove = [\"candidates.covis_wide\", \"features.item_trend\"].")


def _base_file(name: str, folder, source: str):
    """(the file, how errors name it): `name` relative to the extending file's folder, else a bundled name."""
    candidate = folder / name
    if candidate.is_file():
        return candidate, str(candidate)
    if name in bundled_names():
        return bundled(name), name
    raise ConfigError(f"{source}: extends = {name!r}: no such file ({candidate}), and no bundled feature set of that "
                      "name. Give the path of a TOML file relative to this one, or one of the bundled names: "
                      f"{', '.join(bundled_names())}.")


def _removed(base: dict[str, Any], paths: list[str], source: str, base_label: str) -> dict[str, Any]:
    """`base` without the dotted `paths`: a part (`candidates.covis_wide`), one of a part's parameters
    (`features.interest.history`: back to its default) or a [labels] or [ranker] key (likewise)."""
    kept = copy.deepcopy(base)
    for path in paths:
        *parents, last = path.split(".")
        table = kept
        for key in parents:
            table = table.get(key) if isinstance(table, dict) else None
        if not isinstance(table, dict) or last not in table:
            parts = [f"{kind}.{name}" for kind in ("candidates", "features") for name in kept.get(kind, {})]
            raise ConfigError(f"{source}: remove: '{path}' is not in the base ({base_label}), so it cannot be removed. "
                              f"The base's parts: {', '.join(parts)}.")
        del table[last]
    return kept


def _merge(base: dict[str, Any], child: dict[str, Any], table: str = "") -> dict[str, Any]:
    """`child` over `base`, table by table and key by key (lists and values replaced whole), in the
    base's order with the child's new keys after. In [ranker], a LightGBM alias in the child (`eta`)
    replaces the base's key for that parameter (`learning_rate`)."""
    merged = copy.deepcopy(base)
    if table == "ranker":
        for key in child:
            main = _ranker_main(key)
            for old in [k for k in merged if k != key and main is not None and _ranker_main(k) == main]:
                del merged[old]
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, f"{table}.{key}" if table else key)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _ranker_main(key: str) -> str | None:
    """LightGBM's main name for a [ranker] key (recengine's own keys are their own), None if unknown."""
    if key in OWN_RANKER_KEYS:
        return key
    return next((main for main, names in _lightgbm_aliases().items() if key in names), None)


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
    policy: dict[str, Any] = field(default_factory=dict)  # [policy], defaults filled; {} when off

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        """A feature set from a TOML file, or a bundled one by name (`movielens`)."""
        resolved = resolve(path)
        source = str(path)
        raw, text = _read(resolved, source)
        if any(key in raw for key in EXTEND_KEYS):  # only what differs from a base: merged here, checked whole
            raw, source, text = _extended(raw, source, text, _folder_of(resolved), _identity(resolved))
        return cls.from_dict(raw, source, text)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "feature set", text: str = "",
                  folder: str | Path | None = None) -> "FeatureSet":
        """Check every table and build every part, so any mistake stops here, before data is read. With
        `extends`, the base is merged in first; a relative base path is read from `folder` (default: here)."""
        if any(key in raw for key in EXTEND_KEYS):
            raw, source, text = _extended(raw, source, text, Path(folder or "."), None)
        known = {"name", "description", "candidates", "features", "labels", "ranker", "exclude_seen", "policy"}
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
        if labels["design"] not in DESIGNS:
            raise ConfigError(f"{source}: [labels] design = {labels['design']!r}; give one of {list(DESIGNS)}.")
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
            policy=_check_policy(raw.get("policy", {}), source),
        )
        feature_set.build_sources(source)
        feature_set._check_columns(source)
        feature_set._check_encoders(source)
        feature_set._check_policy_score(source)
        return feature_set

    def _check_policy_score(self, source: str) -> None:
        """The policy's score is read from the model's feature matrix: it must be a column this set computes."""
        if self.policy and self.policy["score"] not in self.columns():
            raise ConfigError(f"{source}: [policy] score = {self.policy['score']!r} is not a column this feature set "
                              f"computes; give one of {self.columns()} (the text model's similarity, e.g. "
                              "interest_title_max from [features.interest], or a source's cand_NAME_score).")

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
        # [policy] only when on: a set without it keeps the spec (and digests) it had before the policy existed.
        return {key: getattr(self, key) for key in keys} | ({"policy": self.policy} if self.policy else {})

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
             "ranker": (dict, "a table"), "policy": (dict, "a table")}
    for key, (kind, wanted) in types.items():
        if key in raw and not isinstance(raw[key], kind):
            raise ConfigError(f"{source}: {key} = {raw[key]!r} should be {wanted}.")
    for table in ("candidates", "features"):
        for name, params in raw.get(table, {}).items():
            if not isinstance(params, dict):
                raise ConfigError(f"{source}: {table}.{name} = {params!r}; a part is a table: write [{table}.{name}] "
                                  "on its own line and its parameters below it.")


def _check_policy(given: dict[str, Any], source: str) -> dict[str, Any]:
    """[policy] over its defaults, every key known and every value checked even when it is off (a typo
    must not pass for a setting); {} when off, so a set without the policy records nothing of it."""
    policy = {**POLICY_DEFAULTS, **given}
    bad = sorted(set(policy) - set(POLICY_DEFAULTS))
    if bad:
        raise ConfigError(f"{source}: unknown [policy] keys {bad}; expected some of {sorted(POLICY_DEFAULTS)}.")
    for key, bounds in POLICY_RANGES.items():
        plugins.check_number(f"{source}: [policy]", key, policy[key], **bounds)
    for key in ("score", "release_field"):
        if not isinstance(policy[key], str):
            raise ConfigError(f"{source}: [policy] {key} = {policy[key]!r} should be a string: the name of a column.")
    if not policy["slots"]:
        return {}
    if not policy["score"]:
        raise ConfigError(f"{source}: [policy] slots = {policy['slots']} needs score = \"COLUMN\": the column that "
                          "says how well a new item fits the user, e.g. score = \"interest_title_max\" (from "
                          "[features.interest]); give slots = 0 to turn the policy off.")
    # Floats as JSON reads them back, so a spec's feature set equals the one it was saved from.
    return policy | {"min_score": float(policy["min_score"]), "max_age_days": float(policy["max_age_days"])}


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
