"""Layer 1, the ground: the data contract (`data`: loading and checking events, items, users),
point-in-time primitives (`pit`: as-of joins, histories), exact top k (`topk`), metrics, the grid that
makes cosines exact (`grid`), atomic files (`files`), giving freed memory back (`memory`), where
MLflow keeps things (`store`), the rolling-origin split (`rolling`) and the bundled data (`datasets`).
Imports nothing of recengine but `recengine.errors`."""
