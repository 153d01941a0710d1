"""recengine: a plugin-based personalized recommendation engine."""

import importlib
import importlib.abc
import importlib.util
import sys

from recengine.parts.hookspecs import hookimpl
from recengine.parts.plugins import engine_version as _engine_version

__version__ = _engine_version()
__all__ = ["Ranker", "hookimpl", "__version__"]

# Module paths from before the layers (recengine.pit, recengine.testing, ...) still import: a plugin or
# script written against them gets the module that now lives in its layer.
_MOVED = {
    "recengine.data": "recengine.core.data", "recengine.pit": "recengine.core.pit",
    "recengine.topk": "recengine.core.topk", "recengine.metrics": "recengine.core.metrics",
    "recengine.store": "recengine.core.store", "recengine.rolling": "recengine.core.rolling",
    "recengine.datasets": "recengine.core.datasets", "recengine.hookspecs": "recengine.parts.hookspecs",
    "recengine.plugins": "recengine.parts.plugins", "recengine.extractors": "recengine.parts.context",
    "recengine.candidates": "recengine.parts.candidates", "recengine.featureset": "recengine.parts.featureset",
    "recengine.encoders": "recengine.parts.encoders", "recengine.adapters": "recengine.parts.adapters",
    "recengine.testing": "recengine.parts.contract", "recengine.samples": "recengine.learning.samples",
    "recengine.training": "recengine.learning.training", "recengine.tuning": "recengine.learning.tuning",
    "recengine.model": "recengine.learning.model", "recengine.serving": "recengine.running.serving",
    "recengine.ranker": "recengine.running.ranker", "recengine.batch": "recengine.running.batch",
    "recengine.distributed": "recengine.running.distributed", "recengine.cli": "recengine.interfaces.cli",
    "recengine.tracking": "recengine.interfaces.tracking", "recengine.mlflow_model": "recengine.interfaces.mlflow_model",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in _MOVED else None

    def create_module(self, spec):
        return importlib.import_module(_MOVED[spec.name])  # the module itself, under its old name too

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _MovedModules())  # first: no module of these names exists any more


def __getattr__(name: str):
    # Imported on first use, so `import recengine` (the CLI, plugins) stays light.
    if name == "Ranker":
        from recengine.running.ranker import Ranker

        return Ranker
    raise AttributeError(f"module 'recengine' has no attribute {name!r}")
