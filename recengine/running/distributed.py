"""The batch job on Ray: `recengine rank --engine ray` and `recengine embed --engine ray`.

The same job as `recengine.running.batch.rank_file`, spread over a Ray cluster (or a local Ray). Everything
that decides the answer is the local job's own code: the input is checked on the driver exactly as
the local job checks it, the rows are split into the same chunks (a hash of the user), each chunk is
scored by the same `_ChunkScorer` and written as the same part file, recorded in the same manifest,
and the parts are merged by the same function. So the output is the local job's, byte for byte, and
a job started by one engine can be finished by the other.

What Ray adds: Ray Data reads the parquet input (a file or a folder) in parallel, normalises each
block in a task (the local job's own reader, run on the block), groups the rows by chunk (a shuffle),
and an actor pool scores the chunks. Each actor receives the scorer (model, feature set, context and
the serving state the driver built for its dry run) once, through the object store, and writes its
chunks' parts into the job's work folder, which must therefore be on storage every node sees. The
driver records each finished chunk in the manifest as its result streams back: a killed actor is
restarted and its chunk retried by Ray; a killed driver, run again with the same command, skips the
chunks the manifest lists.

Ray is an optional dependency (`pip install "recengine[ray]"`): nothing here is imported by the
local job.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import resource
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from recengine.errors import ConfigError, DataError, RecengineError
from recengine.learning.model import RankerModel
from recengine.parts.context import FeatureContext
from recengine.running.batch import (
    JobReport,
    _ChunkScorer,
    _fingerprint,
    _Manifest,
    _now,
    _validated_input,
    check_output_file,
    chunk_count,
    chunk_of,
    merge_parts,
    part_path,
    refuse_requests_before_every_event,
    resume_advice,
    validated_rows,
    work_folder,
)

# Explicit, small: Ray's default takes 30% of the machine's memory for the object store, which on a
# shared box starves everything else. Holds the shuffled input (about 40 bytes a row) with room.
DEFAULT_OBJECT_STORE = 2 << 30


@dataclass
class RayJobReport(JobReport):
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> chunks its actors scored
    actors: int = 0
    actor_peak_mib: float = 0.0  # the largest peak resident memory of a scoring actor
    first_chunk_s: float = 0.0  # from the job's start to its first chunk recorded: the start-up


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without its data extra lacks it)
    except ImportError as exc:
        raise ConfigError(f"--engine ray needs Ray, which is not installed ({exc}); install the extra with "
                          "pip install \"recengine[ray]\", or run with --engine local.") from exc
    return ray


# How long the driver waits for the cluster at --address to answer before saying so: Ray's own
# connection waits for ever when nothing answers there (measured: over 200 s on a port that accepts
# and never speaks). An environment variable, as Ray's own settings are.
CONNECT_TIMEOUT_ENV = "RECENGINE_RAY_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 30.0
_ADDRESS = re.compile(r"^(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):([0-9]{1,5})$")
# What a client sends first on an HTTP/2 connection (the preface and an empty SETTINGS frame), which a
# Ray head's servers (gRPC) answer with a SETTINGS frame of their own.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def connect(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None,
            timeout: float | None = None) -> None:
    """Join the Ray cluster at `address` ("auto" finds one started with `ray start` on this machine),
    or start a local one when no address is given. Nothing happens when Ray is already initialised.
    An address nothing answers at is refused within `timeout` seconds (default: the environment's
    RECENGINE_RAY_CONNECT_TIMEOUT, else 30), a malformed one at once: each a ConfigError naming it."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address:
        _check_answers(address, connect_timeout() if timeout is None else timeout)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory or DEFAULT_OBJECT_STORE,
                     include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise ConfigError(f"cannot reach a Ray cluster at --address {address} ({exc}); start one there with "
                          "`ray start --head`, check the address it printed, or leave --address out to run "
                          "on a local Ray.") from exc


