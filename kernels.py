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
and a chunked PyTorch loop (CPU). naive_* are full-softmax references for tests and bench.py.
"""
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
# naive references: full [N, V] softmaxes, autograd does the backward (tests and bench.py only


def _naive_logits(h_draft, h_target, W, bias):
    zd = (h_draft @ W.T).float()  # (N, V)
    if isinstance(bias, tuple):  # low-rank Markov bias A @ Bm.T
        zd = zd + (bias[0] @ bias[1].T).float()
    elif bias is not None:
        zd = zd + bias.float()
    return zd, (h_target @ W.T).float()


def _keep(weights, N, device):
    return torch.ones(N, dtype=torch.bool, device=device) if weights is None else weights != 0


def naive_dspark_loss(h_draft, h_target, labels, W, bias=None, weights=None, return_argmax=False):
    zd, zt = _naive_logits(h_draft, h_target, W, bias)
    keep = _keep(weights, zd.shape[0], zd.device)
    logp_d = torch.log_softmax(zd, -1)
    p_d, p_t = logp_d.exp(), torch.softmax(zt, -1)
    ce = -logp_d.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    ce = torch.where(keep & (labels >= 0), ce, 0.0)
    l1 = torch.where(keep, (p_d - p_t).abs().sum(-1), 0.0)
    c_star = (1 - l1.detach() / 2).clamp(0, 1)
    if not return_argmax:
        return ce, l1, c_star
    return ce, l1, c_star, torch.where(keep, zd.argmax(-1), -1), torch.where(keep, zt.argmax(-1), -1)


def naive_soft_ce(h_draft, h_target, W, weights=None, return_stats=False):
    zd, zt = _naive_logits(h_draft, h_target, W, None)
    keep = _keep(weights, zd.shape[0], zd.device)
    logp_d, p_t = torch.log_softmax(zd, -1), torch.softmax(zt, -1)
    loss = torch.where(keep, -(p_t * logp_d).sum(-1), 0.0)
    if not return_stats:
        return loss
    l1 = torch.where(keep, (logp_d.exp() - p_t).abs().sum(-1), 0.0).detach()
    return loss, l1, torch.where(keep, zd.argmax(-1), -1), torch.where(keep, zt.argmax(-1), -1)


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
#   grad_h = dz @ W,  grad_A = dz @ Bm,  grad_Bm = dz^T @ A,  grad_dense_bias = dz   (z = h W^T + A Bm^T)


def _torch_logits(hd, ht, W, A, Bm, dense, v0, v1):
    zd = (hd @ W[v0:v1].T).float()  # (n, C) draft logits of this chunk
    if A is not None and A.dtype == torch.float32:
        zd.addmm_(A, Bm[v0:v1].T)  # low-rank bias, built one chunk at a time (in place: no temporary)
    elif A is not None:
        zd += (A @ Bm[v0:v1].T).float()
    if dense is not None:
        zd += dense[:, v0:v1].float()
    return zd, (ht @ W[v0:v1].T).float()


def _torch_stats(soft, want_am, hd, ht, lab, W, A, Bm, dense):
    n, V = hd.shape[0], W.shape[0]
    kw = dict(device=hd.device, dtype=torch.float32)
    lse_d, lse_t = torch.full((n,), float("-inf"), **kw), torch.full((n,), float("-inf"), **kw)
    best_d, best_t = lse_d.clone(), lse_t.clone()  # running max logit (for the argmax)
    dot, zlab = torch.zeros(n, **kw), torch.zeros(n, **kw)
    am_d = am_t = torch.zeros(n, dtype=torch.long, device=hd.device)
    for v0 in range(0, V, VOCAB_CHUNK):
        v1 = min(v0 + VOCAB_CHUNK, V)
        zd, zt = _torch_logits(hd, ht, W, A, Bm, dense, v0, v1)  # (n, C) each
        if not soft:  # label logit z_y, for rows whose label falls in this chunk
            inside = (lab >= v0) & (lab < v1)
            zlab += torch.where(inside, zd.gather(1, (lab - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
        if want_am:  # first argmax in the chunk; strict > keeps the earliest chunk on ties
            (cmax_d, carg_d), (cmax_t, carg_t) = zd.max(-1), zt.max(-1)
            am_d, best_d = torch.where(cmax_d > best_d, carg_d + v0, am_d), torch.maximum(best_d, cmax_d)
            am_t, best_t = torch.where(cmax_t > best_t, carg_t + v0, am_t), torch.maximum(best_t, cmax_t)
        # online softmax in log space: lse' = log(e^lse + sum_chunk e^z)
        lse_d = torch.logaddexp(lse_d, torch.logsumexp(zd, -1))
        new_t = torch.logaddexp(lse_t, torch.logsumexp(zt, -1))
        if soft:  # D = sum_seen e^(z_t - lse_t) z_d, rescaled as lse_t grows; at the end D = sum_v p_t z_d
            dot = dot * (lse_t - new_t).exp() + (zt.sub_(new_t[:, None]).exp_() * zd).sum(-1)
        lse_t = new_t
    return dict(lse_d=lse_d, lse_t=lse_t, main=lse_d - dot if soft else lse_d - zlab, am_d=am_d, am_t=am_t)


def _torch_l1(hd, ht, lab, W, A, Bm, dense, lse_d, lse_t):
    l1, S = torch.zeros_like(lse_d), torch.zeros_like(lse_d)
    for v0 in range(0, W.shape[0], VOCAB_CHUNK):
        zd, zt = _torch_logits(hd, ht, W, A, Bm, dense, v0, v0 + VOCAB_CHUNK)
        p_d, p_t = zd.sub_(lse_d[:, None]).exp_(), zt.sub_(lse_t[:, None]).exp_()  # (n, C) normalized
        diff = p_d - p_t
        l1 += torch.linalg.vector_norm(diff, 1, -1)  # sum_v |p_d - p_t|
        S += (p_d * diff.sign_()).sum(-1)  # sum_v p_d s_v
    return l1, S


def _torch_grads(soft, hd, ht, lab, W, A, Bm, dense, st, g_main, g_l1):
    V = W.shape[0]
    f32 = dict(dtype=torch.float32, device=hd.device)
    gh = torch.zeros(hd.shape, **f32)
    gA = torch.zeros(A.shape, **f32) if A is not None else None
    gBm = torch.zeros(Bm.shape, **f32) if A is not None else None
    gdense = torch.zeros(dense.shape, **f32) if dense is not None else None  # (n, V): materializes
    rows = torch.arange(hd.shape[0], device=hd.device)
    for v0 in range(0, V, VOCAB_CHUNK):
        v1 = min(v0 + VOCAB_CHUNK, V)
        zd, zt = _torch_logits(hd, ht, W, A, Bm, dense, v0, v1)
        p_d, p_t = zd.sub_(st["lse_d"][:, None]).exp_(), zt.sub_(st["lse_t"][:, None]).exp_()
        if soft:  # dz = g (p - q)
            dz = p_t.neg_().add_(p_d).mul_(g_main[:, None])
        else:  # dz = p (g_l1 (s - S) + g_ce) - g_ce [j == y], built in place in the sign buffer
            s = p_t.neg_().add_(p_d).sign_()
            dz = s.sub_(st["S"][:, None]).mul_(g_l1[:, None]).add_(g_main[:, None]).mul_(p_d)
            inside = (lab >= v0) & (lab < v1)
            dz[rows[inside], lab[inside] - v0] -= g_main[inside]
        dzw = dz.to(W.dtype)  # bf16 inputs: bf16 matmuls like the model's, fp32 accumulators
        gh += (dzw @ W[v0:v1]).float()  # grad_h = dz @ W  (n, H)
        if A is not None:
            gA += (dzw @ Bm[v0:v1]).float()  # grad_A = dz @ Bm  (n, r)
            gBm[v0:v1] = dzw.T @ A  # grad_Bm = dz^T @ A  (C, r)
        if dense is not None:
            gdense[:, v0:v1] = dz
    return gh, gA, gBm, gdense


# -----------------------------------------------------------------------------
# Triton: one kernel, three passes. Program (i, j) owns rows i*BN.. and the vocab split j*SPLIT..,
# walks its split in tiles of BV columns with the online softmax above, and builds each logit tile
# z [BN, BV] = h [BN, H] @ W_tile^T with tl.dot over H in steps of BH (+ A @ Bm_tile^T over r).
# Pass 0/1 write per-(row, split) partials that the host merges (the same m/s rescaling, across
# splits); pass 2 forms the dz tile and atomically adds dz @ W_tile into grad_h (and grad_A, grad_Bm).

_TRITON = {}  # interpret flag -> compiled kernel; triton reads TRITON_INTERPRET when a kernel is decorated


def _use_triton(x):
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _triton_kernel():
    global triton, tl  # imported lazily; the kernel body finds tl through the module globals
    import triton
    import triton.language as tl

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret in _TRITON:
        return _TRITON[interpret]
    if interpret and type(tl.zeros).__name__ != "InterpretedFunction":  # triton decorates tl at import
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported: set it before the first import")

    @triton.jit
    def vocab_loss_kernel(hd_ptr, ht_ptr, w_ptr, a_ptr, bm_ptr, bias_ptr, lab_ptr, st_ptr, out_ptr,
                          gh_ptr, ga_ptr, gbm_ptr, gbias_ptr, n, V, H, R, SPLIT, NSPLIT,
                          PASS: tl.constexpr, SOFT: tl.constexpr, HAS_LR: tl.constexpr,
                          HAS_DENSE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                          BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr):
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
            if HAS_LR:  # Markov bias tile A [BN, r] @ Bm_tile [BV, r]^T, never built for all V
                for r0 in range(0, R, BR):
                    rs = r0 + tl.arange(0, BR)
                    rk = rs < R
                    a_off, a_msk = r64[:, None] * R + rs[None, :], rmask[:, None] & rk[None, :]  # A tile (BN, BR)
                    b_off, b_msk = c64[:, None] * R + rs[None, :], cmask[:, None] & rk[None, :]  # Bm tile (BV, BR)
                    a = tl.load(a_ptr + a_off, mask=a_msk, other=0.0)
                    b = tl.load(bm_ptr + b_off, mask=b_msk, other=0.0)
                    if UPCAST:
                        a, b = a.to(tl.float32), b.to(tl.float32)
                    zd = tl.dot(a, tl.trans(b), zd, input_precision=PREC)
            tile = rmask[:, None] & cmask[None, :]
            if HAS_DENSE:
                zd += tl.load(bias_ptr + r64[:, None] * V + c64[None, :], mask=tile, other=0.0).to(tl.float32)
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
                    dz = tl.where(tile, dz, 0.0)
                    if HAS_DENSE:
                        tl.store(gbias_ptr + r64[:, None] * V + c64[None, :], dz, mask=tile)
                    for k0 in range(0, H, BH):  # grad_h[rows, k-block] += dz @ W_tile[:, k-block]
                        ks = k0 + tl.arange(0, BH)
                        kmask = ks < H
                        w_off, w_msk = c64[:, None] * H + ks[None, :], cmask[:, None] & kmask[None, :]
                        w = tl.load(w_ptr + w_off, mask=w_msk, other=0.0)
                        if UPCAST:
                            w = w.to(tl.float32)
                        gh = tl.dot(dz.to(w.dtype), w, input_precision=PREC)  # (BN, BH)
                        # other vocab tiles add to the same rows: atomics (fp32 buffer)
                        tl.atomic_add(gh_ptr + r64[:, None] * H + ks[None, :], gh, mask=rmask[:, None] & kmask[None, :])
                    if HAS_LR:
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
        if PASS == 0:
            tl.store(o + 0, m_d, mask=rmask)
            tl.store(o + 1, s_d, mask=rmask)
            tl.store(o + 2, m_t, mask=rmask)
            tl.store(o + 3, s_t, mask=rmask)
            tl.store(o + 4, dot, mask=rmask)
            tl.store(o + 5, zlab, mask=rmask)
            tl.store(o + 6, am_d.to(tl.float32), mask=rmask)  # ids < 2^24 are exact in fp32
            tl.store(o + 7, am_t.to(tl.float32), mask=rmask)
        if PASS == 1:
            tl.store(o + 0, acc_l1, mask=rmask)
            tl.store(o + 1, acc_S, mask=rmask)

    _TRITON[interpret] = vocab_loss_kernel
    return vocab_loss_kernel


def _triton_pass(PASS, soft, hd, ht, lab, W, A, Bm, dense, st=None, grads=None):
    kernel = _triton_kernel()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    n, H = hd.shape
    V, R = W.shape[0], (Bm.shape[1] if A is not None else 0)
    BN, BV, BH, BR = (32, 128, 32, 32) if interpret else (64, 128, 64, 64)  # tl.dot needs dims >= 16
    SPLIT = BV * 2 if interpret else BV * 16  # vocab columns per program, walked tile by tile
    NSPLIT = triton.cdiv(V, SPLIT)
    out = torch.zeros(n, NSPLIT, 8, device=hd.device, dtype=torch.float32)
    opt = lambda x: x if x is not None else out  # noqa: E731  (absent tensors: any pointer, never read)
    gh, ga, gbm, gbias = grads if grads is not None else (None,) * 4
    kernel[(triton.cdiv(n, BN), NSPLIT)](
        hd, ht, W, opt(A), opt(Bm), opt(dense), lab, opt(st), out, opt(gh), opt(ga), opt(gbm), opt(gbias),
        n, V, H, R, SPLIT, NSPLIT, PASS=PASS, SOFT=soft, HAS_LR=A is not None, HAS_DENSE=dense is not None,
        UPCAST=interpret, PREC="ieee" if W.dtype == torch.float32 else "tf32", BN=BN, BV=BV, BH=BH, BR=BR,
        num_warps=8)
    return out


def _triton_stats(soft, want_am, hd, ht, lab, W, A, Bm, dense):
    P = _triton_pass(0, soft, hd, ht, lab, W, A, Bm, dense)  # (n, NSPLIT, 8)
    # merge the splits: lse = m + log sum_j s_j e^(m_j - m), with m = max_j m_j
    m_d, j_d = P[..., 0].max(1)
    m_t, j_t = P[..., 2].max(1)
    lse_d = m_d + (P[..., 1] * (P[..., 0] - m_d[:, None]).exp()).sum(1).log()
    s_t = (P[..., 3] * (P[..., 2] - m_t[:, None]).exp()).sum(1)
    lse_t = m_t + s_t.log()
    main = lse_d - (P[..., 4] * (P[..., 2] - m_t[:, None]).exp()).sum(1) / s_t if soft else lse_d - P[..., 5].sum(1)
    am_d = P[..., 6].gather(1, j_d[:, None])[:, 0].long()  # argmax of the split holding the max
    am_t = P[..., 7].gather(1, j_t[:, None])[:, 0].long()
    return dict(lse_d=lse_d, lse_t=lse_t, main=main, am_d=am_d, am_t=am_t)


def _pack(st, *extra):  # st [n, 5] = (lse_d, lse_t, S, g_main, g_l1) for the kernel
    cols = [st["lse_d"], st["lse_t"]] + [x if x is not None else torch.zeros_like(st["lse_d"]) for x in extra]
    return torch.stack(cols + [torch.zeros_like(st["lse_d"])] * (5 - len(cols)), 1).float().contiguous()


def _triton_l1(hd, ht, lab, W, A, Bm, dense, lse_d, lse_t):
    P = _triton_pass(1, False, hd, ht, lab, W, A, Bm, dense, st=_pack(dict(lse_d=lse_d, lse_t=lse_t)))
    return P[..., 0].sum(1), P[..., 1].sum(1)


def _triton_grads(soft, hd, ht, lab, W, A, Bm, dense, st, g_main, g_l1):
    f32 = dict(dtype=torch.float32, device=hd.device)
    gh = torch.zeros(hd.shape, **f32)
    gA = torch.zeros(A.shape, **f32) if A is not None else None
    gBm = torch.zeros(Bm.shape, **f32) if A is not None else None
    gdense = torch.zeros(dense.shape, **f32) if dense is not None else None  # (n, V): materializes
    _triton_pass(2, soft, hd, ht, lab, W, A, Bm, dense, st=_pack(st, st.get("S"), g_main, g_l1),
                 grads=(gh, gA, gBm, gdense))
    return gh, gA, gBm, gdense


# -----------------------------------------------------------------------------
# autograd: forward = passes 0 (and 1), backward = pass 2; the public functions drop rows of weight 0


class _VocabLoss(torch.autograd.Function):
    """Per-row (main, l1, argmax_d, argmax_t); main = ce (DSpark) or soft ce; l1 differentiable for DSpark."""

    @staticmethod
    def forward(ctx, soft, want_l1, want_am, hd, ht, lab, W, A, Bm, dense):
        tri = _use_triton(hd)
        with torch.no_grad():
            st = (_triton_stats if tri else _torch_stats)(soft, want_am, hd, ht, lab, W, A, Bm, dense)
            st["S"] = l1 = None
            if want_l1:
                l1, st["S"] = (_triton_l1 if tri else _torch_l1)(hd, ht, lab, W, A, Bm, dense, st["lse_d"], st["lse_t"])
        main = torch.where(lab >= 0, st["main"], 0.0) if not soft else st["main"]  # ignored labels: ce = 0
        ctx.soft, ctx.tri, ctx.st = soft, tri, {k: st[k] for k in ("lse_d", "lse_t", "S")}
        ctx.save_for_backward(hd, ht, lab, W, A, Bm, dense)
        if soft:
            ctx.mark_non_differentiable(*([l1] if l1 is not None else []))
        ctx.mark_non_differentiable(st["am_d"], st["am_t"])
        return main, l1, st["am_d"], st["am_t"]

    @staticmethod
    def backward(ctx, g_main, g_l1, _g_am_d, _g_am_t):
        hd, ht, lab, W, A, Bm, dense = ctx.saved_tensors
        g_main = torch.where(lab >= 0, g_main.float(), 0.0) if not ctx.soft else g_main.float()
        g_l1 = g_l1.float() if g_l1 is not None and not ctx.soft else torch.zeros_like(g_main)
        grads = _triton_grads if ctx.tri else _torch_grads
        gh, gA, gBm, gdense = grads(ctx.soft, hd, ht, lab, W, A, Bm, dense, ctx.st, g_main, g_l1)
        cast = lambda g, x: g.to(x.dtype) if g is not None else None  # noqa: E731
        return None, None, None, cast(gh, hd), None, None, None, cast(gA, A), cast(gBm, Bm), cast(gdense, dense)


def _vocab_loss(soft, want_l1, want_am, h_draft, h_target, labels, W, bias, weights):
    N, dt = h_draft.shape[0], W.dtype
    keep = None if weights is None else torch.nonzero(weights != 0)[:, 0]  # a host sync: skips masked rows
    keep = None if keep is not None and keep.numel() == N else keep
    take = lambda x: (x if keep is None else x[keep]).to(dt).contiguous()  # noqa: E731
    if labels is None:  # soft CE has no labels; -1 matches no vocabulary column
        labels = torch.full((N,), -1, dtype=torch.long, device=h_draft.device)
    A = Bm = dense = None
    if isinstance(bias, tuple):
        A, Bm = take(bias[0]), bias[1].to(dt).contiguous()
    elif bias is not None:
        dense = take(bias)
    if keep is not None and keep.numel() == 0:  # nothing to score: zeros that still belong to the graph
        zero = h_draft.sum().float() * 0 + torch.zeros(N, device=h_draft.device)
        neg = torch.full((N,), -1, dtype=torch.long, device=h_draft.device)
        return zero, (zero if want_l1 else None), neg, neg
    lab = labels if keep is None else labels[keep]
    main, l1, am_d, am_t = _VocabLoss.apply(soft, want_l1, want_am, take(h_draft), take(h_target),
                                            lab.contiguous(), W.detach().contiguous(), A, Bm, dense)
    if keep is None:
        return main, l1, am_d, am_t

    def full(x, fill):  # scatter the kept rows back to N rows
        return None if x is None else torch.full((N,), fill, dtype=x.dtype, device=x.device).index_copy(0, keep, x)
    return full(main, 0), full(l1, 0), full(am_d, -1), full(am_t, -1)


def fused_dspark_loss(h_draft, h_target, labels, W, bias=None, weights=None, return_argmax=False):
    """DSpark's per-row terms without [N, V] tensors.
    h_draft, h_target [N, H], labels [N] (negative = ignored: ce 0), W [V, H] frozen lm_head.
    bias: None, (A [N, r], Bm [V, r]) meaning A @ Bm^T built chunk by chunk, or a dense [N, V] tensor
    (which materializes [N, V], and so does its gradient). weights [N]: rows with weight 0 are skipped
    (values 0, no gradient, argmax -1); other values are the caller's to apply.
    Returns ce [N], l1 [N] = ||p_d - p_t||_1 (= 2 TV), c_star [N] = clamp(1 - l1/2, 0, 1) detached,
    and with return_argmax also the draft and target argmax [N]. Gradients reach h_draft, A, Bm, dense."""
    ce, l1, am_d, am_t = _vocab_loss(False, True, return_argmax, h_draft, h_target, labels, W, bias, weights)
    c_star = (1 - l1.detach() / 2).clamp(0, 1)
    return (ce, l1, c_star, am_d, am_t) if return_argmax else (ce, l1, c_star)


def fused_soft_ce(h_draft, h_target, W, weights=None, return_stats=False):
    """Soft cross-entropy -sum_v p_t log p_d per row [N] against the frozen target distribution.
    With return_stats: (loss, l1 = ||p_d - p_t||_1 detached (one more vocabulary pass), draft argmax,
    target argmax); weights as in fused_dspark_loss."""
    loss, l1, am_d, am_t = _vocab_loss(True, return_stats, return_stats, h_draft, h_target, None, W, None, weights)
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

def _tree_kernel():
    global triton, tl  # imported lazily, as for the loss kernel
    import triton
    import triton.language as tl

    key = ("tree", os.environ.get("TRITON_INTERPRET") == "1")
    if key in _TRITON:
        return _TRITON[key]

    @triton.jit
    def tree_attention_kernel(q_ptr, k_ptr, v_ptr, anc_ptr, lo_ptr, o_ptr, lse_ptr, N, P, S, G, D, H, SPLIT, scale,
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
        q = tl.load(q_ptr + h[:, None] * sqh + i[:, None] * sqn + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
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

    _TRITON[key] = tree_attention_kernel
    return tree_attention_kernel


def tree_attention(q, k, v, anc, prefix_len, scale, window=0):
    """Tree verification attention: q [H, N, D] (the tree's queries), k, v [Hkv, P+N, D] (cache + tree),
    anc [N, N] ancestor matrix (bool/int8), prefix_len P -> o [H, N, D]. Triton on CUDA (or TRITON_INTERPRET=1),
    else tree_attention_ref. window > 0: sliding-window layer (keys with q_pos - k_pos < window only)."""
    if not _use_triton(q):
        return tree_attention_ref(q, k, v, anc, prefix_len, scale, window)
    kernel = _tree_kernel()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
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
