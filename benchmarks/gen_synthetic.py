"""Synthetic interaction data at any scale, shaped like MovieLens-1M, as a RecBole atomic file.

    python benchmarks/gen_synthetic.py --interactions 10000000 [--users U] [--items I] [--seed 0]
                                       [--out benchmarks/data] [--name synth_<N>]

Writes ``<out>/<name>/<name>.inter`` (``user_id:token  item_id:token  timestamp:float``), for use
with ``--data_path=<out> --dataset=<name>``. ``benchmarks/data/`` is git-ignored.

* users and items scale with the interactions as in ML-1M (6,040 users and 3,706 items per
  million interactions) unless given;
* item popularity is Zipf-like (exponent 1 over a random ranking of the items; ``--zipf-exponent``
  flattens it, so that more of a large catalogue occurs);
* history lengths are 5 plus a lognormal share of the rest (sigma 1: mean/median ~1.6 as in ML-1M,
  a few histories tens of times the median), so every user survives leave-one-out splitting;
* timestamps strictly increase within a user (so no two rows are equal on user, item and time),
  and no user repeats an item right after itself (the plugin would drop those rows by default).

Everything is vectorised: 10M rows take seconds to draw; writing them dominates.
"""

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

USERS_PER_MILLION = 6040  # MovieLens-1M
ITEMS_PER_MILLION = 3706
MIN_HISTORY = 5
LENGTH_SIGMA = 1.0
ZIPF_EXPONENT = 1.0
MEAN_GAP_S = 3600  # mean seconds between a user's consecutive interactions
FIRST_TIMESTAMP = 956_703_932  # ML-1M's first timestamp (April 2000)
START_SPAN_S = 3 * 365 * 86_400  # users start within three years
WRITE_CHUNK = 1_000_000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "benchmarks", "data")


def history_lengths(rng, n_interactions, n_users):
    """Per-user history lengths: ``MIN_HISTORY`` each, the rest shared by lognormal weights."""
    weights = rng.lognormal(0.0, LENGTH_SIGMA, n_users)
    extra = rng.multinomial(n_interactions - MIN_HISTORY * n_users, weights / weights.sum())
    return MIN_HISTORY + extra


def zipf_items(rng, n, n_items, exponent=None):
    """``n`` item ids (0-based) drawn with probability ~ 1 / rank ** exponent; ranks shuffled over the ids."""
    exponent = ZIPF_EXPONENT if exponent is None else exponent
    cdf = np.cumsum(1.0 / np.arange(1, n_items + 1) ** exponent)
    rank = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), n_items - 1)
    return rng.permutation(n_items)[rank]


def remove_consecutive_repeats(rng, users, items, n_items, exponent=None):
    """Redraw (in place) every item equal to the same user's previous one until none is left."""
    while True:
        repeat = np.flatnonzero((items[1:] == items[:-1]) & (users[1:] == users[:-1])) + 1
        if repeat.size == 0:
            return
        items[repeat] = zipf_items(rng, repeat.size, n_items, exponent)


def timestamps(rng, lengths):
    """Strictly increasing integer seconds within each user (rows grouped by user)."""
    gaps = 1 + np.floor(rng.exponential(MEAN_GAP_S, int(lengths.sum()))).astype(np.int64)
    starts = np.cumsum(lengths) - lengths  # each user's first row
    gaps[starts] = FIRST_TIMESTAMP + rng.integers(0, START_SPAN_S, lengths.size)
    elapsed = np.cumsum(gaps)
    # restart the running sum at each user's first row
    return elapsed - np.repeat(elapsed[starts] - gaps[starts], lengths)


def generate(n_interactions, n_users, n_items, seed, exponent=None):
    """A DataFrame with the three atomic columns, grouped by user and in time order within a user."""
    rng = np.random.default_rng(seed)
    lengths = history_lengths(rng, n_interactions, n_users)
    users = np.repeat(np.arange(1, n_users + 1, dtype=np.int64), lengths)
    items = zipf_items(rng, n_interactions, n_items, exponent)
    remove_consecutive_repeats(rng, users, items, n_items, exponent)
    frame = pd.DataFrame({
        "user_id:token": users,
        "item_id:token": items + 1,
        "timestamp:float": timestamps(rng, lengths),
    })
    return frame, lengths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interactions", type=int, required=True, help="rows to write, e.g. 1000000")
    p.add_argument("--users", type=int, help=f"default: {USERS_PER_MILLION} per million interactions")
    p.add_argument("--items", type=int, help=f"default: {ITEMS_PER_MILLION} per million interactions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zipf-exponent", type=float, default=ZIPF_EXPONENT,
                   help="item popularity ~ 1 / rank ** this (default 1; smaller: flatter, more items occur)")
    p.add_argument("--out", default=DATA_DIR, help="data_path folder (default: benchmarks/data/, git-ignored)")
    p.add_argument("--name", help="dataset name (default synth_<interactions>)")
    p.add_argument("--text-dim", type=int, default=0,
                   help="also store random 'text' features of this size for every item (FeatureStore.import_matrix), "
                        "for content models on catalogues too large to encode on a CPU")
    args = p.parse_args(argv)

    n = args.interactions
    n_users = args.users or max(1, round(n * USERS_PER_MILLION / 1e6))
    n_items = args.items or max(3, round(n * ITEMS_PER_MILLION / 1e6))
    if n_users * MIN_HISTORY > n:
        p.error(f"{n_users} users need at least {n_users * MIN_HISTORY} interactions ({MIN_HISTORY} each)")
    if n_items < 2:
        p.error("at least 2 items are needed (no user repeats an item right after itself)")
    name = args.name or f"synth_{n}"

    t0 = time.perf_counter()
    frame, lengths = generate(n, n_users, n_items, args.seed, args.zipf_exponent)
    folder = os.path.join(args.out, name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.inter")
    tmp = path + ".tmp"
    frame.to_csv(tmp, sep="\t", index=False, chunksize=WRITE_CHUNK)
    os.replace(tmp, path)  # never leave a half-written file under the dataset's name
    if args.text_dim:
        sys.path.insert(0, ROOT)
        from recbole_mm.data.features import FeatureStore

        tokens = [str(i) for i in range(1, n_items + 1)]
        vectors = np.random.default_rng(args.seed + 1).standard_normal((n_items, args.text_dim)).astype(np.float32)
        FeatureStore(folder, name).import_matrix("text", tokens, vectors, source="gen_synthetic.py --text-dim")
    seconds = time.perf_counter() - t0

    print(f"{path}: {n_users} users, {frame['item_id:token'].nunique()} items, {n} interactions; "
          f"history mean {lengths.mean():.1f} / median {np.median(lengths):g} / max {lengths.max()}; "
          f"{os.path.getsize(path) / 2**20:.1f} MiB; {seconds:.1f} s")


if __name__ == "__main__":
    main()
