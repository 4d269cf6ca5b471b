"""Parity of the runtime's image encoder (`illmrec encode-images`) with features.py.

    python -m illmrec_tools.image_parity --dataset data/ml100k [--bundle B --users 20]

1. Every item image of the dataset is encoded by the runtime; each row is compared with the
   dataset's features/image.npy (made by features.py): exact equality and cosine per image.
2. With --bundle: a copy of the bundle whose img bank is rebuilt from the runtime's rows
   (`bank build --images`, same dtype) recommends the top-10 for the first --users test users,
   beside the original (Python-made img bank); the lists are compared.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .parity import BIN, read_bank
from .prepare import REPO_ROOT


def link_images(items, folder):
    """Symlinks <id>.<ext> -> each item's image, so that ids come from file names."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for item in items:
        if item.get("image") is None:
            continue
        src = (REPO_ROOT / item["image"]).resolve()
        (folder / f"{item['id']}{src.suffix.lower()}").symlink_to(src)
        ids.append(item["id"])
    return ids


def encode(folder, out, threads=1):
    """Runs `illmrec encode-images` on a folder; returns (ids, rows, seconds)."""
    t = time.perf_counter()
    subprocess.run([str(BIN), "encode-images", "--images", str(folder), "--out", str(out / "x.npy"),
                    "--ids", str(out / "ids.txt"), "--threads", str(threads)], check=True, capture_output=True)
    seconds = time.perf_counter() - t
    ids = [int(x) for x in (out / "ids.txt").read_text().split()]
    return np.array(ids), np.load(out / "x.npy"), seconds


def compare(ids, rows, ref_ids, ref_rows):
    """Per-image cosine and exact equality of the runtime's rows against the reference rows."""
    index = {int(i): k for k, i in enumerate(ref_ids)}
    ref = ref_rows[[index[int(i)] for i in ids]]
    cos = (rows * ref).sum(1) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
    exact = int((rows == ref).all(axis=1).sum())
    return cos, exact


def top10(bundle, users, threads):
    inp = Path(tempfile.mkdtemp()) / "users.jsonl"
    inp.write_text("".join(json.dumps({"user": u["user"], "history": u["history"]}) + "\n" for u in users))
    out = inp.with_name("ranked.jsonl")
    subprocess.run([str(BIN), "score", "--bundle", str(bundle), "--input", str(inp), "--output", str(out),
                    "--top-k", "10", "--threads", str(threads)], check=True, capture_output=True)
    return [[i["id"] for i in json.loads(line)["items"]] for line in out.read_text().splitlines()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--bundle", help="a bundle of the dataset's catalog, for the ranking comparison")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    dataset = Path(a.dataset)
    items = [json.loads(line) for line in (dataset / "items.jsonl").read_text().splitlines()]
    work = Path(tempfile.mkdtemp(prefix="image-parity-"))
    link_images(items, work / "images")
    ids, rows, seconds = encode(work / "images", work, a.threads)
    cos, exact = compare(ids, rows, np.load(dataset / "features/image.ids.npy"),
                         np.load(dataset / "features/image.npy"))
    print(f"{len(ids)} images: {exact} identical to features.py, cosine min {cos.min():.6f} mean {cos.mean():.6f}, "
          f"{int((cos >= 0.999).sum())} >= 0.999; {seconds * 1e3 / len(ids):.1f} ms per image "
          f"(whole command, {a.threads} thread(s))")
    ok = bool((cos >= 0.999).all())
    if a.bundle:
        bundle = Path(a.bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        img_file = manifest["banks"]["img"]
        dtype = "f16" if read_bank_dtype(bundle / img_file) == 1 else "f32"
        copy = work / "bundle"
        shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("cache"))
        subprocess.run([str(BIN), "bank", "build", "--images", str(work / "images"), "--dtype", dtype,
                        "--threads", str(a.threads), "--out", str(work / "runtime-img.bank")], check=True,
                       capture_output=True)
        # Keep the bank's own item set (a bundle may hold fewer items than the dataset has images).
        own = read_bank(bundle / img_file)
        runtime = read_bank(work / "runtime-img.bank")
        kept = sorted(own)
        np.save(work / "rows.npy", np.stack([runtime[i] for i in kept]).astype(np.float32))
        np.save(work / "rows.ids.npy", np.array(kept, dtype=np.int64))
        subprocess.run([str(BIN), "bank", "build", "--npy", str(work / "rows.npy"), "--ids", str(work / "rows.ids.npy"),
                        "--modality", "img", "--dtype", dtype, "--out", str(work / "img.bank")], check=True,
                       capture_output=True)
        args = [str(BIN), "bundle", "create", "--out", str(copy), "--heads", str(bundle / manifest["heads"]),
                "--heads-config", str(bundle / manifest["heads_config"]), "--items", str(bundle / manifest["items"])]
        for m, f in manifest["banks"].items():
            args += ["--bank", f"{m}={work / 'img.bank' if m == 'img' else bundle / f}"]
        subprocess.run(args, check=True, capture_output=True)
        same_bank = all(np.array_equal(own[i], read_bank(copy / 'img.bank')[i]) for i in kept)
        users = [json.loads(line) for line in (dataset / "test.jsonl").read_text().splitlines()[:a.users]]
        ref, ours = top10(bundle, users, a.threads), top10(copy, users, a.threads)
        same = sum(r == o for r, o in zip(ref, ours))
        print(f"ranking: img bank rebuilt by the runtime {'identical to' if same_bank else 'differs from'} the "
              f"bundle's; top-10 identical (items and order) for {same}/{len(users)} test users")
        ok = ok and same == len(users)
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


def read_bank_dtype(path):
    return Path(path).read_bytes()[13]


if __name__ == "__main__":
    main()
