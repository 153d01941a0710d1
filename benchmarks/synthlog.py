"""A seeded synthetic interaction log of any size, written in bounded memory.

A year of events (`user_id`, `item_id`, `timestamp`, and with ratings a `value` of 0.5-5 stars) and a
catalogue (`item_id`, `title`, `genres` "A|B" as in MovieLens, `year` of release), shaped like a real
behaviour log:

- users: lognormal activity (a few heavy users, a long tail of light ones; every user has at least
  one event), each active over a window of the year (joining at random, heavier users staying
  longer), with a favourite genre they take with a per-user probability, rarely taking an item twice
  (a repeat is drawn again, up to `REDRAWS` times: only the heaviest users keep a few);
- items: Zipf popularity (exponent `ZIPF`), released over the year (`BACK_CATALOGUE` of them before it,
  over the five years before), never taken before their release day, and most popular just after it:
  an item's pull decays from its release towards `FLOOR` of its peak, with a lognormal half-life
  (median `HALF_LIFE_DAYS` days), so the most popular items change over the year;
- text: titles of 2-4 words of a fixed vocabulary that the tests' tiny BERT also knows
  (tests/conftest.py TINY_VOCAB), the first word tied to the item's first genre; 1-3 MovieLens genres.

Events are drawn day by day from that day's item popularity (one cumulative sum per day over the
catalogue, ordered by first genre so a genre is a slice of it), users in blocks of about
`chunk_events` events, each block written as one parquet row group (sorted by user, then time): the
memory follows the block, not the log. Everything is numpy, drawn from `numpy.random.Generator`s
seeded by (seed, block): one seed and one set of arguments give the same bytes.

    .venv/bin/python benchmarks/synthlog.py --events 1M --out benchmarks/.data/synth-1M [--seed 0] [--no-ratings]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

VERSION = 1  # bump when the generated data changes: caches (benchmarks/train_scale.py) key on it
START = datetime(2023, 1, 1)
DAYS = 365
DAY_MS = 86_400_000
ZIPF = 1.0  # item popularity ~ 1 / rank^ZIPF
ACTIVITY_SIGMA = 1.3  # user activity ~ lognormal(0, ACTIVITY_SIGMA)
BACK_CATALOGUE = 0.4  # share of items released before the year starts
HALF_LIFE_DAYS = 30.0  # median half-life of an item's pull after its release
FLOOR = 0.08  # an old item keeps this share of its peak pull
REDRAWS = 8  # times a user's repeated item is drawn again
GENRES = ("Drama", "Comedy", "Thriller", "Action", "Romance", "Adventure", "Crime", "Sci-Fi", "Horror", "Fantasy",
          "Children", "Animation", "Mystery", "Documentary", "War", "Musical", "Western", "Film-Noir")
# The tiny test BERT's words (tests/conftest.py TINY_VOCAB, without its special tokens and stop words).
WORDS = ("space star war alien love story romance robot galaxy heart wedding comedy drama action adventure ship "
         "planet kiss paris summer night dark future time travel").split()
SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.timestamp("ms")),
                    ("value", pa.float64())])


def parse_size(text: str) -> int:
    """`0.1M`, `300k`, `20M`, `5000` -> a number of events."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:], 1)
    return round(float(text[:-1] if scale > 1 else text) * scale)


def size_label(events: int) -> str:
    return f"{events / 1e6:g}M" if events >= 100_000 else f"{events / 1e3:g}k"


def default_users(events: int) -> int:
    """Users of a log of `events` events: 40 events per user on average."""
    return max(1, round(events / 40))


def default_items(events: int) -> int:
    """Catalogue size: it grows as the square root of the log (6,325 items at 0.1M events, 89,443 at 20M)."""
    return max(200, round(20 * math.sqrt(events)))


