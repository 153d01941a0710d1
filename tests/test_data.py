"""The data contract: formats, column mapping, timestamp units, and one clear error per bad input."""

import re
from datetime import datetime

import polars as pl
import pytest

from recengine.core.data import Dataset, load_events, load_items, parse_mapping
from recengine.errors import DataError

EVENTS = {"userId": [1, 1, 2], "movieId": [10, 11, 10], "timestamp": [1_600_000_000, 1_600_000_060, 1_600_000_120]}
MAPPING = {"userId": "user_id", "movieId": "item_id"}


def write(tmp_path, name, data):
    path = tmp_path / name
    frame = pl.DataFrame(data)
    {"csv": frame.write_csv, "parquet": frame.write_parquet, "ndjson": frame.write_ndjson}[name.split(".")[-1]](path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet", "ndjson"])
def test_formats_load_the_same_events(tmp_path, fmt):
    events = load_events(write(tmp_path, f"e.{fmt}", EVENTS), MAPPING).collect()
    assert events.columns == ["user_id", "item_id", "timestamp"]
    assert events["timestamp"].to_list()[0] == datetime(2020, 9, 13, 12, 26, 40)
    assert events["item_id"].to_list() == [10, 11, 10]


def test_epoch_seconds_milliseconds_and_iso_agree(tmp_path):
    seconds = load_events(write(tmp_path, "s.csv", EVENTS), MAPPING).collect()
    millis = dict(EVENTS, timestamp=[t * 1000 for t in EVENTS["timestamp"]])
    iso = dict(EVENTS, timestamp=["2020-09-13T12:26:40Z", "2020-09-13T14:27:40+02:00", "2020-09-13 12:28:40"])
    for data in (millis, iso):
        other = load_events(write(tmp_path, "o.csv", data), MAPPING).collect()
        assert other["timestamp"].to_list() == seconds["timestamp"].to_list()


def test_optional_columns_are_typed(tmp_path):
    data = dict(EVENTS, event=["click", "view", "purchase"], value=[1, 2, 3], request_id=["a", "a", "b"], label=[1, 0, 1])
    events = load_events(write(tmp_path, "e.parquet", data), MAPPING).collect()
    assert events.schema["value"] == pl.Float64 and events.schema["label"] == pl.Float64


def test_string_item_ids_in_items_align_with_integer_events(tmp_path):
    events = write(tmp_path, "e.csv", EVENTS)
    items = write(tmp_path, "i.ndjson", {"item_id": ["10", "11"], "title": ["a", "b"]})
    dataset = Dataset.load(events, items, columns=MAPPING)
    joined = dataset.events.join(dataset.items, on="item_id").collect()
    assert joined.height == 3


def test_parse_mapping():
    assert parse_mapping("userId=user_id, movieId=item_id") == MAPPING
    with pytest.raises(DataError, match="source=target"):
        parse_mapping("userId")


BAD_EVENTS = {
    # (every mapping entry names a column the file has: an entry matching no file is its own error)
    "missing column": ({"userId": [1], "movieId": [1], "time": [1]}, "missing required column.*timestamp"),
    "unparseable timestamp": (dict(EVENTS, timestamp=["2020-01-01", "yesterday", "2020-01-03"]), "row 1: 'yesterday'"),
    "null timestamp": (dict(EVENTS, timestamp=[1, None, 3]), "'timestamp' has 1 null.*rows 1"),
    "null id": (dict(EVENTS, userId=[1, None, 2]), "'user_id' has 1 null"),
    "float ids": (dict(EVENTS, movieId=[1.5, 2.0, 3.0]), "'item_id' has type Float64; ids must be integers or strings"),
    "text value": (dict(EVENTS, value=["good", "bad", "ok"]), "'value' has type String; expected numbers"),
    "float timestamp": (dict(EVENTS, timestamp=[1.5, 2.5, 3.5]), "'timestamp' has type Float64"),
    "empty": ({"userId": [], "movieId": [], "timestamp": []}, "events table is empty"),
    "NaN value": (dict(EVENTS, value=[4.0, float("nan"), 3.0]), "'value' has 1 value.*not finite.*row 1: nan"),
    "infinite value": (dict(EVENTS, value=[4.0, 3.0, float("inf")]), "'value' has 1 value.*not finite.*row 2: inf"),
    "infinite label": (dict(EVENTS, label=[1.0, float("-inf"), 0.0]), "'label' has 1 value.*not finite.*row 1: -inf"),
    "nan as text": (dict(EVENTS, value=["4", "nan", "3"]), "'value' has 1 value.*not finite.*row 1: 'nan'"),
}


@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
def test_bad_events_give_one_clear_error(tmp_path, cli_run, case):
    data, message = BAD_EVENTS[case]
    frame = pl.DataFrame(data, schema=dict.fromkeys(data, pl.Int64) if case == "empty" else None)
    path = tmp_path / "events.parquet"
    frame.write_parquet(path)
    result = cli_run("validate", "--events", str(path), "--columns", "userId=user_id,movieId=item_id")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert str(path) in result.output
    assert re.search(message, result.output), result.output


def test_duplicate_item_ids_are_named(tmp_path, cli_run):
    events = write(tmp_path, "e.csv", EVENTS)
    items = write(tmp_path, "items.csv", {"movieId": [10, 11, 10, 10], "title": ["a", "b", "c", "d"]})
    result = cli_run("validate", "--events", str(events), "--items", str(items), "--columns", "userId=user_id,movieId=item_id")
    assert result.exit_code == 2
    assert "items.csv: duplicate item_id values: 10 (3 rows)" in result.output


def test_mapping_to_an_absent_column_is_named(tmp_path):
    with pytest.raises(DataError, match="mapping names \\['uid'\\]"):
        load_events(write(tmp_path, "e.csv", EVENTS), {"uid": "user_id"})


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_items(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="unsupported file type"):
        load_items(tmp_path / "x.xlsx")


def test_validate_bundled_movielens(cli_run):
    result = cli_run("validate")
    assert result.exit_code == 0, result.output
    assert "100836" in result.output and "610" in result.output and "9742" in result.output


# -- issue #12: nothing lost, nothing silently wrong ------------------------------------------------

def test_epoch_seconds_and_milliseconds_in_one_column_are_refused(tmp_path):
    # Guessing the unit from the largest value turned every seconds row into January 1970.
    mixed = write(tmp_path, "e.csv", dict(EVENTS, timestamp=[1_600_000_000, 1_600_000_060_000, 1_600_000_120]))
    with pytest.raises(DataError, match=r"e.csv: column 'timestamp' mixes epoch seconds \(row 0: 1600000000; "
                       r"row 2: 1600000120\) and epoch milliseconds \(row 1: 1600000060000\).*--timestamp-unit"):
        load_events(mixed, MAPPING)
    # An explicit unit is trusted, as before.
    explicit = load_events(mixed, MAPPING, timestamp_unit="ms").collect()
    assert explicit["timestamp"].to_list()[1] == datetime(2020, 9, 13, 12, 27, 40)


def test_string_ids_lose_surrounding_spaces_and_are_counted(tmp_path):
    events = write(tmp_path, "e.csv", dict(EVENTS, movieId=["10", " 10", "11 "]))
    items = write(tmp_path, "items.csv", {"item_id": [" 10", "12"], "title": ["a", "b"]})
    dataset = Dataset.load(events, items, columns=MAPPING)
    assert dataset.events.collect()["item_id"].to_list() == ["10", "10", "11"]
    summary = dataset.summary()
    assert summary["ids_stripped"] == 3  # two in the events, one in the catalogue
    assert summary["items"] == 2
    # item 11 has no catalogue row: one event, one distinct item
    assert (summary["events_not_in_catalogue"], summary["items_not_in_catalogue"]) == (1, 1)


def test_ids_that_differ_only_by_spaces_are_duplicates_in_the_catalogue(tmp_path):
    items = write(tmp_path, "items.csv", {"item_id": ["12", " 12", "13"], "title": ["a", "b", "c"]})
    with pytest.raises(DataError, match="duplicate item_id values \\(compared with surrounding spaces stripped\\): '12' \\(2 rows\\)"):
        load_items(items).collect()


def test_validate_reports_stripped_ids_and_uncatalogued_events(tmp_path, cli_run):
    events = write(tmp_path, "e.csv", dict(EVENTS, movieId=["10", " 10", "11"]))
    items = write(tmp_path, "items.csv", {"movieId": ["10"], "title": ["a"]})
    result = cli_run("validate", "--events", str(events), "--items", str(items), "--columns", "userId=user_id,movieId=item_id")
    assert result.exit_code == 0, result.output
    assert re.search(r"events_not_in_catalogue +1\n", result.output), result.output
    assert re.search(r"items_not_in_catalogue +1\n", result.output), result.output
    assert re.search(r"ids_stripped +1\n", result.output), result.output


def long_events(tmp_path, column: str, row: int, value: str, rows: int = 10_100):
    """A CSV of `rows` valid events (past polars' old 10,000-row type inference) with `value` in
    `column` at data row `row`."""
    frame = pl.DataFrame({
        "user_id": [i % 50 for i in range(rows)], "item_id": [i % 70 for i in range(rows)],
        "timestamp": [1_600_000_000 + i for i in range(rows)], "value": [1.0] * rows,
    }).with_columns(pl.all().cast(pl.String))
    frame = frame.with_columns(pl.when(pl.int_range(rows) == row).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))
    path = tmp_path / "events.csv"
    frame.write_csv(path)
    return path


