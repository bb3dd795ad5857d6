"""model_dspark.py: the sequential (Markov / gated / RNN) head, the confidence head, the DSpark loss,
sequential decoding and DeepSpec checkpoints, on tiny targets (CPU)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from model_dflash import DFlash
from model_dspark import DSpark
from helpers import sharpened_target
from target import load_target
from test_dflash import (GEOM, block_logits, functional_block, gens, greedy_batch, one_block, overfit,
                         reference_checkpoint, tiny_batch)

HEADS = ["vanilla", "gated", "rnn"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tq():
    return sharpened_target("tiny-qwen3", 20.0)


def dspark(target, head="vanilla", **kw):
    torch.manual_seed(0)
    model = DSpark.from_target(target, num_draft_layers=2, markov_rank=16, markov_head_type=head, **kw)
    with torch.no_grad():  # a visible head: at init the bias W2 W1[x] is ~1e-3
        for p in model.markov_head.parameters():
            p.mul_(10.0)
    return model


def functional_bias(sd, head, h, prev):
    """B_k of eqs. (5)/(6) and DeepSpec's gated head, from the raw state dict: h [K, H], prev [K] -> [K, V]."""
    e = sd["markov_head.markov_w1.weight"][prev]
    if head == "gated":
        e = e * torch.sigmoid(torch.cat([h, e], -1) @ sd["markov_head.gate_proj.weight"].T + sd["markov_head.gate_proj.bias"])
    if head == "rnn":
        s, out = torch.zeros(e.shape[1]), []
        for k in range(len(h)):
            z = torch.cat([s, e[k], h[k]]) @ sd["markov_head.joint_proj.weight"].T + sd["markov_head.joint_proj.bias"]
            g, c, o = z.chunk(3)
            s = torch.sigmoid(g) * s + (1 - torch.sigmoid(g)) * torch.tanh(c)
            out.append(torch.tanh(o))
        e = torch.stack(out)
    return e @ sd["markov_head.markov_w2.weight"].T


# -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,head", [("tiny-qwen3", "vanilla"), ("tiny-qwen3", "gated"), ("tiny-qwen3", "rnn"),
                                       ("tiny-llama", "vanilla")])
