"""PyTorch reference scorer for an illmrec bundle, and its comparison with the Rust runtime.

The reference rebuilds what the runtime computes, independently: the prompt from src/prompt.json
and the bundle's items.jsonl and banks, the GGUF model in transformers float32 (eager attention),
adaptor outputs injected unscaled, [REC] = rec_token, the final-norm hidden state there through
the user heads, and score = mean over the modalities an item has of u_m · f_i_m(x_m).

    PYTHONPATH=tools tools/.venv/bin/python -m illmrec_tools.parity \
        --dataset data/ml-latest-small --out data/parity

writes data/parity/results.md (and results.json) comparing the runtime on the F32, Q8_0 and
Q4_K_M models against the reference on the F32 model.
"""

import argparse
import contextlib
import json
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import llm
from .export import ILLMREC as BIN
from .llm import DEFAULT_GGUF, PROMPT, REPO, load_llm

MODELS = REPO / "data" / "models"


def illmrec(*args):
    """Runs the runtime CLI and returns its stdout."""
    return subprocess.run([str(BIN), *map(str, args)], check=True, capture_output=True, text=True).stdout


def model_file(kind):
    """data/models/gemma-3-270m-<kind>.gguf (f32, q8_0, ...), made from the default Q4_K_M model
    with `illmrec quantize` when missing (f32 = the default model dequantized by llama.cpp)."""
    if kind == "q4_k_m":
        return DEFAULT_GGUF
    if kind == "f32" and (REPO / "models" / "gemma-3-270m-f32.gguf").exists():
        return REPO / "models" / "gemma-3-270m-f32.gguf"  # the runtime's default model
    path = MODELS / f"gemma-3-270m-{kind}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        illmrec("quantize", DEFAULT_GGUF, path, "--type", kind)
    return path


def read_bank(path):
    """An illmrec feature bank (layout at the top of src/bank.rs) as {id: float32 row}."""
    raw = Path(path).read_bytes()
    magic, version, _modality, dtype, _, dim, _, count, ids_off, rows_off, _ = struct.unpack_from(
        "<8sIBBHIIQQQQ", raw)
    assert magic == b"ILLMBANK" and version == 1, f"{path}: not a version-1 illmrec bank"
    ids = np.frombuffer(raw, "<u8", count, ids_off)
    rows = np.frombuffer(raw, "<f4" if dtype == 0 else "<f2", count * dim, rows_off)
    rows = rows.reshape(count, dim).astype(np.float32)
    return dict(zip(ids.tolist(), rows))


