"""The plugin manager: built-in parts and installed plugins, registered through the same hooks.

Installed plugins are distributions with an entry point in the `recengine` group. Setting
`RECENGINE_LOAD_PLUGINS` to a comma-separated list of distribution names loads only those (an empty
value loads none); the built-ins always load.
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import importlib.metadata
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from recengine.errors import ConfigError, PluginError
from recengine.parts import hookspecs

ENTRY_POINT_GROUP = "recengine"
ENV_VAR = "RECENGINE_LOAD_PLUGINS"
KINDS = {
    "encoders": "register_encoders",
    "feature_extractors": "register_feature_extractors",
    "candidate_sources": "register_candidate_sources",
}

# The built-in parts, registered through the hooks as a third party's package is (recengine/features/).
BUILTIN_MODULES = tuple(f"recengine.features.{name}" for name in (
    "popularity", "activity", "categories", "covisitation", "interest", "attributes", "collaborative", "tuned",
    "sequential",
))

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
    __version__ = engine_version()

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
    """Build the registered part `name` of `kind` with keyword `params`. An unknown name, an unknown
    parameter or a value of the wrong type (judged by the factory's annotations, else its defaults)
    raise a PluginError naming the parameter, the value and what is expected, before the factory runs."""
    registration = get(kind, name)
    params = dict(params or {})
    check_params(registration, params)
    try:
        return registration.factory(**params)
    except TypeError as exc:
        raise PluginError(
            f"{_label(registration)} has bad parameters {sorted(params)}: {exc}. "
            "See `recengine plugins` and the part's documentation."
        ) from exc


def _label(registration: Registration) -> str:
    return f"{registration.kind[:-1].replace('_', ' ')} '{registration.name}' (from {registration.plugin})"


def check_params(registration: Registration, params: dict[str, Any]) -> None:
    """Every name in `params` is a parameter of the factory and every value fits its type."""
    try:
        signature = inspect.signature(registration.factory, eval_str=True)
    except (NameError, TypeError, ValueError, SyntaxError):  # annotations it cannot resolve: use defaults only
        try:
            signature = inspect.signature(registration.factory)
        except (TypeError, ValueError):  # e.g. a builtin without a signature: the factory judges alone
            return
    accepted = {p.name: p for p in signature.parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for key in sorted(params):
        if key not in accepted:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise PluginError(
                f"{_label(registration)} has bad parameters {sorted(params)}: no parameter '{key}'.{hint} "
                f"Its parameters are: {', '.join(accepted) or 'none'}."
            )
        expected = _expected_type(accepted[key])
        if not _conforms(params[key], expected):
            raise PluginError(
                f"{_label(registration)}: parameter {key} = {params[key]!r} should be {_describe(expected)}, "
                f"not {_describe_value(params[key])}. Change it to that type (in TOML: numbers unquoted, strings quoted, lists in [ ])."
            )


def _expected_type(parameter: inspect.Parameter) -> Any:
    """The parameter's annotation, or for an unannotated one the type of its default."""
    if parameter.annotation is not parameter.empty and not isinstance(parameter.annotation, str):
        return parameter.annotation
    default = parameter.default
    if default is parameter.empty or default is None:
        return Any
    if isinstance(default, (list, tuple)):
        kinds = {float if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v) for v in default}
        return list[kinds.pop()] if len(kinds) == 1 else list
    if isinstance(default, (bool, int, float, str, dict)):
        # An unannotated `= 5` may well mean a float: any number passes, the annotation decides when given.
        return float if type(default) is int else type(default)
    return Any


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if _is_sequence(hint):
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else Any
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if hint in (dict, collections.abc.Mapping) or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True  # a type this check does not know: the factory judges the value


def _is_sequence(hint: Any) -> bool:
    sequences = (list, tuple, collections.abc.Sequence)
    return hint in sequences or typing.get_origin(hint) in sequences


def _describe(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "left out"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args if arg is not type(None)) + (
            " (or left out)" if type(None) in args else "")
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string (in quotes)"}
    if hint in names:
        return names[hint]
    if _is_sequence(hint):
        item = args[0] if args and args[0] is not Ellipsis else Any
        plural = {bool: "booleans", int: "whole numbers", float: "numbers", str: "strings"}.get(item)
        return f"a list of {plural}" if plural else "a list"
    if hint in (dict, collections.abc.Mapping) or origin in (dict, collections.abc.Mapping):
        return "a table of key = value pairs"
    return getattr(hint, "__name__", str(hint))


def _describe_value(value: Any) -> str:
    kinds = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a table", type(None): "nothing"}
    return kinds.get(type(value), type(value).__name__)


def check_number(part: str, name: str, value: Any, *, integer: bool = False, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None, below: float | None = None) -> None:
    """A ConfigError unless `value` is a number (a whole one if `integer`) within the bounds given: parts
    call this in their constructors, so a bad parameter stops the feature set at load, before any data."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or isinstance(value, int))
    inside = number and math.isfinite(value) and (minimum is None or value >= minimum) and (
        above is None or value > above) and (maximum is None or value <= maximum) and (below is None or value < below)
    if not inside:
        bounds = [f"{minimum:g} or more" if minimum is not None else "", f"above {above:g}" if above is not None else "",
                  f"at most {maximum:g}" if maximum is not None else "", f"below {below:g}" if below is not None else ""]
        wanted = " and ".join(b for b in bounds if b)
        raise ConfigError(f"{part}: {name} = {value!r}; give {'a whole number' if integer else 'a number'}"
                          f"{' ' + wanted if wanted else ''}.")


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


def engine_version() -> str:
    """recengine's installed version (the package's own `__version__`, read without importing the
    package's init, which imports the Ranker)."""
    try:
        return importlib.metadata.version("recengine")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
