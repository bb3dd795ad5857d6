"""Evaluate a drafter: lossless speculative decoding of DeepSpec's nine tasks, with honest metrics.

    python evaluate.py --task=gsm8k --num_prompts=5 --target=smollm2 --checkpoint=out/demo/dspark/step_latest
    python evaluate.py --prompt "Write a haiku about the sea"            # one prompt, its continuation and stats
    python evaluate.py --task=all --check_greedy --out=out/report.json    # all tasks; fp32 greedy must match
    python evaluate.py --task=all --dtype=bfloat16 --temperature=1.0 --max_new_tokens=2048 \\
        --turns=1 --target=Qwen/Qwen3-4B --checkpoint=deepseek-ai/dspark_qwen3_4b_block7 --out=out/q4b.json  # DeepSpec's
    torchrun --nproc_per_node=8 evaluate.py --task=all --device=cuda --out=out/report.json   # prompts split
    python evaluate.py --task=gsm8k --num_prompts=5 --tree_budget=16      # draft trees of 16 nodes instead of chains

Per round (batch 1): the drafter proposes a chain of k tokens after the anchor (the last committed
token; Eagle3 stops after a drafted end-of-turn token, as DeepSpec), the target scores [anchor, d1..dk] in
ONE forward on its KV cache, the longest acceptable prefix is kept plus one bonus token from the target, the
target cache is cropped to the accepted length and the drafter is told the accepted tokens' target features.
Greedy (temperature 0) accepts drafts equal to the target argmax; temperature > 0 uses speculative sampling
(accept_prob, residual below), so the output distribution is exactly the target's (warped by temperature/top-k/
top-p).
Metrics (metrics.py): report JSON at --out, a table on stdout; plain decoding is timed on the same prompts.
With tree_budget = N > 0 the drafter grows a tree of N nodes best-first (EAGLE-2), the target verifies it in one
forward (tree attention: each node sees the cache and its ancestors) and acceptance walks the tree
(sample-and-descend, below); the per-slot rates are then per depth of the accepted path (conditional: P(it
reaches depth i+1 | it reached depth i); cumulative: P(it reaches depth i+1 | the tree is that deep)) and the
proposal length is the tree's depth.
"""
import fcntl
import heapq
import itertools
import json
import os
import sys
import time
import zlib

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import DynamicCache

from configurator import (FRACTION, NON_NEGATIVE, POSITIVE, Range, atomic_path, check_ranges, configure,
                          init_distributed)
from kernels import logits_to_probs
from metrics import format_table, merge, overall_rates, rates, tally
from prompts import TASKS, MissingTask, load_task, messages_of  # the nine eval tasks (REFERENCE.md s.8)
from target import load

# defaults (override with a configs/*.py file or --key=value)
task = "humaneval"        # one of the nine tasks, a comma list, "all", or any <name>.jsonl in data_dir
target = ""               # "" = the target recorded in the drafter's config.json
checkpoint = ""           # drafter folder or hub id; "" = out/demo/dspark/step_latest, then drafters/smollm2_dspark
temperature = 0.0         # 0 = greedy; DeepSpec's protocol is 1.0
top_k = 0                 # 0 = off; applies to the target and the drafter alike
top_p = 1.0
num_prompts = 0           # 0 = DeepSpec's count for the task; N = the first N of that selection
max_new_tokens = 256      # per turn (DeepSpec: 2048)
num_drafts = 0            # drafts per round (a tree's depth limit); 0 = the drafter's proposal_length
tree_budget = 0           # draft tree nodes verified per round (depth <= num_drafts); 0 = a chain of num_drafts
policy = ""               # "" = the batch-1 loop below; plain|fixed|threshold|scheduled: scheduler.batched_generate
batch_size = 1            # requests decoded at once (first turns) under `policy` ("fixed" when policy is "")
conf_threshold = 0.5      # policy=threshold: verify the leading drafts whose calibrated confidence c >= this
data_dir = ""             # folder of <task>.jsonl; then $NANOSPEC_DATA_DIR, ~/.cache/nanospec/eval, the hub
out = ""                  # report JSON path ("" = table only); <out>.partial.jsonl makes runs resumable
save_outputs = False      # add prompt_ids and generated ids to the report
check_greedy = False      # also decode plainly and stop at the first mismatch (fp32; other dtypes: a match rate)
turns = 0                 # 0 = every turn (mt-bench has 2: turn 2 sees answer 1); 1 = DeepSpec's first turn only
prompt = ""               # single prompt mode: print its continuation and stats
device = ""               # "" = cuda if available, else cpu (as train.py); the report records the choice
dtype = "float32"
seed = 0
baseline = True           # also time plain target decoding on the same prompts (speedup)
if __name__ == "__main__":  # not on import: train.py imports measure_tau
    config = configure(globals())

