"""scheduler.py: STS calibration, SPS profile cleaning, Algorithm 1 vs brute force, exact losslessness
of the early stop (DSpark paper App. A), traces with a real drafter and the concurrency simulator."""
import itertools
import json
import math
import os
import sys
from collections import defaultdict
from fractions import Fraction as F

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scheduler  # noqa: E402
from scheduler import (calibrate, calibration_table, clean_sps, engine_profile, fit_sts, load_calibration,  # noqa
                       record_trace, reliability_diagram, schedule, simulate, sps_lookup, survival, threshold_lengths)


# --- Sequential Temperature Scaling -----------------------------------------------------------

def overconfident(N, K, seed, T=3.0):
    """Rounds whose true conditional acceptance is `true`; the head reports sigmoid(T * logit(true))."""
    g = torch.Generator().manual_seed(seed)
    true = torch.rand(N, K, generator=g, dtype=torch.float64) * 0.9 + 0.05
    acc = (torch.rand(N, K, generator=g, dtype=torch.float64) < true).long().cumprod(1).sum(1)
    return torch.sigmoid(T * torch.logit(true)), acc


def test_sts_lowers_ece_and_keeps_each_positions_order():
    """STS recovers the over-confidence factor position by position, cuts the held-out ECE of the cumulative
    product at every position, and keeps each position's ranking of confidences (and so its AUROC)."""
    conf, acc = overconfident(6000, 4, seed=0)
    temps = fit_sts(conf[:3000], acc[:3000], grid=81, bins=10)
    assert all(2.2 < T < 4.2 for T in temps), temps
    for row in calibration_table(conf[3000:], acc[3000:], temps):
        assert row["ece_after"] < 0.5 * row["ece_before"], row
        assert row["ece_after"] < 0.03, row
    cal = calibrate(conf, temps)
    for k in range(4):
        order = torch.argsort(conf[:, k])
        assert torch.all(torch.diff(cal[order, k]) > 0), f"position {k}: calibration changed the order"
    raw_auc = calibration_table(conf, acc, None)[0]["auroc_before"]
    assert calibration_table(conf, acc, temps)[0]["auroc_after"] == pytest.approx(raw_auc, abs=1e-12)


