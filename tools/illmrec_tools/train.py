"""I-LLMRec trainer through the frozen GGUF LLM (reference §4), with export of the runtime's heads.

One joint loss per step = IRE + ILA:
- IRE: the prompt of src/prompt.json closed by the learned [REC] vector; the LLM's final hidden
  state there → f_u_m; item vectors f_i_m(x_m); BCE-with-logits on the raw dot product for the
  target and one random negative per sample, per modality, averaged over the modalities.
- ILA: the same history text in the vicuna_v1 wrapper, a question about the target item, and
  next-token cross-entropy through the frozen LM head on the answer tokens only.
Trainable: adaptor, rec_token, the six heads; with --train-token-embeddings also the LLM's input
embedding table (as the reference's train_token_emb; the LM head stays frozen at the base table),
and the export then writes the trained table into a new GGUF. The tokens before the first item are
identical in every prompt, so while the table is frozen their KV cache is computed once per run and
reused (with no gradient); when it trains, every prompt is run whole so those rows learn too.

Resumable: `--out DIR/ckpt.pt` holds trainables + optimizer + scheduler + step; every random
choice is a function of (seed, epoch), so a restarted run continues exactly where it stopped.
"""
import argparse
import copy
import datetime
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

from .atomic import atomic_write, write_json, write_jsonl
from .gguf_table import write_gguf
from .llm import DEFAULT_GGUF, PROMPT, description, encode, load_llm, segments, tokenize

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ILA_LEAD = ("Please conduct an analysis of user preference, taking into account the interacted items. "
            "Based on your analysis, ")
# Our own questions/answers (the reference's 20 templates are for Amazon title/feature/brand/category).
QUESTIONS = {
    "title": ["what is the title of the next item this user will consume?",
              "which item will the user interact with next? Give its title.",
              "predict the title of the item the user is most likely to watch next."],
    "genres": ["what are the genres of the next item this user will consume?",
               "which genres does the item the user will watch next belong to?",
               "predict the genres of the item the user is most likely to watch next."],
    "description": ["describe the next item this user will consume.",
                    "give a short description of the item the user will watch next.",
                    "what is the plot of the item the user is most likely to watch next?"],
}
ANSWERS = {"title": "The title of the next item is ", "genres": "The genres of the next item are ",
           "description": "The description of the next item is "}
MODALITIES = ("img", "cf", "text")
FEATURE_FILES = {"img": "image", "cf": "cf", "text": "text"}


def mlp(n_in, hidden=1024, out=512):
    m = nn.Module()
    m.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.LayerNorm(hidden, eps=1e-5), nn.ReLU(),
                          nn.Linear(hidden, out))
    return m


