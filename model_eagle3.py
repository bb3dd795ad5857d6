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
Optional reduced draft vocabulary (EAGLE-3's recipe, not DeepSpec's), stored as EAGLE-3 and the engines store it:
lm_head [Vd, H] holds the target head's rows, d2t [Vd] the offsets (target id = i + d2t[i]), t2d [V] the mask;
draft distributions are scattered back to the full vocabulary.
Everything but the layer, the TTT loss and the draft cache comes from model_dflash.py: the building blocks
(RMSNorm, Attention, MLP, RoPE) and DraftModel (construction, reduced vocabulary, checkpoints).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model_dflash import FORMAT, MLP, Attention, DraftModel, RMSNorm, check_supported, init_weights, rope_cos_sin


def shift(x, n):
    """x [B,T,...] -> x[:, t+n] at position t, zeros past the end (teacher-forced look-ahead)."""
    return torch.cat([x[:, n:], x.new_zeros(x[:, :n].shape)], 1)


def supervised(loss_mask, lengths, k):
    """[B,T] bool: TTT step k at position t is scored iff loss_mask[t+k] = 1 and t+k is not the last token
    (t+k+1 < length): DeepSpec's rule (REFERENCE s.4). Its draft predicts x_{t+k+2}, so an answer's first two
    tokens are never predicted and the two after its end are."""
    real = torch.arange(loss_mask.shape[1], device=loss_mask.device) < lengths[:, None]  # False on right padding
    return shift(loss_mask, k).bool() & shift(real, k + 1)


def ttt_attention(q, ks, vs, scale=None):
    """TTT attention at step k = len(ks) - 1 (REFERENCE s.4).

    q [B,nh,T,hd]; ks, vs: per-step keys/values [B,nkv,T,hd], step 0 first. Query t sees the step-0
    keys s <= t (causal) and key t of each step 1..k (its own diagonal). The "diagonal trick": the
    scores are T x (T+k), the extra memory per step is linear in T (no (k+1)T-wide mask). scale: None = hd^-0.5.
    """
    T, hd = q.shape[2], q.shape[3]
    scale = hd ** -0.5 if scale is None else scale
    g = q.shape[1] // ks[0].shape[1]  # GQA: query heads per kv head
    ks = [k.repeat_interleave(g, 1) for k in ks]
    vs = [v.repeat_interleave(g, 1) for v in vs]
    s0 = q @ ks[0].transpose(-1, -2) * scale  # [B,nh,T,T] step-0 scores
    s0 = s0.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    sd = [(q * k).sum(-1, keepdim=True) * scale for k in ks[1:]]  # k x [B,nh,T,1] diagonal scores
    p = torch.cat([s0, *sd], -1).float().softmax(-1).to(q.dtype)  # one softmax over T + k keys
    out = p[..., :T] @ vs[0]  # [B,nh,T,hd]
    for j, v in enumerate(vs[1:]):
        out = out + p[..., T + j:T + j + 1] * v  # each diagonal value weighted by its own score
    return out


