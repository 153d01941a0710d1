"""The new-item policy's trade-off on MovieLens ml-latest-small, rolling origin (issue 23, part 3).

The protocol is benchmarks/movielens.py's (`recengine.core.rolling`): at each cutoff c recengine trains
on the events before c, once per labels seed, and ranks the window's requests (the users active before
c with catalogue items new to them in [c, next cutoff)). Each trained model's scored candidates are then
ranked with the policy off and with every [policy] of a grid of `slots` x `min_score`, through the
policy's own code (`recengine.parts.policy.top`, what `recommend`, `Ranker.rank` and the batch and Ray
jobs apply), so the settings differ only in the policy: same model, same candidates, same features.
"New" is the policy's rule at the request's time (c): with the default `--max-events 1`, an item nobody
took before c, which is exactly the protocol's cold truth.

Per setting, averaged over the (cutoff, user) requests as movielens.py does: NDCG@10; NDCG@10 on the
warm truth only (truth items with an event before c; over the requests that have such an item); cold
recall@10 pooled (the share of all cold truth rows found in the top 10) and per request (each request's
share of its own cold truth, averaged over the requests with any); Recall@10; and the new items the
policy placed per list (items not in the policy-off top 10). Each is the median over the seeds, and
"x off" is the median over the seeds of the setting's NDCG@10 divided by the same model's policy-off
NDCG@10. Lists are scored in their own order (score = -rank): the policy keeps the ranker's score on
the items it places, so sorting by score would undo it. The ceiling printed is the share of the cold
truth in the policy's pool at all (new candidates with a score): no slots or threshold reaches more.
So is an oracle's, per slot count: every slot a cold truth item while the request has one left.
The table (CSV) and the trade-off plot (x: cold recall@10, y: NDCG@10 relative to off, one
labelled point per setting) are logged to MLflow (`MLFLOW_TRACKING_URI`, else ./mlruns/mlflow.db;
experiment `--experiment`) and the plot is written to docs/policy_tradeoff.png for the README.

    .venv/bin/python benchmarks/policy_tradeoff.py [--feature-set features/tuned.toml] [--cutoffs 10] [--seeds 3]
    .venv/bin/python benchmarks/policy_tradeoff.py --cutoffs 3 --seeds 1 --slots 1,2,3 --min-score 0.6,0.7,0.75,0.8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from recengine.core import rolling
from recengine.parts import policy as new_items
from recengine.parts.encoders import DEFAULT_CACHE_DIR, EmbeddingCache
from recengine.parts.featureset import FeatureSet

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/movielens.py, however this is run
from movielens import KEYS, TOP, protocol, score, scored_candidates, tagged, with_seed

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FEATURE_SET = ROOT / "features" / "tuned.toml"
DEFAULT_PLOT = ROOT / "docs" / "policy_tradeoff.png"
OFF = "off"
GOAL_COLD, GOAL_RATIO = 0.10, 0.97  # issue 23's goal: cold recall@10 >= 0.10 at NDCG@10 >= 0.97x off


def numbers(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def settings(loaded: FeatureSet, source: str, score_column: str, slots: list[int], mins: list[float],
             max_events: int, max_age_days: float) -> list[tuple[str, int, float, new_items.NewItemPolicy | None]]:
    """(label, slots, min_score, policy) for off and each grid point; each [policy] is checked as a feature
    set's would be at load (a score column the set does not compute is refused there)."""
    out: list[tuple[str, int, float, new_items.NewItemPolicy | None]] = [(OFF, 0, float("nan"), None)]
    for s in slots:
        for m in mins:
            table = {"slots": s, "score": score_column, "min_score": m, "max_events": max_events,
                     "max_age_days": max_age_days}
            checked = FeatureSet.from_dict({**loaded.to_dict(), "policy": table}, f"{source} with [policy] {table}")
            out.append((f"{s} slot{'s' if s > 1 else ''}, >= {m:g}", s, m, new_items.NewItemPolicy.of(checked)))
    return out


