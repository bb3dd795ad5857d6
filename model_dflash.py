"""DFlash: a parallel block drafter with KV injection (DSpark paper s.2.2, REFERENCE.md s.2).

A small Qwen3-style decoder (geometry copied from the target, 5 layers by default) drafts a block of
B tokens in ONE forward pass:

    H_ctx  = hidden_norm(fc([h_l1 | ... | h_l5]))                  eq. (2): target features -> context
    K_i    = [k_proj(H_ctx) ; k_proj(h)],  V_i likewise             eq. (3): context = extra keys/values
    input  = [anchor, mask x (B-1)] at positions p..p+B-1           slot k predicts x_{p+k+1}
    U_k    = lm_head(norm(h_k))                                      frozen target embedding and head

Block queries see the context strictly before the anchor (pos < p: the anchor's own features are not
known yet at inference) plus their own block, bidirectionally; context tokens get no queries.
Training draws up to num_anchors anchors per sequence (positions p with loss_mask[p] = loss_mask[p+1]
= 1), trains all their blocks in one forward, and minimizes the CE of eq. (9) with w_k = exp(-k/gamma)
on the supervised prefix of each block. Decoding (start / propose / next_probs / commit) keeps an
incremental cache of context keys/values. Checkpoints use DeepSpec's layout (REFERENCE.md s.5).
Optional reduced draft vocabulary, in the engines' convention (SERVING.md): lm_head holds the target head's
rows of the draft vocabulary [Vd, H], buffer d2t [Vd] the offsets (target id = i + d2t[i]), t2d [V] which target
ids are in it; draft distributions are scattered back to the full vocabulary (zero elsewhere).

The layer building blocks (RMSNorm, RoPE, Attention, MLP, init) and DraftModel, what every drafter shares
(construction from a target, the frozen embedding and head, the reduced vocabulary, checkpoint files), live
here too: model_dspark.py and model_eagle3.py import them, and model_gemma4.py swaps in Gemma-4's layer.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kernels
from configurator import atomic_path
from target import default_layer_ids

# drafter config keys of the shared contract (DESIGN.md); a drafter ignores the ones it does not use
CFG_KEYS = {"target_layer_ids", "block_size", "num_draft_layers", "mask_token_id", "markov_rank",
            "markov_head_type", "enable_confidence_head", "ttt_length", "step_loss_decay",
            "loss_decay_gamma", "num_anchors", "draft_vocab_size", "target_name"}
FROZEN = ("embed_tokens.weight", "lm_head.weight")  # copied from the target, never trained
FORMAT = 2  # config["nanospec"]["version"]: 2 = the engines' reduced-vocabulary convention; 1 = absolute d2t, full head


def write_checkpoint(path, sd, config):
    """path/model.safetensors (the state dict sd, on the CPU) and path/config.json, each written atomically."""
    with atomic_path(os.path.join(path, "model.safetensors")) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt"})
    with atomic_path(os.path.join(path, "config.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, default=str)


def vocab_maps(ids, vocab_size):
    """Target ids of a draft vocabulary [Vd] -> the engines' maps: d2t [Vd] offsets (id = i + d2t[i]), t2d [V] mask."""
    return ids - torch.arange(len(ids), device=ids.device), \
        torch.zeros(vocab_size, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)


def upgrade(sd, vocab_size):
    """A state dict of format 1 (d2t = absolute ids, no t2d, lm_head [V, H] or omitted) -> format 2, in place."""
    if "d2t" in sd and "t2d" not in sd:
        ids = sd["d2t"]
        sd["d2t"], sd["t2d"] = vocab_maps(ids, vocab_size)
        if sd.get("lm_head.weight") is not None and len(sd["lm_head.weight"]) == vocab_size:
            sd["lm_head.weight"] = sd["lm_head.weight"][ids]
    return sd