class RecModule(nn.Module):
    """Parameter names are the runtime's heads.safetensors keys."""

    def __init__(self, llm_dim, item_dims, image_dim=None, adaptor_dim=512):
        super().__init__()
        if image_dim:
            self.adaptor = nn.Module()
            self.adaptor.proj_v2c = nn.Linear(image_dim, adaptor_dim)
            self.adaptor.layernorm = nn.LayerNorm(adaptor_dim, eps=1e-8)
            self.adaptor.interface = nn.Linear(adaptor_dim, llm_dim)
        # Reference init (xavier-uniform [REC]) carried into Gemma's input space, where every token
        # row is multiplied by sqrt(n_embd) before the first layer: the same relative size as there.
        self.rec_token = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, llm_dim)) * math.sqrt(llm_dim))
        for m, d in item_dims.items():
            setattr(self, f"f_u_{m}", mlp(llm_dim))
            setattr(self, f"f_i_{m}", mlp(d))

    def set_standardization(self, mu, sd):
        """A fixed per-dimension standardisation of the [REC] state before the user heads
        (statistics of the initial states); folded into f_u_m's first layer by `folded_state`."""
        self.register_buffer("state_mu", mu.detach().clone())
        self.register_buffer("state_sd", sd.detach().clone())

    def folded_state(self):
        """The state dict in the runtime's layout: the standardisation folded into f_u_m."""
        sd = {k: v.detach().clone() for k, v in self.state_dict().items() if k not in ("state_mu", "state_sd")}
        if hasattr(self, "state_mu"):
            for m in MODALITIES:
                w, b = f"f_u_{m}.mlp.0.weight", f"f_u_{m}.mlp.0.bias"
                if w in sd:
                    sd[w] = sd[w] / self.state_sd
                    sd[b] = sd[b] - sd[w] @ self.state_mu
        return sd

    def adapt(self, x):
        a = self.adaptor
        return a.interface(nn.functional.gelu(a.layernorm(a.proj_v2c(x))))

    def head(self, side, m, x):
        if side == "u" and hasattr(self, "state_mu"):
            x = (x - self.state_mu) / self.state_sd
        return getattr(self, f"f_{side}_{m}").mlp(x)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Data:
    def __init__(self, root, device="cpu"):
        self.root = Path(root)
        self.items = {it["id"]: it for it in read_jsonl(self.root / "items.jsonl")}
        self.ids = np.array(sorted(self.items))
        self.feats, self.row = {}, {}
        for m, f in FEATURE_FILES.items():
            x = np.load(self.root / "features" / f"{f}.npy")
            ids = np.load(self.root / "features" / f"{f}.ids.npy")
            self.feats[m] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
            self.row[m] = {int(i): k for k, i in enumerate(ids)}
        self.train = [r["items"] for r in read_jsonl(self.root / "train.jsonl") if len(r["items"]) >= 2]

    def has_image(self, i):
        return i in self.row["img"]

    def rows(self, m, ids):
        """Feature rows of `ids` for modality m (zeros where missing) and the presence mask."""
        r = [self.row[m].get(i, -1) for i in ids]
        dev = self.feats[m].device
        mask = torch.tensor([k >= 0 for k in r], device=dev)
        return self.feats[m][torch.tensor([max(k, 0) for k in r], device=dev)], mask


def epoch_samples(data, seed, epoch, style_types):
    """Reference §4.2: one sample per user, random window of 2..4 (p=.5) or 2..9 items; plus the
    negative item and the ILA question for each."""
    rng = np.random.default_rng([seed, epoch])
    out = []
    for seq in data.train:
        cap = 5 if rng.random() < 0.5 else 10
        n = int(rng.integers(2, cap))
        if len(seq) > n:
            s = int(rng.integers(0, len(seq) - n))
            hist, target = seq[s:s + n], seq[s + n]
        else:
            hist, target = seq[:-1], seq[-1]
        neg = target
        while neg == target:
            neg = int(data.ids[rng.integers(len(data.ids))])
        types = [t for t in style_types if answer_value(data.items[target], t)]
        qtype = types[int(rng.integers(len(types)))]
        q = int(rng.integers(len(QUESTIONS[qtype])))
        out.append(dict(history=hist, target=target, neg=neg, qtype=qtype, q=q))
    return [out[k] for k in rng.permutation(len(out))]


def answer_value(item, qtype):
    if qtype == "title":
        return item.get("title") or PROMPT["unknown_title"]
    if qtype == "genres":
        return ", ".join(item.get("genres") or [])
    return (item.get("description") or "").strip()


def make_token_table_trainable(model):
    """Unties Gemma's LM head from the input table (the head keeps a frozen copy of the base
    table, as the reference freezes lm_head) and lets the input table train."""
    table = model.model.embed_tokens.weight
    model.lm_head.weight = nn.Parameter(table.detach().clone(), requires_grad=False)
    table.requires_grad_(True)
    return table


