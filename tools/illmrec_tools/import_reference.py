"""Converts a checkpoint in the I-LLMRec reference layout (torch-I-LLMRec, `checkpoint-<step>/`)
and its data folder into an illmrec bundle.

    checkpoint/config.json                    ILLMRecLlamaConfig (rec_cfg, data_cfg, ...)
    checkpoint/llm/                           tokenizer files (with the added <i_vis> token)
    checkpoint/llm_parameter/token_embed.pth  fine-tuned input embeddings, raw tensor [vocab+1, d]
    checkpoint/rec_module/model.safetensors   adaptor, rec_token, f_{u,i}_{img,cf,text} heads
    data/meta_info.json                       {"<id>": {"title", "description", ...}}
    data/img_features/<id>.pth, data/txt_features/<id>.pth   per-item feature tensors
    SASRec checkpoint (rec_cfg.recsys_model_path or --sasrec)  item_emb.weight, row = id + 1

The bundle gets: model.gguf (the base GGUF with token_embd.weight replaced by the fine-tuned
table without its <i_vis> row; the base output layer kept, as the reference freezes lm_head;
everything else copied), heads.safetensors as saved, heads.json
with dims read from the tensors, items.jsonl (id, title, description), and img/text/cf banks.

    PYTHONPATH=tools tools/.venv/bin/python -m illmrec_tools.import_reference \
        --checkpoint CKPT --data DATA --out BUNDLE [--base-gguf F.gguf] [--embed-type f16]
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from illmrec_tools.gguf_table import write_gguf
from illmrec_tools.parity import DEFAULT_GGUF, illmrec

I_VIS = "<i_vis>"
MODALITIES = {"img": "img_features", "text": "txt_features"}  # modality -> data sub-folder


def load_tensor(path):
    """A tensor saved with torch.save, on the CPU, as its own contiguous float32 copy (the files
    may be row views of a larger saved batch, and may be tagged with a CUDA device)."""
    return torch.load(path, map_location="cpu", weights_only=True).float().contiguous().clone()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "added_tokens.json")


def check_layout(checkpoint, data):
    """Fails with one line (not a traceback) when the checkpoint or data folder lacks a file the
    import needs, before anything is loaded."""
    need = [checkpoint / "config.json", checkpoint / "llm_parameter" / "token_embed.pth",
            checkpoint / "rec_module" / "model.safetensors", data / "meta_info.json"]
    for path in need:
        if not path.is_file():
            raise SystemExit(f"import_reference: {path} is missing (see the layout in --help)")
    llm = checkpoint / "llm"
    if not any((llm / f).is_file() for f in TOKENIZER_FILES):
        raise SystemExit(f"import_reference: {llm} has no tokenizer files (expected one of "
                         f"{', '.join(TOKENIZER_FILES)}, saved with the {I_VIS} token)")


def i_vis_id(llm_dir):
    """The id of <i_vis> in the checkpoint's tokenizer."""
    added = Path(llm_dir) / "added_tokens.json"
    if added.exists():
        ids = json.loads(added.read_text())
        if I_VIS not in ids:
            raise SystemExit(f"import_reference: {added} has no {I_VIS} token")
        return ids[I_VIS]
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(llm_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"import_reference: cannot load the tokenizer in {llm_dir}: {e}".replace("\n", " "))
    id_ = tok.convert_tokens_to_ids(I_VIS)
    if id_ is None or id_ == tok.unk_token_id:
        raise SystemExit(f"import_reference: the tokenizer in {llm_dir} has no {I_VIS} token")
    return id_


def heads_config(weights, source):
    """heads.json for the checkpoint's rec_module, dims read from the tensors."""
    with safe_open(weights, "pt") as f:
        shape = {k: f.get_slice(k).get_shape() for k in f.keys()}
    item_dims = {m: shape[f"f_i_{m}.mlp.0.weight"][1] for m in ("img", "cf", "text")
                 if f"f_i_{m}.mlp.0.weight" in shape}
    user = f"f_u_{next(iter(item_dims))}"
    return {"format": "illmrec-heads", "version": 1,
            "llm_dim": shape["rec_token"][1],
            "proj_dim": shape[f"{user}.mlp.3.weight"][0],
            "hidden_dim": shape[f"{user}.mlp.0.weight"][0],
            "prompt": "image",
            "image_dim": shape["adaptor.proj_v2c.weight"][1],
            "adaptor_dim": shape["adaptor.proj_v2c.weight"][0],
            "item_dims": item_dims, "adaptor_ln_eps": 1e-8, "head_ln_eps": 1e-5,
            "trained": True, "provenance": f"imported from the I-LLMRec reference checkpoint {source}"}


