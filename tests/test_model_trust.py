"""A model folder is data from outside (#25, item 5): spec.json is held to a schema and to its own digest,
every path it names stays inside the folder, model.txt is checked before LightGBM's parser (which
aborts the process on a crafted file) sees it, arrays and tensors are finite, [ranker] options in the
spec pass the feature set's checks; every command that loads a model refuses plugins at another version
(item 9); and a model that cannot be saved (a full disk) is kept elsewhere (item 7).

Most cases forge the folder as an attacker would: the change, then every digest rewritten to match, so
only the new checks can tell."""

import hashlib
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from recengine.core.data import Dataset
from recengine.errors import ConfigError, DataError
from recengine.learning.model import MODEL_FILE, SPEC_DIGEST, SPEC_FILE, RankerModel, arrays_to_npz, spec_digest
from recengine.learning.training import train

from conftest import DEVICE
from synthetic import catalogue, feature_set, interactions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> RankerModel:
    events = interactions(n_users=40, per_user=15)
    return train(Dataset(events.lazy(), catalogue().lazy()), feature_set(num_boost_round=10, early_stopping_rounds=5),
                 progress=False, say=lambda _: None).model


def quick_model(folder: Path, toml: str) -> Path:
    """A model folder for the feature set `toml`, its ranker fit on random rows: made in a blink, and
    whole in every way the checks look at (for the CLI cases of tests/test_cli_errors.py)."""
    import tomllib

    import lightgbm as lgb

    from recengine.parts.featureset import FeatureSet
    from recengine.learning.training import REQUEST_KEYS, feature_columns, model_spec

    spec = FeatureSet.from_dict(tomllib.loads(toml), "fs.toml")
    features, rng = feature_columns(spec), np.random.default_rng(0)
    rows = lgb.Dataset(rng.random((200, len(features))), rng.integers(0, 2, 200), group=[20] * 10, feature_name=features)
    booster = lgb.train({"objective": "lambdarank", "verbose": -1, "min_data_in_leaf": 5}, rows, 5)
    return RankerModel(booster, model_spec(spec, features, REQUEST_KEYS, booster, {"dataset": "random rows"})).save(folder)


