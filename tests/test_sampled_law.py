"""evaluate.py at temperature > 0: the output law is the target's, checked with enough power to catch real bugs.

The target is a 2-layer tiny-qwen3 whose next-token law lives on three letters (every other logit is -inf; with
eos=True the end-of-turn token too) and is spread over them, so that drafts are often accepted in full (the bonus
token is observed) and often rejected (the residual is observed). Each run decodes many tokens per prompt; the
check (law_pvalue) scores every generated token against the target's own warped law given the tokens before it,
pooled in cells (two preceding tokens, token): one batched target forward for all runs, one chi-square.

Each deliberate bug below is applied in memory (an evaluate.py function recompiled from its source with one line
changed, monkeypatched in) and must be rejected (p < REJECT) where the real code passes (p > PASS):
wrong bonus row, residual with the wrong slot's draft distribution, top-k/top-p on one side only, a tree path not
gathered into the target cache, tokens after an accepted EOS kept. Also covered: top-k and top-p sampling, EOS
inside accepted chains and tree paths, real drafters (DFlash, DSpark, Eagle3), and turn 2 of an mt-bench prompt
(greedy: equal to plain decoding; sampled: the target's law given the re-rendered conversation)."""
import inspect
import os
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import evaluate as E
import prompts
from conftest import EVAL_DIR
from kernels import logits_to_probs
from target import Target, tiny_config, tiny_tokenizer
from test_evaluate import chi2_pvalue, real_drafter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
PASS, REJECT = 1e-3, 1e-6  # the real code must pass at PASS; each mutation must be rejected far below it
LETTERS = "abc"
K = 2  # drafts per round: chains of 2 (bonus after both kept; residuals at slots 0 and 1), trees of depth <= 2
N_TOKENS = 16  # new tokens per run
MT_BENCH = ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences "
            "and must-see attractions.", "Rewrite your previous response. Start every sentence with the letter A."]


# -----------------------------------------------------------------------------
# a target with a small spread law, a close scripted drafter, the check

def small_target(eos=False, scale=12.0):
    """2-layer tiny-qwen3 (tap: layer 0) whose logits are -inf outside LETTERS (+ the end-of-turn token when eos,
    raised by a logit bias) and whose head is scaled by `scale`: a random head is nearly uniform, this one spreads
    its mass unevenly and depends on the context (the last token most, earlier ones through attention)."""
    tok = tiny_tokenizer()
    cfg = tiny_config("tiny-qwen3", len(tok))
    cfg.num_hidden_layers = 2
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    t = Target(model, tok, "tiny-qwen3-letters", layer_ids=[0])
    t.letters = [tok.convert_tokens_to_ids(c) for c in LETTERS] + ([tok.convert_tokens_to_ids("<|im_end|>")] if eos else [])
    assert not eos or t.letters[-1] in t.eos_token_ids
    mask = torch.full((cfg.vocab_size,), float("-inf"))
    mask[t.letters] = 0.0
    if eos:
        mask[t.letters[-1]] = 4.0  # a logit bias: the turn ends with probability ~1/6 per token (mean over contexts)
    head = model.get_output_embeddings()
    head.weight.data.mul_(scale)
    head.register_forward_hook(lambda module, args, out: out + mask)  # every forward: prefill, verify, plain
    return t


@pytest.fixture(scope="module")
def abc():
    return small_target()


@pytest.fixture(scope="module")
def abc_eos():
    return small_target(eos=True)


def prompt_of(t):
    return torch.tensor(t.tokenizer("ab")["input_ids"])