def sasrec_item_embeddings(path):
    """item_emb.weight [n_item + 1, d] of a SASRec checkpoint (a state dict, or a list/tuple that
    holds one)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for candidate in obj if isinstance(obj, (list, tuple)) else [obj]:
        if isinstance(candidate, dict) and "item_emb.weight" in candidate:
            return candidate["item_emb.weight"].float().contiguous()
    raise SystemExit(f"import_reference: {path} holds no SASRec item_emb.weight")


def build_bank(tmp, modality, ids, rows, out):
    np.save(tmp / f"{modality}.npy", np.stack(rows).astype(np.float32))
    np.save(tmp / f"{modality}.ids.npy", np.array(ids, dtype=np.int64))
    illmrec("bank", "build", "--npy", tmp / f"{modality}.npy", "--ids", tmp / f"{modality}.ids.npy",
            "--modality", modality, "--out", out)


def import_checkpoint(checkpoint, data, out, base_gguf=DEFAULT_GGUF, embed_type="f16", sasrec=None):
    """Writes the bundle `out` and returns it. `sasrec` defaults to rec_cfg.recsys_model_path
    when that file exists."""
    checkpoint, data, out = Path(checkpoint), Path(data), Path(out)
    check_layout(checkpoint, data)
    config = json.loads((checkpoint / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)

    table = load_tensor(checkpoint / "llm_parameter" / "token_embed.pth")
    drop = i_vis_id(checkpoint / "llm")
    table = torch.cat([table[:drop], table[drop + 1:]])
    write_gguf(base_gguf, out / "model.gguf", table, embed_type,
               what=f"import_reference: the fine-tuned table without {I_VIS}")

    meta = json.loads((data / "meta_info.json").read_text(encoding="utf-8"))
    ids = sorted(int(k) for k in meta)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for i in ids:
                m = meta[str(i)]
                f.write(json.dumps({"id": i, "title": m.get("title") or "",
                                    "description": m.get("description") or None}) + "\n")
        banks = []
        for modality, folder in MODALITIES.items():
            have = [i for i in ids if (data / folder / f"{i}.pth").exists()]
            if have:
                build_bank(tmp, modality, have, [load_tensor(data / folder / f"{i}.pth").numpy() for i in have],
                           tmp / f"{modality}.bank")
                banks += ["--bank", f"{modality}={tmp / f'{modality}.bank'}"]
        sasrec = sasrec or config.get("rec_cfg", {}).get("recsys_model_path")
        if sasrec and Path(sasrec).exists():
            emb = sasrec_item_embeddings(sasrec).numpy()
            build_bank(tmp, "cf", ids, [emb[i + 1] for i in ids], tmp / "cf.bank")
            banks += ["--bank", f"cf={tmp / 'cf.bank'}"]
        weights = checkpoint / "rec_module" / "model.safetensors"
        (tmp / "heads.json").write_text(json.dumps(heads_config(weights, checkpoint), indent=2))
        illmrec("bundle", "create", "--out", out, "--heads", weights, "--heads-config", tmp / "heads.json",
                "--items", tmp / "items.jsonl", "--model", out / "model.gguf", *banks)
    return out


def check_tokens(checkpoint, bundle, history):
    """The bundle's prompt tokens (`illmrec prompt --json`) against the checkpoint's tokenizer
    run on the whole prompt with <i_vis> placeholders, as the reference does. Returns the two id
    lists (None at injected positions)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(checkpoint) / "llm")
    shown = json.loads(illmrec("prompt", "--bundle", bundle, "--history", ",".join(map(str, history)),
                               "--max-history", len(history), "--json"))
    text = shown["text"].replace("<v>", I_VIS).removesuffix("<REC>")
    ref = tok(text)["input_ids"]
    vis = tok.convert_tokens_to_ids(I_VIS)
    ref = [None if t == vis else t for t in ref] + [None]
    return ref, shown["tokens"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="folder with meta_info.json and the feature folders")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base-gguf", type=Path, default=DEFAULT_GGUF,
                    help="GGUF of the base LLM (same vocabulary and hidden size as the checkpoint)")
    ap.add_argument("--embed-type", choices=["f16", "f32"], default="f16")
    ap.add_argument("--sasrec", type=Path, help="SASRec checkpoint (default: rec_cfg.recsys_model_path)")
    args = ap.parse_args()
    out = import_checkpoint(args.checkpoint, args.data, args.out, args.base_gguf, args.embed_type, args.sasrec)
    history = [int(k) for k in json.loads((args.data / "meta_info.json").read_text())][:3]
    ref, ours = check_tokens(args.checkpoint, out, history)
    if ref != ours:
        raise SystemExit(f"import_reference: prompt tokens differ from the checkpoint tokenizer's:\n{ref}\n{ours}")
    print(f"wrote {out}; prompt tokens match the checkpoint tokenizer on items {history}")


if __name__ == "__main__":
    main()