def init_weights(m):
    """HF-style init (DeepSpec's post_init): N(0, 0.02) weights, zero biases; norms start at 1."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def rope_cos_sin(config, pos, dim):
    """RoPE tables for positions pos [N] -> cos, sin [N, dim] fp32 (HF rotate-half layout); reads
    `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (older configs, DeepSpec's)."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rp = rp.get("full_attention", rp)  # per-layer-type parameters (Gemma-4): drafter layers are full attention
    theta = rp.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", rp.get("type", "default"))
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=pos.device).float() / dim)  # [dim/2]
    if kind == "linear":
        inv = inv / rp["factor"]
    elif kind == "llama3":  # Llama 3.x: long wavelengths slowed by `factor`, a smooth ramp in between
        lo, hi, old = rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        smooth = ((old * inv / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)
        inv = (1 - smooth) * inv / rp["factor"] + smooth * inv
    elif kind == "proportional":  # Gemma-4: the first factor*dim/2 pairs rotate, at theta^(-2j/dim); the rest do not
        inv[int(rp.get("partial_rotary_factor", 1.0) * dim // 2):] = 0
    elif kind != "default":
        raise NotImplementedError(f"rope_type {kind!r} is not supported (default, linear, llama3, proportional are)")
    ang = pos.float()[:, None] * inv  # [N, dim/2]
    ang = torch.cat([ang, ang], -1)  # [N, dim]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x [..., N, heads, hd] rotated by the angles of its position (cos, sin [N, hd])."""
    x1, x2 = x.chunk(2, -1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in fp32, scale in the input dtype (as Qwen3RMSNorm)
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def family(c):
    """Which layer family a drafter or target config (flat) belongs to: "gemma4" or "qwen3" (Qwen3/Llama style)."""
    arch = (c.get("architectures") or [""])[0] or ""
    return "gemma4" if arch.startswith("Gemma4") or str(c.get("model_type", "")).startswith("gemma4") else "qwen3"


def check_supported(c, want="qwen3"):
    """A drafter class builds only its own family's layers; target.drafter_class(config) picks the class."""
    if family(c) != want:
        raise ValueError(f"a {family(c)} config given to a {want} drafter class: load it with target.drafter_class")
    if want == "qwen3" and ("text_config" in c or c.get("hidden_act", "silu") != "silu"
                            or "gemma" in c.get("model_type", "")):
        raise NotImplementedError("only Qwen3/Llama-style (SiLU MLP, flat config) and Gemma-4 targets are supported")


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm (Qwen3) whose keys/values are [context ; block], eq. (3).
    Eagle3 uses the same projections on a 2H-wide input (in_dim) with its own attention pattern."""

    def __init__(self, H, nh, nkv, hd, eps, in_dim=None):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, hd
        in_dim = in_dim or H
        self.q_proj = nn.Linear(in_dim, nh * hd, bias=False)
        self.k_proj = nn.Linear(in_dim, nkv * hd, bias=False)
        self.v_proj = nn.Linear(in_dim, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, eps)
        self.k_norm = RMSNorm(hd, eps)
        self.scale = None  # scores q.k * scale; None = hd^-0.5 (Gemma-4: 1.0)

    def q(self, x, cos, sin):
        """x [..., N, in_dim] -> rotated queries [..., N, nh, hd]."""
        return apply_rope(self.q_norm(self.q_proj(x).unflatten(-1, (self.nh, self.hd))), cos, sin)

    def kv(self, x, cos, sin):
        """x [..., N, in_dim] -> rotated keys, values [..., N, nkv, hd] (DFlash: context and block tokens alike)."""
        k = self.k_norm(self.k_proj(x).unflatten(-1, (self.nkv, self.hd)))
        return apply_rope(k, cos, sin), self.v_proj(x).unflatten(-1, (self.nkv, self.hd))

    def forward(self, x, cos, sin, kc, vc, mask=None):
        """x [Q, H] block tokens; kc, vc [S, nkv, hd] context keys/values; mask [Q, S+Q] bool (True = see)."""
        q = self.q(x, cos, sin)  # [Q, nh, hd]
        k, v = self.kv(x, cos, sin)
        k, v = torch.cat([kc, k]), torch.cat([vc, v])  # [S+Q, nkv, hd]: K_i = [W_K H_ctx ; W_K H_d]
        g = self.nh // self.nkv  # GQA: query head j reads kv head j // g; repeating keeps SDPA's fused kernels
        k, v = k.transpose(0, 1).repeat_interleave(g, 0), v.transpose(0, 1).repeat_interleave(g, 0)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=self.scale)  # [nh, Q, hd]
        return self.o_proj(o.transpose(0, 1).reshape(len(x), -1))


class MLP(nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    """Pre-norm Qwen3 layer; only the block tokens flow through it, the context enters as keys/values."""

    def __init__(self, H, nh, nkv, hd, I, eps):
        super().__init__()
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(H, nh, nkv, hd, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.mlp = MLP(H, I)

    def forward(self, x, cos, sin, kc, vc, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kc, vc, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DraftModel(nn.Module):
    """What DFlash, DSpark and Eagle3 share: construction from a target (the config contract of DESIGN.md),
    the frozen target embedding and head, the reduced draft vocabulary, and DeepSpec's checkpoint files.

    A drafter sets `kind`, `architectures`, `normalize_over_ranks` and `proposal_length`; builds embed_tokens, fc,
    its layers (make_layer), ... and the head (make_head) in __init__ from its config.json dict (which draft_config
    writes); and trains (forward) and decodes (start, propose, next_probs, commit) as DESIGN.md says.
    """
    has_confidence = False  # DSpark with a confidence head: propose also returns c_k (scheduler.py uses it)
    family, Norm = "qwen3", RMSNorm  # the layer family; model_gemma4.py swaps in Gemma-4's building blocks

    @staticmethod
    def geometry(c):
        """(heads, kv heads, head dim) of the drafter's attention: the target's."""
        return c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"], \
            c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]

    def embed(self, ids):
        """Token embeddings (frozen target rows; Gemma-4 scales them)."""
        return self.embed_tokens(ids)

    @property
    def softcap(self):  # the target's final-logit soft-capping c (Gemma-4: 30), None without
        return self.config.get("final_logit_softcapping")

    def cap(self, z):
        """Base draft logits as the target's: c * tanh(z / c) with soft-capping, else z unchanged."""
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    @classmethod
    def from_target(cls, target, **cfg):
        """Build from a target.Target (frozen embedding/head copied) or a bare HF config (weights at init).
        cfg: keys of CFG_KEYS; a drafter ignores those it does not use, None = the default."""
        unknown = sorted(set(cfg) - CFG_KEYS)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_target: unknown config keys {unknown}; valid: {sorted(CFG_KEYS)}")
        cfg = {k: v for k, v in cfg.items() if v is not None}
        is_target = hasattr(target, "lm_head_weight")
        hf = target.config if is_target else getattr(target, "text_config", None) or target  # Gemma nests it
        base = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        ids = cfg.get("target_layer_ids") or getattr(target, "layer_ids", None) or \
            default_layer_ids(base["num_hidden_layers"])
        cfg["target_layer_ids"] = [int(i) for i in ids]
        model = cls(cls.draft_config(target, base, cfg))
        if is_target:  # nanospec's own field (DeepSpec ignores it): which vocabulary the drafter was trained on
            model.config["vocab_fingerprint"] = target.vocab_fingerprint
            with torch.no_grad():
                model.embed_tokens.weight.copy_(target.embed_weight)
                ids = model.draft_ids
                model.lm_head.weight.copy_(target.lm_head_weight if ids is None else target.lm_head_weight[ids])
        return model

    def make_head(self, c):
        """The frozen head lm_head [Vd, H] (the target's, or its rows of a reduced draft vocabulary) and, when reduced,
        the engines' maps d2t [Vd] (offsets: target id = i + d2t[i]) and t2d [V] (bool); placeholder ids 0..Vd-1."""
        V, vd = c["vocab_size"], c.get("draft_vocab_size") or 0
        self.lm_head = nn.Linear(c["hidden_size"], vd or V, bias=False)
        self.register_buffer("d2t", torch.zeros(vd, dtype=torch.long) if vd else None)
        self.register_buffer("t2d", torch.arange(V) < vd if vd else None)

    @property
    def draft_ids(self):  # the target id of each draft-vocab entry [Vd] (None: the full vocabulary)
        return None if self.d2t is None else self.d2t + torch.arange(len(self.d2t), device=self.d2t.device)

    def to_full(self, p):
        """Draft-vocab distributions [..., Vd] -> full vocabulary [..., V] (zero outside the draft vocab)."""
        if self.d2t is None:
            return p
        out = p.new_zeros(*p.shape[:-1], self.config["vocab_size"])
        out[..., self.draft_ids] = p
        return out

    def set_draft_vocab(self, token_ids, head=None):
        """Restrict the draft head to token_ids (e.g. the most frequent answer tokens): their rows of the full target
        head `head` [V, H] (default: this drafter's own, while it still has the full vocabulary)."""
        V, head = self.config["vocab_size"], self.lm_head.weight if head is None else head
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.lm_head.weight.device)
        if len(ids.unique()) != len(ids) or ids.min() < 0 or ids.max() >= V:
            raise ValueError("set_draft_vocab: token ids must be distinct target ids")
        if len(head) != V:
            raise ValueError("set_draft_vocab: the head is already reduced: pass the target's full head=")
        self.lm_head = nn.Linear(head.shape[1], len(ids), bias=False, device=ids.device, dtype=head.dtype)
        self.lm_head.weight = nn.Parameter(head.detach()[ids.to(head.device)].to(ids.device), requires_grad=False)
        self.d2t, self.t2d = vocab_maps(ids, V)
        self.config["draft_vocab_size"] = len(ids)

    # --- checkpoints (DeepSpec layout: config.json + model.safetensors, keys without prefix) ----

    def save_pretrained(self, path, include_frozen=True):
        """Write config.json + model.safetensors, each atomically; include_frozen=False omits
        embed_tokens/lm_head (re-tied from the target by from_pretrained)."""
        write_checkpoint(path, {k: v for k, v in self.state_dict().items() if include_frozen or k not in FROZEN},
                         self.config)

    @classmethod
    def check_checkpoint(cls, config, path):
        """Refuse another drafter's checkpoint, naming the class that loads it (DFlash and Eagle3 say how)."""

    @classmethod
    def from_pretrained(cls, path, target=None):
        """Load ours or DeepSpec's checkpoint (a folder, or a hub id: downloaded, untested here) in fp32;
        strict: a missing or unexpected key is an error naming it, except the frozen embed_tokens/lm_head of a
        checkpoint saved with include_frozen=False, which are re-tied from `target`."""
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download  # hub ids only (no network in CI)
            path = snapshot_download(path, allow_patterns=["config.json", "*.safetensors"])
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        cls.check_checkpoint(config, path)
        with torch.device("meta"):  # no init: every tensor comes from the file (or the target)
            model = cls(config)
        sd = upgrade(load_file(os.path.join(path, "model.safetensors")), config["vocab_size"])
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if set(missing) - set(FROZEN) or unexpected:
            raise ValueError(f"{path}: checkpoint does not match {cls.__name__}: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        if missing:  # saved with include_frozen=False: re-tie the frozen embedding and head
            if target is None:
                raise ValueError(f"{path} omits {missing} (saved with include_frozen=False): pass target=")
            head = target.lm_head_weight  # a reduced vocabulary's rows: ids i + d2t[i]
            if "d2t" in sd:
                head = head[(sd["d2t"] + torch.arange(len(sd["d2t"]))).to(head.device)]
            frozen = {"embed_tokens.weight": target.embed_weight, "lm_head.weight": head}
            sd.update({k: frozen[k] for k in missing})
        sd = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
        model.load_state_dict(sd, assign=True)  # assign keeps each parameter's requires_grad (frozen stay frozen)
        return model


class DFlash(DraftModel):
    kind = "dflash"
    architectures = ("Qwen3DSparkModel",)  # DeepSpec's name for DSpark and DFlash alike
    normalize_over_ranks = True  # train.py divides each micro-step's loss by its weight summed over ranks (DeepSpec)

    def __init__(self, config):
        """config: the dict of config.json (target fields + drafter fields), see draft_config."""
        super().__init__()
        c = self.config = dict(config)
        check_supported(c, self.family)
        H, V, eps = c["hidden_size"], c["vocab_size"], c.get("rms_norm_eps", 1e-6)
        nh, nkv, self.hd = self.geometry(c)
        self.block_size, self.mask_token_id = c["block_size"], c["mask_token_id"]
        self.num_anchors, self.gamma = c.get("num_anchors", 512), c.get("loss_decay_gamma", 4.0)
        self.embed_tokens = nn.Embedding(V, H)  # frozen target embedding
        self.fc = nn.Linear(len(c["target_layer_ids"]) * H, H, bias=False)  # W_c of eq. (2)
        self.hidden_norm = self.Norm(H, eps)
        self.layers = nn.ModuleList(self.make_layer(H, nh, nkv, self.hd, c["intermediate_size"], eps)
                                    for _ in range(c["num_hidden_layers"]))
        self.norm = self.Norm(H, eps)
        self.make_head(c)  # the frozen target head [V or Vd, H]
        self.apply(init_weights)
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    @property
    def proposal_length(self):  # drafts proposed per round by default: one block
        return self.block_size

    def make_layer(self, *geometry):
        return DecoderLayer(*geometry)

    @staticmethod
    def head_config(cfg):  # config fields of the sequential/confidence heads: DFlash has neither
        return {"markov_rank": 0, "enable_confidence_head": False}

    @classmethod
    def draft_config(cls, target, base, cfg):
        """config.json of a new drafter: the target's config `base` plus DeepSpec's DSpark/DFlash fields."""
        n = cfg.get("num_draft_layers", 5)
        mask_id = cfg.get("mask_token_id", getattr(target, "mask_token_id", None))
        return {**base, "architectures": [cls.architectures[0]], "num_hidden_layers": n,
                "num_target_layers": base["num_hidden_layers"], "block_size": cfg.get("block_size", 7),
                "target_layer_ids": cfg["target_layer_ids"],
                # a target without a reserved mask token: the last id, recorded in the config
                "mask_token_id": int(base["vocab_size"] - 1 if mask_id is None else mask_id),
                "num_anchors": cfg.get("num_anchors", 512), "layer_types": ["full_attention"] * n,
                "tie_word_embeddings": False, **cls.head_config(cfg),
                # nanospec's own fields (DeepSpec ignores them)
                "draft_vocab_size": cfg.get("draft_vocab_size", 0), "loss_decay_gamma": cfg.get("loss_decay_gamma", 4.0),
                "nanospec": {"drafter": cls.kind, "version": FORMAT,
                             "target_name": cfg.get("target_name", getattr(target, "name", ""))}}

    @classmethod
    def check_checkpoint(cls, config, path):
        if cls.kind == "dflash" and (config.get("markov_rank") or config.get("enable_confidence_head")):
            raise ValueError(f"{path} is a DSpark checkpoint (markov_rank={config.get('markov_rank')}, "
                             f"confidence head={config.get('enable_confidence_head')}): load it with DSpark")

    # --- the backbone -------------------------------------------------------------------------

    def context_kv(self, taps, pos):
        """Target features taps [S, n*H] at positions pos [S] -> per layer (keys, values) [S, nkv, hd]."""
        ctx = self.hidden_norm(self.fc(taps.to(self.fc.weight.dtype)))  # H_ctx, eq. (2)
        cos, sin = rope_cos_sin(self.config, pos, self.hd)  # context keys sit at their own positions
        return [layer.self_attn.kv(ctx, cos, sin) for layer in self.layers]

    def backbone(self, ids, pos, ctx, mask=None):
        """Block tokens ids [Q] at positions pos [Q] against context ctx (context_kv) -> h [Q, H] (final norm)."""
        x = self.embed(ids)
        cos, sin = rope_cos_sin(self.config, pos, self.hd)
        for layer, (kc, vc) in zip(self.layers, ctx):
            x = layer(x, cos, sin, kc, vc, mask)
        return self.norm(x)

    # --- training -----------------------------------------------------------------------------

    def sample_anchors(self, loss_mask, generators=None):
        """Up to num_anchors anchors per sequence among p with loss_mask[p] = loss_mask[p+1] = 1 -> seq, pos [NB].

        Each sequence draws with its own generator, so its anchors never depend on the batch composition.
        """
        ok = (loss_mask[:, :-1] > 0) & (loss_mask[:, 1:] > 0)  # [B, T-1]
        if isinstance(generators, torch.Generator):  # one shared generator works, but then depends on the batch
            generators = [generators] * len(ok)
        seq, pos = [], []
        for b in range(len(ok)):
            cand = ok[b].nonzero().squeeze(1)
            g = generators[b] if generators is not None else None
            pick = torch.randperm(len(cand), generator=g, device=g.device if g is not None else "cpu")
            pos.append(cand[pick[:self.num_anchors].to(cand.device)].sort().values)
            seq.append(torch.full_like(pos[-1], b))
        return torch.cat(seq), torch.cat(pos)

    def block_hidden(self, input_ids, taps, seq, pos):
        """Backbone outputs h [NB, K, H] of the blocks anchored at (seq[i], pos[i]), all in ONE forward.

        Queries = all NB*K block tokens of the batch; keys = [context tokens of the batch ; block tokens].
        Memory: the mask is Q x (Tc + Q) booleans (Q = NB*K, Tc <= B*T), e.g. 3584 x 7680 = 27 MB for
        one 4096-token sequence with 512 anchors; SDPA's fused CUDA kernel never holds the nh x Q x (Tc+Q)
        scores (CPU's math fallback does: fine at test sizes). With several sequences per batch the
        cross-sequence part of the mask is wasted work (DeepSpec trains one sequence per GPU).
        """
        B, T = input_ids.shape
        K, dev = self.block_size, input_ids.device
        last = torch.zeros(B, dtype=torch.long, device=dev).scatter_reduce(0, seq, pos, "amax")
        cb, ct = (torch.arange(T, device=dev)[None] < last[:, None]).nonzero(as_tuple=True)  # [Tc] seen context
        ctx = self.context_kv(taps[cb, ct], ct)
        ids = torch.full((len(seq), K), self.mask_token_id, dtype=torch.long, device=dev)
        ids[:, 0] = input_ids[seq, pos]  # [anchor, mask x (K-1)]
        qpos = pos[:, None] + torch.arange(K, device=dev)  # [NB, K] absolute positions p..p+K-1
        qseq, qanc = seq.repeat_interleave(K), pos.repeat_interleave(K)  # per query: its sequence and anchor
        qblk = torch.arange(len(seq), device=dev).repeat_interleave(K)
        see_ctx = (cb[None] == qseq[:, None]) & (ct[None] < qanc[:, None])  # [Q, Tc]: same sequence, pos < p
        see_blk = qblk[:, None] == qblk[None]  # [Q, Q]: own block, bidirectional
        mask = torch.cat([see_ctx, see_blk], 1)
        return self.backbone(ids.flatten(), qpos.flatten(), ctx, mask).view(len(seq), K, -1)

    def forward(self, batch, generators=None):
        """Training step (batch contract of DESIGN.md) -> (weighted loss SUM, metrics of sums)."""
        ids, lm = batch["input_ids"], batch["loss_mask"]
        T, K, dev = ids.shape[1], self.block_size, ids.device
        seq, pos = self.sample_anchors(lm, generators)
        seq, pos = seq.to(dev), pos.to(dev)
        real = len(seq) > 0
        if not real:  # no supervised pair in the batch: one zero-weight block keeps the graph whole (DDP)
            seq = pos = torch.zeros(1, dtype=torch.long, device=dev)
        h = self.block_hidden(ids, batch["taps"], seq, pos)  # [NB, K, H]
        k = torch.arange(K, device=dev)
        lp = (pos[:, None] + 1 + k).clamp(max=T - 1)  # label positions p+k+1 (clamped; masked below)
        labels = ids[seq[:, None], lp]  # [NB, K]: slot k predicts x_{p+k+1}
        ok = (pos[:, None] + 1 + k < T) & (lm[seq[:, None], lp] > 0)  # in range and loss-masked
        w = ok.long().cumprod(1) * torch.exp(-k / self.gamma) * real  # supervised prefix x w_k = exp(-k/gamma)
        h_t = batch["last_hidden"][seq[:, None], lp - 1]  # target state at p+k, its softmax predicts x_{p+k+1}
        prev = torch.cat([ids[seq, pos][:, None], labels[:, :-1]], 1)  # x_{k-1} (teacher forced), x_{-1} = anchor
        return self.block_loss(h, h_t, labels, prev, w)

    def draft_labels(self, labels):
        """Target ids -> draft-vocab indices; -1 (ignored by the loss: a miss) outside a reduced vocab."""
        if self.d2t is None:
            return labels
        t2d = torch.full((self.config["vocab_size"],), -1, dtype=torch.long, device=labels.device)
        t2d[self.draft_ids] = torch.arange(len(self.d2t), device=labels.device)
        return t2d[labels]

    def block_loss(self, h, h_t, labels, prev, w):
        """Eq. (9): sum_k w_k CE(draft_k, x_{p+k+1}) over supervised slots -> (loss_sum, metrics).

        Reduced vocab: a label outside it counts as a miss (no CE term, top-1 0); the L1 metric compares
        with the target distribution restricted and renormalized to the draft vocab (h_t through the same rows).
        """
        hd, ht, w = h.flatten(0, 1), h_t.flatten(0, 1).to(h.dtype), w.flatten()  # [N, H], [N, H], [N]
        y = self.draft_labels(labels.flatten())
        # fused: no [N, V] tensor; rows of weight 0 are skipped (values 0, argmax -1)
        ce, l1, c_star, am = kernels.fused_dspark_loss(hd, ht, y, self.lm_head.weight, weights=(w > 0).to(hd.dtype),
                                                       return_argmax=True, softcap=self.softcap)[:4]
        return (w * ce).sum(), self.metrics(w, ce, l1, c_star, am == y)

    def per_slot(self, x, w):
        """Sum of x [NB*K] over the supervised rows of each slot -> [K]."""
        return (x.float() * (w > 0)).view(-1, self.block_size).sum(0)

    def metrics(self, w, ce, l1, c_star, top1, **extra):
        """Detached SUMS (all-reducible): loss weight, weighted terms, per-slot count / top-1 / 1 - L1/2."""
        m = {"weight": w.sum(), "ce": (w * ce).sum(), "l1": (w * l1).sum(),
             "slot_count": self.per_slot(torch.ones_like(w), w), "slot_top1": self.per_slot(top1, w),
             "slot_accept": self.per_slot(c_star, w), **extra}  # c* = 1 - L1/2: analytic acceptance
        return {k: v.detach().float() for k, v in m.items()}

    # --- decoding (batch 1; evaluate.py owns the target, the tree and the acceptance rule) -----

    @torch.no_grad()
    def start(self, prompt_ids, taps):
        """After the target's prefill: cache the context keys/values of the prompt's T tokens."""
        state = {"kv": None, "len": 0, "memo": {}}
        self.commit(state, prompt_ids, taps)
        return state

    @torch.no_grad()
    def commit(self, state, ids, taps):
        """Append the m tokens whose target features just became known (taps [m, n*H]); old context is kept."""
        if len(ids) != len(taps):
            raise ValueError(f"commit: {len(ids)} ids but {len(taps)} feature rows")
        pos = torch.arange(state["len"], state["len"] + len(ids), device=self.fc.weight.device)
        new = self.context_kv(taps.to(pos.device), pos)  # project the new taps once; cat copies O(S) per round
        state["kv"] = new if state["kv"] is None else \
            [(torch.cat([k0, k1]), torch.cat([v0, v1])) for (k0, v0), (k1, v1) in zip(state["kv"], new)]
        state["len"] += len(ids)
        state["memo"] = {}

    def _block(self, state, anchor, slots):
        """One full block forward at positions p..p+K-1 (p = tokens in context) -> h [K, H], U [>= slots, Vd].

        Always K = block_size slots, as in training (slots see each other: a shorter block would shift
        the distributions), but draft logits only for the first `slots` (a chain of 2 needs 2 of 7 rows);
        memoized per (p, anchor) so a tree's next_probs calls reuse it.
        """
        p, key = state["len"], (state["len"], int(anchor))
        if key not in state["memo"]:  # a cache only: next_probs leaves the decoding state itself unchanged
            dev = self.fc.weight.device
            ids = torch.full((self.block_size,), self.mask_token_id, dtype=torch.long, device=dev)
            ids[0] = int(anchor)
            h = self.backbone(ids, p + torch.arange(self.block_size, device=dev), state["kv"])
            state["memo"] = {key: (h, h[:0] @ self.lm_head.weight.T)}  # only the latest block is kept
        h, U = state["memo"][key]
        if len(U) < slots:
            U = self.cap(h[:slots] @ self.lm_head.weight.T)
            state["memo"][key] = (h, U)
        return h, U

    def slot_logits(self, h, U, toks):
        """Draft logits [Vd] of slot len(toks)-1 after toks = [anchor, x_0, ..]; DFlash ignores the tokens."""
        return U[len(toks) - 1]

    def slot_confidence(self, h, toks):  # DFlash has no confidence head
        return None

    @torch.no_grad()
    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        """Chain of k draft tokens [k], the full-vocab distributions they were drawn from [k, V], conf (None).
        stop_ids is accepted and ignored: the block is drafted in one forward and DeepSpec verifies it whole."""
        if not 1 <= k <= self.block_size:
            raise ValueError(f"propose: k={k} must lie in [1, block_size={self.block_size}]")
        return self._chain(*self._block(state, anchor, k), anchor, k, temperature, top_k, top_p, generator)

    def _chain(self, h, U, anchor, k, temperature, top_k, top_p, generator):  # sample slot by slot from one block
        toks, probs, conf = [int(anchor)], [], []
        for _ in range(k):
            p = kernels.logits_to_probs(self.slot_logits(h, U, toks), temperature, top_k, top_p)  # [Vd]
            conf.append(self.slot_confidence(h, toks))
            i = int(p.argmax() if temperature == 0 else torch.multinomial(p, 1, generator=generator)[0])
            toks.append(i if self.d2t is None else i + int(self.d2t[i]))  # draft index -> target id
            probs.append(self.to_full(p))
        conf = None if conf[0] is None else torch.stack(conf)
        return torch.tensor(toks[1:], device=h.device), torch.stack(probs), conf

    @torch.no_grad()
    def propose_batch(self, states, anchors, k, temperature=0.0, top_k=0, top_p=1.0, generators=None):
        """propose for R requests with ONE backbone forward: every block sees its own request's context only
        (the mask of block_hidden) -> [(drafts, probs, conf)] per request, each as propose would return."""
        dev, K, R = self.fc.weight.device, self.block_size, len(states)
        ctx = [tuple(torch.cat([s["kv"][i][j] for s in states]) for j in (0, 1)) for i in range(len(self.layers))]
        lens = torch.tensor([s["len"] for s in states], device=dev)
        req = torch.arange(R, device=dev)
        owner, qreq = req.repeat_interleave(lens), req.repeat_interleave(K)  # context rows' and queries' request
        ids = torch.full((R, K), self.mask_token_id, dtype=torch.long, device=dev)
        ids[:, 0] = torch.as_tensor(anchors, device=dev)
        mask = torch.cat([owner[None] == qreq[:, None], qreq[:, None] == qreq[None]], 1)  # [R*K, S+R*K]
        h = self.backbone(ids.flatten(), (lens[:, None] + torch.arange(K, device=dev)).flatten(), ctx, mask)
        h = h.view(R, K, -1)
        U = self.cap(h[:, :k] @ self.lm_head.weight.T)  # [R, k, Vd]
        gens = generators or [None] * R
        return [self._chain(h[r], U[r], anchors[r], k, temperature, top_k, top_p, gens[r]) for r in range(R)]

    @torch.no_grad()
    def next_probs(self, state, anchor, paths, temperature=0.0, top_k=0, top_p=1.0):
        """Draft distribution [N, V] of the next token after each path (tuple of tokens after the anchor)."""
        if any(len(path) >= self.block_size for path in paths):
            raise ValueError(f"next_probs: paths must be shorter than block_size={self.block_size}")
        h, U = self._block(state, anchor, 1 + max(map(len, paths), default=0))
        z = torch.stack([self.slot_logits(h, U, [int(anchor), *map(int, path)]) for path in paths])
        return self.to_full(kernels.logits_to_probs(z, temperature, top_k, top_p))
