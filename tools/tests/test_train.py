"""The trainer's prompt matches the runtime token for token; a few training steps lower the loss;
exported heads load in the runtime. Runs on a slice of the real ml-latest-small prepared here, with
seeded random features; needs target/release/illmrec (built by cargo test) and the default model."""
import json

import numpy as np
import pytest
import torch

from illmrec_tools import train as tr
from illmrec_tools.export import build_bundle
from illmrec_tools.parity import illmrec
from conftest import tiny_dataset

from illmrec_tools.llm import description, load_llm, segments, tokenize



@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(2)
    return load_llm()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The first 40 users of the real ml-latest-small (6 of them for training), with seeded random
    features: image rows only for items that have a poster, text and CF rows for all."""
    return tiny_dataset(tmp_path_factory.mktemp("tiny"), 40, train_users=6)


def test_prompt_matches_runtime(llm, tiny, tmp_path):
    _, tok = llm
    data = tr.Data(tiny)
    cfg = {"format": "illmrec-heads", "version": 1, "llm_dim": 640, "proj_dim": 512, "hidden_dim": 1024,
           "prompt": "image", "image_dim": 1024, "item_dims": {"img": 1024, "text": 384}, "trained": False}
    (tmp_path / "heads.json").write_text(json.dumps(cfg))
    illmrec("init-heads", "--config", tmp_path / "heads.json", "--out", tmp_path / "heads.safetensors")
    banks = []
    for m, f in (("img", "image"), ("text", "text")):
        illmrec("bank", "build", "--npy", tiny / "features" / f"{f}.npy", "--ids",
                tiny / "features" / f"{f}.ids.npy", "--modality", m, "--out", tmp_path / f"{m}.bank")
        banks += ["--bank", f"{m}={tmp_path / f'{m}.bank'}"]
    illmrec("bundle", "create", "--out", tmp_path / "b", "--heads", tmp_path / "heads.safetensors",
            "--heads-config", tmp_path / "heads.json", "--items", tiny / "items.jsonl", *banks)
    no_image = [i for i in data.ids[:60].tolist() if not data.has_image(i)]
    with_image = [i for i in data.ids[:60].tolist() if data.has_image(i)]
    histories = [with_image[:3], no_image[:2] + with_image[3:5], [no_image[2]], with_image[5:15],
                 json.loads((tiny / "valid.jsonl").read_text().splitlines()[3])["history"][-10:]]
    for h in histories:
        out = json.loads(illmrec("prompt", "--bundle", tmp_path / "b", "--history", ",".join(map(str, h)),
                                 "--json", "--threads", 2))
        assert out["history_used"] == h and not out["dropped"]
        ids, markers = tokenize(tok, segments(tok, data.items, h, "image", data.has_image))
        assert out["tokens"] == ids, (h, out["text"])
        assert [m[1] for m in markers if m and m[0] == "img"] == [i for i in h if data.has_image(i)]


def test_states_do_not_depend_on_the_batch_or_the_prefix_cache(llm, tiny):
    model, tok = llm
    data = tr.Data(tiny)
    torch.manual_seed(0)
    rec = tr.RecModule(640, {m: data.feats[m].shape[1] for m in tr.MODALITIES}, 1024)
    hist = [s["history"] for s in tr.epoch_samples(data, 0, 0, ["title", "genres"])[:3]]
    assert len({len(h) for h in hist}) > 1  # prompts of different lengths in one batch
    with torch.no_grad():
        cached = tr.Trainer(model, tok, data, rec, "image")
        batch = cached.rec_states(hist)
        alone = torch.cat([cached.rec_states([h]) for h in hist])
        whole = tr.Trainer(model, tok, data, rec, "image", cache_prefix=False).rec_states(hist)
    scale = batch.abs().max()
    assert (batch - alone).abs().max() <= 1e-4 * scale
    assert (batch - whole).abs().max() <= 1e-3 * scale


def test_training_lowers_loss_and_exports(llm, tiny, tmp_path):
    model, tok = llm
    data = tr.Data(tiny)
    torch.manual_seed(0)
    rec = tr.RecModule(640, {m: data.feats[m].shape[1] for m in tr.MODALITIES}, 1024)
    trainer = tr.Trainer(model, tok, data, rec, "image")
    batch = tr.epoch_samples(data, 0, 0, ["title", "genres"])[:2]
    opt = torch.optim.AdamW(rec.parameters(), lr=1e-4)
    losses = []
    for _ in range(4):  # the same batch each step: the joint loss must go down
        loss = trainer.ire_loss(batch) + trainer.ila_loss(batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses

    out = tmp_path / "run"
    tr.main(["--dataset", str(tiny), "--out", str(out), "--max-samples", "4", "--batch-size", "2",
             "--dtype", "f16"])
    cfg = json.loads((out / "heads.json").read_text())
    assert cfg["trained"] and cfg["prompt"] == "image" and cfg["item_dims"] == {"img": 1024, "cf": 50, "text": 384}
    printed = build_bundle(out, tiny, tmp_path / "bundle")
    assert printed.strip()


def test_softmax_loss_falls_and_validation_reports(llm, tiny, tmp_path):
    model, tok = llm
    data = tr.Data(tiny)
    torch.manual_seed(0)
    rec = tr.RecModule(640, {m: data.feats[m].shape[1] for m in tr.MODALITIES}, 1024)
    trainer = tr.Trainer(model, tok, data, rec, "image")
    batch = tr.epoch_samples(data, 0, 0, ["title", "genres"])[:2]
    opt = torch.optim.AdamW(rec.parameters(), lr=1e-4)
    losses = []
    for _ in range(4):  # the target against the whole catalog: must go down on a repeated batch
        loss = trainer.ire_loss(batch, "softmax")
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses
    # the training targets' combined scores, now above the catalog's mean
    h = trainer.rec_states([s["history"] for s in batch])
    comb = trainer.catalog_scores(h)[1]
    index = {int(i): k for k, i in enumerate(data.ids)}
    for row, s in zip(comb, batch):
        assert row[index[s["target"]]] > row.mean()

    out = tmp_path / "run"
    tr.main(["--dataset", str(tiny), "--out", str(out), "--max-samples", "2", "--batch-size", "2",
             "--ila-weight", "0", "--ire-loss", "softmax", "--valid-every", "2", "--valid-users", "6"])
    rows = [json.loads(line) for line in (out / "valid.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in rows] == [0, 2]  # before training, then at the end
    for r in rows:
        assert r["users"] == 6 and 0 <= r["ndcg@5"] <= r["hr@5"] <= 1 and r["probe_r2_img"] <= 1


def test_token_embedding_training_exports_a_gguf(llm, tiny, tmp_path):
    """--train-token-embeddings: only the rows of tokens seen in the prompts move, the new table is
    written into a copy of the GGUF with the base LM head kept, and the runtime runs on it."""
    import gguf

    from illmrec_tools.gguf_table import read_token_table
    from illmrec_tools.llm import DEFAULT_GGUF, encode

    fresh, _ = load_llm()
    table = tr.make_token_table_trainable(fresh)
    assert table.requires_grad and not fresh.lm_head.weight.requires_grad
    assert fresh.lm_head.weight.data_ptr() != table.data_ptr()  # untied: the LM head stays the base
    del fresh, table

    out = tmp_path / "run"
    tr.main(["--dataset", str(tiny), "--out", str(out), "--max-samples", "2", "--batch-size", "2",
             "--lr", "1e-2", "--dtype", "f16", "--train-token-embeddings"])
    assert "token embeddings trained" in json.loads((out / "heads.json").read_text())["provenance"]
    base = read_token_table(DEFAULT_GGUF).astype(np.float16)
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    new = np.asarray(tensors["token_embd.weight"].data).reshape(base.shape)
    moved = np.flatnonzero((new != base).any(axis=1))
    _, tok = llm
    bos = encode(tok, "x", bos=True)[0]
    task_tokens = set(encode(tok, tr.PROMPT["task"])[:-1])
    assert bos in moved and task_tokens <= set(moved.tolist())  # the prefix is trained too (no cache)
    assert len(moved) < 2000  # rows that no prompt used stay as they were (weight decay 0)
    base_embd = next(t for t in gguf.GGUFReader(DEFAULT_GGUF).tensors if t.name == "token_embd.weight")
    assert np.array_equal(tensors["output.weight"].data, base_embd.data)  # LM head frozen
    printed = build_bundle(out, tiny, tmp_path / "bundle")
    assert printed.strip()
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["path"].endswith("model.gguf")


def test_item_heads_start_frozen_and_standardisation_folds_into_export(llm, tiny, tmp_path):
    from safetensors.torch import load_file
    data = tr.Data(tiny)
    dims = {m: data.feats[m].shape[1] for m in tr.MODALITIES}
    torch.manual_seed(1)
    given = tr.RecModule(640, dims, 1024)
    item_heads = {k: v for k, v in given.state_dict().items() if k.startswith("f_i_")}
    torch.save(item_heads, tmp_path / "heads.pt")
    out = tmp_path / "run"
    tr.main(["--dataset", str(tiny), "--out", str(out), "--max-samples", "4", "--batch-size", "2",
             "--ila-weight", "0", "--ire-loss", "softmax", "--lr", "1e-3", "--lr-inputs", "1e-2",
             "--item-heads", str(tmp_path / "heads.pt"), "--freeze-item-heads", "--standardize", "4"])
    exported = load_file(out / "heads.safetensors")
    assert "state_mu" not in exported and "state_sd" not in exported
    for k, v in item_heads.items():  # frozen: exactly the given item heads
        assert torch.equal(exported[k], v), k
    # the run's user heads with their standardisation == the exported (folded) user heads
    st = torch.load(out / "ckpt.pt", weights_only=False)["rec"]
    trained = tr.RecModule(640, dims, 1024)
    trained.set_standardization(st["state_mu"], st["state_sd"])
    trained.load_state_dict(st)
    assert not torch.equal(st["state_sd"], torch.ones_like(st["state_sd"]))
    folded = tr.RecModule(640, dims, 1024)
    folded.load_state_dict(exported)
    x = torch.randn(3, 640) * 5
    with torch.no_grad():
        for m in tr.MODALITIES:
            a, b = trained.head("u", m, x), folded.head("u", m, x)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max()), m
    # --export-only writes the checkpoint's heads again without a training step
    ckpt_before = (out / "ckpt.pt").read_bytes()
    (out / "heads.safetensors").unlink()
    tr.main(["--dataset", str(tiny), "--out", str(out), "--max-samples", "4", "--batch-size", "2",
             "--ila-weight", "0", "--ire-loss", "softmax", "--export-only"])
    assert (out / "ckpt.pt").read_bytes() == ckpt_before
    again = load_file(out / "heads.safetensors")
    assert all(torch.equal(again[k], v) for k, v in exported.items())
    with pytest.raises(SystemExit, match="needs a checkpoint"):
        tr.main(["--dataset", str(tiny), "--out", str(tmp_path / "none"), "--export-only"])
    # a heads.pt without item heads of these sizes is refused with a message
    torch.save({"f_u_img.mlp.0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="no f_i_"):
        tr.main(["--dataset", str(tiny), "--out", str(tmp_path / "run2"), "--max-samples", "2",
                 "--batch-size", "2", "--ila-weight", "0", "--item-heads", str(tmp_path / "bad.pt")])


def test_no_llm_baseline_on_the_same_samples(tiny, tmp_path):
    out = tmp_path / "nollm"
    with pytest.raises(SystemExit, match="runs no LLM"):
        tr.main(["--dataset", str(tiny), "--out", str(out), "--user-input", "features", "--max-samples", "2"])
    tr.main(["--dataset", str(tiny), "--out", str(out), "--user-input", "features", "--ila-weight", "0",
             "--ire-loss", "softmax", "--epochs", "2", "--max-samples", "8", "--batch-size", "2", "--lr", "1e-3",
             "--standardize", "4"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 8
    for split in ("valid", "test"):
        cases = [json.loads(line) for line in (tiny / f"{split}.jsonl").read_text().splitlines()]
        ranks = [json.loads(line) for line in (out / f"{split}-ranks.jsonl").read_text().splitlines()]
        assert [r["user"] for r in ranks] == [c["user"] for c in cases]
        assert all(0 <= r["rank"] <= 100 for r in ranks)
        assert summary[split]["users"] == len(cases)
        assert summary[split]["hr@5"] == pytest.approx(sum(r["rank"] < 5 for r in ranks) / len(ranks))
    assert not (out / "heads.safetensors").exists()  # nothing the runtime could serve


def test_no_llm_baseline_reads_only_the_chosen_modalities(tiny, tmp_path):
    out = tmp_path / "nollm-img-text"
    with pytest.raises(SystemExit, match="--user-features takes modalities"):
        tr.main(["--dataset", str(tiny), "--out", str(out), "--user-input", "features", "--ila-weight", "0",
                 "--user-features", "img,audio", "--max-samples", "2"])
    tr.main(["--dataset", str(tiny), "--out", str(out), "--user-input", "features", "--ila-weight", "0",
             "--user-features", "img,text", "--max-samples", "4", "--batch-size", "2"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    data = tr.Data(tiny)
    dims = {m: data.feats[m].shape[1] for m in tr.MODALITIES}
    # the user heads' input is the img and text means only: no collaborative features
    assert ckpt["rec"]["f_u_img.mlp.0.weight"].shape[1] == dims["img"] + dims["text"]
    assert json.loads((out / "summary.json").read_text())["samples"] == 4


def test_adaptor_fits_the_description_embeddings(llm, tiny):
    model, tok = llm
    data = tr.Data(tiny)
    torch.manual_seed(0)
    rec = tr.RecModule(640, {m: data.feats[m].shape[1] for m in tr.MODALITIES}, 1024)
    trainer = tr.Trainer(model, tok, data, rec, "image")
    before = rec.adaptor.interface.weight.detach().clone()
    r0, _ = tr.fit_adaptor_to_text(trainer, 0)
    r2, n = tr.fit_adaptor_to_text(trainer, 200)
    posters = [i for i in data.ids.tolist() if data.has_image(i)]
    assert n == sum(description(tok, data.items[i]) is not None for i in posters)  # the ones with a text
    # random image features here (the real ones reach more): the fit must still move toward the texts
    assert r0 < 0 < r2, (r0, r2)
    assert not torch.equal(before, rec.adaptor.interface.weight)
    assert all(p.grad is None for n_, p in rec.named_parameters() if not n_.startswith("adaptor."))
