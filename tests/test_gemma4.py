"""Gemma-4 drafters (GEMMA4.md): DeepSpec's checkpoint layout, the layer against transformers' own, decoding."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from model_dflash import rope_cos_sin
from model_gemma4 import Gemma4DSpark, GemmaDecoderLayer, flat_text_config
from target import drafter_class, load_target, new_drafter

pytestmark = pytest.mark.usefixtures("one_thread")
H, I, NH, NKV, HD, GHD, V, R, N_TAPS = 64, 96, 4, 2, 16, 32, 300, 8, 3


def gemma_text_config(layer_types, k_eq_v=True):
    return transformers.Gemma4UnifiedTextConfig(
        vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=len(layer_types), num_attention_heads=NH,
        num_key_value_heads=NKV, head_dim=HD, global_head_dim=GHD, num_global_key_value_heads=1,
        attention_k_eq_v=k_eq_v, final_logit_softcapping=30.0, layer_types=layer_types)


# -----------------------------------------------------------------------------
# a checkpoint written from GEMMA4.md alone (s.2 config fields, s.3 keys and shapes), not by our code

def spec_config(kind, head="vanilla"):
    """The flat text config DeepSpec writes (transformers 5.10 field names), at tiny sizes."""
    c = {"model_type": "gemma4_unified_text", "vocab_size": V, "hidden_size": H, "intermediate_size": I,
         "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": HD, "global_head_dim": GHD,
         "num_global_key_value_heads": 1, "attention_k_eq_v": True, "hidden_activation": "gelu_pytorch_tanh",
         "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0, "sliding_window": 1024, "attention_bias": False,
         "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                "rope_theta": 1000000.0}},
         "tie_word_embeddings": False, "target_model_type": "gemma4_unified",
         "target_text_model_type": "gemma4_unified_text", "num_target_layers": 8, "target_layer_ids": [1, 3, 5]}
    if kind == "eagle3":
        return {**c, "architectures": ["Gemma4Eagle3Model"], "num_hidden_layers": 1, "draft_num_hidden_layers": 1,
                "layer_types": ["full_attention"], "ttt_length": 7, "step_loss_decay": 0.8,
                "target_model_name_or_path": "google/gemma-4-12B-it"}
    c = {**c, "architectures": ["Gemma4DSparkModel"], "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2,
         "block_size": 7, "mask_token_id": 4, "num_anchors": 512}
    if kind == "dflash":
        return {**c, "markov_rank": 0, "enable_confidence_head": False}
    return {**c, "markov_rank": R, "markov_head_type": head, "enable_confidence_head": True,
            "confidence_head_with_markov": True}


def spec_keys(kind, head="vanilla"):
    """GEMMA4.md s.3: every key and its shape (K = V: no v_proj; v_norm has no weight; layer_scalar saved)."""
    keys = {"embed_tokens.weight": [V, H], "fc.weight": [H, N_TAPS * H], "norm.weight": [H], "lm_head.weight": [V, H]}
    layers, width = (1, 2 * H) if kind == "eagle3" else (2, H)
    for i in range(layers):
        p = f"layers.{i}."
        keys.update({p + n + ".weight": [H] for n in ("input_layernorm", "post_attention_layernorm",
                                                      "pre_feedforward_layernorm", "post_feedforward_layernorm")})
        keys.update({p + "layer_scalar": [1], p + "self_attn.q_proj.weight": [NH * GHD, width],
                     p + "self_attn.k_proj.weight": [GHD, width], p + "self_attn.o_proj.weight": [H, NH * GHD],
                     p + "self_attn.q_norm.weight": [GHD], p + "self_attn.k_norm.weight": [GHD],
                     p + "mlp.gate_proj.weight": [I, H], p + "mlp.up_proj.weight": [I, H], p + "mlp.down_proj.weight": [H, I]})
        if kind == "eagle3":
            keys[p + "hidden_norm.weight"] = [H]
    if kind != "eagle3":
        keys["hidden_norm.weight"] = [H]
    if kind == "dspark":
        keys.update({"markov_head.markov_w1.weight": [V, R], "markov_head.markov_w2.weight": [V, R],
                     "confidence_head.proj.weight": [1, H + R], "confidence_head.proj.bias": [1]})
        if head == "gated":
            keys.update({"markov_head.gate_proj.weight": [R, H + R], "markov_head.gate_proj.bias": [R]})
        if head == "rnn":
            keys.update({"markov_head.joint_proj.weight": [3 * R, 2 * R + H], "markov_head.joint_proj.bias": [3 * R]})
    return keys


@pytest.mark.parametrize("kind,head", [("dspark", "vanilla"), ("dspark", "gated"), ("dspark", "rnn"),
                                       ("dflash", None), ("eagle3", None)])
def test_deepspec_gemma_checkpoint_from_the_spec_loads(tmp_path, kind, head):
    """A Gemma checkpoint assembled from GEMMA4.md's config fields and key list loads strictly (no missing or
    unexpected key) into the class its architectures name, with every tensor as written, and runs."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in spec_keys(kind, head).items()}
    for k in sd:
        if k.endswith("layer_scalar"):
            sd[k] = torch.tensor([0.75])
    cfg = spec_config(kind, head)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    cls = drafter_class(cfg)
    assert cls.__name__ == {"dspark": "Gemma4DSpark", "dflash": "Gemma4DFlash", "eagle3": "Gemma4Eagle3"}[kind]
    model = cls.from_pretrained(str(tmp_path))
    got = model.state_dict()
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    if kind == "dspark":
        assert model.head_type == head and model.has_confidence
    # the saved file round-trips in the same layout
    model.save_pretrained(str(tmp_path / "again"))
    again = cls.from_pretrained(str(tmp_path / "again"))
    assert set(again.state_dict()) == set(sd) and again.config["architectures"] == cfg["architectures"]
    # and trains: one loss on a random batch (the fused losses with soft-capping)
    T = 24
    batch = {"input_ids": torch.randint(V, (1, T), generator=g), "loss_mask": torch.ones(1, T, dtype=torch.long),
             "taps": torch.randn(1, T, N_TAPS * H, generator=g), "last_hidden": torch.randn(1, T, H, generator=g),
             "lengths": torch.tensor([T])}
    loss, _ = model(batch, [torch.Generator().manual_seed(1)])
    assert torch.isfinite(loss)


