"""Feature sets: the bundled TOML files load, and mistakes fail listing what is available."""

from pathlib import Path

import pytest

from recengine.errors import ConfigError
from recengine.parts.featureset import FeatureSet

FEATURES = Path(__file__).resolve().parents[1] / "features"


@pytest.mark.parametrize("name", sorted(path.stem for path in FEATURES.glob("*.toml")))
def test_bundled_feature_sets_load(name):
    feature_set = FeatureSet.load(FEATURES / f"{name}.toml")
    assert feature_set.name == name
    assert feature_set.build_extractors() and feature_set.build_sources()
    assert feature_set.ranker["objective"] in ("lambdarank", "rank_xendcg") and feature_set.source_text


def test_the_tuned_feature_sets_parts_share_one_tuning():
    parts = [*FeatureSet.load(FEATURES / "tuned.toml").build_extractors(), *FeatureSet.load(FEATURES / "tuned.toml").build_sources()]
    keys = {part.fit_key for part in parts if "tuned" in type(part).__name__.lower()}
    assert len(keys) == 1, keys  # one fit (extractors.fit_learned fits each fit_key once)


def test_unknown_extractor_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown feature extractor 'nope'. Available: .*item_popularity"):
        FeatureSet.from_dict({"candidates": {"popular": {}}, "features": {"nope": {}}})


def test_bad_parameter_names_the_table():
    with pytest.raises(ConfigError, match=r"\[features.item_age\]: feature extractor 'item_age' .* has bad parameters \['window'\]: "
                                          r"no parameter 'window'. Its parameters are: none."):
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


# -- every parameter checked at load, before any data is read --------------------------------------------
BASE = {"candidates": {"popular": {}}}


@pytest.mark.parametrize("tables, expect", [
    ({"candidates": {"popular": {"k": "ten"}}}, ["[candidates.popular]", "k = 'ten'", "whole number"]),
    ({"candidates": {"popular": {"k": -5}}}, ["[candidates.popular]", "k = -5", "1 or more"]),
    ({"candidates": {"covisitation": {"recent": 0}}}, ["[candidates.covisitation]", "recent = 0"]),
    ({"candidates": {"popular": {"half_life_days": 0}}}, ["[candidates.popular]", "half_life_days = 0", "above 0"]),
    ({"features": {"item_popularity": {"windows_days": "7"}}}, ["[features.item_popularity]", "windows_days = '7'", "list of numbers"]),
    ({"features": {"item_popularity": {"windows_days": [7, -1]}}}, ["[features.item_popularity]", "windows_days = -1"]),
    ({"features": {"item_popularity": {"half_lives_days": [0]}}}, ["[features.item_popularity]", "half_lives_days = 0"]),
    ({"features": {"interest": {"fields": "title"}}}, ["[features.interest]", "fields = 'title'", "list of strings"]),
    ({"features": {"interest": {"history": 0}}}, ["[features.interest]", "history = 0"]),
    ({"features": {"interest": {"encoder_params": {"max_lenght": 8}}}}, ["[features.interest]", "'max_lenght'", "did you mean 'max_length'"]),
    ({"features": {"interest": {"encoder": "nope"}}}, ["[features.interest]", "unknown encoder 'nope'"]),
    ({"features": {"covisitation": {"directed": "yes"}}}, ["[features.covisitation]", "directed = 'yes'", "true or false"]),
    ({"features": {"item_trend": {"short_days": 30, "long_days": 7}}}, ["[features.item_trend]", "long_days = 7", "above 30"]),
    ({"features": {"item_ctr": {"prior_weight": -1}}}, ["[features.item_ctr]", "prior_weight = -1"]),
    ({"labels": {"validation_fraction": 1.5}}, ["[labels]", "validation_fraction = 1.5", "below 1"]),
    ({"labels": {"validation_fraction": 0}}, ["[labels]", "validation_fraction = 0"]),
    ({"labels": {"samples_per_user": 2.5}}, ["[labels]", "samples_per_user = 2.5", "whole number"]),
    ({"labels": {"min_history": "10"}}, ["[labels]", "min_history = '10'"]),
    ({"labels": {"window_days": -1}}, ["[labels]", "window_days = -1", "0 or more"]),
    ({"labels": {"seed": 1.5}}, ["[labels]", "seed = 1.5"]),
    ({"ranker": {"learning_rate": -0.1}}, ["[ranker]", "learning_rate = -0.1", "above 0"]),
    ({"ranker": {"num_leaves": 1}}, ["[ranker]", "num_leaves = 1", "2 or more"]),
    ({"ranker": {"bagging_fraction": 1.5}}, ["[ranker]", "bagging_fraction = 1.5", "at most 1"]),
    ({"ranker": {"num_boost_round": 0}}, ["[ranker]", "num_boost_round = 0"]),
    ({"ranker": {"eval_at": [0, 10]}}, ["[ranker]", "eval_at = 0"]),
    ({"ranker": {"refit": "no"}}, ["[ranker]", "refit = 'no'", "true or false"]),
    ({"ranker": {"num_leavs": 63}}, ["[ranker]", "num_leavs", "did you mean 'num_leaves'"]),
    ({"ranker": {"metric": "auc"}}, ["[ranker]", "metric cannot be set"]),
    ({"ranker": {"eta": 0.1, "learning_rate": 0.2}}, ["[ranker]", "eta and learning_rate are the same"]),
    ({"candidates": {"popular": 3}}, ["candidates.popular = 3", "a part is a table"]),
    ({"exclude_seen": "yes"}, ["exclude_seen = 'yes'", "true or false"]),
])
def test_wrong_type_or_range_names_the_table_parameter_and_value(tables, expect):
    with pytest.raises(ConfigError) as caught:
        FeatureSet.from_dict({**BASE, **tables}, "bad.toml")
    message = str(caught.value)
    assert message.startswith("bad.toml: "), message
    for part in expect:
        assert part.lower() in message.lower(), f"{part!r} not in: {message}"


