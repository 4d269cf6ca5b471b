"""Build an illmrec dataset folder from a MovieLens source folder (layout: tools/README.md).

    python -m illmrec_tools.prepare --dataset ml100k --src ../shared/data/ml100k-posters --out data/ml100k
"""
import argparse
import csv
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .atomic import write_json, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]
N_NEGATIVES = 100
MIN_SEQUENCE = 3  # users with fewer interactions are dropped (reference behaviour)
IMAGE_ENCODER = "mobilenet_v1_1.0_224_quant_embedding_extractor (1024-d)"
TEXT_ENCODER = "all-MiniLM-L6-v2 (384-d, L2-normalised)"
LICENCES = {
    "ml100k": "MovieLens 100K (GroupLens): research use only, no redistribution; "
    "never commit this folder or anything derived from it.",
    "ml-latest-small": "MovieLens ml-latest-small (GroupLens): redistributable, with its README.txt "
    "beside it, under the same non-commercial terms; posters are not redistributed.",
}


class DataError(Exception):
    """A source file is missing, truncated or malformed."""


def _read_text(path, encoding):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise DataError(f"{path}: does not end with a newline (truncated file?)")
    return data.decode(encoding)


def _fields(path, lineno, fields, n):
    if len(fields) != n:
        raise DataError(f"{path}:{lineno}: expected {n} fields, got {len(fields)} (truncated or corrupt file?)")
    return fields


def _int(path, lineno, value):
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}:{lineno}: expected an integer, got {value!r}") from None


def _csv_rows(path, header, encoding="utf-8"):
    """Yields (lineno, row) of a CSV file after checking its header."""
    reader = csv.reader(_read_text(path, encoding).splitlines())
    first = next(reader, None)
    if first != header:
        raise DataError(f"{path}: expected header {header}, got {first}")
    for row in reader:
        yield reader.line_num, _fields(path, reader.line_num, row, len(header))


def _poster(path):
    return path if path.is_file() else None


_ITEMS_CSV_HEADER = [
    "movie_id", "title", "genre_unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "FilmNoir", "Horror", "Musical", "Mystery", "Romance", "SciFi",
    "Thriller", "War", "Western", "year", "overview", "original_language", "runtime", "vote_average",
    "vote_count", "cleaned_title",
]


def load_ml100k(src):
    """Returns (ratings [(user, item, time)], items {id: item dict with a 'poster' Path or None})."""
    src = Path(src)
    path = src / "u.data"
    ratings = []
    for n, line in enumerate(_read_text(path, "ascii").splitlines(), 1):
        f = _fields(path, n, line.split("\t"), 4)
        ratings.append((_int(path, n, f[0]), _int(path, n, f[1]), _int(path, n, f[3])))

    genres = [line.split("|")[0] for line in _read_text(src / "u.genre", "latin-1").splitlines() if line]
    overviews = {}
    for lineno, row in _csv_rows(src / "items.csv", _ITEMS_CSV_HEADER):
        overview = row[_ITEMS_CSV_HEADER.index("overview")].strip()
        overviews.setdefault(_int(src / "items.csv", lineno, row[0]), overview or None)  # rows repeat

    items = {}
    for lineno, line in enumerate(_read_text(src / "u.item", "latin-1").splitlines(), 1):
        f = _fields(src / "u.item", lineno, line.split("|"), 5 + len(genres))
        item = _int(src / "u.item", lineno, f[0])
        items[item] = {
            "title": f[1],
            "year": int(f[2][-4:]) if f[2] else None,  # release date, e.g. 01-Jan-1995
            "genres": [g for g, flag in zip(genres, f[5:]) if flag == "1"],
            "description": overviews.get(item),
            "poster": _poster(src / "posters" / f"{item}.jpg"),
        }
    return ratings, items


_TITLE_YEAR = re.compile(r"\((\d{4})(?:[-–]\d{4})?\)\s*$")


def load_ml_latest_small(src):
    """Returns (ratings [(user, item, time)], items {id: item dict with a 'poster' Path or None})."""
    src = Path(src)
    path = src / "ratings.csv"
    ratings = [(_int(path, n, r[0]), _int(path, n, r[1]), _int(path, n, r[3]))
               for n, r in _csv_rows(path, ["userId", "movieId", "rating", "timestamp"])]
    tmdb = {_int(src / "links.csv", n, r[0]): r[2]
            for n, r in _csv_rows(src / "links.csv", ["movieId", "imdbId", "tmdbId"])}
    items = {}
    for n, (movie, title, genres) in _csv_rows(src / "movies.csv", ["movieId", "title", "genres"]):
        item = _int(src / "movies.csv", n, movie)
        year = _TITLE_YEAR.search(title)
        items[item] = {
            "title": title,
            "year": int(year.group(1)) if year else None,
            "genres": [] if genres == "(no genres listed)" else genres.split("|"),
            "description": None,  # no plot summaries in this dataset
            "poster": _poster(src / "posters" / f"{tmdb[item]}.jpg") if tmdb.get(item) else None,
        }
    return ratings, items


LOADERS = {"ml100k": load_ml100k, "ml-latest-small": load_ml_latest_small}


TIES = ("shuffle", "file", "id")