def test_qwen_class_refuses_a_gemma_checkpoint(tmp_path):
    """Loading a Gemma checkpoint with the Qwen3 class is a named error, not a Qwen3-shaped model."""
    from model_dspark import DSpark
    cfg = spec_config("dspark")
    save_file({k: torch.zeros(s) for k, s in spec_keys("dspark").items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="drafter_class"):
        DSpark.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# the layer and the RoPE against transformers' Gemma-4 (all layers full attention, context empty)

def test_rope_matches_transformers_proportional():
    cfg = gemma_text_config(["full_attention"] * 2)
    rot = transformers.models.gemma4_unified.modeling_gemma4_unified.Gemma4UnifiedTextRotaryEmbedding(cfg)
    pos = torch.tensor([0, 1, 5, 77, 4000])
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos[None], "full_attention")
    mine = rope_cos_sin(flat_text_config(cfg.to_dict()), pos, GHD)
    assert torch.allclose(mine[0], cos[0], atol=1e-6) and torch.allclose(mine[1], sin[0], atol=1e-6)
    assert (mine[1][:, GHD // 8:GHD // 2] == 0).all()  # only the first quarter of the pairs rotates


@pytest.mark.parametrize("k_eq_v", [True, False])
def test_layer_matches_transformers_decoder_layer(k_eq_v):
    """GemmaDecoderLayer with an empty context and a causal mask is transformers' Gemma4UnifiedTextDecoderLayer
    (same state-dict keys: loaded strictly); a Qwen3-style score scaling would not match."""
    from transformers.models.gemma4_unified import modeling_gemma4_unified as hf
    cfg = gemma_text_config(["full_attention"] * 2, k_eq_v)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.Gemma4UnifiedTextDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in n else torch.randn_like(p) * 0.1)
        ref.layer_scalar.fill_(0.6)
    nkv = 1 if k_eq_v else NKV
    mine = GemmaDecoderLayer(H, NH, nkv, GHD, I, 1e-6, k_eq_v=k_eq_v)
    mine.load_state_dict(ref.state_dict(), strict=True)
    Q = 9
    x, pos = torch.randn(Q, H), torch.arange(3, 3 + Q)
    cos, sin = rope_cos_sin(flat_text_config(cfg.to_dict()), pos, GHD)
    causal = torch.ones(Q, Q, dtype=torch.bool).tril()
    empty = torch.zeros(0, nkv, GHD)
    with torch.no_grad():
        rot = hf.Gemma4UnifiedTextRotaryEmbedding(cfg)(x, pos[None], "full_attention")
        want = ref(x[None], shared_kv_states={}, position_embeddings=rot, position_ids=pos[None],
                   attention_mask=torch.zeros(Q, Q).masked_fill(~causal, float("-inf"))[None, None])[0]
        got = mine(x, cos, sin, empty, empty, causal)
        assert (got - want).abs().max() < 1e-5
        mine.self_attn.scale = None  # mutation: Qwen3's hd^-0.5 scores
        assert (mine(x, cos, sin, empty, empty, causal) - want).abs().max() > 1e-3


def test_embedding_and_capped_logits_match_the_target():
    """The drafter embeds as the target (E[ids] * sqrt(H)) and caps its base logits as the target (30 tanh(z/30))."""
    t = load_target("tiny-gemma4")
    d = new_drafter("dflash", t, {"num_draft_layers": 1})
    ids = torch.arange(40)
    with torch.no_grad():
        assert torch.allclose(d.embed(ids), t.model.get_input_embeddings()(ids), atol=1e-6)
        h = torch.randn(5, t.config.hidden_size) * 200
        assert torch.allclose(d.cap(h @ d.lm_head.weight.T), t.logits(h), atol=1e-5)
        assert (t.logits(h).abs() < 30).all() and (h @ d.lm_head.weight.T).abs().max() > 30  # the cap binds


def test_gemma4_12b_drafter_parameter_count_on_meta():
    """DSpark for Gemma-4-12B's published geometry (GEMMA4.md s.1) on the meta device: ~3.43 B parameters with
    the frozen embedding and head (s.3), no download; the checkpoint keys hold no v_proj (K = V)."""
    from bench import GEMMA4_12B
    with torch.device("meta"):
        d = Gemma4DSpark.from_target(transformers.Gemma4UnifiedTextConfig(**GEMMA4_12B),
                                     target_layer_ids=[5, 17, 29, 41, 46], mask_token_id=4)
    n = sum(p.numel() for p in d.parameters())
    frozen = d.embed_tokens.weight.numel() + d.lm_head.weight.numel()
    assert abs(n - 3.43e9) < 0.01e9 and abs(frozen - 2.01e9) < 0.01e9, (n, frozen)
    assert d.layers[0].self_attn.q_proj.weight.shape == (8192, 3840) and d.layers[0].self_attn.k_proj.weight.shape == (512, 3840)
    assert not any("v_proj" in k for k in d.state_dict()) and d.config["global_head_dim"] == 512
    assert d.config["architectures"] == ["Gemma4DSparkModel"] and "per_layer_config" not in d.config


# -----------------------------------------------------------------------------
# decoding on tiny-gemma4 (sliding and K = V global layers, soft-capped logits): lossless, chain and tree

@pytest.fixture(scope="module")
def sharp_gemma():
    from helpers import sharpened_target
    return sharpened_target("tiny-gemma4", 60.0)


def gemma_drafter(kind, t):
    torch.manual_seed(0)
    return new_drafter(kind, t, {"num_draft_layers": 1, "block_size": 4, "ttt_length": 4, "markov_rank": 16}).eval()


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_greedy_speculative_equals_plain_greedy(sharp_gemma, kind):
    """Chains and trees on tiny-gemma4 reproduce plain greedy decoding; the prompts outgrow the sliding window
    (16), so rejected drafts are cropped from sliding-window caches too."""
    import evaluate as E
    t, d = sharp_gemma, gemma_drafter(kind, sharp_gemma)
    assert type(d).__name__.startswith("Gemma4")
    for text in ["Count: 1 2 3 4 5 6 7 8 9 10 11 12", "The quick brown fox jumps over the lazy dog."]:
        ids = t.render_prompt([{"role": "user", "content": text}])
        want = E.plain_generate(t, ids, 24)[0]
        for budget in (0, 6):
            assert E.speculative_generate(t, d, ids, 24, tree_budget=budget)["ids"] == want, (kind, budget, text)


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3"])
def test_sampled_law_at_temperature_one(sharp_gemma, kind):
    """Temperature 1: the first 3 tokens of speculative sampling (chains of 2) follow the target's exact law."""
    import evaluate as E
    from test_evaluate import chi2_test, exact_law
    t, d, warp, N = sharp_gemma, gemma_drafter(kind, sharp_gemma), dict(temperature=1.0, top_k=0, top_p=1.0), 300
    ids = t.render_prompt([{"role": "user", "content": "Count: 1 2 3"}])
    law, g = exact_law(t, ids, 3, warp), torch.Generator().manual_seed(N)
    samples = [tuple(E.speculative_generate(t, d, ids, 3, num_drafts=2, generator=g, **warp)["ids"]) for _ in range(N)]
    pval, cells = chi2_test(samples, law, N)
    assert cells >= 5 and pval > 1e-3, (kind, pval, cells)


# -----------------------------------------------------------------------------
# the pipeline: build_cache.py, train.py, evaluate.py with configs/tiny.py --target=tiny-gemma4

def test_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    """Answers and features from tiny-gemma4, each drafter trained (offline and online), saved in DeepSpec's Gemma
    layout (flat config, layer_scalar saved, no v_proj), and evaluated greedy with the lossless check on."""
    import runpy
    from conftest import EVAL_DIR, ROOT
    from safetensors import safe_open
    monkeypatch.chdir(ROOT)

    def run(script, *args):
        monkeypatch.setattr("sys.argv", [script, "configs/tiny.py", "--target=tiny-gemma4", *args])
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")

    cache = str(tmp_path / "cache")
    run("build_cache.py", f"--cache_dir={cache}", "--num_answers=8", "--gen_max_new_tokens=16")
    for kind, mode in (("dspark", "offline"), ("dflash", "online"), ("eagle3", "online")):
        out = str(tmp_path / kind)
        run("train.py", f"--drafter={kind}", f"--cache_dir={cache}", f"--out_dir={out}", f"--data_mode={mode}",
            "--max_steps=2", "--global_batch_size=2", "--micro_batch_size=2", "--save_interval=2")
        ckpt = os.path.join(out, "step_latest")
        cfg = json.load(open(os.path.join(ckpt, "config.json")))
        assert cfg["architectures"] == ["Gemma4Eagle3Model" if kind == "eagle3" else "Gemma4DSparkModel"]
        assert "text_config" not in cfg and "per_layer_config" not in cfg and cfg["global_head_dim"] == 32
        keys = list(safe_open(os.path.join(ckpt, "model.safetensors"), "pt").keys())
        assert "layers.0.layer_scalar" in keys and not any("v_proj" in k for k in keys)
        if EVAL_DIR:
            run("evaluate.py", f"--checkpoint={ckpt}", "--task=gsm8k", "--num_prompts=1", "--max_new_tokens=12",
                f"--data_dir={EVAL_DIR}", "--check_greedy=True", f"--out={tmp_path / kind}.json")
            assert json.load(open(f"{tmp_path / kind}.json"))["overall"]["new_tokens"] > 0
