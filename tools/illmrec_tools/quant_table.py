"""The README's quantization table: for each GGUF quantization of the default model, its file
size, the peak RSS and per-user latency of `illmrec eval`, and HR@5/NDCG@5 on a dataset split.

    PYTHONPATH=tools tools/.venv/bin/python -m illmrec_tools.quant_table \
        --bundle data/runs/ml100k-illmrec/bundle --dataset data/ml100k --limit 150

Missing quantizations are made from the default Q4_K_M model with `illmrec quantize` (so every
row carries the Q4_K_M model's own quantization error; F32 is that model dequantized).
"""

import argparse
import json
import re
import subprocess
from pathlib import Path

from .parity import BIN, REPO, model_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f32,q8_0,q4_k_m")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "quant")
    args = ap.parse_args()

    rows = []
    for kind in args.types.split(","):
        model = model_file(kind)
        out = args.out / kind
        cmd = [str(BIN), "eval", "--bundle", str(args.bundle), "--dataset", str(args.dataset), "--split", args.split,
               "--limit", str(args.limit), "--threads", str(args.threads), "--model", str(model), "--out", str(out)]
        run = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
        peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"type": kind, "size_mib": model.stat().st_size / 2**20, "peak_rss_mib": peak_kib / 1024,
                     "ms_per_user": 1000 / summary["users_per_second"], "hr@5": summary["hr@5"],
                     "ndcg@5": summary["ndcg@5"], "users": summary["n_users"]})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| GGUF | file MiB | peak RSS MiB | ms / user | HR@5 | NDCG@5 | users |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['type']} | {r['size_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['ms_per_user']:.0f} | "
              f"{r['hr@5']:.4f} | {r['ndcg@5']:.4f} | {r['users']} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
