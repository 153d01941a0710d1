"""Image encoders (plugins/recengine-images): the `images` and `clip_text` encoders on a tiny random
CLIP, the stat-based cache keys, bad images, and image fields through the interest parts."""

import json
import os
import subprocess
import sys
from datetime import timedelta

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageDraw

from recengine.parts.encoders import EmbeddingCache, create_encoder, embed
from recengine.errors import BadValue, DataError, PluginError
from recengine.parts.context import FeatureContext, compute_features
from recengine.features.interest import EmbeddingSource, InterestScores, item_embeddings
from recengine.parts.featureset import FeatureSet
from recengine.parts.contract import check_extractor, check_source, sample_events, sample_items

from conftest import DEVICE, TINY_VOCAB

# Rows of one image computed in batches of other shapes agree to float32 rounding on the CPU; on CUDA the
# default precision is bf16 (RECENGINE_TEST_DEVICE=cuda, benchmarks/gpu/run.sh).
TOLERANCE = 1e-6 if DEVICE == "cpu" else 2e-2
TEXTS = ["star war", "a love story in paris", "the dark future of time travel and space robot war", "kiss"]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (32-wide, 2 layers, 32-pixel images, 16-dim space) saved as a local
    model folder with its image processor and a tiny BERT-style tokenizer."""
    import torch
    import transformers
    from transformers import BertTokenizerFast, CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    words = list(dict.fromkeys(TINY_VOCAB))
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)  # see tiny_bert
    assert len({tuple(ids) for ids in tokenizer(["space dark", "love story"])["input_ids"]}) == 2
    tokenizer.save_pretrained(folder)
    # The Pillow backend where transformers 5 has it: the torchvision one warns when torchvision is absent.
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    # CLIP pools the text at its first eos token: [SEP] here, as the BERT tokenizer ends every text with it.
    ids = {"pad_token_id": words.index("[PAD]"), "bos_token_id": words.index("[CLS]"), "eos_token_id": words.index("[SEP]")}
    config = CLIPConfig(text_config=dict(tower, vocab_size=len(words), max_position_embeddings=32, **ids),
                        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


def picture(seed: int, size=(40, 30)) -> Image.Image:
    """A small picture of its own per seed: a background colour and a coloured ellipse."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    x, y = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
    ImageDraw.Draw(image).ellipse((x, y, x + size[0] // 2, y + size[1] // 2), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def gradient(horizontal: bool) -> Image.Image:
    ramp = np.linspace(0, 255, 48).astype(np.uint8)
    plane = np.tile(ramp, (48, 1)) if horizontal else np.tile(ramp[:, None], (1, 48))
    return Image.fromarray(np.stack([plane, 255 - plane, plane // 2], axis=-1))


@pytest.fixture(scope="session")
def gallery(tmp_path_factory):
    """Images of several kinds, formats and modes, by name -> absolute path."""
    folder = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    shapes = Image.new("RGB", (40, 40), "white")
    ImageDraw.Draw(shapes).rectangle((5, 5, 20, 30), fill="black")
    ImageDraw.Draw(shapes).ellipse((18, 10, 38, 30), fill="orange")
    made = {
        "red.png": Image.new("RGB", (40, 30), (255, 0, 0)), "green.png": Image.new("RGB", (30, 40), (0, 255, 0)),
        "blue.jpg": Image.new("RGB", (64, 64), (0, 0, 255)), "across.png": gradient(True), "down.png": gradient(False),
        "shapes.png": shapes, "noise.png": Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
        "grey.png": gradient(True).convert("L"), "clear.png": picture(5).convert("RGBA"),
        "palette.png": picture(6).convert("P"), "photo.jpg": picture(7, (80, 60)),
    }
    for name, image in made.items():
        image.save(folder / name)
    return {name: str(folder / name) for name in made}


@pytest.fixture(scope="session")
def poster_items(tmp_path_factory):
    """`sample_items()` with a poster per item: a picture of its own (PNG or JPEG) at a path relative to
    the returned folder; every ninth item has none."""
    folder = tmp_path_factory.mktemp("posters")
    items = sample_items()
    posters = []
    for item in items["item_id"].to_list():
        name = None if item % 9 == 4 else f"{item}.{'png' if item % 2 else 'jpg'}"
        if name:
            picture(100 + item).save(folder / name)
        posters.append(name)
    return folder, items.with_columns(pl.Series("poster", posters, dtype=pl.String))


def images_encoder(tiny_clip, **params):
    return create_encoder("images", {"model": str(tiny_clip), "device": DEVICE, **params})


def text_encoder(tiny_clip, **params):
    return create_encoder("clip_text", {"model": str(tiny_clip), "device": DEVICE, **params})


def counted(encoder) -> list:
    """Record every value `encoder.encode` is given (the encoder keeps its own cache keys)."""
    seen, encode = [], encoder.encode

    def counting(texts):
        seen.extend(texts)
        return encode(texts)

    encoder.encode = counting
    return seen


def cached_vectors(cache: EmbeddingCache, encoder_id: str) -> np.ndarray:
    shards = sorted(cache.folder(encoder_id).glob("shard-*.npz"))
    return np.concatenate([np.load(shard)["vectors"] for shard in shards]) if shards else np.zeros((0, 0))


# -- the images encoder --------------------------------------------------------------------------------


def test_image_rows_are_normalised_float32_and_different_images_differ(tiny_clip, gallery):
    vectors = images_encoder(tiny_clip).encode(list(gallery.values()))
    assert vectors.shape == (len(gallery), 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    gaps = np.abs(vectors[:, None, :] - vectors[None, :, :]).max(axis=2)
    np.fill_diagonal(gaps, 1.0)
    assert gaps.min() > 1e-3, f"two different images embed alike: {gaps.min()}"


def test_the_same_images_twice_give_the_same_bits_whatever_the_batch(tiny_clip, gallery):
    paths = list(gallery.values())
    first = images_encoder(tiny_clip).encode(paths)
    np.testing.assert_array_equal(first, images_encoder(tiny_clip).encode(paths))
    np.testing.assert_allclose(images_encoder(tiny_clip, batch_size=3).encode(paths), first, atol=TOLERANCE)


def test_a_path_a_relative_path_and_a_file_uri_are_one_image(tiny_clip, gallery, tmp_path):
    absolute = gallery["shapes.png"]
    folder, name = os.path.split(absolute)
    encoder = images_encoder(tiny_clip, root=folder)
    values = [absolute, name, f"./{name}", f"file://{absolute}", f"file://localhost{absolute}", "file:" + absolute]
    vectors = np.vstack([encoder.encode([value]) for value in values])  # one at a time: a batch's rows may differ in the last bit
    for row in vectors[1:]:
        np.testing.assert_array_equal(row, vectors[0])
    assert len(set(encoder.cache_keys(values).tolist())) == 1
    other = images_encoder(tiny_clip).encode([gallery["red.png"]])
    assert not np.allclose(other[0], vectors[0])


def test_exif_orientation_is_applied(tiny_clip, tmp_path):
    upright = picture(11, (40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the camera was held sideways
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    encoder = images_encoder(tiny_clip)
    sideways, upright = (encoder.encode([str(tmp_path / name)]) for name in ("sideways.png", "upright.png"))
    np.testing.assert_array_equal(sideways, upright)


def test_id_follows_the_model_and_precision_not_runtime_settings(tiny_clip, tmp_path):
    base = images_encoder(tiny_clip)
    assert base.id.startswith("images-v1:tiny-clip") and base.id.endswith(f":{base.precision}")
    same = images_encoder(tiny_clip, batch_size=2, max_bytes=10, max_pixels=10, bad_images="null", root=str(tmp_path))
    assert same.id == base.id
    assert images_encoder(tiny_clip, precision="fp16").id != base.id
    assert text_encoder(tiny_clip).id != base.id
    # Another model of the same shape (other weights): another id, so its cache is never mixed up.
    import shutil

    import torch
    from transformers import CLIPModel

    other = tmp_path / "tiny-clip0"
    shutil.copytree(tiny_clip, other)
    torch.manual_seed(1)
    CLIPModel(CLIPModel.from_pretrained(tiny_clip).config).save_pretrained(other)
    assert images_encoder(other).id != base.id


def test_a_missing_or_bad_model_says_what_to_give(tmp_path):
    with pytest.raises(PluginError, match="no model given. Give model = \"PATH\", a local folder"):
        create_encoder("images", {})
    with pytest.raises(PluginError, match="is not a folder"):
        create_encoder("clip_text", {"model": "openai/clip-vit-base-patch32"})
    with pytest.raises(PluginError, match="bad_images = 'skip'"):
        create_encoder("images", {"model": str(tmp_path), "bad_images": "skip"})


# -- the cache ------------------------------------------------------------------------------------------


def test_cache_second_run_encodes_nothing_and_loads_no_model(tiny_clip, gallery, tmp_path):
    paths = list(gallery.values())
    first, stats = embed(paths, images_encoder(tiny_clip), EmbeddingCache(tmp_path))
    assert (stats.hits, stats.misses, stats.nulls) == (0, len(paths), 0)
    again = images_encoder(tiny_clip)
    seen = counted(again)
    second, stats = embed(paths, again, EmbeddingCache(tmp_path))
    assert (stats.hits, stats.misses) == (len(paths), 0) and seen == []
    assert again._model is None  # keys come from a stat of each file: no model, no image read
    np.testing.assert_array_equal(first, second)


def test_a_touched_or_replaced_file_is_encoded_again(tiny_clip, tmp_path):
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for i, path in enumerate(paths):
        picture(i).save(path)
    cache = tmp_path / "cache"
    before, _ = embed(paths, images_encoder(tiny_clip), EmbeddingCache(cache))
    stat = os.stat(paths[1])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    encoder = images_encoder(tiny_clip)
    seen = counted(encoder)
    touched, stats = embed(paths, encoder, EmbeddingCache(cache))
    assert seen == [paths[1]] and (stats.hits, stats.misses) == (2, 1)
    np.testing.assert_allclose(touched, before, atol=TOLERANCE)  # alone, not in a batch of three: the last bit may differ
    picture(50).save(paths[2])  # replaced by another picture
    encoder = images_encoder(tiny_clip)
    seen = counted(encoder)
    replaced, _ = embed(paths, encoder, EmbeddingCache(cache))
    assert seen == [paths[2]] and not np.allclose(replaced[2], before[2])


# -- bad images -----------------------------------------------------------------------------------------


def _noise_png(path, width=40, height=30):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


BAD = {
    "missing": (lambda folder: folder / "nowhere.png", {}, "there is no such file"),
    "text named .png": (lambda folder: (folder / "notes.png", (folder / "notes.png").write_text("not a picture"))[0], {},
                        "not an image Pillow can read"),
    "truncated png": (lambda folder: (folder / "cut.png", (folder / "cut.png").write_bytes(
        _noise_png(folder / "whole.png").read_bytes()[:1500]))[0], {}, "damaged or truncated"),
    "too many bytes": (lambda folder: _noise_png(folder / "big.png"), {"max_bytes": 1000}, "over max_bytes = 1,000"),
    "too many pixels": (lambda folder: _noise_png(folder / "wide.png", 100, 80), {"max_pixels": 5000},
                        "100 x 80 pixels, over max_pixels = 5,000"),
    "a strip the resize would blow up": (lambda folder: (folder / "strip.png", Image.new("RGB", (2, 2000)).save(folder / "strip.png"))[0],
                                         {"max_pixels": 100_000}, "resized to about 1,024,000 pixels"),
    "an http URI": (lambda folder: "http://example.com/poster.png", {}, "'http:' is not a scheme"),
    "a folder": (lambda folder: folder, {}, "a folder or a device"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_image_stops_with_the_item_the_path_and_what_to_do(case, tiny_clip, gallery, tmp_path):
    make, params, reason = BAD[case]
    value = str(make(tmp_path))
    items = pl.DataFrame({"item_id": [3, 7, 9], "poster": [gallery["red.png"], value, gallery["blue.jpg"]]})
    with pytest.raises(DataError) as caught:
        item_embeddings(items.lazy(), "poster", images_encoder(tiny_clip, **params), EmbeddingCache(tmp_path / "cache"))
    message = str(caught.value)
    assert message.startswith(f"item_id 7, field 'poster' = {value!r}: images encoder: image {value!r}"), message
    assert reason in message and 'bad_images = "null"' in message and "\n" not in message
    assert not isinstance(caught.value, BadValue)  # the encoder's BadValue, re-raised naming the item
    with pytest.raises(BadValue) as raw:
        images_encoder(tiny_clip, **params).encode([value])
    assert raw.value.value == value


def test_a_bad_image_names_every_item_that_holds_it(tiny_clip, tmp_path):
    items = pl.DataFrame({"item_id": ["a", "b", "c"], "poster": ["gone.png", " gone.png ", None]})
    with pytest.raises(DataError, match=r"^item_id 'a', 'b', field 'poster' = 'gone.png': .*no such file"):
        item_embeddings(items.lazy(), "poster", images_encoder(tiny_clip, root=str(tmp_path)))


def test_bad_images_null_leaves_the_item_out_and_caches_nothing_non_finite(tiny_clip, gallery, tmp_path):
    missing = str(tmp_path / "later.png")
    (tmp_path / "notes.png").write_text("not a picture")
    items = pl.DataFrame({"item_id": [1, 2, 3, 4, 5],
                          "poster": [gallery["red.png"], missing, str(tmp_path / "notes.png"), None, gallery["noise.png"]]})
    encoder = images_encoder(tiny_clip, bad_images="null")
    cache = EmbeddingCache(tmp_path / "cache")
    vectors, stats = embed(items["poster"].drop_nulls().to_list(), encoder, cache)
    assert (stats.misses, stats.nulls) == (4, 2)
    assert np.isnan(vectors[[1, 2]]).all() and np.isfinite(vectors[[0, 3]]).all()
    stored = cached_vectors(cache, encoder.id)
    assert stored.shape == (2, 16) and np.isfinite(stored).all()
    emb = item_embeddings(items.lazy(), "poster", encoder, EmbeddingCache(tmp_path / "cache"))
    assert emb.item_ids.to_list() == [1, 5] and emb.matrix.shape == (2, 16)
    picture(3).save(missing)  # the missing image arrives: encoded on the next run, the others served from the cache
    seen = counted(encoder)
    emb = item_embeddings(items.lazy(), "poster", encoder, EmbeddingCache(tmp_path / "cache"))
    assert emb.item_ids.to_list() == [1, 2, 5] and sorted(seen) == sorted([missing, str(tmp_path / "notes.png")])


def test_an_item_without_an_image_embedding_gets_null_interest_features(tiny_clip, gallery, tmp_path):
    t0 = sample_events()["timestamp"].min()
    items = pl.DataFrame({"item_id": [1, 2, 3, 4],
                          "poster": [gallery["red.png"], gallery["shapes.png"], str(tmp_path / "gone.png"), gallery["noise.png"]]})
    events = pl.DataFrame({"user_id": [10, 10], "item_id": [1, 2], "timestamp": [t0, t0 + timedelta(hours=1)]})
    requests = pl.DataFrame({"user_id": [10, 10, 10], "item_id": [3, 4, 2], "timestamp": [t0 + timedelta(days=1)] * 3})
    part = InterestScores("images", {"model": str(tiny_clip), "device": DEVICE, "bad_images": "null"}, ["poster"], recent=2)
    out = compute_features(requests, [part], FeatureContext.from_frames(events, items, cache=EmbeddingCache(tmp_path / "c")))
    assert out["interest_poster_mean"].is_null().to_list() == [True, False, False]
    assert out["interest_poster_max"].is_null().to_list() == [True, False, False]
    assert out["interest_poster_max"][2] == pytest.approx(1.0, abs=1e-4)  # item 2 is one of the recent items itself


# -- clip_text: the images' space ------------------------------------------------------------------------


def test_clip_text_and_images_share_one_space(tiny_clip, gallery):
    texts = text_encoder(tiny_clip).encode(TEXTS)
    images = images_encoder(tiny_clip).encode(list(gallery.values()))
    assert texts.shape == (len(TEXTS), 16) and texts.dtype == np.float32 and images.shape[1] == texts.shape[1]
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    cosines = texts @ images.T  # random weights: no meaning to assert, but comparable, one number per pair
    assert cosines.shape == (len(TEXTS), len(gallery)) and (np.abs(cosines) <= 1 + 1e-5).all()
    gaps = np.abs(texts[:, None, :] - texts[None, :, :]).max(axis=2)
    np.fill_diagonal(gaps, 1.0)
    assert gaps.min() > 1e-3, "different texts embed alike: the tokenizer or the pooling is off"


def test_clip_text_batches_change_nothing_and_ids_are_stable(tiny_clip):
    together = text_encoder(tiny_clip).encode(TEXTS * 3)
    one_by_one = np.vstack([text_encoder(tiny_clip).encode([text]) for text in TEXTS * 3])
    np.testing.assert_allclose(together, one_by_one, atol=TOLERANCE)
    np.testing.assert_allclose(text_encoder(tiny_clip, batch_size=2).encode(TEXTS * 3), together, atol=TOLERANCE)
    assert text_encoder(tiny_clip).id == text_encoder(tiny_clip, batch_size=2).id


def test_clip_text_cuts_huge_texts_keeping_the_whole_texts_tokens(tiny_clip):
    encoder = text_encoder(tiny_clip)
    encoder._load()
    texts = ["star" + " " * 5000 + "war " * 100, "love story " * 20_000, "kiss"]
    whole = encoder._tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
    assert encoder.token_ids(texts) == whole and len(whole[1]) == encoder.max_length == 32
    np.testing.assert_allclose(encoder.encode(texts[1:2]), encoder.encode(["love story " * 20]), atol=TOLERANCE)


# -- image fields through the parts ----------------------------------------------------------------------


def test_image_and_text_interest_side_by_side_in_one_feature_set(tiny_clip, tiny_bert, poster_items, tmp_path):
    folder, items = poster_items
    images = {"model": str(tiny_clip), "device": DEVICE, "root": str(folder)}
    feature_set = FeatureSet.from_dict({
        "name": "posters",
        "candidates": {"popular": {"k": 10}, "poster": {"source": "embedding", "encoder": "images", "encoder_params": images,
                                                        "field": "poster", "k": 10}},
        "features": {
            "interest": {"encoder": "transformers", "encoder_params": {"model": str(tiny_bert), "device": DEVICE},
                         "fields": ["title"], "recent": 3},
            "poster_interest": {"extractor": "interest", "encoder": "images", "encoder_params": images,
                                "fields": ["poster"], "recent": 3},
            "caption_interest": {"extractor": "interest", "encoder": "clip_text",
                                 "encoder_params": {"model": str(tiny_clip), "device": DEVICE}, "fields": ["genres"]},
        },
    })
    events = sample_events()
    context = FeatureContext.from_frames(events, items, cache=EmbeddingCache(tmp_path))
    requests = pl.DataFrame({"user_id": [0, 1, 2, 3], "timestamp": [events["timestamp"].max() + timedelta(hours=1)] * 4})
    rows = feature_set.candidate_rows(requests, context)
    columns = ["interest_title_mean", "interest_poster_mean", "interest_poster_max", "interest_genres_mean", "cand_poster_score"]
    assert set(columns) <= set(rows.columns)
    for column in columns:
        assert rows[column].drop_nulls().len() > 0, column
    without = items.filter(pl.col("poster").is_null())["item_id"]
    assert rows.filter(pl.col("item_id").is_in(without.implode()))["interest_poster_mean"].is_null().all()
    assert not rows.filter(pl.col("cand_poster_score").is_not_null())["item_id"].is_in(without.implode()).any()


def test_image_interest_passes_check_extractor(tiny_clip, poster_items):
    folder, items = poster_items
    check_extractor(InterestScores, {"encoder": "images", "fields": ["poster"], "recent": 3, "history": 8,
                                     "encoder_params": {"model": str(tiny_clip), "device": DEVICE, "root": str(folder)}},
                    items=items)


def test_image_embedding_source_passes_check_source(tiny_clip, poster_items):
    folder, items = poster_items
    check_source(EmbeddingSource, {"encoder": "images", "field": "poster", "k": 15,
                                   "encoder_params": {"model": str(tiny_clip), "device": DEVICE, "root": str(folder)}},
                 items=items)


# -- the command line and the plugin ---------------------------------------------------------------------


def test_recengine_plugins_lists_the_image_encoders(cli_run):
    result = cli_run("plugins")
    assert result.exit_code == 0, result.output
    listed = {plugin["name"]: plugin for plugin in json.loads(result.output)}
    assert listed["images"]["encoders"] == ["clip_text", "images"] and not listed["images"]["builtin"]


def test_recengine_embed_counts_images_without_an_embedding_and_stops_on_a_bad_one(cli_run, tiny_clip, gallery, tmp_path):
    pl.DataFrame({"item_id": [1, 2, 3, 4], "poster": [gallery["red.png"], "gone.png", None, gallery["photo.jpg"]]}) \
        .write_parquet(tmp_path / "items.parquet")
    args = ["embed", "--items", str(tmp_path / "items.parquet"), "--field", "poster", "--encoder", "images",
            "--param", f"model={tiny_clip}", "--param", f"device={DEVICE}", "--cache-dir", str(tmp_path / "cache")]
    result = cli_run(*args, "--param", "bad_images=null")
    assert result.exit_code == 0, result.output
    assert "poster: 4 items, 0 cache hits, 4 encoded, 2 without an embedding" in result.output  # gone.png and no poster
    result = cli_run(*args, "--param", "bad_images=null")
    assert "poster: 4 items, 2 cache hits, 2 encoded, 2 without an embedding" in result.output
    result = cli_run(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: images encoder: image 'gone.png'" in result.output and "there is no such file" in result.output


def test_cache_keys_and_cached_embeddings_need_neither_torch_nor_an_image(tiny_clip, gallery, tmp_path):
    paths = list(gallery.values())
    # The precision given: "auto" on a GPU asks torch whether it supports bf16.
    embed(paths, images_encoder(tiny_clip, precision="fp32"), EmbeddingCache(tmp_path))
    script = (
        "import sys\n"
        "from recengine.parts.encoders import EmbeddingCache, create_encoder, embed\n"
        f"encoder = create_encoder('images', {{'model': {str(tiny_clip)!r}, 'device': {DEVICE!r}, 'precision': 'fp32'}})\n"
        f"_, stats = embed({paths!r}, encoder, EmbeddingCache({str(tmp_path)!r}))\n"
        f"assert (stats.hits, stats.misses) == ({len(paths)}, 0), stats\n"
        "heavy = sorted({'torch', 'transformers', 'PIL'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
