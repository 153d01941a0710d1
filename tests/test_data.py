"""The data contract: formats, column mapping, timestamp units, and one clear error per bad input."""

import re
from datetime import datetime

import polars as pl
import pytest

from recengine.data import Dataset, load_events, load_items, parse_mapping
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
    "missing column": ({"userId": [1], "timestamp": [1]}, "missing required column.*item_id"),
    "unparseable timestamp": (dict(EVENTS, timestamp=["2020-01-01", "yesterday", "2020-01-03"]), "row 1: 'yesterday'"),
    "null timestamp": (dict(EVENTS, timestamp=[1, None, 3]), "'timestamp' has 1 null.*rows 1"),
    "null id": (dict(EVENTS, userId=[1, None, 2]), "'user_id' has 1 null"),
    "float ids": (dict(EVENTS, movieId=[1.5, 2.0, 3.0]), "'item_id' has type Float64; ids must be integers or strings"),
    "text value": (dict(EVENTS, value=["good", "bad", "ok"]), "'value' has type String; expected numbers"),
    "float timestamp": (dict(EVENTS, timestamp=[1.5, 2.5, 3.5]), "'timestamp' has type Float64"),
    "empty": ({"userId": [], "movieId": [], "timestamp": []}, "events table is empty"),
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
