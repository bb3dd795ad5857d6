"""evaluate.py: lossless speculative decoding (greedy equality, the acceptance rule's exact law; the sampled law
end to end is test_sampled_law.py's), metrics, tasks, the CLI."""
import json
import math
import os
import runpy

import pytest
import torch

import evaluate as E
import prompts
from conftest import EVAL_DIR
from kernels import logits_to_probs
from metrics import format_table, macro, merge, overall_rates, rates, tally
from target import load_drafter, load_target, target_of

torch.set_num_threads(1)  # tiny models: threads only add overhead on the shared 2-core machine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4  # drafts per round in these tests
PROMPTS = ["Hi", "What is 2+2?", "Write a poem about the sea.", "List three colors", "abc def ghi",
           "Translate 'cat' to French", "Why is the sky blue?", "0 1 1 2 3 5 8"]


@pytest.fixture(scope="module")
def tiny():
    return {name: load_target(name) for name in ("tiny-qwen3", "tiny-llama")}


def real_drafter(kind, target):
    """A randomly initialized real drafter (small: 1 layer) for a tiny target."""
    torch.manual_seed(0)
    if kind == "dflash":
        from model_dflash import DFlash
        return DFlash.from_target(target, block_size=K, num_draft_layers=1).eval()
    if kind == "dspark":
        from model_dspark import DSpark
        return DSpark.from_target(target, block_size=K, num_draft_layers=1, markov_rank=16).eval()
    from model_eagle3 import Eagle3
    return Eagle3.from_target(target, ttt_length=K).eval()


class Oracle:
    """Scripted drafter: proposes the target's own greedy continuation `full` (prompt + plain output) with
    one-hot probabilities; `wrong(round, slot)` replaces that slot by another token. It checks that commit
    receives the anchor + accepted tokens and, when `target` is given, their exact target features."""

    def __init__(self, full, V, wrong=lambda r, i: False, target=None):
        self.full, self.V, self.wrong, self.target, self.proposal_length = list(full), V, wrong, target, K

    def start(self, prompt_ids, taps):
        assert len(taps) == len(prompt_ids)
        return {"n": len(prompt_ids), "round": 0}

    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        n, r = state["n"], state["round"]
        assert anchor == self.full[n]
        toks = [self.full[n + 1 + i] if n + 1 + i < len(self.full) else 7 for i in range(k)]
        toks = torch.tensor([(t + 1) % self.V if self.wrong(r, i) else t for i, t in enumerate(toks)])
        state["round"] += 1
        return toks, torch.nn.functional.one_hot(toks, self.V).float(), None

    def commit(self, state, ids, taps):
        n, m = state["n"], len(ids)
        assert ids.tolist() == self.full[n:n + m] and taps.shape[0] == m
        if self.target is not None:  # the taps of the verify forward are the target's features at those tokens
            ref, _ = self.target.features(torch.tensor(self.full[:n + m])[None])
            torch.testing.assert_close(taps, ref[0, n:n + m], rtol=1e-4, atol=1e-4)
        state["n"] += m


class Constant:
    """Scripted drafter proposing token 0 everywhere (one-hot): a correct rule rejects it."""
    proposal_length = K

    def start(self, prompt_ids, taps):
        return {}

    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        return torch.zeros(k, dtype=torch.long), torch.nn.functional.one_hot(torch.zeros(k, dtype=torch.long), 262).float(), None

    def commit(self, state, ids, taps):
        pass


class Distorted:
    """Scripted sampling drafter: q(. | context) = softmax(0.5 * target logits + noise(context)), memoized per
    context; tokens are drawn from q and q is returned, as the drafter contract says."""

    def __init__(self, target, warp):
        self.target, self.warp, self.memo, self.proposal_length = target, warp, {}, K

    def q(self, ctx):
        if ctx not in self.memo:
            with torch.no_grad():
                z = self.target.model(input_ids=torch.tensor(ctx)[None]).logits[0, -1].float()
            g = torch.Generator().manual_seed(hash(ctx) % (1 << 31))
            self.memo[ctx] = logits_to_probs(0.5 * z + torch.randn(z.shape, generator=g), **self.warp)
        return self.memo[ctx]

    def start(self, prompt_ids, taps):
        return {"ctx": tuple(prompt_ids.tolist())}

    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        ctx, toks, probs = state["ctx"] + (int(anchor),), [], []
        for _ in range(k):
            q = self.q(ctx)
            toks.append(int(torch.multinomial(q, 1, generator=generator)))
            probs.append(q)
            ctx += (toks[-1],)
        return torch.tensor(toks), torch.stack(probs), None

    def commit(self, state, ids, taps):
        state["ctx"] += tuple(ids.tolist())


def ids_of(target, text):
    return target.render_prompt([{"role": "user", "content": text}])


# -----------------------------------------------------------------------------
# acceptance rules by exact enumeration

def law_one_slot(accept, resid, pt, pd):
    """Exact law of the token one chain slot emits: sum over drafts d ~ pd of [keep d] + [reject] residual."""
    alpha = torch.where(pd > 0, accept(pt, pd.clamp_min(1e-30)).clamp(0, 1), torch.zeros_like(pd))  # P(u < a)
    kept = pd * alpha  # [V] P(draft = x and kept)
    return kept + (1 - kept.sum()) * resid(pt, pd)


