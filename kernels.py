"""
Fused vocabulary losses for drafter training, and the probability warping shared by all drafters.

The drafters score hidden states against the frozen target lm_head W [V, H]. A naive loss builds
several [N, V] fp32 tensors (logits, softmaxes, their gradients): ~2 GB each at N=3584, V=151936.
Here the vocabulary is walked in chunks with an online softmax (running max and running sum), so
no [N, V] tensor is ever held:
  pass 0 (forward)  per row: lse of draft and target logits, label logit, argmaxes
  pass 1 (forward)  per row: l1 = sum_v |p_d - p_t| and S = sum_v p_d sign(p_d - p_t)  (DSpark, or stats)
  pass 2 (backward) recompute the logit chunks, form dz = dloss/dz and accumulate grad_h = dz @ W
Two backends with one signature: Triton kernels (CUDA tensors, or any tensors when TRITON_INTERPRET=1)
and a chunked PyTorch loop (CPU). bench.py's naive_* are the full-softmax references they are tested against.
"""
from __future__ import annotations  # the kernels' `tl.constexpr` annotations stay strings until triton reads them

import os

import torch
import torch.nn.functional as F

VOCAB_CHUNK = 4096  # vocab columns per chunk in the PyTorch path (tuned with bench.py loss on CPU)

# -----------------------------------------------------------------------------
# probability warping: temperature, top-k, top-p (shared by drafters and evaluate.py)