def forged(folder: Path, change=None, text: str | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """`folder` after `change(spec)`, model.txt replaced by `text` and `extra` files added, with every
    digest in spec.json rewritten to match: a tampered folder that digests alone cannot tell."""
    spec = json.loads((folder / SPEC_FILE).read_text())
    if text is not None:
        (folder / MODEL_FILE).write_text(text)
        spec["files"][MODEL_FILE] = hashlib.sha256(text.encode()).hexdigest()
    for name, data in (extra or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        spec["files"][name] = hashlib.sha256(data).hexdigest()
    if change is not None:
        change(spec)
    spec[SPEC_DIGEST] = spec_digest(spec)
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    return folder


def edited(folder: Path, change) -> Path:
    """`folder` after `change(spec)` by hand, its digests left as they were."""
    spec = json.loads((folder / SPEC_FILE).read_text())
    change(spec)
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return folder


# -- paths: nothing outside the folder is read ---------------------------------------------------------------
def test_spec_paths_outside_the_folder_are_refused(model, tmp_path):
    secret = arrays_to_npz({"weights": np.ones(3)})
    (tmp_path / "x.npz").write_bytes(secret)
    digest = hashlib.sha256(secret).hexdigest()
    outside = {
        "dot-dot": lambda spec: spec["files"].update({"learned/../../x.npz": digest}),
        "absolute-adapter": lambda spec: (spec["files"].update({str(tmp_path / "x.npz"): digest}),
                                          spec["adapters"].update({"a.safetensors": str(tmp_path / "x.npz")})),
        "adapter-dot-dot": lambda spec: (spec["files"].update({"adapters/../../x.npz": digest}),
                                         spec["adapters"].update({"a.safetensors": "adapters/../../x.npz"})),
    }
    for name, change in outside.items():
        folder = forged(model.save(tmp_path / name), change)
        with pytest.raises(ConfigError, match=r"spec\.json: it names the file .*x\.npz'?, which is outside the model folder"):
            RankerModel.load(folder)
    # A file of the folder that is a symbolic link out of it.
    folder = forged(model.save(tmp_path / "link"), lambda spec: spec["files"].update({"learned/features.x.npz": digest}))
    (folder / "learned").mkdir()
    (folder / "learned" / "features.x.npz").symlink_to(tmp_path / "x.npz")
    with pytest.raises(ConfigError, match="learned/features.x.npz', which is outside the model folder"):
        RankerModel.load(folder)
    folder = forged(model.save(tmp_path / "other"), lambda spec: spec["files"].update({"notes.txt": digest}))
    with pytest.raises(ConfigError, match="'notes.txt', which is none of the files a model holds"):
        RankerModel.load(folder)


# -- model.txt: checked before LightGBM's parser ---------------------------------------------------------------
def resized(text: str) -> str:
    """`text` with tree_sizes recomputed from its trees, so an edit inside a tree is not caught by them."""
    first, end = text.index("\nTree=") + 1, text.index("\nend of trees\n") + 1
    body = text[first:end]
    starts = [0] + [m.start() + 1 for m in re.finditer("\nTree=", body)]
    sizes = [len(body[a:b].encode()) for a, b in zip(starts, [*starts[1:], len(body)])]
    return re.sub(r"(?m)^tree_sizes=.*$", "tree_sizes=" + " ".join(map(str, sizes)), text[:first]) + text[first:]


def tree_edit(text: str, key: str, change, tree: int = 0) -> str:
    """`text` with the line `key=...` of tree `tree` changed by `change(values) -> values`."""
    start = text.index(f"\nTree={tree}\n")
    line = text.index(f"\n{key}=", start) + 1
    stop = text.index("\n", line)
    values = change(text[line + len(key) + 1 : stop].split(" "))
    return resized(text[:line] + f"{key}=" + " ".join(values) + text[stop:])


def at(index: int, value: str):
    return lambda values: [value if i == index else v for i, v in enumerate(values)]


CRAFTED = {
    "truncated": (lambda t: t[: len(t) // 3], "incomplete LightGBM model"),
    "truncated-in-a-tree": (lambda t: t[: t.index("leaf_value=", t.index("Tree=1")) + 30], "incomplete LightGBM model"),
    "child-out-of-range": (lambda t: tree_edit(t, "left_child", at(0, "999")), "child node 999 does not exist"),
    "leaf-out-of-range": (lambda t: tree_edit(t, "right_child", at(0, "-999")), "leaf 998 does not exist"),
    "cycle": (lambda t: tree_edit(t, "left_child", at(1, "0")), "reached twice"),
    "feature-beyond-the-model": (lambda t: tree_edit(t, "split_feature", at(0, "4000")), "split_feature names a feature beyond"),
    "short-array": (lambda t: tree_edit(t, "leaf_value", lambda v: v[:-1]), "leaf_value has 30 entries where the tree needs 31"),
    "nan-leaf": (lambda t: tree_edit(t, "leaf_value", at(0, "nan")), "leaf_value is not a list of numbers"),
    "tree-sizes-past-the-end": (lambda t: re.sub(r"(?m)^tree_sizes=(\d+)", lambda m: f"tree_sizes={int(m[1]) + 10**6}", t),
                                "do not end where tree_sizes says"),
    "line-without-equals": (lambda t: resized(t.replace("\nnum_cat=0\n", "\nnum_cat=0\ngarbage\n", 1)), "tree 0: line 'garbage'"),
    "parameter-without-colon": (lambda t: t.replace("[boosting: gbdt]", "[boosting gbdt]"), "'[boosting gbdt]' after the trees"),
    "no-trees-per-iteration": (lambda t: t.replace("num_tree_per_iteration=1", "num_tree_per_iteration=0"),
                               "num_tree_per_iteration must be 1"),
    "nul-byte": (lambda t: t.replace("end of trees", "end of\0trees"), "NUL"),
}
LOAD_EACH = """
import json, sys
from recengine.errors import RecengineError
from recengine.learning.model import RankerModel
for folder in sys.argv[1:]:
    try:
        RankerModel.load(folder)
        print(json.dumps([folder, "loaded"]), flush=True)
    except RecengineError as exc:
        print(json.dumps([folder, str(exc)]), flush=True)
"""


def test_crafted_model_texts_with_rewritten_digests_are_refused_and_the_process_lives(model, tmp_path):
    """Each of these made LightGBM read out of bounds or loop, which no try/except survives; loaded in a
    subprocess, so a crash shows as one, every case is refused with a message and the process goes on."""
    text = model.save(tmp_path / "intact").joinpath(MODEL_FILE).read_text()
    folders = [str(tmp_path / "intact")]
    for name, (craft, _) in CRAFTED.items():
        crafted = craft(text)
        assert crafted != text, name
        folders.append(str(forged(model.save(tmp_path / name), text=crafted)))
    done = subprocess.run([sys.executable, "-c", LOAD_EACH, *folders], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    answers = dict(json.loads(line) for line in done.stdout.splitlines())
    assert answers.pop(str(tmp_path / "intact")) == "loaded"
    for name, (_, expect) in CRAFTED.items():
        message = answers[str(tmp_path / name)]
        assert expect in message and f"{name}/model.txt" in message and "train the model again" in message, (name, message)


# -- spec.json: its schema, its digest, and the feature set it holds ------------------------------------------------
@pytest.mark.parametrize("change", [
    lambda spec: spec["feature_set"]["candidates"]["popular"].update(k=5),
    lambda spec: spec["feature_set"].update(exclude_seen=False),
    lambda spec: spec["features"].reverse(),
    lambda spec: spec.update(best_iteration=1),
], ids=["k", "exclude-seen", "feature-order", "best-iteration"])
def test_an_edited_spec_is_refused(model, tmp_path, change):
    folder = edited(model.save(tmp_path / "model"), change)
    with pytest.raises(ConfigError, match=r"spec\.json: its content does not match the 'spec_sha256'.*train the model again"):
        RankerModel.load(folder)


@pytest.mark.parametrize("change, expect", [
    (lambda spec: spec.update(note="mine"), "unknown key 'note'"),
    (lambda spec: spec["features"].__setitem__(1, spec["features"][0]), "malformed 'features'"),
    (lambda spec: spec.update(best_iteration="3"), "malformed 'best_iteration'"),
    (lambda spec: spec.update(best_iteration=10**6), "best_iteration = 1000000, but .*model.txt holds \\d+ trees"),
    (lambda spec: spec["parts"][0].pop("version"), "malformed 'parts'"),
    (lambda spec: spec.update(learned_until="yesterday"), "malformed 'learned_until'"),
    (lambda spec: spec["files"].update({MODEL_FILE: "abc"}), "malformed 'files'"),
    (lambda spec: spec["features"].reverse(), ("its 'features' differ from those .*model.txt was trained on "
                                               r"\(position 1: 'user_value_mean' against 'cand_popular_score'")),
    (lambda spec: spec["feature_set"].update(candidates=dict(reversed(spec["feature_set"]["candidates"].items()))),
     (r"its feature set computes other columns than its 'features' list \(position 1: 'cand_covisitation_score' "
      "against 'cand_popular_score'")),
    (lambda spec: spec["feature_set"]["ranker"].update(machines="127.0.0.1:12400"),
     r"spec.json \(its feature_set\): \[ranker\] machines = '127.0.0.1:12400' cannot be set: distributed"),
    (lambda spec: spec["feature_set"]["ranker"].update(num_threads=100_000), r"num_threads = 100000; give a whole number at most 256"),
], ids=["unknown-key", "duplicate-feature", "best-iteration-text", "best-iteration-past-the-trees", "part-without-version",
        "learned-until", "digest-not-hex", "feature-order", "feature-set-order", "ranker-machines", "ranker-threads"])
def test_a_spec_outside_its_schema_is_refused_even_with_its_digest_rewritten(model, tmp_path, change, expect):
    folder = forged(model.save(tmp_path / "model"), change)
    with pytest.raises(ConfigError, match=expect):
        RankerModel.load(folder)


def test_a_spec_without_its_own_digest_loads_as_before(model, tmp_path):
    folder = edited(model.save(tmp_path / "model"), lambda spec: spec.pop(SPEC_DIGEST, None))  # a folder saved before #25
    matrix = np.random.default_rng(0).random((5, len(model.features)))
    assert np.array_equal(RankerModel.load(folder).predict(matrix), model.predict(matrix))
    assert RankerModel.load(folder).digest() == model.digest()


# -- arrays and tensors are finite ---------------------------------------------------------------------------
def test_learned_arrays_that_are_not_finite_or_not_plain_are_refused(model, tmp_path):
    nan = arrays_to_npz({"weights": np.array([1.0, np.nan])})
    folder = forged(model.save(tmp_path / "nan"), extra={"learned/features.x.npz": nan})
    with pytest.raises(ConfigError, match=r"features.x.npz: array 'weights' holds 1 NaN or infinite values"):
        RankerModel.load(folder)
    # A pickle inside: np.load refuses it (allow_pickle=False), and the refusal is a message.
    import io

    buffer = io.BytesIO()
    np.savez(buffer, weights=np.array([{"a": 1}], dtype=object))
    folder = forged(model.save(tmp_path / "pickle"), extra={"learned/features.x.npz": buffer.getvalue()})
    with pytest.raises(ConfigError, match="features.x.npz: not a learned state recengine wrote"):
        RankerModel.load(folder)
    # A tuning's curves may hold NaN (no held-out pair): they are records, never computed with.
    curves = arrays_to_npz({"recall": np.array([np.nan]), "projection": np.eye(2, dtype=np.int32)})
    assert RankerModel.load(forged(model.save(tmp_path / "curves"), extra={"learned/features.x.npz": curves})).learned


def _head_adapter(tiny_bert, projection: np.ndarray):
    from recengine.parts.adapters import Adapter
    from recengine.parts.encoders import create_encoder

    params = {"model": str(tiny_bert), "device": DEVICE}
    return Adapter({"projection": projection}, "transformers", params, "head", datetime(2024, 3, 1), field="title",
                   base_id=create_encoder("transformers", params).id)


def test_an_adapter_with_nan_weights_is_refused_when_read(tmp_path, tiny_bert):
    from recengine.parts.adapters import Adapter, load_adapter, save_adapter

    weights = {"encoder.layer.0.attention.self.query.lora_A.default.weight": np.full((8, 32), np.nan, dtype=np.float32)}
    path = save_adapter(tmp_path / "nan.safetensors", Adapter(weights, "transformers", {}, "lora", datetime(2024, 3, 1)))
    with pytest.raises(DataError, match=r"nan.safetensors: tensor 'encoder.*lora_A.*' holds NaN or infinite values.*recengine tune"):
        load_adapter(path)


def test_an_adapter_of_zeros_is_refused_and_puts_nothing_in_the_cache(tmp_path, tiny_bert):
    from recengine.parts.adapters import save_adapter
    from recengine.parts.encoders import EmbeddingCache, create_encoder, embed

    path = save_adapter(tmp_path / "zeros.safetensors", _head_adapter(tiny_bert, np.zeros((32, 32), dtype=np.int32)))
    encoder = create_encoder("transformers", {"model": str(tiny_bert), "device": DEVICE, "adapter": str(path)})
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(DataError, match=r"zeros.safetensors turns 2 of 2 texts \(the first 'space war'\) into NaN, "
                                        r"infinite or zero vectors.*recengine tune"):
        embed(["space war", "love story"], encoder, cache)
    assert not cache.lookup(encoder.id, np.array(["space war"], dtype=object))[1].any()
    # A sound adapter encodes, on the unit sphere.
    good = save_adapter(tmp_path / "eye.safetensors", _head_adapter(tiny_bert, np.eye(32, dtype=np.int32) * 2**16))
    vectors = create_encoder("transformers", {"model": str(tiny_bert), "device": DEVICE, "adapter": str(good)}).encode(["space war"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)


# -- plugins: one rule for every loader (item 9) ------------------------------------------------------------
def test_loading_refuses_plugins_at_another_version_or_missing(model, tmp_path):
    from recengine.running.ranker import Ranker

    part = model.spec["parts"][0]
    folder = forged(model.save(tmp_path / "old"), lambda spec: spec["parts"][0].update(version="0.0.1"))
    expect = rf"trained with plugin '{re.escape(part['plugin'])}' 0.0.1 for '{part['name']}', but .* is installed"
    with pytest.raises(ConfigError, match=expect):
        RankerModel.load(folder)
    with pytest.raises(ConfigError, match=expect):
        Ranker.load(folder, interactions(n_users=40, per_user=15), catalogue())
    sentiment = {"kind": "feature_extractors", "name": "sentiment", "plugin": "recengine-sentiment", "version": "1.2.0"}
    folder = forged(model.save(tmp_path / "missing"), lambda spec: spec["parts"].append(sentiment))
    with pytest.raises(ConfigError, match="needs feature extractor 'sentiment' from plugin 'recengine-sentiment' 1.2.0"):
        RankerModel.load(folder)


def test_the_mlflow_pyfunc_loader_applies_the_same_checks(model, tmp_path):
    import pandas as pd

    from recengine.interfaces.mlflow_model import LightGBMRanker

    class Context:
        artifacts = {"ranker": str(model.save(tmp_path / "model"))}

    loaded = LightGBMRanker()
    loaded.load_context(Context())
    rows = pd.DataFrame(np.random.default_rng(0).random((3, len(model.features))), columns=model.features)
    assert np.allclose(loaded.predict(None, rows)["score"].to_numpy(), model.predict(rows.to_numpy()))
    text = (tmp_path / "model" / MODEL_FILE).read_text()
    forged(tmp_path / "model", text=text[: len(text) // 2])
    with pytest.raises(ConfigError, match="incomplete LightGBM model"):
        LightGBMRanker().load_context(Context())


# -- a save that fails (a full disk) keeps the model (item 7) ---------------------------------------------------
SAVE_UNDER_LIMIT = """
import json, resource, signal, sys
from pathlib import Path
from recengine.learning import model as m
from recengine.errors import RecengineError
source, dest, where = sys.argv[1:4]
loaded = m.RankerModel.load(source)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
write = m._write_synced
def limited(file, data):  # the limit for the files written under `dest`'s folder only, or everywhere
    full = where == "everywhere" or Path(file).is_relative_to(Path(dest).parent)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096 if full else hard, hard))
    try:
        write(file, data)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
m._write_synced = limited
try:
    loaded.save(dest)
    print(json.dumps("saved"))
except RecengineError as exc:
    print(json.dumps(str(exc)))
"""


def _save_under_a_limit(model, tmp_path: Path, where: str) -> tuple[str, Path]:
    source, out, temp = model.save(tmp_path / "source"), tmp_path / "out", tmp_path / "tmp"
    out.mkdir(), temp.mkdir()
    older = model.save(out / "model")  # an older model at the destination, which a failed save must leave whole
    before = {p: p.read_bytes() for p in older.rglob("*") if p.is_file()}
    done = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(source), str(out / "model"), where],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(temp)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p: p.read_bytes() for p in older.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["model"]  # no staging folder left behind
    return json.loads(done.stdout.strip().splitlines()[-1]), temp


def test_a_model_that_cannot_be_written_is_kept_in_a_temporary_folder(model, tmp_path):
    message, temp = _save_under_a_limit(model, tmp_path, "destination")
    kept = re.search(r"kept, whole, in (\S+): free space, then move that folder to (\S+), or use it", message)
    assert message.startswith(f"cannot write the model folder {tmp_path / 'out' / 'model'} (File too large"), message
    assert kept and Path(kept[1]).parent.parent == temp and kept[2] == str(tmp_path / "out" / "model"), message
    matrix = np.random.default_rng(0).random((5, len(model.features)))
    assert np.array_equal(RankerModel.load(kept[1]).predict(matrix), model.predict(matrix))


def test_a_model_that_cannot_be_written_anywhere_says_so(model, tmp_path):
    message, temp = _save_under_a_limit(model, tmp_path, "everywhere")
    assert re.fullmatch(rf"cannot write the model folder \S+ \(File too large: the disk is full, .*\), nor keep the model "
                        rf"in {re.escape(str(temp))} \(File too large\): this training's model is lost\. Free disk space.*",
                        message), message
    assert not list(temp.iterdir())


TRAIN_ON_A_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from recengine.learning import model as m
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
write = m._write_synced
def limited(file, data):  # the disk of the working folder is full; the system's temporary folder is not
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096 if Path(file).resolve().is_relative_to(Path.cwd()) else hard, hard))
    try:
        write(file, data)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
m._write_synced = limited
from recengine.interfaces.cli import cli
cli(sys.argv[1:])
"""


def test_train_output_on_a_full_disk_keeps_the_finished_training(tmp_path):
    work, temp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), temp.mkdir()
    interactions(n_users=30, per_user=12).write_csv(work / "events.csv")
    catalogue().write_csv(work / "items.csv")
    (work / "fs.toml").write_text("[candidates.popular]\nk = 30\n[features.item_popularity]\nwindows_days = [7]\n"
                                  "[ranker]\nnum_boost_round = 10\nmin_data_in_leaf = 10\n")
    env = {**os.environ, "TMPDIR": str(temp), "RECENGINE_CACHE_DIR": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", TRAIN_ON_A_FULL_DISK, "train", "--events", "events.csv", "--items",
                           "items.csv", "--feature-set", "fs.toml", "--no-register", "--output", "model"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)
    message = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert message.startswith("Error: cannot write the model folder model (File too large"), message
    kept = re.search(r"kept, whole, in (\S+):", message)
    assert kept and RankerModel.load(kept[1]).features and not (work / "model").exists()
