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
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
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


FILE_TYPES = ".parquet, .csv, .tsv or .ndjson"
# A CSV header read as one column that contains one of these was written with another separator.
_SEPARATORS = {",": "commas", ";": "semicolons", "|": "pipes", "\t": "tabs"}


def scan(path: str | Path) -> pl.LazyFrame:
    """Lazily scan a parquet, CSV/TSV or NDJSON file, chosen by its suffix.

    CSV and NDJSON column types are inferred from every row, once: a text value at row 50,000 of a
    number column must make the column text here, not crash a later step. The inferred schema is
    then fixed, so later collects do not infer it again."""
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"{path}: is a folder; a file is expected ({FILE_TYPES}). Pass the path of the data file itself."
        )
    if not path.exists():
        raise DataError(f"{path}: no such file. Check the path.")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pl.scan_parquet(path)
    if suffix in (".csv", ".tsv", ".txt"):
        separator = "\t" if suffix == ".tsv" else ","
        schema = _schema(pl.scan_csv(path, separator=separator, infer_schema_length=None), str(path))
        _check_separator(schema, separator, str(path))
        return pl.scan_csv(path, separator=separator, schema=schema)
    if suffix in (".ndjson", ".jsonl", ".json"):
        schema = _schema(pl.scan_ndjson(path, infer_schema_length=None), str(path))
        return pl.scan_ndjson(path, schema=schema)
    raise DataError(
        f"{path}: unsupported file type '{suffix}'; expected {FILE_TYPES}. Convert the file to one of "
        "these (or rename it if it already is one)."
    )


def _check_separator(schema: pl.Schema, separator: str, source: str) -> None:
    # A semicolon-separated file read with commas has one column named 'user_id;item_id;timestamp',
    # which would otherwise surface as a puzzling "missing required columns".
    if len(schema) != 1:
        return
    header = schema.names()[0]
    found = next((sep for sep in _SEPARATORS if sep != separator and sep in header), None)
    if found is None:
        return
    expected = "tab-separated" if separator == "\t" else "comma-separated"
    advice = (
        "Rename it to .tsv (or convert it to comma-separated)." if found == "\t"
        else f"Convert it to {expected} (for example with a spreadsheet's export)."
    )
    raise DataError(
        f"{source}: the header reads as one column {header!r}; the file looks separated by {_SEPARATORS[found]} "
        f"({found!r}), but a {Path(source).suffix} file is read as {expected}. {advice}"
    )


def _read_error(source: str, exc: Exception) -> DataError:
    """A polars read or parse failure as the contract's one paragraph: file, polars' own account
    (which names the column, and the value where it has one), and what to do."""
    # polars' first paragraph says what failed; the rest suggests Python arguments (ignore_errors,
    # infer_schema_length...) that mean nothing on the command line.
    account = " ".join(str(exc).strip().split("\n\n")[0].split()) or type(exc).__name__
    if "more fields" in account:  # polars does not say where
        account += _first_long_line(source)
    return DataError(
        f"{source}: cannot be read: {account}. Check that the file is complete and well formed (every line "
        "has the header's number of fields, values holding the separator are quoted), or export it again."
    )


def _first_long_line(source: str) -> str:
    """Where a CSV first has more fields than its header, as ` (first at row N, line L of the file)`."""
    path = Path(source)
    if path.suffix.lower() not in (".csv", ".tsv", ".txt") or not path.is_file():
        return ""
    separator = "\t" if path.suffix.lower() == ".tsv" else ","
    # Each line as one string (\x1f, the ASCII unit separator, is not in text files); separators
    # inside quoted values do not count.
    lines = pl.scan_csv(path, has_header=False, separator="\x1f", quote_char=None, schema={"line": pl.String})
    fields = pl.col("line").str.replace_all(r'"[^"]*"', "").str.count_matches(separator, literal=True)
    try:
        found = lines.with_row_index("n").filter(fields > fields.first()).select("n").head(1).collect()
    except pl.exceptions.PolarsError:
        return ""
    return f" (first at row {found.item() - 1}, line {found.item() + 1} of the file)" if found.height else ""


