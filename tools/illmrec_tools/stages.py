"""Staged I-LLMRec training on [REC] states extracted by the runtime (the frozen LLM runs once per
window, in the deployment GGUF, instead of once per sample per epoch under autograd).

    windows  training windows: for each target of the train split, the <= 10 items before it;
             sampled to --budget (every user at least once), shuffled so that any prefix of the file
             is a uniform sample (an extraction stopped early still gives a usable training set).
    init     an initial adaptor and [REC] vector (reference initialisation, seeded) as a bundle, so
             that `illmrec embed` can extract states with them.
    heads    the six retrieval heads trained on cached states (or, with --user-input features, on the
             mean of the history items' features: the no-LLM baseline), full-catalog softmax per
             modality plus on the combined score, early-stopped on validation; exports heads that
             keep the extraction bundle's adaptor and [REC], and evaluates valid/test in Python.

Typical run (ML-100K, image prompts; every step is resumable or cheap):

    export PYTHONPATH=tools
    P=tools/.venv/bin/python; R=data/runs/ml100k-staged
    $P -m illmrec_tools.stages windows --dataset data/ml100k --out $R/windows.jsonl --budget 20000
    $P -m illmrec_tools.stages init --dataset data/ml100k --out $R/init --prompt-style image
    target/release/illmrec embed --bundle $R/init/bundle --input data/ml100k/valid.jsonl --output $R/valid.npy
    target/release/illmrec embed --bundle $R/init/bundle --input data/ml100k/test.jsonl --output $R/test.npy
    target/release/illmrec embed --bundle $R/init/bundle --input $R/windows.jsonl --output $R/train.npy
    $P -m illmrec_tools.stages heads --dataset data/ml100k --states $R --init $R/init --out $R/heads
"""
import argparse
import datetime
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import write_json, write_jsonl
from .train import MODALITIES, Data, RecModule, export, mlp, read_jsonl

MAX_HISTORY = 10


# ---------------------------------------------------------------- windows

def all_windows(train_rows, max_history=MAX_HISTORY):
    """(user, history, target) for every target position t >= 1 of every train sequence."""
    for r in train_rows:
        seq = r["items"]
        for t in range(1, len(seq)):
            yield r["user"], seq[max(0, t - max_history):t], seq[t]


def sample_windows(train_rows, budget, seed=42, max_history=MAX_HISTORY):
    """`budget` windows: one random window per user first, the rest uniformly from all windows;
    returned in a seeded random order."""
    windows = list(all_windows(train_rows, max_history))
    rng = np.random.default_rng(seed)
    by_user = {}
    for k, (u, _, _) in enumerate(windows):
        by_user.setdefault(u, []).append(k)
    first = [int(rng.choice(ks)) for ks in by_user.values()]
    chosen = set(first[:budget])
    rest = [k for k in rng.permutation(len(windows)) if k not in chosen]
    chosen |= set(int(k) for k in rest[:max(0, budget - len(chosen))])
    order = rng.permutation(sorted(chosen))
    return [dict(user=windows[k][0], history=windows[k][1], target=windows[k][2]) for k in order], len(windows)


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
        shape, _, dtype = np.lib.format._read_array_header(f, version)
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

    def mean_of(self, histories):
        """The no-LLM user input: per modality the mean feature of the (<= 10) history items that
        have it, concatenated (zeros where none has it)."""
        out = []
        for h in histories:
            rows = torch.tensor([self.index[i] for i in h[-MAX_HISTORY:]])
            parts = []
            for m in MODALITIES:
                mk = self.mask[m][rows]
                parts.append(self.x[m][rows][mk].mean(0) if mk.any() else torch.zeros(self.x[m].shape[1]))
            out.append(torch.cat(parts))
        return torch.stack(out)


class Heads(nn.Module):
    def __init__(self, user_dim, item_dims):
        super().__init__()
        for m, d in item_dims.items():
            setattr(self, f"f_u_{m}", mlp(user_dim))
            setattr(self, f"f_i_{m}", mlp(d))

    def scores(self, feats, x):
        """Per-modality [B, n_items] scores and the combined score (mean over the modalities an
        item has, as the runtime scores)."""
        per, total, count = {}, 0.0, 0.0
        for m in MODALITIES:
            u = getattr(self, f"f_u_{m}").mlp(x)
            v = getattr(self, f"f_i_{m}").mlp(feats.x[m])
            s = u @ v.T
            per[m] = s.masked_fill(~feats.mask[m], float("-inf"))
            total = total + s * feats.mask[m]
            count = count + feats.mask[m].float()
        return per, total / count


def ranks(combined, feats, cases):
    """Protocol rank of each case's target among its 100 negatives (ties against the target)."""
    out = []
    for row, c in zip(combined, cases):
        t = row[feats.index[c["target"]]]
        negs = row[torch.tensor([feats.index[i] for i in c["negatives"]])]
        out.append(int((negs >= t).sum()))
    return np.array(out)


