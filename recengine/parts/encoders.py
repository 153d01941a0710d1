"""Encoders and the on-disk embedding cache.

An encoder turns texts (or other values held as strings, such as image paths) into an `(n, d)` float32
matrix of L2-normalised rows and has an `id` that changes whenever its output would (model, pooling,
max length, precision, version). Encoders come from plugins through the `register_encoders` hook. A row
of NaN means the value has no embedding (an image that cannot be read, where the encoder was told to
give such values none): it is never cached, so the value is encoded again next time, and
`CacheStats.nulls` counts it.

The cache stores embeddings keyed by (encoder id, key of the value). A text's key is a hash of the
text (`text_keys`). An encoder whose output depends on more than the string, such as an image encoder
given paths whose files can change, supplies its own keys with an optional method
`cache_keys(texts) -> np.ndarray` of dtype S16 (e.g. a hash of the path, the file's size and mtime:
a re-run reads only file metadata, and a changed file is encoded again). A second run over the same
catalogue encodes nothing, a catalogue with new items encodes only those. Each write goes to a new
shard file, written to a temporary name and renamed, so concurrent or interrupted writers never
leave a half-written shard behind. Damage is repaired once, with one warning: a shard that cannot be
read is moved to `quarantine/` (its texts are encoded again), a damaged `encoder.json` is rewritten.
Files and folders are created with the permissions the umask gives, like any other file the user makes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from recengine.core.files import _atomic_file, atomic_write_bytes
from recengine.errors import PluginError
from recengine.parts import plugins

DEFAULT_CACHE_DIR = Path(os.environ.get("RECENGINE_CACHE_DIR", ".recengine/cache"))
_KEY = np.dtype("S16")
_COMPACT_AFTER = 16  # shards per encoder before they are merged into one


@runtime_checkable
class Encoder(Protocol):
    """`id` and `encode`; optionally `cache_keys(texts) -> np.ndarray` (S16), the cache's keys of the
    values when a hash of the string is not enough (see the module docstring and `cache_keys`)."""

    id: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """An (len(texts), d) float32 matrix of L2-normalised rows."""


def create_encoder(name: str, params: dict[str, Any] | None = None) -> Encoder:
    """Build the registered encoder `name` with keyword `params`. With `adapter` among them (a path or
    an MLflow URI of a file `recengine tune` wrote), the encoder built from the other parameters with
    the tuned weights applied (`recengine.parts.adapters.AdaptedEncoder`), once the file is checked to have
    been tuned on that encoder."""
    params = dict(params or {})
    adapter = params.pop("adapter", None)
    base = plugins.create("encoders", name, params)
    if adapter is None:
        return base
    from recengine.parts.adapters import adapted_encoder

    return adapted_encoder(name, params, base, str(adapter))


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """16-byte blake2b digests of the texts, the cache's keys."""
    return np.array([hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts], dtype=_KEY)


