"""The runtime's image encoder (`illmrec encode-images`) against features.py on generated
pictures: sizes that take both of Pillow's resize pass orders, JPEG (baseline, progressive,
4:2:0 and 4:4:4, greyscale), PNG (RGB, RGBA, palette, 16-bit) and WebP. Rows must be identical
(cosine 1); needs target/release/illmrec (built by cargo test)."""
import numpy as np
from PIL import Image

from illmrec_tools.features import image_features
from illmrec_tools.image_parity import compare, encode


def picture(rng, w, h):
    """A smooth random picture with some edges (what posters look like to a resize)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / rng.uniform(3, 30) + c) * np.cos(y / rng.uniform(3, 30)) for c in range(3)], -1)
    img = (base * 100 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(img, "RGB")


def test_runtime_rows_equal_features_py_all_formats(tmp_path):
    rng = np.random.default_rng(14)
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(92, 138), (185, 278), (278, 185), (400, 90), (60, 500), (224, 224), (300, 300), (31, 17),
             (640, 480), (150, 700)]
    items = []
    for k, (w, h) in enumerate(sizes):
        img = picture(rng, w, h)
        kind = k % 6
        if kind == 0:
            path, args = folder / f"{k}.jpg", dict(quality=85)
        elif kind == 1:
            path, args = folder / f"{k}.jpg", dict(quality=90, progressive=True, subsampling=0)
        elif kind == 2:
            path, args = folder / f"{k}.png", {}
            img = img.convert("RGBA")
        elif kind == 3:
            path, args = folder / f"{k}.png", {}
            img = img.convert("P")
        elif kind == 4:
            path, args = folder / f"{k}.webp", dict(quality=80)
        else:
            path, args = folder / f"{k}.jpg", dict(quality=75)
            img = img.convert("L")
        img.save(path, **args)
        items.append({"id": k, "image": str(path)})
    ref_ids, ref_rows = image_features(items)
    ids, rows, _ = encode(folder, tmp_path, threads=2)
    cos, exact = compare(ids, rows, ref_ids, ref_rows)
    assert sorted(ids.tolist()) == list(range(len(sizes)))
    assert cos.min() >= 0.999, dict(zip(ids.tolist(), cos.tolist()))
    assert exact == len(sizes), dict(zip(ids.tolist(), cos.tolist()))
