"""The staged recipe end to end on a small slice (CI smoke): training windows, an init bundle,
runtime-extracted [REC] states (`illmrec embed`, with and without --prefixes), heads trained on
them (the loss goes down), an export the runtime loads, and the no-LLM baseline. Needs
target/release/illmrec (built by cargo test) and the default model."""
import json

import numpy as np
import pytest

from conftest import tiny_dataset
from illmrec_tools import stages
from illmrec_tools.parity import illmrec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The first 30 users of the real ml-latest-small with seeded random features; valid and test
    cut to 8 users (the runtime extracts one state per valid user)."""
    return tiny_dataset(tmp_path_factory.mktemp("stages") / "data", 30, eval_users=8)


def test_chunks_cover_every_target_once():
    rows = [{"user": 1, "items": list(range(100, 125))}, {"user": 2, "items": [7, 8]}, {"user": 3, "items": [9]}]
    all_chunks = list(stages.chunks(rows))
    windows = stages.expand(all_chunks)
    # every target position t >= 1 of every sequence exactly once, history = up to 10 items before it
    want = [(r["items"][max(0, t - 10):t], r["items"][t]) for r in rows for t in range(1, len(r["items"]))]
    assert sorted(map(repr, windows)) != [] and len(windows) == len(want)
    for h, t in windows:
        seq = next(r["items"] for r in rows if t in r["items"])
        k = seq.index(t)
        assert 1 <= len(h) <= 10 and h == seq[k - len(h):k]
    sample, total = stages.sample_chunks(rows, budget=5, seed=1)
    assert total == len(want) and {c["user"] for c in sample} == {1, 2}  # every user with a window


def test_states_heads_export(tiny, tmp_path):
    run = tmp_path / "run"
    stages.main(["windows", "--dataset", str(tiny), "--out", str(run / "windows.jsonl"), "--budget", "30"])
    stages.main(["init", "--dataset", str(tiny), "--out", str(run / "init")])
    bundle = run / "init" / "bundle"
    illmrec("embed", "--bundle", bundle, "--input", tiny / "valid.jsonl", "--output", run / "valid.npy",
            "--threads", 2)
    illmrec("embed", "--bundle", bundle, "--input", run / "windows.jsonl", "--output", run / "train.npy",
            "--prefixes", "--user-vectors", "--threads", 2)
    chunks = [json.loads(line) for line in (run / "windows.jsonl").read_text().splitlines()]
    states, user = np.load(run / "train.npy"), np.load(run / "train.user.npy")
    assert states.shape == (sum(len(c["history"]) for c in chunks), 640) and np.isfinite(states).all()
    assert user.shape == (len(states), 3 * 512)
    assert not (run / "train.npy.partial").exists()
    # The full-chunk row of --prefixes is the same prompt as a plain one of that chunk; its [REC]
    # row shares a batch with the other prefixes' (llama.cpp tiles multi-row batches differently),
    # so it agrees within batch-shape noise, like the prefix cache.
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"history": chunks[0]["history"]}) + "\n")
    illmrec("embed", "--bundle", bundle, "--input", first, "--output", tmp_path / "first.npy", "--threads", 2)
    a, b = np.load(tmp_path / "first.npy")[0], states[len(chunks[0]["history"]) - 1]
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99

    out = run / "heads"
    stages.main(["heads", "--dataset", str(tiny), "--states", str(run), "--windows", str(run / "windows.jsonl"),
                 "--init", str(run / "init"), "--out", str(out), "--epochs", "8", "--patience", "8",
                 "--batch-size", "16", "--threads", "2"])
    summary = json.loads((out / "summary.json").read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert summary["windows"] == len(states) and losses[-1] < losses[0], losses
    cfg = json.loads((out / "heads.json").read_text())
    assert cfg["trained"] is True and "runtime-extracted" in cfg["provenance"]
    # The exported bundle loads and ranks in the runtime; the adaptor and [REC] are the init's.
    ranked = json.loads(illmrec("recommend", "--bundle", out / "bundle", "--history",
                                ",".join(map(str, chunks[0]["history"])), "--json", "--threads", 2))
    assert ranked["trained"] is True and len(ranked["items"]) == 10

    stages.main(["heads", "--dataset", str(tiny), "--states", str(run), "--windows", str(run / "windows.jsonl"),
                 "--out", str(tmp_path / "nollm"), "--user-input", "features", "--epochs", "3",
                 "--batch-size", "16", "--threads", "2"])
    nollm = json.loads((tmp_path / "nollm" / "summary.json").read_text())
    assert nollm["user_input"] == "features" and 0 <= nollm["test"]["hr@5"] <= 1
