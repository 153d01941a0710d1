"""The data contract: events, items and users as polars frames, loaded and validated.

- events: `user_id`, `item_id`, `timestamp`; optional `event` (type), `value` (rating, weight),
  `request_id` (a logged impression list) and `label` (whether the shown item was clicked).
- items: `item_id` plus any text, categorical and numeric fields.
- users: `user_id` plus any fields.

Files are parquet, CSV/TSV or NDJSON, scanned lazily. A column mapping renames source columns
(`{"userId": "user_id"}`) without editing files. Timestamps may be epoch seconds, epoch
milliseconds or ISO-8601 strings; they become `Datetime("ms")` in UTC. Ids are kept as integers
or strings. Every violation raises a `DataError` naming the file, the column and offending values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Mapping

import polars as pl

from recengine.errors import DataError

TIMESTAMP = pl.Datetime("ms")
# Epoch values above this are milliseconds: as seconds they would lie beyond the year 5000.
_EPOCH_MS_THRESHOLD = 100_000_000_000
_EXAMPLES = 5


@dataclass(frozen=True)
class TableSpec:
    name: str
    required: tuple[str, ...]
    unique_key: str | None = None


EVENTS = TableSpec("events", ("user_id", "item_id", "timestamp"))
ITEMS = TableSpec("items", ("item_id",), unique_key="item_id")
USERS = TableSpec("users", ("user_id",), unique_key="user_id")
REQUESTS = TableSpec("requests", ("user_id", "timestamp"))
CANDIDATES = TableSpec("candidates", ("user_id", "item_id", "timestamp"))


def parse_mapping(text: str | None) -> dict[str, str]:
    """Parse `src=dst,src2=dst2` (as given on the command line) into a mapping."""
    if not text:
        return {}
    mapping = {}
    for pair in text.split(","):
        source, sep, target = pair.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise DataError(
                f"column mapping entry '{pair}' is not of the form source=target "
                "(for example --columns userId=user_id,movieId=item_id)."
            )
        mapping[source.strip()] = target.strip()
    return mapping


def scan(path: str | Path) -> pl.LazyFrame:
    """Lazily scan a parquet, CSV/TSV or NDJSON file, chosen by its suffix."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file. Check the path.")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pl.scan_parquet(path)
    if suffix in (".csv", ".tsv", ".txt"):
        return pl.scan_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema_length=10_000)
    if suffix in (".ndjson", ".jsonl", ".json"):
        return pl.scan_ndjson(path, infer_schema_length=10_000)
    raise DataError(f"{path}: unsupported file type '{suffix}'; expected .parquet, .csv, .tsv or .ndjson.")


def _schema(lf: pl.LazyFrame, source: str) -> pl.Schema:
    try:
        return lf.collect_schema()
    except Exception as exc:  # polars raises several types for unreadable files
        raise DataError(f"{source}: cannot be read ({type(exc).__name__}: {exc}).") from exc


def _rename(lf: pl.LazyFrame, mapping: Mapping[str, str], source: str) -> pl.LazyFrame:
    if not mapping:
        return lf
    present = _schema(lf, source).names()
    missing = [col for col in mapping if col not in present]
    if missing:
        raise DataError(
            f"{source}: the column mapping names {missing}, which the file does not have; "
            f"its columns are {present}."
        )
    return lf.rename(dict(mapping))


def _require_columns(schema: pl.Schema, spec: TableSpec, source: str) -> None:
    missing = [col for col in spec.required if col not in schema]
    if missing:
        raise DataError(
            f"{source}: missing required column(s) {missing} for the {spec.name} table; the file has "
            f"{schema.names()}. Rename them in the file or pass a column mapping, e.g. "
            f"--columns userId=user_id,movieId=item_id."
        )


def _check_id_type(schema: pl.Schema, column: str, source: str) -> None:
    dtype = schema[column]
    if not (dtype.is_integer() or dtype in (pl.String, pl.Categorical)):
        raise DataError(
            f"{source}: column '{column}' has type {dtype}; ids must be integers or strings. "
            "Cast the column in the file (floats such as 1.0 are not accepted as ids)."
        )


def _normalize_ids(lf: pl.LazyFrame, schema: pl.Schema, columns: tuple[str, ...]) -> pl.LazyFrame:
    casts = []
    for column in columns:
        dtype = schema[column]
        casts.append(pl.col(column).cast(pl.Int64 if dtype.is_integer() else pl.String))
    return lf.with_columns(casts)


def _timestamp_expr(dtype: pl.DataType, unit: str, source: str) -> pl.Expr:
    raw = pl.col("timestamp")
    if dtype == pl.String:
        return _parse_iso(raw)
    if isinstance(dtype, pl.Datetime):
        converted = raw.dt.convert_time_zone("UTC").dt.replace_time_zone(None) if dtype.time_zone else raw
        return converted.cast(TIMESTAMP)
    if dtype == pl.Date:
        return raw.cast(TIMESTAMP)
    if dtype.is_integer():
        return pl.from_epoch(raw, time_unit="ms" if unit == "ms" else "s").cast(TIMESTAMP)
    raise DataError(
        f"{source}: column 'timestamp' has type {dtype}; expected epoch seconds or milliseconds "
        "(integers), ISO-8601 strings, or a datetime."
    )