def logits_to_probs(logits, temperature=0.0, top_k=0, top_p=1.0):
    """logits [..., V] -> fp32 probabilities [..., V]; temperature 0 = one-hot at the argmax."""
    logits = logits.float()
    if temperature <= 0:  # greedy: all mass on the first argmax
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    z = logits / temperature
    if 0 < top_k < z.shape[-1]:  # keep exactly the k largest logits
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.topk(top_k, -1).indices, True)
        z = z.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(z, -1)
    if top_p < 1.0:  # nucleus: the smallest set of top tokens whose mass reaches top_p
        p_sorted, idx = probs.sort(-1, descending=True)
        mass_before = p_sorted.cumsum(-1) - p_sorted  # mass of the tokens ranked above each one
        p_sorted = p_sorted.masked_fill(mass_before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# -----------------------------------------------------------------------------
# the math of the three passes (both backends implement exactly this)
#
# Online softmax over chunks c of the vocabulary: m' = max(m, max_c z), s' = s e^(m - m') + sum_c e^(z - m'),
# and at the end lse = m + log s (the PyTorch loop keeps lse = m + log s directly: lse' = logaddexp(lse,
# logsumexp_c z)). Soft CE also carries D = sum_v e^(z_t - m_t) z_d, rescaled like s_t, so that
# sum_v p_t z_d = D / s_t and soft_ce = -sum_v p_t log p_d = lse_d - D / s_t.
#
# Gradients w.r.t. the draft logits z (row-wise; p = softmax(z_d), q = softmax(z_t) frozen):
#   ce = lse_d - z_y                       -> dce/dz_j = p_j - [j == y]
#   soft_ce = lse_d - sum_v q_v z_v        -> d/dz_j   = p_j - q_j
#   l1 = sum_v |p_v - q_v|, s_v = sign(p_v - q_v), softmax Jacobian dp_v/dz_j = p_v ([v == j] - p_j):
#     dl1/dz_j = sum_v s_v p_v ([v == j] - p_j) = p_j s_j - p_j sum_v p_v s_v = p_j (s_j - S)
#   S = sum_v p_v s_v needs the normalized p (so lse first) over the whole vocabulary: that is pass 1,
#   and the gradient itself (pass 2, in backward) needs S, hence the recomputation of the chunks.
# With upstream per-row gradients g_ce, g_l1 (or g for soft CE): dz = g_ce dce/dz + g_l1 dl1/dz, then
#   grad_h = dz @ W,  grad_A = dz @ Bm,  grad_Bm = dz^T @ A   (z = h W^T + A Bm^T)
# Soft cap c (Gemma): z = c tanh(h W^T / c) + A Bm^T, z_t = c tanh(h_t W^T / c); grad_h = (dz (1 - (z_cap/c)^2)) @ W


def _torch_pass(PASS, soft, cap, hd, ht, lab, W, A, Bm, st, grads=(None, None, None)):
    """One pass of the Triton kernel below as a PyTorch loop over vocabulary chunks, with its interface:
    per-row st [n, 5] = (lse_d, lse_t, S, g_main, g_l1) in; partials [n, splits, 8] out, here one split:
    pass 0 (lse_d, lse_t, sum_v p_t z_d, z_y, max z_d, argmax z_d, max z_t, argmax z_t), pass 1 (l1, S);
    pass 2 adds the gradients into grads = (gh, gA, gBm), fp32. cap > 0: soft-capped base logits."""
    n, V = hd.shape[0], W.shape[0]
    kw = dict(device=hd.device, dtype=torch.float32)
    lse_d, lse_t, S, g_main, g_l1 = st.unbind(1)
    gh, gA, gBm = grads
    out = torch.zeros(n, 1, 8, **kw)
    if PASS == 0:  # running state: lse and max logit of both, D, the label logit z_y, the argmaxes
        lse_d, lse_t = torch.full((n,), float("-inf"), **kw), torch.full((n,), float("-inf"), **kw)
        best_d, best_t = lse_d.clone(), lse_t.clone()
        dot, zlab = torch.zeros(n, **kw), torch.zeros(n, **kw)
        am_d = am_t = torch.zeros(n, dtype=torch.long, device=hd.device)
    rows = torch.arange(n, device=hd.device)
    for v0 in range(0, V, VOCAB_CHUNK):
        v1 = min(v0 + VOCAB_CHUNK, V)
        zd, zt = (hd @ W[v0:v1].T).float(), (ht @ W[v0:v1].T).float()  # (n, C) logits of this chunk
        if cap:  # z = c tanh(z / c), in place; dcap = dz / dz_raw = 1 - tanh^2 for grad_h
            zd, zt = zd.div_(cap).tanh_(), zt.div_(cap).tanh_()
            dcap, zd, zt = (1 - zd.square() if PASS == 2 else None), zd.mul_(cap), zt.mul_(cap)
        if A is not None and A.dtype == torch.float32:
            zd.addmm_(A, Bm[v0:v1].T)  # + low-rank bias, built one chunk at a time (in place: no temporary)
        elif A is not None:
            zd += (A @ Bm[v0:v1].T).float()
        inside = (lab >= v0) & (lab < v1)  # rows whose label falls in this chunk
        if PASS == 0:
            zlab += torch.where(inside, zd.gather(1, (lab - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
            # first argmax in the chunk; strict > keeps the earliest chunk on ties
            (cmax_d, carg_d), (cmax_t, carg_t) = zd.max(-1), zt.max(-1)
            am_d, best_d = torch.where(cmax_d > best_d, carg_d + v0, am_d), torch.maximum(best_d, cmax_d)
            am_t, best_t = torch.where(cmax_t > best_t, carg_t + v0, am_t), torch.maximum(best_t, cmax_t)
            # online softmax in log space: lse' = log(e^lse + sum_chunk e^z)
            lse_d = torch.logaddexp(lse_d, torch.logsumexp(zd, -1))
            new_t = torch.logaddexp(lse_t, torch.logsumexp(zt, -1))
            if soft:  # D = sum_seen e^(z_t - lse_t) z_d, rescaled as lse_t grows; at the end D = sum_v p_t z_d
                dot = dot * (lse_t - new_t).exp() + (zt.sub_(new_t[:, None]).exp_() * zd).sum(-1)
            lse_t = new_t
            continue
        p_d, p_t = zd.sub_(lse_d[:, None]).exp_(), zt.sub_(lse_t[:, None]).exp_()  # (n, C) normalized
        if PASS == 1:
            diff = p_d - p_t
            out[:, 0, 0] += torch.linalg.vector_norm(diff, 1, -1)  # l1 = sum_v |p_d - p_t|
            out[:, 0, 1] += (p_d * diff.sign_()).sum(-1)  # S = sum_v p_d s_v
            continue
        if soft:  # pass 2: dz = g (p - q)
            dz = p_t.neg_().add_(p_d).mul_(g_main[:, None])
        else:  # dz = p (g_l1 (s - S) + g_ce) - g_ce [j == y], built in place in the sign buffer
            s = p_t.neg_().add_(p_d).sign_()
            dz = s.sub_(S[:, None]).mul_(g_l1[:, None]).add_(g_main[:, None]).mul_(p_d)
            dz[rows[inside], lab[inside] - v0] -= g_main[inside]
        dzw = dz.to(W.dtype)  # bf16 inputs: bf16 matmuls like the model's, fp32 accumulators
        if A is not None:
            gA += (dzw @ Bm[v0:v1]).float()  # grad_A = dz @ Bm  (n, r)
            gBm[v0:v1] = dzw.T @ A  # grad_Bm = dz^T @ A  (C, r)
        if cap:  # through the cap (the bias is not capped)
            dzw = dz.mul_(dcap).to(W.dtype)
        gh += (dzw @ W[v0:v1]).float()  # grad_h = dz @ W  (n, H)
    if PASS == 0:  # the partials of one split, as the kernel writes them
        out[:, 0] = torch.stack([lse_d, lse_t, dot, zlab, best_d, am_d.float(), best_t, am_t.float()], 1)
    return out


# -----------------------------------------------------------------------------
# Triton. It is optional, so it is imported on the first kernel call rather than at the top: CPU installs may
# lack a working triton (they run the PyTorch paths), and the interpreter (TRITON_INTERPRET=1) only takes effect
# if set before that import. The two kernels below are plain functions until then; _triton_kernel() imports
# triton into this module's globals (where the kernel bodies find `tl`) and jits a kernel once per process.

triton = tl = None
_TRITON = {}  # ("loss" or "tree", interpreted?) -> jitted kernel (the tests check which kind ran)


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(x):
    return x.is_cuda or _interpreted()


def _triton_kernel(name):
    global triton, tl
    import triton
    import triton.language as tl

    key = (name, _interpreted())
    if key not in _TRITON:
        if key[1] and type(tl.zeros).__name__ != "InterpretedFunction":  # triton decorates tl at import
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported: set it before the first import")
        _TRITON[key] = triton.jit(_vocab_loss_kernel if name == "loss" else _tree_attention_kernel)
    return _TRITON[key]


# The loss kernel: one kernel, three passes. Program (i, j) owns rows i*BN.. and the vocab split j*SPLIT..,
# walks its split in tiles of BV columns with the online softmax above, and builds each logit tile
# z [BN, BV] = h [BN, H] @ W_tile^T with tl.dot over H in steps of BH (+ A @ Bm_tile^T over r).
# Pass 0/1 write per-(row, split) partials that the host merges (lse = log sum_split e^lse_split);
# pass 2 forms the dz tile and atomically adds dz @ W_tile into grad_h (and grad_A, grad_Bm).

def _vocab_loss_kernel(hd_ptr, ht_ptr, w_ptr, a_ptr, bm_ptr, lab_ptr, st_ptr, out_ptr, gh_ptr, ga_ptr, gbm_ptr,
                       n, V, H, R, SPLIT, NSPLIT, PASS: tl.constexpr, SOFT: tl.constexpr, CAP: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
                       BR: tl.constexpr):
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < n
    r64 = rows.to(tl.int64)
    lab = tl.load(lab_ptr + rows, mask=rmask, other=-1)  # -1 matches no column
    # per-row stats of earlier passes, st [n, 5] = (lse_d, lse_t, S, g_main, g_l1)
    lse_d = tl.load(st_ptr + rows * 5 + 0, mask=rmask, other=0.0)
    lse_t = tl.load(st_ptr + rows * 5 + 1, mask=rmask, other=0.0)
    S = tl.load(st_ptr + rows * 5 + 2, mask=rmask, other=0.0)
    g_main = tl.load(st_ptr + rows * 5 + 3, mask=rmask, other=0.0)
    g_l1 = tl.load(st_ptr + rows * 5 + 4, mask=rmask, other=0.0)
    # running state of the online softmax (pass 0) and the l1 sums (pass 1)
    m_d = tl.full([BN], float("-inf"), tl.float32)
    m_t = tl.full([BN], float("-inf"), tl.float32)
    s_d = tl.zeros([BN], tl.float32)
    s_t = tl.zeros([BN], tl.float32)
    dot = tl.zeros([BN], tl.float32)
    zlab = tl.zeros([BN], tl.float32)
    am_d = tl.zeros([BN], tl.int32)
    am_t = tl.zeros([BN], tl.int32)
    acc_l1 = tl.zeros([BN], tl.float32)
    acc_S = tl.zeros([BN], tl.float32)
    for v0 in range(pid_v * SPLIT, tl.minimum(pid_v * SPLIT + SPLIT, V), BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < V
        c64 = cols.to(tl.int64)
        # logit tiles z [BN, BV] = h @ W_tile^T, accumulated over H in fp32
        zd = tl.zeros([BN, BV], tl.float32)
        zt = tl.zeros([BN, BV], tl.float32)
        for k0 in range(0, H, BH):
            ks = k0 + tl.arange(0, BH)
            kmask = ks < H
            w_off, w_msk = c64[:, None] * H + ks[None, :], cmask[:, None] & kmask[None, :]  # W tile (BV, BH)
            h_off, h_msk = r64[:, None] * H + ks[None, :], rmask[:, None] & kmask[None, :]  # h tile (BN, BH)
            w = tl.load(w_ptr + w_off, mask=w_msk, other=0.0)
            x = tl.load(hd_ptr + h_off, mask=h_msk, other=0.0)
            y = tl.load(ht_ptr + h_off, mask=h_msk, other=0.0)
            if UPCAST:  # the interpreter mishandles bf16 dots: compute in fp32
                w, x, y = w.to(tl.float32), x.to(tl.float32), y.to(tl.float32)
            zd = tl.dot(x, tl.trans(w), zd, input_precision=PREC)
            zt = tl.dot(y, tl.trans(w), zt, input_precision=PREC)
        if CAP > 0:  # soft cap before the bias: z = c tanh(z / c), tanh(x) = 2 sigmoid(2x) - 1
            zd, zt = CAP * (2 * tl.sigmoid(zd * (2 / CAP)) - 1), CAP * (2 * tl.sigmoid(zt * (2 / CAP)) - 1)
            dcap = 1 - (zd / CAP) * (zd / CAP)  # dz / dz_raw, for grad_h
        for r0 in range(0, R, BR):  # Markov bias tile A [BN, r] @ Bm_tile [BV, r]^T (R = 0: no bias)
            rs = r0 + tl.arange(0, BR)
            rk = rs < R
            a_off, a_msk = r64[:, None] * R + rs[None, :], rmask[:, None] & rk[None, :]  # A tile (BN, BR)
            b_off, b_msk = c64[:, None] * R + rs[None, :], cmask[:, None] & rk[None, :]  # Bm tile (BV, BR)
            a = tl.load(a_ptr + a_off, mask=a_msk, other=0.0)
            b = tl.load(bm_ptr + b_off, mask=b_msk, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            zd = tl.dot(a, tl.trans(b), zd, input_precision=PREC)
        zd = tl.where(cmask[None, :], zd, float("-inf"))  # columns past V weigh e^-inf = 0
        zt = tl.where(cmask[None, :], zt, float("-inf"))
        if PASS == 0:  # online softmax: m' = max(m, max z), s' = s e^(m - m') + sum e^(z - m')
            cmax_d, cmax_t = tl.max(zd, 1), tl.max(zt, 1)
            am_d = tl.where(cmax_d > m_d, v0 + tl.argmax(zd, 1), am_d)  # earliest argmax wins
            am_t = tl.where(cmax_t > m_t, v0 + tl.argmax(zt, 1), am_t)
            new_d, new_t = tl.maximum(m_d, cmax_d), tl.maximum(m_t, cmax_t)
            e_t = tl.exp(zt - new_t[:, None])
            s_d = s_d * tl.exp(m_d - new_d) + tl.sum(tl.exp(zd - new_d[:, None]), 1)
            s_t = s_t * tl.exp(m_t - new_t) + tl.sum(e_t, 1)
            if SOFT:  # D = sum e^(z_t - m_t) z_d, rescaled like s_t
                dot = dot * tl.exp(m_t - new_t) + tl.sum(e_t * tl.where(cmask[None, :], zd, 0.0), 1)
            zlab += tl.sum(tl.where(cols[None, :] == lab[:, None], zd, 0.0), 1)  # label logit z_y
            m_d, m_t = new_d, new_t
        else:
            p_d = tl.exp(zd - lse_d[:, None])  # normalized probabilities of the tile
            p_t = tl.exp(zt - lse_t[:, None])
            sgn = tl.where(p_d > p_t, 1.0, tl.where(p_d < p_t, -1.0, 0.0))  # s = sign(p_d - p_t)
            if PASS == 1:  # l1 = sum |p_d - p_t|, S = sum p_d s
                acc_l1 += tl.sum(tl.abs(p_d - p_t), 1)
                acc_S += tl.sum(p_d * sgn, 1)
            else:  # pass 2: dz tile, then grad_h += dz @ W_tile etc. (see the derivation above)
                if SOFT:
                    dz = g_main[:, None] * (p_d - p_t)
                else:
                    onehot = tl.where(cols[None, :] == lab[:, None], 1.0, 0.0)
                    dz = g_main[:, None] * (p_d - onehot) + g_l1[:, None] * p_d * (sgn - S[:, None])
                dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)
                dzh = dz * dcap if CAP > 0 else dz  # grad_h goes through the cap, grad_A and grad_Bm do not
                for k0 in range(0, H, BH):  # grad_h[rows, k-block] += dz @ W_tile[:, k-block]
                    ks = k0 + tl.arange(0, BH)
                    kmask = ks < H
                    w_off, w_msk = c64[:, None] * H + ks[None, :], cmask[:, None] & kmask[None, :]
                    w = tl.load(w_ptr + w_off, mask=w_msk, other=0.0)
                    if UPCAST:
                        w = w.to(tl.float32)
                    gh = tl.dot(dzh.to(w.dtype), w, input_precision=PREC)  # (BN, BH)
                    # other vocab tiles add to the same rows: atomics (fp32 buffer)
                    tl.atomic_add(gh_ptr + r64[:, None] * H + ks[None, :], gh, mask=rmask[:, None] & kmask[None, :])
                for r0 in range(0, R, BR):
                    rs = r0 + tl.arange(0, BR)
                    rk = rs < R
                    a_off, a_msk = r64[:, None] * R + rs[None, :], rmask[:, None] & rk[None, :]
                    b_off, b_msk = c64[:, None] * R + rs[None, :], cmask[:, None] & rk[None, :]
                    a = tl.load(a_ptr + a_off, mask=a_msk, other=0.0)
                    b = tl.load(bm_ptr + b_off, mask=b_msk, other=0.0)
                    if UPCAST:
                        a, b = a.to(tl.float32), b.to(tl.float32)
                    ga = tl.dot(dz.to(b.dtype), b, input_precision=PREC)  # grad_A += dz @ Bm_tile
                    tl.atomic_add(ga_ptr + a_off, ga, mask=a_msk)
                    gb = tl.dot(tl.trans(dz).to(a.dtype), a, input_precision=PREC)  # grad_Bm_tile += dz^T @ A
                    tl.atomic_add(gbm_ptr + b_off, gb, mask=b_msk)  # other row blocks add here too
    # partials of this (row block, split): out [n, NSPLIT, 8]
    o = out_ptr + (r64 * NSPLIT + pid_v) * 8
    if PASS == 0:  # lse = m + log s of the split, its own sum p_t z_d = D / s_t, z_y, max logits and argmaxes
        tl.store(o + 0, m_d + tl.log(s_d), mask=rmask)
        tl.store(o + 1, m_t + tl.log(s_t), mask=rmask)
        tl.store(o + 2, dot / s_t, mask=rmask)
        tl.store(o + 3, zlab, mask=rmask)
        tl.store(o + 4, m_d, mask=rmask)
        tl.store(o + 5, am_d.to(tl.float32), mask=rmask)  # ids < 2^24 are exact in fp32
        tl.store(o + 6, m_t, mask=rmask)
        tl.store(o + 7, am_t.to(tl.float32), mask=rmask)
    if PASS == 1:
        tl.store(o + 0, acc_l1, mask=rmask)
        tl.store(o + 1, acc_S, mask=rmask)


def _triton_pass(PASS, soft, cap, hd, ht, lab, W, A, Bm, st, grads=(None, None, None)):
    """Launches one pass of the kernel; the signature and partials [n, NSPLIT, 8] of _torch_pass."""
    kernel = _triton_kernel("loss")
    interpret = _interpreted()
    n, H = hd.shape
    V, R = W.shape[0], (Bm.shape[1] if A is not None else 0)
    BN, BV, BH, BR = (32, 128, 32, 32) if interpret else (64, 128, 64, 64)  # tl.dot needs dims >= 16
    SPLIT = BV * 2 if interpret else BV * 16  # vocab columns per program, walked tile by tile
    NSPLIT = triton.cdiv(V, SPLIT)
    out = torch.zeros(n, NSPLIT, 8, device=hd.device, dtype=torch.float32)

    def ptr(x):  # absent tensors (no low-rank bias; gradients before pass 2): any pointer, never read
        return out if x is None else x
    gh, gA, gBm = grads
    kernel[(triton.cdiv(n, BN), NSPLIT)](
        hd, ht, W, ptr(A), ptr(Bm), lab, st, out, ptr(gh), ptr(gA), ptr(gBm), n, V, H, R, SPLIT, NSPLIT,
        PASS=PASS, SOFT=soft, CAP=cap, UPCAST=interpret, PREC="ieee" if W.dtype == torch.float32 else "tf32",
        BN=BN, BV=BV, BH=BH, BR=BR, num_warps=8)
    return out


# -----------------------------------------------------------------------------
# autograd: forward = passes 0 (and 1), backward = pass 2; the public functions drop rows of weight 0


class _VocabLoss(torch.autograd.Function):
    """Per-row (main, l1, argmax_d, argmax_t); main = ce (DSpark) or soft ce; l1 differentiable for DSpark."""

    @staticmethod
    def forward(ctx, soft, want_l1, cap, hd, ht, lab, W, A, Bm):
        run = _triton_pass if _use_triton(hd) else _torch_pass  # partials [n, splits, 8] from either
        zero = torch.zeros(hd.shape[0], device=hd.device, dtype=torch.float32)
        P = run(0, soft, cap, hd, ht, lab, W, A, Bm, st=torch.stack([zero] * 5, 1))
        # merge the splits j: lse = log sum_j e^(lse_j); the argmax of the split holding the max logit
        lse_d, lse_t = P[..., 0].logsumexp(1), P[..., 1].logsumexp(1)
        if soft:  # sum_v p_t z_d = sum_j (p_t mass of split j) (split j's own sum p_t z_d)
            main = lse_d - ((P[..., 1] - lse_t[:, None]).exp() * P[..., 2]).sum(1)
        else:  # ce = lse_d - z_y; ignored labels: 0
            main = torch.where(lab >= 0, lse_d - P[..., 3].sum(1), 0.0)
        am_d = P[..., 5].gather(1, P[..., 4].argmax(1, keepdim=True))[:, 0].long()
        am_t = P[..., 7].gather(1, P[..., 6].argmax(1, keepdim=True))[:, 0].long()
        l1, S = None, zero  # S = sum_v p_d s_v, needed by DSpark's l1 gradient only
        if want_l1:
            P = run(1, False, cap, hd, ht, lab, W, A, Bm, st=torch.stack([lse_d, lse_t, zero, zero, zero], 1))
            l1, S = P[..., 0].sum(1), P[..., 1].sum(1)
        ctx.soft, ctx.cap, ctx.run = soft, cap, run
        ctx.save_for_backward(hd, ht, lab, W, A, Bm, lse_d, lse_t, S)
        if soft and want_l1:  # soft CE's l1 is a statistic
            ctx.mark_non_differentiable(l1)
        ctx.mark_non_differentiable(am_d, am_t)
        return main, l1, am_d, am_t

    @staticmethod
    def backward(ctx, g_main, g_l1, _g_am_d, _g_am_t):
        hd, ht, lab, W, A, Bm, lse_d, lse_t, S = ctx.saved_tensors
        g_main = g_main.float() if ctx.soft else torch.where(lab >= 0, g_main.float(), 0.0)
        g_l1 = g_l1.float() if g_l1 is not None and not ctx.soft else torch.zeros_like(g_main)
        f32 = dict(dtype=torch.float32, device=hd.device)  # gradient accumulators
        gh = torch.zeros(hd.shape, **f32)
        gA = gBm = None
        if A is not None:
            gA, gBm = torch.zeros(A.shape, **f32), torch.zeros(Bm.shape, **f32)
        st = torch.stack([lse_d, lse_t, S, g_main, g_l1], 1)
        ctx.run(2, ctx.soft, ctx.cap, hd, ht, lab, W, A, Bm, st, grads=(gh, gA, gBm))
        if A is not None:
            gA, gBm = gA.to(A.dtype), gBm.to(Bm.dtype)
        return None, None, None, gh.to(hd.dtype), None, None, None, gA, gBm


def _vocab_loss(soft, want_l1, h_draft, h_target, labels, W, bias, weights, softcap):
    N, dev = h_draft.shape[0], h_draft.device
    if labels is None:  # soft CE has no labels; -1 matches no vocabulary column
        labels = torch.full((N,), -1, dtype=torch.long, device=dev)
    keep = None if weights is None else torch.nonzero(weights != 0)[:, 0]  # a host sync: skips masked rows
    if keep is not None and keep.numel() == N:
        keep = None  # every row counts: no gather, no scatter
    if keep is not None and keep.numel() == 0:  # nothing to score: zeros that still belong to the graph
        zero = h_draft.sum().float() * 0 + torch.zeros(N, device=dev)
        neg = torch.full((N,), -1, dtype=torch.long, device=dev)
        return zero, (zero if want_l1 else None), neg, neg

    def take(x):  # the kept rows, in W's dtype, contiguous for the kernels
        return (x if keep is None else x[keep]).to(W.dtype).contiguous()
    A = Bm = None
    if bias is not None:  # the low-rank pair A [N, r], Bm [V, r]
        A, Bm = bias
        A, Bm = take(A), Bm.to(W.dtype).contiguous()
    lab = labels if keep is None else labels[keep]
    main, l1, am_d, am_t = _VocabLoss.apply(soft, want_l1, float(softcap or 0), take(h_draft), take(h_target),
                                            lab.contiguous(), W.detach().contiguous(), A, Bm)
    if keep is None:
        return main, l1, am_d, am_t

    def full(x, fill):  # scatter the kept rows back to N rows
        return None if x is None else torch.full((N,), fill, dtype=x.dtype, device=x.device).index_copy(0, keep, x)
    return full(main, 0), full(l1, 0), full(am_d, -1), full(am_t, -1)


def fused_dspark_loss(h_draft, h_target, labels, W, bias=None, weights=None, return_argmax=False, softcap=None):
    """DSpark's per-row terms without [N, V] tensors.
    h_draft, h_target [N, H], labels [N] (negative = ignored: ce 0), W [V, H] frozen lm_head.
    bias: None or (A [N, r], Bm [V, r]), the low-rank Markov bias A @ Bm^T, built chunk by chunk.
    weights [N]: rows with weight 0 are skipped (values 0, no gradient, argmax -1); other values are
    the caller's to apply. Returns ce [N], l1 [N] = ||p_d - p_t||_1 (= 2 TV), c_star [N] =
    clamp(1 - l1/2, 0, 1) detached, and with return_argmax also the draft and target argmax [N].
    Gradients reach h_draft, A and Bm. softcap c: all use logits c tanh(h W^T / c) (the draft's + the uncapped bias)."""
    ce, l1, am_d, am_t = _vocab_loss(False, True, h_draft, h_target, labels, W, bias, weights, softcap)
    c_star = (1 - l1.detach() / 2).clamp(0, 1)
    return (ce, l1, c_star, am_d, am_t) if return_argmax else (ce, l1, c_star)


def fused_soft_ce(h_draft, h_target, W, weights=None, return_stats=False, softcap=None):
    """Soft cross-entropy -sum_v p_t log p_d per row [N] against the frozen target distribution.
    With return_stats: (loss, l1 = ||p_d - p_t||_1 detached (one more vocabulary pass), draft argmax,
    target argmax); weights and softcap (both logits capped) as in fused_dspark_loss."""
    loss, l1, am_d, am_t = _vocab_loss(True, return_stats, h_draft, h_target, None, W, None, weights, softcap)
    return (loss, l1.detach(), am_d, am_t) if return_stats else loss


# -----------------------------------------------------------------------------
# tree attention for verification (evaluate.py's draft trees, target.py's registered attention).
# The verify forward feeds N tree tokens (node 0 = the anchor, then the draft nodes, parents first) after
# P cached tokens; node i sits at position P + depth_i and must see the prefix and its own ancestors only:
#   o_i = sum_j softmax_j(s_ij) v_j over visible keys j,   s_ij = scale q_i . k_j
#   visible(i, j) = (j < P and j > lo_i)  or  (j >= P and anc[i, j - P])
# anc [N, N] (bool or int8): anc[i, j] = node j is node i or one of its ancestors; lo_i = P + depth_i - window
# for a sliding-window layer (a key is seen iff q_pos - k_pos < window, as in HF), else -1.
# Grouped-query heads: query head h reads kv head h // G, G = H / Hkv.


def _tree_lo(anc, prefix_len, window):
    """lo [N] long: node i sees cached key j iff j > lo_i; depth_i = |ancestors of i| = anc[i].sum() - 1."""
    if window:
        return prefix_len + anc.bool().sum(1) - 1 - window
    return torch.full((anc.shape[0],), -1, dtype=torch.long, device=anc.device)


def tree_attention_ref(q, k, v, anc, prefix_len, scale, window=0):
    """q [H, N, D] (tree queries), k, v [Hkv, P+N, D] (cache + tree), anc [N, N] -> o [H, N, D]; fp32 math."""
    H, N, D = q.shape
    Hkv, S = k.shape[:2]
    if S != prefix_len + N:
        raise ValueError(f"tree_attention: {S} keys but prefix_len + N = {prefix_len + N}")
    pre = torch.arange(prefix_len, device=q.device)[None, :] > _tree_lo(anc, prefix_len, window)[:, None]  # [N, P]
    vis = torch.cat([pre, anc.bool()], 1)  # [N, S] visible keys
    qg = q.float().reshape(Hkv, H // Hkv * N, D)  # rows (g, i) of kv head c: query head c * G + g
    s = (qg @ k.float().transpose(1, 2)) * scale  # [Hkv, G*N, S]
    s = s.view(Hkv, H // Hkv, N, S).masked_fill(~vis, float("-inf"))
    o = torch.softmax(s, -1).view(Hkv, H // Hkv * N, S) @ v.float()  # [Hkv, G*N, D]
    return o.view(H, N, D).to(q.dtype)


# Triton: program (m, c, s) owns rows m*BM.. of kv head c (row r = g*N + i: query i of head c*G + g, so the G
# heads sharing k/v read each key tile once) and the key split s*SPLIT.. (flash-decoding: many programs even
# for few queries and a long prefix). Per key tile of BN keys, online softmax with running max m and sum l:
#   m' = max(m, max_j s_j),  l' = l e^(m - m') + sum_j e^(s_j - m'),  acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j
# A split writes o_s = acc / l and lse_s = m + log l (-inf if it saw no visible key). Since sum over split s
# of e^(s_j) = e^(lse_s), the host merges o = sum_s e^(lse_s) o_s / sum_s e^(lse_s) = sum_s softmax_s(lse) o_s.

def _tree_attention_kernel(q_ptr, k_ptr, v_ptr, anc_ptr, lo_ptr, o_ptr, lse_ptr, N, P, S, G, D, H, SPLIT, scale,
                           sqh, sqn, skh, sks, svh, svs,
                           UPCAST: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BD: tl.constexpr):
    pid_m, c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < G * N
    i = rows % N  # tree query
    h = c * G + rows // N  # its query head: h // G = c
    d = tl.arange(0, BD)
    dmask = d < D  # head dims padded to a power of two >= 16 (tl.dot)
    q = tl.load(q_ptr + h[:, None] * sqh + i[:, None] * sqn + d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0)
    if UPCAST:  # the interpreter mishandles bf16 dots: fp32 after loading
        q = q.to(tl.float32)
    lo = tl.load(lo_ptr + i, mask=rmask, other=0)
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for j0 in range(pid_s * SPLIT, tl.minimum(pid_s * SPLIT + SPLIT, S), BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < S
        kv_msk = cmask[:, None] & dmask[None, :]
        kt = tl.load(k_ptr + c * skh + cols[:, None] * sks + d[None, :], mask=kv_msk, other=0.0)  # [BN, BD]
        vt = tl.load(v_ptr + c * svh + cols[:, None] * svs + d[None, :], mask=kv_msk, other=0.0)
        if UPCAST:
            kt, vt = kt.to(tl.float32), vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale  # [BM, BN] scores
        t = cols - P  # tree node of each key (< 0: a cached prefix key)
        a = tl.load(anc_ptr + i[:, None] * N + t[None, :], mask=rmask[:, None] & (t >= 0)[None, :] & cmask[None, :],
                    other=0)
        vis = ((t < 0)[None, :] & (cols[None, :] > lo[:, None])) | (a != 0)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: e^-inf = 0, not NaN
        alpha = tl.exp(m - m_use)
        p = tl.exp(s - m_use[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m = m_new
    # partials of this split: o [NSPLIT, H, N, D], lse [NSPLIT, H, N]
    row = (pid_s * H + h) * N + i
    l_use = tl.where(l > 0, l, 1.0)
    tl.store(o_ptr + row[:, None] * D + d[None, :], acc / l_use[:, None], mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + row, tl.where(l > 0, m + tl.log(l_use), float("-inf")), mask=rmask)


def tree_attention(q, k, v, anc, prefix_len, scale, window=0):
    """Tree verification attention: q [H, N, D] (the tree's queries), k, v [Hkv, P+N, D] (cache + tree),
    anc [N, N] ancestor matrix (bool/int8), prefix_len P -> o [H, N, D]. Triton on CUDA (or TRITON_INTERPRET=1),
    else tree_attention_ref. window > 0: sliding-window layer (keys with q_pos - k_pos < window only)."""
    if not _use_triton(q):
        return tree_attention_ref(q, k, v, anc, prefix_len, scale, window)
    kernel = _triton_kernel("tree")
    interpret = _interpreted()
    H, N, D = q.shape
    Hkv, S = k.shape[:2]
    if S != prefix_len + N or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"tree_attention: need P+N = {prefix_len + N} keys (got {S}) and contiguous head dims")
    G = H // Hkv
    BM, BN, BD = 16 if interpret else 64, 16 if interpret else 64, max(16, triton.next_power_of_2(D))
    programs = triton.cdiv(G * N, BM) * Hkv
    if interpret:  # 3 splits: the tests exercise the merge (and splits that see no key)
        splits = 3
    else:  # ~2 programs per SM
        splits = max(1, 2 * torch.cuda.get_device_properties(q.device).multi_processor_count // programs)
    SPLIT = BN * triton.cdiv(triton.cdiv(S, BN), splits)  # keys per split, a multiple of BN
    NSPLIT = triton.cdiv(S, SPLIT)
    lo = _tree_lo(anc, prefix_len, window)
    o = torch.empty(NSPLIT, H, N, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(NSPLIT, H, N, device=q.device, dtype=torch.float32)
    kernel[(triton.cdiv(G * N, BM), Hkv, NSPLIT)](
        q, k, v, anc.to(torch.int8).contiguous(), lo.to(torch.int32), o, lse, N, prefix_len, S, G, D, H, SPLIT,
        float(scale), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        UPCAST=interpret, PREC="ieee" if q.dtype == torch.float32 else "tf32", BM=BM, BN=BN, BD=BD, num_warps=4)
    return (torch.softmax(lse, 0)[..., None] * o).sum(0).to(q.dtype)  # merge the splits (derivation above)
