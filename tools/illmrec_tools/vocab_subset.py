"""A copy of a GGUF whose token-embedding rows are zeroed except for the tokens a dataset's prompts
use, so that it compresses to a third of its size (for moving the model to a machine that can
take only a small upload, e.g. a lent GPU box for the end-to-end training phase).

Hidden states are unchanged for prompts made of the kept tokens (every other layer is copied
byte for byte); the tied LM head loses the zeroed rows, so train.py leaves them out of the ILA
softmax (it detects all-zero head rows). Not for deployment.

    python -m illmrec_tools.vocab_subset --dataset data/ml100k --out data/cache/subset.gguf
"""
import argparse
import shutil
from pathlib import Path

import gguf
import numpy as np

from .llm import DEFAULT_GGUF, PROMPT, description, encode, segments, tokenize
from .train import ANSWERS, ILA_LEAD, QUESTIONS, SYSTEM, read_jsonl


def used_tokens(tok, dataset):
    """Every token id of every prompt text the trainer and the runtime build for the dataset's
    train windows, valid and test histories (all three prompt styles), plus the ILA texts."""
    items = {it["id"]: it for it in read_jsonl(Path(dataset) / "items.jsonl")}
    has_image = {int(i) for i in np.load(Path(dataset) / "features" / "image.ids.npy")}.__contains__
    ids = set()
    texts = [PROMPT[k] for k in PROMPT if isinstance(PROMPT[k], str)]
    texts += [SYSTEM, ILA_LEAD, *ANSWERS.values(), *(q for qs in QUESTIONS.values() for q in qs)]
    for it in items.values():
        texts += [it.get("title") or "", ", ".join(it.get("genres") or []), (it.get("description") or "").strip()]
        texts.append(description(tok, it) or "")
    for t in texts:
        ids.update(encode(tok, t))
        ids.update(encode(tok, " " + t))
    histories = [r["items"] for r in read_jsonl(Path(dataset) / "train.jsonl")]
    histories += [r["history"] for name in ("valid", "test") for r in read_jsonl(Path(dataset) / f"{name}.jsonl")]
    for seq in histories:
        for end in range(1, len(seq) + 1, 3):
            h = seq[max(0, end - 10):end]
            for style in ("image", "title", "description"):
                toks, _ = tokenize(tok, segments(tok, items, h, style, has_image))
                ids.update(t for t in toks if t is not None)
    ids.update([tok.bos_token_id, tok.eos_token_id, 0])
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, type=Path)
    ap.add_argument("--model", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model.parent, gguf_file=a.model.name)
    keep = used_tokens(tok, a.dataset)
    reader = gguf.GGUFReader(a.model)
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_vocab = int(t.shape[1])
    row_bytes = t.n_bytes // n_vocab
    start = int(t.data_offset)
    del reader
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    shutil.copyfile(a.model, tmp)
    mm = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=start, shape=(n_vocab, row_bytes))
    drop = np.ones(n_vocab, dtype=bool)
    drop[sorted(keep)] = False
    mm[drop] = 0
    mm.flush()
    del mm
    tmp.replace(a.out)
    print(f"vocab_subset: kept {len(keep)} of {n_vocab} token rows; wrote {a.out}")


if __name__ == "__main__":
    main()
