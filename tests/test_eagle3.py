"""Eagle3 drafter (model_eagle3.py): TTT attention and loss, decoding cache, checkpoints. CPU, tiny target."""
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F

import kernels
from model_dflash import rope_cos_sin
from model_eagle3 import Eagle3, ttt_attention
from helpers import sharpened_target
from target import load_target


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def target():
    return sharpened_target("tiny-qwen3", 20.0)


def make_model(target, seed=0, **cfg):
    torch.manual_seed(seed)
    cfg.setdefault("ttt_length", 3)
    return Eagle3.from_target(target, **cfg)


def make_batch(target, B=2, T=12, seed=0, lengths=None):
    """Random tokens; loss_mask 1 after a 3-token 'prompt'; right padding beyond lengths[b]."""
    g = torch.Generator().manual_seed(seed)
    V = target.config.vocab_size
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor(lengths or [T] * B)
    valid = torch.arange(T)[None] < lengths[:, None]
    ids = ids * valid
    loss_mask = (valid & (torch.arange(T)[None] >= 3)).long()
    taps, last_hidden = target.features(ids)
    return dict(input_ids=ids, loss_mask=loss_mask, taps=taps * valid[..., None],
                last_hidden=last_hidden * valid[..., None], sample_id=torch.arange(B), lengths=lengths)


# --- training side -------------------------------------------------------------------------------

