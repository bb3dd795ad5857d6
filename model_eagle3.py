"""Eagle3: an autoregressive drafter trained with training-time test (TTT), DeepSpec-compatible.

EAGLE-3 (Li et al. 2025, "Scaling up Inference Acceleration of LLMs via Training-Time Test") as
released in DeepSpec (REFERENCE.md s.4, checkpoint layout s.5). One decoder layer reads, at position
t, the pair (feature h_t, next token x_{t+1}) and predicts the target's distribution of x_{t+2}:

    a_t    = [input_layernorm(embed(x_{t+1})) ; hidden_norm(h_t)]         2H wide (paper s.3: token + feature)
    g_t    = h_t + o_proj(attn(a_t));  g_t = g_t + mlp(post_attention_layernorm(g_t))
    logits = lm_head(norm(g_t))                                            frozen target head

h_t = fc([taps of the target layers]) for real target features (paper s.3.2: fused low/mid/high
features), and h = the layer's own previous output g at drafted positions (paper s.3.3).

Training-time test (paper s.3.3, REFERENCE s.4), steps k = 0..K-1 (K = ttt_length), teacher forced:
    position t at step k reads token x_{t+k+1} with feature fc(taps[t]) (k = 0) or g_t of step k-1,
    sits at RoPE position t+k, and predicts x_{t+k+2}: soft CE against
    softmax(lm_head(last_hidden[t+k+1])), weighted step_loss_decay**k (0.8^k);
    it attends step-0 keys s <= t (real features) plus its own "diagonal" keys of steps 1..k;
    it is supervised iff loss_mask[t+k] = 1 and t+k is not the sequence's last token (DeepSpec's rule,
    inherited from SpecForge: the first two tokens of an answer are never predicted, the two after its
    end are; the cache keeps last_hidden one token past each answer for them).
Loss (DeepSpec's "local mean"): each step's summed soft CE over B*T, every sequence weighing the same.
Step k at position t is exactly draft slot k+1 of a chain with context x_{<=t}, anchor x_{t+1} and
drafts x_{t+2..t+k+1}: training sees what inference sees, its own features fed back.

Decoding: the draft KV cache holds, for each committed position t, K/V of the pair
(fc(taps[t]), x_{t+1}); the last committed token's features wait as `pending` until the next token
(the anchor) is known. propose/next_probs never write into the state (their chain keys live in
temporary tensors), so commit has no speculative entry to crop and only extends.
Optional reduced draft vocabulary (EAGLE-3's recipe, not DeepSpec's): buffer `d2t` [Vd] holds the
absolute target ids (EAGLE-3's own files store offsets d2t[i] = id - i); the draft head is
lm_head.weight[d2t] and draft distributions are scattered back to the full vocabulary.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kernels

ARCHITECTURES = ("Qwen3Eagle3Model", "Eagle3DraftModel")  # ours first; DeepSpec accepts the alias too
FROZEN = ("embed_tokens.weight", "lm_head.weight")
DEFAULTS = dict(target_layer_ids=None, num_draft_layers=1, ttt_length=7, step_loss_decay=0.8,
                draft_vocab_size=0, target_name="")
# drafter config keys of the shared contract that Eagle3 accepts and ignores
IGNORED = ("block_size", "mask_token_id", "markov_rank", "markov_head_type", "enable_confidence_head",
           "loss_decay_gamma", "num_anchors")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in fp32, scale in the input dtype (Qwen3)
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(pos, head_dim, theta, dtype):
    """pos [..., T] -> cos, sin [..., 1, T, hd] (HF rotate-half layout, broadcast over heads)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    ang = pos.float()[..., None] * inv_freq  # [..., T, hd/2]
    ang = torch.cat([ang, ang], -1).unsqueeze(-3)  # [..., 1, T, hd]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin  # rotate each (x1, x2) pair by its angle


def shift(x, n):
    """x [B,T,...] -> x[:, t+n] at position t, zeros past the end (teacher-forced look-ahead)."""
    return torch.cat([x[:, n:], x.new_zeros(x[:, :n].shape)], 1)