def build_bundle(dataset, out, seed=0, item_ids=None):
    """A bundle over `dataset`'s features (img, text, and cf when features/cf.npy exists) with
    seeded random f32 heads and f32 banks, pointing at the default model. `item_ids` limits the
    catalog."""
    dataset, out = Path(dataset), Path(out)
    items = [json.loads(line) for line in (dataset / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    if item_ids is not None:
        keep = set(item_ids)
        items = [it for it in items if it["id"] in keep]
    keep = np.array(sorted(it["id"] for it in items))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps({k: it.get(k) for k in ("id", "title", "description", "genres")}) + "\n")
        dims, banks = {}, []
        for modality, name in [("img", "image"), ("text", "text"), ("cf", "cf")]:
            if not (dataset / "features" / f"{name}.npy").exists():
                continue
            ids = np.load(dataset / "features" / f"{name}.ids.npy")
            rows = np.load(dataset / "features" / f"{name}.npy")
            mask = np.isin(ids, keep)
            np.save(tmp / f"{modality}.npy", np.ascontiguousarray(rows[mask], dtype=np.float32))
            np.save(tmp / f"{modality}.ids.npy", ids[mask].astype(np.int64))
            illmrec("bank", "build", "--npy", tmp / f"{modality}.npy", "--ids", tmp / f"{modality}.ids.npy",
                    "--modality", modality, "--dtype", "f32", "--out", tmp / f"{modality}.bank")
            dims[modality] = rows.shape[1]
            banks += ["--bank", f"{modality}={tmp / f'{modality}.bank'}"]
        config = {"format": "illmrec-heads", "version": 1, "llm_dim": 640, "proj_dim": 512, "hidden_dim": 1024,
                  "prompt": "image", "image_dim": dims["img"], "adaptor_dim": 512, "item_dims": dims,
                  "trained": False, "provenance": f"parity check: illmrec init-heads --seed {seed}"}
        (tmp / "heads.json").write_text(json.dumps(config, indent=2))
        illmrec("init-heads", "--config", tmp / "heads.json", "--out", tmp / "heads.safetensors",
                "--seed", seed, "--dtype", "f32")
        if out.exists():
            shutil.rmtree(out)
        illmrec("bundle", "create", "--out", out, "--heads", tmp / "heads.safetensors",
                "--heads-config", tmp / "heads.json", "--items", tmp / "items.jsonl", *banks)
    return out


class Reference:
    """The PyTorch scorer for one bundle. Heads and item vectors run in float64, the LLM in
    float32."""

    def __init__(self, bundle, model, tok, max_history=10):
        from safetensors.torch import load_file

        bundle = Path(bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        self.cfg = json.loads((bundle / manifest["heads_config"]).read_text())
        self.w = {k: v.double() for k, v in load_file(bundle / manifest["heads"]).items()}
        self.items = {}
        for line in (bundle / manifest["items"]).read_text(encoding="utf-8").splitlines():
            it = json.loads(line)
            self.items[it["id"]] = it
        self.banks = {m: read_bank(bundle / p) for m, p in manifest["banks"].items()}
        self.modalities = sorted(self.cfg["item_dims"])
        self.model, self.tok, self.max_history = model, tok, max_history

    def _mlp(self, prefix, x, w=None):
        """A head's MLP over `x`, with the bundle's weights (float64) or the given copy of them."""
        w, eps = self.w if w is None else w, self.cfg.get("head_ln_eps", 1e-5)
        h = F.linear(x, w[f"{prefix}.mlp.0.weight"], w[f"{prefix}.mlp.0.bias"])
        h = F.layer_norm(h, h.shape[-1:], w[f"{prefix}.mlp.1.weight"], w[f"{prefix}.mlp.1.bias"], eps)
        return F.linear(h.relu(), w[f"{prefix}.mlp.3.weight"], w[f"{prefix}.mlp.3.bias"])

    def adaptor(self, feature):
        w, eps = self.w, self.cfg.get("adaptor_ln_eps", 1e-8)
        h = F.linear(torch.from_numpy(feature).double(), w["adaptor.proj_v2c.weight"], w["adaptor.proj_v2c.bias"])
        h = F.layer_norm(h, h.shape[-1:], w["adaptor.layernorm.weight"], w["adaptor.layernorm.bias"], eps)
        return F.linear(F.gelu(h), w["adaptor.interface.weight"], w["adaptor.interface.bias"])

    def encode(self, text, bos=False):
        return llm.encode(self.tok, text, bos)

    def segments(self, history):
        """The prompt of src/prompt.rs build: text strings and injected vectors (float64)."""
        t, segs = PROMPT, []
        text = t["task"]
        for k, i in enumerate(history[-self.max_history:]):
            item = self.items[i]
            text += (t["item_separator"] if k else "") + t["item_open"] + (item.get("title") or t["unknown_title"])
            if i in self.banks["img"]:
                segs += [text + t["item_visual"], self.adaptor(self.banks["img"][i])]
                text = ""
            elif (d := llm.description(self.tok, item)) is not None:
                text += t["item_description"] + d
            text += t["item_close"]
        segs.append(text + t["list_close"] + t["closing"] + t["instruction"])
        segs.append(self.w["rec_token"][0])
        return segs

    def tokens(self, history):
        """Token ids of the prompt, None at injected positions (as `illmrec prompt --json`)."""
        out = []
        for k, s in enumerate(self.segments(history)):
            out += self.encode(s, bos=k == 0) if isinstance(s, str) else [None]
        return out

    @torch.inference_mode()
    def hidden(self, history):
        """Final-norm hidden state at [REC]. Token rows come from embed_tokens (which scales them
        by sqrt(d)); injected vectors go in as they are, as llama.cpp does."""
        rows = []
        for k, s in enumerate(self.segments(history)):
            if isinstance(s, str):
                rows.append(self.model.model.embed_tokens(torch.tensor(self.encode(s, bos=k == 0))))
            else:
                rows.append(s.float()[None])
        x = torch.cat(rows)[None]
        return self.model.model(inputs_embeds=x).last_hidden_state[0, -1].double()

    def scores(self, history, candidates):
        """{id: score} for the candidates that have at least one modality."""
        h = self.hidden(history)
        user = {m: self._mlp(f"f_u_{m}", h) for m in self.modalities}
        out = {}
        for i in candidates:
            dots = [user[m] @ self._mlp(f"f_i_{m}", torch.from_numpy(self.banks[m][i]).double())
                    for m in self.modalities if i in self.banks[m]]
            if dots:
                out[i] = float(sum(dots) / len(dots))
        return out


EMULATED = "float32 + llama.cpp FA/GELU numerics"
# (label, model kind, runtime flags, reference) for each row of the results table.
RUNTIME_CONFIGS = [
    ("F32", "f32", ("--flash-attn", "auto"), "float32"),  # "on" on the CPU: the runtime's default
    ("F32", "f32", ("--flash-attn", "off"), "float32"),
    ("F32", "f32", ("--flash-attn", "off", "--kv-f32"), "float32"),
    ("F32", "f32", ("--flash-attn", "auto", "--no-prefix-cache"), EMULATED),
    ("Q8_0", "q8_0", (), "float32"),
    ("Q4_K_M", "q4_k_m", (), "float32"),
]


def _f16(t):
    return t.half().float()


def _ggml_flash_attention(module, q, k, v, mask, dropout=0.0, scaling=None, **kw):
    """Attention as llama.cpp's CPU flash attention computes it for this runtime: K and V rounded
    to f16 (it casts even an f32 KV cache to f16); batches of 64+ rows use an f32 tiled kernel,
    but the last query row, decoded as a one-row batch, has Q rounded to f16 and its
    online-softmax V accumulator kept in f16, split over the 2 threads' halves of the KV cells
    once they are 512 or more (n_kv = positions padded to 256), the halves merged in f32."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    out, weights = eager_attention_forward(module, q, _f16(k), _f16(v), mask, dropout, scaling, **kw)
    qs, ks, vs = _f16(q[0, :, -1]), _f16(k[0, 0]), _f16(v[0, 0])  # Gemma 3 270M: one KV head
    logits = (qs @ ks.T) * scaling
    n_kv = max(256, -(-ks.shape[0] // 256) * 256)
    bounds = [0, n_kv // 2, n_kv] if n_kv >= 512 else [0, n_kv]
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        acc = torch.zeros(qs.shape, dtype=torch.float16)
        top, total, ones = torch.full(qs.shape[:1], -torch.inf), torch.zeros(qs.shape[:1]), torch.ones(qs.shape[:1])
        for ic in torch.nonzero(mask[0, 0, -1, lo:hi] == 0).flatten().add(lo).tolist():
            x = logits[:, ic]
            new = x > top
            ms, w = torch.where(new, torch.exp(top - x), ones), torch.where(new, ones, torch.exp(x - top))
            top = torch.maximum(top, x)
            acc = (acc.float() * ms[:, None]).half()
            acc = (acc.float() + vs[ic] * w[:, None]).half()
            total = total * ms + w
        parts.append((top, total, acc.float()))
    top = torch.stack([t for t, _, _ in parts]).amax(0)
    scale = [torch.exp(t - top) for t, _, _ in parts]
    total = sum(s * n for s, (_, n, _) in zip(scale, parts))
    acc = sum(s[:, None] * a for s, (_, _, a) in zip(scale, parts))
    out = out.clone()
    out[0, -1] = acc / total[:, None]
    return out, weights


class _Gelu16(torch.nn.Module):
    """ggml's GELU on the CPU: a table lookup on the f16-rounded input, returning f16."""

    def forward(self, x):
        y = _f16(F.gelu(_f16(x), approximate="tanh"))
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


@contextlib.contextmanager
def ggml_numerics(model):
    """Within: the model computes attention and GELU with llama.cpp's CPU reduced precision (to
    show where the runtime's remaining difference from float32 comes from)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("ggml_fa", _ggml_flash_attention)
    AttentionMaskInterface.register("ggml_fa", eager_mask)
    acts = [layer.mlp.act_fn for layer in model.model.layers]
    model.set_attn_implementation("ggml_fa")
    for layer in model.model.layers:
        layer.mlp.act_fn = _Gelu16()
    try:
        yield
    finally:
        model.set_attn_implementation("eager")
        for layer, act in zip(model.model.layers, acts):
            layer.mlp.act_fn = act


def runtime_prompt(bundle, history, max_history=10, ctx=2048):
    return json.loads(illmrec("prompt", "--bundle", bundle, "--history", ",".join(map(str, history)),
                              "--max-history", max_history, "--ctx", ctx, "--threads", 2, "--json"))


def runtime_scores(bundle, users, model=None, flags=(), max_history=10, ctx=2048, threads=2):
    """{user: {id: score}} from `illmrec score` for [(user, history, candidates)] (extra CLI
    `flags` such as --kv-f32), plus the number of history items each prompt used."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        inp.write_text("".join(json.dumps({"user": u, "history": h, "candidates": c, "top_k": len(c)}) + "\n"
                               for u, h, c in users))
        args = ["score", "--bundle", bundle, "--input", inp, "--output", out, "--include-seen",
                "--max-history", max_history, "--ctx", ctx, "--threads", threads]
        args += ["--model", model] if model else []
        illmrec(*args, *flags)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
    return {r["user"]: {s["id"]: s["score"] for s in r["items"]} for r in lines}, \
        {r["user"]: len(r["history_used"]) for r in lines}


