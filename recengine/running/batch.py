"""The offline batch job: rank a candidates (or requests) table in chunks, resumably.

Input rows are split into chunks by a hash of their user, so every request (and all of a user's
requests) lands whole in one chunk whatever the file's order, and memory follows the chunk size, not
the input size: a user's rows are scored together, which lets the serving state compute a user with
many candidates once per catalogue item instead of once per row. Each chunk's
top-k is written atomically as a part file and recorded in a manifest; a job killed at any point and
started again with the same arguments skips the finished chunks. The parts are merged into the output
at the end, so the output is the same, byte for byte, however often the job was interrupted.

    OUTPUT.parquet          the result: request key, user_id, timestamp, item_id, rank, score
    .OUTPUT.parquet.parts/  work in progress: manifest.json and part-NNNNN.parquet
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from recengine.core.data import CANDIDATES, REQUESTS, load_timed, write_parquet_atomic
from recengine.errors import ConfigError, DataError, RecengineError
from recengine.learning.model import RankerModel, check_writable
from recengine.parts import policy as new_items
from recengine.parts.context import FeatureContext


@dataclass
class JobReport:
    rows: int
    requests: int
    chunks: int
    skipped: int
    seconds: float
    output: Path
    duplicates: int = 0  # input rows dropped as repeats: a request given twice, or a request's candidate


def rank_file(
    model: RankerModel,
    input_path: str | Path,
    output: str | Path,
    context: FeatureContext,
    k: int = 10,
    chunk_rows: int = 1_000_000,
    generate: bool = False,
    columns: dict[str, str] | None = None,
    progress: bool = True,
) -> JobReport:
    """Rank `input_path` (candidates: user_id, item_id[, timestamp][, request_id]; or with `generate`,
    requests: user_id[, timestamp][, request_id]) and write the top `k` per request to `output`."""
    started = time.perf_counter()
    output = Path(output)
    check_output_file(output)
    input_path = local_path(input_path)
    model.check_plugins()
    rows, keys = _validated_input(input_path, generate, columns or {}, context)
    if generate:
        refuse_requests_before_every_event(rows, context, input_path)
    total = rows.select(pl.len()).collect().item()
    feature_set = model.feature_set()
    # A dry run on one row: a feature set the data cannot serve fails here, before any file is made.
    # (On the path the job's first row takes: for rows ranked now, that builds the serving state.)
    scorer = _ChunkScorer(model, feature_set, keys, context, generate, k)
    scorer(rows.head(1).collect())
    chunks = chunk_count(total, chunk_rows, generate, feature_set)
    work = work_folder(output)
    manifest = _Manifest(work, _fingerprint(model, input_path, k, chunk_rows, chunks, generate, columns, context))
    bucket = chunk_of(chunks)
    # Checked before the worker starts (a damaged part found here changes the manifest, which the
    # worker writes as chunks finish) and before the bar is drawn (they are said on stderr).
    finished = {chunk for chunk in range(chunks) if manifest.done(chunk, part_path(work, chunk))}
    skipped = 0

    def finish(chunk: int, part: Path, features: list, height: int, dropped: int) -> None:
        write_parquet_atomic(scorer.top(features), part, rerun=resume_advice(work))
        manifest.finish(chunk, height, dropped)
        bar.update(height)

    # A chunk's predict, top k and write run in a worker while the next chunk's features are built:
    # LightGBM releases the GIL and the features mostly use one core. One chunk in flight at a time
    # keeps memory flat and the manifest written in chunk order. The bar is closed however the job
    # ends, so an error's message starts on a line of its own.
    with tqdm(total=total, desc="ranking", unit="row", unit_scale=True, disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as worker:
        pending: Future | None = None
        for chunk in range(chunks):
            part = part_path(work, chunk)
            if chunk in finished:
                skipped += 1
                bar.update(manifest.rows[str(chunk)])
                continue
            batch = rows.filter(bucket == chunk).collect()
            unique, dropped = scorer.unique(batch)
            features = scorer.features(unique)
            if pending is not None:
                pending.result()
            pending = worker.submit(finish, chunk, part, features, batch.height, dropped)
        if pending is not None:
            pending.result()
    requests = merge_parts(work, chunks, output, keys)
    return JobReport(total, requests, chunks, skipped, time.perf_counter() - started, output, manifest.duplicates())


# The pieces below are shared with the Ray engine (recengine/running/distributed.py), which must write the
# same parts, in the same chunks, merged the same way: its output is this job's, byte for byte.


def work_folder(output: Path) -> Path:
    """Where a job writing `output` keeps its manifest and parts until the merge."""
    return output.with_name(f".{output.name}.parts")


def chunk_count(total: int, chunk_rows: int, generate: bool, feature_set) -> int:
    """How many chunks `total` input rows go in. Memory follows the candidate rows a chunk scores: with
    `generate`, each request becomes up to the sources' k candidates, so a chunk holds that many fewer."""
    per_row = sum(source.k for source in feature_set.build_sources()) if generate else 1
    return max(1, math.ceil(total * per_row / chunk_rows))


