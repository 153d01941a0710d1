"""The tuned text space against the frozen one on MovieLens ml-latest-small, rolling origin: the
embedding source alone, and what tuning costs.

Protocol (`recengine.rolling`, as `benchmarks/movielens.py`): at each cutoff c the tuning (`tuned_embedding`,
the very part `train` fits) sees only the events before c; the requests are the users with at least 5
events before c and a catalogue item new to them in [c, next cutoff), which are the truth. Both sources
propose their top 100 without the user's seen items: NDCG@10, Recall@10 and Recall@100 per (cutoff,
user), averaged; cold recall@100: of the truth rows whose item had no event before c, the share
proposed. Rows: the frozen `embedding` source, the tuned one, and each with `new_items = true` (only
items nobody took before c: the cold items' own candidates). Tuning: seconds, training pairs/s,
pairs, epochs and the process's peak memory growth while tuning, per cutoff.

    .venv/bin/python benchmarks/tune.py [--cutoffs 10] [--mode head] [--epochs 10] [--max-pairs 100000]
    .venv/bin/python benchmarks/tune.py --mode lora --cutoffs 3 --max-pairs 3000 --epochs 1 --batch-size 64 --lr 1e-4

The lora and full modes run a transformer forward and backward pass per batch over every item in its
pairs' histories, and encode the whole catalogue for each held-out recall: on a CPU, sample them small.
The catalogue's frozen embeddings come from the cache (`recengine embed` first, or the first cutoff
encodes them).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import polars as pl
import psutil

from recengine import rolling
from recengine.candidates import generate
from recengine.datasets import movielens
from recengine.encoders import DEFAULT_CACHE_DIR, EmbeddingCache
from recengine.extractors import FeatureContext, fit_learned
from recengine.features.interest import EmbeddingSource
from recengine.features.tuned import TunedEmbeddingSource
from recengine.metrics import evaluate

KEYS = ["cutoff", "user_id"]
K = 100
SOURCES = ("embedding", "tuned_embedding", "embedding new_items", "tuned_embedding new_items")


class PeakMemory:
    """The process's resident memory growth over a block, sampled every 50 ms (torch's allocations are
    not Python's, so tracemalloc would not see them)."""

    def __enter__(self) -> "PeakMemory":
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.start)
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss - self.start)


def sources(args) -> list[tuple[str, object]]:
    tuning = {"mode": args.mode, "epochs": args.epochs, "max_pairs": args.max_pairs, "batch_size": args.batch_size,
              "history": args.history, "hard_negatives": args.hard_negatives, **({"lr": args.lr} if args.lr else {})}
    made = []
    for name in SOURCES:
        new_items = name.endswith("new_items")
        part = (TunedEmbeddingSource(k=K, new_items=new_items, **tuning) if name.startswith("tuned")
                else EmbeddingSource(k=K, history=args.history, new_items=new_items))
        part.name = name.replace(" ", "_")
        if name.startswith("tuned"):
            part.key = "tuned"  # one key, one fit_key: the two tuned sources share one tuning per cutoff
        made.append((name, part))
    return made


def run_cutoff(window: rolling.Window, parts: list[tuple[str, object]], cache: EmbeddingCache) -> tuple[pl.DataFrame, dict]:
    """Every source's top 100 for the window's requests (seen items excluded), and the tuning's record."""
    context = FeatureContext.from_frames(window.events, window.items, cache=cache)
    started = time.perf_counter()
    with PeakMemory() as memory:
        fit_learned([part for _, part in parts], context, until=window.cutoff)
    state = context.learned["tuned"]
    result, pairs = parts[1][1].tuned.last_tuning  # the tuning's own record (the first tuned part fit it)
    info = {"tune_s": time.perf_counter() - started, "pairs": pairs, "train_pairs_s": result.pairs_per_second, "peak_mb": memory.peak / 2**20,
            "epochs": len(state["loss"]), "recall_frozen": float(state["recall"][0]), "recall_tuned": float(state["recall"].max())}
    rows = generate(window.requests, [part for _, part in parts], context, exclude_seen=True)
    return rows.select(pl.lit(window.cutoff).alias("cutoff"), pl.all()), info


def scores(rows: pl.DataFrame, truth: pl.DataFrame) -> dict[str, dict[str, float]]:
    out = {}
    cold = truth.filter(pl.col("cold"))
    for name in SOURCES:
        column = f"cand_{name.replace(' ', '_')}_score"
        ranked = rows.filter(pl.col(column).is_not_null()).select(*KEYS, "item_id", pl.col(column).alias("score"))
        metrics = evaluate(ranked, truth, KEYS, (10, K))
        metrics["cold_recall@100"] = cold.join(ranked, on=[*KEYS, "item_id"], how="semi").height / max(cold.height, 1)
        out[name] = metrics
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cutoffs", type=int, default=len(rolling.QUANTILES))
    parser.add_argument("--mode", choices=["head", "lora", "full"], default="head")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--max-pairs", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="default: the part's (1e-3)")
    parser.add_argument("--hard-negatives", type=int, default=0, help="per pair: the target's nearest items in the frozen space")
    args = parser.parse_args()

    data = movielens()
    chosen = rolling.spread(rolling.windows(data.events, data.items), args.cutoffs)
    truth = pl.concat([w.truth.select(pl.lit(w.cutoff).alias("cutoff"), pl.all()) for w in chosen])
    print(f"ml-latest-small, rolling origin: {len(chosen)} cutoffs, {truth.select(KEYS).n_unique()} (cutoff, user) "
          f"pairs, {truth.height:,} truth rows ({truth['cold'].sum():,} cold); tuning mode {args.mode}, {args.hard_negatives} hard negatives per pair", flush=True)
    cache = EmbeddingCache(DEFAULT_CACHE_DIR)
    parts, found, infos = sources(args), [], []
    for window in chosen:
        rows, info = run_cutoff(window, parts, cache)
        found.append(rows), infos.append(info)
        print(f"cutoff {window.label}: {window.events.height:,} events, {info['pairs']:,} pairs tuned in {info['tune_s']:.1f} s "
              f"({info['epochs']} epochs, {info['train_pairs_s']:,.1f} pairs/s in training steps, "
              f"peak +{info['peak_mb']:.0f} MB), held-out recall@10 {info['recall_frozen']:.4f} -> {info['recall_tuned']:.4f}", flush=True)
    table = scores(pl.concat(found), truth)
    metrics = ("ndcg@10", "recall@10", f"recall@{K}", "cold_recall@100")
    print(f"\n{'source':28}" + "".join(f"{m:>16}" for m in metrics) + f"{'NDCG vs frozen':>16}")
    for name in SOURCES:
        frozen = table[name.replace("tuned_", "")]["ndcg@10"]
        print(f"{name:28}" + "".join(f"{table[name][m]:16.4f}" for m in metrics) + f"{table[name]['ndcg@10'] / frozen:15.2f}x")
    seconds = [i["tune_s"] for i in infos]
    print(f"\ntuning ({args.mode}) per cutoff: median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s; "
          f"peak memory growth median {statistics.median(i['peak_mb'] for i in infos):.0f} MB")


if __name__ == "__main__":
    main()