def top(scores, k=10):
    """The k best ids, ties broken by the lower id (as the runtime)."""
    return sorted(scores, key=lambda i: (-scores[i], i))[:k]


def ranks(values):
    return np.argsort(np.argsort(values, kind="stable"), kind="stable").astype(np.float64)


def compare(ref, run):
    """Metrics of one history's runtime scores against the reference scores."""
    ids = sorted(ref)
    assert sorted(run) == ids, "the runtime and the reference scored different items"
    a, b = np.array([ref[i] for i in ids]), np.array([run[i] for i in ids])
    return {"rel": float(np.abs(a - b).max() / np.abs(a).max()),
            "spearman": float(np.corrcoef(ranks(a), ranks(b))[0, 1]),
            "top10_same": top(ref) == top(run),
            "top10_overlap": len(set(top(ref)) & set(top(run))) / 10}


def pick_users(dataset, n, long_history, seed=0):
    """`n` seeded test users (history = sequence minus its last item, candidates = target plus its
    100 negatives) and one user with at least `long_history` items."""
    users = [json.loads(line) for line in (Path(dataset) / "test.jsonl").read_text().splitlines()]
    order = [users[k] for k in np.random.default_rng(seed).permutation(len(users))]
    long_user = next(u for u in order[n:] if len(u["history"]) >= long_history)
    as_tuple = lambda u: (u["user"], u["history"], [u["target"], *u["negatives"]])
    return [as_tuple(u) for u in order[:n]], as_tuple(long_user)


