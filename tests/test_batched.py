"""scheduler.batched_generate: R requests decoded together (one drafter forward, one ragged target verify per
round) under the four policies, and evaluate.py's --policy/--batch_size. Greedy output equals each request's plain
greedy decoding; sampled output has the target's law (law_pvalue of test_sampled_law.py); the deliberate bugs
below (cache not compacted, padded cache columns seen, shared positions, a confidence that peeks at its own draft)
are each caught where the real code passes."""
import inspect
import json
import os
import runpy
import textwrap

import pytest
import torch

import scheduler as S
from conftest import ROOT
from evaluate import plain_generate
from helpers import sharpened_target
from target import new_drafter
from test_sampled_law import PASS, REJECT, Bigram, law_pvalue, prompt_of

pytestmark = pytest.mark.usefixtures("one_thread")
POLICIES = ("plain", "fixed", "threshold", "scheduled")
SPS = lambda B: 100.0 / (1 + 0.2 * B)  # noqa: E731  # steps/s falling with the verify batch: Algorithm 1 trades


def mutated(fn, old, new):
    """The scheduler.py function fn recompiled with the one occurrence of `old` replaced by `new`."""
    src = textwrap.dedent(inspect.getsource(fn))
    assert src.count(old) == 1, f"{fn.__name__} no longer contains {old!r}: update this mutation"
    scope = {}
    exec(compile(src.replace(old, new), f"<{fn.__name__} mutated>", "exec"), vars(S), scope)
    return scope[fn.__name__]


# -----------------------------------------------------------------------------
# greedy: every request equals its own plain decoding