class Bigram:
    """Scripted drafter close to the target but not equal: q(. | context) = warp(z(last token) + noise), z = the
    target's logits after [prompt, last token] (the target mostly follows its last token), noise fixed per token.
    Tokens are drawn from q and q is returned (propose), as the drafter contract says; next_probs for trees.
    report_warp (a deliberate bug): return q warped this way instead of the q the tokens were drawn from."""

    def __init__(self, t, noise=1.0, report_warp=None):
        with torch.no_grad():
            ids = torch.cat([prompt_of(t).expand(len(t.letters), -1), torch.tensor(t.letters)[:, None]], 1)
            z = t.model(input_ids=ids).logits[:, -1]  # [letters, V], -inf outside the letters
        g = torch.Generator().manual_seed(0)
        self.z = {x: row + noise * torch.randn(row.shape, generator=g) for x, row in zip(t.letters, z)}
        self.proposal_length, self.report_warp, self.memo = K, report_warp, {}

    def q(self, last, warp):
        key = (last, tuple(sorted(warp.items())))
        if key not in self.memo:
            self.memo[key] = logits_to_probs(self.z[last], **warp)
        return self.memo[key]

    def start(self, prompt_ids, taps):
        return {}

    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        warp, last, toks, probs = dict(temperature=temperature, top_k=top_k, top_p=top_p), int(anchor), [], []
        for _ in range(k):
            q = self.q(last, warp)
            probs.append(q if self.report_warp is None else self.q(last, dict(warp, **self.report_warp)))
            last = int(q.argmax()) if temperature == 0 else int(torch.multinomial(q, 1, generator=generator))
            toks.append(last)
        return torch.tensor(toks), torch.stack(probs), None

    def next_probs(self, state, anchor, paths, temperature=0.0, top_k=0, top_p=1.0):
        warp = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        return torch.stack([self.q(int(p[-1]) if len(p) else int(anchor), warp) for p in paths])

    def commit(self, state, ids, taps):
        pass