def connect_timeout() -> float:
    """The seconds to wait for the cluster at --address to answer: RECENGINE_RAY_CONNECT_TIMEOUT, else 30."""
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV}={text!r}: give the seconds to wait for a Ray cluster to answer, "
                          f"a number above 0 (or unset it for {DEFAULT_CONNECT_TIMEOUT:g}).")
    return seconds


def check_address(address: str | None) -> tuple[str, int] | None:
    """The host and port that `address` names (None for auto, local or no address), or a ConfigError
    saying what an address looks like: Ray's own check is a traceback."""
    if not address or address in ("auto", "local"):
        return None
    match = _ADDRESS.match(address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"--address {address!r} is not a Ray cluster's address; give the head's host:port as "
                          "`ray start --head` printed it (such as 10.0.0.5:6379), ray://HOST:10001 for Ray Client, "
                          "or auto for a cluster started on this machine; or leave --address out to run on a local Ray.")
    return match.group(1).strip("[]"), int(match.group(2))


def _check_answers(address: str, timeout: float) -> None:
    """Refuse, within `timeout` seconds, an address where no Ray head answers: nothing listening, a
    port that accepts and never speaks, or a server that is not a Ray head's."""
    target = check_address(address) or _auto_address(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(target, timeout=timeout) as connection:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS handshake comes first there: that Ray reports its own errors
            connection.settimeout(max(0.001, deadline - time.monotonic()))
            connection.sendall(_HTTP2_HELLO)
            answer = b""
            while len(answer) < 4 and (more := connection.recv(9)):
                answer += more
    except TimeoutError:
        raise ConfigError(f"no Ray cluster answered at --address {address} within {timeout:g} s; check the address "
                          "(`ray status` on the head prints it) and that nothing blocks the port, set "
                          f"{CONNECT_TIMEOUT_ENV} to wait longer on a slow network, or leave --address out to run "
                          "on a local Ray.") from None
    except OSError as exc:
        raise ConfigError(f"cannot reach a Ray cluster at --address {address} ({exc.strerror or exc}); start one "
                          "there with `ray start --head`, check the address it printed, or leave --address out to "
                          "run on a local Ray.") from None
    if len(answer) < 4 or answer[3] != 4:  # the frame's type: 4 is SETTINGS
        raise ConfigError(f"something answers at --address {address}, but not as a Ray head does (it does not speak "
                          "gRPC); check the port: `ray start --head` prints the address to give (port 6379 unless "
                          "--port was set), and the dashboard's port (8265) is not it.")


def _auto_address(address: str) -> tuple[str, int] | None:
    """The host and port "auto" stands for (a cluster started on this machine, or RAY_ADDRESS), when
    Ray can say; None for "local", or when this Ray cannot say (then ray.init reports it)."""
    if address != "auto":
        return None
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        raise ConfigError("--address auto: no Ray cluster is running on this machine; start one with "
                          "`ray start --head`, give the address of another, or leave --address out to run on a "
                          "local Ray.") from None
    except Exception:  # noqa: BLE001 (a private function of Ray's, which another version may lack or change)
        return None
    host, _, port = (found or "").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def rank_on_ray(
    model: RankerModel,
    input_path: str | Path,
    output: str | Path,
    context: FeatureContext,
    k: int = 10,
    chunk_rows: int = 1_000_000,
    generate: bool = False,
    columns: dict[str, str] | None = None,
    progress: bool = True,
    actors: int | None = None,
    cpus_per_actor: float = 1,
    threads: int | None = None,
    share_state: bool = True,
    address: str | None = None,
) -> RayJobReport:
    """`recengine.running.batch.rank_file` on the Ray cluster `connect` joined (a local one if none): same
    arguments, same output. `actors` scorers (default: the cluster's CPUs less one, so the tasks that
    read and shuffle keep a CPU) of `cpus_per_actor` CPUs each, LightGBM using `threads` threads in
    each (default: its CPUs). With `share_state`, the serving state the driver built is shipped to
    the actors through the object store; otherwise each actor builds its own. `address`: the cluster
    to join (see `connect`), after the input is checked."""
    ray = _ray()
    check_address(address)  # a malformed one before any work
    started = time.perf_counter()
    output = Path(output)
    check_output_file(output)
    model.check_plugins()
    input_path = input_uri(input_path) or Path(input_path)
    if isinstance(input_path, str):
        checked = _checked_uri(input_path, generate, columns or {}, context)
    else:
        checked = _checked_input(input_path, generate, columns or {}, context)
    total, first, empty, keys, digest = checked
    scorer = _ChunkScorer(model, model.feature_set(), keys, context, generate, k)
    scorer(first)  # the local job's dry run: fails before any file is made
    # After the checks, so bad input never waits for a Ray to start; before the parts folder is made,
    # so a cluster that cannot be reached leaves nothing behind.
    connect(address)
    chunks = chunk_count(total, chunk_rows, generate, model.feature_set())
    work = work_folder(output)
    # The local job's fingerprint (so either engine finishes the other's job); a URI's digest was taken
    # through its filesystem while it was checked.
    manifest = _Manifest(work, _fingerprint(model, input_path, k, chunk_rows, chunks, generate, columns, context, digest))
    todo = [c for c in range(chunks) if not manifest.done(c, part_path(work, c))]
    skipped, nodes, peak, first = chunks - len(todo), Counter(), 0.0, 0.0
    pool = actors or max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    if todo:
        if not share_state:
            scorer._state = None
        dataset = _scored(ray, input_path, scorer, todo, chunks, columns or {}, work, pool, cpus_per_actor,
                          threads or max(1, int(cpus_per_actor)))
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=sum(manifest.rows.values()), desc="ranking on ray", unit="row",
                   unit_scale=True, disable=not progress)
        try:
            for result in dataset.iter_rows():
                first = first or time.perf_counter() - started
                manifest.finish(int(result["chunk"]), int(result["rows"]), int(result["duplicates"]))
                nodes[result["node"]] += 1
                peak = max(peak, float(result["peak_mib"]))
                bar.update(int(result["rows"]))
        except Exception as exc:  # a worker's RecengineError reaches here wrapped in Ray's exceptions
            raise _user_error(exc) or exc
        finally:
            bar.close()  # however the job ends: an error's message starts on a line of its own
        # A chunk no user hashed to has no rows, so no group came back for it: the local job's part
        # for an empty chunk is the scorer's output for no rows.
        for chunk in todo:
            if not manifest.done(chunk, part_path(work, chunk)):
                from recengine.core.data import write_parquet_atomic

                write_parquet_atomic(scorer(empty), part_path(work, chunk), rerun=resume_advice(work))
                manifest.finish(chunk, 0)
    requests = merge_parts(work, chunks, output, keys)
    return RayJobReport(total, requests, chunks, skipped, time.perf_counter() - started, output, manifest.duplicates(),
                        nodes=dict(sorted(nodes.items())), actors=pool, actor_peak_mib=peak, first_chunk_s=first)