def law_two_tokens(accept, resid, pt1, pd1, pt2, pd2, pdn, k):
    """Exact joint law [V, V] of the first two tokens of a round of k drafts (k = 1 or 2): slot 1 kept, then
    slot 2 (k = 2) or the bonus from pt2 (k = 1); slot 1 rejected: x1 from the residual, and the next round
    drafts x2 from pdn[x1] with the same rule. pt2, pd2, pdn [V, V] are conditional on the first token."""
    alpha1 = torch.where(pd1 > 0, accept(pt1, pd1.clamp_min(1e-30)).clamp(0, 1), torch.zeros_like(pd1))
    kept1 = pd1 * alpha1
    second = torch.stack([law_one_slot(accept, resid, pt2[x], pd2[x]) if k == 2 else pt2[x] for x in range(len(pt1))])
    after_reject = torch.stack([law_one_slot(accept, resid, pt2[x], pdn[x]) for x in range(len(pt1))])
    return kept1[:, None] * second + (1 - kept1.sum()) * resid(pt1, pd1)[:, None] * after_reject


def dists(kind, V, g, *shape):
    """'peaked' (softmax of large logits), 'flat' (small logits), 'sparse' (top-2 only: disjoint supports)."""
    z = torch.randn(*shape, V, generator=g, dtype=torch.float64)
    if kind == "sparse":  # the 2 largest logits only (exact in float64, like logits_to_probs' top-k)
        z = (3 * z).masked_fill(z < z.topk(2, -1).values[..., -1:], float("-inf"))
    return torch.softmax(z * (5.0 if kind == "peaked" else 0.3 if kind == "flat" else 1.0), -1)


@pytest.mark.parametrize("kt,kd", [("peaked", "peaked"), ("peaked", "flat"), ("flat", "peaked"), ("flat", "flat"),
                                   ("sparse", "peaked"), ("peaked", "sparse"), ("same", "same")])
def test_acceptance_rule_is_exact_by_enumeration(kt, kd):
    """accept_prob + residual reproduce the target law exactly (first token, and the joint of the first two
    for chains of 1 and 2 drafts) on peaked/flat/disjoint pairs; broken rules fail the same check."""
    g, V = torch.Generator().manual_seed(len(kt) * 10 + len(kd)), 6
    if kt == "same":  # q == p: every draft is kept, the residual is never used
        pt1 = pd1 = dists("peaked", V, g)
        pt2 = pd2 = pdn = dists("flat", V, g, V)
    else:
        pt1, pd1, pt2, pd2, pdn = dists(kt, V, g), dists(kd, V, g), dists(kt, V, g, V), dists(kd, V, g, V), dists(kd, V, g, V)
    want1, want2 = pt1, pt1[:, None] * pt2
    torch.testing.assert_close(law_one_slot(E.accept_prob, E.residual, pt1, pd1), want1, rtol=0, atol=1e-12)
    for k in (1, 2):
        torch.testing.assert_close(law_two_tokens(E.accept_prob, E.residual, pt1, pd1, pt2, pd2, pdn, k), want2,
                                   rtol=0, atol=1e-12)
    if kt == "same":
        return
    broken = {"residual without max(0, .)": (E.accept_prob, lambda p, q: (p - q) / (p - q).sum(-1, keepdim=True)),
              "resample from p_target": (E.accept_prob, lambda p, q: p),
              "accept with p_target(d)": (lambda p, q: p, E.residual),
              "accept with p_target/p_draft + residual from p_target": (lambda p, q: p / q, lambda p, q: p)}
    for name, (acc, res) in broken.items():
        got = law_two_tokens(acc, res, pt1, pd1, pt2, pd2, pdn, 2)
        assert not torch.allclose(got, want2, rtol=0, atol=1e-6), f"the enumeration misses the broken rule: {name}"