def _schema(lf: pl.LazyFrame, source: str) -> pl.Schema:
    try:
        return lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _read_error(source, exc) from exc


def _collect(lf: pl.LazyFrame, source: str) -> pl.DataFrame:
    """Collect, turning any read or parse error of the file behind `lf` into a DataError."""
    try:
        return lf.collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _read_error(source, exc) from exc


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


def _check_id_type(lf: pl.LazyFrame, schema: pl.Schema, column: str, source: str) -> None:
    dtype = schema[column]
    if dtype.is_integer() or dtype in (pl.String, pl.Categorical):
        return
    shown = ""
    if dtype.is_float():  # often one stray 1.5 far down a column of whole numbers
        odd = _examples(lf, pl.col(column) != pl.col(column).round(0), column, source)
        shown = f" (not whole numbers: {'; '.join(odd)})" if odd else ""
    raise DataError(
        f"{source}: column '{column}' has type {dtype}; ids must be integers or strings{shown}. "
        "Cast the column in the file (floats such as 1.0 are not accepted as ids) or fix those rows."
    )


def _is_string_id(dtype: pl.DataType) -> bool:
    return not dtype.is_integer()


def _normalize_ids(lf: pl.LazyFrame, schema: pl.Schema, columns: tuple[str, ...]) -> pl.LazyFrame:
    # "12" and " 12" are one id to whoever typed them: string ids lose surrounding whitespace.
    casts = []
    for column in columns:
        if _is_string_id(schema[column]):
            casts.append(pl.col(column).cast(pl.String).str.strip_chars())
        else:
            casts.append(pl.col(column).cast(pl.Int64))
    return lf.with_columns(casts)


def _padded_ids(schema: pl.Schema, columns: tuple[str, ...]) -> pl.Expr:
    """How many id values (over `columns`) `_normalize_ids` strips surrounding whitespace from."""
    counts = [
        (pl.col(c).cast(pl.String) != pl.col(c).cast(pl.String).str.strip_chars()).sum()
        for c in columns if c in schema and _is_string_id(schema[c])
    ]
    return pl.sum_horizontal(counts) if counts else pl.lit(0)


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


def _epoch_unit(lf: pl.LazyFrame, dtype: pl.DataType, unit: str, source: str) -> str:
    """The unit of integer timestamps: as given, or told apart by magnitude when every value agrees."""
    if unit != "auto" or not dtype.is_integer():
        return unit
    millis = pl.col("timestamp").abs() > _EPOCH_MS_THRESHOLD
    any_ms, any_s = _collect(lf.select(millis.any().alias("ms"), (~millis).any().alias("s")), source).row(0)
    if any_ms and any_s:
        # One unit for the column would put the other rows decades off (a millisecond row read as
        # seconds lands in the year 50000; seconds read as milliseconds, in 1970).
        seconds = "; ".join(_examples(lf, ~millis, "timestamp", source))
        milliseconds = "; ".join(_examples(lf, millis, "timestamp", source))
        raise DataError(
            f"{source}: column 'timestamp' mixes epoch seconds ({seconds}) and epoch milliseconds "
            f"({milliseconds}), so no one unit reads every row right. If the column really has one unit, "
            "pass it with --timestamp-unit s or --timestamp-unit ms; otherwise fix those rows to one unit."
        )
    return "ms" if any_ms else "s"


def _examples(lf: pl.LazyFrame, condition: pl.Expr, column: str, source: str, shown: pl.Expr | None = None) -> list[str]:
    """`row N: value` for the first rows (counted from 0, header excluded) that meet `condition`;
    `shown`, if given, is appended in parentheses (say, how a raw value was read)."""
    extra = [shown.alias("_shown")] if shown is not None else []
    query = lf.with_row_index("_row").filter(condition).select("_row", column, *extra).head(_EXAMPLES)
    return [
        f"row {row}: {value!r}" + (f" ({rest[0]})" if rest else "")
        for row, value, *rest in _collect(query, source).iter_rows()
    ]