def test_ttt_attention_pattern():
    """A query at step k sees exactly the causal step-0 keys s <= t and its own diagonal keys of steps
    1..k: nonzero gradients exactly there, and the output equals SDPA with the explicit (k+1)T mask."""
    torch.manual_seed(0)
    B, nh, nkv, T, hd, K = 1, 4, 2, 6, 8, 4
    q = torch.randn(B, nh, T, hd, dtype=torch.float64)
    ks = [torch.randn(B, nkv, T, hd, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    vs = [torch.randn(B, nkv, T, hd, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    out = ttt_attention(q, ks, vs)
    # explicit reference: keys of all steps side by side, mask written from the definition
    s, t = torch.arange(T)[None], torch.arange(T)[:, None]
    mask = torch.cat([s <= t] + [s == t] * (K - 1), 1)  # [T, K*T]
    ref = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    for tq in range(T):
        gk = torch.autograd.grad(out[:, :, tq].sum(), ks + vs, retain_graph=True)
        for j in range(K):
            seen_k = gk[j].abs().sum((0, 1, 3)) > 0  # [T] which keys of step j influence query tq
            seen_v = gk[K + j].abs().sum((0, 1, 3)) > 0
            want = (torch.arange(T) <= tq) if j == 0 else (torch.arange(T) == tq)
            assert torch.equal(seen_k, want) and torch.equal(seen_v, want), (tq, j)


def test_unroll_no_future_leakage(target):
    """Step k at position t depends on taps[<= t] and tokens x_{<= t+k+1} only, and does depend on
    x_{t+k+1} (the shift convention: step k reads x_{t+k+1}, predicts x_{t+k+2})."""
    model = make_model(target, ttt_length=3)
    b = make_batch(target, B=1, T=12)
    outs = model.unroll(b["input_ids"], b["taps"])
    t = 4
    for k in range(3):
        ids, taps = b["input_ids"].clone(), b["taps"].clone()
        ids[:, t + k + 2:] = (ids[:, t + k + 2:] + 7) % 262  # every token from the predicted one on
        taps[:, t + 1:] += 1.0
        o2 = model.unroll(ids, taps)
        torch.testing.assert_close(o2[k][:, t], outs[k][:, t], rtol=0, atol=1e-6)
        ids[:, t + k + 1] = (ids[:, t + k + 1] + 7) % 262  # the step's own input token
        assert (model.unroll(ids, taps)[k][:, t] - outs[k][:, t]).abs().max() > 1e-4


def test_step0_matches_hf_qwen3_pieces(target):
    """Architecture parity (REFERENCE s.4), written out with transformers' Qwen3 RoPE: step 0 is one
    Qwen3-style layer on [input_layernorm(embed(x_{t+1})) ; hidden_norm(fc(taps_t))] (2H wide),
    residual fc(taps_t), per-head q/k RMSNorm, GQA, causal, RoPE position t, SwiGLU MLP."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb
    model = make_model(target, seed=6)
    b = make_batch(target, B=1, T=10)
    w, c, T = model.state_dict(), target.config, 10
    rms = lambda x, g: g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)  # noqa: E731
    L = lambda name: w["layers.0." + name + ".weight"]  # noqa: E731
    x_next = torch.cat([b["input_ids"][0, 1:], torch.zeros(1, dtype=torch.long)])  # token x_{t+1} at t
    h = b["taps"][0] @ w["fc.weight"].T  # [T,H]
    a = torch.cat([rms(w["embed_tokens.weight"][x_next], L("input_layernorm")), rms(h, L("hidden_norm"))], -1)
    q = rms((a @ L("self_attn.q_proj").T).view(T, 4, 16), L("self_attn.q_norm")).transpose(0, 1)[None]
    k = rms((a @ L("self_attn.k_proj").T).view(T, 2, 16), L("self_attn.k_norm")).transpose(0, 1)[None]
    v = (a @ L("self_attn.v_proj").T).view(T, 2, 16).transpose(0, 1)[None]
    cos, sin = Qwen3RotaryEmbedding(c)(h[None], torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1).reshape(T, -1)
    h = h + o @ L("self_attn.o_proj").T
    y = rms(h, L("post_attention_layernorm"))
    h = h + (F.silu(y @ L("mlp.gate_proj").T) * (y @ L("mlp.up_proj").T)) @ L("mlp.down_proj").T
    out = model.unroll(b["input_ids"], b["taps"], steps=1)[0][0]
    torch.testing.assert_close(out[:-1], h[:-1], rtol=1e-5, atol=1e-5)  # t = T-1 has no x_{t+1}


def reference_loss(model, b):
    """Step by step with the decoding API: context x_{<=t}, anchor x_{t+1}, teacher path x_{t+2..t+k+1};
    soft CE of each draft distribution against softmax(lm_head(last_hidden[t+k+1]))."""
    K, W = model.ttt_length, model.lm_head.weight
    loss, weight = 0.0, 0.0
    count, top1, accept = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    for i in range(b["input_ids"].shape[0]):
        n = int(b["lengths"][i])
        x, taps, lh, lm = (b[k][i, :n] for k in ("input_ids", "taps", "last_hidden", "loss_mask"))
        for t in range(n - 1):
            state = model.start(x[:t + 1], taps[:t + 1])
            ks = [k for k in range(K) if t + k + 1 < n and lm[t + k]]  # DeepSpec's rule, REFERENCE s.4
            if not ks:
                continue
            pd = model.next_probs(state, int(x[t + 1]), [tuple(x[t + 2:t + k + 2].tolist()) for k in ks],
                                  temperature=1.0)
            for row, k in enumerate(ks):
                pt = (lh[t + k + 1] @ W.T).softmax(-1)
                loss += 0.8 ** k * -(pt * pd[row].log()).sum()
                count[k] += 1
                top1[k] += float(pd[row].argmax() == pt.argmax())
                accept[k] += 1 - 0.5 * (pd[row] - pt).abs().sum()
    return loss, float(b["input_ids"].numel()), count, top1, accept  # weight: B*T, DeepSpec's local mean


def test_loss_matches_step_by_step_reference(target):
    """The unrolled TTT loss and its metric sums equal a position-by-position computation through the
    decoding path (start + next_probs along the teacher-forced path), padding and masks included."""
    model = make_model(target, seed=1, ttt_length=3)
    b = make_batch(target, B=2, T=11, seed=1, lengths=[11, 8])
    loss, m = model(b, None)
    ref_loss, ref_w, count, top1, accept = reference_loss(model, b)
    assert m["weight"].item() == pytest.approx(ref_w) and torch.equal(m["slot_count"], count)
    assert loss.item() == pytest.approx(float(ref_loss), rel=1e-5)
    assert m["ce"].item() == pytest.approx(float(ref_loss), rel=1e-5)
    torch.testing.assert_close(m["slot_top1"], top1)
    torch.testing.assert_close(m["slot_accept"], accept, rtol=1e-5, atol=1e-5)
    assert count.tolist() == [7 + 4, 7 + 4, 7 + 4]  # supervised: 3 <= t+k <= len-2, t >= 0


# loss_mask spans (T = 10, length 10 unless given) -> the positions t scored at TTT steps 0, 1, 2, by hand
# from REFERENCE s.4: t is scored at step k iff loss_mask[t+k] = 1 and t+k < length - 1.
SPAN_CASES = {
    "start": ([0, 1, 2, 3], 10, [[0, 1, 2, 3], [0, 1, 2], [0, 1]]),
    "middle": ([4, 5, 6], 10, [[4, 5, 6], [3, 4, 5], [2, 3, 4]]),
    "end": ([7, 8, 9], 10, [[7, 8], [6, 7], [5, 6]]),  # t+k = 9 is the last token: nothing left to predict
    "two spans": ([1, 2, 6, 7], 10, [[1, 2, 6, 7], [0, 1, 5, 6], [0, 4, 5]]),
    "padding": ([4, 5, 6], 7, [[4, 5], [3, 4], [2, 3]]),  # length 7: position 6 is the last real token
}


def span_batch(target):
    ids = torch.randint(0, target.config.vocab_size, (len(SPAN_CASES), 10), generator=torch.Generator().manual_seed(5))
    lm, lengths = torch.zeros(len(SPAN_CASES), 10, dtype=torch.long), []
    for i, (span, n, _) in enumerate(SPAN_CASES.values()):
        lm[i, span] = 1
        lengths.append(n)
        ids[i, n:] = 0
    lengths = torch.tensor(lengths)
    taps, last_hidden = target.features(ids)
    valid = (torch.arange(10)[None] < lengths[:, None])[..., None]
    return dict(input_ids=ids, loss_mask=lm, taps=taps * valid, last_hidden=last_hidden * valid,
                sample_id=torch.arange(len(lengths)), lengths=lengths)


def test_supervised_positions_by_hand(target):
    """Eagle3's supervised (t, k) equal the hand-listed ones for spans at the start, middle and end, two spans
    and right padding: an answer's first two tokens are never predicted, the two after its end are."""
    from model_eagle3 import supervised
    b = span_batch(target)
    for k in range(3):
        sup = supervised(b["loss_mask"], b["lengths"], k)
        for i, (name, (_, _, want)) in enumerate(SPAN_CASES.items()):
            assert sup[i].nonzero().flatten().tolist() == want[k], (name, k)


def test_loss_by_hand_spans_and_normalization(target):
    """On the span cases the loss equals the step-by-step reference (soft CE of x_{t+k+2} against
    softmax(lm_head(last_hidden[t+k+1])), 0.8^k), and weight = B*T (every sequence weighs the same); the old rule
    (loss_mask[t+k+2]) would score other positions and fail."""
    model = make_model(target, seed=2, ttt_length=3)
    b = span_batch(target)
    loss, m = model(b, None)
    ref_loss, ref_w, count, _, _ = reference_loss(model, b)
    assert m["weight"].item() == ref_w == 5 * 10
    assert count.tolist() == [sum(len(w[k]) for _, _, w in SPAN_CASES.values()) for k in range(3)]
    torch.testing.assert_close(m["slot_count"], count)
    assert loss.item() == pytest.approx(float(ref_loss), rel=1e-5)


def test_overfit_one_batch(target):
    """Training works end to end: on one batch of a sharpened tiny target, soft CE minus the target
    entropy (the KL the drafter can remove) falls by 10x in under 20 s."""
    model = make_model(target, seed=0, ttt_length=3)
    b = make_batch(target, B=2, T=24, seed=2)
    W = model.lm_head.weight
    ent = 0.0  # weighted target entropy over the supervised slots, the floor of the soft CE
    from model_eagle3 import shift, supervised
    for k in range(3):
        sup = supervised(b["loss_mask"], b["lengths"], k)
        pt = (shift(b["last_hidden"], k + 1)[sup] @ W.T).softmax(-1)
        ent += 0.8 ** k * -(pt * pt.clamp_min(1e-30).log()).sum()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    t0, kl = time.time(), []
    for step in range(400):
        loss, m = model(b, None)
        kl.append((loss.item() - float(ent)) / m["weight"].item())
        if kl[-1] < kl[0] / 10:
            break
        opt.zero_grad()
        (loss / m["weight"]).backward()
        opt.step()
    assert kl[-1] < kl[0] / 10, f"KL {kl[0]:.3f} -> {kl[-1]:.3f} after {step} steps"
    assert time.time() - t0 < 20


# --- decoding side -------------------------------------------------------------------------------

def prompt_and_taps(target, T=9, seed=3):
    ids = torch.randint(0, target.config.vocab_size, (T,), generator=torch.Generator().manual_seed(seed))
    taps, _ = target.features(ids[None])
    return ids, taps[0]


def test_propose_equals_chain_from_scratch(target):
    """propose (draft KV cache, one slot at a time) equals recomputing every slot with a full causal
    forward over all pairs from scratch (no cache)."""
    model = make_model(target, seed=2)
    ids, taps = prompt_and_taps(target)
    state = model.start(ids, taps)
    anchor = 17
    tokens, probs, conf = model.propose(state, anchor, 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert conf is None and tokens.shape == (4,) and probs.shape == (4, 262)
    seq, feats = ids[1:].tolist() + [anchor], model.fc(taps)  # pairs (h_t, x_{t+1}), root (h_{T-1}, anchor)
    no_cache = [(torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16))]
    for j in range(4):
        n = len(seq)
        out, _ = model._run(no_cache, torch.tensor(seq), feats, torch.arange(n),
                            torch.ones(n, n, dtype=torch.bool).tril())
        p = model.to_full(kernels.logits_to_probs(model.draft_logits(out[-1:]), 1.0))
        torch.testing.assert_close(p[0], probs[j], rtol=1e-5, atol=1e-6)
        seq, feats = seq + [int(tokens[j])], torch.cat([feats, out[-1:]])  # drafted slot: own output


def test_commit_after_partial_acceptance_equals_fresh_start(target):
    """After propose + commit(anchor + 2 of 4 drafts, their target taps), the draft cache and the next
    proposal equal a fresh start over the committed text; next_probs never mutates the state."""
    model = make_model(target, seed=3)
    ids, _ = prompt_and_taps(target)
    state = model.start(ids, target.features(ids[None])[0][0])
    anchor = 5
    tokens, _, _ = model.propose(state, anchor, 4)
    before = [t.clone() for kv in state["kv"] for t in kv]
    model.next_probs(state, anchor, [(), tuple(tokens[:3].tolist())])
    assert all(torch.equal(a, b) for a, b in zip(before, [t for kv in state["kv"] for t in kv]))
    committed = torch.cat([ids, torch.tensor([anchor]), tokens[:2]])
    full_taps = target.features(committed[None])[0][0]  # what the verify forward yields
    model.commit(state, committed[len(ids):], full_taps[len(ids):])
    fresh = model.start(committed, full_taps)
    for (k1, v1), (k2, v2) in zip(state["kv"], fresh["kv"]):
        assert k1.shape == k2.shape == (1, 2, len(committed) - 1, 16)
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    assert torch.equal(state["pending"], fresh["pending"])
    a, b = (model.propose(s, 9, 4, temperature=1.0, generator=torch.Generator().manual_seed(0)) for s in (state, fresh))
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)


def test_next_probs_equals_propose_along_chain(target):
    """next_probs along the proposed chain's prefixes (batched with unrelated paths that share the trie)
    returns exactly propose's distributions; greedy proposals are one-hot argmaxes."""
    model = make_model(target, seed=4)
    ids, taps = prompt_and_taps(target)
    state = model.start(ids, taps)
    tokens, probs, _ = model.propose(state, 11, 4, temperature=1.0, generator=torch.Generator().manual_seed(1))
    chain = [tuple(tokens[:j].tolist()) for j in range(4)]
    other = [(int(tokens[0]), (int(tokens[1]) + 1) % 262), ((int(tokens[0]) + 3) % 262,)]
    got = model.next_probs(state, 11, other[:1] + chain + other[1:], temperature=1.0)
    torch.testing.assert_close(got[1:5], probs, rtol=1e-5, atol=1e-6)
    g_tokens, g_probs, _ = model.propose(state, 11, 3)
    assert torch.equal(g_probs.argmax(-1), g_tokens) and torch.equal(g_probs.sum(-1), torch.ones(3))
    torch.testing.assert_close(model.next_probs(state, 11, [tuple(g_tokens[:j].tolist()) for j in range(3)]), g_probs)


def test_reduced_draft_vocab(target, tmp_path):
    """draft_vocab_size > 0: proposals come from d2t, distributions are zero elsewhere and sum to 1,
    training runs on the reduced head, and d2t survives a checkpoint round trip."""
    model = make_model(target, draft_vocab_size=40)
    keep = torch.randperm(262, generator=torch.Generator().manual_seed(0))[:40]
    model.set_draft_vocab(keep, target.lm_head_weight)
    ids, taps = prompt_and_taps(target)
    state = model.start(ids, taps)
    tokens, probs, _ = model.propose(state, 3, 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    outside = torch.ones(262, dtype=torch.bool)
    outside[keep] = False
    assert torch.isin(tokens, keep).all() and probs[:, outside].abs().sum() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    torch.testing.assert_close(model.next_probs(state, 3, [(), tuple(tokens[:1].tolist())], temperature=1.0),
                               probs[:2], rtol=1e-5, atol=1e-6)
    loss, m = model(make_batch(target), None)
    assert torch.isfinite(loss) and m["weight"] > 0
    model.save_pretrained(tmp_path)
    assert torch.equal(Eagle3.from_pretrained(tmp_path).draft_ids, keep.sort().values)


# --- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_round_trip(target, tmp_path):
    """save_pretrained / from_pretrained is exact; include_frozen=False omits embed/lm_head, which are
    re-tied from the target, and loading it without a target fails naming the fix."""
    model = make_model(target, seed=5)
    model.save_pretrained(tmp_path / "full")
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert cfg["architectures"] == ["Qwen3Eagle3Model"] and cfg["num_hidden_layers"] == 1
    assert cfg["target_layer_ids"] == [0, 1, 2, 3, 4] and cfg["num_target_layers"] == 6 and cfg["ttt_length"] == 3
    assert sorted(os.listdir(tmp_path / "full")) == ["config.json", "model.safetensors"]  # no tmp left behind
    loaded = Eagle3.from_pretrained(str(tmp_path / "full"))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not loaded.lm_head.weight.requires_grad and loaded.fc.weight.requires_grad
    model.save_pretrained(tmp_path / "slim", include_frozen=False)
    with pytest.raises(ValueError, match="target="):
        Eagle3.from_pretrained(str(tmp_path / "slim"))
    slim = Eagle3.from_pretrained(str(tmp_path / "slim"), target=target)
    assert all(torch.equal(sd[k], slim.state_dict()[k]) for k in sd)


def reference_checkpoint(path, target, extra=None, drop=None, arch="Eagle3DraftModel"):
    """A DeepSpec-style checkpoint written from REFERENCE.md s.5's key list (bf16, no prefix)."""
    from safetensors.torch import save_file
    c = target.config
    H, V, hd, I = c.hidden_size, c.vocab_size, c.head_dim, c.intermediate_size
    nq, nkv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    p = "layers.0."
    shapes = {"embed_tokens.weight": (V, H), "fc.weight": (H, 5 * H), p + "hidden_norm.weight": (H,),
              p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
              p + "self_attn.q_proj.weight": (nq, 2 * H), p + "self_attn.k_proj.weight": (nkv, 2 * H),
              p + "self_attn.v_proj.weight": (nkv, 2 * H), p + "self_attn.o_proj.weight": (H, nq),
              p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
              p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
              "norm.weight": (H,), "lm_head.weight": (V, H), **(extra or {})}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items() if k != drop}
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"))
    cfg = {k: v for k, v in c.to_dict().items() if k != "rope_parameters"}
    cfg.update(architectures=[arch], num_hidden_layers=1, ttt_length=7, step_loss_decay=0.8,
               draft_num_hidden_layers=1, target_layer_ids=[0, 1, 2, 3, 4], num_target_layers=6,
               target_model_name_or_path="tiny-qwen3", rope_theta=10000.0, rope_scaling=None)  # older spelling
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return sd


def test_reference_layout_checkpoint_loads(target, tmp_path):
    """A checkpoint built from REFERENCE.md's Eagle3 key list (alias architecture, bf16) loads with no
    missing or unexpected keys and the values land in place; extra or missing keys are listed by name."""
    sd = reference_checkpoint(tmp_path / "ok", target)
    model = Eagle3.from_pretrained(str(tmp_path / "ok"))
    assert model.ttt_length == 7
    cos, _ = rope_cos_sin(model.config, torch.tensor([1]), 16)  # rope_theta 10000 read from the older spelling
    torch.testing.assert_close(cos[0, :8], torch.cos(10000.0 ** (-torch.arange(0, 16, 2) / 16)))
    mine = model.state_dict()
    assert set(mine) == set(sd) and all(torch.equal(mine[k], sd[k].float()) for k in sd)
    reference_checkpoint(tmp_path / "extra", target, extra={"layers.0.self_attn.q_proj.bias": (64,)})
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.self_attn.q_proj.bias'\]"):
        Eagle3.from_pretrained(str(tmp_path / "extra"))
    reference_checkpoint(tmp_path / "drop", target, drop="fc.weight")
    with pytest.raises(ValueError, match=r"missing keys \['fc.weight'\]"):
        Eagle3.from_pretrained(str(tmp_path / "drop"))
    reference_checkpoint(tmp_path / "dspark", target, arch="Qwen3DSparkModel")
    with pytest.raises(ValueError, match="not an Eagle3 checkpoint"):
        Eagle3.from_pretrained(str(tmp_path / "dspark"))


def test_from_target_config_meta_and_unknown_keys():
    """A bare HF config builds at real geometry on the meta device (Qwen3-4B shapes of REFERENCE s.5);
    an unknown config key is a TypeError naming it."""
    import transformers
    cfg = transformers.Qwen3Config(vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                                   num_key_value_heads=8, head_dim=128, intermediate_size=9728)
    with torch.device("meta"):
        model = Eagle3.from_target(cfg, block_size=7, mask_token_id=151669)
    a = model.layers[0].self_attn
    assert model.fc.weight.shape == (2560, 5 * 2560) and model.config["target_layer_ids"] == [1, 9, 17, 25, 33]
    assert a.q_proj.weight.shape == (4096, 5120) and a.k_proj.weight.shape == (1024, 5120)
    assert a.o_proj.weight.shape == (2560, 4096) and model.lm_head.weight.shape == (151936, 2560)
    with pytest.raises(TypeError, match="ttt_lenght"):
        Eagle3.from_target(cfg, ttt_lenght=3)
