#!/usr/bin/env python3
"""A GGUF model of a real model's exact shape and vocabulary, with seeded random weights.

For the GPU machine, where at most 64 MiB travel: the real Gemma 3 270M is 1 GB (f32) or 253 MB
(Q4_K_M), but its metadata (architecture, sizes, the tokenizer's 262,144 tokens) is a few MB.
`meta` (here) keeps the metadata and the tensor list; `make` (there) writes a GGUF with the same
metadata and tensors of the same names and shapes filled with random numbers. llama.cpp loads it as
it loads the real model, tokenizes prompts the same way, and runs the same kernels on the same
shapes, so it serves for speed and for CPU-against-GPU parity (not for recommendation quality).

    python3 tools/cuda/shape_model.py meta --model models/gemma-3-270m-q4_k_m.gguf --out gemma3-270m.meta
    python3 tools/cuda/shape_model.py make --meta gemma3-270m.meta --out random.gguf --type f32 --seed 0

Needs only numpy (no gguf package: the GGUF reading and writing is here, format version 3).
Weights: matrices N(0, 0.02²); 1-D tensors (the RMS norms, which Gemma's GGUF stores as 1 + w)
1 + N(0, 0.02²), in f32 whatever --type says, as llama.cpp's converter keeps them.
"""
import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
# GGUF value types: fixed-size ones by struct format.
FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
# ggml tensor types this tool writes: F32, F16. (Reading accepts any: only names and shapes are kept.)
TYPES = {"f32": (0, np.float32), "f16": (1, np.float16)}
FILE_TYPE = {"f32": 0, "f16": 1}  # llama_ftype: ALL_F32, MOSTLY_F16
META_MAGIC = b"ILLMREC-GGUF-SHAPE\n"


class Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n):
        b = self.buf[self.pos:self.pos + n]
        if len(b) != n:
            raise ValueError("truncated GGUF header")
        self.pos += n
        return b

    def unpack(self, fmt):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self):
        return self.take(self.unpack("Q")).decode("utf-8")

    def skip_value(self, vtype):
        if vtype in FIXED:
            self.take(struct.calcsize(FIXED[vtype]))
        elif vtype == STRING:
            self.take(self.unpack("Q"))
        elif vtype == ARRAY:
            itype, n = self.unpack("I"), self.unpack("Q")
            if itype in FIXED:
                self.take(struct.calcsize(FIXED[itype]) * n)
            else:
                for _ in range(n):
                    self.skip_value(itype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")


def read_header(path):
    """(list of (key, value_type, raw value bytes), list of (name, dims)) of a GGUF file."""
    with open(path, "rb") as f:
        head = f.read(64 << 20)  # the header of a model with a 262k vocabulary is ~6 MB
    r = Reader(head)
    if r.take(4) != MAGIC:
        raise SystemExit(f"{path}: not a GGUF file")
    version = r.unpack("I")
    if version not in (2, 3):
        raise SystemExit(f"{path}: GGUF version {version} not supported")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    kvs = []
    for _ in range(n_kv):
        key = r.string()
        vtype = r.unpack("I")
        start = r.pos
        r.skip_value(vtype)
        kvs.append((key, vtype, bytes(head[start:r.pos])))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
        r.unpack("I")  # type
        r.unpack("Q")  # offset
        tensors.append((name, dims))
    return kvs, tensors


def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def cmd_meta(a):
    kvs, tensors = read_header(a.model)
    listing = json.dumps({"source": Path(a.model).name, "tensors": tensors}).encode()
    with open(a.out, "wb") as f:
        f.write(META_MAGIC)
        f.write(struct.pack("<QQ", len(kvs), len(listing)))
        f.write(listing)
        for key, vtype, raw in kvs:
            f.write(gguf_string(key) + struct.pack("<IQ", vtype, len(raw)) + raw)
    n = sum(int(np.prod(d)) for _, d in tensors)
    print(f"{a.out}: {len(kvs)} metadata keys, {len(tensors)} tensors, {n / 1e6:.1f} M parameters, "
          f"{Path(a.out).stat().st_size / 1e6:.1f} MB", file=sys.stderr)


def read_meta(path):
    buf = Path(path).read_bytes()
    if not buf.startswith(META_MAGIC):
        raise SystemExit(f"{path}: not a shape file made by `shape_model.py meta`")
    r = Reader(buf)
    r.take(len(META_MAGIC))
    n_kv, n_listing = r.unpack("Q"), r.unpack("Q")
    listing = json.loads(r.take(n_listing))
    kvs = []
    for _ in range(n_kv):
        key = r.string()
        vtype, n = r.unpack("I"), r.unpack("Q")
        kvs.append((key, vtype, bytes(r.take(n))))
    return kvs, listing["tensors"], listing["source"]


def cmd_make(a):
    kvs, tensors, source = read_meta(a.meta)
    ttype, dtype = TYPES[a.type]
    align = 32
    out_kvs = []
    for key, vtype, raw in kvs:
        if key == "general.alignment":
            align = struct.unpack("<I", raw)[0]
        if key == "general.file_type":
            raw = struct.pack("<I", FILE_TYPE[a.type])
            vtype = 4
        if key.startswith("quantize."):
            continue  # the imatrix and quantization notes of the source model
        if key == "general.name":
            raw = gguf_string(f"random weights in the shape of {source} (seed {a.seed})")
        out_kvs.append((key, vtype, raw))
    infos, offset, plan = [], 0, []
    for name, dims in tensors:
        one_d = len(dims) == 1
        t, dt = (0, np.float32) if one_d else (ttype, dtype)
        nbytes = int(np.prod(dims)) * np.dtype(dt).itemsize
        infos.append(gguf_string(name) + struct.pack("<I", len(dims))
                     + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", t, offset))
        plan.append((name, dims, one_d, dt, offset))
        offset += (nbytes + align - 1) // align * align
    rng = np.random.default_rng(a.seed)
    tmp = Path(str(a.out) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<IQQ", 3, len(tensors), len(out_kvs)))
        for key, vtype, raw in out_kvs:
            f.write(gguf_string(key) + struct.pack("<I", vtype) + raw)
        for info in infos:
            f.write(info)
        pad = (-f.tell()) % align
        f.write(b"\0" * pad)
        data_start = f.tell()
        for name, dims, one_d, dt, off in plan:
            n = int(np.prod(dims))
            chunk = 1 << 24
            assert f.tell() == data_start + off
            for s in range(0, n, chunk):
                x = rng.standard_normal(min(chunk, n - s), dtype=np.float32) * np.float32(a.std)
                if one_d:
                    x += np.float32(1.0)
                f.write(x.astype(dt).tobytes())
            f.write(b"\0" * ((-f.tell() + data_start) % align))
    tmp.replace(a.out)
    print(f"{a.out}: {len(tensors)} tensors ({a.type}), {Path(a.out).stat().st_size / 1e6:.0f} MB, seed {a.seed}",
          file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("meta", help="keep a GGUF's metadata and tensor list (a few MB)")
    m.add_argument("--model", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path)
    g = sub.add_parser("make", help="write a GGUF of that shape with seeded random weights")
    g.add_argument("--meta", required=True, type=Path)
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--type", choices=sorted(TYPES), default="f32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--std", type=float, default=0.02)
    a = ap.parse_args(argv)
    {"meta": cmd_meta, "make": cmd_make}[a.cmd](a)


if __name__ == "__main__":
    main()
