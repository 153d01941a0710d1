"""Files written all or nothing: a temporary file beside the target, synced, renamed onto it."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` as the file `path`, all or nothing (see `_atomic_file`)."""
    with _atomic_file(path, "") as handle:
        handle.write(data)


@contextlib.contextmanager
def _atomic_file(path: Path, suffix: str) -> Iterator[BinaryIO]:
    """A new file in `path`'s folder, synced and renamed onto `path` when the block ends; removed if it fails.
    Created with os.open's 0o666 so the umask decides its mode (mkstemp would make it 0600 whatever the umask)."""
    temporary = path.parent / f".tmp-{uuid.uuid4().hex}{suffix}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
