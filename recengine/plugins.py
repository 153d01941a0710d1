"""The plugin manager: built-in parts and installed plugins, registered through the same hooks.

Installed plugins are distributions with an entry point in the `recengine` group. Setting
`RECENGINE_LOAD_PLUGINS` to a comma-separated list of distribution names loads only those (an empty
value loads none); the built-ins always load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from recengine import hookspecs
from recengine.errors import PluginError

ENTRY_POINT_GROUP = "recengine"
ENV_VAR = "RECENGINE_LOAD_PLUGINS"
BUILTIN_MODULES = ("recengine.extractors", "recengine.interest", "recengine.candidates")
KINDS = {
    "encoders": "register_encoders",
    "feature_extractors": "register_feature_extractors",
    "candidate_sources": "register_candidate_sources",
}

pm = pluggy.PluginManager("recengine")
pm.add_hookspecs(hookspecs)
_versions: dict[str, str] = {}
_loaded = False


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""


def load_plugins() -> None:
    """Register the built-ins and the allowed entry-point plugins, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from recengine import __version__

    for module_name in BUILTIN_MODULES:
        if pm.get_plugin(module_name) is None:
            pm.register(importlib.import_module(module_name), name=module_name)
            _versions[module_name] = __version__
    for entry_point in _allowed_entry_points():
        if pm.get_plugin(entry_point.name) is not None:
            continue
        try:
            module = entry_point.load()
        except Exception as exc:  # a broken plugin must be named, whatever it raised
            raise PluginError(
                f"plugin '{entry_point.name}' ({entry_point.value}) failed to import: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall it, or exclude it with "
                f"{ENV_VAR}=<comma-separated plugins to load>."
            ) from exc
        pm.register(module, name=entry_point.name)
        _versions[entry_point.name] = entry_point.dist.version if entry_point.dist else "unknown"


def _allowed_entry_points() -> list[importlib.metadata.EntryPoint]:
    entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    allowed = os.environ.get(ENV_VAR)
    if allowed is None:
        return entry_points
    wanted = {name.strip() for name in allowed.split(",") if name.strip()}
    return [ep for ep in entry_points if ep.name in wanted or (ep.dist and ep.dist.name in wanted)]


def registrations(kind: str) -> dict[str, Registration]:
    """Every part of `kind` ("encoders", "feature_extractors", "candidate_sources") by name."""
    load_plugins()
    found: dict[str, Registration] = {}
    for impl in getattr(pm.hook, KINDS[kind]).get_hookimpls():

        def register(name: str, factory: Callable[..., Any], description: str = "") -> None:
            if name in found:
                raise PluginError(
                    f"{kind[:-1].replace('_', ' ')} '{name}' is registered by both "
                    f"'{found[name].plugin}' and '{impl.plugin_name}'; uninstall one of them."
                )
            found[name] = Registration(kind, name, factory, impl.plugin_name, description)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin '{impl.plugin_name}' raised while registering {kind.replace('_', ' ')}: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall it, or exclude it with {ENV_VAR}."
            ) from exc
    return found


def get(kind: str, name: str) -> Registration:
    """The registration `name` of `kind`, or an error listing what is available."""
    available = registrations(kind)
    if name not in available:
        label = kind[:-1].replace("_", " ")
        raise PluginError(
            f"unknown {label} '{name}'. Available: {', '.join(sorted(available)) or 'none'}. "
            "Install the plugin that provides it, or pick one of these; `recengine plugins` lists them."
        )
    return available[name]


def create(kind: str, name: str, params: dict[str, Any] | None = None) -> Any:
    """Build the registered part `name` of `kind` with keyword `params`; an unknown name, or
    parameters its factory rejects, raise a PluginError saying which and where the part comes from."""
    registration = get(kind, name)
    try:
        return registration.factory(**(params or {}))
    except TypeError as exc:
        label = kind[:-1].replace("_", " ")
        raise PluginError(
            f"{label} '{name}' (from {registration.plugin}) has bad parameters {sorted(params or {})}: {exc}. "
            "See `recengine plugins` and the part's documentation."
        ) from exc


def plugin_info() -> list[dict[str, Any]]:
    """What `recengine plugins` prints: each plugin's name, version, hooks and registered parts."""
    load_plugins()
    parts: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        for reg in registrations(kind).values():
            parts.setdefault(reg.plugin, {}).setdefault(kind, []).append(reg.name)
    info = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda pair: pair[0]):
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        info.append(
            {
                "name": name,
                "version": _versions.get(name, "unknown"),
                "builtin": name in BUILTIN_MODULES,
                "hooks": hooks,
                **{kind: sorted(names) for kind, names in parts.get(name, {}).items()},
            }
        )
    return info


def plugin_versions() -> dict[str, str]:
    """Name -> version of every registered plugin, for model specs."""
    load_plugins()
    return {name: _versions.get(name, "unknown") for name, _ in pm.list_name_plugin()}
