"""The runtime on the F32 model against the PyTorch float32 reference (illmrec_tools.parity), on a
prepared ml-latest-small slice with seeded random features and heads: identical prompt tokens,
and scores within the measured tolerance (see data/parity/results.md and tools/README.md)."""
import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import MLSMALL

from illmrec_tools import parity
from illmrec_tools.prepare import prepare

# With llama.cpp's flash attention off and an f32 KV cache (data/parity2/results.md, 21 histories):
# max rel 1.4e-3, median 4.7e-4, Spearman >= 0.99998. What remained was llama.cpp's f16 GELU table
# and summation order. The runtime's defaults (flash attention on, f16 KV cache; K and V are f16 in
# the flash-attention graph whatever the cache) are held to the same bound. Where illmrec's AVX-512
# kernels run (`illmrec info`: src/engine/kernels.cpp computes GEGLU's GELU exactly, attention in f32),
# the 3 histories here measured rel 1.4-2.1e-4 with those flags and 3.2-5.3e-4 with the defaults
# (ggml's kernels: 3.4-9.0e-4 and 0.8-1.2e-3), so the bound is 1e-3 there.
EXACT_FLAGS = ("--flash-attn", "off", "--kv-f32")
MIN_SPEARMAN = 0.9999


@pytest.fixture(scope="module")
def max_rel():
    """3e-3 on ggml's kernels, 1e-3 where illmrec's AVX-512 attention and GEGLU run (`illmrec
    info`'s `kernels:` line starts with `on`)."""
    info = subprocess.run([str(parity.BIN), "info"], check=True, capture_output=True, text=True).stdout
    kernels = [line for line in info.splitlines() if line.startswith("kernels: ")]
    assert len(kernels) == 1, info
    return 1e-3 if kernels[0].startswith("kernels: on") else 3e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("parity")
    data = root / "ml-latest-small"
    prepare("ml-latest-small", MLSMALL, data, max_users=60)
    users, long_user = parity.pick_users(data, 2, 40)
    cases = [(u, 10) for u in users] + [(long_user, 40)]
    ids = sorted({i for (_, h, c), _ in cases for i in h + c})
    rng = np.random.default_rng(0)
    with_image = np.array([i for i in ids if rng.random() < 0.7])  # some items have no image
    text = rng.normal(size=(len(ids), 384)).astype(np.float32)
    (data / "features").mkdir()
    np.save(data / "features" / "image.npy", rng.random((len(with_image), 1024), dtype=np.float32) * 6)
    np.save(data / "features" / "image.ids.npy", with_image)
    np.save(data / "features" / "text.npy", text / np.linalg.norm(text, axis=1, keepdims=True))
    np.save(data / "features" / "text.ids.npy", np.array(ids))
    bundle = parity.build_bundle(data, root / "bundle", item_ids=ids)
    model, tok = parity.load_llm(parity.model_file("f32"))
    return bundle, model, tok, cases


def test_prompt_tokens_match_runtime(setup):
    bundle, model, tok, cases = setup
    for (user, history, _), max_history in cases:
        ref = parity.Reference(bundle, model, tok, max_history)
        tokens = ref.tokens(history)
        assert tokens == parity.runtime_prompt(bundle, history, max_history)["tokens"], user
    assert len(tokens) > 512  # the last case reaches past Gemma's sliding window


@pytest.mark.parametrize("flags", [EXACT_FLAGS, ()], ids=["fa-off-kv-f32", "defaults"])
def test_f32_scores_match_reference(setup, max_rel, flags):
    bundle, model, tok, cases = setup
    for (user, history, candidates), max_history in cases:
        ref = parity.Reference(bundle, model, tok, max_history).scores(history, candidates)
        run, used = parity.runtime_scores(bundle, [(user, history, candidates)], parity.model_file("f32"),
                                          flags=flags, max_history=max_history)
        assert used[user] == len(history[-max_history:])
        m = parity.compare(ref, run[user])
        print(user, json.dumps(m))
        assert m["rel"] <= max_rel and m["spearman"] >= MIN_SPEARMAN and m["top10_overlap"] >= 0.9, (user, m)


def test_torch_bench_runs(setup, tmp_path):
    """The PyTorch peer benchmark (illmrec_tools.torch_bench) end to end on one user: the runtime's
    rows and both PyTorch rows come back. No timing is asserted."""
    from illmrec_tools import torch_bench
    bundle = setup[0]
    out = tmp_path / "bench.json"
    torch_bench.main(["--bundle", str(bundle), "--dataset", str(bundle.parent / "ml-latest-small"), "--users", "1",
                      "--warmup", "0", "--threads", "1", "--gguf", str(parity.model_file("f32")), "--json", str(out),
                      "--runtime-args=--kv-f32"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["engine"] for r in rows][-2:] == ["PyTorch float32", "PyTorch bf16 autocast"]
    assert any(r["engine"].startswith("illmrec") for r in rows)
    assert any(r["engine"].endswith(", --kv-f32)") for r in rows), [r["engine"] for r in rows]
    assert all(r["mean_ms"] > 0 and r["users"] == 1 for r in rows)


def test_torch_bench_sweep_runs(setup, tmp_path):
    """The per-length PyTorch peer (torch_bench --sweep) end to end: one user at lengths 1 and 2,
    the runtime's image and engine-only rows and both PyTorch rows per length. No timing asserted."""
    from illmrec_tools import torch_bench
    bundle = setup[0]
    out = tmp_path / "sweep.json"
    torch_bench.main(["--bundle", str(bundle), "--dataset", str(bundle.parent / "ml-latest-small"), "--users", "1",
                      "--warmup", "0", "--threads", "1", "--gguf", str(parity.model_file("f32")), "--json", str(out),
                      "--sweep", "1,2", "--fig3-out", str(tmp_path / "fig3")])
    assert (tmp_path / "fig3" / "fig3.png").stat().st_size > 0  # the runtime's own Fig. 3 files are kept
    rows = json.loads(out.read_text())["rows"]
    assert [r["length"] for r in rows] == [1, 2]
    for r in rows:
        assert r["users"] == 1
        assert all(r[k] > 0 for k in ("runtime_ms", "engine_ms", "torch_f32_ms", "torch_bf16_ms"))
    assert torch_bench.pick([[1, 2, 3], [4], [5, 6]], 2, 5, {2, 3, 5, 6}) == [[2, 3], [5, 6]]