def test_greedy_and_sampled_accept_functions():
    """greedy_accept / sample_accept count the leading accepted drafts; the residual falls back to p when p == q."""
    assert E.greedy_accept(torch.tensor([3, 4, 5]), torch.tensor([3, 4, 9])) == 2
    assert E.greedy_accept(torch.tensor([3, 4, 5]), torch.tensor([1, 4, 5])) == 0
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.0, 1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    d = torch.tensor([0, 0, 1])  # ratios: min(1, 2) = 1, 0.2, 1
    assert E.sample_accept(p, q, d, torch.tensor([0.99, 0.1, 0.5])) == 3
    assert E.sample_accept(p, q, d, torch.tensor([0.99, 0.3, 0.0])) == 1
    torch.testing.assert_close(E.residual(p[1], q[1]), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(E.residual(p[2], q[2]), p[2])


# -----------------------------------------------------------------------------
# greedy: speculative output == plain output, token for token

def test_greedy_oracle_with_eos_in_block_and_budget(tiny):
    """A scripted drafter (the target's own greedy text, with wrong slots) gives plain greedy output exactly,
    with partial acceptance, EOS inside an accepted block (stop there) and budgets ending mid-block."""
    for name, t in tiny.items():
        eos0 = t.eos_token_ids
        try:
            for j, text in enumerate(PROMPTS):
                ids = ids_of(t, text)
                ref, _ = E.plain_generate(t, ids, 40)  # greedy with budget b = ref[:b] (it never hits EOS here)
                assert not eos0 & set(ref)
                wrong = lambda r, i, j=j: (r * 7 + i * 3 + j) % 5 == 0  # some slots wrong: partial acceptance
                for budget in (1, 2, 5, 13, 40):
                    d = Oracle(ids.tolist() + ref, len(t.tokenizer), wrong, target=t if budget == 13 else None)
                    res = E.speculative_generate(t, d, ids, budget, num_drafts=K)
                    assert res["ids"] == ref[:budget], (name, j, budget)
                    assert sum(r[2] for r in res["rounds"]) + 1 == len(res["ids"])
                # EOS = the token at 10 + j of the greedy text: plain decoding stops at its first occurrence
                stop = ref[10 + j]
                t.eos_token_ids = eos0 | {stop}
                want = ref[:ref.index(stop) + 1]
                if j == 0:
                    assert E.plain_generate(t, ids, 40)[0] == want
                res = E.speculative_generate(t, Oracle(ids.tolist() + ref, len(t.tokenizer)), ids, 40, num_drafts=K)
                assert res["ids"] == want
                k, n, c = res["rounds"][-1]
                assert k == n == c and sum(r[2] for r in res["rounds"]) + 1 == len(want)
                t.eos_token_ids = eos0
        finally:
            t.eos_token_ids = eos0


@pytest.mark.parametrize("kind", ["dflash", "dspark", "eagle3"])
def test_greedy_real_drafters(tiny, kind):
    """Randomly initialized real drafters (their own caches, start/propose/commit) give plain greedy output."""
    for name, t in tiny.items():
        d = real_drafter(kind, t)
        for text in PROMPTS[:4]:
            ids = ids_of(t, text)
            res = E.speculative_generate(t, d, ids, 20)
            assert res["ids"] == E.plain_generate(t, ids, 20)[0], (name, kind, text)


def test_eagle3_propose_stops_at_stop_ids(tiny):
    """Eagle3.propose(stop_ids=...) ends the chain after the first drafted stop token: the same draws (same
    generator seed) cut to that length; ids it never drafts change nothing; a tensor works like a set."""
    t = tiny["tiny-qwen3"]
    d = real_drafter("eagle3", t)
    ids = ids_of(t, "Hi")
    state = d.start(ids, t.features(ids[None])[0][0])
    g = lambda: torch.Generator().manual_seed(0)
    full, full_q, _ = d.propose(state, 184, K, temperature=1.0, generator=g())
    assert len(full) == K and int(full[0]) != int(full[1])  # the test's premise: slot 1 drafts a new token
    for stop in ({int(full[1])}, torch.tensor([int(full[1]), 261])):
        tok, q, _ = d.propose(state, 184, K, temperature=1.0, generator=g(), stop_ids=stop)
        assert tok.tolist() == full[:2].tolist() and q.shape == (2, full_q.shape[1])
        torch.testing.assert_close(q, full_q[:2], rtol=0, atol=0)
    never = set(range(t.config.vocab_size)) - set(full.tolist())
    tok, q, _ = d.propose(state, 184, K, temperature=1.0, generator=g(), stop_ids=never)
    assert torch.equal(tok, full) and torch.equal(q, full_q)


def test_eagle3_stop_in_speculative_decoding(tiny):
    """speculative_generate hands the target's end-of-turn ids to Eagle3 (whose propose takes stop_ids), so a
    drafted EOS ends the chain early; the shorter chains verify correctly (output = plain greedy)."""
    t = tiny["tiny-qwen3"]
    d, eos0, seen = real_drafter("eagle3", t), t.eos_token_ids, []
    propose = d.propose

    def recording(state, anchor, k, stop_ids=None, **kw):
        out = propose(state, anchor, k, stop_ids=stop_ids, **kw)
        seen.append((stop_ids, out[0].tolist()))
        return out

    d.propose = recording
    ids = ids_of(t, "Hi")
    E.speculative_generate(t, d, ids, 12)
    drafted = seen[0][1]  # this random drafter repeats one token; make it an end-of-turn id
    assert seen[0][0] == eos0 and len(drafted) == K and drafted[0] not in eos0
    try:
        t.eos_token_ids = eos0 | {drafted[0]}
        seen.clear()
        res = E.speculative_generate(t, d, ids, 12)
        assert res["ids"] == E.plain_generate(t, ids, 12)[0]
        assert seen and all(s == t.eos_token_ids and len(c) < K and c[-1] == drafted[0] for s, c in seen)
        assert all(r[0] == len(c) for r, (_, c) in zip(res["rounds"], seen))  # proposed = the shorter chain
    finally:
        t.eos_token_ids = eos0


def test_check_greedy_fails_loudly(tiny, monkeypatch):
    """check_greedy stops with the prompt and position when speculative output differs (a broken rule here)."""
    t = tiny["tiny-qwen3"]
    cfg = dict(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=12, baseline=False, check_greedy=True)
    rec = E.run_prompt(t, Constant(), ["Hi"], cfg, K, 0, where="mini[3]")
    assert rec["greedy_matched"] == 1 and rec["greedy_checked"] == 1
    monkeypatch.setattr(E, "greedy_accept", lambda g, drafts: len(drafts))  # accept everything
    with pytest.raises(SystemExit, match=r"mini\[3\] turn 1: .* at new token \d+"):
        E.run_prompt(t, Constant(), ["Hi"], cfg, K, 0, where="mini[3]")


# -----------------------------------------------------------------------------
# sampling: the exact law of the first tokens and its chi-square (used by test_tree.py and test_gemma4.py); the
# sampled-law tests with power (and the deliberate bugs they catch) are in test_sampled_law.py

def exact_law(t, ids, n, warp, eps=1e-5):
    """Exact law of the first n new tokens under the warped target: {tuple: prob}, pruned below eps."""
    law, frontier = {}, {(): 1.0}
    for _ in range(n):
        seqs = list(frontier)
        with torch.no_grad():
            z = t.model(input_ids=torch.stack([torch.cat([ids, torch.tensor(s, dtype=torch.long)]) for s in seqs])).logits
        p = logits_to_probs(z[:, -1].float(), **warp)
        new = {}
        for s, row in zip(seqs, p):
            for v in (row * frontier[s] > eps).nonzero()[:, 0].tolist():
                (law if v in t.eos_token_ids else new)[s + (v,)] = frontier[s] * float(row[v])
        frontier = new
    law.update(frontier)
    return law


def chi2_pvalue(stat, df):
    """P(X > stat) for X ~ chi-square(df) = Q(df/2, stat/2), the regularized upper gamma: below the mean by the
    series of P = 1 - Q, above it by Q's continued fraction (accurate far in the tail: a broken rule's 1e-40
    is reported as such, not as 0)."""
    a, x = df / 2, stat / 2
    if x <= 0:
        return 1.0
    front = math.exp(a * math.log(x) - x - math.lgamma(a))  # x^a e^-x / Gamma(a)
    if x < a + 1:
        term = total = 1 / a
        for n in range(1, 10000):
            term *= x / (a + n)
            total += term
            if term < total * 1e-15:
                break
        return max(0.0, 1 - front * total)
    tiny = 1e-300  # modified Lentz: Q = front / (x + 1 - a - 1 (1 - a) / (x + 3 - a - 2 (2 - a) / (x + 5 - a - ...)))
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10000):
        an, b = -i * (i - a), b + 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return front * h