def part_path(work: Path, chunk: int) -> Path:
    return work / f"part-{chunk:05d}.parquet"


def chunk_of(chunks: int) -> pl.Expr:
    """The chunk of a row: a hash of its user, so a user's requests land together whatever the order."""
    return pl.col("user_id").hash(seed=0) % chunks


def resume_advice(work: Path) -> str:
    """What to do after a write failed mid-job (the end of its message): the finished chunks stay."""
    return f"run the same command again: it resumes from the chunks already finished (kept in {work})"


def merge_parts(work: Path, chunks: int, output: Path, keys: list[str]) -> int:
    """Concatenate the parts in chunk order into `output` (atomically), remove `work`; the requests written."""
    # The output (top k per request) is far smaller than the input, so the merge fits in memory.
    merged = pl.concat([pl.read_parquet(part_path(work, c)) for c in range(chunks)])
    write_parquet_atomic(merged, output, rerun=f"run the same command again: every chunk is finished (kept in {work}), "
                                               "so it only merges them")
    requests = merged.select(keys).n_unique() if merged.height else 0
    shutil.rmtree(work, ignore_errors=True)
    return requests


class _ChunkScorer:
    """Scores a chunk and keeps its top k per request, in two steps a job can overlap: `features`
    (numpy and polars, mostly one core) then `top` (LightGBM's predict on all cores, and the top k, with
    the feature set's new-item policy if it has one: `recengine.parts.policy`).

    Candidate rows at the job's "now" (just after the last event: the time rows without a timestamp
    get) are all ranked as of one moment, so their features come from a `ServingState` built once
    per job, a user at a time; a test holds those equal to the point-in-time pipeline, which ranks
    every other row.
    """

    def __init__(self, model: RankerModel, feature_set, keys: list[str], context: FeatureContext, generate: bool, k: int):
        self.model, self.feature_set, self.keys, self.context, self.generate, self.k = model, feature_set, keys, context, generate, k
        self.policy = new_items.NewItemPolicy.of(feature_set)  # None: plain top k
        self.now = _now(context)
        self._state = None

    def __call__(self, batch: pl.DataFrame) -> pl.DataFrame:
        return self.top(self.features(self.unique(batch)[0]))

    def unique(self, batch: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """The chunk without repeats, and how many rows that dropped: a request given twice would fill its
        top k with each item twice, a candidate given twice would take two ranks. A user's rows share a
        chunk, so dropping repeats per chunk drops every repeat of the input (the first row is kept)."""
        subset = self.keys if self.generate else [*self.keys, "item_id"]
        unique = batch.unique(subset=subset, keep="first", maintain_order=True)
        return unique, batch.height - unique.height

    def features(self, batch: pl.DataFrame) -> list[tuple[pl.DataFrame, np.ndarray]]:
        """The chunk's rows, in parts, each with its feature matrix in the model's column order."""
        if self.generate:
            rows = self.feature_set.candidate_rows(batch, self.context)
            return [(rows, self.model.matrix(rows))]
        at_now = pl.col("timestamp") == self.now
        now, other = batch.filter(at_now), batch.filter(~at_now)
        parts = []
        if now.height:
            if self._state is None:
                from recengine.running.serving import ServingState

                self._state = ServingState(self.feature_set, self.model.features, self.context)
            now = now.sort("user_id")  # the state reads a user's rows together: sorted, they need no reordering
            parts.append((now, self._state.feature_rows(now["user_id"], now["item_id"])))
        if other.height:
            parts.append((other, self.model.matrix(self.feature_set.given_rows(other, self.keys, self.context))))
        return parts or [(batch, np.empty((0, len(self.model.features))))]  # an empty chunk: an empty part

    def top(self, parts: list[tuple[pl.DataFrame, np.ndarray]]) -> pl.DataFrame:
        scored = [new_items.with_policy_score(rows, matrix, self.model.features, self.policy).with_columns(
                      pl.Series("score", self.model.predict(matrix) if len(matrix) else [], dtype=pl.Float64))
                  for rows, matrix in parts]
        columns = list(dict.fromkeys([*self.keys, "user_id", "timestamp"]))
        ranked = new_items.top(pl.concat(scored, how="diagonal_relaxed"), self.keys, self.k, self.policy, self.context,
                               self.feature_set.exclude_seen)
        return ranked.sort([*self.keys, "rank"]).select(*columns, "item_id", "rank", "score")


def _now(context: FeatureContext) -> datetime:
    """Just after the last event: the time of rows without a timestamp, and a serving state's time."""
    return context.events.select(pl.col("timestamp").max()).collect().item() + timedelta(seconds=1)


def _validated_input(path, generate: bool, columns: dict[str, str], context: FeatureContext) -> tuple[pl.LazyFrame, list[str]]:
    """The input, checked before anything is written: required columns, no nulls, parseable times.
    Without a timestamp column, requests are ranked as of just after the last known event."""
    return validated_rows(path, generate, columns, _now(context), context.events.collect_schema())


def refuse_requests_before_every_event(rows: pl.LazyFrame, context: FeatureContext, source) -> None:
    """Generated candidates come only from events before a request: requests all at or before the first
    event would give an empty output, which must not pass for a result."""
    first = context.events.select(pl.col("timestamp").min()).collect().item()
    latest = rows.select(pl.col("timestamp").max()).collect().item()
    if first is not None and latest is not None and latest <= first:
        raise DataError(
            f"{source}: every request is at or before the first event ({first}; the latest request is at {latest}); "
            "candidates and features use only events before a request, so none of them can get any. Give request "
            "times after the first event, or leave the timestamp column out to rank as of just after the last event.")


def validated_rows(path, generate: bool, columns: dict[str, str], now: datetime, events: pl.Schema) -> tuple[pl.LazyFrame, list[str]]:
    """`_validated_input` given the job's "now" and the events' schema (all a Ray worker needs to know)."""
    rows = load_timed(path, REQUESTS if generate else CANDIDATES, columns, default_time=now)
    rows = align_ids(rows, events, str(path))
    keys = ["request_id"] if "request_id" in rows.collect_schema() else ["user_id", "timestamp"]
    return rows, keys


def local_path(text: str | Path) -> Path:
    """The local job reads local files: a URI gets a message saying what to do instead."""
    if isinstance(text, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text) and not Path(text).exists():
        raise DataError(f"--input {text}: a URI, and the local engine reads local files only. Run with --engine ray "
                        "(Ray Data reads file://, s3://, gs:// and other filesystems), or copy the input to a local path.")
    return Path(text)


def check_output_file(output: str | Path, option: str = "--output") -> None:
    """Refuse, before any work, an output file that cannot be written: a path that is an existing
    folder, or one in a folder where files cannot be created."""
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"{output} is an existing folder, but {option} names the parquet file to write; "
                          f"give a file path such as {output / 'results.parquet'}.")
    check_writable(output.parent, option)