class Trainer:
    def __init__(self, model, tok, data, rec, style, cache_prefix=True):
        self.model, self.tok, self.data, self.rec, self.style = model, tok, data, rec, style
        self.embed = model.model.embed_tokens  # scales by sqrt(640) itself
        self.dev = self.embed.weight.device
        # Rows of the LM head that are all zero (a vocabulary-pruned model, used to move the model
        # to a machine with little transfer room) are left out of the ILA softmax.
        self.vocab_mask = (model.lm_head.weight == 0).all(1)
        self.vocab_mask = self.vocab_mask if self.vocab_mask.any() else None
        self.ila_head = f"{SYSTEM} USER: "
        self.ire_prefix, self.ila_prefix, self.caches = [], [], None
        if cache_prefix:
            # The constant prefix: the task text minus its last token (which may merge with "{").
            self.ire_prefix = encode(tok, PROMPT["task"], bos=True)[:-1]
            self.ila_prefix = encode(tok, self.ila_head + PROMPT["task"], bos=True)[:-1]
            self.caches = {k: self.prefix_cache(p) for k, p in
                           (("ire", self.ire_prefix), ("ila", self.ila_prefix))}

    @torch.no_grad()
    def prefix_cache(self, ids):
        return self.model.model(input_ids=torch.tensor([ids], device=self.dev), use_cache=True).past_key_values

    def embed_prompt(self, ids, markers, prefix):
        """Input embeddings after the cached prefix: token rows, adaptor outputs, rec_token."""
        assert ids[:len(prefix)] == prefix, "prompt does not start with the cached prefix"
        ids, markers = ids[len(prefix):], markers[len(prefix):]
        e = self.embed(torch.tensor([0 if i is None else i for i in ids], device=self.dev))
        pos = [k for k, mk in enumerate(markers) if mk is not None]
        if not pos:
            return e
        vecs = []
        for k in pos:
            mk = markers[k]
            if mk[0] == "rec":
                vecs.append(self.rec.rec_token[0])
            else:
                vecs.append(self.rec.adapt(self.data.rows("img", [mk[1]])[0][0]))
        return e.index_put((torch.tensor(pos, device=self.dev),), torch.stack(vecs).to(e.dtype))

    def run_llm(self, embeds, cache):
        """Right-padded batch after the cached prefix (causal attention: padding never reaches a
        real position). Returns the final-norm hidden states [B, L, d]."""
        n = max(len(e) for e in embeds)
        x = torch.stack([nn.functional.pad(e, (0, 0, 0, n - len(e))) for e in embeds])
        if self.caches is None:
            return self.model.model(inputs_embeds=x).last_hidden_state
        c = copy.deepcopy(self.caches[cache])
        c.batch_repeat_interleave(len(embeds))
        return self.model.model(inputs_embeds=x, past_key_values=c, use_cache=True).last_hidden_state

    def rec_states(self, histories):
        """The final-norm hidden state at [REC] for each history (the runtime's user state)."""
        embeds = []
        for hist in histories:
            ids, mk = tokenize(self.tok, segments(self.tok, self.data.items, hist, self.style,
                                                  self.data.has_image))
            embeds.append(self.embed_prompt(ids, mk, self.ire_prefix))
        h = self.run_llm(embeds, "ire")
        h = h[torch.arange(len(histories), device=self.dev), torch.tensor([len(e) - 1 for e in embeds], device=self.dev)]
        return h.float()

    def ire_loss(self, batch, loss="bce"):
        """Reference IRE: per modality, BCE on the target's and one random negative's dot products.
        loss="softmax": cross-entropy of the target against the whole catalog on the combined score
        and on each modality's score (the staged heads' objective; more signal per sample)."""
        h = self.rec_states([s["history"] for s in batch])
        if loss == "softmax":
            return self.softmax_loss(h, [s["target"] for s in batch])
        bce = nn.functional.binary_cross_entropy_with_logits
        total = 0.0
        for m in MODALITIES:
            u = self.rec.head("u", m, h)
            for key, label in (("target", 1.0), ("neg", 0.0)):
                x, mask = self.data.rows(m, [s[key] for s in batch])
                if mask.any():
                    v = self.rec.head("i", m, x[mask])
                    logit = (u[mask] * v).sum(-1)
                    total = total + bce(logit, torch.full_like(logit, label))
        return total / len(MODALITIES)

    def catalog_scores(self, h):
        """Per-modality [B, n_items] scores (-inf where an item lacks the modality) and the combined
        score (mean over the modalities an item has, as the runtime scores) over every catalog item."""
        ids = self.data.ids.tolist()
        per, total, count = {}, 0.0, 0.0
        for m in MODALITIES:
            x, mask = self.data.rows(m, ids)
            s = self.rec.head("u", m, h) @ self.rec.head("i", m, x).T
            per[m] = s.masked_fill(~mask, float("-inf"))
            total = total + s * mask
            count = count + mask.float()
        return per, total / count

    def softmax_loss(self, h, targets):
        index = {int(i): k for k, i in enumerate(self.data.ids)}
        y = torch.tensor([index[t] for t in targets], device=self.dev)
        per, comb = self.catalog_scores(h)
        ce = nn.functional.cross_entropy
        loss = ce(comb, y)
        for m in MODALITIES:
            has = torch.isfinite(per[m][torch.arange(len(y), device=self.dev), y])
            if has.any():
                loss = loss + ce(per[m][has], y[has]) / len(MODALITIES)
        return loss

    @torch.no_grad()
    def validate(self, cases, batch_size=8):
        """Protocol metrics (target among its 100 stored negatives, ties against the target) on
        `cases` (rows of valid.jsonl), histories cut to the newest 10 items as the runtime does;
        plus a ridge probe: R^2 of the [REC] states predicting the mean image feature of the history."""
        r, states = self.ranks(cases, batch_size)
        out = metrics(r)
        out["probe_r2_img"] = probe_r2(states, self.mean_feature("img", [c["history"][-10:] for c in cases]))
        return out

    @torch.no_grad()
    def ranks(self, cases, batch_size=8):
        """Each case's protocol rank, and the user states they came from."""
        index = {int(i): k for k, i in enumerate(self.data.ids)}
        ranks, states = [], []
        for b in range(0, len(cases), batch_size):
            chunk = cases[b:b + batch_size]
            h = self.rec_states([c["history"][-10:] for c in chunk])
            states.append(h)
            comb = self.catalog_scores(h)[1]
            for row, c in zip(comb, chunk):
                t = row[index[c["target"]]]
                negs = row[torch.tensor([index[i] for i in c["negatives"]], device=self.dev)]
                ranks.append(int((negs >= t).sum()))
        return np.array(ranks), torch.cat(states)

    def mean_feature(self, m, histories):
        rows = []
        for hist in histories:
            x, mask = self.data.rows(m, hist)
            rows.append(x[mask].mean(0) if mask.any() else torch.zeros(x.shape[1], device=x.device))
        return torch.stack(rows)

    def ila_loss(self, batch):
        embeds, targets = [], []
        for s in batch:
            q = ILA_LEAD + QUESTIONS[s["qtype"]][s["q"]] + " ASSISTANT:"
            segs = segments(self.tok, self.data.items, s["history"], self.style, self.data.has_image,
                            closing=q, rec=False)
            segs[0] = self.ila_head + segs[0]
            ids, mk = tokenize(self.tok, segs)
            value = answer_value(self.data.items[s["target"]], s["qtype"])
            if s["qtype"] == "description":  # cut like the prompt's descriptions
                value = self.tok.decode(encode(self.tok, value)[:64])
            ans = encode(self.tok, f" {ANSWERS[s['qtype']]}'{value}'") + [self.tok.eos_token_id]
            e = self.embed_prompt(ids, mk, self.ila_prefix)
            embeds.append(torch.cat([e, self.embed(torch.tensor(ans, device=self.dev)).to(e.dtype)]))
            targets.append((len(e), ans))
        h = self.run_llm(embeds, "ila")
        rows = torch.cat([h[b, start - 1:start - 1 + len(ans)] for b, (start, ans) in enumerate(targets)])
        labels = torch.tensor([t for _, ans in targets for t in ans], device=self.dev)
        logits = self.model.lm_head(rows).float()
        if self.vocab_mask is not None:
            logits = logits.masked_fill(self.vocab_mask, float("-inf"))
        return nn.functional.cross_entropy(logits, labels)


