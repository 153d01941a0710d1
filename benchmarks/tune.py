"""The tuned text space against the frozen one on MovieLens ml-latest-small, rolling origin: the
embedding source alone, and what tuning costs.

Protocol (`recengine.core.rolling`, as `benchmarks/movielens.py`): at each cutoff c the tuning (`tuned_embedding`,
the very part `train` fits) sees only the events before c; the requests are the users with at least 5
events before c and a catalogue item new to them in [c, next cutoff), which are the truth. Both sources
propose their top 100 without the user's seen items: NDCG@10, Recall@10 and Recall@100 per (cutoff,
user), averaged; cold recall@100: of the truth rows whose item had no event before c, the share
proposed. Rows: the frozen `embedding` source, the tuned one, and each with `new_items = true` (only
items nobody took before c: the cold items' own candidates). Tuning: seconds, training pairs/s,
pairs, epochs and the process's peak memory growth while tuning, per cutoff.

    .venv/bin/python benchmarks/tune.py [--cutoffs 10] [--mode head] [--epochs 10] [--max-pairs 100000]
    .venv/bin/python benchmarks/tune.py --mode lora --cutoffs 3 --max-pairs 3000 --epochs 1 --batch-size 64 --lr 1e-4
    .venv/bin/python benchmarks/tune.py --mode head,lora,adalora,full --set lora:lr=1e-4 --set adalora:lr=1e-3 ...
    .venv/bin/python benchmarks/tune.py --mode head,offset --cutoffs 3    # cold recall of the constrained mode

Several modes in one run (`--mode head,lora,adalora,full`) are tuned on the same cutoffs, one after the
other, each with its own row per source and a row in the table of tuning cost: seconds, training
pairs/s (and the ratio to head's), held-out recall, peak memory; adalora also prints its total rank.

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

from recengine.core import rolling
from recengine.parts.candidates import generate
from recengine.core.datasets import movielens
from recengine.parts.encoders import DEFAULT_CACHE_DIR, EmbeddingCache
from recengine.parts.context import FeatureContext, fit_learned
from recengine.features.interest import EmbeddingSource
from recengine.features.tuned import TunedEmbeddingSource
from recengine.core.metrics import evaluate
from recengine.features.tuned import MODES

KEYS = ["cutoff", "user_id"]
K = 100


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


def tuned_name(mode: str, new_items: bool = False) -> str:
    return f"tuned_embedding[{mode}]" + (" new_items" if new_items else "")


def source_names(modes: list[str]) -> list[str]:
    frozen = ["embedding", "embedding new_items"]
    return frozen + [tuned_name(m, new) for m in modes for new in (False, True)]


def sources(args, modes: list[str]) -> list[tuple[str, object]]:
    """The frozen embedding source and, per mode, the tuned one (each also with new_items = true). A
    mode's two tuned sources share one key, hence one tuning per cutoff."""
    made = []
    for name in source_names(modes):
        new_items = name.endswith("new_items")
        if name.startswith("tuned"):
            mode = name[name.index("[") + 1 : name.index("]")]
            tuning = {"mode": mode, "encoder_params": args.encoder_params, "epochs": args.epochs, "max_pairs": args.max_pairs, "batch_size": args.batch_size,
                      "history": args.history, "hard_negatives": args.hard_negatives, **args.settings.get(mode, {})}
            part = TunedEmbeddingSource(k=K, new_items=new_items, **tuning)
            part.key = f"tuned-{mode}"
        else:
            part = EmbeddingSource(k=K, encoder_params=args.encoder_params, history=args.history, new_items=new_items)
        part.name = column(name)
        made.append((name, part))
    return made


def column(name: str) -> str:
    return name.replace(" ", "_").replace("[", "_").replace("]", "")


def run_cutoff(window: rolling.Window, parts: list[tuple[str, object]], modes: list[str], cache: EmbeddingCache) -> tuple[pl.DataFrame, dict]:
    """Every source's top 100 for the window's requests (seen items excluded), and each mode's tuning record."""
    context = FeatureContext.from_frames(window.events, window.items, cache=cache)
    infos, found = {}, dict(parts)
    for mode in modes:  # one tuning at a time, so that each one's seconds and memory are its own
        tuned = found[tuned_name(mode)]
        started = time.perf_counter()
        with PeakMemory() as memory:
            fit_learned([tuned, found[tuned_name(mode, True)]], context, until=window.cutoff, keep=True)
        state = context.learned[tuned.key]
        result, pairs = tuned.tuned.last_tuning  # the tuning's own record (the first tuned part fit it)
        ranks = tuned.tuned.ranks(state)
        infos[mode] = {"tune_s": time.perf_counter() - started, "pairs": pairs, "train_pairs_s": result.pairs_per_second,
                       "peak_mb": memory.peak / 2**20, "epochs": len(state["loss"]), "recall_frozen": float(state["recall"][0]),
                       "recall_tuned": float(state["recall"].max()), "rank_total": sum(ranks.values()) if ranks else None}
    rows = generate(window.requests, [part for _, part in parts], context, exclude_seen=True)
    return rows.select(pl.lit(window.cutoff).alias("cutoff"), pl.all()), infos


