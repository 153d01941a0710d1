"""The `recengine` command line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from recengine.errors import RecengineError

if TYPE_CHECKING:
    import polars as pl

    from recengine.data import Dataset


def _friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    # User-fixable problems print as one paragraph and exit 2; anything else keeps its traceback.
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RecengineError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(package_name="recengine")
def cli() -> None:
    """recengine: train and serve personalized rankers from behaviour logs and item text."""


@cli.command()
@_friendly_errors
def plugins() -> None:
    """Print the loaded plugins and what each registered, as JSON."""
    from recengine.plugins import plugin_info

    click.echo(json.dumps(plugin_info(), indent=2))


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every data-reading command shares; without --events the bundled MovieLens is used."""
    options = [
        click.option("--events", type=click.Path(path_type=Path), help="Events file (parquet, CSV, NDJSON)."),
        click.option("--items", type=click.Path(path_type=Path), help="Items (catalogue) file."),
        click.option("--users", type=click.Path(path_type=Path), help="Users file."),
        click.option(
            "--columns",
            help="Column mapping source=target, comma-separated, e.g. userId=user_id,movieId=item_id.",
        ),
        click.option(
            "--timestamp-unit",
            type=click.Choice(["auto", "s", "ms"]),
            default="auto",
            show_default=True,
            help="Unit of integer timestamps; auto tells seconds from milliseconds by magnitude.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_dataset(
    events: Path | None, items: Path | None, users: Path | None, columns: str | None, timestamp_unit: str
) -> "Dataset":
    from recengine.data import Dataset, parse_mapping

    if events is None:
        if items or users or columns:
            raise RecengineError("--items, --users and --columns need --events as well.")
        from recengine.datasets import movielens

        return movielens()
    return Dataset.load(events, items, users, parse_mapping(columns), timestamp_unit)


@cli.command()
@data_options
@_friendly_errors
def validate(events, items, users, columns, timestamp_unit) -> None:
    """Check a data set against the data contract and print a summary."""
    dataset = load_dataset(events, items, users, columns, timestamp_unit)
    summary = dataset.summary()
    click.echo(f"OK: {dataset.name} satisfies the data contract.")
    for key, value in summary.items():
        click.echo(f"  {key:16} {value}")


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`key=value` options into a dict; values are parsed as JSON where they can be (numbers, booleans)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RecengineError(f"parameter '{pair}' is not of the form key=value.")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


@cli.command()
@click.option("--items", type=click.Path(path_type=Path), help="Items file; default: the bundled MovieLens catalogue.")
@click.option("--columns", help="Column mapping for the items file, e.g. movieId=item_id.")
@click.option("--field", "fields", multiple=True, default=("title",), show_default=True, help="Text field to embed (repeatable).")
@click.option("--encoder", default="transformers", show_default=True, help="Registered encoder name.")
@click.option("--param", "params", multiple=True, help="Encoder parameter key=value (repeatable), e.g. device=cpu.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Embedding cache folder [default: .recengine/cache].")
@_friendly_errors
def embed(items, columns, fields, encoder, params, cache_dir) -> None:
    """Precompute item embeddings into the cache; report rows/s, hits and misses."""
    from recengine.data import load_items, parse_mapping
    from recengine.encoders import DEFAULT_CACHE_DIR, EmbeddingCache, create_encoder, embed as embed_texts

    catalogue = load_items(items, parse_mapping(columns)) if items else _bundled_items()
    model = create_encoder(encoder, parse_params(params))
    cache = EmbeddingCache(cache_dir or DEFAULT_CACHE_DIR)
    for field in fields:
        texts = _field_texts(catalogue, field, str(items or "the bundled catalogue"))
        _, stats = embed_texts(texts, model, cache, progress=True)
        click.echo(
            f"{field}: {len(texts)} items, {stats.hits} cache hits, {stats.misses} encoded, "
            f"{stats.rows_per_second:,.0f} rows/s ({stats.seconds:.2f} s) with {model.id}"
        )
    click.echo(f"cache: {cache.root}")


def _bundled_items():
    from recengine.datasets import movielens_items

    return movielens_items()


def _field_texts(items: "pl.LazyFrame", field: str, source: str) -> list[str]:
    import polars as pl

    if field not in items.collect_schema():
        raise RecengineError(f"{source}: no text field '{field}'; its columns are {items.collect_schema().names()}.")
    return items.select(pl.col(field).cast(pl.String).fill_null("")).collect().to_series().to_list()


@cli.command()
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Embedding cache folder [default: .recengine/cache].")
@_friendly_errors
def quickstart(cache_dir) -> None:
    """The first run: validate the bundled MovieLens data and embed its catalogue."""
    from recengine.datasets import movielens
    from recengine.encoders import DEFAULT_CACHE_DIR, EmbeddingCache, create_encoder, embed as embed_texts

    dataset = movielens()
    click.echo(f"1/2 validating {dataset.name} (bundled; licence: recengine/datasets/movielens/README.txt)")
    for key, value in dataset.summary().items():
        click.echo(f"  {key:16} {value}")
    encoder = create_encoder("transformers")
    cache = EmbeddingCache(cache_dir or DEFAULT_CACHE_DIR)
    click.echo(f"2/2 embedding item titles and genres with {encoder.id}")
    for field in ("title", "genres"):
        texts = _field_texts(dataset.items, field, "the bundled catalogue")
        _, stats = embed_texts(texts, encoder, cache, progress=True)
        click.echo(f"  {field}: {stats.misses} encoded, {stats.hits} from cache, {stats.rows_per_second:,.0f} rows/s")
    click.echo(f"Done. Item embeddings are cached under {cache.root.resolve()}; a re-run encodes nothing.")


if __name__ == "__main__":
    cli()
