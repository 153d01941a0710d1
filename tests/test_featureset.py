"""Feature sets: the bundled TOML files load, and mistakes fail listing what is available."""

from pathlib import Path

import pytest

from recengine.errors import ConfigError
from recengine.featureset import FeatureSet

FEATURES = Path(__file__).resolve().parents[1] / "features"


@pytest.mark.parametrize("name", ["movielens", "impressions"])
def test_bundled_feature_sets_load(name):
    feature_set = FeatureSet.load(FEATURES / f"{name}.toml")
    assert feature_set.name == name
    assert feature_set.build_extractors() and feature_set.build_sources()
    assert feature_set.ranker["objective"] == "lambdarank" and feature_set.source_text


def test_unknown_extractor_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown feature extractor 'nope'. Available: .*item_popularity"):
        FeatureSet.from_dict({"candidates": {"popular": {}}, "features": {"nope": {}}})


def test_bad_parameter_names_the_table():
    with pytest.raises(ConfigError, match=r"\[features.item_age\]: feature extractor 'item_age' .* has bad parameters \['window'\]"):
        FeatureSet.from_dict({"candidates": {"popular": {}}, "features": {"item_age": {"window": 3}}})


def test_one_extractor_twice_under_aliases():
    feature_set = FeatureSet.from_dict({
        "candidates": {"popular": {}},
        "features": {"short": {"extractor": "item_trend", "short_days": 1, "long_days": 7},
                     "long": {"extractor": "item_trend", "short_days": 30, "long_days": 365}},
    })
    assert [e.columns for e in feature_set.build_extractors()] == [["item_trend_1d_7d"], ["item_trend_30d_365d"]]


def test_no_candidates_unknown_keys_and_objective():
    with pytest.raises(ConfigError, match="no candidate sources"):
        FeatureSet.from_dict({"features": {}})
    with pytest.raises(ConfigError, match=r"unknown \[labels\] keys \['sample'\]"):
        FeatureSet.from_dict({"candidates": {"popular": {}}, "labels": {"sample": 1}})
    with pytest.raises(ConfigError, match="objective 'binary' is not one of"):
        FeatureSet.from_dict({"candidates": {"popular": {}}, "ranker": {"objective": "binary"}})


def test_invalid_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        FeatureSet.load(bad)


def test_two_extractors_writing_one_column_are_refused():
    raw = {"candidates": {"popular": {}}, "features": {"covisitation": {}, "again": {"extractor": "covisitation"}}}
    with pytest.raises(ConfigError, match=r"\[features.again\] and \[features.covisitation\] both produce column 'covis_w5_r10_sum'"):
        FeatureSet.from_dict(raw)
    raw["features"]["again"]["window"] = 50
    columns = [c for e in FeatureSet.from_dict(raw).build_extractors() for c in e.columns]
    assert columns == [f"covis_w{w}_r10_{kind}" for w in (5, 50) for kind in ("sum", "max", "wsum", "cos")]
