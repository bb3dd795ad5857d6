"""DSpark = DFlash backbone + a sequential head + a confidence head (DSpark paper s.3, REFERENCE.md s.3).

Only the delta over model_dflash.DFlash lives here. The parallel backbone gives hidden states h_k and
base logits U_k for a whole block in one forward; the sequential head adds a small bias that depends
on the tokens drafted before slot k, eq. (4):

    p_k(v | x_0, x_<k) = softmax(U_k + B_k)(v)       (Gemma-4: U_k soft-capped, the bias added after the cap)
    vanilla Markov head, eq. (5):  B_k = W2 W1[x_{k-1}]               (x_{-1} = the anchor)
    gated head (DeepSpec):         B_k = W2 (W1[x_{k-1}] * sigmoid(gate_proj([h_k ; W1[x_{k-1}]])))
    RNN head, eq. (6):             z_k = [s_{k-1} ; W1[x_{k-1}] ; h_k],  g, c, o = joint_proj(z_k)
                                   s_k = sig(g) s_{k-1} + (1 - sig(g)) tanh(c),  B_k = W2 tanh(o),  s_0 = 0
    confidence, eq. (7):           c_k = sigmoid(proj([h_k ; W1[x_{k-1}]]))

Every head is W2 applied to a rank-r factor A_k, so the training loss passes (A [N, r], W2 [Vd, r]) to
kernels.fused_dspark_loss and the [N, V] bias is never materialized. Training is teacher forced (x_{k-1}
= ground truth; the RNN state restarts at 0 in every block); decoding samples slot by slot, and each
slot's corrected distribution is the one verification uses.

Loss, eq. (12): 0.1 CE (9) + 0.9 L1 (10) + 1.0 BCE (11), each weighted by w_k = exp(-k/4) on the
supervised prefix, with the BCE target c*_k = 1 - ||p_d - p_t||_1 / 2 (eq. 8, detached, clamped to
[0, 1]). The paper calls the middle term a total variation distance; like the released DeepSpec code we
use the L1 distance ||p_d - p_t||_1 = 2 TV.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model_dflash import DFlash, init_weights

CE_ALPHA, L1_ALPHA, CONF_ALPHA = 0.1, 0.9, 1.0  # eq. (12) weights (paper defaults, DeepSpec's config)
HEAD_TYPES = ("vanilla", "gated", "rnn")


class DSpark(DFlash):
    kind = "dspark"

    def __init__(self, config):
        super().__init__(config)
        c, H = self.config, self.config["hidden_size"]
        r = self.rank = c.get("markov_rank", 0)
        self.head_type = c.get("markov_head_type", "vanilla")
        if r and self.head_type not in HEAD_TYPES:
            raise ValueError(f"markov_head_type {self.head_type!r} is not one of {HEAD_TYPES}")
        self.markov_head = self.confidence_head = None
        if r:  # DeepSpec key names: markov_head.{markov_w1, markov_w2, gate_proj, joint_proj}
            self.markov_head = nn.Module()
            self.markov_head.markov_w1 = nn.Embedding(c["vocab_size"], r)  # W1: previous token (target vocab)
            self.markov_head.markov_w2 = nn.Linear(r, c.get("draft_vocab_size") or c["vocab_size"], bias=False)
            if self.head_type == "gated":
                self.markov_head.gate_proj = nn.Linear(H + r, r)  # gate on [h_k ; W1[x_{k-1}]]
            if self.head_type == "rnn":
                self.markov_head.joint_proj = nn.Linear(2 * r + H, 3 * r)  # [W_g; W_c; W_o] of eq. (6)
            self.markov_head.apply(init_weights)
        if c.get("enable_confidence_head"):
            self.with_markov = c.get("confidence_head_with_markov", r > 0)
            self.confidence_head = nn.Module()
            self.confidence_head.proj = nn.Linear(H + (r if self.with_markov else 0), 1)  # w of eq. (7)
            self.confidence_head.apply(init_weights)

    @property
    def has_confidence(self):  # propose returns the confidences c_k of eq. (7) (scheduler.py needs them)
        return self.confidence_head is not None

    @staticmethod
    def head_config(cfg):  # defaults: a vanilla Markov head of rank 256 and a confidence head on [h ; W1[x]]
        r, conf = cfg.get("markov_rank", 256), cfg.get("enable_confidence_head", True)
        out = {"markov_rank": r, "enable_confidence_head": conf}
        if r:
            out["markov_head_type"] = cfg.get("markov_head_type", "vanilla")
        if conf:
            out["confidence_head_with_markov"] = r > 0
        return out

    def set_draft_vocab(self, token_ids, head=None):
        """As DFlash; W2 then maps to the draft vocab (re-initialized when its size changes; W1 stays full)."""
        super().set_draft_vocab(token_ids, head)
        if self.markov_head is not None and self.markov_head.markov_w2.out_features != len(self.d2t):
            w2 = nn.Linear(self.rank, len(self.d2t), bias=False, device=self.d2t.device)
            self.markov_head.markov_w2 = w2.apply(init_weights).to(self.fc.weight.dtype)

    # --- the sequential head and the confidence head -------------------------------------------

    def markov_factor(self, prev, h):
        """Rank-r factor A_k of the bias B_k = W2 A_k: prev [..., K] = x_{k-1}, h [..., K, H] -> [..., K, r].

        K runs over the slots of one block (teacher forced, or a decoding path); the RNN unrolls over it
        from s_0 = 0, so its state never crosses blocks.
        """
        e = self.markov_head.markov_w1(prev)  # W1[x_{k-1}]
        if self.head_type == "vanilla":
            return e  # eq. (5)
        if self.head_type == "gated":
            return e * torch.sigmoid(self.markov_head.gate_proj(torch.cat([h, e.to(h.dtype)], -1)))
        s, out = h.new_zeros(*h.shape[:-2], self.rank), []  # RNN, eq. (6): s_0 = 0 in every block
        for k in range(h.shape[-2]):
            g, c, o = self.markov_head.joint_proj(torch.cat([s, e[..., k, :], h[..., k, :]], -1)).chunk(3, -1)
            s = torch.sigmoid(g) * s + (1 - torch.sigmoid(g)) * torch.tanh(c)
            out.append(torch.tanh(o))
        return torch.stack(out, -2)

    def conf_logit(self, h, prev):
        """Confidence logit of eq. (7): proj([h_k ; W1[x_{k-1}]]) (or proj(h_k) without the Markov feature)."""
        x = torch.cat([h, self.markov_head.markov_w1(prev).to(h.dtype)], -1) if self.with_markov else h
        return self.confidence_head.proj(x).squeeze(-1)

    # --- training loss --------------------------------------------------------------------------

    def block_loss(self, h, h_t, labels, prev, w):
        """Eq. (12) on all blocks: h, h_t [NB, K, H], labels, prev, w [NB, K] -> (loss_sum, metrics)."""
        hd, ht, wf = h.flatten(0, 1), h_t.flatten(0, 1).to(h.dtype), w.flatten()  # [N, H], [N, H], [N]
        y = self.draft_labels(labels.flatten())  # -1 (a miss, no CE) outside a reduced vocab
        bias = None
        if self.markov_head is not None:  # low-rank pair: A [N, r] @ W2^T [r, Vd], never built for all V
            bias = (self.markov_factor(prev, h).flatten(0, 1).to(h.dtype), self.markov_head.markov_w2.weight)
        ce, l1, c_star, am = kernels.fused_dspark_loss(hd, ht, y, self.lm_head.weight, bias=bias, softcap=self.softcap,
                                                       weights=(wf > 0).to(hd.dtype), return_argmax=True)[:4]
        loss = (wf * (CE_ALPHA * ce + L1_ALPHA * l1)).sum()
        extra = {}
        if self.confidence_head is not None:  # eq. (11): BCE against c* = clamp(1 - L1/2, 0, 1), detached
            z = self.conf_logit(h, prev).flatten().float()
            bce = F.binary_cross_entropy_with_logits(z, c_star.detach().float(), reduction="none")
            loss = loss + CONF_ALPHA * (wf * bce).sum()
            extra = {"bce": (wf * bce).sum(), "slot_conf": self.per_slot(torch.sigmoid(z), wf)}
        return loss, self.metrics(wf, ce, l1, c_star, am == y, **extra)

    # --- decoding: sequential sampling -----------------------------------------------------------

    def slot_logits(self, h, U, toks):
        """Corrected logits U_k + B_k of slot k = len(toks)-1 after toks = [anchor, x_0, .., x_{k-1}].

        Vanilla/gated heads read only the last token; the RNN runs its state along the whole path.
        """
        k = len(toks) - 1
        if self.markov_head is None:
            return U[k]
        a = self.markov_factor(torch.tensor(toks, device=h.device), h[:k + 1])[-1]  # [r]
        return U[k] + self.markov_head.markov_w2(a.to(h.dtype))

    def slot_confidence(self, h, toks):
        """c_k = sigmoid(proj([h_k ; W1[x_{k-1}]])) for slot k = len(toks)-1, eq. (7)."""
        if self.confidence_head is None:
            return None
        k = len(toks) - 1
        return torch.sigmoid(self.conf_logit(h[k], torch.tensor(toks[-1], device=h.device)).float())