def _checked_input(path: Path, generate: bool, columns: dict[str, str], context: FeatureContext):
    """The local job's checks, on the driver, before anything is written. A folder is checked file by
    file (Ray reads it as one table); its rows are counted and dry-run as one table. Returns the rows'
    count, the first row, no rows (the frame of an empty chunk), the keys, and no digest (the local
    job's fingerprint takes it)."""
    if not path.is_dir():
        _refuse_other_than_parquet(str(path))
        rows, keys = _validated_input(path, generate, columns, context)
    else:
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise DataError(f"{path}: the folder holds no .parquet files; --engine ray reads a parquet file or a "
                            "folder of them. Convert the input to parquet or give the file's path.")
        checked = [_validated_input(file, generate, columns, context) for file in files]
        refuse_mixed_schemas(path, {str(file.relative_to(path)): _parquet_schema(file) for file in files})
        keys = checked[0][1]
        rows = pl.concat([rows for rows, _ in checked], how="diagonal_relaxed")  # by name: Ray's order may differ
    if generate:
        refuse_requests_before_every_event(rows, context, path)
    return rows.select(pl.len()).collect().item(), rows.head(1).collect(), rows.head(0).collect(), keys, None


def input_uri(path: str | Path) -> str | None:
    """`path` as a URI of a filesystem pyarrow reads (file://, s3://, gs://, hdfs://...), or None for a
    local path. A URI that went through `Path` lost a slash ("s3:/bucket/key"): it is put back."""
    text = str(path)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/(/?)(.*)$", text)
    if not match or (isinstance(path, Path) and path.exists()):
        return None
    scheme, slashes, rest = match.groups()
    if slashes:
        return text
    return f"file:///{rest}" if scheme.lower() == "file" else f"{scheme}://{rest}"