@pytest.mark.parametrize("column, value, message", [
    ("value", "good", r"column 'value' has type String; expected numbers \(not numbers: row 10050: 'good'\)"),
    ("timestamp", "yesterday", r"not timestamps \(row 10050: 'yesterday'\).*epoch numbers \(row 0: '1600000000'"),
    ("item_id", "7.5", r"'item_id' has type Float64; ids must be integers or strings \(not whole numbers: row 10050: 7.5\)"),
])
def test_a_bad_value_after_row_10000_is_found_by_loading(tmp_path, column, value, message):
    # Types used to be inferred from 10,000 rows: validate passed, train crashed in polars.
    with pytest.raises(DataError, match=message):
        load_events(long_events(tmp_path, column, 10_050, value)).collect()


def test_a_malformed_line_is_a_data_error_naming_the_file(tmp_path):
    path = long_events(tmp_path, "value", 10_050, "1.0")
    lines = path.read_text().splitlines()
    lines[10_051] += ",5"  # one field too many
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"events.csv: cannot be read: found more fields than defined in 'Schema' "
                       r"\(first at row 10050, line 10052 of the file\).*well formed"):
        load_events(path).collect()


def test_events_in_the_future_are_refused(tmp_path):
    data = dict(EVENTS, timestamp=["2020-09-13T12:26:40Z", "2100-01-01T00:00:00Z", "2020-09-13T12:28:40Z"])
    with pytest.raises(DataError, match=r"later than now plus one day .*row 1: '2100-01-01T00:00:00Z' \(2100-01-01 00:00:00\).*drop those rows"):
        load_events(write(tmp_path, "e.csv", data), MAPPING)