def supervised(loss_mask, lengths, k):
    """[B,T] bool: TTT step k at position t is scored iff loss_mask[t+k] = 1 and t+k is not the last token
    (t+k+1 < length): DeepSpec's rule (REFERENCE s.4). Its draft predicts x_{t+k+2}, so an answer's first two
    tokens are never predicted and the two after its end are."""
    real = torch.arange(loss_mask.shape[1], device=loss_mask.device) < lengths[:, None]  # False on right padding
    return shift(loss_mask, k).bool() & shift(real, k + 1)


def ttt_attention(q, ks, vs):
    """TTT attention at step k = len(ks) - 1 (REFERENCE s.4).

    q [B,nh,T,hd]; ks, vs: per-step keys/values [B,nkv,T,hd], step 0 first. Query t sees the step-0
    keys s <= t (causal) and key t of each step 1..k (its own diagonal). The "diagonal trick": the
    scores are T x (T+k), the extra memory per step is linear in T (no (k+1)T-wide mask).
    """
    T, hd = q.shape[2], q.shape[3]
    g = q.shape[1] // ks[0].shape[1]  # GQA: query heads per kv head
    ks = [k.repeat_interleave(g, 1) for k in ks]
    vs = [v.repeat_interleave(g, 1) for v in vs]
    s0 = q @ ks[0].transpose(-1, -2) * hd ** -0.5  # [B,nh,T,T] step-0 scores
    s0 = s0.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    sd = [(q * k).sum(-1, keepdim=True) * hd ** -0.5 for k in ks[1:]]  # k x [B,nh,T,1] diagonal scores
    p = torch.cat([s0, *sd], -1).float().softmax(-1).to(q.dtype)  # one softmax over T + k keys
    out = p[..., :T] @ vs[0]  # [B,nh,T,hd]
    for j, v in enumerate(vs[1:]):
        out = out + p[..., T + j:T + j + 1] * v  # each diagonal value weighted by its own score
    return out


class Attention(nn.Module):
    def __init__(self, H, n_head, n_kv_head, head_dim, eps):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(2 * H, n_head * head_dim, bias=False)  # input is [embed ; hidden], 2H
        self.k_proj = nn.Linear(2 * H, n_kv_head * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * H, n_kv_head * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, H, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)  # Qwen3: per-head RMSNorm on q and k
        self.k_norm = RMSNorm(head_dim, eps)


