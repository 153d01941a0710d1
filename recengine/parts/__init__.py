"""Layer 2, the parts and their contract: the protocol a feature extractor or candidate source follows
(`protocol`), the plugin hooks and registry (`hookspecs`, `plugins`), the context parts compute in
(`context`: point-in-time features, learned states), the union of sources (`candidates`), feature sets
(`featureset`), encoders and their cache (`encoders`), tuned encoders' files (`adapters`), what a part
sees when serving (`snapshot`) and the contract every part must pass (`contract`). Imports only
`recengine.core` and `recengine.errors`.

`from recengine.parts import ...` gives the protocol and `learned_state`, as it always has; read on
first use, so that importing one module of this layer (the hooks, say) does not import them all.
"""

__all__ = ["SCOPES", "CandidateSource", "FeatureExtractor", "candidate_columns", "encoders_of", "history_depth",
           "learned_state", "learns", "scope_of", "serves"]


def __getattr__(name: str):
    if name == "learned_state":
        from recengine.parts.context import learned_state

        return learned_state
    if name in __all__:
        from recengine.parts import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'recengine.parts' has no attribute {name!r}")
