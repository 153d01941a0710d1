"""The built-in parts, one module per family of features; each registers through the plugin hooks,
as a third party's package does.

- `popularity`: item counts, windows, decay, trend, age, value, CTR; the popular source (item scope)
- `activity`: the user's activity (user scope)
- `categories`: category affinity
- `covisitation`: pair counting, the co-visitation features and source
- `interest`: text embeddings, the interest features and the embedding source
- `attributes`: numeric item fields and their gap to the user's recent items
- `collaborative`: EASE, a learned item-item model: its scores as features, and a source
- `tuned`: interest in a text space tuned on what users took next (a learned head)
"""

