"""Confidence-scheduled verification, the second half of the DSpark paper (s.3.2, Algorithm 1, App. A).

    python scheduler.py --checkpoint=out/demo/dspark/step_latest --task=gsm8k --data_dir=DIR --max_new_tokens=128
    python scheduler.py --device=cuda --dtype=bfloat16 --temperature=1.0 --target=Qwen/Qwen3-4B \\
        --checkpoint=deepseek-ai/dspark_qwen3_4b_block7 --task=gsm8k --calib_prompts=200 --heldout_prompts=200

Records batch-1 traces (raw confidences c_1..c_K and accepted drafts per round), fits Sequential Temperature
Scaling on the first `calib_prompts` prompts (saved as <draft>/calibration.json; ECE/AUROC before/after on
the rest, reliability diagram PNG when matplotlib is installed), profiles SPS(B) = target steps/s for a verify batch of B tokens (cached
per target and machine), and SIMULATES (trace replay, not a batched engine) R concurrent requests under
fixed-length, static-threshold and scheduled (Algorithm 1) verification.
"""
import bisect
import json
import math
import os
import re

import torch
from tqdm import tqdm
from transformers import DynamicCache

from configurator import NON_NEGATIVE, POSITIVE, Range, atomic_path, check_ranges, configure
from evaluate import _clock, check_match, sample_token, settle, speculative_generate, verify_chain
from metrics import tally
from prompts import load_task, messages_of
from target import load

# defaults (override with a configs/*.py file or --key=value)
target = ""               # "" = the target recorded in the drafter's config.json
checkpoint = ""           # DSpark drafter folder or hub id (needs a confidence head); "" = as evaluate.py
task = "humaneval"        # evaluate.py task name (first turn of each prompt) or any <name>.jsonl in data_dir
data_dir = ""             # folder of <task>.jsonl (as evaluate.py)
calib_prompts = 16        # the first prompts of the task fit STS; 0 = use <draft>/calibration.json as is
heldout_prompts = 16      # the next prompts: held-out ECE/AUROC and the simulator's traces (0 = all the rest)
max_new_tokens = 128      # per prompt
num_drafts = 0            # drafts per round; 0 = the drafter's proposal_length
temperature = 0.0         # 0 = greedy; to the target and the drafter alike
seed = 0
device = ""               # "" = cuda if available, else cpu
dtype = "float32"
sts_grid = 81             # temperatures tried per position, log-spaced in [1/20, 20]
ece_bins = 10             # equal-width bins of ECE and of the reliability diagram
sps_file = ""             # SPS cache; "" = ~/.cache/nanospec/sps/<target>-<device>-<dtype>.json
sps_context = 64          # cached tokens in front of each profiled verify batch
sps_repeats = 3           # timed forwards per batch size (median), after one warm-up
concurrency = [1, 2, 4, 8, 16, 32, 64, 128, 256]
conf_threshold = 0.5      # static-threshold baseline: verify leading slots while c >= threshold
sim_steps = 500           # simulated verify steps per (R, policy)
measure = [1, 2, 4, 8, 16]  # R decoded for real (batched_generate, wall clock) on the held-out prompts; [] = none
fixed_lengths = []        # also measure fixed chains of these lengths at R = 1 (the best fixed chain vs scheduled)
out = ""                  # report JSON path ("" = tables only)
if __name__ == "__main__":  # not on import: tests import the functions
    config = configure(globals())

# -----------------------------------------------------------------------------
# Sequential Temperature Scaling (paper s.3.2.1)
#
# The confidence head predicts c_k = P(slot k accepted | slots < k accepted), so the chance that the
# first k drafts all survive is a_k = prod_{i<=k} c_i (chain rule). Heads are over-confident; STS fits,
# left to right, the T_k minimizing the ECE of a_k against the observed prefix acceptance 1[n >= k],
# with T_1..T_{k-1} fixed. sigmoid(z / T) with T > 0 is increasing in z: each position's ranking stays.

EPS = 1e-6


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def calibrate(conf, temps):
    """conf [..., k] confidences -> sigmoid(logit(c) / T) per position (temps[:k]); None = identity."""
    if temps is None:
        return conf
    if len(temps) < conf.shape[-1]:
        raise ValueError(f"calibrate: {conf.shape[-1]} positions but only {len(temps)} temperatures")
    t = torch.tensor(temps[:conf.shape[-1]], dtype=torch.float64, device=conf.device)
    return torch.sigmoid(torch.logit(conf.double().clamp(EPS, 1 - EPS)) / t).to(conf.dtype)


