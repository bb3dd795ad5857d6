"""export.py: what each engine loads (SERVING.md), checked by rebuilding the engine's forward from the exported
tensors alone (fused qkv, offset d2t, the +1 layer ids, the sample-from-anchor block) and comparing with nanospec."""
import pytest
import torch
import torch.nn.functional as F

from export import engine_files
from target import load_target, new_drafter

pytestmark = pytest.mark.usefixtures("one_thread")
B = 4


@pytest.fixture(scope="module")
def tq():
    from helpers import sharpened_target
    t = sharpened_target("tiny-qwen3", 20.0)
    with torch.no_grad():  # on the bf16 grid, as the exported (bf16) copies of its head rows
        for p in t.model.parameters():
            p.copy_(p.bfloat16().float())
    return t


def drafter(kind, t, vocab=None, head="vanilla", layers=2):
    torch.manual_seed(0)
    d = new_drafter(kind, t, {"num_draft_layers": layers, "block_size": B, "ttt_length": B, "markov_rank": 16,
                              "markov_head_type": head, "draft_vocab_size": len(vocab) if vocab else 0}).eval()
    if vocab:
        d.set_draft_vocab(vocab, t.lm_head_weight)
    with torch.no_grad():  # weights on the bf16 grid: the export's bf16 cast is then exact
        for p in d.parameters():  # trained ones moved off their init (the frozen embedding and head are the target's)
            p.copy_((p + 0.02 * torch.randn_like(p) * (p.dim() > 1)).bfloat16().float() if p.requires_grad else p)
    return d