def build_sequences(ratings, min_item_ratings=0, max_users=None, ties="shuffle", seed=42):
    """{user: [item, ...]} ordered by time; users with < MIN_SEQUENCE dropped.

    Events with the same timestamp (ML-100K users often rate many movies in one second) are
    ordered by `ties`: "shuffle" (default) a seeded random order, "file" the source file's order
    (a stable sort by time, as the usual loaders do), "id" ascending item id (this project's
    policy before 2026-11-27; it makes the highest id of a tie the test target, and ML-100K's
    ids correlate with popularity, so it biases targets toward rare items)."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, not {ties!r}")
    if max_users is not None:
        keep = set(sorted({u for u, _, _ in ratings})[:max_users])
        ratings = [r for r in ratings if r[0] in keep]
    if min_item_ratings > 0:
        counts = Counter(i for _, i, _ in ratings)
        ratings = [r for r in ratings if counts[r[1]] >= min_item_ratings]
    if ties == "shuffle":
        tie_key = np.random.Generator(np.random.PCG64([seed, 7])).permutation(len(ratings)).tolist()
    by_user = defaultdict(list)
    for n, (user, item, time) in enumerate(ratings):
        key = item if ties == "id" else tie_key[n] if ties == "shuffle" else n
        by_user[user].append((time, key, item))
    return {u: [i for _, _, i in sorted(events)] for u, events in sorted(by_user.items())
            if len(events) >= MIN_SEQUENCE}


def draw_negatives(rng, all_items, seen, n=N_NEGATIVES):
    """n distinct items of all_items (sorted array) not in seen, uniformly at random.

    Deviation from the reference, which samples with replacement and without a seed."""
    candidates = all_items[~np.isin(all_items, list(seen))]
    if len(candidates) < n:
        raise DataError(f"only {len(candidates)} unseen items, cannot draw {n} negatives")
    return rng.choice(candidates, size=n, replace=False).tolist()


def _relative(path):
    """Path relative to the repository root (portable across clones with shared/ beside them)."""
    return None if path is None else os.path.relpath(Path(path).resolve(), REPO_ROOT)


def prepare(dataset, src, out, seed=42, min_item_ratings=0, max_users=None, ties="shuffle"):
    """Writes the dataset folder `out`; returns the dataset.json dict."""
    ratings, items = LOADERS[dataset](src)
    unknown = sorted({i for _, i, _ in ratings} - items.keys())
    if unknown:
        raise DataError(f"{src}: ratings refer to {len(unknown)} unknown items, e.g. {unknown[:5]}")
    sequences = build_sequences(ratings, min_item_ratings, max_users, ties, seed)
    item_ids = sorted({i for seq in sequences.values() for i in seq})  # only items that occur

    # Users in ascending id order; per user the valid draw, then the test draw.
    rng = np.random.Generator(np.random.PCG64(seed))
    all_items = np.array(item_ids, dtype=np.int64)
    train, valid, test = [], [], []
    for user, seq in sequences.items():
        seen = set(seq)
        train.append({"user": user, "items": seq[:-2]})
        valid.append({"user": user, "history": seq[:-2], "target": seq[-2],
                      "negatives": draw_negatives(rng, all_items, seen)})
        test.append({"user": user, "history": seq[:-1], "target": seq[-1],
                     "negatives": draw_negatives(rng, all_items, seen)})

    out = Path(out)
    write_jsonl(out / "items.jsonl", (
        {"id": i, "title": items[i]["title"], "year": items[i]["year"], "genres": items[i]["genres"],
         "description": items[i]["description"], "image": _relative(items[i]["poster"])}
        for i in item_ids))
    write_jsonl(out / "sequences.jsonl", ({"user": u, "items": s} for u, s in sequences.items()))
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "valid.jsonl", valid)
    write_jsonl(out / "test.jsonl", test)
    meta = {
        "name": out.name,
        "source": Path(src).resolve().name,
        "seed": seed,
        "ties": ties,
        "n_users": len(sequences),
        "n_items": len(item_ids),
        "n_interactions": sum(len(s) for s in sequences.values()),
        "n_negatives": N_NEGATIVES,
        "missing_image_ids": [i for i in item_ids if items[i]["poster"] is None],
        "image_encoder": IMAGE_ENCODER,
        "text_encoder": TEXT_ENCODER,
        "licence": LICENCES[dataset],
    }
    write_json(out / "dataset.json", meta)
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(LOADERS))
    p.add_argument("--src", required=True, help="source folder, e.g. ../shared/data/ml100k-posters")
    p.add_argument("--out", required=True, help="output folder, e.g. data/ml100k")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--min-item-ratings", type=int, default=0, help="keep only items with at least N ratings")
    p.add_argument("--max-users", type=int, help="keep only the first N users by id (small slices for tests)")
    p.add_argument("--ties", choices=TIES, default="shuffle",
                   help="order of events with the same timestamp: seeded shuffle (default), source file "
                        "order, or ascending item id")
    a = p.parse_args(argv)
    try:
        meta = prepare(a.dataset, a.src, a.out, a.seed, a.min_item_ratings, a.max_users, a.ties)
    except DataError as e:
        sys.exit(f"prepare: error: {e}")
    print(f"prepare: wrote {a.out}: {meta['n_users']} users, {meta['n_items']} items, "
          f"{meta['n_interactions']} interactions, {len(meta['missing_image_ids'])} items without poster")


if __name__ == "__main__":
    main()