def load_calibration(draft_dir):
    """<draft_dir>/calibration.json -> per-position temperatures (None when the drafter was never calibrated)."""
    path = os.path.join(draft_dir, "calibration.json")
    rec = json.load(open(path)) if os.path.exists(path) else None
    if rec is not None and (rec.get("format"), rec.get("version")) != ("nanospec-calibration", 1):
        raise SystemExit(f"{path} is not a nanospec calibration v1. HINT: python scheduler.py --draft={draft_dir}")
    return rec and [float(t) for t in rec["temperatures"]]


def ece(pred, label, bins=10):
    """Expected calibration error: sum over equal-width bins of |sum(pred - label)| / N."""
    idx = (pred * bins).long().clamp(0, bins - 1)
    return float(torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, pred.double() - label.double()).abs().sum()
                 / max(len(pred), 1))


def auroc(score, label):
    """P(score of a positive > score of a negative), ties count 1/2; None without both classes."""
    pos, neg = score[label.bool()], torch.sort(score[~label.bool()]).values
    if not len(pos) or not len(neg):
        return None
    below = torch.searchsorted(neg, pos, right=False) + torch.searchsorted(neg, pos, right=True)  # 2x(<) + (=)
    return float(below.double().sum() / 2 / (len(pos) * len(neg)))


def survival(conf):
    """conf [..., K] conditional confidences -> a [..., K], a_k = prod_{i<=k} c_i (prefix survival)."""
    return torch.cumprod(conf.double(), -1)


def fit_sts(conf, accepted, grid=81, bins=10):
    """conf [N, K] raw confidences, accepted [N] drafts kept per round -> temperatures [K] (left to right)."""
    y = accepted[:, None] > torch.arange(conf.shape[1])  # [N, K]: slot k in the accepted prefix
    temps, prefix = [], torch.ones(len(conf), dtype=torch.float64)
    grid = torch.logspace(-math.log10(20), math.log10(20), grid, dtype=torch.float64).tolist()
    for k in range(conf.shape[1]):
        scale = lambda T: calibrate(conf[:, k:k + 1].double(), [T])[:, 0]
        best = min(grid, key=lambda T: (ece(prefix * scale(T), y[:, k], bins), abs(math.log(T))))  # ties: nearest 1
        temps.append(best)
        prefix = prefix * scale(best)  # a_k with T_1..T_k fixed
    return temps


def calibration_table(conf, accepted, temps, bins=10):
    """Per position k: rounds, observed survival, mean predicted a_k, ECE and AUROC of a_k before/after STS."""
    y = accepted[:, None] > torch.arange(conf.shape[1])
    raw, cal = survival(conf), survival(calibrate(conf.double(), temps))
    return [dict(pos=k + 1, T=temps[k] if temps else 1.0, rounds=len(conf), observed=float(y[:, k].double().mean()),
                 pred_before=float(raw[:, k].mean()), pred_after=float(cal[:, k].mean()),
                 ece_before=ece(raw[:, k], y[:, k], bins), ece_after=ece(cal[:, k], y[:, k], bins),
                 auroc_before=auroc(raw[:, k], y[:, k]), auroc_after=auroc(cal[:, k], y[:, k]))
            for k in range(conf.shape[1])]


def reliability_diagram(path, conf, accepted, temps, bins=10):
    """One panel per position: x = predicted survival a_k, y = observed acceptance per bin; diagonal = perfect
    calibration, red = raw, blue = after STS, gray bars = share of rounds per bin. False without matplotlib."""
    try:
        import matplotlib  # optional: only this picture needs it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    K = conf.shape[1]
    y = (accepted[:, None] > torch.arange(K)).double()
    raw, cal = survival(conf), survival(calibrate(conf.double(), temps))
    fig, axes = plt.subplots(1, K, figsize=(2.2 * K, 2.4), sharey=True, squeeze=False)
    for k, ax in enumerate(axes[0]):
        share = torch.bincount((cal[:, k] * bins).long().clamp(0, bins - 1), minlength=bins) / len(cal)
        ax.bar((torch.arange(bins) + 0.5) / bins, share, width=0.8 / bins, color="0.85")
        ax.plot([0, 1], [0, 1], color="0.5", linewidth=0.8)
        for a, color, label in ((raw[:, k], "tab:red", "raw"), (cal[:, k], "tab:blue", "STS")):
            idx = (a * bins).long().clamp(0, bins - 1)
            points = [(float(a[idx == b].mean()), float(y[idx == b, k].mean())) for b in idx.unique().tolist()]
            ax.plot(*zip(*points), "o", color=color, markersize=4, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"position {k + 1}", xlabel="predicted a_k")
    axes[0][0].set_ylabel("observed")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------