def test_calibration_file_and_diagram(tmp_path):
    """calibration.json round trip, identity without one, a clear error on a foreign file, a valid PNG."""
    assert load_calibration(str(tmp_path)) is None
    c = torch.tensor([[0.9, 0.6]])
    assert torch.equal(calibrate(c, None), c)
    (tmp_path / "calibration.json").write_text(json.dumps({"format": "nanospec-calibration", "version": 1,
                                                            "temperatures": [2.0, 0.5]}))
    temps = load_calibration(str(tmp_path))
    z = torch.logit(c.double())
    assert torch.allclose(calibrate(c.double(), temps), torch.sigmoid(z / torch.tensor([2.0, 0.5]).double()))
    with pytest.raises(ValueError):
        calibrate(torch.rand(1, 3), temps)  # more positions than temperatures
    (tmp_path / "calibration.json").write_text(json.dumps({"temperatures": [1.0]}))
    with pytest.raises(SystemExit, match="HINT"):
        load_calibration(str(tmp_path))
    conf, acc = overconfident(500, 3, seed=1)
    assert reliability_diagram(str(tmp_path / "r.png"), conf, acc, [3.0, 3.0, 3.0])
    data = (tmp_path / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # written through atomic_path


# --- Algorithm 1 -------------------------------------------------------------------------------

def theta(conf, lengths, sps):
    a = survival(torch.as_tensor(conf))
    return (len(lengths) + sum(float(a[r, :l].sum()) for r, l in enumerate(lengths))) * sps(len(lengths) + sum(lengths))


def test_schedule_equals_brute_force_on_log_concave_sps():
    """With log-concave SPS, Theta is unimodal along the admission path, so Algorithm 1 with its early
    stop reaches the global optimum over all (l_1..l_R) in {0..K}^R."""
    g = torch.Generator().manual_seed(0)
    admitted = 0
    for case in range(150):
        R, K = 1 + case % 3, 3
        conf = torch.rand(R, K, generator=g, dtype=torch.float64)
        al, be = float(torch.rand(1, generator=g)) * 0.6, float(torch.rand(1, generator=g)) * 0.05
        sps = lambda B: 50.0 * math.exp(-al * (B - 1) - be * (B - 1) ** 2)
        best = max(theta(conf, L, sps) for L in itertools.product(range(K + 1), repeat=R))
        L = schedule(conf, sps)
        admitted += sum(L) > 0
        assert theta(conf, L, sps) == pytest.approx(best, rel=1e-12), (conf, al, be, L)
    assert 20 < admitted < 150  # both regimes were exercised


def test_baselines_and_cliff():
    """Threshold = leading slots with c >= threshold; on a jagged SPS the early stop can miss the optimum
    (the price of losslessness, paper s.5.2) while the retrospective search finds it."""
    assert threshold_lengths([[0.9, 0.4, 0.9], [0.3, 0.9, 0.9], [0.6, 0.7, 0.8]], 0.5) == [1, 0, 3]
    sps = {1: 1.0, 2: 0.5, 3: 0.49}.__getitem__
    assert schedule([[0.8, 0.99]], sps) == [0] and schedule([[0.8, 0.99]], sps, early_stop=False) == [2]


# --- losslessness by exact enumeration (Fractions, no sampling) ------------------------------------

def round_outputs(x, l, p, q):
    """One verification of drafts x[:l] (speculative sampling) -> [(emitted tokens, probability)]."""
    outs, stay = [], F(1)
    for j in range(l):
        pt, qd = p(x[:j]), q(x[:j])
        keep = min(F(1), pt[x[j]] / qd[x[j]])
        res = [max(F(0), a - b) for a, b in zip(pt, qd)]
        z = sum(res)
        outs += [(x[:j] + (v,), stay * (1 - keep) * r / z) for v, r in enumerate(res) if r and keep < 1]
        stay *= keep
    return outs + [(x[:l] + (v,), stay * pv) for v, pv in enumerate(p(x[:l])) if pv]  # bonus from the target


def output_law(R, K, V, p, q, c, sps, early_stop, m=2):
    """Exact law of request 0's first m tokens: every request drafts K tokens from q (its confidences c
    depend on the drafted tokens), Algorithm 1 picks lengths, request 0 is verified, and tokens after the
    round come from the target (as the next rounds would give)."""
    law, lengths = defaultdict(F), set()
    for xs in itertools.product(itertools.product(range(V), repeat=K), repeat=R):
        w = math.prod(q(x[:j])[x[j]] for x in xs for j in range(K))
        if not w:
            continue
        L = schedule([[float(c(x[:j])) for j in range(K)] for x in xs], sps, early_stop)
        lengths.add((xs[0][0], L[0]))
        stack = [(y, w * pr) for y, pr in round_outputs(xs[0], L[0], p, q)]
        while stack:
            y, pr = stack.pop()
            if len(y) >= m:
                law[y[:m]] += pr
            else:
                stack += [(y + (v,), pr * pv) for v, pv in enumerate(p(y)) if pv]
    return law, lengths


def target_law(V, p, m=2):
    return {y: math.prod(p(y[:i])[y[i]] for i in range(m)) for y in itertools.product(range(V), repeat=m)}


A, B_ = 0, 1
P_T = {(): (F(7, 10), F(3, 10)), (A,): (F(6, 10), F(4, 10)), (B_,): (F(2, 10), F(8, 10))}
Q_D = {(): (F(1, 2), F(1, 2)), (A,): (F(9, 10), F(1, 10)), (B_,): (F(1, 2), F(1, 2))}
p_app = lambda y: P_T.get(y, (F(1, 2), F(1, 2)))  # the target after two tokens: uniform
q_app = lambda y: Q_D[y]


def test_appendix_a_counterexample_exact():
    """Paper App. A: a_1 = 0.8, SPS = 1, 0.5, 0.45; x_1 = A gives c_2 = 0.9, x_1 = B gives c_2 = 0. Without
    the early stop l depends on x_1 and P(Y_1 = A) = 0.85 != 0.7; with it l = 0 and the law is the target's."""
    c = lambda y: {(): 0.8, (A,): 0.9, (B_,): 0.0}[y]
    sps = {1: 1.0, 2: 0.5, 3: 0.45}.__getitem__
    law, lengths = output_law(1, 2, 2, p_app, q_app, c, sps, early_stop=False)
    assert lengths == {(A, 2), (B_, 0)}
    assert law[(A, A)] + law[(A, B_)] == F(85, 100)
    law, lengths = output_law(1, 2, 2, p_app, q_app, c, sps, early_stop=True)
    assert lengths == {(A, 0), (B_, 0)}
    assert dict(law) == target_law(2, p_app)


def test_early_stop_lossless_when_it_admits_tokens():
    """SPS = 1, 0.9, 0.7: the early stop admits x_1 always and x_2 only after x_1 = A (l depends on the drafted
    x_1, as it may), and the first two output tokens are exactly target-distributed."""
    c = lambda y: {(): 0.8, (A,): 0.9, (B_,): 0.1}[y]
    sps = {1: 1.0, 2: 0.9, 3: 0.7}.__getitem__
    law, lengths = output_law(1, 2, 2, p_app, q_app, c, sps, early_stop=True)
    assert lengths == {(A, 2), (B_, 1)}
    assert dict(law) == target_law(2, p_app)


def test_early_stop_lossless_with_two_requests_random():
    """Two requests share the batch (request 1's drafts move request 0's cut-off), random rational laws
    and jagged SPS: request 0's output is exactly the target's whenever tokens are admitted."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: [F(int(v) + 1, 1) for v in torch.randint(0, 9, (n,), generator=g)]
    norm = lambda w: tuple(x / sum(w) for x in w)
    checked = 0
    for case in range(12):
        V, K, R = 3, 2, 2
        pt = {y: norm(rnd(V)) for n in range(K + 1) for y in itertools.product(range(V), repeat=n)}
        qd = {y: norm(rnd(V)) for n in range(K) for y in itertools.product(range(V), repeat=n)}
        cf = {y: float(rnd(1)[0]) / 10 for n in range(K) for y in itertools.product(range(V), repeat=n)}
        s = sorted((float(v) for v in rnd(R * (K + 1))), reverse=True)
        sps = lambda B: s[B - 1] / B ** 0.3
        law, lengths = output_law(R, K, V, lambda y: pt[y], lambda y: qd[y], lambda y: cf[y], sps, True)
        assert dict(law) == target_law(V, lambda y: pt[y]), case
        checked += any(L > 0 for _, L in lengths)
    assert checked >= 4


# --- SPS profile -------------------------------------------------------------------------------

def test_clean_sps_synthetic_noisy_table():
    """Interpolated in step time, non-increasing in B, never below a measurement; linear time beyond."""
    measured = {1: 100.0, 2: 90.0, 4: 95.0, 8: 60.0, 16: 70.0, 32: 20.0}
    t = clean_sps(measured)
    assert len(t) == 33 and all(t[b] >= t[b + 1] for b in range(1, 32))
    assert all(t[b] >= s for b, s in measured.items())
    assert (t[1], t[2], t[4], t[8], t[16], t[32]) == (100.0, 95.0, 95.0, 70.0, 70.0, 20.0)
    assert t[24] == pytest.approx(1 / ((1 / 70 + 1 / 20) / 2))  # step time halfway between 16 and 32
    assert sps_lookup(t)(64) == pytest.approx(10.0)


def test_engine_profile_tiny_target_and_cache(tmp_path, monkeypatch):
    """A real (tiny) target profile: positive, monotone, cached as JSON; reused when it covers max_batch,
    re-profiled when it does not."""
    from target import load_target
    tgt = load_target("tiny-qwen3")
    path = str(tmp_path / "sps.json")
    table, rec, where = engine_profile(tgt, 8, path=path, context=4, repeats=1)
    assert where == path and sorted(int(b) for b in rec["measured"]) == [1, 2, 3, 4, 6, 8]
    assert len(table) == 9 and all(table[b] >= table[b + 1] > 0 for b in range(1, 8))
    calls = []
    monkeypatch.setattr(scheduler, "profile_sps", lambda t, bs, *a: calls.append(bs) or {b: 1.0 / b for b in bs})
    assert engine_profile(tgt, 6, path=path, context=4)[0] == table and not calls
    engine_profile(tgt, 12, path=path, context=4)
    assert calls == [[1, 2, 3, 4, 6, 8, 12]]


# --- traces and the simulator --------------------------------------------------------------------

def test_simulator_limits():
    """Constant SPS: scheduling verifies everything (= fixed); compute-bound SPS = s/B: it verifies nothing
    (= plain); committed tokens are min(accepted, verified) + 1 per request and step."""
    K, R = 3, 4
    conf = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.2]])
    acc = torch.tensor([3, 1])
    flat = lambda B: 10.0
    fixed = simulate(conf, acc, flat, R, "fixed", steps=10)
    assert fixed["tokens_per_s"] == pytest.approx(10.0 * R * (1 + 2 / 2 + 1)) and fixed["mean_len"] == K
    assert simulate(conf, acc, flat, R, "scheduled", steps=10) == fixed
    assert simulate(conf, acc, flat, R, "plain", steps=10)["tokens_per_s"] == pytest.approx(10.0 * R)
    bound = lambda B: 100.0 / B
    assert simulate(conf, acc, bound, R, "scheduled", steps=10) == simulate(conf, acc, bound, R, "plain", steps=10)
    thr = simulate(conf, acc, flat, 2, "threshold", steps=2, threshold=0.55)  # lengths 3 and 1
    assert thr["mean_len"] == 2.0 and thr["tau"] == pytest.approx((4 + 2) / 2)


def test_record_trace_with_tiny_dspark():
    """A real DSpark drafter on a tiny target: one (conf [K] in (0, 1), accepted in [0, K]) per round, and
    the rounds' accepted drafts plus bonus tokens account for the generated length."""
    from helpers import sharpened_target
    from model_dspark import DSpark
    torch.manual_seed(0)
    tgt = sharpened_target("tiny-qwen3", 20.0)
    d = DSpark.from_target(tgt, block_size=4, num_draft_layers=1, markov_rank=16).eval()
    ids = tgt.render_prompt([{"role": "user", "content": "count to ten"}])
    g = torch.Generator().manual_seed(0)
    rounds = record_trace(tgt, d, ids, 30, 4, temperature=1.0, generator=g)
    assert rounds and all(c.shape == (4,) and 0 < float(c.min()) and float(c.max()) < 1 and 0 <= n <= 4
                          for c, n in rounds)
    conf, acc = torch.stack([c for c, _ in rounds]), torch.tensor([n for _, n in rounds])
    res = simulate(conf, acc, lambda B: 5.0, 1, "fixed", steps=len(rounds))
    assert res["tau"] == pytest.approx(float(acc.double().mean()) + 1)
