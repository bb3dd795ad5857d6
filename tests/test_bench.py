"""bench.py train and decode at tiny shapes: the training step really trains with the recipes' settings, decoding
rows are lossless (speculative and prompt-lookup outputs equal plain greedy), the CUDA geometry is Qwen3-4B's."""
import json
import math

import pytest
import torch

import bench
from model_dspark import DSpark
from target import default_layer_ids, load_target

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_step_updates_and_clears_gradients():
    """One train_step moves the trainable weights, leaves the frozen head alone and no gradient behind."""
    t = load_target("tiny-qwen3")
    model = bench.build_drafter("dspark", t, bench.recipe("dspark", "cpu"), "cpu").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    fc, head = model.fc.weight.detach().clone(), model.lm_head.weight.detach().clone()
    loss = bench.train_step(model, opt, bench.synthetic_batch(t, 2, 40, "cpu"), 0, torch.autocast("cpu", enabled=False))
    assert math.isfinite(loss) and loss > 0
    assert not torch.equal(model.fc.weight, fc) and torch.equal(model.lm_head.weight, head)
    assert all(p.grad is None for p in model.parameters())


def test_bench_train_cpu_tiny(tmp_path):
    """`bench.py train` runs one timed step per drafter with the CPU configs' settings (smollm2 recipe on the tiny
    target) and the online target forward; times positive, losses finite, JSON written."""
    out = tmp_path / "train.json"
    rec = bench.main(["train", "--device=cpu", "--target=tiny-qwen3", "--seq_len=48", "--batch=2", "--steps=1",
                      "--online", f"--out={out}"])
    rows = json.load(open(out))["results"]["rows"]
    assert rows == rec["results"]["rows"] and [r["drafter"] for r in rows] == ["dspark", "dflash", "eagle3"]
    assert rows[0]["recipe"]["num_anchors"] == 16 and rows[0]["recipe"]["markov_rank"] == 64  # dspark_smollm2.py
    assert rows[2]["recipe"]["ttt_length"] == 7 and rows[2]["recipe"]["num_draft_layers"] == 1  # eagle3_smollm2.py
    for r in rows:
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 48 / r["step_s"])
        assert r["target_forward_s"] > 0 and r["online_step_s"] > r["step_s"]
        assert all(math.isfinite(x) for x in r["losses"]) and r["peak_bytes"] >= 0 and r["params"] > 0


def test_bench_decode_lossless(tmp_path):
    """`bench.py decode` with a random tiny DSpark: per task and overall, plain, prompt lookup and two chain lengths;
    every speculative and prompt-lookup output equals plain greedy; the step-cost curve covers t(k+1)."""
    t = load_target("tiny-qwen3")
    torch.manual_seed(0)
    DSpark.from_target(t, block_size=4, num_draft_layers=1, markov_rank=16).save_pretrained(str(tmp_path / "d"))
    with open(tmp_path / "gsm8k.jsonl", "w") as f:
        for q in ("What is 12 plus 30? Answer: 42 42 42", "Count: one two one two one two"):
            f.write(json.dumps({"turns": [q]}) + "\n")
    rec = bench.main(["decode", "--device=cpu", "--target=tiny-qwen3", f"--checkpoint={tmp_path / 'd'}", "--tasks", "gsm8k",
                      f"--data_dir={tmp_path}", "--num_prompts=2", "--max_new_tokens=16", "--num_drafts", "0", "2",
                      "--repeats=1", f"--out={tmp_path / 'decode.json'}"])["results"]
    assert rec["block_size"] == 4 and set(rec["step_ms"]) == {1, 2, 3, 4, 5, 8, 16}
    assert all(ms > 0 for ms in rec["step_ms"].values())
    for rows in (rec["tasks"]["gsm8k"], rec["overall"]):
        assert [r["method"] for r in rows] == ["plain", "lookup", "chain 4", "chain 2"]
        assert all(r["same_as_plain"] == 1.0 and r["prompts"] == 2 and r["tokens_per_s"] > 0 for r in rows)
        assert rows[0]["vs_plain"] == 1.0 and all(r["tau"] >= 1 and r["model_speedup"] > 0 for r in rows[2:])
    assert json.load(open(tmp_path / "decode.json"))["results"]["overall"][2]["tau"] == rec["overall"][2]["tau"]


def test_cuda_geometry_on_meta():
    """The GPU benchmark's target and drafters, built on the meta device (no memory): Qwen3-4B's shapes and
    DeepSpec's recipe (5 draft layers, rank 256, 512 anchors; Eagle3 1 layer, 7 TTT steps)."""
    t = bench.random_target("meta")
    c = t.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (36, 2560, 32, 8, 128, 9728, 151936)
    assert t.layer_ids == default_layer_ids(36) == [1, 9, 17, 25, 33] and t.mask_token_id == 151669
    layer = t.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (4096, 2560) and layer.self_attn.k_proj.weight.shape == (1024, 2560)
    assert layer.mlp.gate_proj.weight.shape == (9728, 2560) and t.embed_weight.shape == (151936, 2560)
    assert 4.0e9 < sum(p.numel() for p in t.model.parameters()) < 4.1e9  # Qwen3-4B: 4.02B with tied embeddings
    d = bench.build_drafter("dspark", t, bench.recipe("dspark", "cuda"), "meta")
    assert d.fc.weight.shape == (2560, 5 * 2560) and len(d.layers) == 5 and d.block_size == 7
    assert d.num_anchors == 512 and d.markov_head.markov_w2.weight.shape == (151936, 256) and d.fc.weight.is_meta
    e = bench.build_drafter("eagle3", t, bench.recipe("eagle3", "cuda"), "meta")
    assert len(e.layers) == 1 and e.ttt_length == 7 and e.fc.weight.shape == (2560, 5 * 2560)
    b = bench.synthetic_batch(t, 1, 16, "meta")
    assert b["taps"].shape == (1, 16, 5 * 2560) and b["last_hidden"].shape == (1, 16, 2560)
    assert bench.recipe("dflash", "cuda")["max_len"] == 4096 and bench.recipe("dspark", "cpu")["max_len"] == 512
    g = bench.random_target("meta", geometry="gemma4_12b")  # --geometry=gemma4_12b: DeepSpec's Gemma DSpark
    assert g.layer_ids == [5, 17, 29, 41, 46] and g.mask_token_id == 4
    d = bench.build_drafter("dspark", g, bench.recipe("dspark", "cuda", "gemma4_12b"), "meta")
    assert type(d).__name__ == "Gemma4DSpark" and 3.42e9 < sum(p.numel() for p in d.parameters()) < 3.44e9
