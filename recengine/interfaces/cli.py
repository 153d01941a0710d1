"""The `recengine` command line."""

from __future__ import annotations

import functools
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from recengine.errors import RecengineError

if TYPE_CHECKING:
    import polars as pl

    from recengine.core.data import Dataset


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


class _Commands(click.Group):
    """The command group, whose option errors (--k 0, an unknown option, a missing value) read as every
    other error: one paragraph, "Error: ..." and what to run next, exit 2; not click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        kwargs.setdefault("prog_name", "recengine")  # (run as `python -c` it would call itself "-c")
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "recengine"
            click.echo(f"Error: {exc.format_message()} See '{command} --help'.", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)


@click.group(cls=_Commands)
@click.version_option(package_name="recengine")
def cli() -> None:
    """recengine: train and serve personalized rankers from behaviour logs and item text."""
    from recengine.core.memory import return_freed_memory

    return_freed_memory()  # every command streams chunks; freed chunks must not stay resident


@cli.command()
@_friendly_errors
def plugins() -> None:
    """Print the loaded plugins and what each registered, as JSON."""
    from recengine.parts.plugins import plugin_info

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
    from recengine.core.data import Dataset, parse_mapping

    if events is None:
        if items or users or columns:
            raise RecengineError(
                "--items, --users and --columns need --events as well. Pass the events file with --events, "
                "or leave them all out to use the bundled MovieLens."
            )
        from recengine.core.datasets import movielens

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
    width = max(map(len, summary))
    for key, value in summary.items():
        click.echo(f"  {key:{width}} {value}")


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


engine_option = click.option(
    "--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
    help="Run here, or on a Ray cluster (needs recengine[ray]; see README, Running on Ray).")
address_option = click.option(
    "--address", help="With --engine ray: the cluster's address (as `ray start --head` printed it, or auto); "
                      "default: a local Ray on this machine.")


def _check_engine(engine: str, address: str | None) -> None:
    if address and engine != "ray":
        raise RecengineError(f"--address {address} names a Ray cluster, but the job runs with --engine {engine}; "
                             "add --engine ray to run it there, or drop --address.")


@cli.command()
@click.option("--items", type=click.Path(path_type=Path), help="Items file; default: the bundled MovieLens catalogue.")
@click.option("--columns", help="Column mapping for the items file, e.g. movieId=item_id.")
@click.option("--field", "fields", multiple=True, default=("title",), show_default=True, help="Text field to embed (repeatable).")
@click.option("--encoder", default="transformers", show_default=True, help="Registered encoder name.")
@click.option("--param", "params", multiple=True, help="Encoder parameter key=value (repeatable), e.g. device=cpu.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Embedding cache folder [default: .recengine/cache].")
@engine_option
@address_option
@_friendly_errors
def embed(items, columns, fields, encoder, params, cache_dir, engine, address) -> None:
    """Precompute item embeddings into the cache; report rows/s, hits and misses."""
    _check_engine(engine, address)
    from recengine.core.data import load_items, parse_mapping
    from recengine.parts.encoders import DEFAULT_CACHE_DIR, EmbeddingCache, create_encoder
    from recengine.parts.encoders import embed as embed_texts

    catalogue = load_items(items, parse_mapping(columns)) if items else _bundled_items()
    model = create_encoder(encoder, parse_params(params))
    cache = EmbeddingCache(cache_dir or DEFAULT_CACHE_DIR)
    for field in fields:
        texts = _field_texts(catalogue, field, str(items or "the bundled catalogue"))
        if engine == "ray":
            from recengine.running.distributed import connect, embed_on_ray

            connect(address)
            _, stats = embed_on_ray(texts, encoder, parse_params(params), cache, encoder_id=model.id)
        else:
            _, stats = embed_texts(texts, model, cache, progress=True)
        click.echo(
            f"{field}: {len(texts)} items, {stats.hits} cache hits, {stats.misses} encoded, {stats.nulls} without an embedding, "
            f"{stats.rows_per_second:,.0f} rows/s ({stats.seconds:.2f} s) with {model.id}"
        )
    click.echo(f"cache: {cache.root}")


def _bundled_items():
    from recengine.core.datasets import movielens_items

    return movielens_items()


def _field_texts(items: "pl.LazyFrame", field: str, source: str) -> list[str]:
    import polars as pl

    if field not in items.collect_schema():
        raise RecengineError(f"{source}: no text field '{field}'; its columns are {items.collect_schema().names()}.")
    return items.select(pl.col(field).cast(pl.String).fill_null("")).collect().to_series().to_list()


def _cache(cache_dir: Path | None):
    from recengine.parts.encoders import DEFAULT_CACHE_DIR, EmbeddingCache

    return EmbeddingCache(cache_dir or DEFAULT_CACHE_DIR)


cache_option = click.option(
    "--cache-dir", type=click.Path(path_type=Path), help="Embedding cache folder [default: .recengine/cache]."
)
learned_option = click.option(
    "--learned-state", type=click.Choice(["refit", "saved"]), default="refit", show_default=True,
    help="Learned parts (a collaborative model): refit on these events, or use the state saved with the model.",
)
model_option = click.option(
    "--model", "model_uri", required=True,
    help="Model folder, or MLflow URI such as models:/recengine-movielens@champion or runs:/RUN_ID/ranker.",
)

REPORT_METRICS = ("ndcg@5", "ndcg@10", "recall@10", "hr@10", "mrr@10", "auc", "coverage@10")


def _report(metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> None:
    """The ranker's metrics beside each baseline's, and its NDCG@10 lift over the best of them."""
    click.echo(f"  {'':22}" + "".join(f"{m:>12}" for m in REPORT_METRICS))
    for name, values in {"ranker": metrics, **baselines}.items():
        click.echo(f"  {name:22}" + "".join(f"{values.get(m, float('nan')):12.4f}" for m in REPORT_METRICS))
    best = max((v["ndcg@10"] for v in baselines.values()), default=0.0)
    if best > 0:
        click.echo(f"  ranker NDCG@10 / best baseline: {metrics['ndcg@10'] / best:.2f}x")


@cli.command()
@data_options
@click.option("--feature-set", default="movielens", show_default=True,
              help="Feature set: a TOML file (candidate sources, extractors, labels, ranker parameters) or the "
                   "name of a bundled one: movielens, impressions.")
@click.option("--experiment", default="recengine", show_default=True, help="MLflow experiment to log the run in.")
@click.option("--run-name", help="MLflow run name [default: the feature set file's name plus what differs from the previous run].")
@click.option("--model-name", help="Registered model name [default: recengine-<feature set name>].")
@click.option("--no-register", is_flag=True, help="Log the run and model but do not register it.")
@click.option("--promote", is_flag=True, help="Move @champion to this version even if it scores lower than the champion.")
@click.option("--output", type=click.Path(path_type=Path), help="Also write the model folder (model.txt, spec.json) here.")
@click.option("--chunk-requests", default=2_000, show_default=True, type=click.IntRange(min=1),
              help="Training requests built at a time (memory follows this; the model does not).")
@cache_option
@engine_option
@address_option
@click.option("--workers", type=click.IntRange(min=1),
              help="With --engine ray: LightGBM workers, each training on its share of the groups with the others "
                   "[default: one per Ray node].")
@_friendly_errors
def train(events, items, users, columns, timestamp_unit, feature_set, experiment, run_name, model_name, no_register, promote, output,
          chunk_requests, cache_dir, engine, address, workers) -> None:
    """Train a ranker, evaluate it on the latest requests, log it to MLflow and register it."""
    _check_engine(engine, address)
    if workers and engine != "ray":
        raise RecengineError(f"--workers {workers} spreads LightGBM over a Ray cluster, but the job runs with --engine "
                             f"{engine}; add --engine ray, or drop --workers (the local job uses every core).")
    from recengine.core.store import tracking_uri
    from recengine.interfaces.tracking import check_model_name, log_training, training_run
    from recengine.learning.model import check_model_destination
    from recengine.learning.training import check_ranker
    from recengine.learning.training import train as fit_ranker
    from recengine.parts.featureset import FeatureSet

    if output:
        check_model_destination(output)  # training takes minutes: a bad --output must fail now, not after it
    spec = FeatureSet.load(feature_set)
    if not no_register:
        check_model_name(model_name or f"recengine-{spec.name}")  # likewise a name the registry would refuse
    check_ranker(spec, str(feature_set))
    # Bad data is refused before a run exists: a failed run in the store would say nothing a user needs.
    dataset = load_dataset(events, items, users, columns, timestamp_unit)
    # The MLflow run covers the training (its duration, system metrics); a failure ends it FAILED.
    with training_run(spec, experiment, feature_set_path=feature_set, run_name=run_name):
        run_chunks = run_boost = None
        if engine == "ray":
            from recengine.running.distributed import ray_chunks
            from recengine.running.ray_lightgbm import ray_lightgbm

            run_chunks, run_boost = ray_chunks(address), ray_lightgbm(address, workers)
        result = fit_ranker(dataset, spec, _cache(cache_dir), progress=True, say=click.echo, chunk_requests=chunk_requests,
                            run_chunks=run_chunks, run_boost=run_boost)
        click.echo(f"validation metrics ({result.model.spec['metrics_measured']}; best "
                   f"{result.model.spec['early_stopping_metric']} at iteration {result.model.spec['early_stopped_at']}, "
                   f"final model {result.model.spec['best_iteration']} rounds):")
        _report(result.metrics, result.baselines)
        if output:
            click.echo(f"model folder: {result.model.save(output)}")
        logged = log_training(result, spec, experiment, None if no_register else (model_name or f"recengine-{spec.name}"), promote,
                              model_folder=output)
    click.echo(f"run id:    {logged.run_id}  '{logged.run_name}' (experiment '{experiment}', store {tracking_uri()})")
    click.echo(f"model URI: {logged.model_uri}")
    if logged.registered:
        alias = "; alias @champion now points here" if logged.champion else "; @champion unchanged (it scores higher)"
        click.echo(f"registered: models:/{logged.registered}/{logged.version}{alias}")


@cli.command()
@model_option
@data_options
@click.option("--since", type=click.DateTime(), help="Window start (UTC) [default: the latest 10% of events by time].")
@click.option("--until", type=click.DateTime(), help="Window end, exclusive (UTC) [default: the last event].")
@cache_option
@_friendly_errors
def evaluate(model_uri, events, items, users, columns, timestamp_unit, since, until, cache_dir) -> None:
    """Evaluate a model on a held-out time window: one request per user at their first event in it."""
    from recengine.learning.model import load_model
    from recengine.learning.training import evaluate_window

    model = load_model(model_uri)
    dataset = load_dataset(events, items, users, columns, timestamp_unit)
    if since is None:
        import polars as pl

        since = dataset.events.select(pl.col("timestamp").quantile(0.9, interpolation="lower")).collect().item()
    trained_until = model.spec.get("trained_on", {}).get("last_event")
    if trained_until and since < datetime.fromisoformat(trained_until):
        click.echo(f"warning: the model was trained on events up to {trained_until}, after the window's start "
                   f"{since}: these metrics are optimistic. Train on events before --since for an honest figure.", err=True)
    metrics, baselines, requests = evaluate_window(model, dataset, since, until, _cache(cache_dir))
    click.echo(f"{requests} requests from {since} to {until or 'the end'}:")
    _report(metrics, baselines)


@cli.command()
@model_option
@data_options
@click.option("--requests", "requests_path", type=click.Path(path_type=Path),
              help="File of requests (user_id, timestamp) [default: every user, just after the last event].")
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1), help="Items per request.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("output/recommendations.parquet"), show_default=True)
@cache_option
@learned_option
@_friendly_errors
def recommend(model_uri, events, items, users, columns, timestamp_unit, requests_path, k, output, cache_dir,
              learned_state="refit") -> None:
    """Top-k items per request: candidates, features as of the request time, seen items excluded."""
    from recengine.core.data import parse_mapping, write_parquet_atomic
    from recengine.learning.model import load_model
    from recengine.parts.context import FeatureContext
    from recengine.running.batch import check_output_file
    from recengine.running.requests import recommend_requests, unserved

    check_output_file(output)  # before any work: an unwritable --output must not fail only at the end
    model = load_model(model_uri)
    dataset = load_dataset(events, items, users, columns, timestamp_unit)
    requests = recommend_requests(dataset, requests_path, parse_mapping(columns), timestamp_unit)
    if requests.repeats:
        click.echo(f"{requests.repeats:,} repeated request(s) dropped from {requests_path} (the same user and time "
                   "again; the first was ranked).")
    context = FeatureContext.from_frames(dataset.events, dataset.items, cache=_cache(cache_dir), progress=True)
    if learned_state == "saved":
        model.use_saved_state(context)
    ranked = model.recommend(requests.frame.select("user_id", "timestamp"), context, k)
    write_parquet_atomic(ranked, output)
    click.echo(f"{ranked.height:,} recommendations for {requests.frame.height:,} requests written to {output}")
    note = unserved(requests, ranked)
    if note:
        click.echo(note, err=True)


@cli.command()
@model_option
@data_options
@click.option("--input", "input_path", required=True,
              help="Candidates (user_id, item_id[, timestamp][, request_id]) or, with --generate, requests: a parquet "
                   "file or folder; with --engine ray also a URI (file://, s3://...).")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Parquet file for the top k per request.")
@click.option("--generate", is_flag=True, help="The input is requests: the model's candidate sources propose the items.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1), help="Items kept per request.")
@click.option("--chunk-rows", default=1_000_000, show_default=True,
              help="Candidate rows per chunk (memory follows this); with --generate, each request counts as the sources' k.")
@cache_option
@engine_option
@address_option
@learned_option
@_friendly_errors
def rank(model_uri, events, items, users, columns, timestamp_unit, input_path, output, generate, k, chunk_rows, cache_dir,
         engine, address, learned_state="refit") -> None:
    """Batch-rank a candidates or requests table in chunks; a killed job resumes where it stopped."""
    _check_engine(engine, address)
    from recengine.core.data import parse_mapping
    from recengine.learning.model import load_model
    from recengine.parts.context import FeatureContext
    from recengine.running.batch import check_output_file, rank_file

    check_output_file(output)  # before loading anything (rank_file checks again, for callers in Python)
    model = load_model(model_uri)
    dataset = load_dataset(events, items, users, columns, timestamp_unit)
    context = FeatureContext.from_frames(dataset.events, dataset.items, cache=_cache(cache_dir))
    if learned_state == "saved":
        model.use_saved_state(context)
    job = rank_file
    if engine == "ray":
        from recengine.running.distributed import rank_on_ray

        # It joins the cluster after checking the input, so bad input never waits for a cluster.
        job = functools.partial(rank_on_ray, address=address)
    report = job(model, input_path, output, context, k, chunk_rows, generate, parse_mapping(columns))
    resumed = f", {report.skipped} finished earlier and skipped" if report.skipped else ""
    click.echo(f"{report.rows:,} input rows in {report.chunks} chunk(s){resumed}: top {k} for {report.requests:,} "
               f"requests written to {report.output} in {report.seconds:.1f} s ({report.rows / report.seconds:,.0f} rows/s)")
    if report.duplicates:
        click.echo(f"{report.duplicates:,} repeated input row(s) dropped (the same request, or the same candidate of a "
                   "request, given again; the first was ranked): check how the input was made if that is unexpected.")


@cli.command()
@data_options
@click.option("--mode", type=click.Choice(["head", "lora", "adalora", "full", "offset"]), default="head", show_default=True,
              help="head: a linear map on the frozen, cached embeddings (seconds on a CPU); lora: adapters in the "
                   "encoder's attention; adalora: adapters whose ranks move to where tuning needs them; full: every "
                   "weight (lora, adalora and full want a GPU on a large log); offset: a bounded offset per warm item "
                   "(its file is a record: it serves only inside a feature set's model).")
@click.option("--field", default="title", show_default=True, help="The items' text field to tune on.")
@click.option("--encoder", default="transformers", show_default=True, help="Registered encoder name (the base model).")
@click.option("--encoder-param", "encoder_params", multiple=True, help="Base encoder parameter key=value (repeatable), e.g. model=PATH.")
@click.option("--param", "params", multiple=True,
              help="Tuning setting key=value (repeatable): epochs, batch_size, lr, temperature, patience, recall_k, hard_negatives, "
                   "max_pairs, holdout, seed, lora_rank, lora_alpha, recent, history, half_life_days, weight_by_value; adalora: "
                   "adalora_init_rank, adalora_warmup, adalora_final, adalora_interval, adalora_orth_weight.")
@click.option("--until", type=click.DateTime(), help="Tune on the events before this time (UTC) [default: after the last event].")
@click.option("--output", type=click.Path(path_type=Path), default=Path("adapter.safetensors"), show_default=True,
              help="The adapter file to write (an existing adapter file is replaced; any other file is refused).")
@click.option("--experiment", default="recengine-tuning", show_default=True, help="MLflow experiment to log the run in.")
@click.option("--run-name", help="MLflow run name [default: tune MODE FIELD].")
@_friendly_errors
def tune(events, items, users, columns, timestamp_unit, mode, field, encoder, encoder_params, params, until, output,
         experiment, run_name) -> None:
    """Tune a text encoder on what users took next; write the adapter file and log the run to MLflow."""
    import time

    import mlflow

    from recengine.core.store import tracking_uri
    from recengine.errors import ConfigError, DataError
    from recengine.interfaces.tracking import log_tuning, tuning_run
    from recengine.learning.tuning import tuning_window
    from recengine.parts import plugins
    from recengine.parts.adapters import check_adapter_destination, save_adapter

    check_adapter_destination(output)  # before the tuning: only a file tune wrote may be replaced
    base_params, settings = parse_params(encoder_params), parse_params(params)
    taken = sorted(set(settings) & {"mode", "field", "encoder", "encoder_params"})
    if taken:
        raise ConfigError(f"--param {taken[0]}=...: give it with --{taken[0].replace('_', '-')} instead.")
    part = plugins.create("feature_extractors", "tuned_interest",
                          {"encoder": encoder, "encoder_params": base_params, "field": field, "mode": mode, **settings})
    dataset = load_dataset(events, items, users, columns, timestamp_unit)
    if dataset.items is None:
        raise DataError("recengine tune learns from the items' text, and no items file was given; pass --items "
                        f"with a text field '{field}'.")
    log = dataset.events.select("user_id", "item_id", "timestamp").collect()
    window, tuned_until = tuning_window(log, until)
    if until is not None and until > log["timestamp"].max():
        click.echo(f"--until {until} is after the last event: the adapter is marked as tuned until "
                   f"{tuned_until} (just after that event), so requests from then on may use it.")
    until = tuned_until
    catalogue = dataset.items.collect()
    part.tuning = {**part.tuning, "progress": True}  # a bar per epoch with loss and pairs/s (the part's fit is silent)
    click.echo(f"tuning {mode} on {field} with {encoder} on {window.height:,} events before {until}")
    with tuning_run(experiment, run_name or f"tune {mode} {field}", {"dataset": dataset.name}) as run_id:
        started = time.perf_counter()
        state = part.fit(window, catalogue)
        seconds = time.perf_counter() - started
        result, pairs = part.last_tuning  # (fewer than two pairs: the part refused, the run ends FAILED saying why)
        adapter = part.adapter(state, until)
        written = save_adapter(output, adapter)
        k = part.tuning["k"]
        log_tuning(mlflow, {**part.settings(), "tuned_until": until.isoformat(), "pairs": pairs,
                            "events": window.height, "dataset": dataset.name, "best_epoch": result.best_epoch},
                   state, written, {"tune_seconds": seconds, "tune_pairs_per_s": result.pairs_per_second})
    uri = f"runs:/{run_id}/{written.name}"
    recall = state["recall"]
    click.echo(f"tuned on {pairs:,} pairs in {seconds:.1f} s ({result.pairs_per_second:,.0f} pairs/s in training steps); "
               f"held-out recall@{k}: {recall[0]:.4f} frozen, {recall.max():.4f} tuned (epoch {result.best_epoch})")
    ranks = part.ranks(state)
    if ranks:
        click.echo(f"adalora ranks: {sum(ranks.values())} in all (from {len(ranks) * part.adalora.init_rank}), per module "
                   + ", ".join(f"{module.removeprefix('encoder.')}={rank}" for module, rank in ranks.items()))
    click.echo(f"adapter:     {written} ({mode}, digest {adapter.digest[:16]})")
    click.echo(f"run id:      {run_id} (experiment '{experiment}', store {tracking_uri()})")
    click.echo(f"adapter URI: {uri}")
    adapted = {**base_params, "adapter": uri}
    click.echo("Use it in a feature set (interest features and embedding candidates in the tuned space):\n"
               f"  [features.interest]\n  encoder = \"{encoder}\"\n  encoder_params = {_toml_inline(adapted)}\n"
               f"  fields = [\"{field}\"]\n"
               f"  [candidates.embedding]\n  encoder = \"{encoder}\"\n  encoder_params = {_toml_inline(adapted)}\n"
               f"  field = \"{field}\"")
    click.echo(f"It has seen the events before {until}: requests before then get null features and no candidates from it.")
    boundary = log["timestamp"].quantile(0.5, interpolation="lower")
    if until > boundary:
        click.echo(f"For a ranker to learn from it, tune on the events before its training requests, e.g. --until "
                   f"{boundary:%Y-%m-%dT%H:%M:%S} (the median event, [labels] learned_fraction's default boundary).")
    embed_params = " ".join(f"--param {k}={v}" for k, v in adapted.items())
    click.echo(f"next: recengine embed --field {field} --encoder {encoder} {embed_params}   "
               "(caches the tuned catalogue), then recengine train --feature-set YOUR.toml")


def _toml_inline(values: dict[str, Any]) -> str:
    """A TOML inline table (strings, numbers and booleans as JSON writes them, which TOML reads alike)."""
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + " }"


def bundled_feature_set(name: str = "movielens") -> Path:
    """The bundled feature set NAME's file, shipped inside the package (the repository's features/NAME.toml)."""
    from recengine.parts.featureset import bundled

    return bundled(name)


@cli.command()
@cache_option
@click.pass_context
@_friendly_errors
def quickstart(ctx, cache_dir) -> None:
    """The whole job on the bundled MovieLens: validate, embed, train, log to MLflow, recommend."""
    from recengine.core.datasets import movielens
    from recengine.parts.encoders import create_encoder
    from recengine.parts.encoders import embed as embed_texts

    dataset = movielens()
    click.echo(f"1/4 validating {dataset.name} (bundled; licence: recengine/core/datasets/movielens/README.txt)")
    for key, value in dataset.summary().items():
        click.echo(f"  {key:16} {value}")
    encoder = create_encoder("transformers")
    cache = _cache(cache_dir)
    click.echo(f"2/4 embedding item titles and genres with {encoder.id}")
    for field in ("title", "genres"):
        texts = _field_texts(dataset.items, field, "the bundled catalogue")
        _, stats = embed_texts(texts, encoder, cache, progress=True)
        click.echo(f"  {field}: {stats.misses} encoded, {stats.hits} from cache, {stats.rows_per_second:,.0f} rows/s")
    click.echo("3/4 training the ranker (features/movielens.toml) and logging it to MLflow")
    data = dict(events=None, items=None, users=None, columns=None, timestamp_unit="auto", cache_dir=cache_dir)
    ctx.invoke(train, **data, feature_set=bundled_feature_set(), experiment="recengine", run_name=None, model_name=None,
               no_register=False, promote=False, output=None)
    output = Path("output/recommendations.parquet")
    click.echo("4/4 recommending 10 movies to every user, as of just after the last event")
    ctx.invoke(recommend, model_uri="models:/recengine-movielens@champion", **data, requests_path=None, k=10, output=output)
    import polars as pl

    sample = pl.read_parquet(output).filter(pl.col("user_id") == 1).join(
        dataset.items.select("item_id", "title").collect(), on="item_id", how="left")
    click.echo("user 1's top 10:\n" + "\n".join(f"  {r['rank']:2}. {r['title']}" for r in sample.iter_rows(named=True)))
    click.echo("Compare runs in the MLflow UI: mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db, then open "
               "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the \"Model training\" view)")


if __name__ == "__main__":
    cli()
