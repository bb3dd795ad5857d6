"""Gemma-4 drafters: everything that differs from the Qwen3 drafters, in one place (GEMMA4.md).

DeepSpec trains DSpark, DFlash and Eagle3 for google/gemma-4-12B-it with the anchors, masks, heads, losses and
recipe of the Qwen3 drafters; only the layer differs, and every drafter layer takes the target's *global*
(full-attention) geometry. Against model_dflash's Qwen3 layer:

    RMSNorm     the weight multiplies in fp32, before the cast back (Qwen3: cast, then multiply); starts at 1
    embedding   E[ids] * sqrt(H), the scale rounded to the weight's dtype first (anchor, mask and Eagle3 tokens)
    attention   head dim global_head_dim (12B: 512), num_global_key_value_heads kv heads; K = V: no v_proj, the
                values are the raw keys through a weightless RMSNorm (v_norm), without RoPE; scores q.k * 1.0
    RoPE        "proportional" on the full head dim: the first quarter of the pairs rotate (model_dflash.rope_cos_sin)
    layer       sandwich norms x + post_attention_norm(attn(input_norm(x))), x + post_ffw_norm(mlp(pre_ffw_norm(x))),
                then x * layer_scalar (a saved buffer, 1 at init, never trained)
    MLP         GELU (tanh approximation) gates instead of SiLU
    logits      30 * tanh(z / 30) on the base logits, the Markov bias added after the cap (DraftModel.cap); the
                fused losses cap the target logits too (kernels' softcap)

The classes below are the Qwen3 ones with this mixin in front. Checkpoints are DeepSpec's Gemma layout: the target's
flat text config (no text_config) with architectures Gemma4DSparkModel (DSpark and DFlash) or Gemma4Eagle3Model,
layer_scalar saved, no v_proj under K = V. target.drafter_class picks the class from architectures[0].
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model_dflash import MLP, Attention, DFlash, RMSNorm, apply_rope
from model_dspark import DSpark
from model_eagle3 import Eagle3, Layer


def rms(x, eps):
    """x / rms(x) in fp32, back in x's dtype (the weightless v_norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    def forward(self, x):  # weight applied in fp32 before the cast (Gemma4RMSNorm)
        return (rms(x.float(), self.eps) * self.weight.float()).to(x.dtype)


class GemmaAttention(Attention):
    """K = V attention: one k_proj; keys k_norm(k) rotated, values v_norm(k) (a v_proj only without K = V)."""

    def __init__(self, H, nh, nkv, hd, eps, in_dim=None, k_eq_v=True):
        super().__init__(H, nh, nkv, hd, eps, in_dim)
        self.q_norm, self.k_norm, self.eps, self.scale = GemmaRMSNorm(hd, eps), GemmaRMSNorm(hd, eps), eps, 1.0
        if k_eq_v:
            self.v_proj = None

    def kv(self, x, cos, sin):
        k = self.k_proj(x).unflatten(-1, (self.nkv, self.hd))
        v = k if self.v_proj is None else self.v_proj(x).unflatten(-1, (self.nkv, self.hd))
        return apply_rope(self.k_norm(k), cos, sin), rms(v, self.eps)


class GemmaMLP(MLP):
    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    """DSpark/DFlash layer (model_dflash.DecoderLayer's contract) with sandwich norms and the layer scalar."""

    def __init__(self, H, nh, nkv, hd, I, eps, k_eq_v=True, in_dim=None):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = GemmaRMSNorm(H, eps), GemmaRMSNorm(H, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = GemmaRMSNorm(H, eps), GemmaRMSNorm(H, eps)
        self.self_attn = GemmaAttention(H, nh, nkv, hd, eps, in_dim, k_eq_v)
        self.mlp = GemmaMLP(H, I)
        self.register_buffer("layer_scalar", torch.ones(1))

    def feed_forward(self, x):
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar

    def forward(self, x, cos, sin, kc, vc, mask):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kc, vc, mask))
        return self.feed_forward(x)


class GemmaEagle3Layer(GemmaDecoderLayer):
    """Eagle3's layer (model_eagle3.Layer: input [embed ; hidden_norm(h)], residual = the feature h), Gemma's norms."""
    qkv = Layer.qkv

    def __init__(self, H, nh, nkv, hd, I, eps, k_eq_v=True):
        super().__init__(H, nh, nkv, hd, I, eps, k_eq_v, in_dim=2 * H)
        self.hidden_norm = GemmaRMSNorm(H, eps)

    def out(self, h, o):
        h = h + self.post_attention_layernorm(self.self_attn.o_proj(o.transpose(1, 2).flatten(2)))
        return self.feed_forward(h)


def flat_text_config(base):
    """transformers 5.24's Gemma-4 text config dict -> DeepSpec's flat one: the global layers' per_layer_config
    overrides become global_head_dim / num_global_key_value_heads, as transformers 5.10 (DeepSpec's) writes them."""
    c = {k: v for k, v in base.items() if k != "per_layer_config"}
    overrides = list((base.get("per_layer_config") or {}).values())  # one entry per full-attention layer
    if overrides and "global_head_dim" not in c:
        c["global_head_dim"] = overrides[0]["head_dim"]
        c["num_global_key_value_heads"] = overrides[0].get("num_key_value_heads")
    return c


class Gemma4:
    """The Gemma-4 half of a drafter class, placed first in its bases: Gemma4DSpark(Gemma4, DSpark)."""
    family, Norm = "gemma4", GemmaRMSNorm

    @staticmethod
    def geometry(c):  # the global layers' heads: K = V layers have their own (fewer) kv heads
        nkv = c.get("num_global_key_value_heads") if c.get("attention_k_eq_v") else None
        return c["num_attention_heads"], nkv or c["num_key_value_heads"], c.get("global_head_dim") or c["head_dim"]

    def make_layer(self, *geometry):
        layer = GemmaEagle3Layer if self.kind == "eagle3" else GemmaDecoderLayer
        return layer(*geometry, k_eq_v=bool(self.config.get("attention_k_eq_v")))

    def embed(self, ids):
        scale = torch.tensor(self.config["hidden_size"] ** 0.5, dtype=self.embed_tokens.weight.dtype)
        return self.embed_tokens(ids) * scale

    @classmethod
    def draft_config(cls, target, base, cfg):
        base = flat_text_config(base)
        kind = base.get("model_type") or "gemma4_unified_text"
        return {**super().draft_config(target, base, cfg), "target_text_model_type": kind,
                "target_model_type": kind.removesuffix("_text")}


class Gemma4DFlash(Gemma4, DFlash):
    architectures = ("Gemma4DSparkModel",)


class Gemma4DSpark(Gemma4, DSpark):
    architectures = ("Gemma4DSparkModel",)


class Gemma4Eagle3(Gemma4, Eagle3):
    architectures = ("Gemma4Eagle3Model",)