class Greedy:
    """Scripted greedy drafter backed by the target itself: its greedy continuation of the context (one-hot q),
    the second draft replaced by another letter every other round (full and partial acceptance)."""

    def __init__(self, t):
        self.t, self.proposal_length = t, K

    def start(self, prompt_ids, taps):
        return {"ids": prompt_ids.tolist(), "round": 0}

    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        assert temperature == 0
        ctx, toks = state["ids"] + [int(anchor)], []
        for i in range(k):
            with torch.no_grad():
                x = int(self.t.model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
            if i == 1 and state["round"] % 2:
                x = next(y for y in self.t.letters if y != x)
            toks.append(x)
            ctx.append(x)
        state["round"] += 1
        toks = torch.tensor(toks)
        return toks, torch.nn.functional.one_hot(toks, self.t.model.config.vocab_size).float(), None

    def commit(self, state, ids, taps):
        state["ids"] += ids.tolist()


def decode(t, d, warp, runs, n=N_TOKENS, tree_budget=0, seed=0):
    """`runs` seeded speculative generations of n tokens after prompt_of(t) -> ([(prompt ids, new ids)], [rounds of
    each run: (proposed, accepted, committed)])."""
    g, ids, outs, rounds = torch.Generator().manual_seed(seed), prompt_of(t), [], []
    for _ in range(runs):
        res = E.speculative_generate(t, d, ids, n, num_drafts=K, generator=g, tree_budget=tree_budget, **warp)
        outs.append((ids.tolist(), res["ids"]))
        rounds.append(res["rounds"])
    return outs, rounds


def law_pvalue(t, runs, warp, min_expected=5.0):
    """runs [(prompt ids, new ids)] -> p-value that the new tokens follow the target's warped law.

    Every new token x_i is an event with target law p_i = warp(target logits after prompt + x_<i) (one batched
    forward over all runs) and context c_i = the two tokens before it; cell (c, v) counts the events of context c
    with x_i = v against its expectation sum_i p_i(v) (within a context, cells expected below min_expected are
    pooled). Under the target's law each count minus its expectation is a martingale, and Pearson's statistic is
    chi-square with sum over contexts (cells - 1) degrees of freedom (conservative when the p_i of a context
    differ). It sees a token drawn from a wrong distribution wherever it happens (accepted draft, residual, bonus,
    after a tree round), since each p_i is the target's own. A token the warped target cannot emit (p_i = 0, e.g.
    outside the top-k) or any token after an end-of-turn token gives p = 0."""
    eos = t.eos_token_ids
    if any(x in eos for _, out in runs for x in out[:-1]):
        print("law_pvalue: a token after the end of turn: p = 0")
        return 0.0
    seqs = [p + out[:-1] for p, out in runs]
    width = max(map(len, seqs))
    with torch.no_grad():  # right padding: causal attention, the padded tail never reaches the real positions
        z = t.model(input_ids=torch.tensor([s + [0] * (width - len(s)) for s in seqs])).logits.double()
    cells = {}  # (context, v) -> [observed, expected]
    for (p, out), zr in zip(runs, z):
        probs = logits_to_probs(zr[len(p) - 1:len(p) - 1 + len(out)], **warp).double()  # [len(out), V]
        full = p + out
        for i, x in enumerate(out):
            if probs[i, x] == 0:
                print("law_pvalue: a token the warped target cannot emit: p = 0")
                return 0.0
            ctx = tuple(full[len(p) + i - 2:len(p) + i])
            for v in probs[i].nonzero()[:, 0].tolist():
                c = cells.setdefault((ctx, v), [0, 0.0])
                c[0] += v == x
                c[1] += float(probs[i, v])
    stat, df = 0.0, 0
    for ctx in {c for c, _ in cells}:
        group = sorted((cells[k] for k in cells if k[0] == ctx), key=lambda c: -c[1])
        kept = [list(c) for c in group if c[1] >= min_expected]
        rest = [sum(c[0] for c in group if c[1] < min_expected), sum(c[1] for c in group if c[1] < min_expected)]
        if rest[1] >= min_expected or (rest[1] > 0 and not kept):
            kept.append(rest)
        elif rest[1] > 0:  # too small alone: pooled with the smallest kept cell
            kept[-1] = [kept[-1][0] + rest[0], kept[-1][1] + rest[1]]
        if len(kept) < 2 or kept[-1][1] < min_expected:
            continue  # a context seen too rarely to test
        stat += sum((o - e) ** 2 / e for o, e in kept)
        df += len(kept) - 1
    assert df >= 4, f"law_pvalue: only {df} degrees of freedom; decode more"
    pval = chi2_pvalue(stat, df)
    print(f"law_pvalue: p = {pval:.3g} (chi-square {stat:.1f}, df {df}, {sum(len(o) for _, o in runs)} tokens)")
    return pval


def mutated(fn, old, new):
    """The evaluate.py function fn recompiled from its source with the one occurrence of `old` replaced by `new`,
    its globals evaluate's own (monkeypatch it in: E.<name> = mutated(...))."""
    src = textwrap.dedent(inspect.getsource(fn))
    assert src.count(old) == 1, f"{fn.__name__} no longer contains {old!r}: update this mutation"
    scope = {}
    exec(compile(src.replace(old, new), f"<{fn.__name__} mutated>", "exec"), vars(E), scope)
    return scope[fn.__name__]


MUTATIONS = {  # name -> (evaluate function, line fragment, its broken version)
    "bonus from the previous row": ("verify_chain", "dist = p[k] if n == k", "dist = p[k - 1] if n == k"),
    "residual with the previous slot's q": ("verify_chain", "residual(p[n], q[n].to(p))",
                                            "residual(p[n], q[n - 1].to(p))"),
    "residual resampled from the target": ("verify_chain", "residual(p[n], q[n].to(p))", "p[n]"),
    "chain target unwarped": ("verify_chain", "logits_to_probs(logits, temperature, top_k, top_p)",
                              "logits_to_probs(logits, temperature)"),
    "tree target unwarped": ("verify_tree", "sample_token(logits[path[-1]], temperature, top_k, top_p, generator)",
                             "sample_token(logits[path[-1]], temperature, 0, 1.0, generator)"),
    "drafter unwarped": ("speculative_generate", "stop_ids=eos, **warp)", "stop_ids=eos, temperature=temperature)"),
    "tree path not gathered": ("keep_path", "if path != list(range(len(path))):", "if False:"),
    "tokens after EOS kept": ("settle", "emit = emit[:hit + 1]", "pass"),
}


def mutate(monkeypatch, name):
    fn, old, new = MUTATIONS[name]
    monkeypatch.setattr(E, fn, mutated(getattr(E, fn), old, new))


def full_and_rejected(rounds):
    """Rounds of all runs whose drafts were all kept (a bonus token follows), and rounds with a rejection."""
    flat = [r for run in rounds for r in run]
    return sum(1 for k, n, _ in flat if n == k), sum(1 for k, n, _ in flat if n < k)


# -----------------------------------------------------------------------------
# the tools themselves

def test_law_pvalue_and_mutations_are_well_formed(abc):
    """law_pvalue passes plain target sampling and rejects plain sampling at another temperature; each mutation
    still applies (its line is in evaluate.py, once) and compiles."""
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    ids, g = prompt_of(abc), torch.Generator().manual_seed(0)
    plain = [(ids.tolist(), E.plain_generate(abc, ids, N_TOKENS, generator=g, **warp)[0]) for _ in range(30)]
    assert law_pvalue(abc, plain, warp) > PASS
    hot = [(ids.tolist(), E.plain_generate(abc, ids, N_TOKENS, generator=g, temperature=3.0)[0]) for _ in range(30)]
    assert law_pvalue(abc, hot, warp) < REJECT
    eos = min(abc.eos_token_ids)
    assert law_pvalue(abc, [(ids.tolist(), [abc.letters[0], eos, abc.letters[1]])], warp) == 0.0  # past EOS
    for fn, old, new in MUTATIONS.values():
        assert callable(mutated(getattr(E, fn), old, new))  # each fragment is still there, once


# -----------------------------------------------------------------------------
# chains

@pytest.fixture(scope="module")
def chain_real(abc):
    """The real code's chain runs at temperature 1 (shared by the tests that compare a mutation with it)."""
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    outs, rounds = decode(abc, Bigram(abc), warp, 50)
    return law_pvalue(abc, outs, warp), rounds


def test_chain_law_matches_target(chain_real):
    """Chains of 2 at temperature 1: the output law is the target's; full acceptances (bonus tokens) and rejections
    (residual tokens) both happen often."""
    pval, rounds = chain_real
    full, rejected = full_and_rejected(rounds)
    assert full >= 100 and rejected >= 100, (full, rejected)
    assert pval > PASS, pval


@pytest.mark.parametrize("name", ["bonus from the previous row", "residual with the previous slot's q",
                                  "residual resampled from the target"])
def test_chain_law_catches_broken_rules(abc, chain_real, monkeypatch, name):
    """The bonus token after a fully accepted chain drawn from the previous position's row, the residual
    max(p - q, 0) built with the previous slot's draft distribution, or a rejected slot resampled from p itself:
    each rejected where the real code passes."""
    assert chain_real[0] > PASS
    mutate(monkeypatch, name)
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    pval = law_pvalue(abc, decode(abc, Bigram(abc), warp, 50)[0], warp)
    assert pval < REJECT, (name, pval)


# temperature 2 spreads the law (at 1 the third letter holds ~2.5% on average): the warps then cut real mass
WARPS = {"top_k=2": dict(temperature=2.0, top_k=2, top_p=1.0), "top_p=0.7": dict(temperature=2.0, top_k=0, top_p=0.7)}


@pytest.mark.parametrize("warp", WARPS.values(), ids=WARPS.keys())
def test_top_k_top_p_chain_and_one_sided_warps(abc, monkeypatch, warp):
    """top-k and top-p sampling with chains have the warped target's law. Warping on one side only: the target side
    left unwarped in verify_chain (the drafter warped) is rejected at once, tokens outside the top-k / nucleus come
    out; the drafter left unwarped (the target warped) passes, as it must: speculative sampling is exact for any
    draft law, as long as the drafts are drawn from the q the drafter reports."""
    d = Bigram(abc)
    outs, rounds = decode(abc, d, warp, 50)
    assert min(full_and_rejected(rounds)) >= 100
    assert law_pvalue(abc, outs, warp) > PASS
    with monkeypatch.context() as m:
        mutate(m, "chain target unwarped")
        assert law_pvalue(abc, decode(abc, d, warp, 10)[0], warp) == 0.0
    mutate(monkeypatch, "drafter unwarped")
    assert law_pvalue(abc, decode(abc, d, warp, 40)[0], warp) > PASS


def test_drafter_warped_draws_unwarped_report_is_caught(abc):
    """The draft side's own one-sided warp: a drafter that draws its tokens from the top-p warped q but reports the
    unwarped q to the acceptance rule is rejected (the kept drafts are then over-weighted)."""
    warp = WARPS["top_p=0.7"]
    bad = Bigram(abc, noise=3.0, report_warp=dict(top_k=0, top_p=1.0))
    pval = law_pvalue(abc, decode(abc, bad, warp, 80)[0], warp)
    assert pval < REJECT, pval


# -----------------------------------------------------------------------------
# trees

@pytest.fixture(scope="module")
def tree_real(abc):
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    outs, rounds = decode(abc, Bigram(abc), warp, 50, tree_budget=4)
    return law_pvalue(abc, outs, warp), rounds


def test_tree_law_matches_target(tree_real):
    """Trees of 4 nodes (depth <= 2) at temperature 1: the output law is the target's."""
    pval, rounds = tree_real
    assert sum(1 for run in rounds for k, n, _ in run if n == k == 2) >= 100  # paths to depth 2 accepted
    assert pval > PASS, pval


def test_tree_law_catches_path_not_gathered(abc, tree_real, monkeypatch):
    """keep_path without the gather (the cache keeps the first tree nodes instead of the accepted path's): the
    next rounds see a wrong context, rejected where the real code passes."""
    assert tree_real[0] > PASS
    mutate(monkeypatch, "tree path not gathered")
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    pval = law_pvalue(abc, decode(abc, Bigram(abc), warp, 50, tree_budget=4)[0], warp)
    assert pval < REJECT, pval


def test_top_k_tree_and_target_side_unwarped(abc, monkeypatch):
    """top-k sampling with trees has the warped target's law; verify_tree sampling the target unwarped is rejected."""
    warp = WARPS["top_k=2"]
    assert law_pvalue(abc, decode(abc, Bigram(abc), warp, 40, tree_budget=4)[0], warp) > PASS
    mutate(monkeypatch, "tree target unwarped")
    assert law_pvalue(abc, decode(abc, Bigram(abc), warp, 10, tree_budget=4)[0], warp) == 0.0


# -----------------------------------------------------------------------------
# end of turn inside accepted blocks

@pytest.mark.parametrize("tree_budget", [0, 4], ids=["chain", "tree"])
def test_eos_inside_accepted_blocks(abc_eos, monkeypatch, tree_budget):
    """With the end-of-turn token in the target's support (temperature 1), chains and trees often accept it as a
    draft or path node with more tokens after it in the block: the output stops right after it and still has the
    target's law. Keeping the tokens after it is rejected."""
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    t, d = abc_eos, Bigram(abc_eos)
    outs, rounds = decode(t, d, warp, 120, n=12, tree_budget=tree_budget)
    eos = t.eos_token_ids
    assert all(x not in eos for _, out in outs for x in out[:-1])
    assert all(len(out) == 12 or out[-1] in eos for _, out in outs)
    # EOS kept as a draft / path node with more after it in the round (later drafts, the bonus): all dropped
    inside = sum(1 for (_, out), run in zip(outs, rounds) if out[-1] in eos and run and run[-1][1] == run[-1][2])
    ended = sum(1 for _, out in outs if out[-1] in eos)
    print(f"{ended} of {len(outs)} runs end at EOS, {inside} with EOS kept as a draft / path node")
    assert inside >= 15 and ended >= 80, (inside, ended)
    assert law_pvalue(t, outs, warp) > PASS
    mutate(monkeypatch, "tokens after EOS kept")
    assert law_pvalue(t, decode(t, d, warp, 40, n=12, tree_budget=tree_budget)[0], warp) == 0.0


# -----------------------------------------------------------------------------
# real drafters

@pytest.mark.parametrize("kind", ["dflash", "dspark", "eagle3"])
def test_sampled_law_matches_target(abc, kind):
    """Randomly initialized real drafters (their own caches, q and Markov slot) restricted to the target's letters
    (set_draft_vocab, so that their drafts are sometimes kept): the output law is the target's, chains and trees,
    with top-p for DSpark."""
    warp = dict(temperature=1.0, top_k=0, top_p=0.9 if kind == "dspark" else 1.0)
    d = real_drafter(kind, abc)
    d.set_draft_vocab(abc.letters)
    outs, rounds = decode(abc, d, warp, 30)
    assert min(full_and_rejected(rounds)) >= 30, full_and_rejected(rounds)
    tree_outs, _ = decode(abc, d, warp, 20, tree_budget=4, seed=1)
    pvals = law_pvalue(abc, outs, warp), law_pvalue(abc, tree_outs, warp)
    assert min(pvals) > PASS, (kind, pvals)


# -----------------------------------------------------------------------------
# turn 2 of a multi-turn prompt (mt-bench)

def mt_bench_turns():
    """The first mt-bench prompt (two turns): from the shared eval data when present, else the same text."""
    if os.path.exists(os.path.join(EVAL_DIR, "mt-bench.jsonl")):
        turns = prompts.load_task("mt-bench", EVAL_DIR, num_prompts=1)[0]
        assert len(turns) == 2
        return turns
    return MT_BENCH


def spy_turn_prompts(monkeypatch):
    """Record the prompt ids of every speculative_generate call."""
    seen, real = [], E.speculative_generate

    def spy(target, drafter, prompt_ids, *a, **kw):
        seen.append(prompt_ids.tolist())
        return real(target, drafter, prompt_ids, *a, **kw)
    monkeypatch.setattr(E, "speculative_generate", spy)
    return seen


def turn2_ids(t, turns, answer):
    """Turn 2's prompt: turn 1, the decoded answer (without its end-of-turn token), turn 2."""
    text = t.tokenizer.decode([x for x in answer if x not in t.eos_token_ids], skip_special_tokens=True)
    return t.render_prompt([{"role": "user", "content": turns[0]}, {"role": "assistant", "content": text},
                            {"role": "user", "content": turns[1]}]).tolist()


def test_mt_bench_turn2_greedy_and_sampled(abc, monkeypatch):
    """run_prompt on a two-turn mt-bench prompt: turn 2 is decoded on the conversation with turn 1's speculative
    answer; at temperature 0 both turns equal plain greedy decoding (check_greedy, strict in fp32); at temperature
    1 turn 2's output has the target's law given that conversation."""
    turns = mt_bench_turns()
    seen = spy_turn_prompts(monkeypatch)
    cfg = dict(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=24, check_greedy=True, baseline=True)
    rec = E.run_prompt(abc, Greedy(abc), turns, cfg, K, 0, where="mt-bench[0]")
    assert rec["greedy_checked"] == rec["greedy_matched"] == 2 and rec["turns"] == 2
    assert seen[1] == turn2_ids(abc, turns, rec["outputs"][0])
    assert rec["outputs"][1] == E.plain_generate(abc, torch.tensor(seen[1]), 24)[0]
    assert rec["committed"] > rec["rounds"]  # drafts were accepted
    cfg = dict(cfg, temperature=1.0, max_new_tokens=12, check_greedy=False, baseline=False)
    d = real_drafter("dspark", abc)
    d.set_draft_vocab(abc.letters)
    seen.clear()
    runs = []
    for i in range(30):
        rec = E.run_prompt(abc, d, turns, cfg, K, 1000 * i)
        assert seen[-1] == turn2_ids(abc, turns, rec["outputs"][0])
        runs.append((seen[-1], rec["outputs"][1]))
    assert len({tuple(r[0]) for r in runs}) > 10  # turn 2 prompts differ with turn 1's sampled answer
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    assert law_pvalue(abc, runs, warp) > PASS
