"""Staged I-LLMRec training on [REC] states extracted by the runtime (the frozen LLM runs once per
window, in the deployment GGUF, instead of once per sample per epoch under autograd).

    windows  training windows: every target of the train split, in chunks of up to 10 items whose
             prefixes are the histories (extracted with `illmrec embed --prefixes`); sampled to
             --budget windows (every user at least once), shuffled so that any prefix of the file is
             a uniform sample (an extraction stopped early still gives a usable training set).
    init     an initial adaptor and [REC] vector (reference initialisation, seeded) as a bundle, so
             that `illmrec embed` can extract states with them.
    heads    the six retrieval heads trained on cached states (or, with --user-input features, on the
             mean of the history items' features: the no-LLM baseline), full-catalog softmax per
             modality plus on the combined score, early-stopped on validation; exports heads that
             keep the extraction bundle's adaptor and [REC], and evaluates valid/test in Python.

Typical run (ML-100K, image prompts; every step is resumable or cheap):

    export PYTHONPATH=tools
    P=tools/.venv/bin/python; R=data/runs/ml100k-staged
    $P -m illmrec_tools.stages windows --dataset data/ml100k --out $R/windows.jsonl --budget 97171
    $P -m illmrec_tools.stages init --dataset data/ml100k --out $R/init --prompt-style image
    target/release/illmrec embed --bundle $R/init/bundle --input data/ml100k/valid.jsonl --output $R/valid.npy
    target/release/illmrec embed --bundle $R/init/bundle --input data/ml100k/test.jsonl --output $R/test.npy
    target/release/illmrec embed --bundle $R/init/bundle --input $R/windows.jsonl --output $R/train.npy --prefixes
    $P -m illmrec_tools.stages heads --dataset data/ml100k --states $R --init $R/init --out $R/heads
"""
import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import write_json, write_jsonl
from .train import MODALITIES, Data, RecModule, export, heads_config, metrics, mlp, read_jsonl

MAX_HISTORY = 10
LLM_DIM = 640  # n_embd of the default model (Gemma 3 270M); `init` makes [REC] and the adaptor this wide


# ---------------------------------------------------------------- windows

def chunks(train_rows, max_history=MAX_HISTORY):
    """Every target of the train split exactly once, grouped in chunks: a user's train sequence
    cut into runs of up to `max_history` items; a chunk's prefixes (1, 2, … items) are the
    histories of its targets (the items after each prefix). `illmrec embed --prefixes` gives one
    state per prefix, decoding the chunk once, so 10 windows cost about one prompt plus 10 closings.
    Histories thus have 1..10 items (the reference trains on 2..9 and evaluates on 10)."""
    for r in train_rows:
        seq = r["items"]
        for s in range(0, len(seq) - 1, max_history):
            e = min(s + max_history, len(seq) - 1)
            yield dict(user=r["user"], history=seq[s:e], targets=seq[s + 1:e + 1])


def sample_chunks(train_rows, budget, seed=42, max_history=MAX_HISTORY):
    """Chunks holding about `budget` windows: one random chunk of every user (even past the
    budget), then others at random until the budget is met; the file order is shuffled, so any
    prefix of it is a uniform sample."""
    all_chunks = list(chunks(train_rows, max_history))
    rng = np.random.default_rng(seed)
    by_user = {}
    for k, c in enumerate(all_chunks):
        by_user.setdefault(c["user"], []).append(k)
    first = [int(rng.choice(ks)) for ks in by_user.values()]
    chosen, n, taken = list(first), sum(len(all_chunks[k]["targets"]) for k in first), set(first)
    for k in rng.permutation(len(all_chunks)):
        if n >= budget:
            break
        if int(k) not in taken:
            chosen.append(int(k))
            n += len(all_chunks[k]["targets"])
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return [all_chunks[k] for k in chosen], sum(len(c["targets"]) for c in all_chunks)


def expand(chunk_rows):
    """(history, target) per window, in the order `illmrec embed --prefixes` writes its rows."""
    return [(c["history"][:k], c["targets"][k - 1]) for c in chunk_rows for k in range(1, len(c["history"]) + 1)]