# engine profile SPS(B): target forward steps per second for a verify batch of B tokens

@torch.no_grad()
def profile_sps(target, batch_sizes, context=64, repeats=3):
    """{B: steps/s} of one target forward of B new tokens (logits and taps, as a verify) after `context`
    cached tokens; median of `repeats` timed runs after a warm-up. One sequence of B tokens stands in for
    R requests of 1 + l_r tokens: the same linear layers, but shared-context attention (a lower bound)."""
    dev, g = target.device, torch.Generator().manual_seed(0)
    ids = torch.randint(target.config.vocab_size, (1, context + max(batch_sizes)), generator=g).to(dev)
    _, _, cache = target.forward(ids[:, :context])
    out = {}
    for B in batch_sizes:
        times = []
        for _ in range(repeats + 1):
            t0 = _clock(dev)
            target.forward(ids[:, context:context + B], cache)
            times.append(_clock(dev) - t0)
            cache.crop(-B)  # back to the context
        out[B] = 1.0 / sorted(times[1:])[len(times[1:]) // 2]
    return out


def clean_sps(measured):
    """{B: steps/s} -> dense table, table[B] for B = 0..max(B) (table[0] unused), made non-increasing in B:
    1) the step time 1/SPS is interpolated linearly between profiled B (flat below the smallest);
    2) SPS(B) = max over B' >= B of SPS(B'): an engine can always pad a batch of B tokens to B' > B, so a
       dip (timing noise, or a shape its kernels handle badly) is never slower than the next larger batch."""
    Bs = sorted(measured)
    t = [1.0 / measured[b] for b in Bs]
    table = []
    for B in range(Bs[-1] + 1):
        i = bisect.bisect_left(Bs, B)
        table.append(1.0 / (t[0] if i == 0 else t[i - 1] + (B - Bs[i - 1]) / (Bs[i] - Bs[i - 1]) * (t[i] - t[i - 1])))
    for B in range(len(table) - 2, -1, -1):
        table[B] = max(table[B], table[B + 1])
    return table


def sps_lookup(table):
    """Dense table -> SPS(B); beyond the profiled range the step time grows linearly with B (compute bound)."""
    top = len(table) - 1
    return lambda B: table[B] if B <= top else table[top] * top / B


def engine_profile(target, max_batch, path="", context=64, repeats=3, dtype="float32"):
    """Cleaned SPS table for this target and machine, profiled once and cached as JSON -> (table, record, path).
    Profiled at B = 1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5x) and max_batch; re-profiled when the
    cache does not reach max_batch or used another context."""
    dev = target.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu{torch.get_num_threads()}t"
    path = path or os.path.join(os.path.expanduser("~"), ".cache", "nanospec", "sps",
                                re.sub(r"[^A-Za-z0-9._-]+", "_", f"{target.name}-{where}-{dtype}") + ".json")
    rec = json.load(open(path)) if os.path.exists(path) else {}
    measured = {int(b): s for b, s in rec.get("measured", {"0": 0}).items()}
    if rec.get("format") == "nanospec-sps" and rec.get("context") == context and max(measured) >= max_batch:
        return clean_sps(measured), rec, path
    grid = sorted({b for k in range(max_batch.bit_length()) for b in (2 ** k, 3 * 2 ** k // 2) if b <= max_batch}
                  | {max_batch})
    measured = profile_sps(target, grid, context, repeats)
    rec = dict(format="nanospec-sps", version=1, target=target.name, device=where, dtype=dtype, context=context,
               repeats=repeats, measured={str(b): s for b, s in measured.items()})  # table = clean_sps(measured)
    write_json(path, rec)
    return clean_sps(measured), rec, path


# -----------------------------------------------------------------------------
# verification lengths for R concurrent requests: Algorithm 1 and the two baselines

def schedule(conf, sps, early_stop=True):
    """Hardware-aware prefix scheduler (Algorithm 1). conf [R, K] calibrated conditional confidences,
    sps: B -> steps/s -> verification lengths l_r (drafts verified per request).

    Candidates (r, j) are admitted in descending a_rj (ties: request, then slot, so a request's admitted
    slots stay a prefix); each adds one token to the batch, B = R + admitted, and a_rj expected accepts,
    tau = R + sum a; throughput Theta = tau * SPS(B). The early stop (stop at the first admission that does
    not raise Theta) makes "l_r >= j" depend only on a_r1..a_rj, i.e. on drafts before slot j: it never
    looks at c_{r,j+1}, which depends on the drafted x_rj (Appendix A), so verification stays lossless.
    early_stop=False keeps the best point of the whole path: the retrospective search, NOT lossless."""
    a = survival(torch.as_tensor(conf)).tolist()
    R = len(a)
    cand = sorted((-arj, r, j) for r, row in enumerate(a) for j, arj in enumerate(row) if arj > 0)
    B, tau, best, best_n = R, float(R), R * sps(R), 0  # nothing admitted: each request verifies its anchor only
    for n, (neg_a, r, j) in enumerate(cand, 1):
        B, tau = B + 1, tau - neg_a
        theta = tau * sps(B)  # expected committed tokens per second
        if theta > best:
            best, best_n = theta, n
        elif early_stop:
            break
    lengths = [0] * R
    for _, r, j in cand[:best_n]:
        lengths[r] = max(lengths[r], j + 1)
    return lengths


def threshold_lengths(conf, threshold):
    """Static threshold (DeepSpec's): verify the leading slots whose confidence c_k >= threshold."""
    return (torch.as_tensor(conf) >= threshold).long().cumprod(-1).sum(-1).tolist()


# -----------------------------------------------------------------------------
# batched speculative decoding of R requests: the policies run for real, on the wall clock
#
# A round: ONE drafter forward drafts K tokens for every running request (propose_batch), the policy picks how
# many of them each request verifies (l_r), ONE target forward verifies every request's [anchor, d_1..d_lr]
# (rows padded to the longest; each token sees its own request's cache and its own earlier tokens), then each
# request keeps its accepted prefix and bonus exactly as evaluate.speculative_generate does. Verifying the
# first l_r drafts is the chain rule on a shorter proposal, so it stays lossless as long as "l_r >= j" never
# depends on the draft x_rj itself: fixed and plain lengths are constants, the threshold reads c_r1..c_rj, and
# Algorithm 1's early stop reads a_r1..a_rj (and other requests' scores), all computed before x_rj is drawn.

POLICIES = ("plain", "fixed", "threshold", "scheduled")


def verify_lengths(policy, conf, K, sps=None, temps=None, threshold=0.5):
    """Drafts each request verifies: plain 0, fixed K; threshold / scheduled on the calibrated c [R, K]."""
    if policy in ("plain", "fixed"):
        return [K if policy == "fixed" else 0] * len(conf)
    c = calibrate(conf, temps)
    return threshold_lengths(c, threshold) if policy == "threshold" else schedule(c, sps)


def _rows(cache, idx, n):
    """Keep the batch rows idx (finished requests leave) and the first n positions of every cache layer."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[idx, :, :n], layer.values[idx, :, :n]


@torch.no_grad()
def batched_generate(target, drafter, prompts, max_new_tokens=256, policy="fixed", num_drafts=0, temperature=0.0,
                     top_k=0, top_p=1.0, generators=None, sps=None, temps=None, threshold=0.5):
    """prompts: R id tensors [T_r] -> (per request dict(ids, rounds, cut, verified), dict(total_s, draft_s,
    verify_s) of the whole batch; prefills count in total_s only).
    ids are exactly plain decoding's at temperature 0 and follow the target's law above it (per request, with
    its own generator); rounds as speculative_generate's; policy "plain" = batched target-only decoding."""
    K = (num_drafts or drafter.proposal_length) if policy != "plain" else 1
    if policy in ("threshold", "scheduled") and not drafter.has_confidence:
        raise SystemExit(f"scheduler: policy {policy} needs a DSpark drafter with a confidence head")
    eos, dev, R = target.eos_token_ids, target.device, len(prompts)
    warp, gens = dict(temperature=temperature, top_k=top_k, top_p=top_p), generators or [None] * R
    t0 = _clock(dev)
    caches, states, res = [], [], [dict(ids=[], rounds=[], cut=0, verified=0) for _ in range(R)]
    for r, ids in enumerate(prompts):  # prefill one by one (ragged lengths), then one padded batch cache
        logits, taps, c = target.forward(ids[None].to(dev), logits_to_keep=1)
        res[r]["ids"].append(sample_token(logits[0, -1], generator=gens[r], **warp))
        caches.append(c)
        states.append(drafter.start(ids.to(dev), taps[0]) if policy != "plain" else None)
    lens = [len(p) for p in prompts]
    pad = lambda x, n: torch.nn.functional.pad(x, (0, 0, 0, max(lens) - n))
    cache = DynamicCache(ddp_cache_data=[tuple(torch.cat([pad(getattr(c.layers[i], kv), n) for c, n in
                                                          zip(caches, lens)]) for kv in ("keys", "values"))
                                         for i in range(len(caches[0].layers))])
    act = [r for r in range(R) if res[r]["ids"][-1] not in eos and max_new_tokens > 1]
    _rows(cache, torch.tensor(act, dtype=torch.long), max(lens))
    draft_s = verify_s = 0.0
    while act:
        ta = _clock(dev)
        anchors, A = [res[r]["ids"][-1] for r in act], len(act)
        if policy == "plain":
            props = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, 1), None)] * A
        elif hasattr(drafter, "propose_batch"):  # DFlash/DSpark: one block forward for all requests
            props = drafter.propose_batch([states[r] for r in act], anchors, K, generators=[gens[r] for r in act],
                                          **warp)
        else:  # Eagle3 drafts autoregressively, request by request
            props = [drafter.propose(states[r], a, K, generator=gens[r], stop_ids=eos, **warp)
                     for r, a in zip(act, anchors)]
        conf = torch.stack([c for _, _, c in props]) if policy in ("threshold", "scheduled") else torch.zeros(A, K)
        L = [min(n, len(d)) for n, (d, _, _) in zip(verify_lengths(policy, conf, K, sps, temps, threshold), props)]
        M, P = 1 + max(L), cache.get_seq_length()
        ids = torch.tensor([[a, *d[:n].tolist()] + [a] * (M - 1 - n) for a, (d, _, _), n in zip(anchors, props, L)])
        base = torch.tensor([lens[r] for r in act])
        qpos = base[:, None] + torch.arange(M)  # [A, M]: each request's own positions
        kpos = torch.cat([torch.arange(P).expand(A, P), qpos], 1)
        see = torch.cat([(torch.arange(P) < base[:, None, None]).expand(A, M, P),  # own cache (rows are padded)
                         torch.ones(M, M, dtype=torch.bool).tril().expand(A, M, M)], 2)  # own earlier tokens
        tb = _clock(dev)
        logits, taps, cache = target.forward(ids.to(dev), cache, position_ids=qpos.to(dev),
                                             ragged=tuple(x.to(dev) for x in (see, qpos, kpos)))
        tc = _clock(dev)
        keep = []
        for i, (r, n) in enumerate(zip(act, L)):
            q = props[i][1]
            n_acc, bonus = verify_chain(logits[i, :n + 1], ids[i, 1:n + 1].to(dev), q[:n], generator=gens[r], **warp)
            for layer in cache.layers:  # the anchor and the kept drafts move next to the request's cache
                for t in (layer.keys, layer.values):
                    t[i, :, lens[r]:lens[r] + n_acc + 1] = t[i, :, P:P + n_acc + 1].clone()
            rec, c, done = settle(res[r]["ids"], ids[i, 1:n_acc + 1].tolist(), bonus, n, eos, max_new_tokens)
            res[r]["rounds"].append(rec)
            res[r]["cut"] += c
            res[r]["verified"] += n
            lens[r] += n_acc + 1
            if not done:
                keep.append(i)
                if policy != "plain":
                    drafter.commit(states[r], ids[i, :n_acc + 1].to(dev), taps[i, :n_acc + 1])
        act = [act[i] for i in keep]
        _rows(cache, torch.tensor(keep, dtype=torch.long), max([lens[r] for r in act], default=0))
        draft_s, verify_s = draft_s + (tb - ta) + (_clock(dev) - tc), verify_s + (tc - tb)
    return res, dict(total_s=_clock(dev) - t0, draft_s=draft_s, verify_s=verify_s)