# -----------------------------------------------------------------------------
# acceptance rules: small pure functions (Leviathan et al. 2023, Chen et al. 2023)
#
# Why speculative sampling is lossless: a draft d ~ q is kept with probability min(1, p(d)/q(d)), else a token
# is drawn from r = max(0, p - q) / Z. The chance to emit x is
#     q(x) min(1, p(x)/q(x)) + P(reject) r(x) = min(p, q)(x) + (1 - sum min(p, q)) max(0, p - q)(x) / Z,
# and Z = sum max(0, p - q) = 1 - sum min(p, q), so it is min(p, q)(x) + max(0, p - q)(x) = p(x). Slot i+1 is only
# reached when slot i kept its draft, i.e. when the prefix is exactly what the target would have drawn, so by
# induction the whole sequence is distributed as the target's; when all k drafts are kept, the bonus token is
# drawn from p itself. Greedy is the special case p, q one-hot: keep d iff d is the target argmax.

def greedy_accept(target_argmax, drafts):
    """target_argmax [k], drafts [k] -> number of leading drafts equal to the target's greedy token."""
    return int((drafts == target_argmax).long().cumprod(0).sum())


def accept_prob(p_target, p_draft):
    """Chance to keep a draft: min(1, p(d) / q(d)) elementwise (p, q = target/draft probabilities of d)."""
    return torch.clamp(p_target / p_draft, max=1.0)


def sample_accept(p_target, p_draft, drafts, u):
    """p_target [k, V], p_draft [k, V] (the distributions the drafts were drawn from), drafts [k], u [k]
    uniform in [0, 1) -> number of leading drafts kept: slot i keeps d_i iff u_i < min(1, p(d_i)/q(d_i))."""
    p = p_target.gather(-1, drafts[:, None])[:, 0]
    q = p_draft.gather(-1, drafts[:, None])[:, 0].clamp_min(1e-30)  # q(d) > 0: d was drawn from q
    return int((u < accept_prob(p, q)).long().cumprod(0).sum())


def residual(p_target, p_draft):
    """Distribution after a rejection: normalize(max(0, p - q)) over the last dim; p where it vanishes
    (p == q: a rejection then has probability 0, only rounding can get here)."""
    r = (p_target - p_draft).clamp_min(0)
    z = r.sum(-1, keepdim=True)
    return torch.where(z > 0, r / z.clamp_min(1e-30), p_target)


def sample_token(logits, temperature, top_k, top_p, generator):
    """One token from the target's warped distribution (logits [V]); argmax at temperature 0."""
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(logits_to_probs(logits, temperature, top_k, top_p), 1, generator=generator))