_ISO_WITH_OFFSET = ("%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M%:z")
_ISO_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def _parse_iso(raw: pl.Expr) -> pl.Expr:
    # One column may mix forms ("...Z", "...+02:00", "YYYY-MM-DD hh:mm:ss"); polars would infer a
    # single format from the first value, so try each form and keep the first that parses.
    text = raw.str.strip_chars().str.replace(r"^(\d{4}-\d{2}-\d{2})[ T]", "${1}T").str.replace(r"Z$", "+00:00")
    parsed = [text.str.to_datetime(f, strict=False, time_zone="UTC", time_unit="ms") for f in _ISO_WITH_OFFSET]
    parsed += [text.str.to_datetime(f, strict=False, time_unit="ms").dt.replace_time_zone("UTC") for f in _ISO_NAIVE]
    return pl.coalesce(parsed).dt.replace_time_zone(None).cast(TIMESTAMP)


def _epoch_unit(lf: pl.LazyFrame, dtype: pl.DataType, unit: str) -> str:
    if unit != "auto" or not dtype.is_integer():
        return unit
    largest = lf.select(pl.col("timestamp").abs().max()).collect().item()
    return "ms" if largest is not None and largest > _EPOCH_MS_THRESHOLD else "s"


def _examples(lf: pl.LazyFrame, condition: pl.Expr, column: str) -> list:
    values = lf.with_row_index("_row").filter(condition).select("_row", column).head(_EXAMPLES).collect()
    return [f"row {row}: {value!r}" for row, value in values.iter_rows()]


def _check_not_empty(lf: pl.LazyFrame, spec: TableSpec, source: str) -> int:
    rows = lf.select(pl.len()).collect().item()
    if rows == 0:
        raise DataError(f"{source}: the {spec.name} table is empty; it needs at least one row.")
    return rows


def _check_nulls(lf: pl.LazyFrame, columns: tuple[str, ...], source: str) -> None:
    counts = lf.select(pl.col(c).null_count() for c in columns).collect().row(0, named=True)
    for column, count in counts.items():
        if count:
            rows = lf.with_row_index("_row").filter(pl.col(column).is_null()).select("_row").head(_EXAMPLES)
            where = ", ".join(str(r) for r in rows.collect().to_series())
            raise DataError(
                f"{source}: column '{column}' has {count} null value(s) (first at rows {where}); "
                f"every row needs a {column}. Drop or fill those rows."
            )


def _check_unique(lf: pl.LazyFrame, key: str, source: str) -> None:
    dupes = lf.group_by(key).len().filter(pl.col("len") > 1).sort(key).head(_EXAMPLES).collect()
    if dupes.height:
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in dupes.iter_rows())
        raise DataError(f"{source}: duplicate {key} values: {shown}; each {key} must appear once.")


def _check_numeric(schema: pl.Schema, column: str, source: str) -> None:
    if column in schema and not (schema[column].is_numeric() or schema[column] == pl.Boolean):
        raise DataError(f"{source}: column '{column}' has type {schema[column]}; expected numbers.")


def load_events(
    path: str | Path, columns: Mapping[str, str] | None = None, timestamp_unit: str = "auto"
) -> pl.LazyFrame:
    """Scan, rename, validate and normalize an events file. `timestamp_unit`: auto, s or ms."""
    return events_from(scan(path), str(path), columns, timestamp_unit)


def events_from(
    lf: pl.LazyFrame, source: str, columns: Mapping[str, str] | None = None, timestamp_unit: str = "auto"
) -> pl.LazyFrame:
    """Validate and normalize events given as a (lazy) frame; `source` names it in errors."""
    lf = _rename(lf, columns or {}, source)
    schema = _schema(lf, source)
    for column in ("value", "label"):
        _check_numeric(schema, column, source)
    lf = _timed_table(lf, schema, source, EVENTS, timestamp_unit)
    optional = [pl.col(c).cast(pl.Float64) for c in ("value", "label") if c in schema]
    if "event" in schema:
        optional.append(pl.col("event").cast(pl.String))
    return lf.with_columns(optional)


def load_requests(path: str | Path, columns: Mapping[str, str] | None = None, timestamp_unit: str = "auto") -> pl.LazyFrame:
    """Requests to recommend for: `user_id`, `timestamp` (and any other columns, kept as they are)."""
    return load_timed(path, REQUESTS, columns, timestamp_unit)


def load_timed(
    path: str | Path, spec: TableSpec, columns: Mapping[str, str] | None = None, timestamp_unit: str = "auto",
    default_time: datetime | None = None,
) -> pl.LazyFrame:
    """A table of `spec`'s required columns with a `timestamp`, checked and normalized. Without a
    `timestamp` column, `default_time` (if given) fills it; a `request_id` column must have no nulls."""
    source = str(path)
    lf = _rename(scan(path), mapping_for(path, columns), source)
    schema = _schema(lf, source)
    if "timestamp" not in schema and default_time is not None:
        lf = lf.with_columns(pl.lit(default_time).cast(TIMESTAMP).alias("timestamp"))
        schema = _schema(lf, source)
    if "request_id" in schema:
        spec = TableSpec(spec.name, (*spec.required, "request_id"))
    return _timed_table(lf, schema, source, spec, timestamp_unit)