# ---------------------------------------------------------------- heads

def load_partial_npy(path):
    """Rows of a .npy, or of the `.npy.partial` an unfinished `illmrec embed` leaves (its header
    holds the final shape; only whole rows written so far are returned)."""
    path = Path(path)
    if path.exists():
        return np.load(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        start = f.tell()
    raw = np.memmap(partial, dtype=dtype, mode="r", offset=start)
    n = len(raw) // shape[1]
    return np.array(raw[:n * shape[1]]).reshape(n, shape[1])


class Features:
    """Item feature matrices and id → row maps, in the catalog's id order."""

    def __init__(self, data):
        self.ids = data.ids
        self.index = {int(i): k for k, i in enumerate(self.ids)}
        self.x, self.mask = {}, {}
        for m in MODALITIES:
            x, mask = data.rows(m, self.ids.tolist())
            self.x[m], self.mask[m] = x, mask

    def mean_of(self, histories, modalities=MODALITIES):
        """The no-LLM user input: per modality (of `modalities`) the mean feature of the (<= 10)
        history items that have it, concatenated (zeros where none has it)."""
        idx = torch.full((len(histories), MAX_HISTORY), -1, dtype=torch.long)
        for k, h in enumerate(histories):
            rows = [self.index[i] for i in h[-MAX_HISTORY:]]
            idx[k, :len(rows)] = torch.tensor(rows)
        parts = []
        for m in modalities:
            present = (idx >= 0) & self.mask[m][idx.clamp_min(0)]
            x = self.x[m][idx.clamp_min(0)] * present[..., None]
            parts.append(x.sum(1) / present.sum(1, keepdim=True).clamp_min(1))
        return torch.cat(parts, 1)


class Heads(nn.Module):
    def __init__(self, user_dim, item_dims):
        super().__init__()
        for m, d in item_dims.items():
            setattr(self, f"f_u_{m}", mlp(user_dim))
            setattr(self, f"f_i_{m}", mlp(d))

    def scores(self, feats, x, items=None):
        """Per-modality [B, n_items] scores and the combined score (mean over the modalities an
        item has, as the runtime scores), over all items or the catalog rows `items`."""
        per, total, count = {}, 0.0, 0.0
        for m in MODALITIES:
            fx, mask = (feats.x[m], feats.mask[m]) if items is None else (feats.x[m][items], feats.mask[m][items])
            u = getattr(self, f"f_u_{m}").mlp(x)
            v = getattr(self, f"f_i_{m}").mlp(fx)
            s = u @ v.T
            per[m] = s.masked_fill(~mask, float("-inf"))
            total = total + s * mask
            count = count + mask.float()
        return per, total / count


def ranks(combined, feats, cases):
    """Protocol rank of each case's target among its 100 negatives (ties against the target)."""
    out = []
    for row, c in zip(combined, cases):
        t = row[feats.index[c["target"]]]
        negs = row[torch.tensor([feats.index[i] for i in c["negatives"]])]
        out.append(int((negs >= t).sum()))
    return np.array(out)


def state_pairs(states, windows=None):
    """(windows file, states file or None) pairs: STATES/windows.jsonl ↔ STATES/train.npy and
    STATES/windows-NAME.jsonl ↔ STATES/train-NAME.npy (shards extracted on several machines);
    with `windows` given, that one file and STATES/train.npy."""
    if windows:
        return [(Path(windows), Path(states) / "train.npy")]
    out = []
    for w in sorted(Path(states).glob("windows*.jsonl")):
        npy = w.with_name("train" + w.name[len("windows"):-len(".jsonl")] + ".npy")
        ok = npy.exists() or npy.with_name(npy.name + ".partial").exists()
        out.append((w, npy if ok else None))
    return out


class Standardize:
    """Per-dimension standardisation of the user input, folded into f_u_m's first layer at export."""

    def __init__(self, x):
        self.mu = x.mean(0)
        self.sd = x.std(0).clamp_min(1e-6)

    def __call__(self, x):
        return (x - self.mu) / self.sd

    def fold(self, linear):
        w = linear.weight.data / self.sd
        linear.bias.data = linear.bias.data - w @ self.mu
        linear.weight.data = w


def train_heads(x, targets, xv, valid, feats, epochs=60, batch=256, lr=1e-3, wd=1e-4, patience=6, seed=42,
                negatives=0, item_heads=None, noise=0.0, log=print):
    """Softmax cross-entropy of each window's target against the whole catalog (negatives=0) or
    against the batch's targets plus `negatives` uniformly sampled items (a sampled softmax), on
    the combined score and on each modality's score."""
    torch.manual_seed(seed)
    norm = Standardize(x)
    x, xv = norm(x), norm(xv)
    y = torch.tensor([feats.index[t] for t in targets])
    heads = Heads(x.shape[1], {m: feats.x[m].shape[1] for m in MODALITIES})
    if item_heads is not None:  # item side learned elsewhere (e.g. from all windows), frozen here
        heads.load_state_dict({k: v for k, v in item_heads.items() if k.startswith("f_i_")}, strict=False)
        for m in MODALITIES:
            getattr(heads, f"f_i_{m}").requires_grad_(False)
    opt = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
    ce = nn.functional.cross_entropy
    best, best_state, bad, history = -1.0, None, 0, []
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        t0, losses = time.time(), []
        heads.train()
        for idx in torch.randperm(len(x), generator=g).split(batch):
            if negatives:
                sampled = torch.randint(len(feats.ids), (negatives,), generator=g)
                items, yb = torch.unique(torch.cat([y[idx], sampled]), return_inverse=True)
                yb = yb[:len(idx)]
            else:
                items, yb = None, y[idx]
            xb = x[idx] + noise * torch.randn(len(idx), x.shape[1], generator=g) if noise else x[idx]
            per, comb = heads.scores(feats, xb, items)
            loss = ce(comb, yb)
            for m in MODALITIES:  # per modality, over the windows whose target has it
                has = feats.mask[m][y[idx]]
                if has.any():
                    loss = loss + ce(per[m][has], yb[has]) / len(MODALITIES)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        heads.eval()
        with torch.no_grad():
            mv = metrics(ranks(heads.scores(feats, xv)[1], feats, valid))
        row = dict(epoch=epoch, loss=float(np.mean(losses)), seconds=time.time() - t0, **{f"valid_{k}": v for k, v in mv.items()})
        history.append(row)
        log(f"epoch {epoch} loss {row['loss']:.4f} valid HR@5 {mv['hr@5']:.4f} NDCG@10 {mv['ndcg@10']:.4f} "
            f"({row['seconds']:.1f} s)")
        if mv["ndcg@10"] > best:
            best, bad = mv["ndcg@10"], 0
            best_state = {k: v.clone() for k, v in heads.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    heads.load_state_dict(best_state)
    heads.eval()
    for m in MODALITIES:
        norm.fold(getattr(heads, f"f_u_{m}").mlp[0])
    return heads, history


# ---------------------------------------------------------------- commands

def cmd_windows(a):
    rows = [r for r in read_jsonl(a.dataset / "train.jsonl") if len(r["items"]) >= 2]
    sample, total = sample_chunks(rows, a.budget, a.seed)
    write_jsonl(a.out, sample)
    users = len({c["user"] for c in sample})
    print(f"windows: wrote {len(sample)} chunks = {sum(len(c['targets']) for c in sample)} of {total} training "
          f"windows ({users} users) to {a.out}")


def cmd_init(a):
    from .export import build_bundle
    torch.manual_seed(a.seed)
    data = Data(a.dataset)
    item_dims = {m: data.feats[m].shape[1] for m in MODALITIES}
    image_dim = item_dims["img"] if a.prompt_style == "image" else None
    rec = RecModule(LLM_DIM, item_dims, image_dim)  # [REC] at the reference's relative size
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = heads_config(LLM_DIM, item_dims, a.prompt_style, image_dim, False,
                       f"initial adaptor and [REC] for state extraction (seed {a.seed}); heads untrained")
    export(rec, cfg, a.out, "f32")
    print(build_bundle(a.out, a.dataset, a.out / "bundle"))


def cmd_heads(a):
    from .export import build_bundle
    t_start = time.time()
    torch.set_num_threads(a.threads)
    data = Data(a.dataset)
    feats = Features(data)
    valid = read_jsonl(a.dataset / "valid.jsonl")
    test = read_jsonl(a.dataset / "test.jsonl")
    windows, x = [], []
    for wpath, spath in state_pairs(a.states, a.windows):
        w = [dict(history=h, target=t) for h, t in expand(read_jsonl(wpath))]
        if a.user_input == "states":
            rows = load_partial_npy(spath) if spath else np.zeros((0, LLM_DIM), np.float32)
            w = w[:len(rows)]
            x.append(torch.from_numpy(rows).float())
        windows += w
    if a.user_input == "states":
        x = torch.cat(x)
        xv = torch.from_numpy(np.load(a.states / "valid.npy")).float()
        xt = torch.from_numpy(np.load(a.states / "test.npy")).float() if (a.states / "test.npy").exists() else None
    else:
        if a.same_windows_as:  # exactly the windows whose states exist in that folder
            windows = []
            for wpath, spath in state_pairs(a.same_windows_as):
                n = len(load_partial_npy(spath)) if spath else 0
                windows += [dict(history=h, target=t) for h, t in expand(read_jsonl(wpath))][:n]
        windows = windows[:a.max_windows] if a.max_windows else windows
        x = feats.mean_of([w["history"] for w in windows])
        xv = feats.mean_of([c["history"] for c in valid])
        xt = feats.mean_of([c["history"] for c in test])
    if a.max_windows:
        x, windows = x[:a.max_windows], windows[:a.max_windows]
    print(f"heads: {len(x)} training windows, input {x.shape[1]}-d ({a.user_input})", flush=True)
    heads, history = train_heads(x, [w["target"] for w in windows], xv, valid, feats, epochs=a.epochs,
                                 batch=a.batch_size, lr=a.lr, negatives=a.negatives, noise=a.noise, wd=a.weight_decay, patience=a.patience, seed=a.seed,
                                 item_heads=torch.load(a.item_heads) if a.item_heads else None,
                                 log=lambda s: print(s, flush=True))
    a.out.mkdir(parents=True, exist_ok=True)
    summary = {"windows": len(x), "user_input": a.user_input, "epochs_run": len(history),
               "best_epoch": int(np.argmax([h["valid_ndcg@10"] for h in history])) + 1,
               "train_seconds": time.time() - t_start, "history": history,
               "command": "illmrec_tools.stages " + shlex.join(sys.argv[1:])}
    with torch.no_grad():
        summary["valid"] = metrics(ranks(heads.scores(feats, xv)[1], feats, valid))
        if xt is not None:
            rt = ranks(heads.scores(feats, xt)[1], feats, test)
            summary["test"] = metrics(rt)
            write_jsonl(a.out / "test-ranks.jsonl", ({"user": c["user"], "rank": int(r)} for c, r in zip(test, rt)))
    print(f"heads: valid {summary['valid']}" + (f"\nheads: test {summary['test']}" if "test" in summary else ""))
    torch.save(heads.state_dict(), a.out / "heads.pt")
    if a.user_input == "states" and not a.init:
        print("heads: no --init given, so no runtime export")
    elif a.user_input == "states":
        init_cfg = json.loads((a.init / "heads.json").read_text())
        item_dims = {m: feats.x[m].shape[1] for m in MODALITIES}
        rec = RecModule(init_cfg["llm_dim"], item_dims, init_cfg.get("image_dim"))
        from safetensors.torch import load_file
        init = load_file(a.init / "heads.safetensors")
        state = {k: v for k, v in init.items() if k.startswith(("adaptor.", "rec_token"))}
        state.update(heads.state_dict())
        rec.load_state_dict(state)
        cfg = heads_config(init_cfg["llm_dim"], item_dims, init_cfg["prompt"], init_cfg.get("image_dim"), True,
                           f"dataset {a.dataset.name}: heads trained on {len(x)} runtime-extracted [REC] states "
                           f"({len(history)} epochs, best {summary['best_epoch']}, selected on valid NDCG@10), "
                           f"adaptor and [REC] from {a.init}, seed {a.seed}, "
                           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, command: {summary['command']}",
                           train_seconds=summary["train_seconds"])
        export(rec, cfg, a.out, a.dtype)
        if not a.no_bundle:
            print(build_bundle(a.out, a.dataset, a.out / "bundle"))
    write_json(a.out / "summary.json", summary)


def cmd_compare(a):
    """HR@k of each ranks file and paired bootstrap 95 % intervals of every pairwise difference
    over the users all files share (users resampled with replacement, seeded)."""
    runs = {}
    for spec in a.ranks:
        name, path = spec.split("=", 1)
        runs[name] = {str(r["user"]): int(r["rank"]) for r in read_jsonl(path)}
    users = sorted(set.intersection(*(set(r) for r in runs.values())))
    hit = {n: np.array([r[u] < a.k for u in users], dtype=float) for n, r in runs.items()}
    rng = np.random.default_rng(a.seed)
    boot = rng.integers(0, len(users), size=(a.samples, len(users)))
    print(f"{len(users)} users; HR@{a.k}: " + ", ".join(f"{n} {h.mean():.4f}" for n, h in hit.items()))
    names = list(runs)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            d = hit[x] - hit[y]
            lo, hi = np.percentile(d[boot].mean(1), [2.5, 97.5])
            print(f"{x} - {y}: {d.mean():+.4f} 95% CI [{lo:+.4f}, {hi:+.4f}]")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("windows", help="sample training windows")
    w.add_argument("--dataset", required=True, type=Path)
    w.add_argument("--out", required=True, type=Path)
    w.add_argument("--budget", type=int, default=20000)
    w.add_argument("--seed", type=int, default=42)
    i = sub.add_parser("init", help="initial adaptor + [REC] bundle for extraction")
    i.add_argument("--dataset", required=True, type=Path)
    i.add_argument("--out", required=True, type=Path)
    i.add_argument("--prompt-style", choices=["image", "title", "description"], default="image")
    i.add_argument("--seed", type=int, default=42)
    h = sub.add_parser("heads", help="train the heads on cached states")
    h.add_argument("--dataset", required=True, type=Path)
    h.add_argument("--states", type=Path, help="folder with train.npy(.partial), valid.npy, test.npy, windows.jsonl")
    h.add_argument("--windows", type=Path, help="windows file [default: STATES/windows.jsonl]")
    h.add_argument("--init", type=Path, help="the init folder whose bundle extracted the states")
    h.add_argument("--out", required=True, type=Path)
    h.add_argument("--user-input", choices=["states", "features"], default="states",
                   help="features: the no-LLM baseline (mean of the history items' features)")
    h.add_argument("--max-windows", type=int)
    h.add_argument("--same-windows-as", type=Path,
                   help="features mode: train on exactly the windows whose states exist in this folder")
    h.add_argument("--item-heads", type=Path,
                   help="start the item heads f_i_m from this heads.pt (another run's) and keep them frozen")
    h.add_argument("--epochs", type=int, default=60)
    h.add_argument("--patience", type=int, default=6)
    h.add_argument("--lr", type=float, default=1e-3)
    h.add_argument("--batch-size", type=int, default=256)
    h.add_argument("--noise", type=float, default=0.0,
                   help="Gaussian noise (in standard deviations) added to the standardised user input while training")
    h.add_argument("--weight-decay", type=float, default=1e-4)
    h.add_argument("--negatives", type=int, default=0,
                   help="sampled negatives per batch (0: softmax over the whole catalog)")
    h.add_argument("--seed", type=int, default=42)
    h.add_argument("--threads", type=int, default=2)
    h.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    h.add_argument("--no-bundle", action="store_true")
    c = sub.add_parser("compare", help="HR@k and paired bootstrap intervals of ranks files")
    c.add_argument("ranks", nargs="+", help="NAME=ranks.jsonl (lines with user and rank)")
    c.add_argument("--k", type=int, default=5)
    c.add_argument("--samples", type=int, default=10000)
    c.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    {"windows": cmd_windows, "init": cmd_init, "heads": cmd_heads, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