def _checked_uri(uri: str, generate: bool, columns: dict[str, str], context: FeatureContext):
    """`_checked_input` for a URI: each file is streamed once through its filesystem into the digest
    (the local job's: names relative to a folder, and bytes, in name order) and, a parquet file, into
    a temporary local copy that the local job's reader checks; errors name the URI, not the copy."""
    import pyarrow.fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
    except (OSError, ValueError) as exc:
        raise DataError(f"--input {uri}: cannot be read ({exc}); check the URI and the credentials, or copy the "
                        "input to a local path.") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"--input {uri}: no such file or folder. Check the URI.")
    folder = info.type == pafs.FileType.Directory
    if folder:
        found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        names = sorted((f.path[len(root.rstrip("/")) + 1:] for f in found if f.type == pafs.FileType.File),
                       key=lambda name: name.split("/"))  # the order of the local job's sorted Paths
    else:
        _refuse_other_than_parquet(uri)
        names = [""]
    if not any(name.endswith(".parquet") for name in names) and folder:
        raise DataError(f"{uri}: the folder holds no .parquet files; --engine ray reads a parquet file or a folder "
                        "of them. Convert the input to parquet or give the file's URI.")
    digest, total, first, empty, keys, schemas = hashlib.sha256(), 0, None, None, None, {}
    with tempfile.TemporaryDirectory(prefix="recengine-input-") as temp:
        for name in names:
            source = f"{root.rstrip('/')}/{name}" if folder else root
            if folder:
                digest.update(name.encode() + b"\0")
            if folder and not name.endswith(".parquet"):
                _stream(filesystem, source, digest, None)
                continue
            local = Path(temp) / (Path(name).name if folder else Path(root).name)
            _stream(filesystem, source, digest, local)
            try:
                rows, found_keys = _validated_input(local, generate, columns, context)
                total += rows.select(pl.len()).collect().item()
                if first is None:
                    first, empty, keys = rows.head(1).collect(), rows.head(0).collect(), found_keys
            except DataError as exc:
                where = f"{uri.rstrip('/')}/{name}" if folder else uri
                raise DataError(str(exc).replace(str(local), where)) from None
            schemas[name] = _parquet_schema(local)
            local.unlink()
    refuse_mixed_schemas(uri, schemas)
    return total, first, empty, keys, digest.hexdigest()


def _refuse_other_than_parquet(source: str) -> None:
    """Ray Data reads the input as parquet files named *.parquet: another file would fail mid-job."""
    if not source.endswith(".parquet"):
        raise DataError(f"{source}: --engine ray reads parquet input only (a .parquet file, or a folder of them); "
                        "convert it to parquet, or run with --engine local, which reads CSV and NDJSON too.")