def summarise(metrics):
    rel = [m["rel"] for m in metrics]
    sp = [m["spearman"] for m in metrics]
    return {"n": len(metrics), "rel_max": max(rel), "rel_median": float(np.median(rel)),
            "within": sum(m["rel"] <= 1e-3 and m["top10_same"] for m in metrics),
            "top10_same": sum(m["top10_same"] for m in metrics), "top10_overlap": float(np.mean([m["top10_overlap"] for m in metrics])),
            "spearman_mean": float(np.mean(sp)), "spearman_min": min(sp)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=REPO / "data" / "ml-latest-small")
    ap.add_argument("--out", type=Path, default=REPO / "data" / "parity")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--long-history", type=int, default=40, help="--max-history of the long prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.time()

    bundle = args.out / "bundle"
    if not (bundle / "manifest.json").exists():
        build_bundle(args.dataset, bundle, seed=args.seed)
    users, long_user = pick_users(args.dataset, args.users, args.long_history, args.seed)
    model, tok = load_llm(model_file("f32"))
    groups = {"10-item": (Reference(bundle, model, tok, 10), users, 10),
              f"{args.long_history}-item": (Reference(bundle, model, tok, args.long_history), [long_user],
                                            args.long_history)}
    ctx = 2048
    info, reference, emulated = {}, {}, {}
    for name, (r, us, mh) in groups.items():
        for u, h, c in us:
            tokens = r.tokens(h)
            assert tokens == runtime_prompt(bundle, h, mh, ctx)["tokens"], f"user {u}: prompt tokens differ"
            info[u] = {"positions": len(tokens), "no_image": sum(i not in r.banks["img"] for i in h[-mh:])}
            reference[u] = r.scores(h, c)
    with ggml_numerics(model):
        for name, (r, us, _) in groups.items():
            emulated.update({u: r.scores(h, c) for u, h, c in us})
    rows = []
    for label, kind, flags, ref_name in RUNTIME_CONFIGS:
        ref = emulated if ref_name == EMULATED else reference
        for name, (r, us, mh) in groups.items():
            run, used = runtime_scores(bundle, us, model_file(kind), flags, mh, ctx)
            for u, h, _ in us:
                assert used[u] == len(h[-mh:]), f"user {u}: the runtime dropped history items"
            metrics = [compare(ref[u], run[u]) for u, _, _ in us]
            rows.append({"model": label, "flags": " ".join(flags), "reference": ref_name, "histories": name,
                         **summarise(metrics), "per_user": dict(zip([u for u, _, _ in us], metrics))})
    write_results(args.out, rows, info, users, long_user, time.time() - started)


