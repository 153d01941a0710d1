"""recengine: a plugin-based personalized recommendation engine."""

from recengine.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