def refuse_mixed_schemas(folder: Path | str, schemas: dict[str, Any]) -> None:
    """Refuse a folder whose parquet files (name: pyarrow schema) Ray cannot read as one table: files
    with other columns (Ray fills the missing ones with nulls, which the job refuses mid-way) or with
    types pyarrow cannot unify (a string user_id beside an integer one: Ray fails mid-way). Checked on
    the driver, so the job stops before anything is written, naming the files that differ."""
    import pyarrow as pa

    if len(schemas) < 2:
        return
    names = list(schemas)
    reference = set(schemas[names[0]].names)
    differ = [f"{name} has the columns {sorted(schemas[name].names)} but {names[0]} has {sorted(reference)}"
              for name in names[1:] if set(schemas[name].names) != reference]
    for column in [] if differ else schemas[names[0]].names:
        files_of: dict[Any, list[str]] = {}
        for name in names:
            files_of.setdefault(schemas[name].field(column).type, []).append(name)
        try:  # what Ray does with the blocks of a folder's files
            pa.unify_schemas([pa.schema([pa.field(column, kind)]) for kind in files_of], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            differ.append(f"column '{column}' is " + ", but ".join(
                f"{kind} in {_some(files)}" for kind, files in files_of.items()))
    if differ:
        raise DataError(f"{folder}: its parquet files differ in their columns or types, and Ray reads them as one "
                        f"table: {'; '.join(differ[:3])}{f' (and {len(differ) - 3} more)' if len(differ) > 3 else ''}. "
                        "Write every file with the same columns of the same types, or rank the files one at a time.")


def _some(names: list[str], shown: int = 3) -> str:
    """A few of `names`, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _parquet_schema(path: Path):
    """A parquet file's schema (its footer only): what Ray reads the file as."""
    import pyarrow.parquet as pq

    return pq.read_schema(path)


def _stream(filesystem, source: str, digest, copy: Path | None) -> None:
    """A file's bytes into `digest`, and into the local file `copy` when one is given."""
    with filesystem.open_input_stream(source) as stream, open(copy or os.devnull, "wb") as out:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
            out.write(block)


def _scored(ray, input_path: Path | str, scorer: _ChunkScorer, todo: list[int], chunks: int, columns: dict[str, str],
            work: Path, actors: int, cpus_per_actor: float, threads: int):
    """The Ray Data pipeline: read, normalise and assign chunks (tasks), group by chunk (a shuffle),
    score each chunk and write its part (an actor pool). Yields one row per chunk scored."""
    from ray.data import ActorPoolStrategy
    from ray.data.context import ShuffleStrategy

    normalise = dict(generate=scorer.generate, columns=columns, now=_now(scorer.context),
                     events=scorer.context.events.collect_schema(), chunks=chunks, todo=todo)
    dataset = ray.data.read_parquet(str(input_path), file_extensions=["parquet"])
    # The sort-based shuffle runs in tasks on Ray's pooled workers; Ray Data's default (hash) shuffle
    # starts aggregator actors for every job, seconds each on a small machine (measured: a 15-chunk
    # job on a local Ray of 2 CPUs, 10 s with it, 5 s without). Set on this dataset's context only.
    dataset.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # That shuffle keeps the number of blocks: one a chunk to do, so that each chunk's result streams
    # back (and is recorded in the manifest) when it is scored, not when the last one is.
    dataset = dataset.repartition(len(todo))
    dataset = dataset.map_batches(_normalised, batch_format="pyarrow", batch_size=None, fn_kwargs=normalise)
    # Nested in a list, so that Ray hands the actor the reference and the actor fetches the scorer
    # itself, once: one copy per node in the object store, not one pickle per actor.
    shared = [ray.put(scorer)]
    return dataset.groupby("_chunk").map_groups(
        _ScoreChunks, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors),
        fn_constructor_args=(shared, str(work)), num_cpus=cpus_per_actor,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
        scheduling_strategy="SPREAD",
    )