def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta):  # x [N, heads, hd], neox rotate-half (vLLM's is_neox_style=True)
    hd = x.shape[-1]
    ang = pos.float()[:, None] * theta ** (-torch.arange(0, hd, 2).float() / hd)
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def engine_block(c, sd, t, prompt, anchor):
    """vLLM's Qwen3DSparkForCausalLM / SGLang's DSPARK, rebuilt from the exported config and tensors: taps from the
    target's hidden_states[i + 1], one fused qkv projection, the block [anchor, mask x (B-1)] at positions S..S+B-1
    seeing the whole context (slot k drafts x_{S+k+1}), the greedy chain with the Markov bias, draft index -> target
    id through the offsets d2t. -> (tokens [B], full-vocab log-softmax rows [B, V])."""
    w = {k: v.float() for k, v in sd.items()}
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    theta = c["rope_parameters"]["rope_theta"]
    with torch.no_grad():
        hs = t.model(prompt[None], output_hidden_states=True).hidden_states
        ctx = rms(torch.cat([hs[i + 1][0] for i in c["target_layer_ids"]], -1) @ w["fc.weight"].T, w["hidden_norm.weight"])
        S, E = len(prompt), t.embed_weight
        x = E[torch.tensor([anchor] + [c["mask_token_id"]] * (c["block_size"] - 1))]
        pc, pb = torch.arange(S), S + torch.arange(len(x))
        for i in range(c["num_hidden_layers"]):
            p = f"layers.{i}."
            qkv = torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])  # vLLM's QKVParallelLinear
            q, k, v = (rms(x, w[p + "input_layernorm.weight"]) @ qkv.T).split([nh * hd, nkv * hd, nkv * hd], -1)
            kc, vc = (ctx @ qkv[nh * hd:].T).split([nkv * hd, nkv * hd], -1)  # context K/V, precomputed
            norm = lambda y, n: rms(y.view(len(y), -1, hd), w[p + f"self_attn.{n}_norm.weight"])  # noqa: E731
            q = rope(norm(q, "q"), pb, theta)
            k = torch.cat([rope(norm(kc, "k"), pc, theta), rope(norm(k, "k"), pb, theta)])
            v = torch.cat([vc, v]).view(-1, nkv, hd)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(nh // nkv, 0),
                                               v.transpose(0, 1).repeat_interleave(nh // nkv, 0))  # non-causal
            x = x + o.transpose(0, 1).reshape(len(x), -1) @ w[p + "self_attn.o_proj.weight"].T
            y = rms(x, w[p + "post_attention_layernorm.weight"])
            x = x + (F.silu(y @ w[p + "mlp.gate_proj.weight"].T) * (y @ w[p + "mlp.up_proj.weight"].T)) @ w[
                p + "mlp.down_proj.weight"].T
        U = rms(x, w["norm.weight"]) @ w.get("lm_head.weight", t.lm_head_weight).T  # no lm_head: the target's
        d2t = sd.get("d2t", torch.zeros(U.shape[1], dtype=torch.long))
        toks, rows, prev = [], [], anchor
        for k in range(len(x)):
            z = U[k] + (w["markov_head.markov_w2.weight"] @ w["markov_head.markov_w1.weight"][prev]
                        if c.get("markov_rank") else 0)
            full = torch.full((c["vocab_size"],), float("-inf"))
            full[torch.arange(len(z)) + d2t] = z.log_softmax(-1)
            prev = int(full.argmax())
            toks.append(prev)
            rows.append(full)
    return toks, torch.stack(rows)


@pytest.mark.parametrize("kind,engine,reduced", [("dspark", "vllm", False), ("dspark", "vllm", True),
                                                 ("dflash", "vllm", False), ("dspark", "sglang", False),
                                                 ("dflash", "sglang", False), ("dspark", "llama.cpp", True)])
def test_engine_forward_rebuilt_from_the_export_equals_nanospec(tq, kind, engine, reduced):
    vocab = sorted({*range(100, 130), *range(256, 262)}, reverse=True) if reduced else None  # unsorted: offsets
    d = drafter(kind, tq, vocab)
    c, sd = engine_files(d, engine)
    assert "embed_tokens.weight" not in sd and ("lm_head.weight" in sd) == reduced
    if reduced:
        assert sd["lm_head.weight"].shape == (len(vocab), 64) and sd["t2d"].sum() == len(vocab)
        assert (sd["d2t"] + torch.arange(len(vocab))).tolist() == vocab  # offsets, as every engine reads them
    if engine == "sglang" and kind == "dflash":  # DSPARK needs a Markov head: a zero one of rank 1
        assert c["markov_rank"] == 1 and not sd["markov_head.markov_w2.weight"].any()
    assert_same_chain(d, tq, lambda prompt: engine_block(c, sd, tq, prompt, anchor=49))


def assert_same_chain(d, t, engine_chain):
    """The engine's greedy chain after anchor 49 (engine_chain(prompt) -> tokens, log-probability rows) is nanospec's,
    with nanospec's slot distributions."""
    prompt = t.render_prompt([{"role": "user", "content": "Count: 1 2 3 4 5"}])
    toks, rows = engine_chain(prompt)
    taps, _ = t.features(prompt[None])
    state = d.start(prompt, taps[0])
    mine, _, _ = d.propose(state, 49, B)
    assert toks == mine.tolist()
    ref = d.next_probs(state, 49, [tuple(mine[:k].tolist()) for k in range(B)], temperature=1.0)
    torch.testing.assert_close(rows.exp(), ref, atol=2e-5, rtol=1e-4)


def test_eagle3_for_vllm_is_a_config_rewrite(tq):
    """vLLM's Qwen3 Eagle3 takes DeepSpec's weights unchanged; its aux layer ids are ours + 1 (hidden_states[i] =
    the output of layer i - 1: the taps nanospec trains on), fc width from num_aux_layers, no norm before residual."""
    d = drafter("eagle3", tq, layers=1)
    c, sd = engine_files(d, "vllm")
    assert c["architectures"] == ["Eagle3Qwen3ForCausalLM"] and c["model_type"] == "qwen3"
    assert c["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in d.config["target_layer_ids"]]
    assert c["norm_before_residual"] is False and sd["fc.weight"].shape[1] == c["num_aux_layers"] * 64
    assert set(sd) == set(d.state_dict()) - {"embed_tokens.weight", "lm_head.weight"}
    prompt = tq.render_prompt([{"role": "user", "content": "hi"}])
    with torch.no_grad():
        hs = tq.model(prompt[None], output_hidden_states=True).hidden_states
    taps, _ = tq.features(prompt[None])
    assert torch.equal(torch.cat([hs[i] for i in c["eagle_aux_hidden_state_layer_ids"]], -1), taps)


def vllm_eagle3_chain(c, sd, t, prompt, anchor, n):
    """vLLM's Eagle3Qwen3ForCausalLM (vllm/model_executor/models/qwen3_eagle3.py; its Llama twin llama_eagle3.py has
    the same layer without q/k norms and an fc fixed at 3 taps), driven as SpecDecodeBaseProposer.propose
    (vllm/v1/spec_decode/llm_base_proposer.py) drives it, rebuilt from the exported config and tensors alone: a
    greedy chain of n drafts after `anchor` -> (target ids [n], full-vocab log-softmax rows [n, V])."""
    H, nh, nkv, hd, eps = (c[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                          "rms_norm_eps"))
    theta, L, I = c["rope_parameters"]["rope_theta"], c["num_hidden_layers"], c["intermediate_size"]
    # Eagle3Qwen3ForCausalLM.load_weights: t2d skipped, d2t -> draft_id_to_target_id (left zeros when absent), the
    # rest under "model." through hf_to_vllm_mapper: "midlayer." -> "layers.0.", q/k/v_proj stacked into qkv_proj
    # and gate/up_proj into gate_up_proj; the weight loaders refuse a shard of another shape.
    w = {k.replace("midlayer.", "layers.0."): v.float() for k, v in sd.items() if "t2d" not in k and "d2t" not in k}
    qkv, gate_up = [], []
    for i in range(L):
        p = f"layers.{i}."
        qkv.append(torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
        want = (nh * hd + 2 * nkv * hd, 2 * H if i == 0 else H)  # Qwen3Eagle3DecoderLayer.__init__: "qkv_input_size
        assert qkv[i].shape == want, (  # = 2 * self.hidden_size if layer_idx == 0 else self.hidden_size"
            f"vLLM cannot load {p}self_attn.qkv_proj: {tuple(qkv[i].shape)}, its layer {i} takes {want}")
        gate_up.append(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]))
    # Qwen3Eagle3Model.__init__: fc input = num_aux_layers (else num_aux_hidden_states, else the number of aux ids)
    # x target_hidden_size (else hidden_size); norm_before_fc, fc_norm, norm_output absent = False: fc alone.
    n_aux = c.get("num_aux_layers") or c.get("num_aux_hidden_states") or len(c["eagle_aux_hidden_state_layer_ids"])
    assert w["fc.weight"].shape == (H, n_aux * c.get("target_hidden_size", H))
    assert not any(c.get(k) for k in ("norm_before_fc", "fc_norm", "norm_output"))
    head = w.get("lm_head.weight", t.lm_head_weight)  # process_eagle_weight: no lm_head -> the target's is shared
    d2t = sd.get("d2t", torch.zeros(len(head), dtype=torch.long))
    kv = [(torch.zeros(0, nkv, hd), torch.zeros(0, nkv, hd)) for _ in range(L)]  # the draft's paged KV cache

    def model(ids, pos, h):  # Qwen3Eagle3Model.forward -> (post-norm states for the logits, pre-norm states fed back)
        e, residual, N = t.embed_weight[ids], None, len(ids)  # no embed_tokens exported: the target's
        for i in range(L):
            p = f"layers.{i}."
            if i == 0:  # Qwen3Eagle3DecoderLayer.forward, layer 0: "embeds = self.input_layernorm(embeds)" ...
                if c.get("norm_before_residual", False):  # _norm_before_residual: the residual is the normed h
                    h = residual = rms(h, w[p + "hidden_norm.weight"], eps)
                else:  # _norm_after_residual: "residual = hidden_states; hidden_states = self.hidden_norm(...)"
                    residual, h = h, rms(h, w[p + "hidden_norm.weight"], eps)
                x = torch.cat([rms(e, w[p + "input_layernorm.weight"], eps), h], -1)  # "torch.cat([embeds, hidden..."
            else:  # later layers: "hidden_states, residual = self.input_layernorm(hidden_states, residual)"
                residual = h + residual
                x = rms(residual, w[p + "input_layernorm.weight"], eps)
            # Qwen3Attention: fused qkv, per-head q/k RMSNorm, neox RoPE at the proposer's positions, causal over
            # the cache (the context pairs, then each earlier draft step), o_proj
            q, k, v = (x @ qkv[i].T).split([nh * hd, nkv * hd, nkv * hd], -1)
            q = rope(rms(q.view(N, nh, hd), w[p + "self_attn.q_norm.weight"], eps), pos, theta)
            k = rope(rms(k.view(N, nkv, hd), w[p + "self_attn.k_norm.weight"], eps), pos, theta)
            K, V = (torch.cat([kv[i][0], k]), torch.cat([kv[i][1], v.view(N, nkv, hd)]))
            kv[i] = (K, V)
            S0 = len(K) - N
            mask = torch.cat([torch.ones(N, S0, dtype=torch.bool), torch.ones(N, N, dtype=torch.bool).tril()], 1)
            o = F.scaled_dot_product_attention(q.transpose(0, 1), K.transpose(0, 1).repeat_interleave(nh // nkv, 0),
                                               V.transpose(0, 1).repeat_interleave(nh // nkv, 0), attn_mask=mask)
            h = o.transpose(0, 1).reshape(N, -1) @ w[p + "self_attn.o_proj.weight"].T
            residual = h + residual  # "self.post_attention_layernorm(hidden_states, residual)": fused add + norm
            gu = rms(residual, w[p + "post_attention_layernorm.weight"], eps) @ gate_up[i].T
            h = (F.silu(gu[:, :I]) * gu[:, I:]) @ w[p + "mlp.down_proj.weight"].T  # Qwen3MLP: SiluAndMul, down_proj
        pre = h + residual  # "hidden_states, hidden_prenorm = self.norm(hidden_states, residual)"
        return rms(pre, w["norm.weight"], eps), pre  # aux_output = hidden_prenorm (norm_output False)

    with torch.no_grad():
        # the target's aux hidden states: vLLM's Qwen3 model appends "hidden_states + residual" before layer idx for
        # idx in eagle_aux_hidden_state_layer_ids, i.e. the input of layer idx = HF's hidden_states[idx]
        hs = t.model(prompt[None], output_hidden_states=True).hidden_states
        h = torch.cat([hs[i][0] for i in c["eagle_aux_hidden_state_layer_ids"]], -1) @ w["fc.weight"].T
        # propose: "target_hidden_states = self.model.combine_hidden_states(...)" (the fc, once, on target states);
        # set_inputs_first_pass: input ids shifted by one, the next (anchor) token last, the target's positions
        ids, pos = torch.cat([prompt[1:], torch.tensor([anchor])]), torch.arange(len(prompt))
        toks, rows = [], []
        for _ in range(n):
            post, pre = model(ids, pos, h)
            # compute_logits: lm_head, then "logits_new[:, targets] = logits" with targets = arange(Vd) + d2t over a
            # -inf row of vocab_size; _greedy_sample: "compute_logits(hidden_states).argmax(dim=-1)"
            full = torch.full((c["vocab_size"],), float("-inf"))
            full[torch.arange(len(head)) + d2t] = post[-1] @ head.T
            toks.append(int(full.argmax()))
            rows.append(full.log_softmax(-1))
            # the draft loop: the drafted token at position + 1, "last_hidden_states, hidden_states = ..." with the
            # pre-norm hidden_states (not fc'd again) fed back
            ids, pos, h = torch.tensor([toks[-1]]), pos[-1:] + 1, pre[-1:]
    return toks, torch.stack(rows)


@pytest.mark.parametrize("reduced", [False, True])
def test_vllm_eagle3_forward_rebuilt_from_the_export_equals_nanospec(tq, reduced):
    """The Eagle3 export run the way vLLM runs it (fc once on hidden_states[i] of the +1 ids, [input_layernorm(embed) ;
    hidden_norm(h)] with the pre-norm h as residual, the pre-norm output fed back, d2t offsets) drafts nanospec's
    greedy chain with nanospec's probabilities."""
    vocab = sorted({*range(100, 130), *range(256, 262)}, reverse=True) if reduced else None
    d = drafter("eagle3", tq, vocab, layers=1)  # vLLM serves one layer (a deeper one is refused, below)
    c, sd = engine_files(d, "vllm")
    assert_same_chain(d, tq, lambda prompt: vllm_eagle3_chain(c, sd, tq, prompt, anchor=49, n=B))


@pytest.mark.parametrize("kind,engine,head,reason", [
    ("dspark", "vllm", "gated", "vanilla Markov head"), ("dspark", "llama.cpp", "rnn", "vanilla Markov head"),
    ("eagle3", "sglang", "vanilla", "q/k norms"), ("dspark", "sglang", "vanilla", "full head"),
    ("eagle3", "vllm", "vanilla", "layer 0 only")])
def test_refused_combinations_say_why(tq, kind, engine, head, reason):
    d = drafter(kind, tq, vocab=list(range(40)) if reason == "full head" else None, head=head)
    with pytest.raises(SystemExit, match=reason):
        engine_files(d, engine)


def test_cli_writes_bf16_and_prints_the_serve_command(tq, tmp_path, monkeypatch, capsys):
    import os
    import runpy

    from conftest import ROOT
    from safetensors.torch import load_file
    d = drafter("dspark", load_target("tiny-qwen3"), vocab=list(range(50, 90)))
    d.save_pretrained(str(tmp_path / "ckpt"))
    out = tmp_path / "vllm"
    for attempt in range(2):  # the second run refuses the existing folder
        monkeypatch.setattr("sys.argv", ["export.py", f"--checkpoint={tmp_path / 'ckpt'}", "--target=tiny-qwen3",
                                         f"--export_dir={out}"])
        if attempt:
            with pytest.raises(SystemExit, match="exists"):
                runpy.run_path(os.path.join(ROOT, "export.py"), run_name="__main__")
        else:
            runpy.run_path(os.path.join(ROOT, "export.py"), run_name="__main__")
    sd = load_file(out / "model.safetensors")
    assert sd["fc.weight"].dtype == torch.bfloat16 and sd["d2t"].dtype == torch.int64
    assert '"method": "dspark"' in capsys.readouterr().out
