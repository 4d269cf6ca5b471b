import json
import shutil

import numpy as np
import pytest
from conftest import MLSMALL

from illmrec_tools.features import DEFAULT_MODEL, check_sha256, compute, item_text
from illmrec_tools.prepare import REPO_ROOT, DataError, prepare

N_ITEMS = 60  # the features of a few items are enough; the encoders dominate the run time


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A prepared ml-latest-small slice, cut down to its first N_ITEMS items."""
    path = tmp_path_factory.mktemp("features") / "ml-latest-small"
    prepare("ml-latest-small", MLSMALL, path, max_users=50)
    lines = (path / "items.jsonl").read_text().splitlines(keepends=True)[:N_ITEMS]
    (path / "items.jsonl").write_text("".join(lines))
    items = [json.loads(line) for line in lines]
    meta = json.loads((path / "dataset.json").read_text())
    meta["missing_image_ids"] = [i["id"] for i in items if i["image"] is None]
    (path / "dataset.json").write_text(json.dumps(meta))
    compute(path)
    return path, items


def test_image_features(dataset):
    path, items = dataset
    with_poster = [i["id"] for i in items if i["image"] is not None]
    missing = [i["id"] for i in items if i["image"] is None]
    assert with_poster and missing
    ids = np.load(path / "features/image.ids.npy")
    feats = np.load(path / "features/image.npy")
    assert ids.dtype == np.int64 and ids.tolist() == with_poster  # ascending, posters only
    assert not set(ids.tolist()) & set(missing)
    assert feats.dtype == np.float32 and feats.shape == (len(with_poster), 1024)
    assert np.isfinite(feats).all() and (feats >= 0).all()  # dequantized average-pool of ReLU6
    assert (np.abs(feats).sum(axis=1) > 0).all()
    assert len(np.unique(feats, axis=0)) == len(feats)


def test_text_features(dataset):
    path, items = dataset
    ids = np.load(path / "features/text.ids.npy")
    feats = np.load(path / "features/text.npy")
    assert ids.dtype == np.int64 and ids.tolist() == [i["id"] for i in items]
    assert feats.dtype == np.float32 and feats.shape == (len(items), 384)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_item_text():
    item = {"title": "Toy Story (1995)", "genres": ["Animation", "Comedy"], "description": "Toys."}
    assert item_text(item) == "Title: Toy Story (1995) Genres: Animation, Comedy Description: Toys."
    assert item_text({**item, "genres": [], "description": None}) == "Title: Toy Story (1995)"


def test_model_checksum(tmp_path):
    check_sha256(DEFAULT_MODEL)
    bad = tmp_path / "model.tflite"
    bad.write_bytes(DEFAULT_MODEL.read_bytes()[:1000])
    with pytest.raises(DataError, match="sha256"):
        check_sha256(bad)


def test_corrupt_poster_is_a_clear_error(dataset, tmp_path):
    path, items = dataset
    items = [dict(i) for i in items]
    copy = shutil.copytree(path, tmp_path / "copy")
    poster = next(i for i in items if i["image"] is not None)
    corrupt = tmp_path / "corrupt.jpg"
    jpeg = (REPO_ROOT / poster["image"]).read_bytes()
    corrupt.write_bytes(jpeg[: len(jpeg) // 2])  # a truncated JPEG
    poster["image"] = str(corrupt)
    (copy / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    with pytest.raises(DataError, match="corrupt.jpg: cannot decode image"):
        compute(copy)
