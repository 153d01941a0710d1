"""recengine: a plugin-based personalized recommendation engine."""

from recengine.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["Ranker", "hookimpl", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `import recengine` (the CLI, plugins) stays light.
    if name == "Ranker":
        from recengine.ranker import Ranker

        return Ranker
    raise AttributeError(f"module 'recengine' has no attribute {name!r}")