def _check_not_empty(lf: pl.LazyFrame, spec: TableSpec, source: str) -> int:
    rows = _collect(lf.select(pl.len()), source).item()
    if rows == 0:
        raise DataError(
            f"{source}: the {spec.name} table is empty; it needs at least one row. Check that this is the "
            "right file and that its export finished."
        )
    return rows


def _check_nulls(lf: pl.LazyFrame, columns: tuple[str, ...], source: str) -> None:
    # Counting the nulls of every column parses every value of the file: a bad line anywhere stops
    # loading here, with the file named, not a later step with a traceback.
    counts = _collect(lf.select(pl.all().null_count()), source).row(0, named=True)
    for column in columns:
        if counts[column]:
            rows = lf.with_row_index("_row").filter(pl.col(column).is_null()).select("_row").head(_EXAMPLES)
            where = ", ".join(str(r) for r in _collect(rows, source).to_series())
            raise DataError(
                f"{source}: column '{column}' has {counts[column]} null value(s) (first at rows {where}); "
                f"every row needs a {column}. Drop or fill those rows."
            )


def _check_unique(lf: pl.LazyFrame, key: str, source: str, stripped: bool = False) -> None:
    dupes = _collect(lf.group_by(key).len().filter(pl.col("len") > 1).sort(key).head(_EXAMPLES), source)
    if dupes.height:
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in dupes.iter_rows())
        compared = " (compared with surrounding spaces stripped)" if stripped else ""
        raise DataError(
            f"{source}: duplicate {key} values{compared}: {shown}; each {key} must appear once. "
            "Merge or remove the duplicate rows."
        )


def _check_numeric(lf: pl.LazyFrame, schema: pl.Schema, column: str, source: str) -> None:
    if column not in schema or schema[column] == pl.Boolean or schema[column].is_integer():
        return
    if schema[column].is_float() or schema[column] == pl.String:
        _check_finite(lf, column, source)
    if schema[column].is_numeric():
        return
    shown = ""
    if schema[column] == pl.String:  # often one stray word far down a column of numbers
        words = pl.col(column).is_not_null() & pl.col(column).cast(pl.Float64, strict=False).is_null()
        examples = _examples(lf, words, column, source)
        shown = f" (not numbers: {'; '.join(examples)})" if examples else ""
    raise DataError(
        f"{source}: column '{column}' has type {schema[column]}; expected numbers{shown}. "
        "Fix or drop those rows, or drop the column."
    )


def _check_finite(lf: pl.LazyFrame, column: str, source: str) -> None:
    """One NaN or infinity in a value column would make every mean over it NaN or infinite, for most later
    requests, silently: refuse it, naming the rows (a string column's "nan" and "inf" count too)."""
    number = pl.col(column).cast(pl.Float64, strict=False)
    bad = number.is_nan() | number.is_infinite()
    count = _collect(lf.select(bad.sum()), source).item()
    if count:
        examples = _examples(lf, bad, column, source)
        raise DataError(f"{source}: column '{column}' has {count} value(s) that are not finite numbers (NaN or "
                        f"infinite: {'; '.join(examples)}). Fix or drop those rows; a missing value is an empty cell.")


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
        _check_numeric(lf, schema, column, source)
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
    lf = scan(path)
    lf = _rename(lf, _mapping_for(_schema(lf, source).names(), columns), source)
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
        _check_id_type(lf, schema, column, source)
    _check_not_empty(lf, spec, source)
    _check_nulls(lf, spec.required, source)
    dtype = schema["timestamp"]
    parsed = _timestamp_expr(dtype, _epoch_unit(lf, dtype, timestamp_unit, source), source)
    _check_parsed(lf, parsed, dtype, source)
    if spec.name == EVENTS.name:
        _check_not_future(lf, parsed, source)
    return _normalize_ids(lf, schema, ids).with_columns(parsed.alias("timestamp"))


