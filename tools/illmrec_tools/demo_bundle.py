"""Builds the shipped demo bundle (models/demo-bundle/) from the prepared ml-latest-small data.

The catalog is the movies with at least --min-ratings ratings; their image (MobileNet), text
(MiniLM) and, when present, cf (SASRec) features become f16 banks. The heads are the trained
ones given by --heads/--heads-config, or, without them, seeded random heads that the runtime
announces as untrained on every run.

    PYTHONPATH=tools tools/.venv/bin/python -m illmrec_tools.demo_bundle \
        --dataset data/ml-latest-small [--heads H.safetensors --heads-config H.json]
"""

import argparse
import collections
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "release" / "illmrec"
LICENCE = REPO.parent / "shared" / "data" / "ml-latest-small-posters" / "README.txt"
# A recognisable history (oldest first): Star Wars IV, Raiders of the Lost Ark, The Empire
# Strikes Back, Return of the Jedi, Terminator 2.
SAMPLE_HISTORY = [260, 1198, 1196, 1210, 589]


def run(*args: str) -> None:
    subprocess.run([str(BIN), *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=REPO / "data" / "ml-latest-small")
    ap.add_argument("--out", type=Path, default=REPO / "models" / "demo-bundle")
    ap.add_argument("--min-ratings", type=int, default=20)
    ap.add_argument("--heads", type=Path, help="trained heads.safetensors (else random heads)")
    ap.add_argument("--heads-config", type=Path, help="its heads.json")
    args = ap.parse_args()
    if bool(args.heads) != bool(args.heads_config):
        ap.error("--heads and --heads-config go together")

    counts = collections.Counter()
    for line in (args.dataset / "sequences.jsonl").read_text().splitlines():
        counts.update(json.loads(line)["items"])
    keep = {i for i, c in counts.items() if c >= args.min_ratings}
    missing = [i for i in SAMPLE_HISTORY if i not in keep]
    if missing:
        raise SystemExit(f"demo_bundle: sample history items {missing} have fewer than {args.min_ratings} ratings")

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items = [json.loads(l) for l in (args.dataset / "items.jsonl").read_text().splitlines()]
        with open(tmp / "items.jsonl", "w") as f:
            for it in items:
                if it["id"] in keep:
                    f.write(json.dumps({"id": it["id"], "title": it["title"], "genres": it["genres"]}) + "\n")
        banks = []
        for modality, name in [("img", "image"), ("text", "text"), ("cf", "cf")]:
            feats = args.dataset / "features" / f"{name}.npy"
            if not feats.exists():
                continue
            ids = np.load(args.dataset / "features" / f"{name}.ids.npy")
            rows = np.load(feats)
            mask = np.isin(ids, sorted(keep))
            np.save(tmp / f"{modality}.npy", np.ascontiguousarray(rows[mask], dtype=np.float32))
            np.save(tmp / f"{modality}.ids.npy", ids[mask].astype(np.int64))
            run("bank", "build", "--npy", str(tmp / f"{modality}.npy"), "--ids", str(tmp / f"{modality}.ids.npy"),
                "--modality", modality, "--dtype", "f16", "--out", str(tmp / f"{modality}.bank"))
            banks.append((modality, tmp / f"{modality}.bank", rows.shape[1]))

        if args.heads:
            heads, config = args.heads, args.heads_config
        else:
            config = tmp / "heads.json"
            dims = {m: d for m, _, d in banks}
            config.write_text(json.dumps({
                "format": "illmrec-heads", "version": 1, "llm_dim": 640, "proj_dim": 512, "hidden_dim": 1024,
                "prompt": "image", "image_dim": dims["img"], "adaptor_dim": 512, "item_dims": dims,
                "trained": False, "provenance": "seeded random initialisation (seed 0), not trained",
            }, indent=2))
            heads = tmp / "heads.safetensors"
            run("init-heads", "--config", str(config), "--out", str(heads), "--seed", "0", "--dtype", "f16")
        scored = set(json.loads(Path(config).read_text())["item_dims"])
        bank_args = [a for m, p, _ in banks if m in scored for a in ("--bank", f"{m}={p}")]
        for old in args.out.glob("*.bank"):
            old.unlink()
        run("bundle", "create", "--out", str(args.out), "--heads", str(heads), "--heads-config", str(config),
            "--items", str(tmp / "items.jsonl"), *bank_args)
    shutil.copyfile(LICENCE, args.out / "README-ml-latest-small.txt")
    (args.out / "sample-history.txt").write_text(",".join(map(str, SAMPLE_HISTORY)) + "\n")
    print(f"demo_bundle: wrote {args.out} ({len(keep)} movies)")


if __name__ == "__main__":
    main()
