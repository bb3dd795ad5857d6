"""build_cache.py: prompts, regeneration (in-process and over HTTP), shards, reader, dry run, resume.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_build_cache.py
"""
import glob
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_cache as bc  # noqa: E402
import prompts  # noqa: E402
from conftest import EVAL_DIR  # noqa: E402
from target import load_target  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# the CLI settings of the tiny runs; the in-process fixture below mirrors them
N, NEW, BS, SEED, MIN_SUP = 6, 20, 4, 0, 4
CLI = ["configs/tiny.py", "--target=tiny-qwen3", f"--num_answers={N}", f"--gen_max_new_tokens={NEW}", "--max_len=4096",
       f"--gen_batch_size={BS}", f"--min_supervised={MIN_SUP}", "--cache_dtype=fp8", f"--seed={SEED}", "--device=cpu"]
GEN = dict(max_new_tokens=NEW, temperature=0.7, top_p=0.8, top_k=20)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is 10-100x slower with 2 threads on a shared 2-core box
    yield load_target("tiny-qwen3")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chatty(tiny):
    """The tiny target with a +0.3 logit bias on <|im_end|>: about half its answers stop within a dozen
    tokens, greedy or sampled, so multi-turn conversations continue (the plain tiny target never stops)."""
    t = load_target("tiny-qwen3")
    head = t.model.lm_head
    t.model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True).requires_grad_(False)
    t.model.lm_head.weight.copy_(head.weight)
    t.model.lm_head.bias.zero_()[t.tokenizer.convert_tokens_to_ids("<|im_end|>")] = 0.3
    return t


def build(tiny, cache_dir, rows, cache_dtype="fp8", shard_tokens=1_000_000):
    part = bc.build_features(tiny, rows, cache_dir, 0, cache_dtype, 4096, MIN_SUP, shard_tokens, True)
    bc.write_manifest(tiny, cache_dir, [part], {"cache_dtype": cache_dtype, "max_len": 4096, "min_supervised": MIN_SUP})
    return bc.CacheReader(cache_dir)


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    """Answers for N builtin prompts, and a bf16 and an fp8 cache of them, built in-process."""
    d = tmp_path_factory.mktemp("cache")
    convs = bc.load_prompts("builtin", N, SEED)
    bc.generate_answers(tiny, convs, list(range(N)), str(d / "answers.jsonl"), batch_size=BS, seed=SEED, **GEN)
    rows = bc.read_answers(str(d / "answers.jsonl"))
    return {"dir": d, "convs": convs, "rows": rows,
            "bf16": build(tiny, str(d / "bf16"), rows, "bf16"), "fp8": build(tiny, str(d / "fp8"), rows, "fp8")}