def test_lightgbm_judges_the_parameters_recengine_has_no_rule_for_without_printing(capfd):
    with pytest.raises(ConfigError, match=r'\[ranker\]: LightGBM refuses these parameters: Parameter extra_trees should be '
                                          r'"true"/"\+" or "false"/"-", got "maybe"\. Fix'):
        FeatureSet.from_dict({**BASE, "ranker": {"extra_trees": "maybe"}}, "bad.toml")
    with pytest.raises(ConfigError, match=r"Check failed: \(min_data_per_group\) > \(0\)\. Fix"):
        FeatureSet.from_dict({**BASE, "ranker": {"min_data_per_group": 0}}, "bad.toml")
    assert "[LightGBM]" not in "".join(capfd.readouterr())
    assert FeatureSet.from_dict({**BASE, "ranker": {"extra_trees": True, "min_data_per_group": 5}}).ranker["extra_trees"]


def test_a_lightgbm_alias_replaces_the_default_it_names():
    ranker = FeatureSet.from_dict({**BASE, "ranker": {"eta": 0.2, "num_leaf": 15}}).ranker
    assert (ranker["learning_rate"], ranker["num_leaves"]) == (0.2, 15) and "eta" not in ranker and "num_leaf" not in ranker


def test_the_bundled_feature_sets_load_by_name_from_anywhere(tmp_path, monkeypatch):
    from recengine.parts.featureset import bundled_names

    monkeypatch.chdir(tmp_path)  # no features/ folder here
    assert bundled_names() == ["collaborative", "impressions", "movielens", "tuned"]
    assert FeatureSet.load("movielens").source_text == (FEATURES / "movielens.toml").read_text()
    from recengine.interfaces.cli import bundled_feature_set

    assert FeatureSet.load(bundled_feature_set("impressions")).name == "impressions"
    with pytest.raises(ConfigError, match="nosuch: no such feature set file, and no bundled feature set of that name. "
                                          "Give the path of a TOML file, or one of the bundled names: collaborative, impressions, movielens."):
        FeatureSet.load("nosuch")
    (tmp_path / "movielens").write_text('name = "mine"\n[candidates.popular]\n')
    assert FeatureSet.load("movielens").name == "mine"  # a file of that name comes first


