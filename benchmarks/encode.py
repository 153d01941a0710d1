"""Encoder throughput: recengine's transformers plugin against sentence-transformers' `encode`.

Same model (the packaged all-MiniLM-L6-v2), same texts (MovieLens titles with genres), same device,
measured in one run: texts/s (median of --repeats after a warm-up), the ratio, and the largest
deviation of our rows from sentence-transformers' (1 - cosine). On CUDA it also times the plugin
in fp32 and in its default reduced precision.

Then the embedding cache on a catalogue of --cache-n unique texts: a cold run into an empty cache, a
re-run (a fresh cache object reading the shards from disk), and a run where 1% of the texts are new.

    .venv/bin/python benchmarks/encode.py [--n 2000] [--repeats 3] [--device auto] [--cache-n 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recengine.datasets import movielens_items
from recengine.encoders import EmbeddingCache, create_encoder, embed


def catalogue_texts(n: int) -> list[str]:
    items = movielens_items().select(pl.concat_str("title", pl.lit(". "), pl.col("genres").str.replace_all("|", ", ", literal=True)))
    texts = items.collect().to_series().to_list()
    return (texts * (n // len(texts) + 1))[:n]


def unique_texts(n: int) -> list[str]:
    texts = catalogue_texts(n)
    return [text if i < 9742 else f"{text} (edition {i // 9742})" for i, text in enumerate(texts)]


def cache_table(n: int, device: str) -> None:
    encoder = create_encoder("transformers", {"device": device})
    encoder.encode(["warm-up"])
    texts = unique_texts(n)
    changed = texts[: n - n // 100] + [f"{t} (new)" for t in texts[n - n // 100 :]]
    with tempfile.TemporaryDirectory() as root:
        runs = []
        for label, batch in [("cold: empty cache", texts), ("re-run: all cached", texts), ("1% new items", changed)]:
            start = time.perf_counter()
            _, stats = embed(batch, encoder, EmbeddingCache(Path(root)))
            runs.append((label, time.perf_counter() - start, stats))
    cold = runs[0][1]
    print(f"\nembedding cache, {n} unique texts, {device}")
    print(f"{'run':24} {'seconds':>9} {'vs cold':>8} {'hits':>7} {'encoded':>8}")
    for label, seconds, stats in runs:
        print(f"{label:24} {seconds:9.3f} {seconds / cold:7.2%} {stats.hits:7d} {stats.misses:8d}")


def timed(fn, texts: list[str], repeats: int) -> tuple[float, np.ndarray]:
    fn(texts[:64])  # warm-up: model load, kernels, allocator
    seconds, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(texts)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return len(texts) / statistics.median(seconds), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="texts per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-n", type=int, default=10000, help="catalogue size for the cache table (0: skip)")
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' batch_size (its default: 32)")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer
    from recengine_transformers import packaged_model_path

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    texts = catalogue_texts(args.n)
    st = SentenceTransformer(str(packaged_model_path()), device=device)
    st_rate, reference = timed(
        lambda t: st.encode(t, batch_size=args.st_batch_size, normalize_embeddings=True, convert_to_numpy=True), texts, args.repeats
    )
    rows = [("sentence-transformers encode (fp32)", st_rate, 0.0)]
    precisions = ["fp32"] + (["auto"] if device.startswith("cuda") else [])
    for precision in precisions:
        encoder = create_encoder("transformers", {"device": device, "precision": precision})
        rate, ours = timed(encoder.encode, texts, args.repeats)
        deviation = float(1.0 - (ours * reference).sum(axis=1).min())
        rows.append((f"recengine transformers ({encoder.precision})", rate, deviation))

    print(f"\ndevice: {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(texts)} texts, median of {args.repeats}")
    print(f"{'method':42} {'texts/s':>10} {'vs ST':>7} {'max 1-cos vs ST':>16}")
    for name, rate, deviation in rows:
        print(f"{name:42} {rate:10.1f} {rate / st_rate:6.2f}x {deviation:16.2e}")
    if args.cache_n:
        cache_table(args.cache_n, device)


if __name__ == "__main__":
    main()