def fp8_bound(x, n):
    """|decode(encode(x)) - x| <= 2^-4 |x| + 2^-10 amax/448 per element (derivation in encode_features)."""
    amax = x.reshape(len(x), n, -1).abs().amax(-1, keepdim=True).expand(-1, -1, x.shape[-1] // n).reshape(x.shape)
    return 2 ** -4 * x.abs() + 2 ** -10 * amax / 448 + 1e-6 * x.abs()  # + fp32 rounding of x/s and q*s


def test_builtin_prompts_deterministic_varied_and_disjoint_from_eval():
    """Builtin prompts: same seed same list, other seed other list, thousands distinct, several
    templates and some multi-turn; no prompt equals or is contained in an eval prompt (or vice versa)."""
    a, b, c = bc.builtin_prompts(3000, 0), bc.builtin_prompts(3000, 0), bc.builtin_prompts(3000, 1)
    assert a == b and a != c
    firsts = [conv[0]["content"] for conv in a]
    assert len(set(firsts)) == 3000 and len({f.split()[0] for f in firsts}) >= 10
    assert 200 < sum(len(conv) > 1 for conv in a) < 900
    files = glob.glob(os.path.join(EVAL_DIR, "*.jsonl"))
    if not files:
        pytest.skip(f"no eval prompts in {EVAL_DIR}")
    evals = [t for f in files for line in open(f) for t in json.loads(line)["turns"]]
    mine = {m["content"] for conv in a + c for m in conv}
    assert not mine & set(evals)
    sentences = lambda texts: {s.strip() for t in texts for s in re.split(r"[.?!\n]", t) if len(s.strip()) > 25}
    # the two instructions DeepSpec's eval wraps around gsm8k and humaneval questions are shared on purpose
    wrappers = {"Please reason step by step, and put your final answer within \\boxed{}",
                "Write a solution to the following problem and make sure that it passes the tests:"}
    assert sentences(mine) & sentences(evals) == wrappers
    blob = "\x00".join(mine)
    assert not [e for e in evals if len(e) > 25 and e in blob]


def test_fp8_error_bound_and_bf16_exact():
    """fp8 e4m3 with a scale per (token, layer) stays within 2^-4|x| + 2^-10 amax/448 of x (and the bound
    is nearly reached, so a coarser format would fail); bf16 equals a plain bf16 cast bit for bit."""
    torch.manual_seed(0)
    T, n, H = 37, 5, 48
    mag = 10 ** (torch.rand(T, n, 1) * 10 - 6)  # per (token, layer) magnitudes from 1e-6 to 1e4
    x = (torch.randn(T, n, H) * mag).reshape(T, n * H)
    x[0, :H] = 0  # an all-zero layer
    x[1, 3] = 1e-30  # a value deep below its row's amax
    payload, scales = bc.encode_features(x, n, "fp8")
    assert payload.dtype == torch.float8_e4m3fn and scales.shape == (T, n) and scales.dtype == torch.float32
    y = bc.decode_features(payload, scales, n)
    err = (y - x).abs()
    assert (err <= fp8_bound(x, n)).all()
    normal = x.abs() > 2 ** -6 * fp8_bound(x, n).max()  # not needed to be tight, only some elements
    assert (err[normal] / x.abs()[normal]).max() > 2 ** -5
    p16, s16 = bc.encode_features(x, n, "bf16")
    assert s16 is None and torch.equal(bc.decode_features(p16, s16, n), x.to(torch.bfloat16).float())
    with pytest.raises(ValueError):
        bc.encode_features(x, n, "fp16")


def test_bf16_cache_is_bit_exact_and_last_hidden_only_where_read(tiny, cache):
    """A bf16 cache returns exactly the bf16 cast of target.features recomputed now: taps at every token,
    last_hidden where hidden_mask = 1 and zeros elsewhere; ids and loss mask equal the rendering."""
    reader = cache["bf16"]
    assert len(reader) == N and [reader[i]["sample_id"] for i in range(N)] == list(range(N))
    for i in range(N):
        rec, row = reader[i], cache["rows"][i]
        ids, loss_mask, hidden_mask = bc.render_sample(tiny, row["messages"], 4096, row["finish_reason"] == "length")
        taps, last = tiny.features(ids[None])
        assert torch.equal(rec["input_ids"], ids) and torch.equal(rec["loss_mask"], loss_mask)
        assert torch.equal(rec["taps"], taps[0].to(torch.bfloat16).float())
        lab = hidden_mask.bool()
        assert lab.sum() >= MIN_SUP - 1 and (~lab).any()
        assert torch.equal(rec["last_hidden"][lab], last[0][lab].to(torch.bfloat16).float())
        assert (rec["last_hidden"][~lab] == 0).all()


def test_fp8_cache_within_bound_and_online_rounds_nothing(tiny, cache):
    """make_record (online mode) gives the reader's ids, masks and layout with the target's own (unrounded)
    features: their bf16 / fp8 roundings are the cached tensors; fp8 taps stay within the e4m3 bound."""
    for dt in ("bf16", "fp8"):
        for i in (0, N - 1):
            row, rec = cache["rows"][i], cache[dt][i]
            online = bc.make_record(tiny, row["messages"], row["sample_id"], 4096, row["finish_reason"] == "length")
            assert online.keys() == rec.keys()
            assert all(torch.equal(online[k], rec[k]) for k in ("input_ids", "loss_mask"))
            for k, n in (("taps", 5), ("last_hidden", 1)):
                rounded = bc.decode_features(*bc.encode_features(online[k], n, dt), n)
                keep = rec[k].abs().sum(-1) > 0  # last_hidden: rows outside hidden_mask are zeros in both
                assert torch.equal(rounded[keep], rec[k][keep]) and (online[k][~keep] == 0).all()
                assert not torch.equal(online[k], rec[k])  # the cache rounds, online does not
    rec = cache["fp8"][2]
    taps = tiny.features(rec["input_ids"][None])[0][0]
    assert (rec["taps"] - taps).abs().max() > 0 and ((rec["taps"] - taps).abs() <= fp8_bound(taps, 5)).all()


def test_truncated_answer_end_of_turn_not_supervised(tiny):
    """An answer cut by max_new_tokens keeps its think block and content supervised but not the end of turn
    (<|im_end|> and the newline after it: DeepSpec's Qwen mask ends with both)."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    _, full, _ = bc.render_sample(tiny, msgs, 4096, False)
    ids, cut, _ = bc.render_sample(tiny, msgs, 4096, True)
    dec = lambda m: tiny.tokenizer.decode(ids[m.bool()])  # noqa: E731
    assert dec(full) == "<think>\n\n</think>\n\nhello there<|im_end|>\n"
    assert dec(cut) == "<think>\n\n</think>\n\nhello there"


def test_hidden_mask_serves_both_drafters():
    """hidden_mask = every position a drafter reads last_hidden at: t+1 supervised (DSpark/DFlash slot targets)
    or t-1 supervised (Eagle3: loss_mask[t+k] scored against last_hidden[t+k+1]), at the start, the middle, the
    end and with two spans."""
    for lm, want in (([1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]), ([0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]),
                     ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]), ([0, 1, 0, 0, 1, 0], [1, 0, 1, 1, 0, 1])):
        lm = torch.tensor(lm)
        got = bc.hidden_mask_of(lm)
        assert got.tolist() == want
        dspark = torch.cat([lm[1:], lm.new_zeros(1)])  # last_hidden[t] with x_{t+1} supervised
        eagle3 = torch.cat([lm.new_zeros(1), lm[:-1]])  # last_hidden[t+k+1] with loss_mask[t+k] set
        assert torch.equal(got, dspark | eagle3)


def test_answers_resume_after_kill_and_independent_of_batching(chatty, tmp_path, monkeypatch):
    """A run killed after k batches (plus a half-written line) and restarted writes the same file as an
    uninterrupted run; a different batch size gives the same answers (seeded per sample), another seed
    other answers; source assistant turns are replaced and a truncated turn ends its conversation."""
    convs = bc.builtin_prompts(7, 3)
    for i in (1, 2, 3, 5):
        convs[i] = convs[i][:1] + [{"role": "assistant", "content": "old"}, {"role": "user", "content": "And then?"}]
    full, other, killed = str(tmp_path / "full.jsonl"), str(tmp_path / "other.jsonl"), str(tmp_path / "killed.jsonl")
    kw = dict(max_new_tokens=20, temperature=0.7, top_p=0.8, top_k=20, seed=5)
    bc.generate_answers(chatty, convs, list(range(7)), full, batch_size=3, **kw)
    bc.generate_answers(chatty, convs, list(range(7)), other, batch_size=2, **kw)
    assert open(full).read() == open(other).read()
    bc.generate_answers(chatty, convs, list(range(7)), str(tmp_path / "seed6.jsonl"), batch_size=3, **{**kw, "seed": 6})
    assert open(full).read() != open(str(tmp_path / "seed6.jsonl")).read()
    rows = bc.read_answers(full)
    assert [r["sample_id"] for r in rows] == list(range(7))
    assert sum(len(m["content"]) for r in rows for m in r["messages"] if m["role"] == "assistant") > 20
    for i in (1, 2, 3, 5):
        roles = [m["role"] for m in rows[i]["messages"]]
        assert "old" not in [m["content"] for m in rows[i]["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"] or (roles == ["user", "assistant"]
                                                                       and rows[i]["finish_reason"] == "length")
    assert any(len(rows[i]["messages"]) == 4 for i in (1, 2, 3, 5))
    real, calls = bc.generate_batch, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("killed")
        return real(*a, **k)
    monkeypatch.setattr(bc, "generate_batch", dying)
    with pytest.raises(RuntimeError):
        bc.generate_answers(chatty, convs, list(range(7)), killed, batch_size=3, **kw)
    monkeypatch.setattr(bc, "generate_batch", real)
    with open(killed, "a") as f:
        f.write('{"sample_id": 3, "messa')
    assert 0 < len(bc.read_answers(killed)) < 7
    bc.generate_answers(chatty, convs, list(range(7)), killed, batch_size=3, **kw)
    assert open(killed).read() == open(full).read()


def test_features_resume_after_kill_keeps_finished_shards(tiny, cache, tmp_path, monkeypatch):
    """Shard building killed mid-way and restarted ends with byte-identical shards and index to an
    uninterrupted run, and never recomputes a finished shard."""
    rows = cache["rows"]
    ref = build(tiny, str(tmp_path / "ref"), rows, "fp8", shard_tokens=200)
    assert len(ref.manifest["shards"]) >= 3
    real, calls = bc._features, []

    def counting(*a, limit=None):
        calls.append(1)
        if limit is not None and len(calls) > limit:
            raise RuntimeError("killed")
        return real(*a)
    d = str(tmp_path / "resumed")
    os.makedirs(d)
    monkeypatch.setattr(bc, "_features", lambda *a: counting(*a, limit=N // 2 + 1))
    with pytest.raises(RuntimeError):
        build(tiny, d, rows, "fp8", shard_tokens=200)
    done = [np.load(f)[:, 0].tolist() for f in sorted(glob.glob(os.path.join(d, "*.idx.npy")))]
    assert done, "the kill should come after at least one finished shard"
    calls.clear()
    monkeypatch.setattr(bc, "_features", counting)
    build(tiny, d, rows, "fp8", shard_tokens=200)
    assert len(calls) == N - sum(len(s) for s in done)
    for f in os.listdir(str(tmp_path / "ref")):
        if f.startswith("rank"):
            assert open(os.path.join(d, f), "rb").read() == open(str(tmp_path / "ref" / f), "rb").read()


def test_corrupt_or_mismatched_cache_fails_with_rebuild_hint(cache, tmp_path):
    """Bad JSON, wrong magic, missing or resized shard, wrong target / taps: SystemExit naming the
    problem and the build_cache.py command that rebuilds the cache."""
    src = str(cache["dir"] / "fp8")
    reader = bc.CacheReader(src)
    with pytest.raises(SystemExit, match="target is 'tiny-qwen3'.*python build_cache.py <config> --cache_dir=<a new"):
        reader.validate(target_name="smollm2")
    with pytest.raises(SystemExit, match=r"layer_ids is \[0, 1, 2, 3, 4\].*--cache_dir=" + src):
        reader.validate(target_name="tiny-qwen3", layer_ids=[1, 2, 3, 4, 5])
    reader.validate("tiny-qwen3", [0, 1, 2, 3, 4], 64)

    def broken(edit, why):
        d = str(tmp_path / why.replace(" ", "_").replace(",", ""))
        shutil.copytree(src, d)
        edit(d)
        with pytest.raises(SystemExit, match=why + r".*python build_cache.py <config> --cache_dir=" + d):
            bc.CacheReader(d)
    man = lambda d: os.path.join(d, "manifest.json")
    broken(lambda d: open(man(d), "w").write("{not json"), "cannot read manifest")
    magic = lambda d: open(man(d)).read().replace("nanospec-cache", "other")
    broken(lambda d: (lambda text: open(man(d), "w").write(text))(magic(d)), "not a nanospec")
    broken(lambda d: os.remove(os.path.join(d, "rank0_shard00000.bin")), "missing")
    broken(lambda d: open(os.path.join(d, "rank0_shard00000.bin"), "ab").write(b"x"), "bytes, not")
    broken(lambda d: os.remove(os.path.join(d, "rank0_shard00000.idx.npy")), "malformed")
    # a version-1 cache (no last_hidden past each answer): one line naming the command that rebuilds its features
    d = str(tmp_path / "v1")
    shutil.copytree(src, d)
    m = json.load(open(man(d)))
    open(man(d), "w").write(json.dumps({**m, "version": 1}))
    with pytest.raises(SystemExit, match=r"format version is 1, this nanospec reads version 2.*python build_cache.py "
                       r"<config> --cache_dir=" + d + r" --stage=features \(answers are kept\)") as e:
        bc.CacheReader(d)
    assert "\n" not in str(e.value)


class ChatServer(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions around the tiny target, greedy at batch 1."""
    target = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions" or body["temperature"] != 0:
            self.send_error(400)
            return
        t = self.target
        ids = t.render_prompt(body["messages"])
        eos = sorted(t.eos_token_ids)
        out = t.model.generate(ids[None], max_new_tokens=body["max_tokens"], do_sample=False, eos_token_id=eos,
                               pad_token_id=eos[0])[0, len(ids):].tolist()
        stop = next((i for i, x in enumerate(out) if x in eos), None)
        text = t.tokenizer.decode(out[:stop], skip_special_tokens=True)
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                        "finish_reason": "length" if stop is None else "stop"}],
                           "usage": {"completion_tokens": len(out)}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_server_regeneration_equals_in_process_at_temperature_0(chatty, tmp_path):
    """Answers through a real HTTP server (thread pool, multi-turn, JSON) equal in-process batched
    answers at temperature 0."""
    ChatServer.target = chatty
    server = HTTPServer(("127.0.0.1", 0), ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        convs = bc.builtin_prompts(5, 6)
        convs[2] = convs[2][:1] + [{"role": "user", "content": "Shorter please."}]
        kw = dict(max_new_tokens=10, temperature=0.0, top_p=1.0, top_k=0, seed=0)
        a, b = str(tmp_path / "server.jsonl"), str(tmp_path / "local.jsonl")
        bc.generate_answers(chatty, convs, list(range(5)), a, server_url=f"http://127.0.0.1:{server.server_port}",
                            concurrency=3, **kw)
        bc.generate_answers(chatty, convs, list(range(5)), b, batch_size=3, **kw)
    finally:
        server.shutdown()
    ra, rb = bc.read_answers(a), bc.read_answers(b)
    assert ra == rb and len(ra) == 5
    assert {r["finish_reason"] for r in ra} == {"stop", "length"} and any(r["messages"][1]["content"] for r in ra)


class FlakyServer(BaseHTTPRequestHandler):
    """Replies by the user text: "fail N" -> HTTP 500 for its first N requests then an answer; "trickle" -> one
    byte every 50 ms; "hang" -> waits for `release`; "bad request" -> 400 after 0.5 s; "list" -> a non-string content."""
    seen, release = {}, threading.Event()

    def do_POST(self):
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        self.seen[text] = self.seen.get(text, 0) + 1
        if text == "bad request":
            time.sleep(0.5)  # after "fine" has been answered
        if text.startswith("fail") and self.seen[text] <= int(text.split()[1]) or text == "bad request":
            self.send_error(500 if text.startswith("fail") else 400)
            return
        if text == "hang":
            self.release.wait(10)
        content = [1, 2] if text == "list" else "ok"
        data = json.dumps({"choices": [{"message": {"content": content}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(len(data)) if text == "trickle" else [None]:
            self.wfile.write(data[i:i + 1] if i is not None else data)
            self.wfile.flush()
            if i is not None:
                time.sleep(0.05)

    def log_message(self, *args):
        pass


def test_server_errors_are_retried_bounded_and_reported_at_once(chatty, tmp_path):
    """A 5xx is retried with backoff; a 4xx, a non-text reply, retries used up or a response still trickling
    after the timeout stop with one line naming the server; with requests in flight, the first error stops the
    run at once (not after the request queued before it), and the answers finished before it stay on disk."""
    from http.server import ThreadingHTTPServer
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    ask = lambda text, **kw: bc.chat_request(url, "m", [{"role": "user", "content": text}], 0, backoff=0.01, **kw)
    try:
        assert ask("fail 2", retries=2) == ("ok", "stop")  # two 500s, then the answer
        with pytest.raises(SystemExit, match="HTTP 500.*after 2 attempt"):
            ask("fail 5", retries=1)
        with pytest.raises(SystemExit, match="HTTP 400.*after 1 attempt"):
            ask("bad request", retries=3)  # a client error is not retried
        with pytest.raises(SystemExit, match="list, not text"):
            ask("list")
        t0 = time.time()
        with pytest.raises(SystemExit, match="not complete after the request timeout"):
            ask("trickle", timeout=0.3, retries=0)
        assert time.time() - t0 < 2  # the whole body would take ~4 s
        convs = [[{"role": "user", "content": c}] for c in ("fine", "hang", "bad request")]
        path, t0 = str(tmp_path / "a.jsonl"), time.time()
        with pytest.raises(SystemExit, match="HTTP 400"):
            bc.generate_answers(chatty, convs, [0, 1, 2], path, server_url=url, concurrency=3, retries=0)
        assert time.time() - t0 < 5  # reported while "hang" is still waiting (up to 10 s)
        assert [r["sample_id"] for r in bc.read_answers(path)] == [0]  # the finished answer is kept
    finally:
        FlakyServer.release.set()
        server.shutdown()


def test_dry_run_upper_bound_holds_for_full_length_answers(tiny):
    """The pending-prompt estimate bounds the bytes of answers that use all max_new_tokens."""
    convs = bc.builtin_prompts(5, 2)
    bound = bc.estimate_cache(tiny, [], convs, "fp8", 4096, MIN_SUP, 1_000_000, True, 16)
    rows = [{"sample_id": i, "finish_reason": "length", "messages":
             [x for m in c for x in (m, {"role": "assistant", "content": "a" * 16})]} for i, c in enumerate(convs)]
    exact = bc.estimate_cache(tiny, rows, [], "fp8", 4096, MIN_SUP, 1_000_000, True, 16)
    assert not bound["exact"] and exact["exact"]
    assert exact["tokens"] <= bound["tokens"] and exact["total_bytes"] <= bound["total_bytes"] < 1.05 * exact["total_bytes"]


def test_cli_torchrun_matches_in_process_and_dry_run_is_exact(cache, tmp_path):
    """`torchrun --nproc_per_node=2 build_cache.py` (gloo) writes the answers and samples of a single
    in-process run; `--dry_run` then predicts the written bytes within 1%, ends with one JSON line, and
    `--max_bytes` below that refuses to start; another target refuses to reuse these answers."""
    d = str(tmp_path / "ddp")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node=2", "build_cache.py"]
    if not os.path.exists(cmd[0]):
        cmd = [sys.executable, "build_cache.py"]  # no torchrun: still check the single-process CLI
    out = subprocess.run(cmd + CLI + [f"--cache_dir={d}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert open(os.path.join(d, "answers.jsonl")).read() == open(str(cache["dir"] / "answers.jsonl")).read()
    a, b = bc.CacheReader(d).validate("tiny-qwen3", [0, 1, 2, 3, 4], 64), cache["fp8"]
    assert len(a) == len(b) == N
    for i in range(N):
        assert all(torch.equal(a[i][k], b[i][k]) for k in ("input_ids", "loss_mask", "taps", "last_hidden"))
    if "torchrun" in cmd[0]:
        assert glob.glob(os.path.join(d, "rank1_shard*.bin"))
    dry = subprocess.run([sys.executable, "build_cache.py"] + CLI + [f"--cache_dir={d}", "--dry_run", "--max_bytes=1000"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert dry.returncode != 0 and "max_bytes=1000" in dry.stderr  # refuses: the cache needs more
    est = json.loads(dry.stdout.strip().splitlines()[-1])
    written = sum(os.path.getsize(f) for f in glob.glob(os.path.join(d, "rank*")))
    assert est["exact"] and abs(est["total_bytes"] - written) <= 0.01 * written
    assert {"tokens", "supervised_tokens", "bytes_per_token", "total_bytes"} <= est.keys()
    assert abs(est["formula_bytes_per_token"] - est["bytes_per_token"]) < 0.01 * est["bytes_per_token"]
    other = subprocess.run([sys.executable, "build_cache.py"] + CLI + [f"--cache_dir={d}", "--target=tiny-llama",
                           "--stage=features"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "target_config_hash" in other.stderr  # answers of another target: refused


def test_stdlib_code_heldout_and_mixed_prompt_sources(tmp_path, monkeypatch):
    """stdlib-code / stdlib-methods: hundreds of distinct HumanEval-format prompts, none an eval prompt; heldout:<task>: exactly
    the rows DeepSpec's selection leaves out (one-line errors when none are, or the task is missing);
    "a,b": the union, shuffled by seed."""
    code = bc.load_prompts("stdlib-code")
    firsts = [conv[0]["content"] for conv in code]
    assert len(set(firsts)) == len(firsts) > 300 and bc.load_prompts("stdlib-code", 5) == code[:5]
    assert all(f.count("```") == 2 and f.split("\n")[2].startswith("def ") and " at 0x" not in f.split("\n")[2]
               and '"""' in f for f in firsts)
    meth = [conv[0]["content"] for conv in bc.load_prompts("stdlib-methods")]  # each method inside its class
    assert len(set(meth)) == len(meth) > 500 and not set(meth) & set(firsts)
    assert all(f.split("\n")[2].startswith("class ") and f.split("\n")[3].startswith("    def ") for f in meth)
    files = glob.glob(os.path.join(EVAL_DIR, "*.jsonl"))
    evals = {t for f in files for line in open(f) for t in json.loads(line)["turns"]}
    assert not set(firsts + meth) & evals
    rows = [f"Question {i}: what is {i} + {i}?" for i in range(520)]  # gsm8k's protocol selects 500 of them
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps({"turns": [r]}) + "\n" for r in rows))
    monkeypatch.setenv("NANOSPEC_DATA_DIR", str(tmp_path))
    held = [conv[0]["content"] for conv in bc.load_prompts("heldout:gsm8k")]
    chosen = [t[0] for t in prompts.load_task("gsm8k", str(tmp_path))]
    assert len(held) == 20 and sorted(held + chosen) == sorted(rows)
    assert [c[0]["content"] for c in bc.load_prompts("heldout:gsm8k", 5)] == held[:5]
    (tmp_path / "tiny.jsonl").write_text(json.dumps({"turns": ["Hi"]}) + "\n")  # an unknown task: all rows selected
    for bad, why in (("heldout:tiny", "every row"), ("heldout:nosuchtask", "nosuchtask")):
        with pytest.raises(SystemExit, match=why):
            bc.load_prompts(bad)
    mix = bc.load_prompts("stdlib-code, heldout:gsm8k", 0, 3)
    texts = [c[0]["content"] for c in mix]
    assert sorted(texts) == sorted(firsts + held) and texts != firsts + held
    assert mix == bc.load_prompts("stdlib-code,heldout:gsm8k", 0, 3) != bc.load_prompts("stdlib-code,heldout:gsm8k", 0, 4)


def run_main(monkeypatch, *args):
    """`python build_cache.py <CLI> args` in this process (no second torch import)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["build_cache.py"] + CLI + list(args))
    runpy.run_path(os.path.join(ROOT, "build_cache.py"), run_name="__main__")


def test_changed_feature_settings_are_refused_never_deleted(tiny, cache, tmp_path, monkeypatch):
    """Changing a feature setting (or the format version) on a built cache stops before any work with one line
    naming old -> new, the new-dir command that reuses the answers and --overwrite_features=True; nothing is
    deleted. Same settings keep every finished shard; --overwrite_features=True rebuilds; a dry run is not refused."""
    d = str(tmp_path / "c")
    os.makedirs(d)
    shutil.copy(str(cache["dir"] / "answers.jsonl"), d)
    feats = ["--stage=features", f"--cache_dir={d}", "--shard_tokens=200"]
    run_main(monkeypatch, *feats)
    files = lambda: {f: (open(f, "rb").read(), os.stat(f).st_mtime_ns) for f in glob.glob(os.path.join(d, "*"))}
    before = files()
    assert len(glob.glob(os.path.join(d, "rank0_shard*.bin"))) >= 3
    run_main(monkeypatch, *feats)  # same settings: nothing rewritten but the manifest
    assert {f: v for f, v in files().items() if "manifest" not in f} == \
        {f: v for f, v in before.items() if "manifest" not in f}
    before = files()
    for flag, what in [("--cache_dtype=bf16", "cache_dtype 'fp8' -> 'bf16'"), ("--max_len=64", "max_len 4096 -> 64"),
                       ("--min_supervised=1", f"min_supervised {MIN_SUP} -> 1"),
                       ("--shard_tokens=300", "shard_tokens 200 -> 300"),
                       ("--keep_truncated=False", "keep_truncated True -> False"),
                       ("--dtype=bfloat16", "compute_dtype 'torch.float32' -> 'torch.bfloat16'")]:
        with pytest.raises(SystemExit) as e:
            run_main(monkeypatch, *feats, flag)
        msg = str(e.value)
        assert what in msg and "\n" not in msg and f"cp {d}/answers.* NEW/" in msg and "--cache_dir=NEW" in msg
        assert "--overwrite_features=True" in msg and files() == before
    settings = json.load(open(os.path.join(d, "features.settings.json")))
    open(os.path.join(d, "features.settings.json"), "w").write(json.dumps({**settings, "version": 1}))
    with pytest.raises(SystemExit, match=r"format version 1 -> 2.*--overwrite_features=True"):
        run_main(monkeypatch, *feats)
    with pytest.raises(SystemExit) as e:  # a dry run writes nothing: not refused
        run_main(monkeypatch, *feats, "--cache_dtype=bf16", "--dry_run")
    assert e.value.code == 0 and {f: v for f, v in files().items() if "settings" not in f} == \
        {f: v for f, v in before.items() if "settings" not in f}
    new = str(tmp_path / "new")  # the suggested way to keep both: the answers copied to a new dir
    os.makedirs(new)
    [shutil.copy(f, new) for f in glob.glob(os.path.join(d, "answers.*"))]
    run_main(monkeypatch, "--stage=features", f"--cache_dir={new}", "--cache_dtype=bf16")
    assert len(bc.CacheReader(new)) == N and bc.CacheReader(new).cache_dtype == "bf16"
    assert bc.CacheReader(d).cache_dtype == "fp8" and len(bc.CacheReader(d)) == N
    run_main(monkeypatch, *feats, "--cache_dtype=bf16", "--overwrite_features=True")
    r = bc.CacheReader(d)
    assert r.cache_dtype == "bf16" and len(r) == N and not glob.glob(os.path.join(d, "*.tmp"))
    assert json.load(open(os.path.join(d, "features.settings.json")))["version"] == 2
    assert open(os.path.join(d, "answers.jsonl")).read() == open(str(cache["dir"] / "answers.jsonl")).read()
    for i in range(N):
        assert torch.equal(r[i]["taps"], cache["bf16"][i]["taps"])


def test_corrupt_answer_lines_skipped_with_warning_and_regenerated_in_place(chatty, cache, tmp_path, monkeypatch,
                                                                            capsys):
    """A corrupt line in the middle of answers.jsonl is skipped with one warning naming its line; every valid row
    after it is kept (repair cuts only a partial last line). A resume regenerates only the missing rows, in
    place: no valid answer is deleted, changed or duplicated, and the file ends as an uninterrupted run's."""
    convs = bc.builtin_prompts(7, 3)
    kw = dict(max_new_tokens=20, temperature=0.7, top_p=0.8, top_k=20, seed=5)
    full, path = str(tmp_path / "full.jsonl"), str(tmp_path / "answers.jsonl")
    bc.generate_answers(chatty, convs, list(range(7)), full, batch_size=3, **kw)
    lines = open(full).read().splitlines(keepends=True)
    # a valid row that a rerun must keep as it is, after a garbage line and a JSON line that is not a row
    mine = json.dumps({**json.loads(lines[4]), "finish_reason": "mine"}, ensure_ascii=False) + "\n"
    body = "".join(lines[:2] + ['{"sample_id": 2, "mess\x00ges": [\n', lines[3], "null\n", mine])
    open(path, "w").write(body + '{"sample_id": 5, "mess')  # + the half-written line of a killed run
    capsys.readouterr()
    rows = bc.read_answers(path, repair=True)
    assert [r["sample_id"] for r in rows] == [0, 1, 3, 4] and rows[3]["finish_reason"] == "mine"
    assert open(path).read() == body  # only the partial last line is cut
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: skipped corrupt line(s) [3, 5]" in err
    corrupt = []
    assert bc.read_answers(path, corrupt=corrupt) == rows and corrupt == [3, 5]  # told to the caller, not printed
    assert capsys.readouterr().err == ""
    bc.generate_answers(chatty, convs, list(range(7)), path, batch_size=3, **kw)
    assert open(path).read() == "".join(lines[:4] + [mine] + lines[5:])
    assert "regenerated missing sample(s) [2]" in capsys.readouterr().out
    # the CLI: pending = the missing sample ids, not the rows after the first bad line
    d = str(tmp_path / "c")
    os.makedirs(d)
    lines = open(str(cache["dir"] / "answers.jsonl")).read().splitlines(keepends=True)
    mine = json.dumps({**json.loads(lines[3]), "finish_reason": "mine"}, ensure_ascii=False) + "\n"
    open(os.path.join(d, "answers.jsonl"), "w").write("".join(lines[:1] + ["garbage\n", lines[2], mine] + lines[4:]))
    run_main(monkeypatch, "--stage=answers", f"--cache_dir={d}")
    assert open(os.path.join(d, "answers.jsonl")).read() == "".join(lines[:3] + [mine] + lines[4:])


def test_answers_resume_keeps_every_finished_answer_on_any_process_count(cache, tmp_path, monkeypatch):
    """A resume of the answers stage regenerates none of the answers already made, whatever the process counts:
    the rows of answers.jsonl and of the rank parts a killed torchrun left (of the same world size or another, a
    half-written line dropped) go to the rank that owns each sample; the rest is answered as a full run would, and
    no part is left. Rows marked "mine" must come back as they are. The old code had each of several ranks
    regenerate its samples answered in answers.jsonl or in another world size's part, and one process ignore parts."""
    lines = open(str(cache["dir"] / "answers.jsonl")).read().splitlines(keepends=True)
    mine = lambda i: json.dumps({**json.loads(lines[i]), "finish_reason": "mine"}, ensure_ascii=False) + "\n"  # noqa: E731
    parts = lambda d: glob.glob(os.path.join(d, "answers.rank*"))  # noqa: E731
    d = str(tmp_path / "two")
    os.makedirs(d)
    open(os.path.join(d, "answers.jsonl"), "w").write(lines[0] + mine(1))  # a one-process run, killed
    open(os.path.join(d, "answers.rank2-of-3.jsonl"), "w").write(mine(2) + '{"sample_id": 5, "mess')  # 3 ranks, killed
    open(os.path.join(d, "answers.rank1-of-2.jsonl"), "w").write(mine(3))  # 2 ranks, killed
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node=2", "build_cache.py"]
    if not os.path.exists(cmd[0]):
        pytest.skip("no torchrun")
    out = subprocess.run(cmd + CLI + [f"--cache_dir={d}", "--stage=answers"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert open(os.path.join(d, "answers.jsonl")).read() == "".join([lines[0], mine(1), mine(2), mine(3)] + lines[4:])
    assert not parts(d)
    d = str(tmp_path / "one")  # one process after a killed torchrun: its parts are kept
    os.makedirs(d)
    open(os.path.join(d, "answers.rank0-of-2.jsonl"), "w").write(mine(0) + mine(4))
    run_main(monkeypatch, "--stage=answers", f"--cache_dir={d}")
    assert open(os.path.join(d, "answers.jsonl")).read() == "".join([mine(0)] + lines[1:4] + [mine(4), lines[5]])
    assert not parts(d)