@pytest.mark.slow
def test_a_regular_install_carries_the_bundled_feature_sets(tmp_path):
    """`pip install .` (not editable) puts features/*.toml inside the package, and they load from there."""
    import shutil
    import subprocess
    import sys

    root = FEATURES.parent
    source = tmp_path / "src"  # built from a copy: the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source)
    for name in ("recengine", "features"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.parquet"))
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target)], check=True, capture_output=True)
    assert sorted(p.name for p in (target / "recengine" / "feature_sets").iterdir()) == ["collaborative.toml", "impressions.toml", "movielens.toml", "tuned.toml"]
    assert not (target / "features").exists()
    shown = subprocess.run([sys.executable, "-c", "from recengine.parts.featureset import FeatureSet, resolve; "
                            "print(resolve('movielens'), FeatureSet.load('impressions').name)"],
                           cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert shown.stdout.split() == [str(target / "recengine" / "feature_sets" / "movielens.toml"), "impressions"]


# [ranker] options that would make training read or write files or open sockets (`machines` binds a port
# and then segfaults), and resource options past their bounds (`num_threads = 100000` segfaults): #25.
@pytest.mark.parametrize("ranker, expect", [
    ({"machines": "127.0.0.1:12400,127.0.0.1:12401"}, "machines = '127.0.0.1:12400,127.0.0.1:12401' cannot be set: distributed"),
    ({"workers": "127.0.0.1:12400"}, "workers = '127.0.0.1:12400' cannot be set: distributed"),  # an alias
    ({"local_listen_port": 12400}, "local_listen_port = 12400 cannot be set: distributed"),
    ({"machine_list_filename": "hosts.txt"}, "machine_list_filename = 'hosts.txt' cannot be set: it reads a file"),
    ({"tree_learner": "data"}, "tree_learner = 'data' cannot be set: .*distributed.*tree_learner = 'serial'"),
    ({"tree": "voting"}, "tree = 'voting' cannot be set"),
    ({"num_machines": 2}, "num_machines = 2 cannot be set"),
    ({"forcedbins_filename": "/etc/passwd"}, "forcedbins_filename = '/etc/passwd' cannot be set: it reads a file"),
    ({"forced_splits": "splits.json"}, "forced_splits = 'splits.json' cannot be set: it reads a file"),
    ({"input_model": "old.txt"}, "input_model = 'old.txt' cannot be set: it reads a model file"),
    ({"output_model": "/tmp/model.txt"}, "output_model = '/tmp/model.txt' cannot be set: it writes a model file"),
    ({"save_binary": True}, "save_binary = True cannot be set: it writes"),
    ({"config": "train.conf"}, "config = 'train.conf' cannot be set"),
    ({"num_threads": 100_000}, "num_threads = 100000; give a whole number at most 256"),
    ({"n_jobs": 100_000}, "n_jobs = 100000; give a whole number at most 256"),
    ({"num_leaves": 1_000_000}, "num_leaves = 1000000; give a whole number 2 or more and at most 131072"),
    ({"max_bin": 10**7}, "max_bin = 10000000; give a whole number 2 or more and at most 65535"),
    ({"max_bin_by_feature": [255, 10**7]}, "max_bin_by_feature = 10000000; give a whole number 2 or more and at most 65535"),
])
def test_ranker_options_that_reach_files_sockets_or_unbounded_resources_are_refused(ranker, expect):
    with pytest.raises(ConfigError, match=r"fs.toml: \[ranker\].*" + expect + r".*"):
        FeatureSet.from_dict({"candidates": {"popular": {}}, "ranker": ranker}, "fs.toml")


def test_ranker_options_at_their_local_values_and_within_bounds_are_accepted():
    ranker = {"tree_learner": "serial", "num_machines": 1, "num_threads": 4, "max_bin": 1023, "num_leaves": 127}
    assert {k: v for k, v in FeatureSet.from_dict({"candidates": {"popular": {}}, "ranker": ranker}).ranker.items()
            if k in ranker} == ranker


@pytest.mark.parametrize("params, expect", [
    ({"mode": "lora", "lora_rank": 100_000}, "lora_rank = 100000; give a whole number 1 or more and at most 256"),
    ({"mode": "adalora", "lora_rank": 8, "adalora_init_rank": 4096}, "adalora_init_rank = 4096; give a whole number 8 or more and at most 256"),
])
def test_tuned_ranks_are_bounded(params, expect):
    with pytest.raises(ConfigError, match=r"\[features.tuned_interest\].*" + expect):
        FeatureSet.from_dict({"candidates": {"popular": {}}, "features": {"tuned_interest": params}})


# -- feature sets that extend one another (#22 part 4) -------------------------------------------------
def _write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _movielens():
    return FeatureSet.load("movielens").to_dict()


def test_extends_overrides_a_bases_parameters_key_by_key(tmp_path):
    child = FeatureSet.load(_write(tmp_path, "wide.toml", 'extends = "movielens"\n[candidates.covisitation]\nk = 400\n'
                                   "[labels]\nsamples_per_user = 5\n[ranker]\neta = 0.1\n"))
    base = _movielens()
    assert child.candidates["covisitation"] == {**base["candidates"]["covisitation"], "k": 400}
    assert list(child.candidates) == list(base["candidates"])  # the base's order kept
    assert child.labels == {**base["labels"], "samples_per_user": 5}
    assert child.ranker == {**base["ranker"], "learning_rate": 0.1}  # the alias replaced the base's key
    assert (child.name, child.description) == ("wide", "")  # the child's, never the base's
    assert child.features == base["features"]


def test_extends_adds_a_part_after_the_bases_and_its_columns(tmp_path):
    child = FeatureSet.load(_write(tmp_path, "more.toml", 'extends = "movielens"\nname = "more"\n'
                                   '[candidates.new_items]\nsource = "embedding"\nnew_items = true\n'
                                   "[features.item_ctr]\n"))
    base = FeatureSet.load("movielens")
    assert list(child.candidates) == [*base.candidates, "new_items"]
    assert list(child.features) == [*base.features, "item_ctr"]
    assert [c for c in child.columns() if c not in base.columns()] == ["cand_new_items_score", "cand_new_items_rank",
                                                                       "item_ctr", "item_impressions"]


def test_extends_removes_parts_and_parameters(tmp_path):
    child = FeatureSet.load(_write(tmp_path, "less.toml", 'extends = "movielens"\n'
                                   'remove = ["candidates.covis_wide", "features.item_trend", "ranker.num_leaves", '
                                   '"features.interest.history"]\n'))
    base = _movielens()
    assert list(child.candidates) == [name for name in base["candidates"] if name != "covis_wide"]
    assert "item_trend" not in child.features and "history" not in child.features["interest"]
    assert child.ranker["num_leaves"] == 31  # back to the default
    with pytest.raises(ConfigError, match=r"nope.toml: remove: 'candidates.nosuch' is not in the base \(movielens\), "
                                          r"so it cannot be removed. The base's parts: candidates.popular, "):
        FeatureSet.load(_write(tmp_path, "nope.toml", 'extends = "movielens"\nremove = ["candidates.nosuch"]\n'))
    with pytest.raises(ConfigError, match=r"orphan.toml: remove = \['features.x'\] drops parts of a base, but no extends"):
        FeatureSet.load(_write(tmp_path, "orphan.toml", 'remove = ["features.x"]\n[candidates.popular]\n'))
    with pytest.raises(ConfigError, match=r"bad.toml: remove = 'features.x' should be a list"):
        FeatureSet.load(_write(tmp_path, "bad.toml", 'extends = "movielens"\nremove = "features.x"\n'))


def test_a_removed_part_given_again_is_replaced_whole(tmp_path):
    child = FeatureSet.load(_write(tmp_path, "swap.toml", 'extends = "movielens"\nremove = ["candidates.covis_wide"]\n'
                                   '[candidates.covis_wide]\nsource = "popular"\nk = 20\n'))
    assert child.candidates["covis_wide"] == {"source": "popular", "k": 20}
    assert list(child.candidates)[-1] == "covis_wide"


def test_extends_chains_with_relative_paths_from_anywhere(tmp_path, monkeypatch):
    _write(tmp_path, "sets/base/mid.toml", 'extends = "movielens"\nname = "mid"\n[candidates.popular]\nk = 50\n'
                                           "[ranker]\nnum_leaves = 63\n")
    top = _write(tmp_path, "sets/top.toml", 'extends = "base/mid.toml"\ndescription = "top of the chain"\n'
                                            "[ranker]\nnum_leaves = 15\n")
    monkeypatch.chdir(tmp_path / "sets" / "base")  # the base is found next to the file, not here
    feature_set = FeatureSet.load(top)
    base = _movielens()
    assert (feature_set.name, feature_set.description) == ("top", "top of the chain")
    assert feature_set.candidates["popular"] == {**base["candidates"]["popular"], "k": 50}
    assert feature_set.ranker["num_leaves"] == 15
    # What the run logs: this file, then each base, commented out.
    assert feature_set.source_text.startswith(top.read_text().rstrip())
    assert "# ---- " in feature_set.source_text and '# extends = "movielens"' in feature_set.source_text
    assert '# name = "movielens"' in feature_set.source_text


def test_an_extends_cycle_is_refused_naming_the_chain(tmp_path):
    _write(tmp_path, "b.toml", 'extends = "c.toml"\n')
    _write(tmp_path, "c.toml", 'extends = "b.toml"\n')
    a = _write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    with pytest.raises(ConfigError, match=r"a.toml: the feature sets extend one another in a cycle: \S*b.toml extends "
                                          r"\S*c.toml extends \S*b.toml\."):
        FeatureSet.load(a)
    with pytest.raises(ConfigError, match=r"self.toml extends \S*self.toml"):
        FeatureSet.load(_write(tmp_path, "self.toml", 'extends = "self.toml"\n'))


def test_an_unknown_base_is_refused_listing_the_bundled_names(tmp_path):
    with pytest.raises(ConfigError, match=r"child.toml: extends = 'movielenz': no such file .*and no bundled feature set "
                                          r"of that name\. .*one of the bundled names: collaborative, impressions, movielens, tuned\."):
        FeatureSet.load(_write(tmp_path, "child.toml", 'extends = "movielenz"\n'))
    with pytest.raises(ConfigError, match=r"child.toml: extends = 3 should be the name of a bundled feature set"):
        FeatureSet.load(_write(tmp_path, "child.toml", "extends = 3\n"))


def test_the_merged_set_is_checked_whole_naming_the_file_its_chain_and_the_table(tmp_path):
    with pytest.raises(ConfigError, match=r"^\S*bad.toml \(extends movielens\): \[ranker\]: num_leaves = 1; give a whole number"):
        FeatureSet.load(_write(tmp_path, "bad.toml", 'extends = "movielens"\n[ranker]\nnum_leaves = 1\n'))
    with pytest.raises(ConfigError, match=r"^\S*bad.toml \(extends movielens\): \[candidates.covisitation\]: .*'windw'"):
        FeatureSet.load(_write(tmp_path, "bad.toml", 'extends = "movielens"\n[candidates.covisitation]\nwindw = 3\n'))
    with pytest.raises(ConfigError, match=r"^\S*bad.toml: candidates.popular = 3; a part is a table"):
        FeatureSet.load(_write(tmp_path, "bad.toml", 'extends = "movielens"\ncandidates.popular = 3\n'))


def test_the_bundled_tuned_set_is_movielens_plus_its_tuned_parts():
    """tuned.toml gives only its differences; resolved, it is the full file it replaced, order included
    (the model's column order follows the parts' order)."""
    import json

    expected = _movielens()
    expected["name"] = "tuned"
    expected["description"] = ("movielens.toml plus interest features and candidates in a title space tuned on what "
                               "users took next.")
    expected["candidates"].update({
        "tuned_embedding": {"k": 100, "field": "title", "history": 50},
        "tuned_new_items": {"source": "tuned_embedding", "k": 50, "field": "title", "history": 50, "new_items": True},
    })
    expected["features"]["tuned_interest"] = {"field": "title", "recent": 10, "history": 50}
    tuned = FeatureSet.load("tuned")
    resolved = tuned.to_dict()
    assert json.dumps(resolved) == json.dumps(expected)
    assert "extends" not in resolved and "remove" not in resolved
    # What a model spec records reads back to the same feature set, with no base file needed.
    assert json.dumps(FeatureSet.from_dict(json.loads(json.dumps(resolved))).to_dict()) == json.dumps(expected)