def chi2_test(samples, law, N):
    """Cells with expected count >= 5, the rest lumped -> p-value."""
    cells = [s for s, p in law.items() if N * p >= 5]
    obs = [sum(1 for s in samples if s == c) for c in cells]
    exp = [N * law[c] for c in cells]
    obs.append(N - sum(obs))
    exp.append(N - sum(exp))
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    return chi2_pvalue(stat, len(cells)), len(cells)


def test_chi2_pvalue():
    """The chi-square tail matches known quantiles (df 1: 3.841 -> 0.05; df 10: 23.209 -> 0.01; df 30: 59.703 ->
    0.001), df 2's closed form exp(-x/2) on both branches and far in the tail, and df 4's (1 + x/2) exp(-x/2)."""
    assert abs(chi2_pvalue(3.841, 1) - 0.05) < 1e-3
    assert abs(chi2_pvalue(23.209, 10) - 0.01) < 1e-4
    assert abs(chi2_pvalue(59.703, 30) - 0.001) < 1e-6
    for x in (0.5, 2.0, 3.9, 4.1, 30.0, 200.0, 1000.0):
        assert chi2_pvalue(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9, abs=1e-15 if x < 30 else 0)
        assert chi2_pvalue(x, 4) == pytest.approx((1 + x / 2) * math.exp(-x / 2), rel=1e-9, abs=1e-15 if x < 30 else 0)
    assert chi2_pvalue(0.0, 3) == 1.0 and 0 < chi2_pvalue(500.0, 50) < 1e-60


def sampled(t, d, ids, n, warp, N, tree_budget=0):
    """N seeded speculative samples of n tokens (chains of 2 drafts, or trees of tree_budget nodes)."""
    g = torch.Generator().manual_seed(N)
    return [tuple(E.speculative_generate(t, d, ids, n, num_drafts=2, generator=g, tree_budget=tree_budget,
                                         **warp)["ids"]) for _ in range(N)]


# -----------------------------------------------------------------------------
# metrics

