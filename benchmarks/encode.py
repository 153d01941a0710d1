"""Encoder throughput: recengine's transformers plugin against sentence-transformers' `encode`.

Same model (the packaged all-MiniLM-L6-v2), same texts, same device, measured in one run, for short
texts (MovieLens titles with genres, about 15 tokens) and long ones (several titles and genres joined,
about 128 tokens): texts/s (median of --repeats after a warm-up), the ratio to sentence-transformers'
best, and the largest deviation of our rows from its fp32 rows (1 - cosine). sentence-transformers
runs at every batch size of --st-batch-sizes, in fp32 and (on CUDA) in bf16, and its best is the peer.
On CUDA the plugin runs in fp32 and in its default reduced precision (bf16).

The floor: the texts/s of tokenising alone (the plugin's own `token_ids`, on this machine's CPU), which
no encoder that tokenises on the CPU can beat; the table gives each row's distance from it.

Then the embedding cache on a catalogue of --cache-n unique texts: a cold run into an empty cache, a
re-run (a fresh cache object reading the shards from disk), and a run where 1% of the texts are new.

    .venv/bin/python benchmarks/encode.py [--n 2000] [--repeats 3] [--device auto] [--cache-n 10000] [--texts short,long]
    .venv/bin/python benchmarks/encode.py --n 100000 --st-batch-sizes 32,128,512,1024 --cache-n 0   # on a GPU
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

from recengine.core.datasets import movielens_items
from recengine.parts.encoders import EmbeddingCache, create_encoder, embed
from recengine_transformers import packaged_model_path


def catalogue_texts(n: int) -> list[str]:
    items = movielens_items().select(pl.concat_str("title", pl.lit(". "), pl.col("genres").str.replace_all("|", ", ", literal=True)))
    texts = items.collect().to_series().to_list()
    return (texts * (n // len(texts) + 1))[:n]


def long_texts(n: int, words: int = 64) -> list[str]:
    """Texts of about 128 tokens: consecutive catalogue texts joined until `words` words (distinct texts:
    each starts at another item)."""
    base = catalogue_texts(9742)
    out = []
    for i in range(n):
        parts, count, j = [], 0, i
        while count < words:
            parts.append(base[j % len(base)])
            count += len(parts[-1].split())
            j += 1
        out.append(" ".join(parts))
    return out


def unique_texts(n: int) -> list[str]:
    texts = catalogue_texts(n)
    return [text if i < 9742 else f"{text} (edition {i // 9742})" for i, text in enumerate(texts)]


def cache_table(n: int, device: str, model: dict) -> None:
    encoder = create_encoder("transformers", {"device": device, **model})
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


def sentence_transformers_rows(texts: list[str], device: str, batch_sizes: list[int], repeats: int, folder: str) -> tuple[list, np.ndarray]:
    """sentence-transformers at each batch size, fp32 and (CUDA) bf16: rows of (name, texts/s), and its fp32 output."""
    from sentence_transformers import SentenceTransformer

    rows, reference = [], None
    for precision in ["fp32"] + (["bf16"] if device.startswith("cuda") else []):
        st = SentenceTransformer(folder, device=device)
        if precision == "bf16":
            st = st.to(torch.bfloat16)
        for batch_size in batch_sizes:
            rate, out = timed(lambda t: st.encode(t, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True),
                              texts, repeats)
            rows.append((f"sentence-transformers ({precision}, batch {batch_size})", rate))
            if precision == "fp32" and reference is None:
                reference = np.asarray(out, dtype=np.float32)
    return rows, reference


def table(kind: str, texts: list[str], device: str, args) -> None:
    st_rows, reference = sentence_transformers_rows(texts, device, [int(b) for b in args.st_batch_sizes.split(",")], args.repeats,
                                                    args.model or str(packaged_model_path()))
    best_name, best = max(st_rows, key=lambda row: row[1])
    model = {"model": args.model} if args.model else {}
    tokens = create_encoder("transformers", {"device": "cpu", **model})
    floor, _ = timed(tokens.token_ids, texts, args.repeats)  # tokenising alone, on the CPU
    lengths = [len(ids) for ids in tokens.token_ids(texts[:2000])]
    ours = []
    for precision in ["fp32"] + (["auto"] if device.startswith("cuda") else []):
        encoder = create_encoder("transformers", {"device": device, "precision": precision, **model})
        rate, out = timed(encoder.encode, texts, args.repeats)
        deviation = float(1.0 - (out * reference).sum(axis=1).min())
        ours.append((f"recengine transformers ({encoder.precision})", rate, deviation))
    print(f"\n{kind} texts: {len(texts)}, {np.mean(lengths):.0f} tokens on average (max {max(lengths)}); device {device} "
          f"({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), torch {torch.__version__}, "
          f"CPU threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'method':48} {'texts/s':>11} {'vs ST best':>11} {'floor / it':>11} {'max 1-cos vs ST':>16}")
    print(f"{'tokenisation alone (CPU): the floor':48} {floor:11.1f} {floor / best:10.2f}x {1.0:10.2f}x {'':>16}")
    for name, rate in st_rows:
        print(f"{name:48} {rate:11.1f} {rate / best:10.2f}x {floor / rate:10.2f}x {'':>16}")
    for name, rate, deviation in ours:
        print(f"{name:48} {rate:11.1f} {rate / best:10.2f}x {floor / rate:10.2f}x {deviation:16.2e}")
    print(f"peer: {best_name}; goals on a GPU: recengine >= 1.5x the peer, and within 3x of the floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="texts per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="a local copy of the model folder [default: the packaged all-MiniLM-L6-v2]")
    parser.add_argument("--texts", default="short,long", help="short (titles, ~15 tokens), long (~128 tokens), or both")
    parser.add_argument("--cache-n", type=int, default=10000, help="catalogue size for the cache table (0: skip)")
    parser.add_argument("--st-batch-sizes", default=None,
                        help="sentence-transformers' batch sizes to try, its best is the peer [default: 32 on a CPU; "
                             "32,64,128,256,512,1024 on CUDA]")
    args = parser.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.st_batch_sizes = args.st_batch_sizes or ("32,64,128,256,512,1024" if device.startswith("cuda") else "32")
    for kind in args.texts.split(","):
        table(kind, catalogue_texts(args.n) if kind == "short" else long_texts(args.n), device, args)
    if args.cache_n:
        cache_table(args.cache_n, device, {"model": args.model} if args.model else {})


if __name__ == "__main__":
    main()
