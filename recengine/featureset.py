"""Feature sets: a TOML file naming the candidate sources, feature extractors, labels and ranker.

    name = "movielens"
    [candidates.popular]        # table name = a registered candidate source (or give source = "...")
    k = 100
    [features.item_popularity]  # table name = a registered extractor (or give extractor = "...")
    windows_days = [1, 7, 30]
    [labels]                    # how training requests and their positives are drawn
    [ranker]                    # LightGBM parameters, plus num_boost_round, early_stopping_rounds, refit

Unknown names and parameters fail at load, listing what is available.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from recengine import plugins
from recengine.errors import ConfigError, PluginError

LABEL_DEFAULTS = {"samples_per_user": 2, "min_history": 5, "window_days": 0, "validation_fraction": 0.2, "seed": 0}
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
}
OBJECTIVES = ("lambdarank", "rank_xendcg")


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
        path = Path(path)
        try:
            text = path.read_text()
            raw = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such feature set file. The bundled ones are in features/.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}.") from exc
        return cls.from_dict(raw, str(path), text)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "feature set", text: str = "") -> "FeatureSet":
        known = {"name", "description", "candidates", "features", "labels", "ranker", "exclude_seen"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown top-level keys {unknown}; expected some of {sorted(known)}.")
        labels = {**LABEL_DEFAULTS, **raw.get("labels", {})}
        bad = sorted(set(labels) - set(LABEL_DEFAULTS))
        if bad:
            raise ConfigError(f"{source}: unknown [labels] keys {bad}; expected some of {sorted(LABEL_DEFAULTS)}.")
        ranker = {**RANKER_DEFAULTS, **raw.get("ranker", {})}
        if ranker["objective"] not in OBJECTIVES:
            raise ConfigError(f"{source}: [ranker] objective '{ranker['objective']}' is not one of {OBJECTIVES}.")
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
        return feature_set

    def _check_columns(self, source: str) -> None:
        """Two extractors writing the same feature column would silently shadow one another."""
        owners: dict[str, str] = {}
        for name, extractor in zip(self.features, self.build_extractors(source)):
            for column in extractor.columns:
                if column in owners:
                    raise ConfigError(f"{source}: [features.{name}] and [features.{owners[column]}] both produce column "
                                      f"'{column}'; give one of them different parameters or drop it.")
                owners[column] = name

    def to_dict(self) -> dict[str, Any]:
        """The plain-data form `from_dict` reads back: what a model spec stores."""
        keys = ("name", "description", "candidates", "features", "labels", "ranker", "exclude_seen")
        return {key: getattr(self, key) for key in keys}

    def candidate_rows(self, requests, context):
        """Candidates for `requests` (user_id, timestamp, ...) from the sources, seen items dropped if
        `exclude_seen`, with every extractor's features as of each request's timestamp."""
        from recengine.candidates import generate
        from recengine.extractors import compute_features

        rows = generate(requests, self.build_sources(), context, self.exclude_seen)
        return compute_features(rows, self.build_extractors(), context)

    def given_rows(self, rows, keys: list[str], context):
        """Features for given candidate rows (`keys` naming each request, user_id, item_id, timestamp):
        each source's score and rank where it would have proposed the item, then every extractor's."""
        from recengine.candidates import generate
        from recengine.extractors import compute_features

        from recengine.data import TIMESTAMP

        rows = rows.with_columns(pl.col("timestamp").cast(TIMESTAMP))
        requests = rows.select(list(dict.fromkeys([*keys, "user_id", "timestamp"]))).unique(keys, maintain_order=True)
        proposed = generate(requests, self.build_sources(), context, exclude_seen=False)
        rows = rows.join(proposed.drop([c for c in ("user_id", "timestamp") if c not in keys]), on=[*keys, "item_id"],
                         how="left", maintain_order="left")
        return compute_features(rows, self.build_extractors(), context)

    def build_extractors(self, source: str = "feature set") -> list:
        return [self._build("feature_extractors", "extractor", name, params, source) for name, params in self.features.items()]

    def build_sources(self, source: str = "feature set") -> list:
        if not self.candidates:
            raise ConfigError(f"{source}: no candidate sources; add a [candidates.NAME] table (e.g. [candidates.popular]).")
        built = []
        for name, params in self.candidates.items():
            part = self._build("candidate_sources", "source", name, params, source)
            part.name = name
            built.append(part)
        return built

    @staticmethod
    def _build(kind: str, alias_key: str, name: str, params: dict[str, Any], source: str):
        params = dict(params)
        registered = params.pop(alias_key, name)
        try:
            return plugins.create(kind, registered, params)
        except PluginError as exc:
            table = f"[{'features' if kind == 'feature_extractors' else 'candidates'}.{name}]"
            raise ConfigError(f"{source}: {table}: {exc}") from None
