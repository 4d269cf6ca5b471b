import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from illmrec_tools.prepare import REPO_ROOT  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data"
ML100K = DATA / "ml100k-posters"
MLSMALL = DATA / "ml-latest-small-posters"


def tiny_dataset(d, max_users, train_users=None, eval_users=None):
    """The first `max_users` users of the real ml-latest-small prepared in `d`, with seeded random
    features (image rows only for items with a poster; text and cf for all); train.jsonl cut to
    `train_users` lines and valid/test to `eval_users` lines when given."""
    import json
    import numpy as np
    from illmrec_tools.prepare import prepare
    prepare("ml-latest-small", MLSMALL, d, max_users=max_users)
    items = [json.loads(line) for line in (d / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    ids = np.array([it["id"] for it in items], dtype=np.int64)
    with_poster = np.array([it["id"] for it in items if it["image"]], dtype=np.int64)
    rng = np.random.default_rng(0)
    (d / "features").mkdir()
    text = rng.normal(size=(len(ids), 384)).astype(np.float32)
    for name, rows, x in (("image", with_poster, rng.random((len(with_poster), 1024), dtype=np.float32) * 6),
                          ("text", ids, text / np.linalg.norm(text, axis=1, keepdims=True)),
                          ("cf", ids, rng.normal(size=(len(ids), 50)).astype(np.float32))):
        np.save(d / "features" / f"{name}.npy", x)
        np.save(d / "features" / f"{name}.ids.npy", rows)
    for split, n in (("train", train_users), ("valid", eval_users), ("test", eval_users)):
        if n is not None:
            lines = (d / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
            (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d