def test_metrics_hand_computed(tiny):
    """tau, conditional and cumulative per-slot acceptance from recorded rounds equal hand-computed values."""
    t = tiny["tiny-qwen3"]
    eos0 = t.eos_token_ids
    try:
        t.eos_token_ids = set()  # no early stop: exactly the scripted rounds
        ids = ids_of(t, "Hi")
        ref, _ = E.plain_generate(t, ids, 20)
        first_wrong = {0: 1, 1: 9, 2: 0, 3: 2}  # round -> first wrong slot (9: none) => accepted 1, 3, 0, 2
        d = Oracle(ids.tolist() + ref, len(t.tokenizer), lambda r, i: i == first_wrong.get(r))
        d.proposal_length = 3
        res = E.speculative_generate(t, d, ids, 1 + 2 + 4 + 1 + 3)
    finally:
        t.eos_token_ids = eos0
    assert res["rounds"] == [(3, 1, 2), (3, 3, 4), (3, 0, 1), (3, 2, 3)]
    r = rates(tally(res["rounds"], 3))
    assert r["tau"] == 10 / 4 and r["mean_proposal_len"] == 3 and r["rounds"] == 4
    # slot 0: kept in rounds 1, 2, 4 of 4; slot 1: reached in 1, 2, 4, kept in 2, 4; slot 2: reached 2, 4, kept 2
    assert r["accept_rate_conditional"] == [3 / 4, 2 / 3, 1 / 2]
    assert r["accept_rate_cumulative"] == [3 / 4, 2 / 4, 1 / 4]
    # EOS at slot 1 of a round with 3 accepted: slots past EOS are not counted; merge pools counters
    c = merge([tally([(2, 2, 2)], 3), tally([(3, 0, 1)], 3)])
    assert c["slot_proposed"] == [2, 2, 1] and c["slot_reached"] == [2, 1, 0] and c["slot_accepted"] == [1, 1, 0]
    assert c["committed"] == 3 and c["rounds"] == 2


def test_accept_length_deepspec_counts_the_cut_last_round(tiny):
    """accept_length_deepspec counts the last round uncapped (all its accepted tokens + the bonus, as DeepSpec);
    tau stops at max_new_tokens. Equal when no round is cut."""
    # by hand: rounds commit 2 and 2, but the last round accepted 3 + bonus = 4 of which the budget kept 2
    r = rates(tally([(3, 1, 2), (3, 3, 2)], 3, cut=2))
    assert r["tau"] == 4 / 2 and r["accept_length_deepspec"] == 6 / 2
    r = rates(merge([tally([(3, 3, 4)], 3), tally([(3, 2, 1)], 3, cut=2), tally([(3, 0, 1)], 3)]))
    assert r["tau"] == 6 / 3 and r["accept_length_deepspec"] == 8 / 3
    assert rates(tally([(3, 1, 2), (3, 3, 4)], 3))["accept_length_deepspec"] == 3.0  # nothing cut: = tau
    # decoded: the scripted rounds of test_metrics_hand_computed accept 1, 3, 0, 2 (+ bonus each) = 10 tokens
    t = tiny["tiny-qwen3"]
    eos0 = t.eos_token_ids
    try:
        t.eos_token_ids = set()
        ids = ids_of(t, "Hi")
        ref, _ = E.plain_generate(t, ids, 20)
        first_wrong = {0: 1, 1: 9, 2: 0, 3: 2}
        got = {}
        for budget in (11, 10, 5):  # 1 prefill token + 10: no cut; 10: the 4th round cut by 1; 5: the 2nd by 2
            d = Oracle(ids.tolist() + ref, len(t.tokenizer), lambda r, i: i == first_wrong.get(r))
            d.proposal_length = 3
            res = E.speculative_generate(t, d, ids, budget)
            assert res["ids"] == ref[:budget]
            got[budget] = rates(tally(res["rounds"], 3, res["cut"]))
    finally:
        t.eos_token_ids = eos0
    assert got[11]["tau"] == got[11]["accept_length_deepspec"] == 10 / 4
    assert got[10]["tau"] == 9 / 4 and got[10]["accept_length_deepspec"] == 10 / 4
    assert got[5]["tau"] == (2 + 2) / 2 and got[5]["accept_length_deepspec"] == (2 + 4) / 2


def test_macro_and_table_labels():
    """tau_macro is the unweighted task mean (tasks without rounds skipped); the table shows it in a 'mean of
    tasks' row beside the pooled overall, and tree mode labels the per-slot rates per depth, not as DeepSpec's."""
    assert macro({"a": {"tau": 2.0}, "b": {"tau": 3.5}, "c": {"tau": None}}) == 2.75
    assert macro({"a": {"tau": None}}) is None
    long, short = tally([(3, 0, 1)] * 3, 3), tally([(3, 3, 4)], 3, cut=1)  # taus 1 and 4; 5 with the cut
    o = overall_rates({"a": rates(long), "b": rates(short)}, [long, short])
    assert o["tau"] == 7 / 4 and o["tau_macro"] == (1 + 4) / 2  # pooled vs the paper's mean of tasks
    assert o["accept_length_deepspec"] == 8 / 4 and o["accept_length_deepspec_macro"] == (1 + 5) / 2
    row = lambda tau, ds, n: dict(prompts=1, new_tokens=10, rounds=n, tau=tau, accept_length_deepspec=ds,
                                  mean_proposal_len=3.0, tokens_per_s=None, baseline_tokens_per_s=None, speedup=None,
                                  draft_s=0.0, verify_s=0.0, accept_rate_conditional=[0.5], accept_rate_cumulative=[0.5])
    tasks = {"a": row(2.0, 2.25, 1), "b": row(4.0, 4.0, 3)}
    overall = dict(row(3.5, 3.56, 4), tau_macro=3.0, accept_length_deepspec_macro=3.125)
    chain = format_table(tasks, overall)
    assert "DeepSpec accept_rate@i" in chain and "tau_ds" in chain
    mean = [line for line in chain.splitlines() if line.startswith("mean of tasks")]
    assert len(mean) == 1 and mean[0].split()[3:] == ["3.00", "3.12"]
    tree = format_table(tasks, overall, tree=True)
    assert "DeepSpec" not in tree.splitlines()[0] and "depth" in tree.splitlines()[0]
    assert "mean of tasks" not in format_table({"a": tasks["a"]}, overall)  # one task: the row would repeat it


