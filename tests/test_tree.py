"""Draft trees: one-forward tree verification (target.py's registered attention), greedy equality, the exact
law of sample-and-descend (enumeration and chi-square), and kernels.tree_attention under the Triton interpreter."""
import os
import subprocess
import sys
import zlib

import pytest
import torch

import evaluate as E
import kernels
from kernels import logits_to_probs
from helpers import sharpened_target
from target import load_target
from test_evaluate import PROMPTS, Distorted, chi2_test, exact_law, ids_of, real_drafter, sampled

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4  # block size of the drafters below (test_evaluate's real_drafter uses the same)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def tiny():
    return {name: load_target(name) for name in ("tiny-qwen3", "tiny-llama")}


@pytest.fixture(scope="module")
def sharp():
    return sharpened_target("tiny-qwen3", 60.0)


def random_tree(n, g, V):
    """n nodes, node 0 = root, random parents (parents first) and tokens (siblings distinct)."""
    parents, tokens = [-1], [int(torch.randint(V, (1,), generator=g))]
    for i in range(1, n):
        parents.append(int(torch.randint(i, (1,), generator=g)))
        taken = {t for t, p in zip(tokens, parents) if p == parents[-1]}
        tokens.append(next(t for t in torch.randperm(V, generator=g).tolist() if t not in taken))
    return tokens, parents


def path_to(parents, i):
    return path_to(parents, parents[i]) + [i] if i >= 0 else []


def tree_logits_check(t, g, atol):
    """Tree forward on a cached prompt vs each root-to-node path run as a plain sequence (logits and taps), then
    keep one path and check the next token's logits; returns the max logit error."""
    prefix = ids_of(t, "Tell me a story")
    tokens, parents = random_tree(11, g, 250)
    _, _, cache = t.forward(prefix[None])
    logits, taps, cache = t.forward(torch.tensor([tokens]), cache, tree=E.ancestors(parents))  # [1, 11, V]
    err = 0.0
    for i in range(len(tokens)):
        seq = torch.cat([prefix, torch.tensor([tokens[j] for j in path_to(parents, i)])])[None]
        ref = t.model(input_ids=seq).logits[0, -1]
        err = max(err, (logits[0, i] - ref).abs().max().item())
        ref_taps, _ = t.features(seq)
        torch.testing.assert_close(taps[0, i], ref_taps[0, -1], rtol=1e-4, atol=atol)
    deep = max(range(len(tokens)), key=lambda i: (len(path_to(parents, i)), i))  # a deep node, rarely contiguous
    path = path_to(parents, deep)
    E.keep_path(cache, path, len(tokens))
    assert cache.get_seq_length() == len(prefix) + len(path)
    nxt, _, _ = t.forward(torch.tensor([[5]]), cache)
    seq = torch.cat([prefix, torch.tensor([tokens[j] for j in path] + [5])])[None]
    err = max(err, (nxt[0, -1] - t.model(input_ids=seq).logits[0, -1]).abs().max().item())
    return err, (prefix, tokens, parents, logits)


# -----------------------------------------------------------------------------
# one forward verifies the whole tree