def verify_chain(logits, drafts, q, temperature, top_k, top_p, generator):
    """Target logits [k+1, V] at [anchor, d1..dk], drafts [k], their draft distributions q [k, V]
    -> (n accepted drafts, bonus token): the residual sample after a rejection, else a target sample."""
    k = len(drafts)
    if temperature == 0:
        g = logits.argmax(-1)  # [k+1] target greedy token after each prefix
        n = greedy_accept(g[:k], drafts)
        return n, int(g[n])
    p = logits_to_probs(logits, temperature, top_k, top_p)  # [k+1, V] fp32
    u = torch.rand(k, generator=generator, device=p.device)
    n = sample_accept(p[:k], q.to(p), drafts, u)
    dist = p[k] if n == k else residual(p[n], q[n].to(p))
    return n, int(torch.multinomial(dist, 1, generator=generator))


# -----------------------------------------------------------------------------
# draft trees: best-first growth (EAGLE-2) and the acceptance rule
#
# Scheme "sample-and-descend" (deterministic top-k candidates): walk from the root; at node v (path s) draw
# x ~ p(. | s) from the target; if a child of v holds x, descend to it, else emit x as the bonus token. Why it is
# lossless: the tree depends only on the drafter, i.e. on tokens already emitted, never on this round's target
# draws. x is emitted in both cases and is a fresh draw from p(. | s); after a descent the child's logits from the
# same forward are exactly p(. | s, x) (the child attends to the prefix and its ancestors only). So every emitted
# token is a target draw given all earlier ones, and the output law is the target's. No draft probability enters:
# node v is passed with probability sum_c p(c | s) over its children. Greedy (x = argmax): the longest path that
# matches the target's argmax.

def build_tree(drafter, state, anchor, budget, max_depth, temperature=0.0, top_k=0, top_p=1.0):
    """-> (tokens, parents): node 0 = the anchor (parent -1), then at most `budget` draft nodes, parents first.
    Score = path probability under the drafter; the tree holds the best-scoring candidates (the top ones of
    every expanded node's next_probs), taken best first from a heap; depth <= max_depth. Greedy scores use the
    drafter at temperature 1 (its one-hot greedy q would rank nothing)."""
    warp = dict(temperature=temperature, top_k=top_k, top_p=top_p) if temperature else dict(temperature=1.0)
    tokens, parents, paths, tick = [int(anchor)], [-1], [()], itertools.count()
    heap = [(-1.0, next(tick), 0, None)]  # (-score, tie-break, node, token); token None: expand the node
    while heap and len(tokens) <= budget:
        neg, _, node, tok = heapq.heappop(heap)
        if tok is not None:  # the best open candidate joins; its expansion waits in the heap (children score lower)
            tokens.append(tok)
            parents.append(node)
            paths.append(paths[node] + (tok,))
            heapq.heappush(heap, (neg, next(tick), len(tokens) - 1, None))
        elif len(paths[node]) < max_depth:  # expand: children scored by the next-token draft distribution [V]
            q = drafter.next_probs(state, anchor, [paths[node]], **warp)[0]
            top = q.topk(min(budget, q.numel()))
            for p, x in zip(top.values.tolist(), top.indices.tolist()):
                if p > 0:
                    heapq.heappush(heap, (neg * p, next(tick), node, x))
    return tokens, parents