def write_results(out, rows, info, users, long_user, seconds):
    positions = [info[u]["positions"] for u, _, _ in users]
    lines = [
        "# Runtime vs PyTorch float32 reference (illmrec_tools.parity)",
        "",
        "Reference: the F32 GGUF (default Q4_K_M dequantized by llama.cpp) in transformers float32, eager "
        "attention; heads float64. Bundle: ml-latest-small, img (MobileNet 1024) + text (MiniLM 384) banks in f32, "
        "seeded random heads (`illmrec init-heads --seed 0`). Candidates: the test target + its 100 negatives "
        "(101 items). rel = max |s_runtime − s_ref| / max |s_ref| over the candidates of one history.",
        "",
        f"- 10-item histories: {len(users)} test users, {min(positions)}–{max(positions)} prompt positions, "
        f"{sum(info[u]['no_image'] > 0 for u, _, _ in users)} contain items without an image "
        f"({sum(info[u]['no_image'] for u, _, _ in users)} such items in all).",
        f"- long history: user {long_user[0]}, {info[long_user[0]]['positions']} prompt positions "
        f"(> 512: the sliding-window layers drop the oldest positions), "
        f"{info[long_user[0]]['no_image']} items without an image.",
        "",
        "| runtime model | runtime flags | reference | histories | n | max rel | median rel | "
        "top-10 identical (order) | rel ≤ 1e-3 and same top-10 | mean top-10 overlap | Spearman mean | "
        "Spearman min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['flags'] or '(default)'} | {r['reference']} | {r['histories']} | "
                     f"{r['n']} | {r['rel_max']:.2e} | {r['rel_median']:.2e} | {r['top10_same']}/{r['n']} | "
                     f"{r['within']}/{r['n']} | "
                     f"{r['top10_overlap']:.2f} | {r['spearman_mean']:.5f} | {r['spearman_min']:.5f} |")
    lines += ["", f"Run time: {seconds:.0f} s (2-core shared machine, torch 1 thread, runtime --threads 2).", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"rows": rows, "info": {str(k): v for k, v in info.items()}},
                                                 indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
