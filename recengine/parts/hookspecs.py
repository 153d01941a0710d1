"""The hooks a recengine plugin can implement.

Each hook receives a `register` callback; a plugin calls it once per part it contributes:

    @recengine.hookimpl
    def register_encoders(register):
        register("my-encoder", MyEncoder, description="what it does")

`register(name, factory, description="")` stores `factory`, a callable that builds the part from
the keyword parameters given in a feature set. The built-in parts register through these same hooks.
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("recengine")
hookimpl = HookimplMarker("recengine")


@hookspec
def register_encoders(register):
    """Register text encoders: factories returning a `recengine.parts.encoders.Encoder`."""


@hookspec
def register_feature_extractors(register):
    """Register feature extractors: factories returning a `recengine.parts.context.FeatureExtractor`."""


@hookspec
def register_candidate_sources(register):
    """Register candidate sources: factories returning a `recengine.parts.candidates.CandidateSource`."""