def policy_inputs(target, drafter, draft_path, policy, batch_size, K, tree_budget=0, dtype="float32", threshold=0.5):
    """What a policy needs, checked before any decoding -> dict(sps, temps, threshold) for batched_generate."""
    if tree_budget:
        raise SystemExit("evaluate: batched decoding verifies chains: drop --tree_budget (or --policy/--batch_size)")
    if policy in ("threshold", "scheduled"):
        if not drafter.has_confidence:
            raise SystemExit(f"evaluate: --policy={policy} needs a DSpark drafter with a confidence head; "
                             f"{type(drafter).__name__} from {draft_path} has none: use --policy=fixed")
        temps = load_calibration(draft_path)
        if temps is None:
            raise SystemExit(f"evaluate: --policy={policy} reads calibrated confidences and {draft_path} has no "
                             f"calibration.json: run python scheduler.py --checkpoint={draft_path} first")
        if len(temps) < K:
            raise SystemExit(f"evaluate: {draft_path}/calibration.json has {len(temps)} temperatures for {K} drafts: "
                             f"pass --num_drafts={len(temps)} or recalibrate with --num_drafts={K}")
        sps = sps_lookup(engine_profile(target, batch_size * (K + 1), dtype=dtype)[0]) if policy == "scheduled" else None
        return dict(sps=sps, temps=temps, threshold=threshold)
    return {}


