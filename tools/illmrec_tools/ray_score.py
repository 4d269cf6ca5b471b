"""Batch scoring on a Ray cluster: `illmrec score` spread over an actor pool with Ray Data.

    python -m illmrec_tools.ray_score --bundle models/demo-bundle --input users.jsonl \\
        --output scored/ [--format jsonl|parquet] [--address auto] [--actors 2] [--threads 1]

Reads `illmrec score` input records from a JSON-lines file (one user per line) or from Parquet
(columns `history` and optionally `user`, `candidates`, `top_k`; other columns are ignored),
splits them into blocks of `--batch-size` users and runs them through `--actors` actors with
`map_batches`. Each actor opens the bundle once (`illmrec.Recommender`, the Python bindings: the
GGUF model is memory-mapped, so the actors of one node share it through the page cache) and scores
its batches with `score_batch`, the function `illmrec score` uses: records are the same, byte for
byte. Output (a folder, one file per block, written by the workers in parallel):

- `--format jsonl`: the `illmrec score` output lines (a malformed record is left out and reported
  on stderr, as `illmrec score` skips it);
- `--format parquet`: columns `user` (its JSON text), `history_used`, `item_ids` (list<uint64>),
  `scores` (list<float32>), `record` (the JSON line, null for a bad record) and `error` (null, or
  why the record was not scored).

Scaling: the script connects to whatever cluster `--address` names (`auto`: the one this machine
belongs to; none: a local one) and needs no change for more nodes: raise `--actors` (or give
MIN,MAX for autoscaling) and add nodes with `ray start --address HEAD:6379`. Every node needs the
`illmrec` package, the bundle and the model at the same path (a shared filesystem, or copied
from an object store and checked with `illmrec bundle verify`). Each actor reserves `--cpus-per-actor` Ray
CPUs (default `--threads`); reading, repartitioning and writing need CPUs too, so a cluster must
advertise at least one Ray CPU more than the actors take (e.g. `ray start --num-cpus` = cores + 1
on each node), or Ray Data waits for CPUs forever. A worker that dies is restarted
by Ray and its batch retried (Ray Data's actor pools retry without limit), so no user is lost;
a batch's records are kept only from the task that finished, so none is written twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

KEYS = ("user", "history", "candidates", "top_k")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle folder (the same path on every node)")
    p.add_argument("--input", required=True, help="users: a .jsonl file, or Parquet file(s)/folder")
    p.add_argument("--output", required=True, help="output folder (one file per block)")
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto', HOST:PORT); default: "
                   "RAY_ADDRESS, else a local cluster")
    p.add_argument("--actors", default="2", help="actor pool size N, or MIN,MAX to autoscale")
    p.add_argument("--threads", type=int, default=1, help="LLM threads per actor")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="Ray CPUs reserved per actor "
                   "(default: --threads)")
    p.add_argument("--batch-size", type=int, default=8, help="users per batch (the unit of retry)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--include-seen", action="store_true")
    p.add_argument("--max-history", type=int, default=10)
    p.add_argument("--model", default=None, help="GGUF instead of the bundle's (same path on every node)")
    p.add_argument("--cache-dir", default=None, help="item-vector cache folder on each node")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.top_k < 1 or a.threads < 1:
        p.error("--batch-size, --top-k and --threads must be at least 1")
    try:
        sizes = tuple(int(x) for x in a.actors.split(","))
        assert len(sizes) in (1, 2) and all(s >= 1 for s in sizes)
    except (ValueError, AssertionError):
        p.error(f"--actors {a.actors!r}: expected N or MIN,MAX (at least 1)")
    a.actors = sizes[0] if len(sizes) == 1 else sizes
    # Workers run in other folders: local paths are made absolute (URIs such as s3:// stay).
    for name in ("bundle", "input", "output", "model", "cache_dir"):
        value = getattr(a, name)
        if value and "://" not in value:
            setattr(a, name, str(Path(value).resolve()))
    return a


class Scorer:
    """One actor: opens the bundle once, scores batches with the bindings."""

    def __init__(self, bundle, options, top_k, include_seen, from_text):
        import illmrec

        self.rec = illmrec.Recommender(bundle, **options)
        self.top_k, self.include_seen, self.from_text = top_k, include_seen, from_text

    def __call__(self, batch):
        import pyarrow as pa

        if self.from_text:
            users = []
            for text in batch.column("text").to_pylist():
                if not text.strip():
                    continue  # blank lines are skipped, as by `illmrec score`
                try:
                    users.append(json.loads(text))
                except ValueError as e:
                    users.append({"__bad__": f"not a valid user line: {e}"})
        else:
            users = [{k: v for k, v in row.items() if k in KEYS and v is not None}
                     for row in batch.to_pylist()]
        records = self.rec.score_batch(users, top_k=self.top_k, include_seen=self.include_seen,
                                       errors="return")
        cols = {name: [] for name in ("user", "history_used", "item_ids", "scores", "record", "error")}
        for r in records:
            ok = "error" not in r
            cols["user"].append(json.dumps(r.get("user"), ensure_ascii=False))
            cols["history_used"].append(r["history_used"] if ok else None)
            cols["item_ids"].append([it["id"] for it in r["items"]] if ok else None)
            cols["scores"].append([it["score"] for it in r["items"]] if ok else None)
            cols["record"].append(json.dumps(r, separators=(",", ":"), ensure_ascii=False) if ok else None)
            cols["error"].append(None if ok else r["error"])
            if not ok:
                print(f"illmrec-ray: skipped user {cols['user'][-1]}: {r['error']}", file=sys.stderr, flush=True)
        print(f"illmrec-ray: scored a batch of {len(records)} users", flush=True)
        return pa.table(cols, schema=output_schema())


def output_schema():
    """Columns of the scored dataset (fixed, so every block's file has the same schema)."""
    import pyarrow as pa

    return pa.schema([("user", pa.string()), ("history_used", pa.list_(pa.uint64())),
                      ("item_ids", pa.list_(pa.uint64())), ("scores", pa.list_(pa.float32())),
                      ("record", pa.string()), ("error", pa.string())])


def jsonl_sink(path):
    """A Ray Data sink writing the `record` column as JSON lines (one file per block)."""
    from ray.data.datasource import BlockBasedFileDatasink

    class JsonlRecords(BlockBasedFileDatasink):
        def __init__(self, path):
            super().__init__(path, file_format="jsonl")

        def write_block_to_file(self, block, file):
            table = block.to_arrow()
            lines = [r + "\n" for r in table.column("record").to_pylist() if r is not None]
            file.write("".join(lines).encode("utf-8"))

    return JsonlRecords(path)


def main(argv=None):
    a = parse_args(argv)
    import ray

    ray.init(address=a.address, logging_level="WARNING", log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    options = {"threads": a.threads, "max_history": a.max_history}
    if a.model:
        options["model"] = a.model
    if a.cache_dir:
        options["cache_dir"] = a.cache_dir
    from_text = a.input.endswith(".jsonl") or a.input.endswith(".json")
    if from_text:
        ds = ray.data.read_text(a.input)
    else:
        ds = ray.data.read_parquet(a.input)
    ds = ds.repartition(target_num_rows_per_block=a.batch_size, strict=True)
    scored = ds.map_batches(
        Scorer,
        fn_constructor_args=(a.bundle, options, a.top_k, a.include_seen, from_text),
        batch_size=a.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=a.actors) if isinstance(a.actors, int)
        else ray.data.ActorPoolStrategy(min_size=a.actors[0], max_size=a.actors[1]),
        num_cpus=a.cpus_per_actor or a.threads,
        scheduling_strategy="SPREAD",
    )
    t0 = time.time()
    if a.format == "parquet":
        scored.write_parquet(a.output)
    else:
        scored.write_datasink(jsonl_sink(a.output))
    took = time.time() - t0
    stats = ray.data.read_parquet(a.output, columns=["error"]) if a.format == "parquet" else None
    if stats is not None:
        bad = stats.filter(lambda r: r["error"] is not None).count()
        n = stats.count()
        print(f"illmrec-ray: {n - bad} users scored, {bad} bad records, {took:.1f} s; wrote {a.output}",
              file=sys.stderr)
    else:
        print(f"illmrec-ray: done in {took:.1f} s; wrote {a.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
