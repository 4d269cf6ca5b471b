"""The runtime against PyTorch on the same CPU, the same histories and the same session.

Runs `illmrec bench --json` and then times the PyTorch reference (tools/illmrec_tools/parity.py's
`Reference`: the same prompt, adaptor, injected vectors and [REC], transformers' Gemma 3 in float32
with its default attention, and the same model weights: the GGUF dequantized) on the same test
users: float32 and bfloat16 autocast (oneDNN; AMX where the CPU has it). A PyTorch request is
timed like the runtime's: prompt embedding, the LLM forward, the user heads, one score per catalog
item (item vectors projected once beforehand, as the runtime's cache holds them) and the top 10.

    PYTHONPATH=tools tools/.venv/bin/python -m illmrec_tools.torch_bench \
        --bundle models/demo-bundle --dataset data/ml-latest-small-demo --users 10 --threads 2

prints a markdown table (and writes --json) with p50/mean per user and each engine's time
relative to the runtime's image-prompt row of the same run. With `--sweep 1,2,4,...,20` it runs
`illmrec bench --sweep` (the paper's Fig. 3) and then PyTorch on the same users' newest L items
at every length L, and prints the runtime, engine-only and PyTorch times per length.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .export import ILLMREC as BIN
from .llm import DEFAULT_GGUF, load_llm
from .parity import Reference


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def runtime_bench(bundle, dataset, users, warmup, threads, extra=(), bin=BIN):
    """`illmrec bench --json`; words NAME=VALUE in `extra` set its environment (e.g.
    ILLMREC_KERNELS=ggml), the rest are options."""
    is_env = [("=" in w and not w.startswith("-")) for w in extra]
    env = dict(os.environ, **dict(w.split("=", 1) for w, e in zip(extra, is_env) if e))
    opts = [w for w, e in zip(extra, is_env) if not e]
    out = subprocess.run([str(bin), "bench", "--bundle", str(bundle), "--dataset", str(dataset),
                          "--users", str(users), "--warmup", str(warmup), "--threads", str(threads),
                          "--images", "0", "--json", *opts], check=True, capture_output=True, text=True,
                         env=env).stdout
    return json.loads(out)


def test_histories(dataset, catalog, n):
    """The first `n` test histories whose items are all in the catalog (as `illmrec bench`)."""
    out = []
    for line in (Path(dataset) / "test.jsonl").read_text().splitlines():
        case = json.loads(line)
        if all(i in catalog for i in case["history"]):
            out.append(case["history"])
            if len(out) == n:
                break
    return out


class TorchScorer:
    """A whole request in PyTorch: [REC] state → user heads → catalog scores → top 10."""

    def __init__(self, ref):
        self.ref = ref
        ids = sorted(ref.items)
        self.ids = torch.tensor(ids)
        vectors, present = [], []
        for m in ref.modalities:
            projected = {k: ref._mlp(f"f_i_{m}", torch.from_numpy(ref.banks[m][i]).double())
                         for k, i in enumerate(ids) if i in ref.banks[m]}
            rows = torch.zeros(len(ids), len(next(iter(projected.values()))))
            have = torch.zeros(len(ids), dtype=torch.bool)
            for k, v in projected.items():
                rows[k], have[k] = v.float(), True
            vectors.append(rows)
            present.append(have)
        self.vectors = vectors
        self.count = torch.stack(present).sum(0).clamp(min=1).float()
        self.w = {k: v.float() for k, v in ref.w.items()}

    @torch.inference_mode()
    def request(self, history):
        h = self.ref.hidden(history).float()
        scores = sum(v @ self.ref._mlp(f"f_u_{m}", h, self.w) for m, v in zip(self.ref.modalities, self.vectors)) / self.count
        seen = torch.isin(self.ids, torch.tensor(history))
        return self.ids[scores.masked_fill(seen, float("-inf")).topk(10).indices]


def time_torch(scorer, histories, warmup, bf16):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    with ctx:
        for k, h in enumerate(histories):
            t = time.perf_counter()
            scorer.request(h)
            if k >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    return times


def pick(histories, length, users, known):
    """The newest `length` items of the first `users` histories that long whose items are all
    `known` (as `illmrec bench --sweep`: `illmrec::sweep::pick`)."""
    out = []
    for h in histories:
        if len(h) >= length and all(i in known for i in h[-length:]):
            out.append(h[-length:])
            if len(out) == users:
                break
    return out


def sweep(a, lengths):
    """`--sweep`: the runtime's Fig. 3 sweep (`illmrec bench --sweep`), then PyTorch float32 and
    bf16 autocast on the same users' histories at every length, one after the other."""
    import contextlib
    import tempfile
    keep = contextlib.nullcontext(str(a.fig3_out)) if a.fig3_out else tempfile.TemporaryDirectory()
    with keep as tmp:
        subprocess.run([str(a.bin), "bench", "--bundle", str(a.bundle), "--dataset", str(a.dataset),
                        "--sweep", ",".join(map(str, lengths)), "--users", str(a.users), "--warmup", str(a.warmup),
                        "--threads", str(a.threads), "--out", tmp], check=True, capture_output=True, text=True)
        runtime = json.loads((Path(tmp) / "fig3.json").read_text())
    ms = {(r["style"], r["length"]): r["mean_ms"] for r in runtime["rows"]}
    model, tok = load_llm(a.gguf)
    model.config._attn_implementation = "sdpa"
    ref = Reference(a.bundle, model, tok, max_history=max(lengths))
    scorer = TorchScorer(ref)
    histories = [json.loads(l)["history"] for l in (Path(a.dataset) / "test.jsonl").read_text().splitlines()]
    known = set(ref.items)
    rows = []
    for bf16 in (False, True):  # warm-up at the longest length, untimed
        time_torch(scorer, pick(histories, max(lengths), max(a.warmup, 1), known), 10 ** 9, bf16)
    for length in lengths:
        picked = pick(histories, length, a.users, known)
        f32 = statistics.fmean(time_torch(scorer, picked, 0, False))
        bf16 = statistics.fmean(time_torch(scorer, picked, 0, True))
        image, engine = ms[("image", length)], ms[("engine", length)]
        rows.append({"length": length, "users": len(picked), "runtime_ms": image, "engine_ms": engine,
                     "torch_f32_ms": f32, "torch_bf16_ms": bf16, "runtime_vs_torch_f32": image / f32,
                     "runtime_vs_torch_bf16": image / bf16})
    report = {"cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__,
              "runtime_model": runtime["machine"]["model"], "runtime_cpu_build": runtime["machine"]["cpu_build"],
              "rows": rows}
    print(f"{report['cpu']}, {a.threads} threads, torch {torch.__version__}, runtime model {report['runtime_model']}\n")
    print("| items | users | illmrec image token ms | engine only ms | PyTorch f32 ms | PyTorch bf16 ms "
          "| illmrec / PyTorch f32 | illmrec / PyTorch bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['users']} | {r['runtime_ms']:.0f} | {r['engine_ms']:.0f} | {r['torch_f32_ms']:.0f} "
              f"| {r['torch_bf16_ms']:.0f} | {r['runtime_vs_torch_f32']:.2f}× | {r['runtime_vs_torch_bf16']:.2f}× |")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF,
                    help="weights for PyTorch (dequantized; the default model is the same weights in f32)")
    ap.add_argument("--bin", type=Path, default=BIN, help="the illmrec binary to time (e.g. a cpu-variants build)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--runtime-args", action="append",
                    help="also time the runtime with these options (e.g. \"--kv-f32\"; NAME=VALUE words set its "
                         "environment, e.g. \"ILLMREC_KERNELS=ggml\"), one more row each; repeatable")
    ap.add_argument("--fig3-out", type=Path, help="with --sweep: keep the runtime's fig3.md/csv/json/png here "
                                                  "(the same run's Fig. 3) instead of a temporary folder")
    ap.add_argument("--sweep", help="history lengths, comma-separated (e.g. 1,2,4,...,20): time the runtime's "
                                    "`bench --sweep` and PyTorch on the same users at each length instead")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.sweep:
        return sweep(a, [int(x) for x in a.sweep.split(",")])

    runtime = runtime_bench(a.bundle, a.dataset, a.users, a.warmup, a.threads, bin=a.bin)
    extra_rows = []
    for args in a.runtime_args or []:  # the same users again, with other runtime options
        more = runtime_bench(a.bundle, a.dataset, a.users, a.warmup, a.threads, extra=args.split(), bin=a.bin)
        extra_rows += [{**r, "config": f"{r['config']}, {args}"} for r in more["rows"]]
    runtime["rows"] += extra_rows
    model, tok = load_llm(a.gguf)
    model.config._attn_implementation = "sdpa"  # PyTorch's fast attention, not the parity run's eager
    ref = Reference(a.bundle, model, tok)
    histories = test_histories(a.dataset, ref.items, a.users + a.warmup)
    scorer = TorchScorer(ref)
    rows = [{"engine": f"illmrec ({r['config']})", "p50_ms": r["p50_ms"], "mean_ms": r["mean_ms"],
             "users": r["users"]} for r in runtime["rows"] if "image token" in r["config"]]
    for name, bf16 in (("PyTorch float32", False), ("PyTorch bf16 autocast", True)):
        t = time_torch(scorer, histories, a.warmup, bf16)
        rows.append({"engine": name, "p50_ms": statistics.median(t), "mean_ms": statistics.fmean(t), "users": len(t)})
    base = rows[0]["mean_ms"]
    for r in rows:
        r["time_vs_runtime"] = r["mean_ms"] / base
    report = {"cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__,
              "onednn_bf16": torch.backends.mkldnn.is_available(), "runtime_model": runtime["model"],
              "rows": rows}
    print(f"{report['cpu']}, {a.threads} threads, torch {torch.__version__}, runtime model {runtime['model']}\n")
    print("| engine | users | p50 ms | mean ms | time vs runtime |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['users']} | {r['p50_ms']:.0f} | {r['mean_ms']:.0f} | {r['time_vs_runtime']:.2f}× |")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