def align_ids(rows: pl.LazyFrame, events: pl.Schema, source: str) -> pl.LazyFrame:
    """`rows`' user_id and item_id as the events' types, so they join: integers become strings, and
    strings become integers when every one is an integer written plainly (else a DataError)."""
    schema = rows.collect_schema()
    for column in ("user_id", "item_id"):
        if column not in schema or column not in events or schema[column] == events[column]:
            continue
        want = events[column]
        if want == pl.String:
            rows = rows.with_columns(pl.col(column).cast(pl.String))
            continue
        cast = pl.col(column).cast(want, strict=False)
        # Lossless only: "007" or "1e3" would become another id than the one written.
        lossy = cast.is_null() | (cast.cast(pl.String) != pl.col(column).cast(pl.String))
        bad = rows.with_row_index("_row").filter(lossy).select("_row", column).head(5).collect()
        if bad.height:
            shown = "; ".join(f"row {row}: {value!r}" for row, value in bad.iter_rows())
            raise DataError(f"{source}: column '{column}' holds ids that are not integers ({shown}), but the events' "
                            f"{column} are integers ({want}), so they would match no event; use the events' ids.")
        rows = rows.with_columns(cast)
    return rows


def _fingerprint(model, input_path, k, chunk_rows, chunks, generate, columns, context,
                 input_digest: str | None = None) -> dict[str, str]:
    """What makes two runs the same job, part by part, each a digest of content (not of sizes or
    times, which an edited file can keep), so a mismatch can say what changed. `input_digest`: the
    input's, when the caller took it already (a URI, read through its filesystem)."""
    arguments = {"k": k, "chunk_rows": chunk_rows, "chunks": chunks, "split": "by-user", "generate": generate,
                 "columns": sorted((columns or {}).items()),
                 # Set before the job only when the model's saved learned states are used (else refit).
                 "learned_until": context.learned_until}
    return {
        "model": model.digest(),
        "input": input_digest or _file_digest(Path(input_path)),
        "events": _frame_digest(context.events),
        "impressions": _frame_digest(context.impressions),
        "items": _frame_digest(context.items),
        "arguments": hashlib.sha256(json.dumps(arguments, default=str).encode()).hexdigest(),
    }