def new_pool(window: rolling.Window, scored: pl.DataFrame, policy: new_items.NewItemPolicy, context,
             exclude_seen: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The candidates the policy could place at this cutoff with any threshold and any number of slots
    (new, with a score), and the cold truth rows among them: no setting's cold recall exceeds their share."""
    pool = new_items.eligible(scored.filter(pl.col(new_items.SCORE).is_not_null()), policy, context, exclude_seen)
    pool = pool.unique(["_request_id", "item_id"])
    return pool, pool.join(window.truth.filter(pl.col("cold")), on=["user_id", "item_id"], how="semi")


def describe_new(window: rolling.Window, pool: pl.DataFrame, hit: pl.DataFrame, column: str) -> str:
    """The policy's pool at this cutoff and its score's quantiles, the cold truth apart: what `--min-score`
    should be chosen from."""

    def quantiles(frame: pl.DataFrame) -> str:
        if not frame.height:
            return "-"
        return "/".join(f"{frame[new_items.SCORE].quantile(q, 'nearest'):.2f}" for q in (0.1, 0.5, 0.9, 0.99))

    return (f"{pool.height / max(window.requests.height, 1):.0f} new candidates per request with a score, "
            f"{hit.height} of the {window.truth['cold'].sum()} cold truth rows among them; {column} quantiles "
            f"10/50/90/99%: all {quantiles(pool)}, cold truth {quantiles(hit)}")


def run_seed(chosen: list[rolling.Window], feature_set: FeatureSet, grid, cache: EmbeddingCache, seed: int,
             diagnose: bool) -> tuple[dict[str, pl.DataFrame], list[float], int]:
    """Every setting's top 10 over all cutoffs (score = -rank: the list's own order), trained once per
    cutoff; the training seconds; and the cold truth rows the policy's pool holds (`new_pool`)."""
    tops: dict[str, list[pl.DataFrame]] = {label: [] for label, *_ in grid}
    trained_s, reachable = [], 0
    any_policy = next((p for *_, p in grid if p is not None), None)
    for window in chosen:
        result, context, rows, matrix, trained = scored_candidates(window, feature_set, cache)
        trained_s.append(trained)
        model = result.model
        exclude_seen = model.feature_set().exclude_seen
        # Every setting shares one score column, read from the model's feature matrix as every ranking path does.
        scored = new_items.with_policy_score(rows, matrix, model.features, any_policy)
        started = time.perf_counter()
        for label, _, _, policy in grid:
            top = new_items.top(scored, ["_request_id"], TOP, policy, context, exclude_seen)
            tops[label].append(tagged(top.select("user_id", "item_id", (-pl.col("rank").cast(pl.Float64)).alias("score")),
                                      window))
        print(f"seed {seed}, cutoff {window.label}: trained in {trained:.1f} s, {rows.height / window.requests.height:.0f} "
              f"candidates per request, {len(grid)} settings ranked in {time.perf_counter() - started:.1f} s", flush=True)
        if any_policy is not None:
            pool, hit = new_pool(window, scored, any_policy, context, exclude_seen)
            reachable += hit.height
            if diagnose:
                print("  " + describe_new(window, pool, hit, any_policy.score), flush=True)
    return {label: pl.concat(parts) for label, parts in tops.items()}, trained_s, reachable


def measure(top: pl.DataFrame, off: pl.DataFrame, truth: pl.DataFrame) -> dict[str, float]:
    every = score(top, truth)
    warm = score(top, truth.filter(~pl.col("cold")))
    placed = top.join(off, on=[*KEYS, "item_id"], how="anti").height
    return {"ndcg@10": every["ndcg@10"], "warm_ndcg@10": warm["ndcg@10"], "cold_recall@10": every["cold_recall"],
            "cold_recall_req@10": every["cold_recall_req"], "recall@10": every["recall@10"],
            "new_per_list": placed / truth.select(KEYS).n_unique()}


def oracle(truth: pl.DataFrame, slots: list[int]) -> list[tuple[int, float, float]]:
    """(slots, pooled, per request): the cold recall@10 of a policy that filled every slot with a cold truth
    item whenever the request has one left. No score does better: with s slots a request finds at most
    s of its cold items, which bounds the pooled figure by (requests x s) / cold truth rows."""
    per = truth.group_by(KEYS).agg(pl.col("cold").sum().alias("c")).filter(pl.col("c") > 0)
    out = []
    for s in slots:
        found = pl.min_horizontal(pl.col("c"), pl.lit(s))
        out.append((s, per.select(found.sum())[0, 0] / per["c"].sum(), per.select((found / pl.col("c")).mean())[0, 0]))
    return out


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(grid, per_seed: list[dict[str, dict[str, float]]]) -> pl.DataFrame:
    """One row per setting: each metric's median over the seeds, and the ratios to the same seed's off."""
    rows = []
    for label, slots, min_score, policy in grid:
        runs = [seed[label] for seed in per_seed]
        offs = [seed[OFF] for seed in per_seed]
        rows.append({
            "setting": label, "slots": slots, "min_score": None if policy is None else min_score,
            "ndcg@10": median(runs, "ndcg@10"),
            "ndcg_x_off": statistics.median(r["ndcg@10"] / o["ndcg@10"] for r, o in zip(runs, offs)),
            "warm_ndcg@10": median(runs, "warm_ndcg@10"),
            "warm_x_off": statistics.median(r["warm_ndcg@10"] / o["warm_ndcg@10"] for r, o in zip(runs, offs)),
            "cold_recall@10": median(runs, "cold_recall@10"), "cold_recall_req@10": median(runs, "cold_recall_req@10"),
            "recall@10": median(runs, "recall@10"),
            "new_per_list": median(runs, "new_per_list"),
        })
    frame = pl.DataFrame(rows)
    return frame.with_columns(((pl.col("cold_recall@10") >= GOAL_COLD) & (pl.col("ndcg_x_off") >= GOAL_RATIO)).alias("goal"))


def print_table(frame: pl.DataFrame) -> None:
    print(f"\n{'setting':20}{'NDCG@10':>9}{'x off':>7}{'warm NDCG':>10}{'x off':>7}{'cold rec':>9}{'per req':>8}"
          f"{'Recall@10':>10}{'new/list':>9}  goal")
    for r in frame.iter_rows(named=True):
        print(f"{r['setting']:20}{r['ndcg@10']:9.4f}{r['ndcg_x_off']:7.3f}{r['warm_ndcg@10']:10.4f}{r['warm_x_off']:7.3f}"
              f"{r['cold_recall@10']:9.4f}{r['cold_recall_req@10']:8.4f}{r['recall@10']:10.4f}{r['new_per_list']:9.2f}"
              f"  {'yes' if r['goal'] else ''}")


def plot(frame: pl.DataFrame, path: Path, title: str, ceiling: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    top = max(frame["cold_recall@10"].max(), ceiling, GOAL_COLD) * 1.2
    ax.axvline(ceiling, color="grey", lw=1, ls=":", label="ceiling: cold truth in the policy's pool")
    ax.fill_between([GOAL_COLD, top], GOAL_RATIO, 1.02, color="tab:green", alpha=0.08, label="goal (issue 23)")
    ax.axvline(GOAL_COLD, color="tab:green", lw=0.8, ls="--")
    ax.axhline(GOAL_RATIO, color="tab:green", lw=0.8, ls="--")
    for slots in sorted(set(frame["slots"].to_list())):
        part = frame.filter(pl.col("slots") == slots).sort("min_score", descending=True)
        kind = {"marker": "s", "color": "black"} if slots == 0 else {"marker": "o"}
        ax.plot(part["cold_recall@10"], part["ndcg_x_off"], ls="-" if slots else "", **kind,
                label="policy off" if slots == 0 else f"slots = {slots}")
        # Thresholds that change nothing give the same point: one label for them all.
        points = part.group_by(pl.col("cold_recall@10").round(6), pl.col("ndcg_x_off").round(6), maintain_order=True).agg(
            pl.col("min_score"))
        for x, y, mins in points.iter_rows():
            text = "off" if slots == 0 else "/".join(f"{m:g}" for m in mins)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(-0.005, top)
    low = min(frame["ndcg_x_off"].min(), GOAL_RATIO) - 0.01
    ax.set_ylim(low, 1.02)
    ax.set_xlabel("cold recall@10 (truth items nobody took before the cutoff, found in the top 10)")
    ax.set_ylabel("NDCG@10 / NDCG@10 with the policy off")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(experiment: str, params: dict, metrics: dict, frame: pl.DataFrame, plot_path: Path, printed: str) -> str:
    import mlflow

    from recengine.core.store import open_store
    from recengine.interfaces.tracking import _experiment

    mlflow.set_tracking_uri(open_store())
    mlflow.set_experiment(experiment_id=_experiment(mlflow, experiment))  # created as training's are: artifacts in mlruns/artifacts
    with mlflow.start_run(run_name=f"policy trade-off, {params['feature_set']}") as run, tempfile.TemporaryDirectory() as folder:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for r in frame.iter_rows(named=True):
            name = "off" if r["slots"] == 0 else f"slots{r['slots']}_min{r['min_score']:g}"
            mlflow.log_metrics({f"{name}.{key.replace('@', '_at_')}": r[key] for key in
                                ("ndcg@10", "ndcg_x_off", "warm_ndcg@10", "warm_x_off", "cold_recall@10",
                                              "cold_recall_req@10", "new_per_list")})
        csv = Path(folder) / "policy_tradeoff.csv"
        frame.write_csv(csv)
        (Path(folder) / "policy_tradeoff.txt").write_text(printed)
        mlflow.log_artifact(str(csv))
        mlflow.log_artifact(str(Path(folder) / "policy_tradeoff.txt"))
        mlflow.log_artifact(str(plot_path))
        return run.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feature-set", default=str(DEFAULT_FEATURE_SET), help="Trained once per cutoff and seed.")
    parser.add_argument("--cutoffs", type=int, default=len(rolling.QUANTILES), help="N of the 10 cutoffs, evenly spaced.")
    parser.add_argument("--seeds", type=int, default=3, help="Trainings with [labels] seed 0..N-1; medians are shown.")
    parser.add_argument("--score", default="tuned_title_max", help="The policy's score: a column the feature set computes.")
    parser.add_argument("--slots", default="1,2,3", help="Comma-separated slot counts.")
    parser.add_argument("--min-score", default="0.6,0.7,0.75,0.8", help="Comma-separated thresholds on the score's scale.")
    parser.add_argument("--max-events", type=int, default=1, help="[policy] max_events (1: nobody took it before).")
    parser.add_argument("--max-age-days", type=float, default=0.0, help="[policy] max_age_days (0: no age rule).")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="Where the trade-off plot (PNG) goes.")
    parser.add_argument("--experiment", default="recengine-benchmarks", help="The MLflow experiment.")
    parser.add_argument("--no-mlflow", action="store_true", help="Print and plot only.")
    args = parser.parse_args()

    loaded = FeatureSet.load(args.feature_set)
    grid = settings(loaded, args.feature_set, args.score, numbers(args.slots, int), numbers(args.min_score),
                    args.max_events, args.max_age_days)
    chosen, truth, described = protocol(args.cutoffs)
    print(f"{described}; {Path(args.feature_set).name}, policy score {args.score}, {len(grid) - 1} settings and off",
          flush=True)

    cache = EmbeddingCache(DEFAULT_CACHE_DIR)
    per_seed, trained, ceilings = [], [], []
    for seed in range(args.seeds):
        tops, seconds, reachable = run_seed(chosen, with_seed(loaded, args.feature_set, seed), grid, cache, seed, diagnose=seed == 0)
        trained += seconds
        ceilings.append(reachable / truth["cold"].sum())
        per_seed.append({label: measure(top, tops[OFF], truth) for label, top in tops.items()})
        print(f"seed {seed}: NDCG@10 off {per_seed[-1][OFF]['ndcg@10']:.4f}", flush=True)

    frame = table(grid, per_seed)
    command = "benchmarks/policy_tradeoff.py " + " ".join(sys.argv[1:])
    title = (f"New-item policy on ml-latest-small, rolling origin: {len(chosen)} cutoffs, median of {args.seeds} "
             f"seed{'s' if args.seeds > 1 else ''}\n{Path(args.feature_set).name}, score {args.score}, "
             f"max_events {args.max_events}, max_age_days {args.max_age_days:g}; labels: min_score")
    header = (f"{command}\n{len(chosen)} cutoffs, {args.seeds} seed(s), {Path(args.feature_set).name}, score {args.score}, "
              f"max_events {args.max_events}, max_age_days {args.max_age_days:g}; training per cutoff median "
              f"{statistics.median(trained):.0f} s")
    print("\n" + header)
    print_table(frame)
    ceiling = statistics.median(ceilings)
    ceiling_line = (f"cold recall@10 ceiling: {ceiling:.4f} of the cold truth rows are new candidates with a score "
                    "(the policy's pool: no slots or threshold reaches more)")
    oracle_lines = [f"oracle with {n} slot{'s' if n > 1 else ''} (every slot a cold truth item while one is left): "
                    f"cold recall@10 {pooled:.4f} pooled, {per_request:.4f} per request"
                    for n, pooled, per_request in oracle(truth, numbers(args.slots, int))]
    ceiling_line = "\n".join([ceiling_line, *oracle_lines])
    print(ceiling_line)
    plot(frame, Path(args.plot), title, ceiling)
    print(f"\nplot: {args.plot}")
    best = frame.filter(pl.col("goal")).sort("cold_recall@10", "ndcg_x_off", descending=True)
    if best.height:
        r = best.row(0, named=True)
        print(f"meets the goal with the most cold recall: {r['setting']} (cold recall {r['cold_recall@10']:.4f}, "
              f"NDCG@10 {r['ndcg_x_off']:.3f}x off)")
    else:
        print(f"no setting meets the goal (cold recall@10 >= {GOAL_COLD} at NDCG@10 >= {GOAL_RATIO}x off)")
    if not args.no_mlflow:
        import io
        from contextlib import redirect_stdout

        printed = io.StringIO()
        with redirect_stdout(printed):
            print(header)
            print_table(frame)
            print(ceiling_line)
        params = {"feature_set": Path(args.feature_set).name, "score": args.score, "cutoffs": len(chosen),
                  "seeds": args.seeds, "slots": args.slots, "min_score": args.min_score, "max_events": args.max_events,
                  "max_age_days": args.max_age_days, "command": command}
        run_id = log_to_mlflow(args.experiment, params, {"cold_recall_ceiling": ceiling}, frame, Path(args.plot), printed.getvalue())
        print(f"MLflow: experiment '{args.experiment}', run {run_id}")


if __name__ == "__main__":
    main()