def scores(rows: pl.DataFrame, truth: pl.DataFrame, names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    cold = truth.filter(pl.col("cold"))
    for name in names:
        score = f"cand_{column(name)}_score"
        ranked = rows.filter(pl.col(score).is_not_null()).select(*KEYS, "item_id", pl.col(score).alias("score"))
        metrics = evaluate(ranked, truth, KEYS, (10, K))
        metrics["cold_recall@100"] = cold.join(ranked, on=[*KEYS, "item_id"], how="semi").height / max(cold.height, 1)
        out[name] = metrics
    return out


def parse_settings(values: list[str]) -> dict[str, dict]:
    """`--set adalora:lr=0.01` (repeatable) -> {"adalora": {"lr": 0.01}}: a setting for one mode's tuning."""
    settings: dict[str, dict] = {}
    for value in values:
        mode, _, pair = value.partition(":")
        key, _, number = pair.partition("=")
        if mode not in MODES or not key or not number:
            raise SystemExit(f"--set {value!r}: give MODE:KEY=VALUE with MODE one of {', '.join(MODES)}, e.g. adalora:lr=0.01")
        settings.setdefault(mode, {})[key] = int(number) if number.lstrip("-").isdigit() else float(number)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cutoffs", type=int, default=len(rolling.QUANTILES))
    parser.add_argument("--mode", default="head", help=f"one mode or several, comma-separated, tuned on the same cutoffs: {','.join(MODES)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--max-pairs", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="every mode's learning rate [default: the part's, 1e-3]")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="MODE:KEY=VALUE",
                        help="a tuning setting for one mode (repeatable), e.g. adalora:lr=0.01 full:lr=2e-5")
    parser.add_argument("--model", default=None, help="a local copy of the encoder's model folder [default: the packaged all-MiniLM-L6-v2]")
    parser.add_argument("--hard-negatives", type=int, default=0, help="per pair: the target's nearest items in the frozen space")
    args = parser.parse_args()
    modes = [m for m in args.mode.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--mode {args.mode}: give one or more of {', '.join(MODES)}, comma-separated")
    args.settings = parse_settings(args.settings)
    args.encoder_params = {"model": args.model} if args.model else {}
    if args.lr:
        args.settings = {m: {"lr": args.lr, **args.settings.get(m, {})} for m in modes}

    data = movielens()
    chosen = rolling.spread(rolling.windows(data.events, data.items), args.cutoffs)
    truth = pl.concat([w.truth.select(pl.lit(w.cutoff).alias("cutoff"), pl.all()) for w in chosen])
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"ml-latest-small, rolling origin: {len(chosen)} cutoffs, {truth.select(KEYS).n_unique()} (cutoff, user) "
          f"pairs, {truth.height:,} truth rows ({truth['cold'].sum():,} cold); modes {', '.join(modes)}; "
          f"{args.hard_negatives} hard negatives per pair; {device}", flush=True)
    cache = EmbeddingCache(DEFAULT_CACHE_DIR)
    parts, found, infos = sources(args, modes), [], []
    for window in chosen:
        rows, info = run_cutoff(window, parts, modes, cache)
        found.append(rows), infos.append(info)
        for mode, i in info.items():
            ranks = f", ranks {i['rank_total']}" if i["rank_total"] is not None else ""
            print(f"cutoff {window.label} {mode}: {window.events.height:,} events, {i['pairs']:,} pairs tuned in {i['tune_s']:.1f} s "
                  f"({i['epochs']} epochs, {i['train_pairs_s']:,.1f} pairs/s in training steps, peak +{i['peak_mb']:.0f} MB{ranks}), "
                  f"held-out recall@10 {i['recall_frozen']:.4f} -> {i['recall_tuned']:.4f}", flush=True)
    names = source_names(modes)
    table = scores(pl.concat(found), truth, names)
    metrics = ("ndcg@10", "recall@10", f"recall@{K}", "cold_recall@100")
    print(f"\n{'source':36}" + "".join(f"{m:>16}" for m in metrics) + f"{'NDCG vs frozen':>16}")
    for name in names:
        frozen = table["embedding new_items" if name.endswith("new_items") else "embedding"]["ndcg@10"]
        print(f"{name:36}" + "".join(f"{table[name][m]:16.4f}" for m in metrics) + f"{table[name]['ndcg@10'] / frozen:15.2f}x")
    print(f"\n{'mode':10}{'tune s (median)':>16}{'pairs/s (median)':>18}{'vs head':>9}{'vs lora':>9}{'recall@10 frozen':>18}"
          f"{'recall@10 tuned':>17}{'peak MB':>9}")
    rates = {m: statistics.median(i[m]["train_pairs_s"] for i in infos) for m in modes}
    for mode in modes:
        median = lambda key: statistics.median(i[mode][key] for i in infos)
        versus = "".join(f"{rates[mode] / rates[peer]:8.3g}x" if peer in rates else f"{'-':>9}" for peer in ("head", "lora"))
        print(f"{mode:10}{median('tune_s'):16.1f}{rates[mode]:18,.1f}{versus}{median('recall_frozen'):18.4f}"
              f"{median('recall_tuned'):17.4f}{median('peak_mb'):9.0f}")


if __name__ == "__main__":
    main()