def generate(folder: str | Path, events: int, seed: int = 0, users: int | None = None, items: int | None = None,
             ratings: bool = True, chunk_events: int = 1_000_000) -> dict:
    """Write `folder`/events.parquet (`events` rows) and `folder`/items.parquet; returns what was made
    (also written, last, as `folder`/meta.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_users = min(users or default_users(events), events)
    n_items = items or default_items(events)
    rng = np.random.default_rng([seed, 0])
    catalogue = _catalogue(rng, n_items)
    population = _users(rng, n_users, events, catalogue)
    _write_atomic(folder / "items.parquet", lambda path: pq.write_table(_items_table(catalogue), path))

    schema = SCHEMA if ratings else SCHEMA.remove(SCHEMA.get_field_index("value"))
    ends = np.cumsum(population["count"])
    cuts = np.unique(np.searchsorted(ends, np.arange(chunk_events, events, chunk_events), side="left") + 1)
    blocks = list(zip([0, *cuts.tolist()], [*cuts.tolist(), n_users]))

    def write_events(path: Path) -> None:
        with pq.ParquetWriter(path, schema) as writer:
            for index, (first, last) in enumerate(blocks):
                if last > first:
                    writer.write_table(_block(np.random.default_rng([seed, 1, index]), first, last, population,
                                              catalogue, schema))

    _write_atomic(folder / "events.parquet", write_events)
    meta = {"version": VERSION, "events": int(ends[-1]), "users": n_users, "items": n_items, "seed": seed,
            "ratings": ratings, "chunk_events": chunk_events, "start": START.isoformat(), "days": DAYS,
            "blocks": len(blocks)}
    _write_atomic(folder / "meta.json", lambda path: path.write_text(json.dumps(meta, indent=1) + "\n"))
    return meta


def _write_atomic(path: Path, write) -> None:
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    os.replace(partial, path)


def _catalogue(rng: np.random.Generator, n_items: int) -> dict[str, np.ndarray]:
    """The items, ordered by first genre (a genre's items are one slice of each day's cumulative pull)."""
    genre_share = 1.0 / np.arange(1, len(GENRES) + 1) ** 0.8
    genre = np.sort(rng.choice(len(GENRES), n_items, p=genre_share / genre_share.sum()))
    pull = 1.0 / rng.permutation(np.arange(1, n_items + 1)) ** ZIPF  # Zipf ranks, independent of the genre
    back = rng.random(n_items) < BACK_CATALOGUE
    release = np.where(back, -rng.integers(1, 5 * DAYS, n_items), rng.integers(0, DAYS, n_items))
    half_life = HALF_LIFE_DAYS * rng.lognormal(0.0, 0.7, n_items)
    # The ids: a shuffled 1..n, so that id order says nothing of genre, popularity or release.
    ids = rng.permutation(np.arange(1, n_items + 1)).astype(np.int64)
    # 1-3 distinct genres, the first one `genre`.
    extra = rng.choice(3, n_items, p=[0.4, 0.4, 0.2])
    n = len(GENRES)
    first_offset = rng.integers(1, n - 1, n_items)
    second_offset = rng.integers(first_offset + 1, n)
    # Titles: a word of the genre's own three, then 1-3 words of the vocabulary.
    words = np.stack([(genre * 3 + rng.integers(0, 3, n_items)) % len(WORDS),
                      *(rng.integers(0, len(WORDS), n_items) for _ in range(3))], axis=1)
    length = rng.integers(2, 5, n_items)
    return {"id": ids, "genre": genre, "pull": pull, "release": release.astype(np.int64), "half_life": half_life,
            "extra": extra, "genre_b": (genre + first_offset) % n, "genre_c": (genre + second_offset) % n,
            "words": words, "length": length, "quality": rng.normal(0.0, 0.5, n_items),
            # Where each genre's slice starts and ends in the catalogue's order.
            "slice_lo": np.searchsorted(genre, np.arange(n), side="left"),
            "slice_hi": np.searchsorted(genre, np.arange(n), side="right")}


def _items_table(catalogue: dict[str, np.ndarray]) -> pa.Table:
    words, names = pl.Series(WORDS), pl.Series(GENRES)
    frame = pl.DataFrame({
        "item_id": catalogue["id"], "length": catalogue["length"], "extra": catalogue["extra"],
        "year": (START.year + np.floor_divide(catalogue["release"], DAYS)).astype(np.int32),
        **{f"w{k}": words.gather(catalogue["words"][:, k]) for k in range(4)},
        "g0": names.gather(catalogue["genre"]), "g1": names.gather(catalogue["genre_b"]),
        "g2": names.gather(catalogue["genre_c"]),
    })
    return frame.select(
        "item_id",
        pl.concat_str([pl.when(pl.col("length") > k).then(pl.col(f"w{k}")) for k in range(4)], separator=" ",
                      ignore_nulls=True).alias("title"),
        pl.concat_str(["g0", *(pl.when(pl.col("extra") >= k).then(pl.col(f"g{k}")) for k in (1, 2))], separator="|",
                      ignore_nulls=True).alias("genres"),
        "year",
    ).sort("item_id").to_arrow()


def _users(rng: np.random.Generator, n_users: int, events: int, catalogue: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, n_users)
    count = 1 + rng.multinomial(events - n_users, activity / activity.sum())
    join = np.clip(rng.uniform(-0.5 * DAYS, DAYS, n_users), 0.0, None)
    # Heavier users stay longer: a lognormal span stretched by their activity.
    span = np.clip(30.0 * rng.lognormal(0.0, 1.0, n_users) * (count / np.median(count)) ** 0.4, 1.0, DAYS)
    hi = np.minimum(join + span, DAYS - 1e-6)
    lo = np.maximum(0.0, np.minimum(join, hi - 1.0))
    genre_count = np.bincount(catalogue["genre"], minlength=len(GENRES)).astype(float)
    favourite = rng.choice(len(GENRES), n_users, p=genre_count / genre_count.sum())
    return {"count": count, "lo": lo, "hi": hi, "favourite": favourite, "taste": rng.uniform(0.2, 0.8, n_users),
            "bias": rng.normal(0.0, 0.4, n_users)}


def _block(rng: np.random.Generator, first: int, last: int, population: dict, catalogue: dict, schema: pa.Schema) -> pa.Table:
    """The events of users first..last-1, sorted by user then time."""
    user = np.repeat(np.arange(first, last), population["count"][first:last])
    n = user.size
    t = population["lo"][user] + rng.random(n) * (population["hi"][user] - population["lo"][user])  # days
    day = np.minimum(t.astype(np.int64), DAYS - 1)
    in_genre = rng.random(n) < population["taste"][user]
    item = np.empty(n, np.int64)
    rows = np.arange(n)
    # A user rarely takes one item twice: repeats are drawn again (from the whole catalogue after the
    # first rounds); the heaviest users keep a few.
    for attempt in range(REDRAWS + 1):
        item[rows] = _draw(rng, rows, day, user, in_genre & (attempt < REDRAWS // 2), population, catalogue)
        key = user * catalogue["id"].size + item
        order = np.argsort(key, kind="stable")
        repeated = np.zeros(n, bool)
        repeated[order[1:]] = key[order[1:]] == key[order[:-1]]
        rows = np.flatnonzero(repeated)
        if not rows.size:
            break
    timestamp = (np.datetime64(START, "ms") + np.round(t * DAY_MS).astype(np.int64)).astype("datetime64[ms]")
    columns = {"user_id": user.astype(np.int64) + 1, "item_id": catalogue["id"][item], "timestamp": timestamp}
    if "value" in schema.names:
        match = catalogue["genre"][item] == population["favourite"][user]
        stars = 3.4 + catalogue["quality"][item] + population["bias"][user] + 0.4 * match + rng.normal(0.0, 0.8, n)
        columns["value"] = np.clip(np.round(stars * 2) / 2, 0.5, 5.0)
    sort = np.lexsort((columns["timestamp"], columns["user_id"]))
    return pa.table({name: values[sort] for name, values in columns.items()}, schema=schema)


def _draw(rng: np.random.Generator, rows: np.ndarray, day: np.ndarray, user: np.ndarray, in_genre: np.ndarray,
          population: dict, catalogue: dict) -> np.ndarray:
    """An item for each of `rows`, from its day's pull: within the user's favourite genre where
    `in_genre` (unless that genre has nothing out yet), else from the whole catalogue."""
    draw = rng.random(rows.size)
    chosen = np.empty(rows.size, np.int64)
    order = np.argsort(day[rows], kind="stable")
    days, starts = np.unique(day[rows][order], return_index=True)
    for d, begin, end in zip(days, starts, [*starts[1:], rows.size]):
        at = order[begin:end]
        cum = np.cumsum(_pull(catalogue, int(d)))
        genre = population["favourite"][user[rows[at]]]
        lo_index, hi_index = catalogue["slice_lo"][genre], catalogue["slice_hi"][genre]
        low = np.where(lo_index > 0, cum[np.maximum(lo_index - 1, 0)], 0.0)
        high = np.where(hi_index > 0, cum[np.maximum(hi_index - 1, 0)], 0.0)
        own = in_genre[rows[at]] & (high > low)
        low, high = np.where(own, low, 0.0), np.where(own, high, cum[-1])
        chosen[at] = np.minimum(np.searchsorted(cum, low + draw[at] * (high - low), side="right"), cum.size - 1)
    return chosen


def _pull(catalogue: dict[str, np.ndarray], day: int) -> np.ndarray:
    """Each item's chance weight on `day`: its Zipf pull, 0 before its release, decaying after it."""
    age = day - catalogue["release"]
    decay = FLOOR + (1.0 - FLOOR) * np.exp2(-np.maximum(age, 0) / catalogue["half_life"])
    return np.where(age >= 0, catalogue["pull"] * decay, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", required=True, help="Number of events: 100000, 0.1M, 300k, 20M.")
    parser.add_argument("--out", required=True, type=Path, help="Folder for events.parquet, items.parquet, meta.json.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, help="Users [default: events / 40].")
    parser.add_argument("--items", type=int, help="Items [default: 20 * sqrt(events)].")
    parser.add_argument("--no-ratings", action="store_true", help="No `value` column.")
    parser.add_argument("--chunk-events", type=int, default=1_000_000, help="Events per block (memory follows it).")
    args = parser.parse_args()
    meta = generate(args.out, parse_size(args.events), args.seed, args.users, args.items, not args.no_ratings,
                    args.chunk_events)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
