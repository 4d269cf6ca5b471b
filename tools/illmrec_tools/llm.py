"""The frozen Gemma GGUF in transformers (float32), and the I-LLMRec prompt exactly as the runtime
builds it (src/prompt.json, src/prompt.rs, src/recommender.rs)."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
PROMPT = json.loads((REPO / "src" / "prompt.json").read_text(encoding="utf-8"))
DEFAULT_GGUF = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
DESCRIPTION_TOKENS = 64  # the runtime's --description-tokens default


def load_llm(gguf=DEFAULT_GGUF, cache=None):
    """Frozen float32 model + tokenizer. The first load dequantizes the GGUF (~45 s) and saves it
    under `cache` (default data/cache/<gguf stem>) as safetensors; later loads take seconds."""
    gguf = Path(gguf)
    cache = Path(cache or REPO / "data" / "cache" / gguf.stem)
    if (cache / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(cache)
    else:
        kw = dict(gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32,
                                                     attn_implementation="eager", **kw)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        # save_pretrained refuses GGUF-loaded models: write the dequantized weights ourselves.
        cache.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, str(cache / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tok.save_pretrained(cache)
        model.config.save_pretrained(cache)  # last: its presence marks a complete cache
    model.eval().requires_grad_(False)
    return model, tok


_ENCODED = {}


def encode(tok, text, bos=False):
    """Token ids as llama.cpp's tokenizer gives them: no special-token parsing, optional BOS.
    Memoized per (tokenizer, text): training re-tokenizes the same item texts every epoch."""
    key = (id(tok), text)
    ids = _ENCODED.get(key)
    if ids is None:
        ids = _ENCODED[key] = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [tok.bos_token_id] + ids if bos else list(ids)


def description(tok, item):
    """The runtime's text for an item without image: its description (else "Genres: a, b"),
    cut to 64 tokens; None when it has neither."""
    d = (item.get("description") or "").strip()
    if not d:
        if not item.get("genres"):
            return None
        d = "Genres: " + ", ".join(item["genres"])
    ids = encode(tok, d)
    return d if len(ids) <= DESCRIPTION_TOKENS else tok.decode(ids[:DESCRIPTION_TOKENS])


def item_bodies(tok, items, history, style, has_image):
    """Per history item: ("img", id) for an injected visual token, ("text", D) for a description,
    or None for title only (src/recommender.rs prompt_item with --missing-image text)."""
    out = []
    for i in history:
        if style == "title":
            out.append(None)
        elif style == "image" and has_image(i):
            out.append(("img", i))
        else:
            d = description(tok, items[i])
            out.append(None if d is None and style == "image" else ("text", d or ""))
    return out


def segments(tok, items, history, style, has_image, closing=None, rec=True):
    """The prompt as a list of text strings and ("img", id) / ("rec",) markers (src/prompt.rs
    build). `closing` replaces the instruction text (the ILA prompt); rec=False leaves out [REC]."""
    t = PROMPT
    segs, text = [], t["task"]
    for k, (i, body) in enumerate(zip(history, item_bodies(tok, items, history, style, has_image))):
        if k:
            text += t["item_separator"]
        text += t["item_open"] + (items[i].get("title") or t["unknown_title"])
        if body and body[0] == "img":
            text += t["item_visual"]
            segs += [text, body]
            text = ""
        elif body:
            text += t["item_description"] + body[1]
        text += t["item_close"]
    text += t["list_close"] + t["closing"] + (t["instruction"] if closing is None else closing)
    segs.append(text)
    if rec:
        segs.append(("rec",))
    return segs


def tokenize(tok, segs):
    """Each text segment tokenized on its own, BOS on the first only; None at injected positions
    (the runtime's recommender::tokenize). Returns (ids, markers) with markers[k] the marker at
    position k or None."""
    ids, markers = [], []
    for k, s in enumerate(segs):
        if isinstance(s, str):
            t = encode(tok, s, bos=k == 0)
            ids += t
            markers += [None] * len(t)
        else:
            ids.append(None)
            markers.append(s)
    return ids, markers
