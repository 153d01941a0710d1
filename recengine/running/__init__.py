"""Layer 4, running a trained model: the serving state (`serving`), the importable `Ranker`
(`ranker`), the batch job (`batch`), the Ray engine (`distributed`), and the checks every way of
asking for rankings shares (`requests`). Imports the layers below."""