def test_warmup_runs_the_timed_paths(tiny, monkeypatch):
    """warmup decodes a few untimed tokens on the speculative path, and on the plain path only when it is timed."""
    t = tiny["tiny-qwen3"]
    spec, plain = [], []
    monkeypatch.setattr(E, "speculative_generate", lambda *a, **kw: spec.append((a[3], kw["tree_budget"])))
    monkeypatch.setattr(E, "plain_generate", lambda *a, **kw: plain.append(a[2]))
    cfg = dict(temperature=0.0, top_k=0, top_p=1.0, baseline=True, tree_budget=5)
    E.warmup(t, Constant(), ids_of(t, "Hi"), cfg, K)
    assert spec == [(8, 5)] and plain == [8]
    E.warmup(t, Constant(), ids_of(t, "Hi"), dict(cfg, baseline=False), K)
    assert len(spec) == 2 and plain == [8]


def test_measure_tau(tiny):
    """measure_tau (train.py's in-training tau) decodes lists of user turns and reports rates."""
    t = tiny["tiny-qwen3"]
    r = E.measure_tau(t, real_drafter("dflash", t), [["Hi"], ["Why?"]], max_new_tokens=8)
    assert r["rounds"] > 0 and 1.0 <= r["tau"] <= K + 1 and len(r["accept_rate_conditional"]) == K
    assert r["new_tokens"] == 2 + round(r["tau"] * r["rounds"])  # the prefill token of each prompt + rounds
    assert r["accept_length_deepspec"] >= r["tau"]


# -----------------------------------------------------------------------------
# tasks, loading, the CLI

def test_load_task_selection(tmp_path, monkeypatch):
    """DeepSpec's selection (shuffle with Random(980406) when the file has more rows than the count), the
    num_prompts cut, turns, custom <name>.jsonl files, and a one-line error for a missing task."""
    import random
    src = EVAL_DIR
    if not os.path.exists(os.path.join(src, "gsm8k.jsonl")):
        pytest.skip("shared eval datasets not present")
    rows = [json.loads(line)["turns"] for line in open(os.path.join(src, "gsm8k.jsonl"))]
    random.Random(980406).shuffle(rows)
    got = prompts.load_task("gsm8k", src)
    assert len(got) == 500 and got == rows[:500]
    assert prompts.load_task("gsm8k", src, num_prompts=5) == rows[:5]
    assert prompts.load_task("humaneval", src, num_prompts=3) == [json.loads(line)["turns"] for line in
                                                            open(os.path.join(src, "humaneval.jsonl"))][:3]
    mt = prompts.load_task("mt-bench", src)
    assert len(mt) == 80 and all(len(r) == 2 for r in mt) and all(len(r) == 1 for r in prompts.load_task("mt-bench", src, turns=1))
    (tmp_path / "mine.jsonl").write_text('{"turns": ["a", "b"]}\n{"turns": ["c"]}\n')
    assert prompts.load_task("mine", str(tmp_path)) == [["a", "b"], ["c"]]
    monkeypatch.setenv("NANOSPEC_DATA_DIR", str(tmp_path))
    assert prompts.load_task("mine") == [["a", "b"], ["c"]]
    with pytest.raises(prompts.MissingTask, match="nope"):
        prompts.load_task("nope", str(tmp_path))
    for bad in ('{"turns": ["a"]', '{"turns": [1]}', '[1, 2]'):  # cut JSON, a wrong type, not an object
        (tmp_path / "bad.jsonl").write_text('{"turns": ["fine"]}\n' + bad + "\n")
        with pytest.raises(SystemExit, match="bad.jsonl:2: each row must be"):
            prompts.load_task("bad", str(tmp_path))