def test_shapes_loss_and_keys(name, head):
    """Loss = 0.1 CE + 0.9 L1 + 1.0 BCE (as weighted sums), gradients reach both heads, decoding gives
    [k] tokens, [k, V] distributions and [k] confidences in (0, 1); REFERENCE.md s.5 key names."""
    t = load_target(name)
    model = dspark(t, head)
    batch = tiny_batch(t, [30, 21])
    loss, m = model(batch, gens(batch["sample_id"]))
    assert set(m) == {"weight", "ce", "l1", "bce", "slot_count", "slot_top1", "slot_accept", "slot_conf"}
    torch.testing.assert_close(loss, 0.1 * m["ce"] + 0.9 * m["l1"] + m["bce"], rtol=1e-5, atol=1e-4)
    loss.backward()
    assert model.markov_head.markov_w1.weight.grad.abs().sum() > 0
    assert model.markov_head.markov_w2.weight.grad.abs().sum() > 0
    assert model.confidence_head.proj.weight.grad.abs().sum() > 0
    extra = {"vanilla": set(), "gated": {"markov_head.gate_proj.weight", "markov_head.gate_proj.bias"},
             "rnn": {"markov_head.joint_proj.weight", "markov_head.joint_proj.bias"}}[head]
    heads = {k for k in model.state_dict() if k.startswith(("markov_head", "confidence_head"))}
    assert heads == {"markov_head.markov_w1.weight", "markov_head.markov_w2.weight", "confidence_head.proj.weight",
                     "confidence_head.proj.bias"} | extra
    assert model.confidence_head.proj.weight.shape == (1, 64 + 16)
    state = model.start(batch["input_ids"][0, :10], batch["taps"][0, :10])
    tok, probs, conf = model.propose(state, 5, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert tok.shape == (6,) and probs.shape == (6, t.config.vocab_size) and conf.shape == (6,)
    assert ((conf > 0) & (conf < 1)).all() and torch.allclose(probs.sum(-1), torch.ones(6))


def test_overfit_one_batch():
    """DSpark overfits one batch of a sharpened target: CE to the labels and the L1 distance to the
    target distribution both fall by 10x."""
    t = sharpened_target("tiny-qwen3", 200.0)
    batch = greedy_batch(t, n_seq=1, gen=24)
    torch.manual_seed(0)
    model = DSpark.from_target(t, num_draft_layers=2, markov_rank=16)
    (ce0, l10), (ce1, l11) = overfit(model, batch, steps=240, lr=2e-3)
    assert ce1 < ce0 / 10 and l11 < l10 / 10, (ce0, ce1, l10, l11)


@pytest.mark.parametrize("head", HEADS)
def test_head_conditions_on_previous_tokens(tq, head):
    """Teacher forced: changing the token at p+j changes exactly slot j (Markov, gated) or slots >= j (RNN);
    decoding: next_probs after (a, b) and (c, b) are equal unless the head is an RNN, and differ for (a, d)."""
    model = dspark(tq, head)
    batch = tiny_batch(tq, [30])
    ids, taps = batch["input_ids"][0], batch["taps"][0]
    p, K = 10, model.block_size
    ref = one_block(model, ids, taps, p)
    for j in (1, 3, 6):
        i2 = ids.clone()
        i2[p + j] = (i2[p + j] + 17) % 256
        changed = [not torch.allclose(a, b, atol=1e-6) for a, b in zip(one_block(model, i2, taps, p), ref)]
        want = [k == j or (head == "rnn" and k > j) for k in range(K)]
        assert changed == want, (j, changed)
    state = model.start(ids[:p], taps[:p])
    pa, pc, pd = model.next_probs(state, int(ids[p]), [(3, 4), (9, 4), (3, 8)], temperature=1.0)
    assert torch.allclose(pa, pc, atol=1e-7) == (head != "rnn")
    assert not torch.allclose(pa, pd, atol=1e-4)


def test_rnn_state_resets_per_block(tq):
    """The RNN state starts at 0 in every block: a block's logits are the same with or without another
    block before it in the forward, ignore that block's tokens, and slot 0 equals one step from s_0 = 0."""
    model = dspark(tq, "rnn")
    batch = tiny_batch(tq, [30])
    ids, taps = batch["input_ids"], batch["taps"]
    both = block_logits(model, ids, taps, torch.tensor([0, 0]), torch.tensor([7, 16]))
    alone = block_logits(model, ids, taps, torch.tensor([0]), torch.tensor([16]))
    torch.testing.assert_close(both[1], alone[0], rtol=1e-5, atol=1e-5)  # other shapes: rounding only
    i2 = ids.clone()
    i2[0, 8:15] = (i2[0, 8:15] + 5) % 256  # the first block's tokens (its teacher-forced inputs)
    out = block_logits(model, i2, taps, torch.tensor([0, 0]), torch.tensor([7, 16]))
    assert not torch.allclose(out[0], both[0], atol=1e-4)
    torch.testing.assert_close(out[1], both[1], rtol=0, atol=1e-6)
    h = model.block_hidden(ids, taps, torch.tensor([0]), torch.tensor([16]))[0]
    e = model.markov_head.markov_w1.weight[ids[0, 16]]
    g, c, o = model.markov_head.joint_proj(torch.cat([torch.zeros(16), e, h[0]])).chunk(3)
    torch.testing.assert_close(alone[0, 0], h[0] @ model.lm_head.weight.T + model.markov_head.markov_w2(torch.tanh(o)))


@pytest.mark.parametrize("head", HEADS)
def test_teacher_forced_equals_sequential(tq, head):
    """Fed the same tokens, the training path (teacher forced) and the decoding path (slot by slot, with
    the incremental context cache) give the same distributions and confidences; greedy propose picks the
    teacher-forced argmax of its own tokens; next_probs reproduces propose's distributions."""
    model = dspark(tq, head)
    batch = tiny_batch(tq, [30])
    ids, taps = batch["input_ids"][0], batch["taps"][0]
    p, K = 12, model.block_size
    state = model.start(ids[:5], taps[:5])
    model.commit(state, ids[5:p], taps[5:p])
    truth = [tuple(ids[p + 1:p + 1 + k].tolist()) for k in range(K)]
    torch.testing.assert_close(model.next_probs(state, int(ids[p]), truth, temperature=1.0),
                               one_block(model, ids, taps, p).softmax(-1), rtol=1e-5, atol=1e-6)
    tok, onehot, conf = model.propose(state, int(ids[p]), K)  # greedy
    i2 = ids.clone()
    i2[p + 1:p + 1 + K] = tok
    assert torch.equal(one_block(model, i2, taps, p).argmax(-1), tok)
    h = model.block_hidden(i2[None], taps[None], torch.tensor([0]), torch.tensor([p]))[0]
    prev = torch.cat([ids[p:p + 1], tok[:-1]])
    torch.testing.assert_close(conf, torch.sigmoid(model.conf_logit(h, prev)), rtol=1e-5, atol=1e-6)
    tok, probs, _ = model.propose(state, int(ids[p]), K, temperature=0.7, top_p=0.9,
                                  generator=torch.Generator().manual_seed(3))
    again = model.next_probs(state, int(ids[p]), [tuple(tok[:k].tolist()) for k in range(K)], temperature=0.7, top_p=0.9)
    torch.testing.assert_close(again, probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_reference_checkpoint_matches_equations(tmp_path, head):
    """DeepSpec-layout DSpark checkpoints (REFERENCE.md s.5 keys, each head type, confidence on
    [h ; W1[x_{k-1}]]) load with no missing/unexpected keys; logits and confidences equal the equations
    written out on the raw state dict; DFlash refuses them, and DSpark also loads a DFlash checkpoint."""
    sd = reference_checkpoint(tmp_path / "ref", markov_rank=8, head_type=head, confidence=True, seed=1)
    model = DSpark.from_pretrained(str(tmp_path / "ref"))
    taps = torch.randn(20, GEOM["n_taps"] * GEOM["H"], generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 60, (20,), generator=torch.Generator().manual_seed(4))
    p, K = 9, GEOM["K"]
    h, U = functional_block(sd, taps, ids, p)
    prev = ids[p:p + K]  # x_{k-1}: the anchor, then the ground-truth tokens
    torch.testing.assert_close(one_block(model, ids, taps, p), U + functional_bias(sd, head, h, prev),
                               rtol=1e-4, atol=1e-4)
    conf = torch.sigmoid(torch.cat([h, sd["markov_head.markov_w1.weight"][prev]], -1) @ sd["confidence_head.proj.weight"].T
                         + sd["confidence_head.proj.bias"])[:, 0]
    hm = model.block_hidden(ids[None], taps[None], torch.tensor([0]), torch.tensor([p]))[0]
    torch.testing.assert_close(torch.sigmoid(model.conf_logit(hm, prev)), conf, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="load it with DSpark"):
        DFlash.from_pretrained(str(tmp_path / "ref"))
    sd0 = reference_checkpoint(tmp_path / "dflash")
    both = [one_block(cls.from_pretrained(str(tmp_path / "dflash")), ids, taps, p) for cls in (DFlash, DSpark)]
    torch.testing.assert_close(both[0], both[1], rtol=0, atol=0)
    torch.testing.assert_close(both[0], functional_block(sd0, taps, ids, p)[1], rtol=1e-4, atol=1e-4)


def test_save_load_roundtrip(tq, tmp_path):
    """save -> load of an RNN DSpark is exact; config.json carries DeepSpec's head fields and rebuilds
    the model on its own."""
    model = dspark(tq, "rnn")
    batch = tiny_batch(tq, [30])
    ref = one_block(model, batch["input_ids"][0], batch["taps"][0], 9)
    model.save_pretrained(tmp_path / "c", include_frozen=False)
    cfg = json.load(open(tmp_path / "c" / "config.json"))
    assert cfg["markov_rank"] == 16 and cfg["markov_head_type"] == "rnn" and cfg["enable_confidence_head"]
    assert cfg["confidence_head_with_markov"] is True and cfg["architectures"] == ["Qwen3DSparkModel"]
    assert "lm_head.weight" not in load_file(tmp_path / "c" / "model.safetensors")
    m2 = DSpark.from_pretrained(str(tmp_path / "c"), target=tq)
    assert torch.equal(one_block(m2, batch["input_ids"][0], batch["taps"][0], 9), ref)


def test_reduced_draft_vocab(tq):
    """With a reduced draft vocab W2 maps to it (W1 stays full), training runs, and sequential decoding
    feeds target ids back into W1 while distributions stay zero outside the draft vocab."""
    model = dspark(tq, "vanilla", draft_vocab_size=40)
    assert model.markov_head.markov_w2.weight.shape == (40, 16)
    vocab = list(range(100, 130))
    model.set_draft_vocab(vocab, tq.lm_head_weight)
    assert model.markov_head.markov_w2.weight.shape == (30, 16) and model.markov_head.markov_w1.weight.shape[0] == 262
    batch = tiny_batch(tq, [30])
    loss, m = model(batch, gens([0]))
    loss.backward()
    assert torch.isfinite(loss) and model.markov_head.markov_w2.weight.grad is not None
    state = model.start(batch["input_ids"][0, :9], batch["taps"][0, :9])
    tok, probs, conf = model.propose(state, 3, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert all(100 <= int(x) < 130 for x in tok) and probs[:, :100].sum() == 0 and probs[:, 130:].sum() == 0
    again = model.next_probs(state, 3, [tuple(tok[:k].tolist()) for k in range(5)], temperature=1.0)
    torch.testing.assert_close(again, probs)