class FeatureTrainer(Trainer):
    """The no-LLM model on the same samples: the user heads read the mean of the history items'
    features per modality, concatenated (zeros where none has it), instead of the [REC] state."""

    def __init__(self, data, rec, modalities=MODALITIES):
        from .stages import Features  # the staged recipe's no-LLM input (stages imports this module)
        self.data, self.rec, self.dev = data, rec, data.feats["img"].device
        self.features, self.modalities = Features(data), modalities

    def rec_states(self, histories):
        return self.features.mean_of(histories, self.modalities)


def fit_adaptor_to_text(trainer, steps, lr=1e-3):
    """A cheaper start for the adaptor: regress its output for each item's image feature onto the
    mean input embedding (Gemma's scaled rows) of the item's own description tokens (genres where it
    has none, cut to 64 tokens as in a description prompt), so the visual token starts where the
    LLM reads that item's text. Full-batch Adam on the items with an image; returns the R^2."""
    data, rec = trainer.data, trainer.rec
    texts = {i: description(trainer.tok, data.items[i]) for i in data.ids.tolist() if data.has_image(i)}
    ids = [i for i, t in texts.items() if t]
    with torch.no_grad():
        y = torch.stack([trainer.embed(torch.tensor(encode(trainer.tok, texts[i]), device=trainer.dev)).mean(0)
                         for i in ids]).float()
    x = data.rows("img", ids)[0]
    opt = torch.optim.Adam(rec.adaptor.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.mse_loss(rec.adapt(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(1 - ((rec.adapt(x) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()), len(ids)


def metrics(r):
    """Protocol metrics of ranks (0 = best): users, HR@5/10, NDCG@5/10, MRR."""
    r = np.asarray(r)
    out = {"users": int(len(r))}
    for k in (5, 10):
        out[f"hr@{k}"] = float((r < k).mean())
        out[f"ndcg@{k}"] = float(np.where(r < k, 1 / np.log2(r + 2), 0).mean())
    out["mrr"] = float((1 / (r + 1)).mean())
    return out


def probe_r2(x, y, ridge=1000.0):
    """Ridge regression from x to y fitted on the first half of the rows, R^2 (variance explained,
    pooled over y's dimensions) on the second half: how much of y the states keep."""
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    n = len(x) // 2
    if n < 2:
        return float("nan")
    xa, xb, ya, yb = x[:n].double(), x[n:].double(), y[:n].double(), y[n:].double()
    mu = ya.mean(0)
    w = torch.linalg.solve(xa.T @ xa + ridge * torch.eye(x.shape[1], dtype=xa.dtype), xa.T @ (ya - mu))
    res = ((yb - mu - xb @ w) ** 2).sum()
    tot = ((yb - yb.mean(0)) ** 2).sum()
    return float(1 - res / tot)


def heads_config(llm_dim, item_dims, prompt, image_dim, trained, provenance, train_seconds=None):
    """The runtime's heads.json (src/heads.rs HeadsConfig) for heads of these dimensions."""
    cfg = {"format": "illmrec-heads", "version": 1, "llm_dim": llm_dim, "proj_dim": 512, "hidden_dim": 1024,
           "prompt": prompt}
    if image_dim:
        cfg["image_dim"] = image_dim
    cfg.update({"adaptor_dim": 512, "item_dims": item_dims, "adaptor_ln_eps": 1e-8, "head_ln_eps": 1e-5,
                "trained": trained})
    if train_seconds is not None:
        cfg["train_seconds"] = round(train_seconds)
    cfg["provenance"] = provenance
    return cfg


def export(rec, cfg_extra, out, dtype):
    """heads.safetensors (runtime key names, [out, in] weights) + heads.json."""
    dt = torch.float16 if dtype == "f16" else torch.float32
    with atomic_write(out / "heads.safetensors", "wb") as f:
        f.write(save({k: v.cpu().to(dt).contiguous() for k, v in rec.folded_state().items()}))
    write_json(out / "heads.json", cfg_extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--prompt-style", choices=["image", "title", "description"], default="image")
    ap.add_argument("--epochs", type=int, default=8, help="one random window per user each (the reference: 8)")
    ap.add_argument("--max-samples", type=int, help="stop after this many samples (LR schedule too)")
    ap.add_argument("--batch-size", type=int, default=8, help="the reference: 8")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW, linear decay to 0, no warm-up (the reference: 5e-5)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-every", type=int, default=20, help="steps")
    ap.add_argument("--log-every", type=int, default=5, help="steps")
    ap.add_argument("--max-minutes", type=float, help="stop (checkpoint + export) after this long")
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="exported heads")
    ap.add_argument("--ire-loss", choices=["bce", "softmax"], default="bce",
                    help="bce: the reference (target + 1 random negative per modality); softmax: the target "
                         "against the whole catalog")
    ap.add_argument("--ila-weight", type=float, default=1.0, help="weight of the ILA loss (0: IRE only, "
                    "half the cost per sample)")
    ap.add_argument("--valid-every", type=int, default=0,
                    help="every N samples, HR@5/NDCG on --valid-users validation users and the probe R^2 "
                         "(appended to OUT/valid.jsonl)")
    ap.add_argument("--valid-users", type=int, default=200)
    ap.add_argument("--user-input", choices=["llm", "features"], default="llm",
                    help="features: the no-LLM baseline on the same samples (the user heads read the mean of the "
                         "history's features); writes OUT/summary.json and OUT/{valid,test}-ranks.jsonl, no heads")
    ap.add_argument("--user-features", default=",".join(MODALITIES), metavar="M[,M...]",
                    help="with --user-input features: the modalities of the history the user heads "
                         "read (img,text: what an image prompt shows, no collaborative features)")
    ap.add_argument("--item-heads", type=Path,
                    help="start the item heads f_i_m from this heads.pt (`stages heads` output, e.g. the no-LLM "
                         "model's) instead of a random initialisation")
    ap.add_argument("--freeze-item-heads", action="store_true", help="keep the item heads fixed")
    ap.add_argument("--lr-inputs", type=float, help="learning rate of the adaptor and [REC] [default: --lr]")
    ap.add_argument("--standardize", type=int, default=0, metavar="N",
                    help="standardise the [REC] state per dimension before the user heads, with the mean and "
                         "deviation of N initial training states (fixed; folded into the heads at export)")
    ap.add_argument("--init-adaptor-text", type=int, default=0, metavar="STEPS",
                    help="before the first step, fit the adaptor for STEPS full-batch steps so each "
                         "item's visual token is the mean input embedding of its own description")
    ap.add_argument("--export-only", action="store_true",
                    help="export the heads of OUT/ckpt.pt as they are (a run in progress) without training")
    ap.add_argument("--model", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--device", default="cpu", help="torch device (cuda for a GPU)")
    ap.add_argument("--bf16", action="store_true", help="run the LLM under bf16 autocast")
    ap.add_argument("--train-token-embeddings", action="store_true",
                    help="also train the LLM's input embedding table (reference: train_token_emb); the export "
                         "writes it into OUT/model.gguf, a copy of --model (table stored as --dtype)")
    a = ap.parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    data = Data(a.dataset, a.device)
    item_dims = {m: data.feats[m].shape[1] for m in MODALITIES}
    if a.init_adaptor_text and (a.prompt_style != "image" or a.user_input == "features"):
        raise SystemExit("train: --init-adaptor-text needs the image prompt (an adaptor)")
    table = None
    if a.user_input == "features":
        if a.ila_weight or a.train_token_embeddings:
            raise SystemExit("train: --user-input features runs no LLM: use it with --ila-weight 0 and "
                             "without --train-token-embeddings")
        asked = a.user_features.split(",")
        user_features = tuple(m for m in MODALITIES if m in asked)
        if set(asked) - set(MODALITIES) or not user_features:
            raise SystemExit(f"train: --user-features takes modalities among {','.join(MODALITIES)}, "
                             f"not {a.user_features!r}")
        llm_dim, image_dim = sum(item_dims[m] for m in user_features), None
        rec = RecModule(llm_dim, item_dims, image_dim).to(a.device)
        trainer = FeatureTrainer(data, rec, user_features)
    else:
        model, tok = load_llm(a.model)
        model.to(a.device)
        llm_dim = model.config.hidden_size
        image_dim = item_dims["img"] if a.prompt_style == "image" else None
        rec = RecModule(llm_dim, item_dims, image_dim).to(a.device)
        table = make_token_table_trainable(model) if a.train_token_embeddings else None
        trainer = Trainer(model, tok, data, rec, a.prompt_style, cache_prefix=table is None)
    qtypes = ["title", "genres"] + (["description"] if a.prompt_style != "title" else [])
    if a.item_heads:
        st = torch.load(a.item_heads, map_location=a.device)
        missing = [k for k in rec.state_dict() if k.startswith("f_i_") and k not in st]
        if missing:
            raise SystemExit(f"train: {a.item_heads} has no {missing[0]} (not a heads.pt with these feature sizes)")
        rec.load_state_dict({k: v for k, v in st.items() if k.startswith("f_i_")}, strict=False)
    if a.freeze_item_heads:
        for m in MODALITIES:
            getattr(rec, f"f_i_{m}").requires_grad_(False)

    per_epoch = math.ceil(len(data.train) / a.batch_size)
    total = a.epochs * per_epoch
    if a.max_samples:
        total = min(total, math.ceil(a.max_samples / a.batch_size))
    # weight_decay 0 (the reference's HF default): rows that get no gradient do not move.
    inputs = [p for n, p in rec.named_parameters() if n == "rec_token" or n.startswith("adaptor.")]
    heads = [p for n, p in rec.named_parameters() if p.requires_grad and not (n == "rec_token" or n.startswith("adaptor."))]
    groups = [dict(params=inputs, lr=a.lr_inputs or a.lr), dict(params=heads, lr=a.lr)]
    if table is not None:
        groups.append(dict(params=[table], lr=a.lr))
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    ckpt, step, history, seconds_before = a.out / "ckpt.pt", 0, [], 0.0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False, map_location=a.device)
        if st["total"] != total or st["style"] != a.prompt_style or ("table" in st) != (table is not None):
            raise SystemExit(f"train: {ckpt} is from other settings (steps, prompt style or "
                             f"--train-token-embeddings); use another --out")
        if "state_mu" in st["rec"]:
            rec.set_standardization(st["rec"]["state_mu"], st["rec"]["state_sd"])
        rec.load_state_dict(st["rec"])
        if table is not None:
            table.data.copy_(st["table"])
        if not a.export_only:  # exporting needs the trainables only
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
        step, history = st["step"], st["history"]
        # Checkpoints written before train_seconds existed: each resumed segment's log restarted
        # its clock, so sum the last time of every segment.
        seconds_before = st.get("train_seconds", sum(r["time"] for k, r in enumerate(history)
                                                     if k + 1 == len(history) or history[k + 1]["time"] < r["time"]))
        print(f"resumed at step {step}/{total}", flush=True)

    def train_seconds():
        return seconds_before + time.time() - t_start

    def save():
        tmp = ckpt.with_suffix(".tmp")
        st = dict(rec=rec.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), step=step,
                  total=total, style=a.prompt_style, history=history,
                  train_seconds=train_seconds())
        if table is not None:
            st["table"] = table.detach()
        torch.save(st, tmp)
        os.replace(tmp, ckpt)

    valid_cases = []
    if a.valid_every:
        rows = read_jsonl(a.dataset / "valid.jsonl")
        pick = np.random.default_rng(a.seed).permutation(len(rows))[:a.valid_users]
        valid_cases = [rows[k] for k in sorted(pick)]

    def validate():
        t = time.time()
        with torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.bf16):
            mv = trainer.validate(valid_cases)
        row = dict(step=step, samples=step * a.batch_size, seconds=time.time() - t, **mv)  # mv has users
        with open(a.out / "valid.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"valid at {row['samples']} samples: HR@5 {mv['hr@5']:.4f} NDCG@5 {mv['ndcg@5']:.4f} "
              f"NDCG@10 {mv['ndcg@10']:.4f} probe R2 {mv['probe_r2_img']:.3f} ({row['seconds']:.0f} s)", flush=True)

    if a.export_only and not ckpt.exists():
        raise SystemExit(f"train: --export-only needs a checkpoint, and {ckpt} does not exist")
    if not a.export_only:
        if a.init_adaptor_text and step == 0:
            r2, n = fit_adaptor_to_text(trainer, a.init_adaptor_text)
            print(f"adaptor fitted to the description embeddings of {n} items: R2 {r2:.3f}", flush=True)
        if a.standardize and step == 0 and not hasattr(rec, "state_mu"):
            hist = [s["history"] for s in epoch_samples(data, a.seed, 0, qtypes)[:a.standardize]]
            with torch.no_grad():
                h = torch.cat([trainer.rec_states(hist[b:b + 8]) for b in range(0, len(hist), 8)])
            rec.set_standardization(h.mean(0), h.std(0).clamp_min(1e-6))
            print(f"standardising the [REC] state with {len(hist)} initial states (mean |mu| "
                  f"{h.mean(0).abs().mean():.3f}, sd range {h.std(0).min():.3g}..{h.std(0).max():.3g})", flush=True)
        if valid_cases and step == 0 and not (a.out / "valid.jsonl").exists():
            validate()
        steps_per_valid = max(1, a.valid_every // a.batch_size) if a.valid_every else 0
        samples, t0, acc = None, time.time(), []
        while step < total:
            epoch, k = divmod(step, per_epoch)
            if samples is None or samples[0] != epoch:
                samples = (epoch, epoch_samples(data, a.seed, epoch, qtypes))
            batch = samples[1][k * a.batch_size:(k + 1) * a.batch_size]
            with torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.bf16):
                ire = trainer.ire_loss(batch, a.ire_loss)
                ila = trainer.ila_loss(batch) if a.ila_weight else torch.zeros(())
            opt.zero_grad()
            (ire + a.ila_weight * ila).backward()
            opt.step()
            sched.step()
            step += 1
            acc.append((ire.item(), ila.item(), len(batch)))
            if step % a.log_every == 0 or step == total:
                n = sum(x[2] for x in acc)
                rate = n / (time.time() - t0)
                row = dict(step=step, epoch=epoch, ire=float(np.mean([x[0] for x in acc])),
                           ila=float(np.mean([x[1] for x in acc])), lr=sched.get_last_lr()[0],
                           samples_per_s=rate, time=time.time() - t_start)
                history.append(row)
                eta = (total - step) * a.batch_size / rate
                print(f"step {step}/{total} epoch {epoch} ire {row['ire']:.4f} ila {row['ila']:.4f} "
                      f"lr {row['lr']:.2e} {rate:.2f} samples/s eta {eta / 60:.1f} min", flush=True)
                t0, acc = time.time(), []
            if step % a.ckpt_every == 0:
                save()
            if steps_per_valid and (step % steps_per_valid == 0 or step == total):
                save()
                validate()
            if a.max_minutes and time.time() - t_start > 60 * a.max_minutes:
                print(f"time budget reached at step {step}/{total}", flush=True)
                break
        save()
    if a.user_input == "features":  # a baseline for comparison: metrics and ranks, nothing to serve
        summary = {"samples": step * a.batch_size, "train_seconds": train_seconds()}
        for split in ("valid", "test"):
            cases = read_jsonl(a.dataset / f"{split}.jsonl")
            r = trainer.ranks(cases)[0]
            summary[split] = metrics(r)
            write_jsonl(a.out / f"{split}-ranks.jsonl", ({"user": c["user"], "rank": int(k)} for c, k in zip(cases, r)))
        write_json(a.out / "summary.json", summary)
        print(f"no-LLM baseline after {summary['samples']} samples: valid HR@5 {summary['valid']['hr@5']:.4f}, "
              f"test HR@5 {summary['test']['hr@5']:.4f} (OUT/summary.json)", flush=True)
        return
    cfg = heads_config(llm_dim, item_dims, a.prompt_style, image_dim, True,
                       f"dataset {a.dataset.name}, {step}/{total} steps of batch {a.batch_size} "
                       f"({min(step * a.batch_size, total * a.batch_size)} samples, "
                       f"{step / per_epoch:.2f} epochs of {len(data.train)} users), seed {a.seed}, "
                       f"lr {a.lr}, token embeddings {'trained' if table is not None else 'frozen'}, "
                       f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, "
                       f"command: illmrec_tools.train {shlex.join(sys.argv[1:] if argv is None else argv)}",
                       train_seconds())
    if table is not None:  # before the heads, whose heads.json marks a finished export
        write_gguf(a.model, a.out / "model.gguf", table.detach().numpy(), a.dtype, what="the trained table")
        print(f"exported {a.out}/model.gguf (trained token table as {a.dtype})", flush=True)
    export(rec, cfg, a.out, a.dtype)
    print(f"exported {a.out}/heads.safetensors ({a.dtype}) at step {step}/{total}", flush=True)


if __name__ == "__main__":
    main()