def _check_parsed(lf: pl.LazyFrame, parsed: pl.Expr, dtype: pl.DataType, source: str) -> None:
    failed = parsed.is_null()
    numbers: list[str] = []
    if dtype == pl.String:
        # One word far down a column of epoch numbers makes the whole column text: name the word
        # first, and say why the numbers fail too.
        digits = pl.col("timestamp").str.strip_chars().str.contains(r"^-?\d+$")
        numbers = _examples(lf, failed & digits, "timestamp", source)
        failed = failed & ~digits
    bad, also = _examples(lf, failed, "timestamp", source), ""
    if bad and numbers:
        also = f" Because of them the column is text, so its epoch numbers ({'; '.join(numbers[:2])}...) fail too."
    elif numbers:
        bad, also = numbers, " These are epoch numbers stored as text: store the column as integers."
    if bad:
        raise DataError(
            f"{source}: column 'timestamp' has values that are not timestamps ({'; '.join(bad)}); "
            "expected epoch seconds, epoch milliseconds or ISO-8601 strings such as 2024-05-01T12:00:00Z, "
            f"one form per column.{also} Fix or drop those rows."
        )


def _check_not_future(lf: pl.LazyFrame, parsed: pl.Expr, source: str) -> None:
    # An event after now would be "already seen" by every request; a day of slack covers clocks
    # and time zones that are a little off.
    limit = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0) + timedelta(days=1)
    late = _examples(lf, parsed > limit, "timestamp", source, shown=parsed.dt.to_string("%Y-%m-%d %H:%M:%S"))
    if late:
        raise DataError(
            f"{source}: column 'timestamp' has events later than now plus one day ({limit} UTC): "
            f"{'; '.join(late)}. Fix the clock of the system that logged them or the timestamp unit "
            "(--timestamp-unit s|ms), or drop those rows."
        )


def write_parquet_atomic(frame: pl.DataFrame, path: str | Path, rerun: str = "run the command again") -> Path:
    """Write `frame` to a temp file beside `path`, then rename: readers never see half a file.

    A write the system refuses (a full disk, a quota or a file size limit) is a `RecengineError` naming
    `path` and ending "..., then `rerun`.", not a raw OSError or polars ComputeError; no partial file
    is left behind, and an older `path` stays as it was."""
    import errno
    import re

    from recengine.errors import RecengineError

    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(partial)
        with open(partial, "rb") as handle:  # on disk before the rename makes it the file: a crash leaves the old or the new
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except (OSError, pl.exceptions.ComputeError) as exc:
        # polars reports its writer's I/O failures as a ComputeError ending "(os error 28)".
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = exc.errno if isinstance(exc, OSError) else found and int(found.group(1))
        if not code:
            raise  # not the file system's refusal: a bug, which keeps its traceback
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise RecengineError(f"cannot write {path}: no room left ({os.strerror(code)}: the disk is full, or a quota "
                                 f"or a file size limit was reached). Free space there, then {rerun}.") from None
        raise RecengineError(f"cannot write {path} ({os.strerror(code)}); make sure that location can be written, "
                             f"then {rerun}.") from None
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
    _check_id_type(lf, schema, key, source)
    _check_not_empty(lf, spec, source)
    _check_nulls(lf, (key,), source)
    # Duplicates are judged on normalized ids: "12" and " 12" are the same item.
    normalized = _normalize_ids(lf, schema, (key,))
    _check_unique(normalized, key, source, stripped=_is_string_id(schema[key]))
    return normalized


