"""Layer 3, learning: training requests and labels (`samples`), the ranker's training (`training`),
tuning a text encoder on behaviour (`tuning`), and the trained model and its file (`model`). Imports
`recengine.parts` and `recengine.core`."""