def cache_keys(encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
    """The cache's keys of `texts` for `encoder`: its own `cache_keys` when it has one, else `text_keys`."""
    own = getattr(encoder, "cache_keys", None)
    if not callable(own):
        return text_keys(texts)
    keys = np.asarray(own(texts), dtype=_KEY)
    if keys.shape != (len(texts),):
        raise PluginError(f"encoder {encoder.id}: cache_keys gave {keys.shape} keys for {len(texts)} values, not one "
                          "each; fix or uninstall the plugin that provides it.")
    return keys


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    nulls: int = 0  # of the misses, values the encoder gave no embedding (a NaN row): never cached
    encode_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return (self.hits + self.misses) / self.seconds if self.seconds else float("inf")


@dataclass
class EmbeddingCache:
    """Embeddings on disk under `root/<digest of encoder id>/`, one folder per encoder id."""

    root: Path = DEFAULT_CACHE_DIR
    _memory: dict[str, dict[bytes, np.ndarray]] = field(default_factory=dict, repr=False)
    _unwritable: bool = field(default=False, repr=False)  # a write failed (disk full): stop trying, say it once

    def folder(self, encoder_id: str) -> Path:
        digest = hashlib.sha256(encoder_id.encode()).hexdigest()[:24]
        return Path(self.root) / digest

    def lookup(self, encoder_id: str, keys: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(matrix with found rows filled, boolean mask of found rows)."""
        table = self._load(encoder_id)
        found = np.array([k in table for k in keys.tolist()], dtype=bool)
        if not found.any():
            return None, found
        dim = next(iter(table.values())).shape[0]
        out = np.zeros((len(keys), dim), dtype=np.float32)
        hit_keys = keys[found].tolist()
        out[found] = np.stack([table[k] for k in hit_keys])
        return out, found

    def store(self, encoder_id: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._load(encoder_id).update(zip(keys.tolist(), vectors))  # this run reads them whatever the disk says
        if self._unwritable:
            return
        folder = self.folder(encoder_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            meta = folder / "encoder.json"
            if not meta.exists():
                atomic_write_bytes(meta, json.dumps({"encoder_id": encoder_id}).encode())
            _write_shard(folder / f"shard-{uuid.uuid4().hex}.npz", keys, vectors)
            shards = sorted(folder.glob("shard-*.npz"))
            if len(shards) > _COMPACT_AFTER:
                _compact(folder, shards)
        except OSError as exc:
            # The cache only saves time: a full disk (or a read-only one) must not stop a run that has its
            # embeddings in hand. Said once; the atomic writes left no half-written shard behind.
            self._unwritable = True
            print(f"recengine: cannot write to the embedding cache {folder} ({exc.strerror or exc}); this run goes on "
                  "without caching, so the next one encodes these texts again. Free space there, or point "
                  "RECENGINE_CACHE_DIR (or --cache-dir) at a disk with room.", file=sys.stderr)

    def _load(self, encoder_id: str) -> dict[bytes, np.ndarray]:
        if encoder_id in self._memory:
            return self._memory[encoder_id]
        table: dict[bytes, np.ndarray] = {}
        folder = self.folder(encoder_id)
        if folder.is_dir():
            _repair_owner(folder, encoder_id)
        if _owner(folder) == encoder_id:
            for shard in sorted(folder.glob("shard-*.npz")):
                table.update(_read_shard(shard) or {})
        self._memory[encoder_id] = table
        return table


def _repair_owner(folder: Path, encoder_id: str) -> None:
    """An unreadable encoder.json would switch the cache off for good (every run re-encoding everything).
    The folder's name is a digest of the encoder id, so the id it belongs to is known: write it again."""
    meta = folder / "encoder.json"
    if not meta.exists() or _owner(folder) is not None:
        return
    try:
        atomic_write_bytes(meta, json.dumps({"encoder_id": encoder_id}).encode())
    except OSError as exc:
        print(f"recengine: embedding cache file {meta} is damaged and cannot be rewritten ({exc}); "
              "the cache is not used for this encoder until it is fixed or deleted.", file=sys.stderr)
        return
    print(f"recengine: embedding cache file {meta} was damaged; rewrote it for encoder {encoder_id} "
          "(the folder's name is that encoder's digest), so its cached embeddings are used again.", file=sys.stderr)


def _read_shard(shard: Path) -> dict[bytes, np.ndarray] | None:
    try:
        with np.load(shard) as data:
            return dict(zip(data["keys"].tolist(), data["vectors"]))
    except FileNotFoundError:  # merged and removed by a concurrent compaction: its entries live on elsewhere
        return None
    except Exception as exc:  # a damaged shard costs a re-encode, never a crash
        _quarantine(shard, exc)
        return None


def _quarantine(shard: Path, exc: Exception) -> None:
    """Move a damaged shard out of the loader's way, once: `quarantine/` beside it keeps it for a look."""
    target = shard.parent / "quarantine" / shard.name
    try:
        target.parent.mkdir(exist_ok=True)
        os.replace(shard, target)
    except FileNotFoundError:  # another process moved it first and said so
        return
    except OSError as move_error:
        print(f"recengine: ignoring unreadable cache shard {shard} ({exc}); it could not be moved aside "
              f"({move_error}), so its texts are encoded again on every run until it is deleted.", file=sys.stderr)
        return
    print(f"recengine: ignoring unreadable cache shard {shard} ({type(exc).__name__}: {exc}); moved it to "
          f"{target}, and its texts are encoded again.", file=sys.stderr)


def _compact(folder: Path, shards: list[Path]) -> None:
    # Merge exactly the shards on disk and delete only those: a concurrent writer's newer shard stays.
    # The merged shard lands before the old ones go, so a reader always sees every entry.
    merged: dict[bytes, np.ndarray] = {}
    readable = []
    for shard in shards:
        entries = _read_shard(shard)
        if entries is not None:
            merged.update(entries)
            readable.append(shard)
    if merged:
        keys = np.array(list(merged), dtype=_KEY)
        _write_shard(folder / f"shard-{uuid.uuid4().hex}.npz", keys, np.stack(list(merged.values())))
    for shard in readable:
        shard.unlink(missing_ok=True)


def _owner(folder: Path) -> str | None:
    try:
        return json.loads((folder / "encoder.json").read_text())["encoder_id"]
    except (OSError, ValueError, KeyError):
        return None


def _write_shard(path: Path, keys: np.ndarray, vectors: np.ndarray) -> None:
    with _atomic_file(path, ".npz") as handle:
        np.savez(handle, keys=keys.astype(_KEY), vectors=vectors.astype(np.float32))


def embed(
    texts: Sequence[str],
    encoder: Encoder,
    cache: EmbeddingCache | None = None,
    chunk_size: int = 4096,
    progress: bool = False,
) -> tuple[np.ndarray, CacheStats]:
    """Embeddings of `texts` (duplicates encoded once), served from and added to `cache`. Rows the
    encoder returns with a non-finite value (no embedding for that value) are returned as they are,
    counted in `nulls` and not cached."""
    started = time.perf_counter()
    unique, inverse = unique_texts(texts)
    keys = cache_keys(encoder, unique)
    stats = CacheStats()
    matrix, found = cache.lookup(encoder.id, keys) if cache else (None, np.zeros(len(unique), dtype=bool))
    missing = np.flatnonzero(~found)
    stats.hits, stats.misses = int(found.sum()), int(len(missing))
    bar = tqdm(total=len(missing), desc=f"encoding with {encoder.id}", unit="text", disable=not progress or not len(missing))
    for start in range(0, len(missing), chunk_size):
        rows = missing[start : start + chunk_size]
        begun = time.perf_counter()
        vectors = np.asarray(encoder.encode([unique[row] for row in rows]), dtype=np.float32)
        stats.encode_seconds += time.perf_counter() - begun
        if matrix is None:
            matrix = np.zeros((len(unique), vectors.shape[1]), dtype=np.float32)
        matrix[rows] = vectors
        finite = np.isfinite(vectors).all(axis=1)
        stats.nulls += int((~finite).sum())
        # Stored per chunk: an interrupted run keeps its work. A null is not: a fixed file is encoded next time.
        if cache and finite.any():
            cache.store(encoder.id, keys[rows[finite]], vectors[finite])
        bar.update(len(rows))
    bar.close()
    stats.seconds = time.perf_counter() - started
    if matrix is None:  # no texts at all
        return np.zeros((0, 0), dtype=np.float32), stats
    return matrix[inverse], stats


def unique_texts(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts in order of first appearance, and each text's index among them. Python strings
    keep their own lengths: a numpy string array would give every text the width of the longest, and one
    megabyte-long title in a catalogue of a million would ask for terabytes."""
    index: dict[str, int] = {}
    positions = (index.setdefault(text if isinstance(text, str) else str(text), len(index)) for text in texts)
    inverse = np.fromiter(positions, dtype=np.int64, count=len(texts))
    return list(index), inverse
