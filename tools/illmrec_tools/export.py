"""Builds a runtime bundle from a training run: banks for the img/cf/text features (illmrec bank
build), then `illmrec bundle create` (pointing at the run's model.gguf when the token table was
trained, else at the default model), then checks it with `illmrec recommend`.

    python -m illmrec_tools.export --run data/runs/X --dataset data/ml100k --bundle data/runs/X/bundle
"""
import argparse
import json
import subprocess
from pathlib import Path

from .llm import REPO

ILLMREC = REPO / "target" / "release" / "illmrec"
FEATURES = {"img": "image", "cf": "cf", "text": "text"}


def run(*args):
    print("+", " ".join(map(str, args)), flush=True)
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def build_bundle(run_dir, dataset, bundle, dtype="f16", check_history=None, threads=2):
    run_dir, dataset, bundle = Path(run_dir), Path(dataset), Path(bundle)
    banks = run_dir / "banks"
    banks.mkdir(parents=True, exist_ok=True)
    bank_args = []
    for m, f in FEATURES.items():
        out = banks / f"{m}.bank"
        run(ILLMREC, "bank", "build", "--npy", dataset / "features" / f"{f}.npy",
            "--ids", dataset / "features" / f"{f}.ids.npy", "--modality", m, "--dtype", dtype, "--out", out)
        bank_args += ["--bank", f"{m}={out}"]
    if (run_dir / "model.gguf").exists():  # trained with --train-token-embeddings
        bank_args += ["--model", run_dir / "model.gguf"]
    run(ILLMREC, "bundle", "create", "--out", bundle, "--heads", run_dir / "heads.safetensors",
        "--heads-config", run_dir / "heads.json", "--items", dataset / "items.jsonl", *bank_args)
    if check_history is None:  # the first valid user's last 5 history items
        with open(dataset / "valid.jsonl", encoding="utf-8") as f:
            check_history = json.loads(f.readline())["history"][-5:]
    return run(ILLMREC, "recommend", "--bundle", bundle, "--history", ",".join(map(str, check_history)),
               "--threads", threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="folder with heads.safetensors + heads.json")
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f16", help="bank storage")
    a = ap.parse_args(argv)
    print(build_bundle(a.run, a.dataset, a.bundle, a.dtype))


if __name__ == "__main__":
    main()
