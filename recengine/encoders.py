"""Text encoders and the on-disk embedding cache.

An encoder turns texts into an `(n, d)` float32 matrix of L2-normalised rows and has an `id` that
changes whenever its output would (model, pooling, max length, precision, version). Encoders come
from plugins through the `register_encoders` hook.

The cache stores embeddings keyed by (encoder id, hash of the text): a second run over the same
catalogue encodes nothing, a catalogue with new items encodes only those. Each write goes to a new
shard file, written to a temporary name and renamed, so concurrent or interrupted writers never
leave a half-written shard behind; a shard that cannot be read is ignored and its texts re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

from recengine import plugins

DEFAULT_CACHE_DIR = Path(os.environ.get("RECENGINE_CACHE_DIR", ".recengine/cache"))
_KEY = np.dtype("S16")
_COMPACT_AFTER = 16  # shards per encoder before they are merged into one


@runtime_checkable
class Encoder(Protocol):
    id: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """An (len(texts), d) float32 matrix of L2-normalised rows."""


def create_encoder(name: str, params: dict[str, Any] | None = None) -> Encoder:
    """Build the registered encoder `name` with keyword `params`."""
    return plugins.create("encoders", name, params)


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """16-byte blake2b digests of the texts, the cache's keys."""
    return np.array([hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts], dtype=_KEY)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
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
        folder = self.folder(encoder_id)
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "encoder.json"
        if not meta.exists():
            _atomic_write_bytes(meta, json.dumps({"encoder_id": encoder_id}).encode())
        _write_shard(folder / f"shard-{uuid.uuid4().hex}.npz", keys, vectors)
        self._load(encoder_id).update(zip(keys.tolist(), vectors))
        shards = sorted(folder.glob("shard-*.npz"))
        if len(shards) > _COMPACT_AFTER:
            _compact(folder, shards)

    def _load(self, encoder_id: str) -> dict[bytes, np.ndarray]:
        if encoder_id in self._memory:
            return self._memory[encoder_id]
        table: dict[bytes, np.ndarray] = {}
        folder = self.folder(encoder_id)
        if _owner(folder) == encoder_id:
            for shard in sorted(folder.glob("shard-*.npz")):
                table.update(_read_shard(shard) or {})
        self._memory[encoder_id] = table
        return table


def _read_shard(shard: Path) -> dict[bytes, np.ndarray] | None:
    try:
        with np.load(shard) as data:
            return dict(zip(data["keys"].tolist(), data["vectors"]))
    except Exception as exc:  # a damaged shard costs a re-encode, never a crash
        print(f"recengine: ignoring unreadable cache shard {shard}: {exc}", file=sys.stderr)
        return None


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
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", suffix=".npz", delete=False) as handle:
        np.savez(handle, keys=keys.astype(_KEY), vectors=vectors.astype(np.float32))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as handle:
        handle.write(data)
    os.replace(handle.name, path)


def embed(
    texts: Sequence[str],
    encoder: Encoder,
    cache: EmbeddingCache | None = None,
    chunk_size: int = 4096,
    progress: bool = False,
) -> tuple[np.ndarray, CacheStats]:
    """Embeddings of `texts` (duplicates encoded once), served from and added to `cache`."""
    started = time.perf_counter()
    unique, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    keys = text_keys(unique.tolist())
    stats = CacheStats()
    matrix, found = cache.lookup(encoder.id, keys) if cache else (None, np.zeros(len(unique), dtype=bool))
    missing = np.flatnonzero(~found)
    stats.hits, stats.misses = int(found.sum()), int(len(missing))
    bar = tqdm(total=len(missing), desc=f"encoding with {encoder.id}", unit="text", disable=not progress or not len(missing))
    for start in range(0, len(missing), chunk_size):
        rows = missing[start : start + chunk_size]
        begun = time.perf_counter()
        vectors = np.asarray(encoder.encode(unique[rows].tolist()), dtype=np.float32)
        stats.encode_seconds += time.perf_counter() - begun
        if matrix is None:
            matrix = np.zeros((len(unique), vectors.shape[1]), dtype=np.float32)
        matrix[rows] = vectors
        if cache:
            cache.store(encoder.id, keys[rows], vectors)  # per chunk: an interrupted run keeps its work
        bar.update(len(rows))
    bar.close()
    stats.seconds = time.perf_counter() - started
    if matrix is None:  # no texts at all
        return np.zeros((0, 0), dtype=np.float32), stats
    return matrix[inverse.ravel()], stats