def _normalised(batch, generate: bool, columns: dict[str, str], now, events: pl.Schema, chunks: int, todo: list[int]):
    """One block of raw input as the local job reads it (its own reader, on the block written to a
    temporary parquet file), with its chunk; rows of finished chunks dropped."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="recengine-block-") as folder:
        path = Path(folder) / "block.parquet"
        pq.write_table(batch, path, compression="none")
        rows, _ = validated_rows(path, generate, columns, now, events)
        rows = rows.with_columns(chunk_of(chunks).cast(pl.Int64).alias("_chunk")).filter(pl.col("_chunk").is_in(todo))
        return rows.collect().to_arrow()


class _ScoreChunks:
    """An actor of the pool: holds the scorer, scores a chunk's rows and writes its part atomically."""

    def __init__(self, shared: list, work: str):
        import ray

        self.scorer: _ChunkScorer = ray.get(shared[0])
        self.work = Path(work)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, group):
        import pyarrow as pa

        from recengine.core.data import write_parquet_atomic

        batch = pl.from_arrow(group)
        chunk = int(batch["_chunk"][0])
        unique, dropped = self.scorer.unique(batch.drop("_chunk"))
        write_parquet_atomic(self.scorer(unique), part_path(self.work, chunk), rerun=resume_advice(self.work))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return pa.table({"chunk": [chunk], "rows": [batch.height], "duplicates": [dropped], "node": [self.node],
                         "peak_mib": [peak]})


def _user_error(exc: BaseException) -> RecengineError | None:
    """The RecengineError a worker raised, out of the exceptions Ray wraps it in."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RecengineError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def embed_on_ray(
    texts: Sequence[str],
    encoder: str,
    params: dict[str, Any] | None,
    cache,
    batch_rows: int = 1024,
    actors: int | None = None,
    progress: bool = True,
    encoder_id: str | None = None,
):
    """Encode, on the cluster, the texts of `texts` that `cache` lacks, and add them to it. Returns
    (encoder id, CacheStats); `encoder_id` spares building the encoder here to learn it. Actors take a GPU each when the cluster has GPUs (as many actors as
    GPUs), else a CPU each (the CPUs less one). The driver stores each batch as it streams back: a new
    shard file, written atomically, and a compaction removes only the shards it merged, so a
    concurrent writer's work stays and an interrupted run keeps what it finished."""
    import pyarrow as pa
    from ray.data import ActorPoolStrategy
    from tqdm.auto import tqdm

    from recengine.parts.encoders import CacheStats, cache_keys, create_encoder, unique_texts

    ray = _ray()
    connect()
    started = time.perf_counter()
    built = create_encoder(encoder, params)  # (models load on first encode: here only its id and keys are read)
    encoder_id = encoder_id or built.id
    unique, _ = unique_texts(texts)
    keys = cache_keys(built, unique)  # the encoder's own keys where it has them (an image's path, size, mtime)
    _, found = cache.lookup(encoder_id, keys)
    missing = np.flatnonzero(~found)
    stats = CacheStats(hits=int(found.sum()), misses=int(len(missing)))
    if len(missing):
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        pool = actors or gpus or max(1, int(resources.get("CPU", 2)) - 1)
        table = pa.table({"key": pa.array(keys[missing].tolist(), pa.binary(16)),
                          "text": pa.array([unique[i] for i in missing], pa.string())})
        dataset = ray.data.from_arrow(table).map_batches(
            _EncodeTexts, batch_size=batch_rows, batch_format="pyarrow", compute=ActorPoolStrategy(size=pool),
            fn_constructor_args=(encoder, params or {}, encoder_id), num_gpus=1 if gpus else 0, num_cpus=1)
        bar = tqdm(total=len(missing), desc=f"encoding with {encoder_id} on ray", unit="text", disable=not progress)
        try:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                found_keys = np.array(batch["key"].to_pylist(), dtype="S16")
                dim = int(batch["dim"][0].as_py())
                vectors = np.frombuffer(b"".join(batch["vector"].to_pylist()), dtype=np.float32).reshape(-1, dim)
                finite = np.isfinite(vectors).all(axis=1)  # a NaN row: no embedding for that value, never cached
                stats.nulls += int((~finite).sum())
                if finite.any():
                    cache.store(encoder_id, found_keys[finite], vectors[finite])
                bar.update(len(found_keys))
        except Exception as exc:
            raise _user_error(exc) or exc
        bar.close()
    stats.seconds = time.perf_counter() - started
    return encoder_id, stats