def _timed_table(lf: pl.LazyFrame, schema: pl.Schema, source: str, spec: TableSpec, timestamp_unit: str) -> pl.LazyFrame:
    """Check the required columns, id types and nulls; normalize ids and parse `timestamp`."""
    _require_columns(schema, spec, source)
    ids = tuple(c for c in ("user_id", "item_id") if c in spec.required)
    for column in ids:
        _check_id_type(schema, column, source)
    _check_not_empty(lf, spec, source)
    _check_nulls(lf, spec.required, source)
    dtype = schema["timestamp"]
    parsed = _timestamp_expr(dtype, _epoch_unit(lf, dtype, timestamp_unit), source)
    bad = _examples(lf, parsed.is_null(), "timestamp")
    if bad:
        raise DataError(
            f"{source}: column 'timestamp' has values that are not timestamps ({'; '.join(bad)}); "
            "expected epoch seconds, epoch milliseconds or ISO-8601 strings such as 2024-05-01T12:00:00Z."
        )
    return _normalize_ids(lf, schema, ids).with_columns(parsed.alias("timestamp"))


def write_parquet_atomic(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write `frame` to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        frame.write_parquet(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_items(path: str | Path, columns: Mapping[str, str] | None = None) -> pl.LazyFrame:
    """Scan, rename and validate an items (catalogue) file."""
    return _keyed_table(scan(path), str(path), ITEMS, columns)


def load_users(path: str | Path, columns: Mapping[str, str] | None = None) -> pl.LazyFrame:
    """Scan, rename and validate a users file."""
    return _keyed_table(scan(path), str(path), USERS, columns)


def _keyed_table(
    lf: pl.LazyFrame, source: str, spec: TableSpec, columns: Mapping[str, str] | None
) -> pl.LazyFrame:
    lf = _rename(lf, columns or {}, source)
    schema = _schema(lf, source)
    _require_columns(schema, spec, source)
    key = spec.required[0]
    _check_id_type(schema, key, source)
    _check_not_empty(lf, spec, source)
    _check_nulls(lf, (key,), source)
    _check_unique(lf, key, source)
    return _normalize_ids(lf, schema, (key,))


@dataclass
class Dataset:
    """Events plus optional items and users, with ids of one type across tables."""

    events: pl.LazyFrame
    items: pl.LazyFrame | None = None
    users: pl.LazyFrame | None = None
    name: str = "dataset"

    def __post_init__(self) -> None:
        # Frames built in code may carry other datetime units; as-of joins need one.
        self.events = self.events.with_columns(pl.col("timestamp").cast(TIMESTAMP))
        self.events, self.items = _align_ids(self.events, self.items, "item_id")
        self.events, self.users = _align_ids(self.events, self.users, "user_id")

    @classmethod
    def load(
        cls,
        events: str | Path,
        items: str | Path | None = None,
        users: str | Path | None = None,
        columns: Mapping[str, str] | None = None,
        timestamp_unit: str = "auto",
    ) -> "Dataset":
        """Load the three tables; one mapping serves all (names absent from a file are ignored)."""
        return cls(
            events=load_events(events, mapping_for(events, columns), timestamp_unit),
            items=load_items(items, mapping_for(items, columns)) if items else None,
            users=load_users(users, mapping_for(users, columns)) if users else None,
            name=Path(events).stem,
        )

    def summary(self) -> dict:
        """Rows, users, items and time span of the events, plus catalogue and user-table sizes."""
        stats = self.events.select(
            pl.len().alias("events"),
            pl.col("user_id").n_unique().alias("users"),
            pl.col("item_id").n_unique().alias("items"),
            pl.col("timestamp").min().alias("first_event"),
            pl.col("timestamp").max().alias("last_event"),
        ).collect().row(0, named=True)
        stats["first_event"] = str(stats["first_event"])
        stats["last_event"] = str(stats["last_event"])
        if self.items is not None:
            stats["catalogue_items"] = self.items.select(pl.len()).collect().item()
        if self.users is not None:
            stats["user_rows"] = self.users.select(pl.len()).collect().item()
        return stats


def mapping_for(path: str | Path, columns: Mapping[str, str] | None) -> dict[str, str]:
    """The entries of a shared column mapping whose source column this file has."""
    if not columns:
        return {}
    present = _schema(scan(path), str(path)).names()
    return {src: dst for src, dst in columns.items() if src in present}


def _align_ids(
    events: pl.LazyFrame, other: pl.LazyFrame | None, key: str
) -> tuple[pl.LazyFrame, pl.LazyFrame | None]:
    # An integer id in one table and a string id in the other would never join: use strings for both.
    if other is None:
        return events, other
    if events.collect_schema()[key] == other.collect_schema()[key]:
        return events, other
    cast = pl.col(key).cast(pl.String)
    return events.with_columns(cast), other.with_columns(cast)
