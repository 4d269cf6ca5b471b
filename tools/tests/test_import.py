"""End-to-end import of a synthetic checkpoint in the I-LLMRec reference layout (reference notes
section 4.6): random bf16 weights, tiny heads, the default model's vocabulary + <i_vis>."""
import json
import subprocess

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from illmrec_tools.import_reference import check_tokens, import_checkpoint
from illmrec_tools.parity import BIN, DEFAULT_GGUF, read_bank

LLM_DIM, VOCAB = 640, 262144  # the default model's
HIDDEN, PROJ, ADAPTOR = 32, 16, 16
ITEM_DIMS = {"img": 24, "cf": 8, "text": 12}
TITLES = ["Red Chair", "Blue Lamp", "Oak Table", "", "Wool Rug", "Desk Fan"]
NO_IMAGE = 4


def rec_module():
    """rec_module/model.safetensors tensors, bf16, with the reference key names."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.05).bfloat16()
    t = {}

    def linear(name, n_in, n_out):
        t[f"{name}.weight"], t[f"{name}.bias"] = rnd(n_out, n_in), rnd(n_out)

    def norm(name, n):
        t[f"{name}.weight"], t[f"{name}.bias"] = torch.ones(n).bfloat16(), torch.zeros(n).bfloat16()

    linear("adaptor.proj_v2c", ITEM_DIMS["img"], ADAPTOR)
    norm("adaptor.layernorm", ADAPTOR)
    linear("adaptor.interface", ADAPTOR, LLM_DIM)
    for m, dim in ITEM_DIMS.items():
        for side, n_in in (("u", LLM_DIM), ("i", dim)):
            linear(f"f_{side}_{m}.mlp.0", n_in, HIDDEN)
            norm(f"f_{side}_{m}.mlp.1", HIDDEN)
            linear(f"f_{side}_{m}.mlp.3", HIDDEN, PROJ)
    t["rec_token"] = rnd(1, LLM_DIM)
    return t


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("reference")
    ckpt, data = root / "checkpoint-12000", root / "Art"
    for d in (ckpt / "llm", ckpt / "llm_parameter", ckpt / "rec_module", data / "img_features", data / "txt_features"):
        d.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(DEFAULT_GGUF.parent, gguf_file=DEFAULT_GGUF.name)
    tok.add_tokens(["<i_vis>"])
    tok.save_pretrained(ckpt / "llm")
    assert tok.convert_tokens_to_ids("<i_vis>") == VOCAB

    table = (torch.randn(VOCAB + 1, LLM_DIM, generator=torch.Generator().manual_seed(1)) * 0.03).bfloat16()
    torch.save(table, ckpt / "llm_parameter" / "token_embed.pth")
    save_file(rec_module(), ckpt / "rec_module" / "model.safetensors")
    (ckpt / "rec_module" / "config.json").write_text(json.dumps(
        {"model_type": "projector", "visual_encoder": "siglip", "llm_dim": LLM_DIM, "proj_dim": PROJ}))
    sasrec = root / "SASRec_Art.pth"
    torch.save({"item_emb.weight": torch.randn(len(TITLES) + 1, ITEM_DIMS["cf"])}, sasrec)
    (ckpt / "config.json").write_text(json.dumps(
        {"model_type": "illmrec_llama", "architectures": ["ILLMRecLlamaModel"], "model_dtype": "torch.bfloat16",
         "rec_cfg": {"llm_dim": LLM_DIM, "proj_dim": PROJ, "n_item": len(TITLES), "recsys_model_path": str(sasrec)},
         "data_cfg": {"data_path": str(data)}}))

    meta = {str(i): {"title": t, "description": f"About item {i}.", "brand": "", "category": "Arts"}
            for i, t in enumerate(TITLES)}
    (data / "meta_info.json").write_text(json.dumps(meta))
    # Each feature file is a row view of a batch, so torch.save keeps the whole batch's storage.
    img = torch.randn(len(TITLES), ITEM_DIMS["img"]).bfloat16()
    txt = torch.randn(len(TITLES), ITEM_DIMS["text"]).bfloat16()
    for i in range(len(TITLES)):
        if i != NO_IMAGE:
            torch.save(img[i], data / "img_features" / f"{i}.pth")
        torch.save(txt[i], data / "txt_features" / f"{i}.pth")

    bundle = import_checkpoint(ckpt, data, root / "bundle", embed_type="f16")
    return ckpt, bundle, table, img


def test_gguf_holds_the_fine_tuned_table(imported):
    _, bundle, table, _ = imported
    base, out = gguf.GGUFReader(DEFAULT_GGUF), gguf.GGUFReader(bundle / "model.gguf")
    tensors = {t.name: t for t in out.tensors}
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type == gguf.GGMLQuantizationType.F16
    expected = table[:VOCAB].float().numpy().astype(np.float16)  # <i_vis> (the last row) dropped
    assert np.array_equal(np.asarray(embd.data).reshape(VOCAB, LLM_DIM), expected)
    for t in base.tensors:
        if t.name != "token_embd.weight":
            assert tensors[t.name].tensor_type == t.tensor_type and np.array_equal(tensors[t.name].data, t.data)
    # The LM head stays the base model's (the reference freezes lm_head): the base table, untied.
    base_embd = next(t for t in base.tensors if t.name == "token_embd.weight")
    head = tensors["output.weight"]
    assert head.tensor_type == base_embd.tensor_type and np.array_equal(head.data, base_embd.data)
    for name, field in base.fields.items():
        if not name.startswith("GGUF."):
            assert out.fields[name].contents() == field.contents(), name


def test_heads_items_and_banks(imported):
    _, bundle, _, img = imported
    cfg = json.loads((bundle / "heads.json").read_text())
    assert (cfg["llm_dim"], cfg["proj_dim"], cfg["hidden_dim"], cfg["adaptor_dim"]) == (LLM_DIM, PROJ, HIDDEN, ADAPTOR)
    assert cfg["image_dim"] == ITEM_DIMS["img"] and cfg["item_dims"] == ITEM_DIMS and cfg["trained"]
    items = [json.loads(line) for line in (bundle / "items.jsonl").read_text().splitlines()]
    assert [it["title"] for it in items] == TITLES
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(manifest["banks"]) == ["cf", "img", "text"] and manifest["model"]["path"] == "model.gguf"
    rows = read_bank(bundle / "img.bank")
    assert sorted(rows) == [i for i in range(len(TITLES)) if i != NO_IMAGE]
    assert all(np.array_equal(rows[i], img[i].float().numpy()) for i in rows)


def test_recommend_runs_and_tokens_match(imported):
    ckpt, bundle, _, _ = imported
    out = subprocess.run([str(BIN), "recommend", "--bundle", str(bundle), "--history", "0,3,4", "--candidates",
                          ",".join(map(str, range(len(TITLES)))), "--include-seen", "--top-k", str(len(TITLES)),
                          "--threads", "2", "--json"], check=True, capture_output=True, text=True).stdout
    scores = [it["score"] for it in json.loads(out)["items"]]
    assert len(scores) == len(TITLES) and np.isfinite(scores).all()
    ref, ours = check_tokens(ckpt, bundle, [0, 1, 3])
    assert ref == ours and ours.count(None) == 4  # three visual tokens and [REC]


def test_a_checkpoint_without_tokenizer_files_is_one_line(tmp_path):
    """An llm/ folder without tokenizer files ends in one error line, not a traceback."""
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    for d in (ckpt / "llm", ckpt / "llm_parameter", ckpt / "rec_module", data):
        d.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "llm_parameter" / "token_embed.pth").write_bytes(b"x")
    (ckpt / "rec_module" / "model.safetensors").write_bytes(b"x")
    (data / "meta_info.json").write_text("{}")
    import sys
    from pathlib import Path
    r = subprocess.run([sys.executable, "-m", "illmrec_tools.import_reference", "--checkpoint", str(ckpt),
                        "--data", str(data), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "has no tokenizer files" in r.stderr, r.stderr