class MLP(nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Layer(nn.Module):
    """The Eagle3 decoder layer; `attend(q, k, v) -> [B,nh,T,hd]` supplies the cache and the mask."""

    def __init__(self, H, n_head, n_kv_head, head_dim, I, eps):
        super().__init__()
        self.hidden_norm = RMSNorm(H, eps)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(H, n_head, n_kv_head, head_dim, eps)
        self.mlp = MLP(H, I)

    def forward(self, e, h, cos, sin, attend):  # e, h [B,T,H]
        B, T, _ = h.shape
        a, hd = self.self_attn, self.self_attn.head_dim
        x = torch.cat([self.input_layernorm(e), self.hidden_norm(h)], -1)  # [B,T,2H]
        q = a.q_norm(a.q_proj(x).view(B, T, -1, hd)).transpose(1, 2)  # [B,nh,T,hd]
        k = a.k_norm(a.k_proj(x).view(B, T, -1, hd)).transpose(1, 2)  # [B,nkv,T,hd]
        v = a.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        o = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        h = h + a.o_proj(o.transpose(1, 2).reshape(B, T, -1))  # residual = the feature h, not x
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3(nn.Module):
    normalize_over_ranks = False  # train.py divides the loss by metrics["weight"] = B*T of this rank's micro-batch

    def __init__(self, config):
        """config: the checkpoint's config.json dict (target config fields + Eagle3 fields)."""
        super().__init__()
        c = self.config = dict(config)
        H, V = c["hidden_size"], c["vocab_size"]
        n_head = c["num_attention_heads"]
        n_kv_head = c.get("num_key_value_heads") or n_head
        self.head_dim = c.get("head_dim") or H // n_head
        eps = c.get("rms_norm_eps", 1e-6)
        rp = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 / 4 spelling
        if rp.get("rope_type", rp.get("type", "default")) != "default" or c.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"Eagle3 supports default RoPE and SiLU only, got {rp} / {c.get('hidden_act')}")
        self.rope_theta = float(c.get("rope_theta") or rp.get("rope_theta") or 10000.0)
        self.layer_ids = [int(i) for i in c["target_layer_ids"]]
        self.ttt_length, self.step_loss_decay = int(c["ttt_length"]), float(c["step_loss_decay"])
        n_layers = int(c.get("draft_num_hidden_layers") or c.get("num_hidden_layers") or 1)
        self.embed_tokens = nn.Embedding(V, H)  # frozen, copied from the target
        self.fc = nn.Linear(len(self.layer_ids) * H, H, bias=False)  # n*H tapped features -> H
        self.layers = nn.ModuleList(Layer(H, n_head, n_kv_head, self.head_dim, c["intermediate_size"], eps)
                                    for _ in range(n_layers))
        self.norm = RMSNorm(H, eps)
        self.lm_head = nn.Linear(H, V, bias=False)  # frozen, copied from the target
        for m in self.modules():  # HF init: N(0, 0.02) linears, norms at 1
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=c.get("initializer_range", 0.02))
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)
        Vd = int(c.get("draft_vocab_size") or 0)  # 0 = full vocabulary (DeepSpec)
        self.register_buffer("d2t", torch.arange(Vd) if Vd else None)  # ids set by set_draft_vocab

    # --- construction ---------------------------------------------------------

    @classmethod
    def from_target(cls, target, **cfg):
        """target: a target.Target (frozen embed/head copied) or a bare HF config (weights at init)."""
        unknown = set(cfg) - set(DEFAULTS) - set(IGNORED)
        if unknown:
            raise TypeError(f"Eagle3.from_target: unknown config keys {sorted(unknown)}; "
                            f"valid: {sorted(DEFAULTS) + sorted(IGNORED)}")
        o = {**DEFAULTS, **{k: v for k, v in cfg.items() if k in DEFAULTS}}
        is_target = hasattr(target, "lm_head_weight")
        tc = target.config if is_target else target
        c = {k: v for k, v in tc.to_dict().items() if k not in ("architectures", "auto_map", "_name_or_path")}
        L = c["num_hidden_layers"]
        ids = o["target_layer_ids"] or (target.layer_ids if is_target else
                                        [int(1 + k * (L - 4) / 4 + 0.5) for k in range(5)])  # REFERENCE s.1
        n = int(o["num_draft_layers"])
        c.update(architectures=[ARCHITECTURES[0]], num_hidden_layers=n, draft_num_hidden_layers=n,
                 num_target_layers=L, target_layer_ids=[int(i) for i in ids], ttt_length=int(o["ttt_length"]),
                 step_loss_decay=float(o["step_loss_decay"]), draft_vocab_size=int(o["draft_vocab_size"]),
                 target_model_name_or_path=o["target_name"] or (target.name if is_target else
                                                                getattr(tc, "_name_or_path", "")),
                 tie_word_embeddings=False)
        if "layer_types" in c:
            c["layer_types"] = ["full_attention"] * n
        model = cls(c)
        if is_target:
            model.copy_frozen_from(target)
        return model

    @torch.no_grad()
    def copy_frozen_from(self, target):
        """Copy (re-tie) the frozen embedding and lm_head from a target.Target."""
        for p, w in ((self.embed_tokens.weight, target.embed_weight), (self.lm_head.weight, target.lm_head_weight)):
            if p.shape != w.shape:
                raise ValueError(f"target {target.name} has {tuple(w.shape)} embed/lm_head, drafter expects "
                                 f"{tuple(p.shape)}: load the drafter with the target it was trained for")
            p.copy_(w)

    @torch.no_grad()
    def set_draft_vocab(self, ids):
        """Reduced vocab: ids [Vd] = the target ids the drafter may propose (train.py: most frequent)."""
        if self.d2t is None or ids.shape != self.d2t.shape:
            raise ValueError(f"set_draft_vocab: {tuple(ids.shape)} ids for draft_vocab_size "
                             f"{self.config.get('draft_vocab_size')}; build with draft_vocab_size=len(ids)")
        self.d2t.copy_(ids.sort().values)

    def draft_head(self):
        """[Vd, H]: the rows of the frozen target lm_head the drafter scores (all V by default)."""
        return self.lm_head.weight if self.d2t is None else self.lm_head.weight[self.d2t]

    # --- training: the TTT unroll and its loss ----------------------------------

    def unroll(self, input_ids, taps, steps=None):
        """Teacher-forced TTT: input_ids [B,T], taps [B,T,n*H] -> K tensors [B,T,H] (pre-norm outputs).

        Entry k at position t is the drafter's output for token x_{t+k+2} (module docstring)."""
        T = input_ids.shape[1]
        h = self.fc(taps.to(self.fc.weight.dtype))  # [B,T,H] step-0 feature h_t
        e = self.embed_tokens(input_ids)  # [B,T,H]
        pos = torch.arange(T, device=input_ids.device)
        caches = [[] for _ in self.layers]  # per layer: the (K, V) of each step so far
        outs = []
        for k in range(steps or self.ttt_length):
            cos, sin = rope(pos + k, self.head_dim, self.rope_theta, h.dtype)  # RoPE position t + k
            ek = shift(e, k + 1)  # step k reads token x_{t+k+1}
            for layer, cache in zip(self.layers, caches):
                def attend(q, kk, vv, cache=cache):
                    cache.append((kk, vv))  # this step's keys join the diagonal
                    return ttt_attention(q, [a for a, _ in cache], [b for _, b in cache])
                h = layer(ek, h, cos, sin, attend)  # the output feeds the next layer / next step
            outs.append(h)
        return outs

    def forward(self, batch, generators=None):
        """Training: batch dict (contract) -> (loss_sum, metrics); metrics["weight"] = B*T is the loss's
        denominator (DeepSpec's local mean over the micro-batch, REFERENCE s.4). Eagle3 draws nothing random."""
        ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        last_hidden = batch["last_hidden"]
        B, T = ids.shape
        lengths = batch["lengths"] if "lengths" in batch else torch.full((B,), T, device=ids.device)
        W = self.draft_head()  # [Vd, H]
        K = self.ttt_length
        outs = self.unroll(ids, batch["taps"])
        loss = W.new_zeros((), dtype=torch.float32)
        z = lambda: torch.zeros(K, device=W.device)  # noqa: E731
        m = {"weight": float(B * T), "ce": 0.0, "slot_count": z(), "slot_top1": z(), "slot_accept": z()}  # sums
        for k, h in enumerate(outs):
            sup = supervised(loss_mask, lengths, k)  # [B,T]
            hd = self.norm(h[sup])  # [N,H] supervised draft rows only
            ht = shift(last_hidden, k + 1)[sup]  # [N,H] target state last_hidden[t+k+1]
            # soft CE -sum_v p_t log p_d [N], chunked over the vocabulary: no [N,V] tensor is kept
            ce, l1, am_d, am_t = kernels.fused_soft_ce(hd, ht, W, return_stats=True)
            w = self.step_loss_decay ** k  # paper/DeepSpec step weight 0.8^k
            loss = loss + w * ce.sum()
            m["ce"] += w * ce.detach().sum()
            m["slot_count"][k] = ce.numel()
            m["slot_top1"][k] = (am_d == am_t).sum()  # draft argmax == target argmax
            m["slot_accept"][k] = (1 - l1 / 2).clamp(0, 1).sum()  # analytic acceptance = sum_v min(p_d, p_t)
        m = {k: torch.as_tensor(v, dtype=torch.float32, device=W.device).detach() for k, v in m.items()}
        return loss, m

    # --- decoding: draft KV cache, chains and trees -----------------------------

    def _run(self, past, ids, h, pos, mask):
        """New pairs (ids [N], features h [N,H]) at positions pos [N] over cached per-layer (K, V)
        [1,nkv,S,hd]; mask [N, S+N] bool (True = visible) or None (all visible).
        -> (output hidden [N,H], the new per-layer (K, V) [1,nkv,N,hd])."""
        e, h = self.embed_tokens(ids)[None], h[None]  # batch of 1: [1,N,H]
        cos, sin = rope(pos, self.head_dim, self.rope_theta, h.dtype)
        new = []
        for layer, (pk, pv) in zip(self.layers, past):
            def attend(q, k, v, pk=pk, pv=pv):
                new.append((k, v))
                return F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2),
                                                      attn_mask=mask, enable_gqa=True)
            h = layer(e, h, cos, sin, attend)
        return h[0], new

    def _probs(self, h, temperature, top_k, top_p):
        """h [N,H] -> full-vocab probs [N,V] (zero outside a reduced vocab) and draft-vocab probs [N,Vd]."""
        logits = F.linear(self.norm(h), self.draft_head()).float()  # [N,Vd]
        p = kernels.logits_to_probs(logits, temperature, top_k, top_p)
        if self.d2t is None:
            return p, p
        full = p.new_zeros(p.shape[0], self.lm_head.weight.shape[0])
        full[:, self.d2t] = p  # scatter back to target ids
        return full, p

    @staticmethod
    def _append(past, new):
        return [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(past, new)]

    @torch.no_grad()
    def _extend(self, state, feats, ids):
        """Append committed pairs (fc(feats[i]), ids[i]) [m] to the draft cache, causally."""
        m, S = ids.numel(), state["kv"][0][0].shape[2]
        if m == 0:
            return
        dev = ids.device
        mask = torch.cat([torch.ones(m, S, dtype=torch.bool, device=dev),
                          torch.ones(m, m, dtype=torch.bool, device=dev).tril()], 1)  # all cached + causal
        _, new = self._run(state["kv"], ids, self.fc(feats.to(self.fc.weight.dtype)),
                           torch.arange(S, S + m, device=dev), mask)
        state["kv"] = self._append(state["kv"], new)

    @torch.no_grad()
    def start(self, prompt_ids, taps):
        """After the target's prefill: cache pairs (taps[t], x_{t+1}) for t < T-1; taps[T-1] pends."""
        p = self.fc.weight
        n_kv = self.layers[0].self_attn.k_proj.weight.shape[0] // self.head_dim
        empty = p.new_zeros(1, n_kv, 0, self.head_dim)
        state = {"kv": [(empty, empty)] * len(self.layers), "pending": None}
        self._extend(state, taps[:-1], prompt_ids[1:])
        state["pending"] = taps[-1]
        return state

    @torch.no_grad()
    def commit(self, state, ids, taps):
        """ids [m] = previous anchor + accepted drafts, taps [m, n*H] their target features: append
        (pending, ids[0]), (taps[0], ids[1]), ..., (taps[m-2], ids[m-1]); taps[m-1] pends. No crop is
        needed: propose/next_probs keep their speculative keys out of the state."""
        self._extend(state, torch.cat([state["pending"][None], taps[:-1]]), ids)
        state["pending"] = taps[-1]

    @torch.no_grad()
    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        """A chain of k drafts after `anchor` -> (tokens [k'], probs [k',V], None). Each slot's output
        hidden is the next slot's feature (as in TTT); speculative K/V stay in local tensors.
        stop_ids (target token ids, e.g. the target's eos_token_ids; None = no stop): the chain ends after
        the first drafted stop token, as DeepSpec drafts (k' <= k; the rows are the unstopped chain's prefix)."""
        past, S = state["kv"], state["kv"][0][0].shape[2]
        dev = self.fc.weight.device
        stop = None if stop_ids is None else {int(x) for x in stop_ids}
        h = self.fc(state["pending"][None].to(self.fc.weight.dtype))  # [1,H] root: anchor's context features
        tok = torch.tensor([int(anchor)], device=dev)
        tokens, probs = [], []
        for j in range(k):
            h, new = self._run(past, tok, h, torch.tensor([S + j], device=dev), None)  # sees all cached keys
            past = self._append(past, new)
            full, p = self._probs(h, temperature, top_k, top_p)
            idx = p.argmax(-1) if temperature == 0 else torch.multinomial(p, 1, generator=generator)[:, 0]
            tok = idx if self.d2t is None else self.d2t[idx]  # draft id -> target id
            tokens.append(tok)
            probs.append(full)
            if stop and int(tok) in stop:  # a drafted end of turn: later drafts could never be committed
                break
        return torch.cat(tokens), torch.cat(probs), None

    @torch.no_grad()
    def next_probs(self, state, anchor, paths, temperature=0.0, top_k=0, top_p=1.0):
        """Draft distribution after each path (token tuples after the anchor) -> [N,V]; state untouched.

        All prefixes of all paths form a trie (node 0 = the anchor); nodes of equal depth run in one
        forward with a tree mask (cache + ancestors + self), as in EAGLE-2's tree drafting."""
        dev = self.fc.weight.device
        if not paths:
            return torch.zeros(0, self.lm_head.weight.shape[0], device=dev)
        index, parent, token = {(): 0}, [-1], [int(anchor)]
        for path in paths:
            path = tuple(int(x) for x in path)
            for j in range(1, len(path) + 1):
                if path[:j] not in index:
                    index[path[:j]] = len(token)
                    parent.append(index[path[:j - 1]])
                    token.append(path[j - 1])
        depth = [len(key) for key in index]  # dict order = node order
        n, S = len(token), state["kv"][0][0].shape[2]
        anc = torch.eye(n, dtype=torch.bool, device=dev)  # anc[i, j]: j is i or an ancestor of i
        for i in range(1, n):
            anc[i] |= anc[parent[i]]  # parents precede children in node order
        hid = [None] * n
        past, done = state["kv"], []  # done: nodes whose K/V follow the cache, in this order
        for d in range(max(depth) + 1):
            level = [i for i in range(n) if depth[i] == d]
            if d == 0:
                h = self.fc(state["pending"][None].to(self.fc.weight.dtype))  # root feature: target taps
            else:
                h = torch.stack([hid[parent[i]] for i in level])  # a node's feature = its parent's output
            mask = torch.cat([torch.ones(len(level), S, dtype=torch.bool, device=dev),
                              anc[level][:, done], torch.eye(len(level), dtype=torch.bool, device=dev)], 1)
            out, new = self._run(past, torch.tensor([token[i] for i in level], device=dev), h,
                                 torch.full((len(level),), S + d, device=dev), mask)  # depth d at S + d
            past, done = self._append(past, new), done + level
            for i, o in zip(level, out):
                hid[i] = o
        h = torch.stack([hid[index[tuple(int(x) for x in p)]] for p in paths])  # [N,H]
        return self._probs(h, temperature, top_k, top_p)[0]

    # --- checkpoints (DeepSpec layout, REFERENCE s.5) ---------------------------

    def save_pretrained(self, path, include_frozen=True):
        """config.json + model.safetensors; each written to a tmp file then os.replace'd (atomic)."""
        os.makedirs(path, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
              if include_frozen or k not in FROZEN}
        tmp = os.path.join(path, f".model.safetensors.{os.getpid()}.tmp")
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, "model.safetensors"))
        tmp = os.path.join(path, f".config.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.config, f, indent=2, default=str)
        os.replace(tmp, os.path.join(path, "config.json"))

    @classmethod
    def from_pretrained(cls, path, target=None):
        """Load ours or DeepSpec's Eagle3 checkpoint (local dir or hub id); frozen embed/head omitted
        from the file are re-tied from `target`."""
        if not os.path.isdir(path):  # hub id (untested here: no network)
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, allow_patterns=["config.json", "*.safetensors"])
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        arch = (c.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"{path}: architectures {c.get('architectures')} is not an Eagle3 checkpoint "
                             f"(expected one of {list(ARCHITECTURES)}); load it with its own drafter class")
        if "text_config" in c or str(c.get("model_type", "")).startswith("gemma"):
            raise NotImplementedError(f"{path}: Gemma Eagle3 checkpoints are not supported (Qwen3-style layer only)")
        model = cls(c)
        sd = load_file(os.path.join(path, "model.safetensors"))
        expected = set(model.state_dict())
        omitted = [k for k in FROZEN if k not in sd]
        missing = sorted(expected - set(sd) - set(omitted if target is not None else ()))
        unexpected = sorted(set(sd) - expected)
        if missing or unexpected:
            hint = " (saved with include_frozen=False: pass target=...)" if set(omitted) & set(missing) else ""
            raise ValueError(f"{path}: checkpoint does not match Eagle3: missing keys {missing}{hint}, "
                             f"unexpected keys {unexpected}")
        model.load_state_dict(sd, strict=False)
        if omitted:
            model.copy_frozen_from(target)
        return model
