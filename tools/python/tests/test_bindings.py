"""The Python bindings against the CLI on the shipped demo bundle and the real default model:
the same records, rankings and hidden states; errors as IllmrecError with the runtime's message;
the GIL released while the model runs; type hints installed.

Needs `pip install ./tools/python` and the release binary (tools/test.sh does both)."""

import json
import random
import subprocess
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import illmrec

ROOT = Path(__file__).resolve().parents[3]
BIN = ROOT / "target" / "release" / "illmrec"
BUNDLE = ROOT / "models" / "demo-bundle"


def item_ids():
    return [json.loads(line)["id"] for line in (BUNDLE / "items.jsonl").read_text().splitlines()]


def seeded_users(n, seed=0):
    """`n` users with seeded histories (2-6 items) over the demo catalog; some with candidates."""
    rng = random.Random(seed)
    ids = item_ids()
    users = []
    for u in range(n):
        user = {"user": f"u{u}", "history": rng.sample(ids, rng.randint(2, 6))}
        if u % 3 == 1:
            user["candidates"] = rng.sample(ids, 20)
            user["top_k"] = 5
        users.append(user)
    return users


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def rec(cache):
    return illmrec.Recommender(BUNDLE, threads=1, cache_dir=cache)


def cli(*args):
    out = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_score_batch_is_the_score_command(rec, cache, tmp_path):
    users = seeded_users(6)
    (tmp_path / "users.jsonl").write_text("".join(json.dumps(u) + "\n" for u in users))
    cli("score", "--bundle", BUNDLE, "--input", tmp_path / "users.jsonl", "--output", tmp_path / "out.jsonl",
        "--threads", 1, "--cache-dir", cache)
    want = (tmp_path / "out.jsonl").read_text()
    got = rec.score_batch(users)
    assert "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in got) == want


def test_recommend_and_embed_match_the_cli(rec, cache, tmp_path):
    history = [260, 1198, 1196, 1210, 589]
    ids, scores = rec.recommend(history, top_k=10)
    assert ids.dtype == np.uint64 and scores.dtype == np.float32 and len(ids) == 10
    j = json.loads(cli("recommend", "--bundle", BUNDLE, "--history", ",".join(map(str, history)), "--json",
                       "--threads", 1, "--cache-dir", cache))
    assert [it["id"] for it in j["items"]] == ids.tolist()
    assert np.array_equal(np.array([it["score"] for it in j["items"]], dtype=np.float32), scores)
    assert not set(ids.tolist()) & set(history), "seen items are excluded"
    cand = [1, 2, 3, 260]
    ids2, _ = rec.recommend(history, top_k=10, candidates=cand, include_seen=True)
    assert sorted(ids2.tolist()) == sorted(cand)

    histories = [[260, 1198], [589], [1, 2, 3]]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"history": h}) + "\n" for h in histories))
    cli("embed", "--bundle", BUNDLE, "--input", tmp_path / "h.jsonl", "--output", tmp_path / "h.npy",
        "--user-vectors", "--threads", 1, "--cache-dir", cache)
    hidden, user = rec.embed(histories, user_vectors=True)
    assert hidden.shape == (3, rec.n_embd) and hidden.dtype == np.float32
    assert np.array_equal(hidden, np.load(tmp_path / "h.npy"))
    assert np.array_equal(user, np.load(tmp_path / "h.user.npy"))
    assert np.array_equal(rec.embed(histories), hidden)
    assert rec.embed([]).shape == (0, rec.n_embd)


def test_errors_are_python_exceptions_with_the_runtime_message(rec, tmp_path):
    with pytest.raises(illmrec.IllmrecError, match="item 999999999 is not in the catalog"):
        rec.recommend([999999999])
    with pytest.raises(illmrec.IllmrecError, match="history is empty"):
        rec.recommend([])
    with pytest.raises(illmrec.IllmrecError, match=r"users\[1\]: not a valid user record"):
        rec.score_batch([{"history": [1]}, {"histroy": [1]}])
    with pytest.raises(illmrec.IllmrecError, match=r"histories\[0\]"):
        rec.embed([[999999999]])
    out = rec.score_batch([{"user": "a", "history": [999999999]}, {"user": "b", "history": [1]}], errors="return")
    assert out[0]["user"] == "a" and "not in the catalog" in out[0]["error"]
    assert out[1]["user"] == "b" and "items" in out[1]
    with pytest.raises(illmrec.IllmrecError, match="manifest"):
        illmrec.Recommender(tmp_path)
    with pytest.raises(illmrec.IllmrecError, match="--threads 0 is out of range"):
        illmrec.Recommender(BUNDLE, threads=0)
    with pytest.raises(ValueError, match="flash_attn"):
        illmrec.Recommender(BUNDLE, flash_attn="sometimes")
    with pytest.raises(TypeError):
        illmrec.Recommender(BUNDLE, thread=1)
    assert isinstance(illmrec.IllmrecError("x"), RuntimeError)
    # Still usable after the errors.
    assert len(rec.recommend([260], top_k=3)[0]) == 3


def test_the_gil_is_released_during_inference(rec):
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        time.sleep(0.05)
        before = ticks
        t0 = time.perf_counter()
        rec.embed([[260, 1198, 1196, 1210, 589]] * 3)
        took = time.perf_counter() - t0
        during = ticks - before
    finally:
        stop.set()
        t.join()
    # Holding the GIL for the whole call would leave the counter thread a few switch intervals.
    assert took > 0.1 and during > 10_000, (took, during)


def test_type_hints_are_installed():
    files = resources.files("illmrec")
    assert files.joinpath("py.typed").is_file()
    assert "def score_batch" in files.joinpath("_illmrec.pyi").read_text()
    assert illmrec.Recommender.recommend.__doc__