def _file_digest(path: Path) -> str:
    """A digest of a file's bytes, or of a folder's files (names relative to it, and bytes) in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _frame_digest(frame: pl.LazyFrame | None) -> str:
    """A digest of a table's schema and rows in order: one pass of polars row hashes, far cheaper
    than the features the job computes from the same table."""
    if frame is None:
        return "none"
    rows = pl.struct(pl.all()).hash(seed=0)
    positioned = pl.struct(rows.alias("row"), pl.int_range(pl.len(), dtype=pl.UInt64).alias("at")).hash(seed=1)
    # u64 sums wrap around: the result is still a deterministic function of every row and its position.
    summary = frame.select(pl.len().alias("rows"), rows.sum().alias("sum"), positioned.sum().alias("positioned")).collect()
    schema = [(name, str(dtype)) for name, dtype in frame.collect_schema().items()]
    return hashlib.sha256(json.dumps([schema, summary.row(0)]).encode()).hexdigest()


class _Manifest:
    """Which chunks are finished (their input rows, repeats dropped and part file's digest), kept as
    JSON and replaced atomically. Damaged resume state never stops a job for good: a manifest that
    cannot be read, or a finished chunk's part that fails its check, is moved into `damaged/` (said
    once, on stderr) and its chunks are ranked again; a job that finishes removes it with the parts."""

    def __init__(self, folder: Path, fingerprint: dict[str, str]):
        self.folder, self.path = folder, folder / "manifest.json"
        with _writing(folder, folder):
            folder.mkdir(parents=True, exist_ok=True)
            self._lock = _exclusive(folder)
        state = self._read(fingerprint)
        self.fingerprint = fingerprint
        self.rows: dict[str, int] = state.get("rows", {})
        self.dropped: dict[str, int] = state.get("duplicates", {})
        self.digests: dict[str, str] = state.get("parts", {})  # absent from manifests of older recengines
        self._write()

    def done(self, chunk: int, part: Path) -> bool:
        """Whether `chunk` is finished: listed, with its part as it was written. A listed part that is
        missing or fails its check is forgotten (a damaged one set aside), so the chunk is ranked again."""
        key = str(chunk)
        if key not in self.rows:
            return False
        problem = _part_problem(part, self.digests.get(key)) if part.exists() else "missing"
        if problem is None:
            return True
        if problem != "missing":
            target = _set_aside(part, self.folder)
            print(f"recengine: {part} is damaged ({problem}); moved it to {target} and ranking chunk {chunk} again.",
                  file=sys.stderr)
        for table in (self.rows, self.dropped, self.digests):
            table.pop(key, None)
        return False

    def finish(self, chunk: int, rows: int, duplicates: int = 0) -> None:
        self.rows[str(chunk)] = rows
        self.dropped[str(chunk)] = duplicates
        self.digests[str(chunk)] = _file_digest(part_path(self.folder, chunk))
        self._write()

    def duplicates(self) -> int:
        """Repeated input rows dropped by every finished chunk, this run's and earlier runs'."""
        return sum(self.dropped.values())

    def _read(self, fingerprint: dict[str, str]) -> dict[str, Any]:
        """The saved state; {} for none, or for one that cannot be trusted (set aside, said on stderr)."""
        if not self.path.exists():
            return {}
        try:
            state = json.loads(self.path.read_bytes())
        except ValueError as exc:  # (invalid JSON or UTF-8: a torn or overwritten file)
            return self._damaged(f"not valid JSON: {exc}")
        if not isinstance(state, dict) or not isinstance(state.get("fingerprint", {}), dict):
            return self._damaged("not a manifest written by recengine")
        if state.get("fingerprint") != fingerprint:
            raise DataError(_mismatch(self.folder, state.get("fingerprint"), fingerprint))
        problem = _state_problem(state)
        return self._damaged(problem) if problem else state

    def _damaged(self, problem: str) -> dict[str, Any]:
        target = _set_aside(self.path, self.folder)
        print(f"recengine: {self.path} is damaged ({problem}); moved it to {target}. Which chunks were finished is "
              "unknown, so every chunk is ranked again.", file=sys.stderr)
        return {}

    def _write(self) -> None:
        temp = self.path.with_suffix(f".{os.getpid()}.tmp")
        with _writing(self.path, self.folder):
            try:
                temp.write_text(json.dumps({"fingerprint": self.fingerprint, "rows": self.rows,
                                            "duplicates": self.dropped, "parts": self.digests,
                                            "updated": datetime.now().isoformat(timespec="seconds")}))
                os.replace(temp, self.path)
            finally:
                temp.unlink(missing_ok=True)


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's tables of finished chunks (chunk number -> value), if anything."""
    for table, kind in (("rows", int), ("duplicates", int), ("parts", str)):
        entries = state.get(table, {})
        if not isinstance(entries, dict):
            return f"its '{table}' is {type(entries).__name__}, not a table of chunks"
        for chunk, value in entries.items():
            if not chunk.isdigit() or type(value) is not kind or (kind is int and value < 0):
                return f"its '{table}' holds {chunk!r}: {value!r}"
    return None


