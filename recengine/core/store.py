"""Where MLflow keeps runs and models: `MLFLOW_TRACKING_URI`, else SQLite in ./mlruns (artifacts in
./mlruns/artifacts). Its own module, so that loading a model (`recengine.learning.model`) and logging a
training (`recengine.interfaces.tracking`) read one definition without importing each other.

A local SQLite store is shared by every process on the machine: `store_lock` serialises what must not
interleave (creating the database, moving `@champion`), and `open_store` creates or checks it under
that lock, so two first trainings into a store that does not exist yet do not both create its schema."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from recengine.errors import StoreError

STORE_DIR = Path("mlruns")
SQLITE_HEADER = b"SQLite format 3\x00"
# Errors that mean "no room": a full disk, a quota, a file size limit (RLIMIT_FSIZE), as the OS or SQLite say it.
SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
SPACE_WORDS = ("database or disk is full", "disk I/O error", "No space left on device", "File too large",
               "Disk quota exceeded")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else SQLite in ./mlruns (created on first use)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    STORE_DIR.mkdir(exist_ok=True)
    return default_uri()


def default_uri() -> str:
    return f"sqlite:///{STORE_DIR.resolve() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store URI (`sqlite:///relative.db`, `sqlite:////absolute.db`);
    None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def open_store() -> str:
    """The tracking URI, with its local SQLite store checked and created (or its schema verified) under
    `store_lock`: MLflow creates a new database's tables on first use, and two processes doing that at
    once fail with a raw SQLite or migration error."""
    import mlflow

    uri = tracking_uri()
    path = sqlite_file(uri)
    if path is None:
        return uri
    _check_sqlite_file(path)
    with store_lock(uri):
        try:
            mlflow.MlflowClient(uri, registry_uri=uri).search_experiments(max_results=1)
            mlflow.MlflowClient(uri, registry_uri=uri).search_registered_models(max_results=1)
        except Exception as exc:
            raise _unopenable(path, exc) from exc
    return uri


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on `<database>.lock` beside a local SQLite store, held by one process at a time on
    this machine (the kernel drops it when its process dies, however it dies); nothing for other stores."""
    path = sqlite_file(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the registry's own checks still apply)
        path = None
    if path is None:
        yield
        return
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    except OSError as exc:
        raise StoreError(f"Cannot write in folder {lock.parent}, which holds the MLflow store {path} ({exc.strerror}). "
                         "Make the folder writable, or set MLFLOW_TRACKING_URI to a store in a writable folder, e.g. "
                         "sqlite:///mlruns/mlflow.db.") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def out_of_space(exc: BaseException) -> str | None:
    """What says there was no room to write (`No space left on device: path`, SQLite's `database or disk is
    full`), when `exc` or an exception it was raised from says so; else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in SPACE_ERRNOS:
            return f"{current.strerror}: {current.filename}" if current.filename else str(current.strerror)
        text = str(current).lower()
        word = next((w for w in SPACE_WORDS if w.lower() in text), None)
        if word is not None:
            return word
        current = current.__cause__ or current.__context__
    return None


def store_full(uri: str, reason: str, run_id: str, kept: Path | None) -> StoreError:
    """The error for a store that ran out of room while logging run `run_id`, saying where the trained model
    was kept (`kept`, or that it could not be)."""
    path = sqlite_file(uri)
    where = path if path is not None else uri
    folder = path.resolve().parent if path is not None else "the store"
    model = (f"The trained model is kept in {kept}: use it with --model {kept}, or " if kept is not None else
             "The trained model could not be kept either (no room in the temporary folder); ")
    return StoreError(f"The MLflow store {where} could not be written while logging run {run_id} ({reason}): its "
                      f"disk is full or a file size limit was reached. {model}free space on the disk holding {folder} "
                      "(or set MLFLOW_TRACKING_URI to a store elsewhere) and train again.")


def _check_sqlite_file(path: Path) -> None:
    """Refuse, before any training, a store path MLflow would fail on with a raw SQLite error."""
    name = f"The MLflow store {path}{' (MLFLOW_TRACKING_URI)' if os.environ.get('MLFLOW_TRACKING_URI') else ''}"
    if path.is_dir():
        raise StoreError(f"{name} is a folder, not an SQLite file. Point MLFLOW_TRACKING_URI at a file in it, e.g. "
                         f"sqlite:///{path.resolve() / 'mlflow.db'}.")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return  # a new store: created by open_store
    except OSError as exc:
        raise StoreError(f"{name} cannot be read ({exc.strerror}). Make it readable, or point MLFLOW_TRACKING_URI at "
                         "another file.") from None
    if head and head != SQLITE_HEADER[: len(head)]:
        raise StoreError(f"{name} is not an SQLite database (it starts with {head[:12]!r}). Point "
                         "MLFLOW_TRACKING_URI at an MLflow store, or at a new file name to start one, e.g. "
                         "sqlite:///mlruns/mlflow.db.")


def _unopenable(path: Path, exc: Exception) -> StoreError:
    reason = out_of_space(exc)
    if reason is not None:
        return StoreError(f"The MLflow store {path} cannot be created or updated ({reason}). Free space on the "
                          f"disk holding {path.resolve().parent}, or set MLFLOW_TRACKING_URI to a store elsewhere.")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreError(f"The MLflow store {path} cannot be opened ({first[:300]}). If MLflow says to upgrade it, "
                      f"run `mlflow db upgrade sqlite:///{path.resolve()}` after a backup; otherwise point "
                      "MLFLOW_TRACKING_URI at a new file name to start another store.")