def ancestors(parents):
    """parents [N] (-1 = root, parents first) -> anc [N, N] bool: anc[i, j] = node j is node i or its ancestor."""
    anc = torch.eye(len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    return anc


def verify_tree(logits, tokens, parents, temperature, top_k, top_p, generator):
    """Target logits [N, V] at the tree's nodes, tokens/parents [N] -> (path: accepted nodes from 0, bonus token)."""
    path = [0]
    while True:
        x = sample_token(logits[path[-1]], temperature, top_k, top_p, generator)  # x ~ p(. | path)
        child = next((c for c, (t, p) in enumerate(zip(tokens, parents)) if p == path[-1] and t == x), None)
        if child is None:
            return path, x
        path.append(child)


def keep_path(cache, path, n):
    """After verifying n tokens, keep the cached prefix then the verified tokens `path` (indices into the n, in
    order): REFERENCE s.10's index_select on dim 2, done on the tail only, then a crop."""
    P = cache.get_seq_length() - n
    if path != list(range(len(path))):  # a chain prefix is already in place
        idx = P + torch.tensor(path, device=cache.layers[0].keys.device)
        for layer in cache.layers:  # the gathers copy before the writes, so overlaps are safe
            layer.keys[:, :, P:P + len(path)] = layer.keys[:, :, idx]
            layer.values[:, :, P:P + len(path)] = layer.values[:, :, idx]
    if len(path) < n:
        cache.crop(len(path) - n)  # transformers 5: crop(-m) drops the last m positions


# -----------------------------------------------------------------------------
# decoding loops (batch 1)

def _clock(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def settle(out, kept, bonus, proposed, eos, max_new_tokens):
    """Commit one verified round to `out` (in place): the kept drafts and the bonus token, cut after an end-of-turn
    token and at max_new_tokens -> ((proposed, accepted, committed), cut, finished). An EOS among the kept drafts
    ends the round there: the slots after it do not count (as DeepSpec). cut = tokens accepted past the budget
    (only the last round can pass it; DeepSpec's accept length counts them)."""
    emit, accepted = kept + [bonus], len(kept)
    hit = next((i for i, x in enumerate(emit) if x in eos), None)
    if hit is not None:
        emit = emit[:hit + 1]  # stop after the end-of-turn token
        if hit < accepted:
            proposed = accepted = hit + 1
    cut = max(0, len(emit) - (max_new_tokens - len(out)))
    out += emit[:max_new_tokens - len(out)]
    return (proposed, accepted, len(emit) - cut), cut, hit is not None or len(out) >= max_new_tokens


@torch.no_grad()
def speculative_generate(target, drafter, prompt_ids, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
                         num_drafts=0, generator=None, tree_budget=0):
    """prompt_ids [T] -> dict(ids: new tokens (ending at EOS or the budget, exactly as plain decoding),
    rounds: [(proposed, accepted, committed)] per target verify, cut: tokens the last round accepted past
    max_new_tokens (committed stops at the budget; DeepSpec's accept length counts them), conf: per chain round the
    drafter's confidences or None, draft_s, verify_s, total_s). tree_budget > 0: verify best-first draft trees of
    that many nodes (depth <= num_drafts) instead of chains. Eagle3 ends its chain at a drafted end-of-turn token
    (stop_ids; DFlash/DSpark draft the block whole)."""
    K, eos, dev = num_drafts or drafter.proposal_length, target.eos_token_ids, target.device
    warp = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    t0 = _clock(dev)
    logits, taps, cache = target.forward(prompt_ids[None].to(dev), logits_to_keep=1)  # prefill: [1,1,V], [1,T,nH]
    token = sample_token(logits[0, -1], generator=generator, **warp)                   # first token: the target's
    t1 = _clock(dev)
    state = drafter.start(prompt_ids.to(dev), taps[0])
    draft_s, verify_s, out, rounds, cut, conf = _clock(dev) - t1, t1 - t0, [token], [], 0, []
    while out[-1] not in eos and len(out) < max_new_tokens:
        ta = _clock(dev)
        if tree_budget:
            tokens, parents = build_tree(drafter, state, token, tree_budget, K, **warp)
            ids, anc = torch.tensor([tokens], device=dev), ancestors(parents)      # [1, N+1]: anchor, nodes
            depth = int(anc.sum(1).max()) - 1
        else:
            drafts, q, c = drafter.propose(state, token, K, generator=generator, stop_ids=eos, **warp)  # [k], [k, V]
            conf.append(c)  # DSpark: the confidence head's c_i [k] (scheduler.py calibrates them); else None
            ids = torch.cat([torch.tensor([token], device=dev), drafts.to(dev)])[None]   # [1, k+1]: anchor, drafts
            anc, depth = None, len(drafts)
        tb = _clock(dev)
        logits, taps, cache = target.forward(ids, cache, tree=anc)                   # verify: [1, N+1, V]
        if tree_budget:
            path, bonus = verify_tree(logits[0], tokens, parents, generator=generator, **warp)
        else:
            n, bonus = verify_chain(logits[0], ids[0, 1:], q, generator=generator, **warp)
            path = list(range(n + 1))
        keep_path(cache, path, ids.shape[1])  # the cache keeps the anchor and the accepted drafts
        tc = _clock(dev)
        rec, c, done = settle(out, ids[0, path[1:]].tolist(), bonus, depth, eos, max_new_tokens)
        rounds.append(rec)
        cut, token = cut + c, bonus
        if not done:
            drafter.commit(state, ids[0, path], taps[0, path])  # the anchor and accepted drafts now have features
        td = _clock(dev)
        draft_s, verify_s = draft_s + (tb - ta) + (td - tc), verify_s + (tc - tb)
    return dict(ids=out, rounds=rounds, cut=cut, conf=conf, draft_s=draft_s, verify_s=verify_s,
                total_s=_clock(dev) - t0)


@torch.no_grad()
def plain_generate(target, prompt_ids, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Target-only decoding, one forward per token on an HF DynamicCache (the baseline) -> (ids, seconds)."""
    dev, cache, warp = target.device, DynamicCache(), dict(temperature=temperature, top_k=top_k, top_p=top_p)
    t0 = _clock(dev)
    x = prompt_ids[None].to(dev)
    out = []
    while not out or (out[-1] not in target.eos_token_ids and len(out) < max_new_tokens):
        logits = target.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits  # [1, 1, V]
        out.append(sample_token(logits[0, -1].float(), generator=generator, **warp))
        x = torch.tensor([[out[-1]]], device=dev)
    return out, _clock(dev) - t0


# -----------------------------------------------------------------------------
# evaluation of prompts

def prompt_key(turn_texts):
    """A prompt's text -> the key its resumed row must carry (a task file edited in place decodes it again)."""
    return zlib.crc32(json.dumps(turn_texts).encode())


def check_length(target, ids, max_new_tokens, K, where):
    ctx = getattr(target.config, "max_position_embeddings", None)
    if ctx and len(ids) + max_new_tokens + K + 1 > ctx:
        raise SystemExit(f"evaluate: {where} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} and {K} "
                         f"drafts it needs {len(ids) + max_new_tokens + K + 1} positions but {target.name} has "
                         f"{ctx}: lower --max_new_tokens, or drop the prompt from a copy of the file in --data_dir")


def check_match(rec, plain, out, strict, where):
    """Count a greedy output `out` equal to plain greedy decoding or not; strict (fp32): a mismatch stops the run."""
    rec["greedy_checked"], rec["greedy_matched"] = 1, int(plain == out)
    if strict and plain != out:
        pos = next((i for i, (a, b) in enumerate(zip(plain, out)) if a != b), min(len(plain), len(out)))
        raise SystemExit(f"check_greedy: {where}: speculative output differs from plain greedy at new token {pos} "
                         f"({out[pos:pos + 1]} vs {plain[pos:pos + 1]})")


def run_prompt(target, drafter, turn_texts, cfg, K, gen_seed, where="prompt"):
    """All turns of one prompt (turn t+1 sees the speculative answer of turn t) -> a record of counters."""
    strict = cfg["check_greedy"] and target.embed_weight.dtype == torch.float32
    if cfg["check_greedy"] and cfg["temperature"] != 0:
        raise SystemExit("evaluate: check_greedy needs --temperature=0 (it compares with plain greedy decoding)")
    warp = {k: cfg[k] for k in ("temperature", "top_k", "top_p")}
    dev, messages, recs = target.device, [], []
    for t, text in enumerate(turn_texts):
        messages.append({"role": "user", "content": text})
        ids = target.render_prompt(messages)
        check_length(target, ids, cfg["max_new_tokens"], K, f"{where} turn {t + 1}")
        g = torch.Generator(dev).manual_seed(gen_seed + t)
        res = speculative_generate(target, drafter, ids, cfg["max_new_tokens"], num_drafts=K, generator=g,
                                   tree_budget=cfg.get("tree_budget", 0), **warp)
        rec = dict(tally(res["rounds"], K, res["cut"]), new_tokens=len(res["ids"]), spec_s=res["total_s"],
                   draft_s=res["draft_s"], verify_s=res["verify_s"], turns=1)
        plain = None
        if cfg["baseline"]:
            g.manual_seed(gen_seed + t + 7919)
            plain, rec["base_s"] = plain_generate(target, ids, cfg["max_new_tokens"], generator=g, **warp)
            rec["base_tokens"] = len(plain)
        if cfg["temperature"] == 0 and (cfg["check_greedy"] or cfg["baseline"]):
            if plain is None:
                plain, _ = plain_generate(target, ids, cfg["max_new_tokens"])
            check_match(rec, plain, res["ids"], strict, f"{where} turn {t + 1}")
        rec["ids"], rec["prompt_ids"] = res["ids"], ids.tolist()
        recs.append(rec)
        answer = [x for x in res["ids"] if x not in target.eos_token_ids]
        messages.append({"role": "assistant", "content": target.tokenizer.decode(answer, skip_special_tokens=True)})
    out = merge(recs)
    out.update(prompts=1, prompt_ids=recs[0]["prompt_ids"], outputs=[r["ids"] for r in recs])
    return out


def measure_tau(target, drafter, prompts, max_new_tokens=128, temperature=0.0, num_drafts=0, seed=0, tree_budget=0):
    """In-training tau (train.py): prompts = lists of user turns -> rates (tau, accept_rate_conditional, ...)."""
    cfg = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0, tree_budget=tree_budget,
               check_greedy=False, baseline=False)
    K = num_drafts or drafter.proposal_length
    return rates(merge([run_prompt(target, drafter, turns, cfg, K, seed + i) for i, turns in enumerate(prompts)]))


def warmup(target, drafter, ids, cfg, K, tokens=8):
    """One short untimed generation on the timed paths (speculative, and plain when it is timed) so that the first
    timed prompt pays no one-time costs (lazy init, kernel selection, allocator growth, first forwards)."""
    warp = {k: cfg[k] for k in ("temperature", "top_k", "top_p")}
    g = torch.Generator(target.device).manual_seed(0)  # its own generator: the timed prompts' draws are unchanged
    speculative_generate(target, drafter, ids, tokens, num_drafts=K, generator=g,
                         tree_budget=cfg.get("tree_budget", 0), **warp)
    if cfg["baseline"]:
        plain_generate(target, ids, tokens, generator=g, **warp)


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    check_ranges("evaluate", config, {
        **dict.fromkeys(("temperature", "top_k", "num_prompts", "num_drafts", "tree_budget", "turns"), NON_NEGATIVE),
        "top_p": FRACTION, "max_new_tokens": POSITIVE, "batch_size": POSITIVE,
        "conf_threshold": Range(lambda v: 0 <= v <= 1, "in [0, 1]"),
        "policy": Range(lambda v: v in ("", "plain", "fixed", "threshold", "scheduled"),
                        "one of plain, fixed, threshold, scheduled (or '' for the batch-1 loop)")})
    batched = bool(policy) or batch_size > 1  # scheduler.batched_generate: R requests, a verify policy
    policy = config["policy"] = policy or ("fixed" if batched else "")
    if batched and prompt:
        raise SystemExit("evaluate: --prompt decodes one prompt with the batch-1 loop: drop --policy/--batch_size")
    rank, world, device = init_distributed(device)  # torchrun: prompts split across ranks, one report on rank 0
    ddp = dist.is_initialized()
    config["device"] = device
    if out and os.path.isdir(out):
        raise SystemExit(f"evaluate: --out={out} is a directory; give a report file name, e.g. {out}/report.json")
    torch.manual_seed(seed)

    # --- prompts (before the models: a missing or empty task file stops at once) ---------------
    prompts = {}
    if not prompt:
        names = list(TASKS) if task == "all" else task.split(",")  # "gsm8k,humaneval" runs both
        for name in names:
            try:
                prompts[name] = load_task(name, data_dir, num_prompts, turns)
            except MissingTask as e:
                if task != "all":
                    raise SystemExit(str(e)) from None
                if rank == 0:
                    print(f"evaluate: skipping {e}")
        if batched and turns != 1 and any(len(t) > 1 for rows in prompts.values() for t in rows):
            raise SystemExit("evaluate: batched decoding (--policy/--batch_size) decodes first turns only: add --turns=1")
        if not any(prompts.values()):
            raise SystemExit(f"evaluate: no prompts to decode for --task={task} (task files missing or empty): put "
                             f"<task>.jsonl files in --data_dir (or $NANOSPEC_DATA_DIR)")

    # --- models ---------------------------------------------------------------
    tgt, drafter, draft_path = load(checkpoint, target, dtype, device)
    K = num_drafts or drafter.proposal_length
    if rank == 0:
        print(f"evaluate: target {tgt.name} ({len(tgt.layers)} layers, taps {tgt.layer_ids}), drafter "
              f"{type(drafter).__name__} from {draft_path}, " + (f"trees of {tree_budget} nodes (depth <= {K})"
              if tree_budget else f"{K} drafts") + f" per round, {dtype} on {device}")

    sched = {}
    if batched:  # the policy's inputs (calibration, SPS profile) before any decoding
        import scheduler
        sched = scheduler.policy_inputs(tgt, drafter, draft_path, policy, batch_size, K, tree_budget, dtype,
                                        conf_threshold)

    # --- single prompt mode -----------------------------------------------------
    if prompt:
        warmup(tgt, drafter, tgt.render_prompt(messages_of(prompt)), config, K)
        rec = run_prompt(tgt, drafter, [prompt], config, K, seed)
        print(tgt.tokenizer.decode(rec["outputs"][0]))
        r = rates(rec)
        print(f"tau {r['tau']:.2f} (DeepSpec accept length {r['accept_length_deepspec']:.2f}) over {r['rounds']} "
              f"rounds, {r['new_tokens']} tokens at {r['tokens_per_s']:.1f} tok/s"
              + (f" (plain {r['baseline_tokens_per_s']:.1f} tok/s, speedup {r['speedup']:.2f}x)" if baseline else "")
              + ("; conditional acceptance per tree depth " if tree_budget else "; conditional acceptance ")
              + " ".join(f"{a:.2f}" if a is not None else "-" for a in r["accept_rate_conditional"]))
        sys.exit(0)

    partial, done = (out + ".partial.jsonl") if out else "", {}
    keyed = {k: v for k, v in config.items() if k not in ("task", "num_prompts", "out")}  # prompt i: same text
    st = os.stat(os.path.join(draft_path, "model.safetensors"))  # new weights at the same path: start over
    keyed["draft_weights"] = [st.st_size, st.st_mtime_ns]
    if partial and rank == 0:  # one run per report: a second writer would mix the rows of two runs
        os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
        lock = os.open(partial, os.O_RDWR | os.O_CREAT)  # locked until the report is written
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise SystemExit(f"evaluate: another evaluate.py is writing {partial}: wait for it or pass another --out")
    if partial and os.path.exists(partial):  # resume: finished prompts of the same config are kept
        lines = []
        for line in open(partial):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a crash: that prompt is decoded again
        if lines and lines[0].get("config") == keyed:  # rows of these settings, of prompts with the same text
            done = {(r["task"], r["index"]): r for r in lines[1:] if r.get("task") in prompts
                    and r.get("index", -1) < len(prompts[r["task"]])
                    and r.get("prompt_key") == prompt_key(prompts[r["task"]][r["index"]])}
        elif lines and rank == 0:
            print(f"evaluate: {partial} holds results of another config; starting over")
    if partial and not done and rank == 0:
        with open(partial, "w") as f:
            f.write(json.dumps({"config": keyed}) + "\n")
    if ddp:
        dist.barrier()
    for name, rows in prompts.items():  # fail early on prompts that do not fit the context
        for i, turn_texts in enumerate(rows):
            check_length(tgt, tgt.render_prompt(messages_of(turn_texts[0])), max_new_tokens, K, f"{name}[{i}]")
    todo = [(name, i) for name, rows in prompts.items() for i in range(len(rows)) if (name, i) not in done]
    if rank == 0 and done:
        print(f"evaluate: resuming, {len(done)} prompts already done in {partial}")

    # --- decode -----------------------------------------------------------------
    fd = os.open(partial, os.O_WRONLY | os.O_APPEND) if partial else None
    mine, seed_of = [], lambda name, i: seed * 1_000_003 + zlib.crc32(f"{name}/{i}".encode()) * 16  # any world size
    mytodo = todo[rank::world]
    groups = [mytodo[j:j + batch_size] for j in range(0, len(mytodo), batch_size)]

    def decode(group, cfg):  # a group of (task, index) -> one record per prompt
        if batched:  # first turns, together
            return scheduler.run_batch(tgt, drafter, [prompts[n][i][0] for n, i in group], cfg, K,
                                       [seed_of(n, i) for n, i in group], sched, [f"{n}[{i}]" for n, i in group])
        return [run_prompt(tgt, drafter, prompts[n][i], cfg, K, seed_of(n, i), where=f"{n}[{i}]") for n, i in group]
    if groups and batched:  # untimed: one-time costs must not land on the first timed prompt
        decode(groups[0], dict(config, max_new_tokens=8, check_greedy=False))
    elif groups:
        name, i = groups[0][0]
        warmup(tgt, drafter, tgt.render_prompt(messages_of(prompts[name][i][0])), config, K)
    for group in tqdm(groups, desc="prompts" if batch_size == 1 else f"batches of {batch_size}", disable=rank != 0,
                      dynamic_ncols=True):
        for (name, i), rec in zip(group, decode(group, config)):
            rec.update(task=name, index=i, prompt_key=prompt_key(prompts[name][i]))
            if not save_outputs:
                del rec["outputs"], rec["prompt_ids"]
            mine.append(rec)
            if fd is not None:
                os.write(fd, (json.dumps(rec) + "\n").encode())  # one write per line: appends never interleave
    if fd is not None:
        os.close(fd)
    if ddp:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = [r for g in gathered for r in g]
        dist.destroy_process_group()
    if rank != 0:
        sys.exit(0)

    # --- report -----------------------------------------------------------------
    recs = {**done, **{(r["task"], r["index"]): r for r in mine}}
    report = {"config": config, "tasks": {}}
    for name, rows in prompts.items():
        task_recs = [recs[(name, i)] for i in range(len(rows))]
        report["tasks"][name] = rates(merge(task_recs))
        if save_outputs:
            report["tasks"][name].update(prompt_ids=[r["prompt_ids"] for r in task_recs],
                                         outputs=[r["outputs"][0] for r in task_recs])
            if any(len(r["outputs"]) > 1 for r in task_recs):
                report["tasks"][name]["turn_outputs"] = [r["outputs"] for r in task_recs]
    report["overall"] = overall_rates(report["tasks"], [recs[(n, i)] for n, rows in prompts.items()
                                                        for i in range(len(rows))])
    print(format_table(report["tasks"], report["overall"], tree=bool(tree_budget)))
    if out:
        with atomic_path(out) as tmp, open(tmp, "w") as f:  # a report is complete or absent
            json.dump(report, f)
        print(f"evaluate: report written to {out}")
        os.close(lock)  # unlocked: a later run may resume from the partial file