def _part_problem(part: Path, digest: str | None) -> str | None:
    """Why a finished chunk's part cannot be merged, if it cannot: its bytes are not those written
    (their digest, kept in the manifest), or, for a manifest that kept none, its parquet footer and
    row count cannot be read."""
    if digest is not None:
        found = _file_digest(part)
        return None if found == digest else f"its sha256 is {found[:12]}..., not the {digest[:12]}... it was written with"
    try:
        pl.scan_parquet(part).select(pl.len()).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        return f"not a readable parquet file: {str(exc).splitlines()[0]}"
    return None


def _set_aside(path: Path, work: Path) -> Path:
    """Move a damaged file of the job into `work`/damaged/ under a free name: kept for a look while
    the job is unfinished, and out of its way."""
    folder = work / "damaged"
    target, copies = folder / path.name, 0
    while target.exists():
        copies += 1
        target = folder / f"{path.name}.{copies}"
    with _writing(target, work):
        folder.mkdir(exist_ok=True)
        os.replace(path, target)
    return target


@contextmanager
def _writing(path: Path, work: Path) -> Iterator[None]:
    """The job's own small files (manifest, lock, folders): a write the system refuses is a RecengineError
    saying what to do, as `write_parquet_atomic` says it for the parts."""
    try:
        yield
    except OSError as exc:
        raise RecengineError(f"cannot write {path} ({exc.strerror or exc}); free space there (or make it writable), "
                             f"then {resume_advice(work)}.") from None


def _exclusive(folder: Path):
    """An exclusive lock on the job's folder, held while the job runs (the kernel drops it when the
    process ends, killed or not): two jobs writing one output would mix their parts."""
    import fcntl

    handle = open(folder / "lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataError(f"another rank job is writing this output right now (its parts are in {folder}); wait for it "
                        "to finish, or give this job another --output.") from None
    return handle


def _mismatch(folder: Path, old: Any, new: dict[str, str]) -> str:
    """Why an unfinished job's parts cannot be reused: which of its parts differ from this run's."""
    old = old if isinstance(old, dict) else {}
    changed = ", ".join(name for name in new if old.get(name) != new[name])
    why = f"whose {changed} differ from this run's" if old else "started by an older recengine"
    return (f"{folder} holds the finished chunks of an unfinished job {why}, so they cannot be merged with this "
            "run's; run the earlier command again with the same model, input, events, items and arguments to "
            f"finish it, or delete {folder} to start this job over.")