class Scripted:
    """Target-backed greedy drafter with confidences: drafts the target's greedy continuation of its own context,
    a wrong token at slot (round + request) mod 6 (none when that is >= 4), so that requests accept
    different lengths; c_j is drawn
    from a fixed generator before slot j (it never looks at the draft). has_confidence: threshold/scheduled run."""
    has_confidence, proposal_length = True, 4

    def __init__(self, t):
        self.t, self.g = t, torch.Generator().manual_seed(0)

    def start(self, prompt_ids, taps):
        return {"ids": prompt_ids.tolist(), "round": 0, "who": int(prompt_ids.sum()) % 3}

    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        ctx, toks = state["ids"] + [int(anchor)], []
        for i in range(k):
            with torch.no_grad():
                x = int(self.t.model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
            if (state["round"] + state["who"]) % 6 == i:  # slot i wrong; rounds 4, 5 (mod 6) all right
                x = (x + 1) % self.t.config.vocab_size
            toks.append(x)
            ctx.append(x)
        state["round"] += 1
        toks = torch.tensor(toks)
        q = torch.nn.functional.one_hot(toks, self.t.config.vocab_size).float()
        return toks, q, torch.rand(k, generator=self.g) * 0.6 + 0.4

    def commit(self, state, ids, taps):
        state["ids"] += ids.tolist()


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-gemma4"])
def tgt(request):
    return sharpened_target(request.param, 20.0)


def prompts_for(t, lengths=(5, 23, 3, 30, 11)):  # ragged, some longer than tiny-gemma4's sliding window (16)
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, t.config.vocab_size, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_greedy_equals_plain(tgt, policy):
    """5 ragged requests, 24 new tokens each, under every policy: each output equals its own batch-1 plain greedy
    decoding; with drafts, requests accept different lengths in the same rounds (full and partial acceptance)."""
    ps = prompts_for(tgt)
    plain = [plain_generate(tgt, p, 24)[0] for p in ps]
    res, tm = S.batched_generate(tgt, Scripted(tgt), ps, 24, policy, sps=SPS)
    assert [r["ids"] for r in res] == plain
    assert tm["total_s"] >= tm["draft_s"] + tm["verify_s"] > 0
    rounds = [rd for r in res for rd in r["rounds"]]
    if policy == "plain":
        assert all(rd == (0, 0, 1) for rd in rounds)
    else:
        assert any(n == k > 0 for k, n, _ in rounds) and any(n < k for k, n, _ in rounds)
        assert len({r["verified"] for r in res}) > 1


MUTATIONS = {  # name -> (line fragment of batched_generate, its broken version)
    "kept tokens not moved next to the cache": ("t[i, :, lens[r]:lens[r] + n_acc + 1] = t[i, :, P:P + n_acc + 1].clone()",
                                                "pass"),
    "padded cache columns seen": ("(torch.arange(P) < base[:, None, None])", "(torch.arange(P) < P)"),
    "one position for all rows": ("qpos = base[:, None] + torch.arange(M)", "qpos = P + torch.arange(M).expand(A, M)"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_batched_greedy_catches_broken_bookkeeping(monkeypatch, name):
    """Each bookkeeping bug of the ragged batch makes some request differ from its plain decoding."""
    t = sharpened_target("tiny-qwen3", 20.0)
    ps = prompts_for(t)
    plain = [plain_generate(t, p, 24)[0] for p in ps]
    monkeypatch.setattr(S, "batched_generate", mutated(S.batched_generate, *MUTATIONS[name]))
    res, _ = S.batched_generate(t, Scripted(t), ps, 24, "fixed")
    assert [r["ids"] for r in res] != plain, name


@pytest.mark.parametrize("kind", ["dspark", "dflash"])
def test_propose_batch_equals_propose(kind):
    """One backbone forward for R requests (contexts of different lengths, each block seeing its own context only)
    drafts what propose drafts request by request: tokens, distributions and confidences."""
    t = sharpened_target("tiny-qwen3", 20.0)
    torch.manual_seed(0)
    d = new_drafter(kind, t, {"num_draft_layers": 2, "block_size": 4, "markov_rank": 16}).eval()
    ps = prompts_for(t)
    states = [d.start(p, t.forward(p[None])[1][0]) for p in ps]
    anchors = [int(p[-1]) for p in ps]
    for temperature in (0.0, 1.0):
        gens = [torch.Generator().manual_seed(i) for i in range(len(ps))]
        batch = d.propose_batch(states, anchors, 3, temperature, generators=gens)
        for i, (st, a) in enumerate(zip(states, anchors)):
            st["memo"] = {}
            one = d.propose(st, a, 3, temperature, generator=torch.Generator().manual_seed(i))
            assert torch.equal(batch[i][0], one[0])
            torch.testing.assert_close(batch[i][1], one[1], atol=1e-5, rtol=1e-4)
            if kind == "dspark":
                torch.testing.assert_close(batch[i][2], one[2], atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# sampled: the target's law under every policy, and a confidence that peeks is caught

class ConfBigram(Bigram):
    """test_sampled_law's Bigram drafter with a confidence per slot read from the distribution the draft is drawn
    from (its top probability), i.e. from the tokens before the slot, as DSpark's c_j (Appendix A).
    peek (a deliberate bug): c_j is high iff the drawn draft x_j is the first letter."""
    has_confidence = True

    def __init__(self, t, peek=False, noise=1.0):
        super().__init__(t, noise)
        self.peek, self.first = peek, t.letters[0]

    def propose(self, state, anchor, k, temperature=0.0, top_k=0, top_p=1.0, generator=None, stop_ids=None):
        toks, probs, _ = super().propose(state, anchor, k, temperature, top_k, top_p, generator, stop_ids)
        if self.peek:
            return toks, probs, (toks == self.first).float() * 0.98 + 0.01
        return toks, probs, probs.max(1).values


def decode_batched(t, d, policy, groups, R=4, n=16, seed=0):
    runs, rounds = [], []
    for j in range(groups):
        gens = [torch.Generator().manual_seed(seed + 100 * j + r) for r in range(R)]
        res, _ = S.batched_generate(t, d, [prompt_of(t)] * R, n, policy, generators=gens, temperature=1.0, sps=SPS,
                                    threshold=0.8)
        runs += [(prompt_of(t).tolist(), r["ids"]) for r in res]
        rounds += [rd for r in res for rd in r["rounds"]]
    return runs, rounds


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_sampled_law(abc, policy):
    """4 requests at a time at temperature 1, 48 runs of 16 tokens: the output law is the target's; with drafts,
    full acceptances and rejections both happen, and the lengths vary under threshold/scheduled."""
    runs, rounds = decode_batched(abc, ConfBigram(abc), policy, 12)
    if policy != "plain":
        assert sum(1 for k, n, _ in rounds if n == k > 0) >= 30 and sum(1 for k, n, _ in rounds if n < k) >= 30
    if policy in ("threshold", "scheduled"):
        assert len({k for k, _, _ in rounds}) >= 2
    assert law_pvalue(abc, runs, dict(temperature=1.0, top_k=0, top_p=1.0)) > PASS


def test_confidence_that_peeks_at_its_draft_is_caught(abc):
    """Verifying a draft only when its own token looks good (c_j computed from x_j: what Algorithm 1's early stop
    rules out) biases the output: with a drafter close to the target (no noise: q ~ p) a verified first letter is
    nearly always kept and an unverified round draws it again from p, so it comes out ~p(2 - p) of the time.
    Rejected where the honest confidence passes, with the same drafter."""
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    assert law_pvalue(abc, decode_batched(abc, ConfBigram(abc, noise=0.0), "threshold", 12)[0], warp) > PASS
    assert law_pvalue(abc, decode_batched(abc, ConfBigram(abc, True, 0.0), "threshold", 24)[0], warp) < REJECT


@pytest.fixture(scope="module")
def abc():
    from test_sampled_law import small_target
    return small_target()


# -----------------------------------------------------------------------------
# evaluate.py --policy / --batch_size

def test_cli_batched_policies_and_refusals(tmp_path, monkeypatch, capsys):
    """evaluate.py decodes the prompts R at a time: greedy outputs checked (strict) against plain batched decoding,
    the verify length reported (prop); bad combinations stop before any decoding with one line naming the fix."""
    t = sharpened_target("tiny-qwen3", 20.0)
    torch.manual_seed(0)
    ckpt = tmp_path / "drafter"
    new_drafter("dspark", t, {"num_draft_layers": 1, "block_size": 4, "markov_rank": 16}).save_pretrained(str(ckpt))
    (tmp_path / "mini.jsonl").write_text("".join(json.dumps({"turns": [f"Say {i}"]}) + "\n" for i in range(3)))
    (tmp_path / "multi.jsonl").write_text(json.dumps({"turns": ["Hi", "Again"]}) + "\n")
    monkeypatch.setenv("HOME", str(tmp_path))  # the SPS profile's cache
    base = ["evaluate.py", "--task=mini", f"--data_dir={tmp_path}", f"--checkpoint={ckpt}", "--target=tiny-qwen3",
            "--max_new_tokens=12"]

    def main(*args):
        monkeypatch.setattr("sys.argv", base + list(args))
        try:
            runpy.run_path(os.path.join(ROOT, "evaluate.py"), run_name="__main__")
        except SystemExit as e:
            return str(e)
    assert "calibration.json" in main("--policy=scheduled")  # before any decoding
    assert "--turns=1" in main("--task=multi", "--batch_size=2")
    assert "tree_budget" in main("--batch_size=2", "--tree_budget=4")
    assert "one of plain" in main("--policy=sometimes")
    (ckpt / "calibration.json").write_text(json.dumps({"format": "nanospec-calibration", "version": 1,
                                                      "temperatures": [1.0] * 4}))
    capsys.readouterr()
    for policy in POLICIES:
        out = tmp_path / f"{policy}.json"
        assert main(f"--policy={policy}", "--batch_size=2", "--check_greedy", f"--out={out}") is None
        rep = json.load(open(out))["overall"]
        assert rep["prompts"] == 3 and rep["greedy_match_rate"] == 1.0 and rep["tokens_per_s"] > 0
        assert (rep["mean_proposal_len"] == 0) == (policy == "plain")
    assert os.listdir(tmp_path / ".cache" / "nanospec" / "sps")  # scheduled profiled the target once


def test_scheduler_cli_sglang_calibration_and_measured_table(tmp_path, monkeypatch, capsys):
    """scheduler.py end to end on a tiny target: calibration.json carries SGLang's STS fields (--speculative-dspark-
    confidence-sts-path reads temperatures, dataset, num_samples, ece_before, ece_after), and the measured table
    decodes the held-out prompts for real under every policy next to the simulated one."""
    t = sharpened_target("tiny-qwen3", 20.0)
    torch.manual_seed(0)
    ckpt = tmp_path / "drafter"
    new_drafter("dspark", t, {"num_draft_layers": 1, "block_size": 4, "markov_rank": 16}).save_pretrained(str(ckpt))
    (tmp_path / "mini.jsonl").write_text("".join(json.dumps({"turns": [f"Count to {i}"]}) + "\n" for i in range(4)))
    out = tmp_path / "report.json"
    monkeypatch.setattr("sys.argv", ["scheduler.py", f"--checkpoint={ckpt}", "--target=tiny-qwen3", "--task=mini",
                                     f"--data_dir={tmp_path}", "--calib_prompts=2", "--heldout_prompts=2",
                                     "--max_new_tokens=12", "--concurrency=[1]", "--measure=[1,2]",
                                     "--fixed_lengths=[2]", f"--sps_file={tmp_path / 'sps.json'}", f"--out={out}"])
    runpy.run_path(os.path.join(ROOT, "scheduler.py"), run_name="__main__")
    cal = json.load(open(ckpt / "calibration.json"))
    assert len(cal["temperatures"]) == 4 and all(isinstance(x, float) and x > 0 for x in cal["temperatures"])
    assert cal["dataset"] == "mini" and isinstance(cal["num_samples"], int) and cal["num_samples"] > 0
    assert all(isinstance(cal[k], float) for k in ("ece_before", "ece_after"))
    measured = json.load(open(out))["measured"]
    assert {(m["R"], m["policy"], m["drafts"]) for m in measured} == \
        {(R, p, 4) for R in (1, 2) for p in POLICIES} | {(1, "fixed", 2)}
    assert all(m["tokens_per_s"] > 0 and m["tau"] >= 1 for m in measured)
    text = capsys.readouterr().out
    assert "SIMULATED" in text and "MEASURED" in text and "fixed chains of 2" in text