class Layer(nn.Module):
    """The Eagle3 decoder layer, in two halves around the attention, whose keys and mask the caller owns
    (TTT's diagonal pattern in training, the draft KV cache in decoding)."""

    def __init__(self, H, nh, nkv, hd, I, eps):
        super().__init__()
        self.hidden_norm = RMSNorm(H, eps)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(H, nh, nkv, hd, eps, in_dim=2 * H)  # input is [embed ; hidden], 2H
        self.mlp = MLP(H, I)

    def qkv(self, e, h, cos, sin):
        """Embeddings e, features h [B,T,H] -> rotated q [B,nh,T,hd], k and v [B,nkv,T,hd] of a_t."""
        x = torch.cat([self.input_layernorm(e), self.hidden_norm(h)], -1)  # a_t [B,T,2H]
        q, (k, v) = self.self_attn.q(x, cos, sin), self.self_attn.kv(x, cos, sin)  # [B,T,heads,hd]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def out(self, h, o):
        """Features h [B,T,H], attention output o [B,nh,T,hd] -> the layer's output g [B,T,H]."""
        h = h + self.self_attn.o_proj(o.transpose(1, 2).flatten(2))  # residual = the feature h, not a_t
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3(DraftModel):
    kind = "eagle3"
    architectures = ("Qwen3Eagle3Model", "Eagle3DraftModel")  # ours first; DeepSpec accepts the alias too
    normalize_over_ranks = False  # train.py divides the loss by metrics["weight"] = B*T of this rank's micro-batch

    def __init__(self, config):
        """config: the dict of config.json (target fields + Eagle3 fields), see draft_config."""
        super().__init__()
        c = self.config = dict(config)
        check_supported(c, self.family)
        H, V, eps = c["hidden_size"], c["vocab_size"], c.get("rms_norm_eps", 1e-6)
        nh, nkv, self.hd = self.geometry(c)
        self.ttt_length, self.step_loss_decay = int(c["ttt_length"]), float(c["step_loss_decay"])
        n = int(c.get("draft_num_hidden_layers") or c.get("num_hidden_layers") or 1)
        self.embed_tokens = nn.Embedding(V, H)  # frozen target embedding
        self.fc = nn.Linear(len(c["target_layer_ids"]) * H, H, bias=False)  # n*H tapped features -> H
        self.layers = nn.ModuleList(self.make_layer(H, nh, nkv, self.hd, c["intermediate_size"], eps) for _ in range(n))
        self.norm = self.Norm(H, eps)
        self.make_head(c)  # the frozen target head [V or Vd, H] (draft_vocab_size 0 = the full vocabulary, DeepSpec)
        self.apply(init_weights)
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    @property
    def proposal_length(self):  # drafts proposed per round by default: one TTT unroll
        return self.ttt_length

    def make_layer(self, *geometry):
        return Layer(*geometry)

    @classmethod
    def draft_config(cls, target, base, cfg):
        """config.json of a new drafter: the target's config `base` plus DeepSpec's Eagle3 fields."""
        c = {k: v for k, v in base.items() if k not in ("architectures", "auto_map", "_name_or_path")}
        n = int(cfg.get("num_draft_layers", 1))
        name = cfg.get("target_name") or getattr(target, "name", base.get("_name_or_path", ""))
        c.update(architectures=[cls.architectures[0]], num_hidden_layers=n, draft_num_hidden_layers=n,
                 num_target_layers=base["num_hidden_layers"], target_layer_ids=cfg["target_layer_ids"],
                 ttt_length=int(cfg.get("ttt_length", 7)), step_loss_decay=float(cfg.get("step_loss_decay", 0.8)),
                 draft_vocab_size=int(cfg.get("draft_vocab_size", 0)), target_model_name_or_path=name,
                 tie_word_embeddings=False,
                 nanospec={"drafter": cls.kind, "version": FORMAT})  # ours; DeepSpec ignores it
        if "layer_types" in c:
            c["layer_types"] = ["full_attention"] * n
        return c

    @classmethod
    def check_checkpoint(cls, config, path):
        if (config.get("architectures") or [None])[0] not in cls.architectures:
            raise ValueError(f"{path}: architectures {config.get('architectures')} is not an Eagle3 checkpoint "
                             f"of {cls.__name__} (expected one of {list(cls.architectures)}); "
                             f"load it with its own class")

    def set_draft_vocab(self, token_ids, head=None):
        """As DFlash, in increasing order (as EAGLE-3's own files)."""
        super().set_draft_vocab(torch.as_tensor(token_ids).sort().values, head)

    def draft_logits(self, h):
        """Layer outputs h [N, H] (before the final norm) -> draft logits [N, Vd] fp32."""
        return self.cap(F.linear(self.norm(h), self.lm_head.weight).float())

    # --- training: the TTT unroll and its loss ----------------------------------

    def unroll(self, input_ids, taps, steps=None):
        """Teacher-forced TTT: input_ids [B,T], taps [B,T,n*H] -> K tensors [B,T,H] (pre-norm outputs).

        Entry k at position t is the drafter's output for token x_{t+k+2} (module docstring)."""
        T = input_ids.shape[1]
        h = self.fc(taps.to(self.fc.weight.dtype))  # [B,T,H] step-0 feature h_t
        e = self.embed(input_ids)  # [B,T,H]
        pos = torch.arange(T, device=input_ids.device)
        ks, vs = [[] for _ in self.layers], [[] for _ in self.layers]  # per layer: the keys/values of each step so far
        outs = []
        for k in range(steps or self.ttt_length):
            cos, sin = rope_cos_sin(self.config, pos + k, self.hd)  # RoPE position t + k
            cos, sin = cos.to(h.dtype), sin.to(h.dtype)  # in the features' dtype (bf16 under autocast), as HF's rotary
            ek = shift(e, k + 1)  # step k reads token x_{t+k+1}
            for i, layer in enumerate(self.layers):
                q, key, value = layer.qkv(ek, h, cos, sin)
                ks[i].append(key)  # this step's keys join the diagonal
                vs[i].append(value)
                # the output feeds the next layer / next step
                h = layer.out(h, ttt_attention(q, ks[i], vs[i], layer.self_attn.scale))
            outs.append(h)
        return outs

    def forward(self, batch, generators=None):
        """Training: batch dict (contract) -> (loss_sum, metrics); metrics["weight"] = B*T is the loss's
        denominator (DeepSpec's local mean over the micro-batch, REFERENCE s.4). Eagle3 draws nothing random."""
        ids, loss_mask, last_hidden = batch["input_ids"], batch["loss_mask"], batch["last_hidden"]
        B, T = ids.shape
        lengths = batch["lengths"] if "lengths" in batch else torch.full((B,), T, device=ids.device)
        W, K = self.lm_head.weight, self.ttt_length  # W [Vd, H]
        loss, ce_sum = W.new_zeros((), dtype=torch.float32), 0.0
        count = torch.zeros(K, device=W.device)  # per-step sums: supervised rows, top-1 matches, 1 - L1/2
        top1, accept = torch.zeros_like(count), torch.zeros_like(count)
        for k, h in enumerate(self.unroll(ids, batch["taps"])):
            sup = supervised(loss_mask, lengths, k)  # [B,T]
            hd = self.norm(h[sup])  # [N,H] supervised draft rows only
            ht = shift(last_hidden, k + 1)[sup]  # [N,H] target state last_hidden[t+k+1]
            # soft CE -sum_v p_t log p_d [N], chunked over the vocabulary: no [N,V] tensor is kept
            ce, l1, am_d, am_t = kernels.fused_soft_ce(hd, ht, W, return_stats=True, softcap=self.softcap)
            w = self.step_loss_decay ** k  # paper/DeepSpec step weight 0.8^k
            loss = loss + w * ce.sum()
            ce_sum += w * ce.detach().sum()
            count[k] = ce.numel()
            top1[k] = (am_d == am_t).sum()  # draft argmax == target argmax
            accept[k] = (1 - l1 / 2).clamp(0, 1).sum()  # analytic acceptance = sum_v min(p_d, p_t)
        m = {"weight": float(B * T), "ce": ce_sum, "slot_count": count, "slot_top1": top1, "slot_accept": accept}
        return loss, {k: torch.as_tensor(v, dtype=torch.float32, device=W.device).detach() for k, v in m.items()}

    # --- decoding: draft KV cache, chains and trees -----------------------------

    def _run(self, past, ids, h, pos, mask):
        """New pairs (ids [N], features h [N,H]) at positions pos [N] over cached per-layer (K, V)
        [1,nkv,S,hd]; mask [N, S+N] bool (True = visible) or None (all visible).
        -> (output hidden [N,H], the new per-layer (K, V) [1,nkv,N,hd])."""
        e, h = self.embed(ids)[None], h[None]  # batch of 1: [1,N,H]
        cos, sin = rope_cos_sin(self.config, pos, self.hd)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        new = []
        for layer, (pk, pv) in zip(self.layers, past):
            q, k, v = layer.qkv(e, h, cos, sin)
            new.append((k, v))
            o = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask,
                                               scale=layer.self_attn.scale, enable_gqa=True)
            h = layer.out(h, o)
        return h[0], new

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
        empty = self.fc.weight.new_zeros(1, self.layers[0].self_attn.nkv, 0, self.hd)
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
            p = kernels.logits_to_probs(self.draft_logits(h), temperature, top_k, top_p)  # [1, Vd]
            idx = p.argmax(-1) if temperature == 0 else torch.multinomial(p, 1, generator=generator)[:, 0]
            tok = idx if self.d2t is None else idx + self.d2t[idx]  # draft index -> target id
            tokens.append(tok)
            probs.append(self.to_full(p))
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
            return torch.zeros(0, self.config["vocab_size"], device=dev)
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
        return self.to_full(kernels.logits_to_probs(self.draft_logits(h), temperature, top_k, top_p))