def test_tree_forward_equals_paths(tiny):
    """Through the registered attention, a tree forward gives each node the logits and taps of its root-to-node
    path run as a plain sequence (fp32), keep_path leaves a cache on which decoding continues exactly; a causal
    (chain) mask instead of the tree gives different logits (the check can fail)."""
    g = torch.Generator().manual_seed(0)
    for name, t in tiny.items():
        err, (prefix, tokens, parents, logits) = tree_logits_check(t, g, atol=1e-5)
        assert err < 1e-4, (name, err)
        assert t.model.config._attn_implementation.startswith("nanospec_")
        _, _, cache = t.forward(prefix[None])
        chain, _, _ = t.forward(torch.tensor([tokens]), cache, tree=torch.ones(11, 11, dtype=torch.bool).tril())
        assert (chain[0] - logits[0]).abs().max() > 1e-2, name
        # without a tree the registered function is the model's own implementation (and its mask): a prefill and
        # a cached 4-token step give exactly the logits of a freshly loaded (unregistered) copy
        fresh, x = load_target(name), prefix[None, :9]
        (a, _, c), (b, _, cf) = t.forward(x[:, :5]), fresh.forward(x[:, :5])
        torch.testing.assert_close(t.forward(x[:, 5:], c)[0], fresh.forward(x[:, 5:], cf)[0], rtol=0, atol=0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert fresh.model.config._attn_implementation == "sdpa"


def test_tree_attention_reference_and_fallback():
    """tree_attention_ref equals SDPA with an independently built mask (GQA 9/3, odd shapes, sliding window), and
    on CPU tensors (no TRITON_INTERPRET) tree_attention is that reference."""
    g = torch.Generator().manual_seed(1)
    tokens, parents = random_tree(11, g, 50)
    P, N, D = 37, 11, 16
    q = torch.randn(9, N, D, generator=g)
    k, v = torch.randn(3, P + N, D, generator=g), torch.randn(3, P + N, D, generator=g)
    for window in (0, 20):
        mask = torch.zeros(N, P + N, dtype=torch.bool)
        for i in range(N):
            pos = P + len(path_to(parents, i)) - 1
            mask[i, :P] = torch.arange(P) > (pos - window if window else -1)
            mask[i, [P + j for j in path_to(parents, i)]] = True
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
        got = kernels.tree_attention_ref(q, k, v, E.ancestors(parents), P, 0.3, window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if not INTERPRETED:
            assert torch.equal(kernels.tree_attention(q, k, v, E.ancestors(parents), P, 0.3, window), got)


# -----------------------------------------------------------------------------
# greedy: tree decoding == plain decoding, token for token

class TreeOracle:
    """Scripted drafter knowing the target's greedy text `full` (prompt + plain output). After a path on `full`,
    next_probs puts 0.45 on a wrong token and 0.35 on the right one (accepted paths run through second children:
    non-contiguous nodes), off `full` it is uniform. one_hot: all mass on the right token, or on a wrong one where
    wrong(position); propose gives that same chain. commit checks the ids, and the taps against the target's
    features when `target` is given."""

    def __init__(self, full, V, one_hot=False, wrong=lambda pos: False, target=None):
        self.full, self.V, self.one_hot, self.wrong, self.target = list(full), V, one_hot, wrong, target
        self.proposal_length = K

    def start(self, prompt_ids, taps):
        return {"n": len(prompt_ids)}

    def q(self, state, anchor, path):
        n, ctx = state["n"], [int(anchor), *map(int, path)]
        pos = n + len(ctx)  # index in `full` of the token to draft
        right = self.full[pos] if pos < len(self.full) and ctx == self.full[n:pos] else None
        q = torch.full((self.V,), 1.0 / self.V)
        if self.one_hot:
            tok = 7 if right is None else (right + 1) % self.V if self.wrong(pos) else right
            return torch.nn.functional.one_hot(torch.tensor(tok), self.V).float()
        if right is not None:
            q = 0.2 * q
            q[(right + 1) % self.V] += 0.45
            q[right] += 0.35
        return q

    def next_probs(self, state, anchor, paths, temperature=0.0, top_k=0, top_p=1.0):
        return torch.stack([self.q(state, anchor, p) for p in paths])

    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        path = ()
        for _ in range(k):
            path += (int(self.q(state, anchor, path).argmax()),)
        toks = torch.tensor(path)
        return toks, torch.nn.functional.one_hot(toks, self.V).float(), None

    def commit(self, state, ids, taps):
        n, m = state["n"], len(ids)
        assert ids.tolist() == self.full[n:n + m] and taps.shape[0] == m
        if self.target is not None:
            ref, _ = self.target.features(torch.tensor(self.full[:n + m])[None])
            torch.testing.assert_close(taps, ref[0, n:n + m], rtol=1e-4, atol=1e-4)
        state["n"] += m


class OneHot:
    """A real drafter whose tree scores are its greedy (one-hot) next_probs: a tree of budget K is its chain."""

    def __init__(self, drafter):
        self.d = drafter

    def __getattr__(self, name):
        return getattr(self.d, name)

    def next_probs(self, state, anchor, paths, **warp):
        return self.d.next_probs(state, anchor, paths)  # temperature 0: one-hot at the argmax


def test_greedy_tree_oracle_deep_paths(tiny):
    """A scripted drafter whose right tokens sit in second children: tree decoding equals plain greedy for several
    budgets and lengths, accepts deep non-contiguous paths, and commits the path's exact target features."""
    for name, t in tiny.items():
        for j, text in enumerate(PROMPTS[:3]):
            ids = ids_of(t, text)
            ref, _ = E.plain_generate(t, ids, 30)
            for budget, n in ((2, 30), (5, 7), (12, 30), (12, 1)):
                d = TreeOracle(ids.tolist() + ref, len(t.tokenizer), target=t if (j, budget) == (0, 5) else None)
                res = E.speculative_generate(t, d, ids, n, num_drafts=K, tree_budget=budget)
                assert res["ids"] == ref[:n], (name, text, budget)
                if n == 30:
                    assert max(r[1] for r in res["rounds"]) >= min(budget // 2, K), res["rounds"]


def test_chain_shaped_tree_reproduces_chain(tiny):
    """tree_budget = block size with one-hot scores grows exactly the chain: identical outputs and rounds as chain
    decoding (scripted drafter with wrong slots, and the three real drafters)."""
    t = tiny["tiny-qwen3"]
    ids = ids_of(t, PROMPTS[1])
    ref, _ = E.plain_generate(t, ids, 25)
    make = lambda: TreeOracle(ids.tolist() + ref, len(t.tokenizer), one_hot=True, wrong=lambda pos: pos % 5 == 0)
    chain = E.speculative_generate(t, make(), ids, 25, num_drafts=K)
    tree = E.speculative_generate(t, make(), ids, 25, num_drafts=K, tree_budget=K)
    assert tree["ids"] == chain["ids"] == ref and tree["rounds"] == chain["rounds"]
    assert len(set(r[1] for r in chain["rounds"])) > 1  # partial acceptance happened
    for kind in ("dflash", "dspark", "eagle3"):
        d = real_drafter(kind, t)
        chain = E.speculative_generate(t, d, ids, 12, num_drafts=K)
        tree = E.speculative_generate(t, OneHot(d), ids, 12, num_drafts=K, tree_budget=K)
        assert tree["ids"] == chain["ids"] == ref[:12] and tree["rounds"] == chain["rounds"], kind


@pytest.mark.parametrize("kind", ["dflash", "dspark", "eagle3"])
def test_greedy_tree_real_drafters(tiny, kind):
    """Randomly initialized real drafters growing trees from next_probs give plain greedy output (both targets,
    budgets 1, 3 and 8)."""
    for name, t in tiny.items():
        d = real_drafter(kind, t)
        for text in PROMPTS[:2]:
            ids = ids_of(t, text)
            ref, _ = E.plain_generate(t, ids, 12)
            for budget in (1, 3, 8):
                assert E.speculative_generate(t, d, ids, 12, tree_budget=budget)["ids"] == ref, (name, budget)


def test_build_tree_best_first():
    """build_tree keeps the highest path probabilities (top candidates of expanded nodes, parents first) within
    the budget and the depth limit; zero-probability candidates never enter."""
    table = {(): [0.0, 0.6, 0.3, 0.1], (1,): [0.6, 0.0, 0.0, 0.4], (2,): [0.0, 0.0, 0.0, 1.0],
             (3,): [1.0, 0.0, 0.0, 0.0]}

    class Table:
        def next_probs(self, state, anchor, paths, **warp):
            return torch.tensor([table[tuple(p)] for p in paths])
    # scores: (1) .6, (1,0) .36, (2) .3, (2,3) .3, (1,3) .24, (3) .1, (3,0) .1
    tokens, parents = E.build_tree(Table(), None, 9, 4, 2, temperature=1.0)
    assert tokens == [9, 1, 0, 2, 3] and parents == [-1, 0, 1, 0, 3]
    tokens, parents = E.build_tree(Table(), None, 9, 10, 2, temperature=1.0)
    assert tokens == [9, 1, 0, 2, 3, 3, 3, 0] and parents == [-1, 0, 1, 0, 3, 1, 0, 6]  # depth <= 2: 7 nodes exist


# -----------------------------------------------------------------------------
# sampling: the law of sample-and-descend is the target's

def target_p(seq, V, sharp):
    """A fixed synthetic target: p(. | seq) = softmax(sharp * z(seq)), z seeded by the context (float64)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(tuple(seq)).encode()))
    return torch.softmax(sharp * torch.randn(V, generator=g, dtype=torch.float64), -1)


class Draw(Exception):
    pass


def enumerated_law(monkeypatch, verify, tokens, parents, V, sharp, L):
    """Exact law {first L emitted tokens: prob} of one verify call on the tree (each target draw it makes is
    branched over with its probability; E.sample_token is scripted), continued by the target itself."""
    logits = torch.stack([target_p([tokens[j] for j in path_to(parents, i)[1:]], V, sharp).log()
                          for i in range(len(tokens))])  # node i: p(. | tokens on its path after the anchor)
    law = {}

    def extend(seq, w):
        if len(seq) >= L:
            law[seq[:L]] = law.get(seq[:L], 0.0) + w
            return
        for x, p in enumerate(target_p(seq, V, sharp).tolist()):
            extend(seq + (x,), w * p)

    def run(script, w):
        calls = []

        def sample(lg, temperature, top_k, top_p, generator):
            if len(calls) == len(script):
                raise Draw(torch.softmax(lg.double(), -1))
            calls.append(script[len(calls)])
            return calls[-1]
        monkeypatch.setattr(E, "sample_token", sample)
        try:
            path, bonus = verify(logits, tokens, parents, 1.0, 0, 1.0, None)
        except Draw as d:
            for x, p in enumerate(d.args[0].tolist()):
                run(script + [x], w * p)
            return
        extend(tuple(tokens[i] for i in path[1:]) + (bonus,), w)
    run([], 1.0)
    return law


@pytest.mark.parametrize("sharp", [0.3, 3.0])
def test_sample_and_descend_exact_by_enumeration(monkeypatch, sharp):
    """Enumerating every target draw of verify_tree on small trees (branching, depth 3) gives exactly the target's
    law of the first 4 tokens (1e-12); two broken rules (a node scored with its parent's logits; descending to the
    first child whenever the sample is any child) fail the same check."""
    V, L = 4, 4
    tokens, parents = [0, 1, 3, 2, 0, 1, 3], [-1, 0, 0, 0, 1, 1, 4]  # root: 1, 3, 2; node 1: 0, 1; node 4: 3
    want = {}
    for i in range(V ** L):
        seq = tuple(i // V ** (L - 1 - j) % V for j in range(L))
        want[seq] = torch.prod(torch.stack([target_p(seq[:j], V, sharp)[seq[j]] for j in range(L)])).item()

    def check(verify):
        got = enumerated_law(monkeypatch, verify, tokens, parents, V, sharp, L)
        return max(abs(got.get(s, 0.0) - p) for s, p in want.items())
    assert check(E.verify_tree) < 1e-12
    real = E.verify_tree

    def parent_logits(logits, toks, pars, *a):  # off by one node: the parent's distribution at each node
        return real(logits[[max(p, 0) for p in pars]], toks, pars, *a)

    def first_child(logits, toks, pars, *a):  # any child counts as the first child
        path = [0]
        while True:
            x = E.sample_token(logits[path[-1]], *a)
            kids = [c for c, p in enumerate(pars) if p == path[-1]]
            if not any(toks[c] == x for c in kids):
                return path, x
            path.append(kids[0])
    for broken in (parent_logits, first_child):
        assert check(broken) > 1e-3, broken.__name__


class TreeDistorted(Distorted):
    """test_evaluate's scripted sampling drafter with next_probs: q(. | context + path)."""

    def next_probs(self, state, anchor, paths, temperature=0.0, top_k=0, top_p=1.0):
        return torch.stack([self.q(state["ctx"] + (int(anchor),) + tuple(map(int, p))) for p in paths])


@pytest.mark.parametrize("kind", ["scripted", "dflash", "dspark", "eagle3"])
def test_sampled_tree_law_matches_target(sharp, kind):
    """Temperature > 0 with trees of 4 nodes (depth <= 2): the first 3 tokens follow the target's exact warped law
    (chi-square p > 1e-3, 300 samples), for a scripted drafter and each randomly initialized real drafter."""
    warp = dict(temperature=1.0, top_k=0, top_p=0.95 if kind == "dspark" else 1.0)
    ids = ids_of(sharp, "Count: 1 2 3")
    law, N = exact_law(sharp, ids, 3, warp), 300
    d = TreeDistorted(sharp, warp) if kind == "scripted" else real_drafter(kind, sharp)
    pval, cells = chi2_test(sampled(sharp, d, ids, 3, warp, N, tree_budget=4), law, N)
    assert cells >= 8 and pval > 1e-3, (kind, pval, cells)


def test_sampled_tree_law_test_has_power(sharp, monkeypatch):
    """The same chi-square check rejects a plausible broken tree rule: try the children in order, keep each with
    its target probability p(c) (SpecInfer without the residual), else draw from the target."""
    def naive(logits, tokens, parents, temperature, top_k, top_p, generator):
        path = [0]
        while True:
            p = logits_to_probs(logits[path[-1]], temperature, top_k, top_p)
            kids = [c for c, q in enumerate(parents) if q == path[-1]]
            c = next((c for c in kids if float(torch.rand((), generator=generator)) < p[tokens[c]]), None)
            if c is None:
                return path, int(torch.multinomial(p, 1, generator=generator))
            path.append(c)
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    ids = ids_of(sharp, "Count: 1 2 3")
    law, N = exact_law(sharp, ids, 3, warp), 400
    monkeypatch.setattr(E, "verify_tree", naive)
    pval, _ = chi2_test(sampled(sharp, TreeDistorted(sharp, warp), ids, 3, warp, N, tree_budget=4), law, N)
    assert pval < 1e-3, pval


# -----------------------------------------------------------------------------
# the Triton kernel under the interpreter (a child process: TRITON_INTERPRET must be set before triton's import)

@pytest.mark.skipif(not INTERPRETED, reason="run by test_tree_kernel_interpreter_in_subprocess")
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_tree_kernel_matches_ref(D, dtype):
    """Triton tree attention (GQA 9/3, prefix 37, 11 nodes, 3 key splits, a sliding window whose first split sees
    nothing, non-contiguous q) matches the reference; bf16 inputs are upcast after loading."""
    g = torch.Generator().manual_seed(D)
    tokens, parents = random_tree(11, g, 50)
    q = torch.randn(11, 9, D, generator=g).to(dtype).transpose(0, 1)  # [9, 11, D] as HF hands it over
    k, v = (torch.randn(3, 48, D, generator=g).to(dtype) for _ in range(2))
    for window in (0, 20):
        got = kernels.tree_attention(q, k, v, E.ancestors(parents), 37, D ** -0.5, window)
        assert type(kernels._TRITON[("tree", True)]).__name__ == "InterpretedFunction"  # the kernel really ran
        want = kernels.tree_attention_ref(q.float(), k.float(), v.float(), E.ancestors(parents), 37, D ** -0.5, window)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not INTERPRETED, reason="run by test_tree_kernel_interpreter_in_subprocess")
def test_interpreted_tree_forward():
    """A tiny-qwen3 tree forward through the interpreted kernel equals the per-path plain sequences."""
    err, _ = tree_logits_check(load_target("tiny-qwen3"), torch.Generator().manual_seed(0), atol=1e-5)
    assert err < 1e-4, err


@pytest.mark.skipif(INTERPRETED, reason="this is the parent of the interpreted run")
def test_tree_kernel_interpreter_in_subprocess():
    """Runs the interpreted tree-kernel cases in a child process with TRITON_INTERPRET=1; all must pass."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                           "-k", "interpreted"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and "5 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_bench_tree_cpu(tmp_path):
    """`bench.py tree` on CPU at tiny scale: attention rows (reference vs SDPA agree), then chain vs tree decoding
    rows (equal budget = block size, and a larger one) whose greedy outputs equal the chain's, as JSON."""
    import json
    import bench
    out = tmp_path / "tree.json"
    bench.main(["tree", "--device=cpu", "--target=tiny-qwen3", f"--checkpoint={tmp_path}", "--num_prompts=1",
                "--max_new_tokens=8", "--prefix", "40", "--nodes", "8", "--repeats=1", "--budgets", "0", "12",
                f"--out={out}"])
    r = json.load(open(out))["results"]
    assert r["attention"][0]["sdpa_max_err"] < 1e-5 and r["attention"][0]["ref_ms"] > 0
    rows = r["decode"]["rows"]
    assert [x["mode"] for x in rows] == ["chain 7", "tree 7", "tree 12"]
    assert all(x["same_output_as_chain"] and x["tau"] >= 1 and x["tokens_per_s"] > 0 for x in rows)