class _EncodeTexts:
    """An actor of the embedding pool: loads the encoder once (on its GPU when it has one)."""

    def __init__(self, name: str, params: dict[str, Any], encoder_id: str):
        from recengine.parts.encoders import create_encoder

        self.encoder = create_encoder(name, params)
        if self.encoder.id != encoder_id:  # another plugin version on this node would fill the cache wrongly
            raise ConfigError(f"encoder '{name}' is {self.encoder.id} on a Ray node but {encoder_id} on the driver; "
                              "install the same recengine plugins on every node.")

    def __call__(self, batch):
        import pyarrow as pa

        vectors = np.ascontiguousarray(self.encoder.encode(batch["text"].to_pylist()), dtype=np.float32)
        return pa.table({"key": batch["key"], "vector": pa.array([row.tobytes() for row in vectors], pa.binary()),
                         "dim": pa.array([vectors.shape[1]] * len(vectors), pa.int32())})


def ray_chunks(address: str | None = None, cpus_per_task: float = 1):
    """A chunk runner for `recengine.learning.training.train` (`recengine train --engine ray`): actors
    of `cpus_per_task` CPUs each (as many as the cluster's CPUs hold, at most one per chunk) build the
    chunks of training and validation requests, each its candidates, labels, sampled negatives (training) and features, with
    the local job's own code, and write its part. The events, the feature set and the context (learned
    states included) go to the object store once and each actor keeps them, with the as-of state its
    chunks build: each actor takes one consecutive run of the chunks, which are in time order, so
    that state moves forward as in the local job instead of restarting per chunk. The parts are the
    local ones, so the model is too. The part folder must be on storage every node sees (the driver's
    temporary folder: a local Ray, or a cluster on one machine; set TMPDIR to a shared mount otherwise)."""
    ray = _ray()
    check_address(address)

    def run(build, jobs, shared):
        connect(address)
        builder = ray.remote(num_cpus=cpus_per_task, max_restarts=2, max_task_retries=2)(_ChunkBuilder)
        workers = max(1, min(len(jobs), int(ray.cluster_resources().get("CPU", 1) // cpus_per_task)))
        shared_ref = ray.put(shared)
        actors = [builder.remote(build, shared_ref) for _ in range(workers)]
        per = -(-len(jobs) // workers)  # consecutive runs of chunks, one per actor; an actor runs its calls in order
        pending = [actors[number // per].build.remote(chunk) for number, chunk in enumerate(jobs)]
        try:
            while pending:  # counted as they finish, whatever the order
                done, pending = ray.wait(pending, num_returns=1)
                count, node = ray.get(done[0])
                run.nodes[node] += 1
                yield count
        except Exception as exc:  # a task's RecengineError reaches here wrapped in Ray's exceptions
            for ref in pending:
                ray.cancel(ref)
            raise _user_error(exc) or exc
        finally:
            for actor in actors:
                ray.kill(actor)

    run.nodes = Counter()  # Ray node id -> chunks built there
    return run


class _ChunkBuilder:
    """A Ray actor that builds training and validation chunks with one copy of the shared events and context."""

    def __init__(self, build, shared):
        from recengine.core.memory import return_freed_memory

        return_freed_memory()  # a long-lived worker holds chunk after chunk, as `train` does
        self.build_part, self.shared = build, shared

    def build(self, chunk) -> tuple[int, str]:
        """`build_part` for one chunk, with the node it ran on."""
        import ray

        return self.build_part(chunk, self.shared), ray.get_runtime_context().get_node_id()