def run_batch(target, drafter, texts, cfg, K, seeds, sched, where):
    """First turns `texts` of R prompts decoded together under cfg["policy"] -> one record per prompt, as
    evaluate.run_prompt's (the batch's times shared equally: the pooled tokens/s is the aggregate throughput).
    Baseline: plain batched decoding of the same R prompts; greedy outputs are checked against it."""
    warp, n = {k: cfg[k] for k in ("temperature", "top_k", "top_p")}, cfg["max_new_tokens"]
    ids, R, dev = [target.render_prompt(messages_of(t)) for t in texts], len(texts), target.device
    gens = lambda off: [torch.Generator(dev).manual_seed(s + off) for s in seeds]
    res, tm = batched_generate(target, drafter, ids, n, cfg["policy"], K, generators=gens(0), **warp, **sched)
    recs = [dict(tally(r["rounds"], K, r["cut"]), new_tokens=len(r["ids"]), spec_s=tm["total_s"] / R,
                 draft_s=tm["draft_s"] / R, verify_s=tm["verify_s"] / R, turns=1, prompts=1, prompt_ids=p.tolist(),
                 outputs=[r["ids"]]) for r, p in zip(res, ids)]
    greedy = cfg["temperature"] == 0 and (cfg["check_greedy"] or cfg["baseline"])
    if cfg["baseline"] or greedy:
        plain, tp = batched_generate(target, None, ids, n, "plain", generators=gens(7919), **warp)
        for rec, p, w in zip(recs, plain, where):
            if cfg["baseline"]:
                rec.update(base_s=tp["total_s"] / R, base_tokens=len(p["ids"]))
            if greedy:
                check_match(rec, p["ids"], rec["outputs"][0], cfg["check_greedy"] and
                            target.embed_weight.dtype == torch.float32, w)
    return recs


