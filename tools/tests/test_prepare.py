import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import ML100K, MLSMALL

from illmrec_tools.prepare import N_NEGATIVES, DataError, load_ml100k, main, prepare

SLICES = {"ml-latest-small": (MLSMALL, 50), "ml100k": (ML100K, 30)}
FILES = ["dataset.json", "items.jsonl", "sequences.jsonl", "train.jsonl", "valid.jsonl", "test.jsonl"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def raw_ratings(dataset, users):
    """(user, item, time) read straight from the source files, for an independent check."""
    if dataset == "ml100k":
        rows = [line.split("\t") for line in (ML100K / "u.data").read_text().splitlines()]
        rows = [(int(r[0]), int(r[1]), int(r[3])) for r in rows]
    else:
        with open(MLSMALL / "ratings.csv", newline="") as f:
            rows = [(int(r["userId"]), int(r["movieId"]), int(r["timestamp"])) for r in csv.DictReader(f)]
    return [r for r in rows if r[0] in users]


@pytest.fixture(scope="module", params=sorted(SLICES))
def out(request, tmp_path_factory):
    src, max_users = SLICES[request.param]
    path = tmp_path_factory.mktemp(request.param) / request.param
    prepare(request.param, src, path, seed=42, max_users=max_users)
    return request.param, path


def test_deterministic_for_a_seed(out, tmp_path):
    dataset, path = out
    src, max_users = SLICES[dataset]
    prepare(dataset, src, tmp_path / "again", seed=42, max_users=max_users)
    for name in FILES[1:]:
        assert (tmp_path / "again" / name).read_bytes() == (path / name).read_bytes(), name
    prepare(dataset, src, tmp_path / "other", seed=7, max_users=max_users)
    assert (tmp_path / "other" / "test.jsonl").read_bytes() != (path / "test.jsonl").read_bytes()


def test_negatives(out):
    _, path = out
    item_ids = {i["id"] for i in read_jsonl(path / "items.jsonl")}
    sequences = {s["user"]: set(s["items"]) for s in read_jsonl(path / "sequences.jsonl")}
    for name in ("valid.jsonl", "test.jsonl"):
        rows = read_jsonl(path / name)
        assert [r["user"] for r in rows] == list(sequences)
        for r in rows:
            negatives = r["negatives"]
            assert len(negatives) == N_NEGATIVES
            assert len(set(negatives)) == N_NEGATIVES
            assert not set(negatives) & sequences[r["user"]]
            assert set(negatives) <= item_ids


def test_leave_one_out(out):
    _, path = out
    sequences = read_jsonl(path / "sequences.jsonl")
    train, valid, test = (read_jsonl(path / n) for n in ("train.jsonl", "valid.jsonl", "test.jsonl"))
    assert len(sequences) == len(train) == len(valid) == len(test) > 0
    for s, tr, va, te in zip(sequences, train, valid, test):
        seq = s["items"]
        assert len(seq) >= 3
        assert s["user"] == tr["user"] == va["user"] == te["user"]
        assert tr["items"] == seq[:-2]
        assert (va["history"], va["target"]) == (seq[:-2], seq[-2])
        assert (te["history"], te["target"]) == (seq[:-1], seq[-1])


def test_time_order_and_tie_policies(out, tmp_path):
    """Default (seeded shuffle): time order, and within a timestamp the same item set in an order
    that is neither forced to ascending id nor different between runs. "file" keeps the source
    order (a stable sort by time), "id" sorts ties by item id."""
    dataset, path = out
    sequences = {s["user"]: s["items"] for s in read_jsonl(path / "sequences.jsonl")}
    rows = raw_ratings(dataset, set(sequences))
    ties = 0
    for user, seq in sequences.items():
        events = sorted((t, i) for u, i, t in rows if u == user)
        time = {i: t for t, i in events}
        assert sorted(seq, key=lambda i: time[i]) == seq, "time order"
        assert sorted(seq) == sorted(i for _, i in events)
        ties += sum(a[0] == b[0] for a, b in zip(events, events[1:]))
    assert ties > 0  # the slice really exercises the tie-break
    meta = json.loads((path / "dataset.json").read_text())
    assert meta["n_interactions"] == len(rows) == sum(map(len, sequences.values()))
    assert meta["n_users"] == len(sequences) and meta["n_negatives"] == N_NEGATIVES
    assert meta["ties"] == "shuffle"

    src, max_users = SLICES[dataset]
    by_policy = {"shuffle": sequences}
    for ties_ in ("id", "file"):
        prepare(dataset, src, tmp_path / ties_, seed=42, max_users=max_users, ties=ties_)
        by_policy[ties_] = {s["user"]: s["items"] for s in read_jsonl(tmp_path / ties_ / "sequences.jsonl")}
    for user in sequences:
        user_rows = [(t, i) for u, i, t in rows if u == user]
        assert by_policy["id"][user] == [i for _, i in sorted(user_rows)]
        assert by_policy["file"][user] == [i for _, i in sorted(user_rows, key=lambda r: r[0])]
    if dataset == "ml100k":  # u.data is not sorted by item: each policy orders some tie differently
        assert by_policy["shuffle"] != by_policy["id"] and by_policy["file"] != by_policy["id"]


def test_missing_posters_listed(out):
    _, path = out
    items = read_jsonl(path / "items.jsonl")
    assert [i["id"] for i in items] == sorted(i["id"] for i in items)
    missing = [i["id"] for i in items if i["image"] is None]
    assert missing  # both slices contain items without a poster
    assert json.loads((path / "dataset.json").read_text())["missing_image_ids"] == missing
    for item in items:
        if item["image"] is not None:
            assert (Path(__file__).resolve().parents[2] / item["image"]).is_file()


def test_ml100k_items_text():
    _, items = load_ml100k(ML100K)
    assert len(items) == 1682
    assert items[543]["title"] == "Misérables, Les (1995)"  # latin-1 in u.item
    assert items[1]["title"] == "Toy Story (1995)" and items[1]["year"] == 1995
    assert items[1]["genres"] == ["Animation", "Children's", "Comedy"]
    assert items[1]["description"].startswith("Led by Woody")
    assert items[563]["description"] is None and items[563]["poster"] is None


def test_min_item_ratings(tmp_path):
    prepare("ml100k", ML100K, tmp_path, max_users=300, min_item_ratings=20)
    counts = {}
    for s in read_jsonl(tmp_path / "sequences.jsonl"):
        for i in s["items"]:
            counts[i] = counts.get(i, 0) + 1
    assert counts and min(counts.values()) >= 20
    assert {i["id"] for i in read_jsonl(tmp_path / "items.jsonl")} == set(counts)


def copy_source(src, dst):
    """A writable copy of a source folder (posters linked, not copied)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f) if f.is_dir() else shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("dataset,src,name", [("ml100k", ML100K, "u.data"),
                                              ("ml-latest-small", MLSMALL, "ratings.csv")])
def test_truncated_input_is_a_clear_error(tmp_path, capsys, dataset, src, name):
    copy = copy_source(src, tmp_path / "src")
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{name}.*truncated"):
        prepare(dataset, copy, tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        main(["--dataset", dataset, "--src", str(copy), "--out", str(tmp_path / "out")])
    assert "prepare: error:" in str(e.value) and "truncated" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_corrupt_line_is_a_clear_error(tmp_path):
    copy = copy_source(ML100K, tmp_path / "src")
    lines = (copy / "u.data").read_text().splitlines(keepends=True)
    lines[10] = "196\t242\n"
    (copy / "u.data").write_text("".join(lines))
    with pytest.raises(DataError, match=r"u\.data:11: expected 4 fields, got 2"):
        prepare("ml100k", copy, tmp_path / "out")
    (copy / "u.data").unlink()
    with pytest.raises(DataError, match="u.data: file not found"):
        prepare("ml100k", copy, tmp_path / "out")
