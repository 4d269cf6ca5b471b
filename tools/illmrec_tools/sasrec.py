"""SASRec (pmixer-style) on a dataset's train.jsonl: the CF item features and a baseline ranker.

Writes `features/cf.npy` [N, 50] + `features/cf.ids.npy` (row for each item of items.jsonl: its
item_emb row), and `runs/sasrec-{valid,test}/{ranks.jsonl,summary.json}`. The number of epochs is
chosen on the valid split (NDCG@10, checked every --eval-every epochs); test is scored once, with
the chosen weights.

Item index: item_emb row 0 is padding and item k of items.jsonl (sorted by id) is row k+1. For
ml100k (ids 1..N) this is the reference's `id+1`; ml-latest-small's ids are sparse, so rows are dense.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import save_npy, write_json, write_jsonl


class SASRec(nn.Module):
    def __init__(self, n_items, hidden=50, maxlen=50, blocks=2, heads=1, dropout=0.2):
        super().__init__()
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(maxlen, hidden)
        self.drop = nn.Dropout(dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.attns = nn.ModuleList(
            nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) for _ in range(blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.ffns = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(),
                          nn.Linear(hidden, hidden), nn.Dropout(dropout)) for _ in range(blocks))
        self.last_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.hidden = hidden

    def log_feats(self, seqs):
        """seqs [B, maxlen] of item rows (0 = padding, left-padded) → [B, maxlen, hidden]."""
        x = self.item_emb(seqs) * self.hidden ** 0.5
        x = x + self.pos_emb(torch.arange(seqs.shape[1], device=seqs.device))
        x = self.drop(x)
        keep = (seqs != 0).unsqueeze(-1)
        x = x * keep
        causal = torch.triu(torch.ones(seqs.shape[1], seqs.shape[1], dtype=torch.bool), 1)
        for an, at, fn, ff in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            q = an(x)
            x = q + at(q, x, x, attn_mask=causal, need_weights=False)[0]
            x = fn(x)
            x = (x + ff(x)) * keep
        return self.last_norm(x)

    def user_vectors(self, seqs):
        return self.log_feats(seqs)[:, -1]


def pad_left(seq, maxlen):
    seq = seq[-maxlen:]
    return [0] * (maxlen - len(seq)) + seq


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def metrics(ranks):
    r = np.asarray(ranks)
    out = {"n_users": int(len(r))}
    for k in (1, 5, 10):
        out[f"hr@{k}"] = float(np.mean(r < k))
    for k in (5, 10):
        out[f"ndcg@{k}"] = float(np.mean(np.where(r < k, 1 / np.log2(r + 2), 0.0)))
    out["mrr"] = float(np.mean(1 / (r + 1)))
    return out


@torch.no_grad()
def rank_split(model, rows, row_of, maxlen):
    """Pessimistic rank of each target among its 100 negatives (number of negatives scoring >= it)."""
    model.eval()
    out = []
    for i in range(0, len(rows), 256):
        batch = rows[i:i + 256]
        seqs = torch.tensor([pad_left([row_of[x] for x in r["history"]], maxlen) for r in batch])
        u = model.user_vectors(seqs)
        cand = torch.tensor([[row_of[r["target"]]] + [row_of[x] for x in r["negatives"]] for r in batch])
        s = (model.item_emb(cand) * u.unsqueeze(1)).sum(-1)
        ranks = (s[:, 1:] >= s[:, :1]).sum(1)
        out += [{"user": r["user"], "target": r["target"], "rank": int(k)} for r, k in zip(batch, ranks)]
    model.train()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--max-epochs", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--patience", type=int, default=5, help="evaluations without improvement before stopping")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--maxlen", type=int, default=50)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, help="stop training after this long (keeps the best epoch)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    d = a.dataset
    ids = [it["id"] for it in read_jsonl(d / "items.jsonl")]
    row_of = {i: k + 1 for k, i in enumerate(ids)}
    n = len(ids)
    train = [[row_of[x] for x in r["items"]] for r in read_jsonl(d / "train.jsonl") if len(r["items"]) >= 2]
    seen_sets = [set(s) for s in train]
    valid, test = read_jsonl(d / "valid.jsonl"), read_jsonl(d / "test.jsonl")
    model = SASRec(n, maxlen=a.maxlen)
    for p in model.parameters():  # pmixer: xavier_normal_ on every matrix
        if p.dim() > 1:
            nn.init.xavier_normal_(p)
    with torch.no_grad():
        model.item_emb.weight[0] = 0
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.9, 0.98))
    bce = nn.BCEWithLogitsLoss()
    best, best_state, best_epoch, bad, t0 = -1.0, None, 0, 0, time.time()
    for epoch in range(1, a.max_epochs + 1):
        order = rng.permutation(len(train))
        for i in range(0, len(order), a.batch_size):
            seqs, pos, neg = [], [], []
            for u in order[i:i + a.batch_size]:
                s, seen = train[u][-(a.maxlen + 1):], seen_sets[u]
                negs = rng.integers(1, n + 1, len(s) - 1)
                for k in range(len(negs)):
                    while negs[k] in seen:
                        negs[k] = rng.integers(1, n + 1)
                negs = negs.tolist()
                seqs.append(pad_left(s[:-1], a.maxlen))
                pos.append(pad_left(s[1:], a.maxlen))
                neg.append(pad_left(negs, a.maxlen))
            seqs, pos, neg = map(torch.tensor, (seqs, pos, neg))
            f = model.log_feats(seqs)
            pl = (f * model.item_emb(pos)).sum(-1)
            nl = (f * model.item_emb(neg)).sum(-1)
            m = pos != 0
            loss = bce(pl[m], torch.ones_like(pl[m])) + bce(nl[m], torch.zeros_like(nl[m]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % a.eval_every == 0:
            s = metrics([r["rank"] for r in rank_split(model, valid, row_of, a.maxlen)])
            print(f"epoch {epoch} loss {loss.item():.4f} valid ndcg@10 {s['ndcg@10']:.4f} "
                  f"hr@10 {s['hr@10']:.4f} ({time.time() - t0:.0f}s)", flush=True)
            if s["ndcg@10"] > best:
                best, bad = s["ndcg@10"], 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
                best_epoch = epoch
            else:
                bad += 1
            if bad >= a.patience or (a.max_minutes and time.time() - t0 > 60 * a.max_minutes):
                break
    if best_state:
        model.load_state_dict(best_state)
    print(f"chosen epoch {best_epoch} (valid ndcg@10 {best:.4f})", flush=True)
    emb = model.item_emb.weight.detach().numpy()[1:].astype(np.float32)
    save_npy(d / "features" / "cf.npy", emb)
    save_npy(d / "features" / "cf.ids.npy", np.asarray(ids, dtype=np.int64))
    for split, rows in (("valid", valid), ("test", test)):
        ranks = rank_split(model, rows, row_of, a.maxlen)
        s = metrics([r["rank"] for r in ranks])
        s.update(model="sasrec", epochs=best_epoch, seed=a.seed)
        write_jsonl(d / "runs" / f"sasrec-{split}" / "ranks.jsonl", ranks)
        write_json(d / "runs" / f"sasrec-{split}" / "summary.json", s)
        print(split, json.dumps(s), flush=True)


if __name__ == "__main__":
    main()