def metrics(r):
    r = np.asarray(r)
    out = {"users": int(len(r))}
    for k in (5, 10):
        out[f"hr@{k}"] = float((r < k).mean())
        out[f"ndcg@{k}"] = float(np.where(r < k, 1 / np.log2(r + 2), 0).mean())
    out["mrr"] = float((1 / (r + 1)).mean())
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
                log=print):
    torch.manual_seed(seed)
    norm = Standardize(x)
    x, xv = norm(x), norm(xv)
    y = torch.tensor([feats.index[t] for t in targets])
    heads = Heads(x.shape[1], {m: feats.x[m].shape[1] for m in MODALITIES})
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=wd)
    ce = nn.functional.cross_entropy
    best, best_state, bad, history = -1.0, None, 0, []
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        t0, losses = time.time(), []
        heads.train()
        for idx in torch.randperm(len(x), generator=g).split(batch):
            per, comb = heads.scores(feats, x[idx])
            loss = ce(comb, y[idx]) + sum(ce(per[m], y[idx]) for m in MODALITIES) / len(MODALITIES)
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
    windows, total = sample_windows(rows, a.budget, a.seed)
    write_jsonl(a.out, windows)
    users = len({w["user"] for w in windows})
    print(f"windows: wrote {len(windows)} of {total} training windows ({users} users) to {a.out}")


def heads_config(item_dims, prompt, image_dim, trained, provenance, train_seconds=None):
    cfg = {"format": "illmrec-heads", "version": 1, "llm_dim": 640, "proj_dim": 512, "hidden_dim": 1024,
           "prompt": prompt}
    if image_dim:
        cfg["image_dim"] = image_dim
    cfg.update({"adaptor_dim": 512, "item_dims": item_dims, "adaptor_ln_eps": 1e-8, "head_ln_eps": 1e-5,
                "trained": trained, "provenance": provenance})
    if train_seconds is not None:
        cfg["train_seconds"] = round(train_seconds)
    return cfg


def cmd_init(a):
    from .export import build_bundle
    torch.manual_seed(a.seed)
    data = Data(a.dataset)
    item_dims = {m: data.feats[m].shape[1] for m in MODALITIES}
    image_dim = item_dims["img"] if a.prompt_style == "image" else None
    rec = RecModule(640, item_dims, image_dim)
    # Reference init (xavier-uniform [REC]) carried into Gemma's input space, where every token row
    # is multiplied by sqrt(n_embd) before the first layer: the same relative size as in the reference.
    with torch.no_grad():
        rec.rec_token.mul_(math.sqrt(640))
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = heads_config(item_dims, a.prompt_style, image_dim, False,
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
    windows = read_jsonl(a.windows or a.states / "windows.jsonl")
    if a.user_input == "states":
        x = torch.from_numpy(load_partial_npy(a.states / "train.npy")).float()
        windows = windows[:len(x)]
        xv = torch.from_numpy(np.load(a.states / "valid.npy")).float()
        xt = torch.from_numpy(np.load(a.states / "test.npy")).float() if (a.states / "test.npy").exists() else None
    else:
        windows = windows[:a.max_windows] if a.max_windows else windows
        x = feats.mean_of([w["history"] for w in windows])
        xv = feats.mean_of([c["history"] for c in valid])
        xt = feats.mean_of([c["history"] for c in test])
    if a.max_windows:
        x, windows = x[:a.max_windows], windows[:a.max_windows]
    print(f"heads: {len(x)} training windows, input {x.shape[1]}-d ({a.user_input})", flush=True)
    heads, history = train_heads(x, [w["target"] for w in windows], xv, valid, feats, epochs=a.epochs,
                                 lr=a.lr, patience=a.patience, seed=a.seed,
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
    if a.user_input == "states":
        init_cfg = json.loads((a.init / "heads.json").read_text())
        item_dims = {m: feats.x[m].shape[1] for m in MODALITIES}
        rec = RecModule(640, item_dims, init_cfg.get("image_dim"))
        from safetensors.torch import load_file
        init = load_file(a.init / "heads.safetensors")
        state = {k: v for k, v in init.items() if k.startswith(("adaptor.", "rec_token"))}
        state.update(heads.state_dict())
        rec.load_state_dict(state)
        cfg = heads_config(item_dims, init_cfg["prompt"], init_cfg.get("image_dim"), True,
                           f"dataset {a.dataset.name}: heads trained on {len(x)} runtime-extracted [REC] states "
                           f"({len(history)} epochs, best {summary['best_epoch']}, selected on valid NDCG@10), "
                           f"adaptor and [REC] from {a.init}, seed {a.seed}, "
                           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, command: {summary['command']}",
                           train_seconds=summary["train_seconds"])
        export(rec, cfg, a.out, a.dtype)
        if not a.no_bundle:
            print(build_bundle(a.out, a.dataset, a.out / "bundle"))
    write_json(a.out / "summary.json", summary)


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
    h.add_argument("--epochs", type=int, default=60)
    h.add_argument("--patience", type=int, default=6)
    h.add_argument("--lr", type=float, default=1e-3)
    h.add_argument("--seed", type=int, default=42)
    h.add_argument("--threads", type=int, default=2)
    h.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    h.add_argument("--no-bundle", action="store_true")
    a = ap.parse_args(argv)
    {"windows": cmd_windows, "init": cmd_init, "heads": cmd_heads}[a.cmd](a)


if __name__ == "__main__":
    main()
