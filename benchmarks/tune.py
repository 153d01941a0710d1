"""Tuning the text space on behaviour (`tuned_interest`, mode head) on the bundled MovieLens: how long
it takes and what it buys, by the very code `fit` runs.

The window is the events before the `--fraction` quantile of time (what training's
`[labels] learned_fraction` gives a learned part); pairs are each event and the user's interest profile
before it, the latest `holdout` share held out. Prints the seconds of each step, pairs/s, the training
loss per epoch and the held-out next-item recall@K against the whole catalogue before tuning (the
frozen encoder) and after each epoch. The catalogue's embeddings come from the cache
(`recengine embed` first, or this run encodes them and does not store them).

    .venv/bin/python benchmarks/tune.py [--fraction 0.8] [--epochs 10] [--history 50] [--max-pairs 100000]
    .venv/bin/python benchmarks/tune.py --mode lora --history 10 --epochs 1 --batch-size 64 --lr 1e-4 --max-pairs 3000

The lora and full modes run a transformer forward and backward pass per batch over every item in its
pairs' histories, and encode the whole catalogue for each held-out recall: on a CPU, sample them small.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl

from recengine.datasets import movielens
from recengine.encoders import create_encoder
from recengine.features.interest import item_embeddings
from recengine.features.tuned import TunedInterest, _ReadOnlyCache
from recengine.tuning import tune_head, tune_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--max-pairs", type=int, default=100_000)
    parser.add_argument("--mode", choices=["head", "lora", "full"], default="head")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="default: the part's (1e-3)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    data = movielens()
    events, items = data.events.collect(), data.items.collect()
    window = events.filter(pl.col("timestamp") < events["timestamp"].quantile(args.fraction, interpolation="lower"))
    extra = {"lr": args.lr} if args.lr else {}
    part = TunedInterest(mode=args.mode, history=args.history, epochs=args.epochs, max_pairs=args.max_pairs,
                         batch_size=args.batch_size, **extra)
    started = time.perf_counter()
    base = item_embeddings(items.lazy(), part.field, create_encoder(part.encoder_name, part.encoder_params), _ReadOnlyCache())
    embedded = time.perf_counter()
    tuning = {**part.tuning, "progress": args.progress}
    if args.mode == "head":
        contexts, targets, held_out = part.training_pairs(window, base)
        paired = time.perf_counter()
        result = tune_head(base.matrix, contexts, targets, held_out, **tuning)
    else:
        texts, weights, targets, held_out = part.encoder_pairs(window, items, base)
        paired = time.perf_counter()
        _, result = tune_lora(part.encoder(), texts, weights, targets, held_out, full=args.mode == "full", **tuning)
    print(f"window: {window.height} events before the {args.fraction:g} quantile; catalogue {base.matrix.shape}")
    print(f"embeddings {embedded - started:.1f}s, pairs {paired - embedded:.1f}s: {len(targets)} ({int(held_out.sum())} held out)")
    print(f"tuning {result.seconds:.1f}s, {result.pairs_per_second:.0f} pairs/s, {len(result.losses)} epochs, kept epoch {result.best_epoch}")
    print("loss per epoch:", np.round(result.losses, 3).tolist())
    print(f"held-out recall@{part.tuning['k']}: frozen {result.recalls[0]:.4f}, tuned {max(result.recalls):.4f};",
          "per epoch", np.round(result.recalls[1:], 4).tolist())


if __name__ == "__main__":
    main()
