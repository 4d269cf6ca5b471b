#!/usr/bin/env python3
"""CPU-against-GPU parity of illmrec's outputs (numpy only; for tools/cuda/gpu-check.sh).

    compare.py scores CPU.jsonl GPU.jsonl [--tol 0.01]   # `illmrec score` outputs
    compare.py states CPU.npy GPU.npy [--tol 0.01]       # `illmrec embed` outputs ([REC] states)

Scores: for every user, the items both runs returned are compared; the bound is
max |score_gpu - score_cpu| <= tol * max |score_cpu| (the scores' scale over all users), and each
user's top-10 must share at least 9 items (near-ties may swap). States: per row,
max |x_gpu - x_cpu| <= tol * max |x_cpu| and cosine >= 1 - tol/10.
Prints one JSON line with the figures and "pass": true/false; exits 1 on a failure.
"""
import argparse
import json
import sys

import numpy as np


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def items_of(rec):
    # `illmrec score` lines: {"user": .., "items": [{"id": .., "score": ..}, ...]} (or "top"/"results")
    for key in ("items", "top", "results", "recommendations"):
        if key in rec:
            return [(int(x["id"]), float(x["score"])) for x in rec[key]]
    raise SystemExit(f"no item list in a score line (keys {sorted(rec)})")


def scores(a):
    cpu, gpu = read_jsonl(a.cpu), read_jsonl(a.gpu)
    if len(cpu) != len(gpu):
        raise SystemExit(f"{len(cpu)} CPU lines against {len(gpu)} GPU lines")
    scale = max(abs(s) for r in cpu for _, s in items_of(r))
    worst, worst_overlap, compared = 0.0, 10, 0
    for rc, rg in zip(cpu, gpu):
        c, g = dict(items_of(rc)), dict(items_of(rg))
        for i in c.keys() & g.keys():
            worst = max(worst, abs(c[i] - g[i]))
            compared += 1
        top_c = [i for i, _ in items_of(rc)[:10]]
        top_g = [i for i, _ in items_of(rg)[:10]]
        worst_overlap = min(worst_overlap, len(set(top_c) & set(top_g)))
    ok = worst <= a.tol * scale and worst_overlap >= 9
    out = {"what": "scores", "users": len(cpu), "pairs_compared": compared, "score_scale": scale,
           "max_abs_diff": worst, "max_rel_to_scale": worst / scale if scale else None,
           "min_top10_overlap": worst_overlap, "tol": a.tol, "pass": ok}
    print(json.dumps(out))
    return ok


def states(a):
    c, g = np.load(a.cpu).astype(np.float64), np.load(a.gpu).astype(np.float64)
    if c.shape != g.shape:
        raise SystemExit(f"shapes differ: {c.shape} against {g.shape}")
    diff = np.abs(c - g).max(axis=1)
    scale = np.abs(c).max(axis=1)
    cos = (c * g).sum(axis=1) / (np.linalg.norm(c, axis=1) * np.linalg.norm(g, axis=1))
    rel = diff / scale
    ok = bool((rel <= a.tol).all() and (cos >= 1 - a.tol / 10).all())
    out = {"what": "states", "rows": int(c.shape[0]), "dim": int(c.shape[1]),
           "max_rel_diff": float(rel.max()), "median_rel_diff": float(np.median(rel)),
           "min_cosine": float(cos.min()), "tol": a.tol, "pass": ok}
    print(json.dumps(out))
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["scores", "states"])
    ap.add_argument("cpu")
    ap.add_argument("gpu")
    ap.add_argument("--tol", type=float, default=0.01)
    a = ap.parse_args(argv)
    ok = scores(a) if a.what == "scores" else states(a)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