def test_a_mapping_entry_no_file_has_is_named(tmp_path):
    events = write(tmp_path, "e.csv", EVENTS)
    items = write(tmp_path, "items.csv", {"movieId": [10], "title": ["a"]})
    with pytest.raises(DataError, match=r"mapping entry userid=user_id: no given file has .*e.csv has \['userId', "
                       r"'movieId', 'timestamp'\]; .*items.csv has \['movieId', 'title'\]"):
        Dataset.load(events, items, columns={"userid": "user_id", "movieId": "item_id"})


@pytest.mark.parametrize("separator, name, advice", [(";", "semicolons", "convert it to comma-separated"),
                                                      ("|", "pipes", "convert it to comma-separated"),
                                                      ("\t", "tabs", "rename it to .tsv")])
def test_a_csv_with_another_separator_is_named(tmp_path, separator, name, advice):
    path = tmp_path / "e.csv"
    path.write_text(separator.join(["user_id", "item_id", "timestamp"]) + "\n" + separator.join(["1", "2", "1600000000"]) + "\n")
    with pytest.raises(DataError, match=f"(?i)looks separated by {name}.*{advice}"):
        load_events(path)


def test_a_folder_instead_of_a_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"is a folder; a file is expected \(\.parquet, \.csv"):
        load_items(tmp_path)
