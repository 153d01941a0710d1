"""The plugin system: hooks with register callbacks, errors naming the plugin, entry-point discovery."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import recengine
from recengine.parts import plugins
from recengine.errors import PluginError

ROOT = Path(__file__).resolve().parents[1]


class ToyEncoder:
    id = "toy-v1"

    def encode(self, texts):
        raise NotImplementedError


class ToyPlugin:
    __name__ = "toy"

    @recengine.hookimpl
    def register_encoders(self, register):
        register("toy", ToyEncoder, description="for tests")


class BrokenPlugin:
    @recengine.hookimpl
    def register_feature_extractors(self, register):
        raise RuntimeError("boom")


@pytest.fixture
def registered():
    """Register plugin objects for one test, and unregister them afterwards."""
    added = []

    def add(plugin, name):
        plugins.load_plugins()
        plugins.pm.register(plugin, name=name)
        added.append(plugin)

    yield add
    for plugin in added:
        plugins.pm.unregister(plugin)


def test_registered_plugin_parts_are_listed(registered):
    registered(ToyPlugin(), "toy-plugin")
    reg = plugins.get("encoders", "toy")
    assert reg.factory is ToyEncoder and reg.plugin == "toy-plugin"
    listed = {p["name"]: p for p in plugins.plugin_info()}
    assert listed["toy-plugin"]["encoders"] == ["toy"]
    assert listed["toy-plugin"]["hooks"] == ["register_encoders"]


def test_unregistered_plugin_is_gone(registered):
    assert "toy" not in plugins.registrations("encoders")


def test_plugin_raising_while_registering_is_named(registered):
    registered(BrokenPlugin(), "broken-plugin")
    with pytest.raises(PluginError, match="plugin 'broken-plugin' raised while registering feature extractors: RuntimeError: boom"):
        plugins.registrations("feature_extractors")


def test_duplicate_names_are_an_error(registered):
    registered(ToyPlugin(), "toy-a")
    registered(ToyPlugin(), "toy-b")
    with pytest.raises(PluginError, match="registered by both"):
        plugins.registrations("encoders")


def test_unknown_part_lists_what_is_available(registered):
    registered(ToyPlugin(), "toy-plugin")
    with pytest.raises(PluginError, match="unknown encoder 'nope'. Available: .*toy"):
        plugins.get("encoders", "nope")


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    """Install plugins/recengine-example into a fresh target folder, as pip would for a user."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT / "plugins" / "recengine-example")],
        check=True,
    )
    return target


def plugins_json(site, **env):
    environment = {key: value for key, value in os.environ.items() if key != "RECENGINE_LOAD_PLUGINS"}
    environment.update(PYTHONPATH=str(site), **env)
    out = subprocess.run(
        [sys.executable, "-m", "recengine.interfaces.cli", "plugins"], env=environment, capture_output=True, text=True, check=True
    )
    return {p["name"]: p for p in json.loads(out.stdout)}


def test_example_plugin_is_discovered_through_its_entry_point(example_installed):
    listed = plugins_json(example_installed)
    assert listed["example"]["version"] == "0.1.0"
    assert listed["example"]["encoders"] == ["hashing"]
    assert listed["example"]["feature_extractors"] == ["text_length", "title_overlap"]
    assert listed["example"]["builtin"] is False


def test_load_plugins_env_var_restricts_entry_points(example_installed):
    assert "example" not in plugins_json(example_installed, RECENGINE_LOAD_PLUGINS="")
    assert "example" in plugins_json(example_installed, RECENGINE_LOAD_PLUGINS="recengine-example")
    assert "example" not in plugins_json(example_installed, RECENGINE_LOAD_PLUGINS="something-else")


def test_bad_parameters_name_the_part_and_its_plugin():
    from recengine.parts.encoders import create_encoder

    with pytest.raises(PluginError, match=r"encoder 'transformers' \(from transformers\) has bad parameters \['nonsense'\]"):
        create_encoder("transformers", {"nonsense": 1})


def test_example_plugin_parts_pass_the_contract_check(example_installed, monkeypatch):
    """The template a plugin author copies passes the same checks as the built-ins, fast path included."""
    monkeypatch.syspath_prepend(str(example_installed))
    from recengine_example import TextLength, TitleOverlap

    from recengine.parts.contract import check_extractor

    check_extractor(TextLength)
    check_extractor(TitleOverlap)