# -----------------------------------------------------------------------------
# traces (batch 1, real drafter) and the concurrency simulator

def record_trace(target, drafter, prompt_ids, max_new_tokens, K, temperature=0.0, generator=None):
    """Speculative decoding of one prompt with K drafts per round (evaluate's loop: lossless) ->
    [(conf [K] raw confidences, n accepted drafts)] per round."""
    if not drafter.has_confidence:
        raise SystemExit(f"scheduler: {type(drafter).__name__} has no confidence head: train a DSpark drafter "
                         f"with enable_confidence_head=True")
    res = speculative_generate(target, drafter, prompt_ids, max_new_tokens, temperature, num_drafts=K,
                               generator=generator)
    return [(c.float().cpu(), n) for c, (_, n, _) in zip(res["conf"], res["rounds"])]


def simulate(conf, accepted, sps, R, policy, steps=500, threshold=0.5):
    """Replay recorded rounds (conf [N, K], accepted [N]) for R always-busy requests -> throughput stats.

    Request r walks the pooled rounds from offset r*N/R; a step verifies l_r drafts per request
    (plain: 0, fixed: K, threshold, scheduled), commits min(n, l_r) + 1 tokens (acceptance of a slot does
    not depend on how many slots after it are verified) and takes 1 / SPS(R + sum l) seconds (target only:
    drafting, sampling and scheduling time are not counted). Rounds are treated as exchangeable: after a
    shorter verify the text would differ, the replay just takes the next recorded round. Simulated."""
    N, K = conf.shape
    tokens = secs = drafts = 0.0
    for s in range(steps):
        idx = (torch.arange(R) * N // R + s) % N
        c, n = conf[idx], accepted[idx]
        L = {"plain": lambda: [0] * R, "fixed": lambda: [K] * R, "scheduled": lambda: schedule(c, sps),
             "threshold": lambda: threshold_lengths(c, threshold)}[policy]()
        L = torch.tensor(L)
        tokens += float((torch.minimum(n, L) + 1).sum())
        drafts += float(L.sum())
        secs += 1.0 / sps(R + int(L.sum()))
    return dict(tokens_per_s=tokens / secs, per_request_tokens_per_s=tokens / secs / R,
                mean_len=drafts / steps / R, tau=tokens / steps / R)


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    check_ranges("scheduler", config, {
        **dict.fromkeys(("calib_prompts", "heldout_prompts", "num_drafts", "temperature"), NON_NEGATIVE),
        **dict.fromkeys(("max_new_tokens", "sts_grid", "ece_bins", "sps_repeats", "sim_steps"), POSITIVE),
        "sps_context": NON_NEGATIVE, "conf_threshold": Range(lambda v: 0 <= v <= 1, "in [0, 1]"),
        "concurrency": Range(lambda v: len(v) > 0 and min(v) >= 1, "a non-empty list of integers >= 1"),
        "measure": Range(lambda v: not v or min(v) >= 1, "a list of integers >= 1"),
        "fixed_lengths": Range(lambda v: not v or min(v) >= 1, "a list of integers >= 1")})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)

    # --- models and traces --------------------------------------------------------
    tgt, drafter, draft_path = load(checkpoint, target, dtype, device)
    K = num_drafts or drafter.proposal_length
    if max(fixed_lengths, default=1) > drafter.proposal_length:
        raise SystemExit(f"scheduler: fixed_lengths {fixed_lengths}: at most {drafter.proposal_length} drafts per block")
    rows = load_task(task, data_dir, calib_prompts + heldout_prompts if heldout_prompts else 0)
    if len(rows) <= calib_prompts:
        raise SystemExit(f"scheduler: {task} has {len(rows)} prompts, none left after calib_prompts={calib_prompts}")
    if max(measure, default=1) > len(rows) - calib_prompts:
        raise SystemExit(f"scheduler: measuring R={max(measure)} needs as many held-out prompts, {task} leaves "
                         f"{len(rows) - calib_prompts}: raise --heldout_prompts or drop R from --measure")
    print(f"scheduler: target {tgt.name}, drafter {draft_path}, K={K}, {len(rows)} prompts of {task} "
          f"({calib_prompts} for STS), temperature {temperature}, {dtype} on {device}")
    traces = [record_trace(tgt, drafter, tgt.render_prompt(messages_of(turns[0])), max_new_tokens, K, temperature,
                           torch.Generator(tgt.device).manual_seed(seed * 1_000_003 + i))  # first turn only
              for i, turns in enumerate(tqdm(rows, desc="traces", dynamic_ncols=True))]
    pool = lambda ts: (torch.stack([c for t in ts for c, _ in t]), torch.tensor([n for t in ts for _, n in t]))
    conf, acc = pool(traces[calib_prompts:])  # held-out rounds: [N, K], [N]

    # --- calibration (STS) ------------------------------------------------------------
    temps = fit_sts(*pool(traces[:calib_prompts]), sts_grid, ece_bins) if calib_prompts else \
        load_calibration(draft_path)
    cal_rows = calibration_table(conf, acc, temps, ece_bins)
    f = lambda x, s="{:.3f}": "-" if x is None else s.format(x)
    print(f"\ncalibration on {len(conf)} held-out rounds ({len(traces) - calib_prompts} prompts); a_k = prod c_i, "
          f"observed = P(first k drafts accepted)\n pos     T_k  observed  pred raw  pred STS  ECE raw  ECE STS  "
          f"AUC raw  AUC STS")
    for r in cal_rows:
        print(f"{r['pos']:>4}{r['T']:>8.3f}{r['observed']:>10.3f}{r['pred_before']:>10.3f}{r['pred_after']:>10.3f}"
              f"{100 * r['ece_before']:>8.1f}%{100 * r['ece_after']:>8.1f}%{f(r['auroc_before']):>9}"
              f"{f(r['auroc_after']):>9}")
    if calib_prompts:  # the temperatures travel with the drafter
        mean = lambda key: sum(r[key] for r in cal_rows) / len(cal_rows)  # SGLang's fields: dataset .. ece_after
        write_json(os.path.join(draft_path, "calibration.json"), dict(
            format="nanospec-calibration", version=1, method="sequential temperature scaling (DSpark s.3.2.1)",
            temperatures=temps, dataset=task, num_samples=sum(len(t) for t in traces[:calib_prompts]),
            ece_before=mean("ece_before"), ece_after=mean("ece_after"), prompts=calib_prompts,
            sampling_temperature=temperature, heldout=cal_rows))
        png = reliability_diagram(os.path.join(draft_path, "reliability.png"), conf, acc, temps, ece_bins)
        print(f"scheduler: wrote {draft_path}/calibration.json" + (" and reliability.png (red raw, blue STS, gray "
              "rounds)" if png else "; no reliability.png: `pip install matplotlib` for the picture"))

    # --- engine profile ------------------------------------------------------------------
    max_batch = max(concurrency + measure) * (K + 1)
    table, sps_rec, sps_path = engine_profile(tgt, max_batch, sps_file, sps_context, sps_repeats, dtype)
    sps = sps_lookup(table)
    print(f"\nSPS(B) from {sps_path} (target steps/s, monotone-cleaned): " +
          " ".join(f"{b}:{table[b]:.1f}" for b in sorted(int(b) for b in sps_rec["measured"])))

    # --- simulated concurrency -------------------------------------------------------------
    cal = calibrate(conf, temps)
    policies = {"plain": cal, "fixed": cal, "threshold": cal, "scheduled": cal, "sched-raw": conf}
    sim = {R: {p: simulate(c, acc, sps, R, p.replace("sched-raw", "scheduled"), sim_steps, conf_threshold)
               for p, c in policies.items()} for R in sorted(set(concurrency + measure))}
    print(f"\nSIMULATED (trace replay of {len(conf)} recorded rounds against SPS(B); drafting time not counted): "
          f"aggregate tokens/s | per-request tokens/s | mean drafts verified per request; threshold "
          f"{conf_threshold} on calibrated c; sched-raw = Algorithm 1 on uncalibrated c")
    print(f"{'R':>5}" + "".join(f"{p:>25}" for p in policies))
    for R, res in sim.items():
        print(f"{R:>5}" + "".join(f"{r['tokens_per_s']:>11.1f} {r['per_request_tokens_per_s']:>7.2f} "
                                  f"{r['mean_len']:>4.1f}" for r in res.values()))
    # --- measured concurrency: the same held-out prompts decoded for real, R at a time ------------------------
    held = [tgt.render_prompt(messages_of(turns[0])) for turns in rows[calib_prompts:]]
    runs, acc = list(dict.fromkeys([(R, p, K) for R in measure for p in POLICIES] +
                                   [(1, "fixed", k) for k in fixed_lengths])), {}

    def decode(R, policy, k, j, n=max_new_tokens, prompts=held):  # prompts j..j+R-1 together, into acc
        gens = [torch.Generator(tgt.device).manual_seed(seed * 1_000_003 + j + r) for r in range(R)]
        res, tm = batched_generate(tgt, drafter, prompts[j:j + R], n, policy, k, temperature, generators=gens,
                                   sps=sps, temps=temps, threshold=conf_threshold)
        a = acc.setdefault((R, policy, k), {})
        for key, v in (("tokens", sum(len(r["ids"]) for r in res)), ("secs", tm["total_s"]),
                       ("verified", sum(r["verified"] for r in res)), ("rounds", sum(len(r["rounds"]) for r in res)),
                       ("committed", sum(c for r in res for _, _, c in r["rounds"]))):  # tau: per verify round
            a[key] = a.get(key, 0) + v
    for p in POLICIES if runs else ():  # untimed warm-up of every path
        decode(min(measure or [1]), p, K, 0, 8)
    acc.clear()
    groups = [(R, j) for R in sorted({run[0] for run in runs}) for j in range(0, len(held), R)]
    for R, j in tqdm(groups, desc="measured", dynamic_ncols=True):  # the policies take turns group by group, so a
        for run in (run for run in runs if run[0] == R):            # machine that drifts in speed hits them alike
            decode(*run, j)
    measured = [dict(R=R, policy=p, drafts=k, tokens_per_s=a["tokens"] / a["secs"], mean_len=a["verified"] /
                     max(a["rounds"], 1), tau=a["committed"] / max(a["rounds"], 1)) for (R, p, k), a in acc.items()]
    if measured:
        print(f"\nMEASURED (batched_generate, wall clock, drafting included; {len(held)} held-out prompts of {task}, "
              f"{max_new_tokens} new tokens, temperature {temperature}): aggregate tokens/s | tau | mean drafts "
              f"verified per request; (simulated tokens/s for the same R, table above)")
        print(f"{'R':>5}" + "".join(f"{p:>28}" for p in POLICIES))
        for R in measure:
            row = {m["policy"]: m for m in measured if m["R"] == R and m["drafts"] == K}
            print(f"{R:>5}" + "".join(f"{row[p]['tokens_per_s']:>9.1f} {row[p]['tau']:>4.2f} {row[p]['mean_len']:>4.1f} "
                                      f"({sim[R][p]['tokens_per_s']:>7.1f})" for p in POLICIES))
        for m in (m for m in measured if m["R"] == 1 and m["policy"] == "fixed" and m["drafts"] in fixed_lengths):
            print(f"R=1, fixed chains of {m['drafts']}: {m['tokens_per_s']:.1f} tokens/s, tau {m['tau']:.2f}")
    if out:
        write_json(out, dict(config=config, calibration=dict(temperatures=temps, heldout=cal_rows),
                             sps=dict(path=sps_path, measured=sps_rec["measured"]), simulated=sim, measured=measured))
        print(f"scheduler: report written to {out}")
