"""model_dflash.py: shapes, no leakage, overfitting, checkpoints (ours and DeepSpec's layout), decoding.

Helpers without the test_ prefix (tiny_batch, greedy_batch, reference_checkpoint, functional_block,
block_logits) are shared with tests/test_dspark.py.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model_dflash import DFlash
from helpers import sharpened_target
from target import load_target

TINY = ["tiny-qwen3", "tiny-llama"]


def tiny_batch(target, lengths, prompt=6, seed=0):
    """Random right-padded batch of the training contract: answers start after `prompt` tokens."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, 256, (len(lengths), T), generator=g)
    lm = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        lm[b, prompt:n] = 1
        ids[b, n:] = 256  # padding
    taps, last = target.features(ids)
    return {"input_ids": ids, "loss_mask": lm, "taps": taps, "last_hidden": last,
            "sample_id": torch.arange(len(lengths)), "lengths": torch.tensor(lengths)}


def greedy_batch(target, n_seq=2, prompt=6, gen=30, seed=0):
    """Answers generated greedily by the target, so labels = the target's argmax (its peak when sharpened)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n_seq, prompt), generator=g)
    with torch.no_grad():
        for _ in range(gen):
            ids = torch.cat([ids, target.model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    lm = torch.zeros_like(ids)
    lm[:, prompt:] = 1
    taps, last = target.features(ids)
    return {"input_ids": ids, "loss_mask": lm, "taps": taps, "last_hidden": last,
            "sample_id": torch.arange(n_seq), "lengths": torch.full((n_seq,), ids.shape[1])}


def gens(sample_ids, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + int(s)) for s in sample_ids]


def sub(batch, rows):
    """The batch restricted to some rows (trimmed to their own longest length: a different composition)."""
    T = int(batch["lengths"][rows].max())
    return {k: (v[rows][:, :T] if v.dim() > 1 else v[rows]) for k, v in batch.items()}


def overfit(model, batch, steps, lr):
    """Adam on one batch -> (first, last) mean CE and mean L1 per supervised slot."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    hist = []
    for step in range(steps):
        loss, m = model(batch, gens(batch["sample_id"], seed=step))
        opt.zero_grad()
        (loss / m["weight"]).backward()
        opt.step()
        hist.append((float(m["ce"] / m["weight"]), float(m["l1"] / m["weight"])))
    return hist[0], hist[-1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tq():
    return sharpened_target("tiny-qwen3", 20.0)


# -----------------------------------------------------------------------------
# DeepSpec's checkpoint layout built by hand from REFERENCE.md s.5, and the equations written out

GEOM = dict(H=32, nh=4, nkv=2, hd=8, I=48, V=61, L=2, n_taps=3, theta=10000.0, eps=1e-6, K=5, mask=60)


def reference_checkpoint(path, markov_rank=0, head_type=None, confidence=False, seed=0):
    """A DeepSpec-style checkpoint from REFERENCE.md s.5 key list + config fields, random values -> state dict."""
    G, r = GEOM, markov_rank
    H, hd = G["H"], G["hd"]
    shapes = {"embed_tokens.weight": (G["V"], H), "fc.weight": (H, G["n_taps"] * H), "hidden_norm.weight": (H,),
              "norm.weight": (H,), "lm_head.weight": (G["V"], H)}
    for i in range(G["L"]):
        p = f"layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (G["nh"] * hd, H), p + "self_attn.k_proj.weight": (G["nkv"] * hd, H),
                       p + "self_attn.v_proj.weight": (G["nkv"] * hd, H), p + "self_attn.o_proj.weight": (H, G["nh"] * hd),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate_proj.weight": (G["I"], H), p + "mlp.up_proj.weight": (G["I"], H),
                       p + "mlp.down_proj.weight": (H, G["I"])})
    if r:
        shapes.update({"markov_head.markov_w1.weight": (G["V"], r), "markov_head.markov_w2.weight": (G["V"], r)})
        if head_type == "rnn":
            shapes.update({"markov_head.joint_proj.weight": (3 * r, 2 * r + H), "markov_head.joint_proj.bias": (3 * r,)})
        if head_type == "gated":
            shapes.update({"markov_head.gate_proj.weight": (r, H + r), "markov_head.gate_proj.bias": (r,)})
    if confidence:
        shapes.update({"confidence_head.proj.weight": (1, H + r), "confidence_head.proj.bias": (1,)})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():  # norms near 1, matrices scaled by 1/sqrt(fan_in)
        x = torch.randn(s, generator=g)
        sd[k] = (1 + 0.1 * x) if k.endswith("norm.weight") else x / (s[-1] ** 0.5 if len(s) > 1 else 4)
    config = {"architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "vocab_size": G["V"], "hidden_size": H,
              "intermediate_size": G["I"], "num_attention_heads": G["nh"], "num_key_value_heads": G["nkv"],
              "head_dim": hd, "hidden_act": "silu", "rms_norm_eps": G["eps"], "rope_theta": G["theta"],
              "rope_scaling": None, "max_position_embeddings": 4096, "attention_bias": False,
              "num_hidden_layers": G["L"], "num_target_layers": 8, "block_size": G["K"],
              "target_layer_ids": [1, 3, 5], "mask_token_id": G["mask"], "num_anchors": 16,
              "layer_types": ["full_attention"] * G["L"], "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "enable_confidence_head": confidence, "markov_rank": r}
    if confidence:
        config["confidence_head_with_markov"] = bool(r)
    if r:
        config["markov_head_type"] = head_type
    os.makedirs(path, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return {k: v.to(torch.bfloat16).float() for k, v in sd.items()}


def functional_block(sd, taps, ids, p):
    """Eqs. (2)-(3) on the raw state dict: block [anchor, mask..] at p, context taps[:p] -> h [K, H], U [K, V]."""
    G = GEOM
    K, hd, nh, nkv = G["K"], G["hd"], G["nh"], G["nkv"]

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + G["eps"])

    def rope(x, pos):  # x [N, heads, hd], rotate-half convention
        inv = 1.0 / G["theta"] ** (torch.arange(0, hd, 2).float() / hd)
        a = pos[:, None].float() * inv
        cos, sin = torch.cat([a, a], -1).cos()[:, None], torch.cat([a, a], -1).sin()[:, None]
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    ctx = rms(taps[:p] @ sd["fc.weight"].T, sd["hidden_norm.weight"])  # H_ctx, eq. (2)
    x = sd["embed_tokens.weight"][torch.tensor([int(ids[p])] + [G["mask"]] * (K - 1))]
    pos_kv = torch.cat([torch.arange(p), p + torch.arange(K)])
    for i in range(G["L"]):
        w = {k[len(f"layers.{i}."):]: v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        a = rms(x, w["input_layernorm.weight"])
        q = rope(rms((a @ w["self_attn.q_proj.weight"].T).view(K, nh, hd), w["self_attn.q_norm.weight"]), pos_kv[p:])
        src = torch.cat([ctx, a])  # eq. (3): keys/values of [context ; block]
        k = rope(rms((src @ w["self_attn.k_proj.weight"].T).view(-1, nkv, hd), w["self_attn.k_norm.weight"]), pos_kv)
        v = (src @ w["self_attn.v_proj.weight"].T).view(-1, nkv, hd)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5, -1)  # all keys visible: pos < p or block
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(K, -1) @ w["self_attn.o_proj.weight"].T
        m = rms(x, w["post_attention_layernorm.weight"])
        x = x + (F.silu(m @ w["mlp.gate_proj.weight"].T) * (m @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
    h = rms(x, sd["norm.weight"])
    return h, h @ sd["lm_head.weight"].T


def block_logits(model, input_ids, taps, seq, pos):
    """Teacher-forced draft logits [NB, K, Vd] of the blocks at anchors (seq, pos), through the training path:
    U_k = lm_head(h_k), plus for DSpark the bias B_k = W2 A_k of the ground-truth previous tokens (eq. 4)."""
    K, T = model.block_size, input_ids.shape[1]
    prev = input_ids[seq[:, None], (pos[:, None] + torch.arange(K, device=pos.device)).clamp(max=T - 1)]
    h = model.block_hidden(input_ids, taps, seq, pos)  # [NB, K, H]
    U = h @ model.lm_head.weight.T
    if getattr(model, "markov_head", None) is None:
        return U
    return U + model.markov_head.markov_w2(model.markov_factor(prev, h))


def one_block(model, ids, taps, p):
    """Teacher-forced logits [K, Vd] of a single block at anchor p through the training path."""
    return block_logits(model, ids[None], taps[None], torch.tensor([0]), torch.tensor([p]))[0]


# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_shapes_and_frozen_weights(name):
    """Training returns a scalar SUM and the metric sums of the contract; only the drafter's own weights
    get gradients; decoding returns [k] tokens, [k, V] distributions, [N, V] next_probs."""
    t = load_target(name)
    model = DFlash.from_target(t, num_draft_layers=2)
    batch = tiny_batch(t, [30, 21])
    loss, m = model(batch, gens(batch["sample_id"]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(m) == {"weight", "ce", "l1", "slot_count", "slot_top1", "slot_accept"}
    assert all(m[k].shape == (7,) for k in ("slot_count", "slot_top1", "slot_accept"))
    assert m["slot_count"][0] == (30 - 6 - 1) + (21 - 6 - 1)  # every supervised pair is an anchor (< 512)
    assert torch.allclose(loss, m["ce"])
    loss.backward()
    assert model.embed_tokens.weight.grad is None and model.lm_head.weight.grad is None
    assert model.fc.weight.grad is not None and model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0
    V = t.config.vocab_size
    state = model.start(batch["input_ids"][0, :10], batch["taps"][0, :10])
    tok, probs, conf = model.propose(state, 5, 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert tok.shape == (4,) and probs.shape == (4, V) and conf is None
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    assert model.next_probs(state, 5, [(), (1,), (1, 2)]).shape == (3, V)
    with pytest.raises(ValueError, match="block_size"):
        model.propose(state, 5, 8)


def test_from_target_config_and_meta_build():
    """A bare HF config builds on the meta device at Qwen3-4B geometry (DeepSpec's default layer ids,
    fc [H, 5H]); unknown config keys fail with a TypeError naming them."""
    import transformers
    cfg = transformers.Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with torch.device("meta"):
        model = DFlash.from_target(cfg, mask_token_id=151669)
    assert model.config["target_layer_ids"] == [1, 9, 17, 25, 33]
    assert model.fc.weight.shape == (2560, 12800) and len(model.layers) == 5
    assert model.layers[0].self_attn.k_proj.weight.shape == (1024, 2560)
    with pytest.raises(TypeError, match="blok_size"):
        DFlash.from_target(load_target("tiny-qwen3"), blok_size=7)


def test_no_leakage(tq):
    """A block's logits ignore target features at or after its anchor, other blocks' tokens and other
    sequences; they do depend on features strictly before the anchor (the test can fail)."""
    model = DFlash.from_target(tq, num_draft_layers=2, block_size=5)
    batch = tiny_batch(tq, [30, 26])
    ids, taps = batch["input_ids"].clone(), batch["taps"].clone()
    seq, pos = torch.tensor([0, 0, 0, 1]), torch.tensor([7, 12, 20, 9])
    ref = block_logits(model, ids, taps, seq, pos)
    g = torch.Generator().manual_seed(1)
    for i in range(len(seq)):
        b, p = int(seq[i]), int(pos[i])
        t2, i2 = taps.clone(), ids.clone()
        t2[b, p:] = torch.randn(t2[b, p:].shape, generator=g)  # features at and after the anchor
        t2[1 - b] = torch.randn(t2[1 - b].shape, generator=g)  # the other sequence entirely
        i2[1 - b] = torch.randint(0, 256, i2[1 - b].shape, generator=g)
        for j in range(len(seq)):  # every other block's anchor token
            if j != i:
                i2[seq[j], pos[j]] = (i2[seq[j], pos[j]] + 1) % 256
        out = block_logits(model, i2, t2, seq, pos)
        torch.testing.assert_close(out[i], ref[i], rtol=0, atol=1e-6)
    t2 = taps.clone()
    t2[0, 11] += 1.0  # strictly before the anchor at 12: must be seen
    assert not torch.allclose(block_logits(model, ids, t2, seq, pos)[1], ref[1])


def test_overfit_one_batch():
    """DFlash overfits one batch of a sharpened target: CE to the labels and the L1 distance to the
    target distribution fall by 10x (labels are the target's greedy tokens, so both can)."""
    torch.manual_seed(0)
    t = sharpened_target("tiny-qwen3", 200.0)  # p_top ~0.93: a CE-trained draft can reach L1 ~0.13
    batch = greedy_batch(t, n_seq=1, gen=24)
    model = DFlash.from_target(t, num_draft_layers=2)
    (ce0, l10), (ce1, l11) = overfit(model, batch, steps=240, lr=2e-3)
    assert ce1 < ce0 / 10 and l11 < l10 / 10, (ce0, ce1, l10, l11)


def test_anchors_and_loss_independent_of_batch_composition(tq):
    """Per-sample generators: the same anchors whatever the batch, and the batch loss and metrics are the
    sums of the per-sample ones (no cross-sequence leakage in the flattened attention)."""
    model = DFlash.from_target(tq, num_draft_layers=2, num_anchors=8)
    batch = tiny_batch(tq, [30, 21, 26])
    seq, pos = model.sample_anchors(batch["loss_mask"], gens(batch["sample_id"]))
    s1, p1 = model.sample_anchors(sub(batch, [1])["loss_mask"], gens([1]))
    assert torch.equal(pos[seq == 1], p1) and len(p1) == 8
    assert not torch.equal(pos[seq == 0], pos[seq == 2][:len(pos[seq == 0])])  # samples draw differently
    loss, m = model(batch, gens(batch["sample_id"]))
    parts = [model(sub(batch, [i]), gens([i])) for i in range(3)]
    torch.testing.assert_close(loss, sum(pt[0] for pt in parts), rtol=1e-5, atol=1e-4)
    for k in m:
        torch.testing.assert_close(m[k], sum(pt[1][k] for pt in parts), rtol=1e-5, atol=1e-4)
    _, m2 = model(batch, gens(batch["sample_id"], seed=1))  # re-drawn every step
    assert not torch.equal(m["slot_accept"], m2["slot_accept"])


def test_save_load_roundtrip(tq, tmp_path):
    """save -> load gives identical logits, with and without the frozen weights (re-tied from the
    target); the file holds exactly DeepSpec's keys; loading without the target then fails clearly."""
    model = DFlash.from_target(tq, num_draft_layers=2)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.01 * torch.randn_like(p))  # not the init
    batch = tiny_batch(tq, [30])
    ref = one_block(model, batch["input_ids"][0], batch["taps"][0], 9)
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "slim", include_frozen=False)
    keys = set(load_file(tmp_path / "full" / "model.safetensors"))
    assert keys == set(model.state_dict()) and "fc.weight" in keys and "layers.1.self_attn.k_norm.weight" in keys
    assert not any(k.startswith(("markov_head", "confidence_head", "model.")) for k in keys)
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["markov_rank"] == 0 and cfg["num_hidden_layers"] == 2
    assert cfg["num_target_layers"] == 6 and cfg["target_layer_ids"] == tq.layer_ids
    assert not cfg["enable_confidence_head"] and cfg["tie_word_embeddings"] is False
    for path, tgt in [("full", None), ("slim", tq)]:
        m2 = DFlash.from_pretrained(str(tmp_path / path), target=tgt)
        assert torch.equal(one_block(m2, batch["input_ids"][0], batch["taps"][0], 9), ref)
        assert not m2.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="include_frozen=False"):
        DFlash.from_pretrained(str(tmp_path / "slim"))
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "full"))


def test_reference_checkpoint_loads_and_matches_equations(tmp_path):
    """A DFlash checkpoint written from REFERENCE.md's key list loads with no missing/unexpected keys,
    and its block logits equal a functional re-implementation of eqs. (2)-(3), through the training
    path and the decoding path; an extra or a missing key is named in the error."""
    sd = reference_checkpoint(tmp_path / "ref")
    model = DFlash.from_pretrained(str(tmp_path / "ref"))
    taps = torch.randn(20, GEOM["n_taps"] * GEOM["H"], generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 60, (20,), generator=torch.Generator().manual_seed(4))
    for p in (0, 6, 13):
        _, U = functional_block(sd, taps, ids, p)
        torch.testing.assert_close(one_block(model, ids, taps, p), U, rtol=1e-4, atol=1e-4)
        state = model.start(ids[:p], taps[:p])
        probs = model.next_probs(state, int(ids[p]), [tuple(range(k)) for k in range(GEOM["K"])], temperature=1.0)
        torch.testing.assert_close(probs, U.softmax(-1), rtol=1e-4, atol=1e-5)
    extra = dict(load_file(tmp_path / "ref" / "model.safetensors"), **{"layers.0.bogus": torch.zeros(1)})
    del extra["norm.weight"]
    save_file(extra, tmp_path / "ref" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\], unexpected keys \['layers.0.bogus'\]"):
        DFlash.from_pretrained(str(tmp_path / "ref"))


def test_incremental_cache_equals_scratch_and_training_path(tq):
    """start + commits (the decoding cache) give the same block as a fresh start on the whole prefix and
    as the training forward at that anchor; next_probs reproduces propose's distributions."""
    model = DFlash.from_target(tq, num_draft_layers=2)
    batch = tiny_batch(tq, [30])
    ids, taps = batch["input_ids"][0], batch["taps"][0]
    state = model.start(ids[:8], taps[:8])
    model.commit(state, ids[8:11], taps[8:11])
    model.commit(state, ids[11:15], taps[11:15])
    fresh = model.start(ids[:15], taps[:15])
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    tok, probs, _ = model.propose(state, int(ids[15]), 7, temperature=0.8, top_k=50, generator=g())
    tok2, probs2, _ = model.propose(fresh, int(ids[15]), 7, temperature=0.8, top_k=50, generator=g())
    assert torch.equal(tok, tok2)
    torch.testing.assert_close(probs, probs2, rtol=1e-5, atol=1e-6)
    ref = model.next_probs(fresh, int(ids[15]), [tuple(range(k)) for k in range(7)], temperature=1.0)
    torch.testing.assert_close(ref, one_block(model, ids, taps, 15).softmax(-1), rtol=1e-5, atol=1e-6)
    again = model.next_probs(state, int(ids[15]), [tuple(tok[:k].tolist()) for k in range(7)], temperature=0.8,
                             top_k=50)
    torch.testing.assert_close(again, probs, rtol=1e-5, atol=1e-6)
    greedy, onehot, _ = model.propose(state, int(ids[15]), 3)
    assert torch.equal(greedy, one_block(model, ids, taps, 15)[:3].argmax(-1))
    assert torch.equal(onehot.argmax(-1), greedy) and onehot.max() == 1


def test_reduced_draft_vocab(tq, tmp_path):
    """draft_vocab_size: the head is lm_head rows d2t, draft distributions are zero outside the draft
    vocab, labels outside it are misses, and d2t survives save -> load."""
    model = DFlash.from_target(tq, num_draft_layers=2, draft_vocab_size=40)
    batch = tiny_batch(tq, [30])
    keep = batch["input_ids"][0, 7:20].unique()[:30].tolist()
    vocab = keep + [i for i in range(256) if i not in keep][:40 - len(keep)]
    with pytest.raises(ValueError, match="already reduced"):  # the placeholder head holds 40 rows, not the target's
        model.set_draft_vocab(vocab)
    model.set_draft_vocab(vocab, tq.lm_head_weight)
    state = model.start(batch["input_ids"][0, :9], batch["taps"][0, :9])
    tok, probs, _ = model.propose(state, 3, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert all(int(x) in vocab for x in tok)
    outside = torch.ones(probs.shape[1], dtype=torch.bool)
    outside[vocab] = False
    assert probs[:, outside].sum() == 0 and torch.allclose(probs.sum(-1), torch.ones(5))
    out_tok = next(i for i in range(256) if i not in vocab)
    assert model.draft_labels(torch.tensor([vocab[5], out_tok])).tolist() == [5, -1]  # -1: a miss, no CE
    loss, m = model(batch, gens([0]))
    assert torch.isfinite(loss) and m["ce"] > 0
    model.save_pretrained(tmp_path / "d")
    m2 = DFlash.from_pretrained(str(tmp_path / "d"))
    want = model.next_probs(state, 3, [()])
    assert m2.draft_ids.tolist() == vocab
    assert torch.equal(m2.next_probs(m2.start(batch["input_ids"][0, :9], batch["taps"][0, :9]), 3, [()]), want)
    # the engines' convention (SERVING.md): d2t offsets, t2d mask, the head's draft rows [Vd, H]
    sd = load_file(tmp_path / "d" / "model.safetensors")
    assert sd["d2t"].tolist() == [v - i for i, v in enumerate(vocab)] and sd["t2d"].nonzero()[:, 0].tolist() == sorted(vocab)
    assert torch.equal(sd["lm_head.weight"], tq.lm_head_weight[vocab])
    # a checkpoint of format 1 (absolute d2t, full head, no t2d; the shipped drafter's) loads to the same drafter
    old = {**sd, "d2t": torch.tensor(vocab), "lm_head.weight": tq.lm_head_weight.detach().clone()}
    del old["t2d"]
    save_file(old, str(tmp_path / "d" / "model.safetensors"))
    m1 = DFlash.from_pretrained(str(tmp_path / "d"))
    assert torch.equal(m1.next_probs(m1.start(batch["input_ids"][0, :9], batch["taps"][0, :9]), 3, [()]), want)