def test_load_drafter_and_mismatch_errors(tiny, tmp_path):
    """load_drafter picks the class from config.json and refuses a drafter made for another target geometry."""
    t = tiny["tiny-qwen3"]
    for kind in ("dflash", "dspark", "eagle3"):
        d = real_drafter(kind, t)
        d.save_pretrained(str(tmp_path / kind))
        loaded = load_drafter(str(tmp_path / kind), t)
        assert type(loaded) is type(d)
        ids = ids_of(t, "Hi")
        assert E.speculative_generate(t, loaded, ids, 10)["ids"] == E.speculative_generate(t, d, ids, 10)["ids"]
    cfg = json.loads((tmp_path / "dspark" / "config.json").read_text())
    assert target_of(cfg) == "tiny-qwen3"
    (tmp_path / "dspark" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 128}))
    with pytest.raises(SystemExit, match="hidden_size=128.*--target"):
        load_drafter(str(tmp_path / "dspark"), t)
    assert cfg["vocab_fingerprint"] == t.vocab_fingerprint
    (tmp_path / "dspark" / "config.json").write_text(json.dumps({**cfg, "vocab_fingerprint": "0123456789abcdef"}))
    with pytest.raises(SystemExit, match="another vocabulary"):  # same geometry, another tokenizer
        load_drafter(str(tmp_path / "dspark"), t)
    (tmp_path / "dspark" / "config.json").write_text(json.dumps({**cfg, "target_layer_ids": [0, 1, 2, 3, 5]}))
    with pytest.raises(SystemExit, match="taps layers"):
        load_drafter(str(tmp_path / "dspark"), t)
    (tmp_path / "dspark" / "config.json").write_text(json.dumps(cfg))
    weights = (tmp_path / "dspark" / "model.safetensors").read_bytes()
    (tmp_path / "dspark" / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # a copy cut short
    with pytest.raises(SystemExit, match="dspark: cannot load it .*retrain"):
        load_drafter(str(tmp_path / "dspark"), t)
    (tmp_path / "dspark" / "config.json").write_text('{"architectures": ["Qwen3DSparkModel"')
    with pytest.raises(SystemExit, match="config.json is not valid JSON"):
        load_drafter(str(tmp_path / "dspark"), t)
    os.remove(tmp_path / "dspark" / "model.safetensors")
    with pytest.raises(SystemExit, match="has no model.safetensors"):
        load_drafter(str(tmp_path / "dspark"), t)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no config.json"):
        load_drafter(str(tmp_path / "empty"), t)
    with pytest.raises(SystemExit, match="prompt x\\[0\\].*max_new_tokens"):
        E.check_length(t, torch.zeros(2000, dtype=torch.long), 100, K, "prompt x[0]")


def test_cli_report_resume_and_prompt_mode(tiny, tmp_path, monkeypatch, capsys):
    """The script end to end on a tiny target: table, JSON report (keys of the issue), 2-turn prompts, resume
    from <out>.partial.jsonl (finished prompts are not decoded again; new weights at the same path start over),
    and --prompt mode."""
    t = tiny["tiny-qwen3"]
    real_drafter("dspark", t).save_pretrained(str(tmp_path / "drafter"))
    (tmp_path / "mini.jsonl").write_text("".join(json.dumps({"turns": [f"Say {i}", "More"][:1 + i % 2]}) + "\n"
                                                 for i in range(3)))
    out = str(tmp_path / "report.json")

    def main(*args):
        monkeypatch.setattr("sys.argv", ["evaluate.py", "--task=mini", f"--data_dir={tmp_path}",
                                         f"--checkpoint={tmp_path / 'drafter'}", "--max_new_tokens=8", *args])
        try:
            runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        return capsys.readouterr().out

    text = main("--num_prompts=2", f"--out={out}", "--save_outputs", "--check_greedy")
    assert "mini" in text and "overall" in text and "tiny-qwen3" in text
    rep = json.load(open(out))
    r = rep["tasks"]["mini"]
    for key in ("tau", "rounds", "new_tokens", "accept_rate_conditional", "accept_rate_cumulative", "tokens_per_s",
                "baseline_tokens_per_s", "speedup", "draft_s", "verify_s", "prompt_ids", "outputs"):
        assert key in r, key
    assert r["prompts"] == 2 and r["turns"] == 3 and r["greedy_match_rate"] == 1.0
    assert len(r["outputs"]) == 2 and len(r["turn_outputs"][1]) == 2
    assert r["prompt_ids"][0] == ids_of(t, "Say 0").tolist()
    assert r["new_tokens"] == sum(len(o) for turns in r["turn_outputs"] for o in turns)
    assert rep["overall"]["tau"] == r["tau"] and rep["config"]["max_new_tokens"] == 8
    text = main("--num_prompts=3", f"--out={out}", "--save_outputs", "--check_greedy")
    assert "already done" in text
    lines = open(out + ".partial.jsonl").read().splitlines()
    assert len(lines) == 1 + 3  # header + 3 prompts: the first two were not decoded again
    rep2 = json.load(open(out))["tasks"]["mini"]
    assert rep2["prompts"] == 3 and rep2["outputs"][:2] == r["outputs"]
    real_drafter("dspark", t).save_pretrained(str(tmp_path / "drafter"))  # new weights, same path: no stale reuse
    text = main("--num_prompts=3", f"--out={out}")
    assert "another config" in text and "already done" not in text
    text = main("--prompt=Hello", "--baseline=False")
    assert "tau" in text and "conditional acceptance" in text


def test_cli_resume_keyed_on_prompt_text_lock_and_bad_input(tiny, tmp_path, monkeypatch, capsys):
    """A resumed row is reused only for the same prompt text (a task file edited in place decodes that prompt
    again); a second writer of the same report is refused; bad values, an --out directory and a task without
    prompts stop with one line before any decoding."""
    import fcntl
    real_drafter("dspark", tiny["tiny-qwen3"]).save_pretrained(str(tmp_path / "drafter"))
    task_file, out = tmp_path / "mini.jsonl", str(tmp_path / "report.json")
    task_file.write_text("".join(json.dumps({"turns": [f"Say {i}"]}) + "\n" for i in range(3)))

    def main(*args):
        monkeypatch.setattr("sys.argv", ["evaluate.py", "--task=mini", f"--data_dir={tmp_path}", "--baseline=False",
                                         f"--checkpoint={tmp_path / 'drafter'}", "--max_new_tokens=6", *args])
        try:
            runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
        except SystemExit as e:
            return str(e.code) if e.code else capsys.readouterr().out
        return capsys.readouterr().out

    main(f"--out={out}")
    task_file.write_text("".join(json.dumps({"turns": [f"Say {i}" if i != 1 else "Something else"]}) + "\n"
                                 for i in range(3)))
    assert "resuming, 2 prompts already done" in main(f"--out={out}")  # prompt 1 changed: decoded again
    with open(out + ".partial.jsonl") as held:  # another run holds the report
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another evaluate.py is writing" in main(f"--out={out}")
    for bad, key in (("--top_p=0", "top_p"), ("--tree_budget=-1", "tree_budget"), ("--turns=-1", "turns"),
                     ("--temperature=-1", "temperature"), ("--num_prompts=-3", "num_prompts")):
        assert main(bad).startswith(f"evaluate: {key} must be"), bad
    assert "is a directory" in main(f"--out={tmp_path}")
    (tmp_path / "empty.jsonl").write_text("")
    assert "no prompts to decode" in main("--task=empty")


def test_cli_device_macro_and_tree_labels(tiny, tmp_path, monkeypatch, capsys):
    """The device default "" resolves to cuda when available, else cpu (recorded in the report); with two tasks
    overall.tau_macro is the mean of the task taus, printed as 'mean of tasks'; tree mode labels rates per depth."""
    from configurator import script_defaults
    assert script_defaults(os.path.join(ROOT, "evaluate.py"))["device"] == ""
    t = tiny["tiny-qwen3"]
    real_drafter("eagle3", t).save_pretrained(str(tmp_path / "drafter"))
    (tmp_path / "one.jsonl").write_text(json.dumps({"turns": ["Say 1"]}) + "\n")
    (tmp_path / "two.jsonl").write_text("".join(json.dumps({"turns": [f"Count to {i}"]}) + "\n" for i in range(2)))
    out = tmp_path / "report.json"
    monkeypatch.setattr("sys.argv", ["evaluate.py", "--task=one,two", f"--data_dir={tmp_path}", "--max_new_tokens=7",
                                     f"--checkpoint={tmp_path / 'drafter'}", "--baseline=False", "--tree_budget=4",
                                     f"--out={out}"])
    runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
    text, rep = capsys.readouterr().out, json.load(open(out))
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert rep["config"]["device"] == want and f"float32 on {want}" in text
    tasks, o = rep["tasks"], rep["overall"]
    assert o["tau_macro"] == pytest.approx((tasks["one"]["tau"] + tasks["two"]["tau"]) / 2)
    assert o["accept_length_deepspec_macro"] == pytest.approx(
        (tasks["one"]["accept_length_deepspec"] + tasks["two"]["accept_length_deepspec"]) / 2)
    assert all(r["accept_length_deepspec"] >= r["tau"] for r in [o, *tasks.values()])
    assert any(line.startswith("mean of tasks") and f"{o['tau_macro']:.2f}" in line for line in text.splitlines())
    assert "per depth" in text and "DeepSpec accept_rate@i" not in text


def test_torchrun_two_ranks_match_one_process(tiny, tmp_path, monkeypatch, capsys):
    """torchrun with 2 CPU ranks (gloo) splits the prompts and merges one report equal to a 1-process run,
    sampled outputs included (per-prompt generators do not depend on the world size)."""
    import subprocess
    import sys
    real_drafter("dflash", tiny["tiny-qwen3"]).save_pretrained(str(tmp_path / "drafter"))
    (tmp_path / "mini.jsonl").write_text("".join(json.dumps({"turns": [f"Say {i}"]}) + "\n" for i in range(3)))
    args = ["--task=mini", f"--data_dir={tmp_path}", f"--checkpoint={tmp_path / 'drafter'}", "--max_new_tokens=10",
            "--temperature=0.7", "--save_outputs", "--baseline=False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "evaluate.py"), *args, f"--out={tmp_path / 'two.json'}"],
                   check=True, env=env, cwd=str(tmp_path), capture_output=True, timeout=120)
    monkeypatch.setattr("sys.argv", ["evaluate.py", *args, f"--out={tmp_path / 'one.json'}"])
    runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
    one, two = (json.load(open(tmp_path / f))["tasks"]["mini"] for f in ("one.json", "two.json"))
    assert one["outputs"] == two["outputs"] and one["prompts"] == two["prompts"] == 3
    assert one["tau"] == two["tau"] and one["accept_rate_conditional"] == two["accept_rate_conditional"]
