"""Training and batch ranking as the log grows: `recengine train` and `recengine rank --generate` on
seeded synthetic logs (benchmarks/synthlog.py) of 0.1M, 1M, 5M and 20M events.

For each size the log is generated once (cached under `--data`, benchmarks/.data/ by default, keyed by
the generator's version, size and seed), then `recengine train` runs in its own process, in a fresh
temporary folder (its MLflow store, ./mlruns, and the model folder live there and are deleted after),
and then `recengine rank --generate` on the model it wrote, with one request per user just after the
last event (the nightly batch job). Each command's wall time and peak resident memory (its process
tree's, from wait4) are measured here; train's stages are the `time/..._s` metrics it logs to MLflow
(read back from the run), rank's are its own report (the ranking) and the rest (loading the model,
the data and the state). The table shows seconds, peak MB and rows per second (train: log events per
second; rank: requests per second), then the growth exponent of each stage's time (and of peak
memory) against the log size: the log-log slope between consecutive sizes and a least-squares fit
over all of them (1.0 is linear).

A command whose process tree passes `--memory-limit-gb` is killed and reported as such; training that
fails stops the sweep (larger logs would fail too). The embedding cache is shared across sizes
(`--cache-dir`, under `--data`), so item text is embedded once per title; `--cold-cache` gives each
run an empty one, timing the embedding too.

    .venv/bin/python benchmarks/train_scale.py [--sizes 0.1M,1M,5M,20M] [--feature-set movielens] [--seed 0] [--json out.json]
    .venv/bin/python benchmarks/train_scale.py --sizes 5M --skip-rank --ray   # Ray's overhead on one machine

With `--ray`, each size also trains with `--engine ray` on a local Ray started by the command (same
flags, its own folder), and the table gives its time and the ratio to the local run. Its peak MB is the
largest single process's (Ray's workers are not the command's children); the memory limit still
counts the command's process tree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthlog

ROOT = Path(__file__).resolve().parents[1]
RECENGINE = Path(sys.executable).with_name("recengine")
# recengine.learning.training's stages (TrainResult.timings), in their order, then tracking's logging.
STAGES = ["data", "learned_parts", "candidates_and_features", "lightgbm", "evaluation", "refit", "learned_parts_final",
          "logging"]


@dataclass
class Measured:
    """One command's run: wall seconds, peak resident MB (the process tree), its stages' seconds."""
    command: str
    events: int
    rows: int  # what rows/s counts: log events (train) or requests (rank)
    returncode: int = 0
    wall_s: float = 0.0
    peak_mb: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    note: str = ""


def ensure_log(data: Path, events: int, seed: int, ratings: bool) -> Path:
    """The generated log's folder, generating it unless a complete one of this version is there."""
    folder = data / f"synth-{synthlog.size_label(events)}-seed{seed}{'' if ratings else '-noratings'}"
    meta = folder / "meta.json"
    if meta.is_file():
        found = json.loads(meta.read_text())
        wanted = {"version": synthlog.VERSION, "events": events, "seed": seed, "ratings": ratings}
        if all(found.get(key) == value for key, value in wanted.items()):
            return folder
    started = time.perf_counter()
    made = synthlog.generate(folder, events, seed, ratings=ratings)
    print(f"generated {folder}: {made['events']:,} events, {made['users']:,} users, {made['items']:,} items "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def ensure_requests(folder: Path) -> Path:
    """One request per user, 1 second after the log's last event."""
    path = folder / "requests.parquet"
    if not path.is_file():
        events = pl.scan_parquet(folder / "events.parquet")
        at = events.select(pl.col("timestamp").max()).collect().item()
        users = events.select(pl.col("user_id").unique().sort()).collect()
        partial = folder / ".requests.parquet.partial"
        users.with_columns(pl.lit(at).dt.offset_by("1s").alias("timestamp")).write_parquet(partial)
        os.replace(partial, path)
    return path


def run_measured(command: list[str], cwd: Path, log: Path, limit_mb: float | None) -> tuple[int, float, float, str]:
    """Run `command` in `cwd` (stdout and stderr into `log`): (return code, wall s, peak MB, note). Peak
    memory is the kernel's maximum resident size of the process and the children it waited for; a
    watcher kills the process group if the tree's resident total passes `limit_mb`."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # ./mlruns in `cwd`
    killed: list[float] = []
    with open(log, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        done = threading.Event()

        def watch() -> None:
            while limit_mb and not done.wait(1.0):
                try:
                    root = psutil.Process(process.pid)
                    rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
                except psutil.Error:
                    continue
                if rss > limit_mb:
                    killed.append(rss)
                    os.killpg(process.pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        process.returncode = os.waitstatus_to_exitcode(status)
    note = f"killed at {killed[0]:,.0f} MB (--memory-limit-gb)" if killed else ""
    return process.returncode, wall, usage.ru_maxrss / 1024, note


def train_once(folder: Path, events: int, run: Path, args, engine: str = "local") -> Measured:
    model = run / "model"
    command = [str(RECENGINE), "train", "--events", str(folder / "events.parquet"), "--items", str(folder / "items.parquet"),
               "--feature-set", args.feature_set, "--experiment", "train-scale", "--run-name",
               f"train-scale {synthlog.size_label(events)}", "--no-register", "--output", str(model),
               "--cache-dir", str(args.cache(run)), "--engine", engine]
    log = run / f"train-{engine}.log"
    code, wall, peak, note = run_measured(command, run, log, args.limit_mb)
    measured = Measured("train" if engine == "local" else f"train-{engine}", events, events, code, wall, peak, note=note)
    output = log.read_text(errors="replace")
    found = re.search(r"run id:\s+(\w+)", output)
    if code or not found:
        measured.note = measured.note or _tail(output)
        return measured
    measured.stages = mlflow_timings(run, found.group(1))
    return measured


def mlflow_timings(run: Path, run_id: str) -> dict[str, float]:
    """The run's `time/<stage>_s` metrics: training's stages in their order (any new one after them),
    then the run's whole span."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{run / 'mlruns' / 'mlflow.db'}"
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    stages = {name.removeprefix("time/").removesuffix("_s"): value for name, value in metrics.items()
              if name.startswith("time/") and name.endswith("_s")}
    stages = dict(sorted(stages.items(), key=lambda kv: STAGES.index(kv[0]) if kv[0] in STAGES else len(STAGES)))
    if "total" in stages:  # the MLflow run's whole span (after loading the data), last
        stages["run total (MLflow)"] = stages.pop("total")
    return stages


def rank_once(folder: Path, events: int, run: Path, args) -> Measured:
    requests = ensure_requests(folder)
    count = pl.scan_parquet(requests).select(pl.len()).collect().item()
    command = [str(RECENGINE), "rank", "--model", str(run / "model"), "--events", str(folder / "events.parquet"),
               "--items", str(folder / "items.parquet"), "--input", str(requests), "--output", str(run / "ranked.parquet"),
               "--generate", "--chunk-rows", str(args.chunk_rows), "--cache-dir", str(args.cache(run))]
    code, wall, peak, note = run_measured(command, run, run / "rank.log", args.limit_mb)
    measured = Measured("rank", events, count, code, wall, peak, note=note)
    output = (run / "rank.log").read_text(errors="replace")
    found = re.search(r"written to .* in ([\d.]+) s \(", output)
    if code or not found:
        measured.note = measured.note or _tail(output)
        return measured
    ranking = float(found.group(1))
    measured.stages = {"load (model, data, state)": wall - ranking, "ranking": ranking}
    return measured


def _tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def slope(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def report(results: list[Measured]) -> str:
    lines = [f"{'size':>6}  {'command':<7} {'stage':<28} {'seconds':>9} {'peak MB':>9} {'rows/s':>11}"]
    for m in sorted(results, key=lambda m: (m.command == "rank", m.events, m.command)):
        label = synthlog.size_label(m.events)
        if m.returncode or not m.stages:
            lines.append(f"{label:>6}  {m.command:<7} FAILED (exit {m.returncode}) {m.note.splitlines()[0] if m.note else ''}")
            continue
        for stage, seconds in m.stages.items():
            lines.append(f"{label:>6}  {m.command:<7} {stage:<28} {seconds:>9.1f} {'':>9} {_rate(m.rows, seconds):>11}")
        lines.append(f"{label:>6}  {m.command:<7} {'process (wall)':<28} {m.wall_s:>9.1f} {m.peak_mb:>9,.0f} "
                     f"{_rate(m.rows, m.wall_s):>11}")
    if len({m.events for m in results if not m.returncode and m.stages}) > 1:
        lines += ["", ("growth exponent of time (and peak memory) against events: log-log slope between consecutive "
                       "sizes; overall fit")]
    ray = {m.events: m for m in results if m.command == "train-ray" and not m.returncode and m.stages}
    local = {m.events: m for m in results if m.command == "train" and not m.returncode and m.stages}
    for events in sorted(set(ray) & set(local)):
        lines.append(f"train --engine ray / local at {synthlog.size_label(events)}: wall {ray[events].wall_s / local[events].wall_s:.2f}x, "
                     f"candidates and features {ray[events].stages.get('candidates_and_features', 0) / local[events].stages.get('candidates_and_features', 1):.2f}x")
    for command in ("train", "train-ray", "rank"):
        done = sorted((m for m in results if m.command == command and not m.returncode and m.stages), key=lambda m: m.events)
        if len(done) < 2:
            continue
        sizes = [m.events for m in done]
        series = {stage: [m.stages.get(stage) for m in done] for stage in dict.fromkeys(s for m in done for s in m.stages)}
        series["process (wall)"] = [m.wall_s for m in done]
        series["peak MB"] = [m.peak_mb for m in done]
        for stage, values in series.items():
            if any(v is None or v <= 0 for v in values):
                continue
            steps = [f"{synthlog.size_label(a)}->{synthlog.size_label(b)} {math.log(y / x) / math.log(b / a):.2f}"
                     for a, b, x, y in zip(sizes, sizes[1:], values, values[1:])]
            lines.append(f"  {command:<6} {stage:<28} {', '.join(steps)}; overall {slope(sizes, values):.2f}")
    return "\n".join(lines)


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0.1M,1M,5M,20M", help="Log sizes in events, comma-separated (0.1M, 300k, 20M).")
    parser.add_argument("--feature-set", default="movielens", help="A bundled feature set's name or a TOML file.")
    parser.add_argument("--seed", type=int, default=0, help="The generator's seed.")
    parser.add_argument("--no-ratings", action="store_true", help="Logs without a `value` column.")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".data", help="Where generated logs are kept.")
    parser.add_argument("--cache-dir", type=Path, help="Embedding cache shared by the runs [default: DATA/cache].")
    parser.add_argument("--cold-cache", action="store_true", help="Each run embeds into its own empty cache.")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000, help="rank --chunk-rows.")
    parser.add_argument("--skip-rank", action="store_true", help="Only train.")
    parser.add_argument("--ray", action="store_true",
                        help="Also train each size with --engine ray (a local Ray on this machine) and report the ratio to local.")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="Kill a command whose processes hold more [default: 60%% of this machine's memory].")
    parser.add_argument("--keep", action="store_true", help="Keep each run's folder (model, MLflow store, logs).")
    parser.add_argument("--json", type=Path, help="Also write the measurements here.")
    args = parser.parse_args()
    import psutil

    args.limit_mb = (args.memory_limit_gb * 1024 if args.memory_limit_gb else 0.6 * psutil.virtual_memory().total / 2**20)
    if Path(args.feature_set).is_file():
        args.feature_set = str(Path(args.feature_set).resolve())
    shared = (args.cache_dir or args.data / "cache").resolve()
    args.cache = lambda run: run / "cache" if args.cold_cache else shared
    args.data = args.data.resolve()
    sizes = sorted(synthlog.parse_size(s) for s in args.sizes.split(","))
    print(f"feature set {args.feature_set}; embedding cache {'per run (cold)' if args.cold_cache else shared}; "
          f"memory limit {args.limit_mb / 1024:.1f} GB; {os.cpu_count()} CPUs", flush=True)

    results: list[Measured] = []
    for events in sizes:
        folder = ensure_log(args.data, events, args.seed, not args.no_ratings)
        run = Path(tempfile.mkdtemp(prefix=f"train-scale-{synthlog.size_label(events)}-"))
        try:
            trained = train_once(folder, events, run, args)
            results.append(trained)
            print(f"train {synthlog.size_label(events)}: exit {trained.returncode}, {trained.wall_s:.1f} s, "
                  f"peak {trained.peak_mb:,.0f} MB {trained.note}", flush=True)
            if trained.returncode or not trained.stages:
                print(f"training failed at {synthlog.size_label(events)} (log kept in {run}); larger logs are skipped")
                args.keep = True
                break
            if args.ray:  # the same training on a local Ray (its own folder: a fresh MLflow store and model)
                ray_run = Path(tempfile.mkdtemp(prefix=f"train-scale-{synthlog.size_label(events)}-ray-"))
                try:
                    on_ray = train_once(folder, events, ray_run, args, engine="ray")
                finally:
                    if not args.keep:
                        shutil.rmtree(ray_run, ignore_errors=True)
                results.append(on_ray)
                print(f"train --engine ray {synthlog.size_label(events)}: exit {on_ray.returncode}, {on_ray.wall_s:.1f} s "
                      f"({on_ray.wall_s / trained.wall_s:.2f}x local), peak {on_ray.peak_mb:,.0f} MB {on_ray.note}", flush=True)
            if not args.skip_rank:
                ranked = rank_once(folder, events, run, args)
                results.append(ranked)
                print(f"rank {synthlog.size_label(events)}: exit {ranked.returncode}, {ranked.wall_s:.1f} s, "
                      f"peak {ranked.peak_mb:,.0f} MB {ranked.note}", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(run, ignore_errors=True)
    print()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in results], indent=1) + "\n")


if __name__ == "__main__":
    main()
