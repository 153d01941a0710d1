"""Every registered part, built-in or plugin, passes the contract checks of `recengine.parts.contract`:
a new built-in is checked the moment it registers, with no list to remember to extend."""

import pytest

from recengine.parts import plugins
from recengine.parts.contract import check_extractor, check_source

from conftest import DEVICE


def params_for(name: str, tiny_bert) -> dict:
    """Parameters a part needs to run on the sample data (most need none)."""
    encoder = {"encoder_params": {"model": str(tiny_bert), "device": DEVICE}}
    return {
        "interest": {"fields": ["title", "genres"], "recent": 3, "history": 8, "half_life_days": 10, **encoder},
        "embedding": {"k": 15, **encoder},
        "item_attribute": {"fields": ["year", "price"], "recent": 4},
        "covisitation": {"window": 3, "recent": 5},
        "ease": {"l2": 50.0, "max_items": 40, "history": 10},
        "tuned_interest": {"recent": 3, "history": 8, "half_life_days": 10, "epochs": 2, "batch_size": 32, "lr": 0.01, **encoder},
        "tuned_embedding": {"k": 15, "history": 8, "epochs": 2, "batch_size": 32, "lr": 0.01, **encoder},
        "sequential": {"history": 6, "dim": 16, "layers": 1, "epochs": 2, "batch_size": 16, **encoder},
    }.get(name, {})


plugins.load_plugins()
EXTRACTORS = sorted(plugins.registrations("feature_extractors"))
SOURCES = sorted(plugins.registrations("candidate_sources"))


@pytest.mark.parametrize("name", EXTRACTORS)
def test_every_registered_extractor_passes_check_extractor(name, tiny_bert):
    check_extractor(plugins.get("feature_extractors", name).factory, params_for(name, tiny_bert))


@pytest.mark.parametrize("name", SOURCES)
def test_every_registered_source_passes_check_source(name, tiny_bert):
    check_source(plugins.get("candidate_sources", name).factory, params_for(name, tiny_bert))


def test_the_new_items_variant_of_the_embedding_source_passes_check_source(tiny_bert):
    check_source(plugins.get("candidate_sources", "embedding").factory, {**params_for("embedding", tiny_bert), "new_items": True})


def test_check_extractor_catches_leakage_and_a_serving_path_that_drifts():
    from recengine.features.popularity import ItemPopularity
    from recengine.features.attributes import ItemAttribute

    class Leaky(ItemPopularity):
        def transform(self, requests, context):  # counts every event, even after t
            counts = context.events.group_by("item_id").len().rename({"len": "item_count_all"})
            return requests.select("_row", "item_id").join(counts, on="item_id", how="left").select("_row", "item_count_all")

    with pytest.raises(AssertionError, match="leakage"):
        check_extractor(Leaky, {"windows_days": [], "half_lives_days": []})

    class Drifting(ItemAttribute):
        def serve(self, tables, user, idx):
            values = super().serve(tables, user, idx)
            return {c: v + 1e-12 for c, v in values.items()}

    with pytest.raises(AssertionError, match="serve differs from transform"):
        check_extractor(Drifting, {"fields": ["year"]})

    class WrongScope(ItemAttribute):
        scope = "item"

    with pytest.raises(AssertionError, match="declares scope 'item'"):
        check_extractor(WrongScope, {"fields": ["year"]})
