"""Seeded user files for batch-scoring tests and measurements: `illmrec score` input lines with
histories drawn from a bundle's catalog.

    python -m illmrec_tools.users --bundle models/demo-bundle --users 200 --seed 15 --out users.jsonl

Each user is {"user": k, "history": [ids]} with 2-8 distinct items (or exactly --items), and every
fifth user (k mod 5 = 3) also has 30 "candidates"; the same seed gives the same file."""

import argparse
import json
import random
from pathlib import Path


def seeded_users(bundle, n, seed, items=None):
    rng = random.Random(seed)
    ids = [json.loads(line)["id"] for line in (Path(bundle) / "items.jsonl").read_text().splitlines() if line.strip()]
    users = []
    for u in range(n):
        user = {"user": u, "history": rng.sample(ids, items or rng.randint(2, 8))}
        if u % 5 == 3:
            user["candidates"] = rng.sample(ids, 30)
        users.append(user)
    return users


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--items", type=int, default=None, help="history length (default: 2-8 at random)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    users = seeded_users(a.bundle, a.users, a.seed, a.items)
    Path(a.out).write_text("".join(json.dumps(u) + "\n" for u in users))


if __name__ == "__main__":
    main()