@dataclass
class Dataset:
    """Events plus optional items and users, with ids of one type across tables."""

    events: pl.LazyFrame
    items: pl.LazyFrame | None = None
    users: pl.LazyFrame | None = None
    name: str = "dataset"
    # Lazy one-row counts of id values loaded with surrounding whitespace (stripped), for summary().
    padded_ids: list[pl.LazyFrame] = field(default_factory=list, repr=False)

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
        """Load the three tables; one mapping serves all (an entry applies to the files that have its
        source column, and must match at least one)."""
        paths = {name: str(path) for name, path in (("events", events), ("items", items), ("users", users)) if path}
        frames = {name: scan(path) for name, path in paths.items()}
        present = {name: _schema(lf, paths[name]).names() for name, lf in frames.items()}
        _check_mapping_used(columns or {}, {paths[name]: names for name, names in present.items()})
        frames = {
            name: _rename(lf, _mapping_for(present[name], columns), paths[name]) for name, lf in frames.items()
        }
        padded = [
            lf.select(_padded_ids(_schema(lf, paths[name]), _ID_COLUMNS[name])) for name, lf in frames.items()
        ]
        return cls(
            events=events_from(frames["events"], paths["events"], None, timestamp_unit),
            items=_keyed_table(frames["items"], paths["items"], ITEMS, None) if items else None,
            users=_keyed_table(frames["users"], paths["users"], USERS, None) if users else None,
            name=Path(events).stem,
            padded_ids=padded,
        )

    def summary(self) -> dict:
        """Rows, users, items and time span of the events; catalogue and user-table sizes; how many
        events (and distinct items) have no catalogue row; how many id values had surrounding
        whitespace stripped. Each figure is one lazy query."""
        stats = _collect(self.events.select(
            pl.len().alias("events"),
            pl.col("user_id").n_unique().alias("users"),
            pl.col("item_id").n_unique().alias("items"),
            pl.col("timestamp").min().alias("first_event"),
            pl.col("timestamp").max().alias("last_event"),
        ), self.name).row(0, named=True)
        stats["first_event"] = str(stats["first_event"])
        stats["last_event"] = str(stats["last_event"])
        if self.items is not None:
            stats["catalogue_items"] = _collect(self.items.select(pl.len()), self.name).item()
            uncatalogued = self.events.join(self.items.select("item_id"), on="item_id", how="anti")
            counts = uncatalogued.select(pl.len().alias("events"), pl.col("item_id").n_unique().alias("items"))
            stats["events_not_in_catalogue"], stats["items_not_in_catalogue"] = _collect(counts, self.name).row(0)
        if self.users is not None:
            stats["user_rows"] = _collect(self.users.select(pl.len()), self.name).item()
        stats["ids_stripped"] = sum(_collect(lf, self.name).item() for lf in self.padded_ids)
        return stats


_ID_COLUMNS = {"events": ("user_id", "item_id"), "items": ("item_id",), "users": ("user_id",)}


def mapping_for(path: str | Path, columns: Mapping[str, str] | None) -> dict[str, str]:
    """The entries of a shared column mapping whose source column this file has."""
    if not columns:
        return {}
    return _mapping_for(_schema(scan(path), str(path)).names(), columns)


def _mapping_for(present: list[str], columns: Mapping[str, str] | None) -> dict[str, str]:
    return {src: dst for src, dst in (columns or {}).items() if src in present}


def _check_mapping_used(columns: Mapping[str, str], present: Mapping[str, list[str]]) -> None:
    # A misspelt source name would otherwise be skipped for every file without a word.
    unused = [f"{src}={dst}" for src, dst in columns.items() if not any(src in names for names in present.values())]
    if unused:
        files = "; ".join(f"{path} has {names}" for path, names in present.items())
        entries = "entry" if len(unused) == 1 else "entries"
        raise DataError(
            f"the column mapping {entries} {', '.join(unused)}: no given file has a column of that source name "
            f"({files}). Correct the name before '=' (it is case-sensitive) or drop the {entries} from --columns."
        )


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
