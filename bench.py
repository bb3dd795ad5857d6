"""
Measured performance numbers. One subcommand per measurement; each prints a table and, with --out,
writes one JSON {"bench": name, "device": ..., "date": ..., "machine": {...}, "results": {...}}.

    python bench.py loss --device=cpu --out=out/bench_loss_cpu.json    # fused vs naive vocab losses
    python bench.py loss --device=cpu --rounds=3 --out=...             # 3 interleaved rounds (noisy hosts)
    python bench.py loss --device=cuda --out=out/bench_loss_cuda.json  # 1 GPU, Qwen3-4B geometry, bf16
    python bench.py loss --device=cpu --N=64 --V=4096 --repeats=1      # quick look at a smaller shape
    python bench.py tree --device=cuda --out=out/bench_tree_cuda.json  # tree attention kernel + chain vs tree decoding
    python bench.py tree --device=cpu --out=out/bench_tree_cpu.json    # chain vs tree decoding (smollm2), CPU attention
    python bench.py train --device=cpu --out=out/bench_train_cpu.json  # one optimizer step per drafter, smollm2
    python bench.py train --device=cuda --online --out=...            # Qwen3-4B geometry, random weights, bf16
    python bench.py decode --device=cpu --num_prompts=4 --out=out/bench_decode_cpu.json  # plain vs lookup vs chains

`loss`: forward + backward of soft CE (Eagle3) and DSpark's 0.1 ce + 0.9 l1 with the low-rank Markov
bias, naive (full [N, V] softmaxes) vs fused (kernels.py), each variant in a fresh subprocess. Peak
memory above the baseline once the inputs exist: cuda, max_memory_allocated after a reset; cpu, VmHWM
after writing "5" to /proc/self/clear_refs (resets the peak-RSS counter) minus VmRSS before the step
(fallback ru_maxrss, reported as such). Both include the returned gradients (grad Bm: 50 MB on cpu).
`tree`: tree attention at Qwen3-4B heads (32/8, hd 128) for --prefix x --nodes: the Triton kernel (cuda),
the PyTorch reference and SDPA with a mask, with max errors; then greedy decoding with --target and
--checkpoint (default the demo's DSpark, else a random one): chain vs trees of --budgets nodes (0 = block
size: equal budget), tau, tokens/s, and whether outputs equal the chain's.
`train`: forward + backward + AdamW step of each drafter on synthetic features (random taps / last_hidden of
the right shapes, loss_mask on the answer = the last 3/4), so the drafter is measured alone: median of --steps
after a warm-up step, tokens/s, sequences/s, peak memory as for `loss`. Settings = train.py's with the config
files: cpu configs/*_smollm2.py on SmolLM2-135M, cuda configs/*_qwen3_4b.py (DeepSpec's recipe) on a random
Qwen3-4B geometry (no weights needed). --online also times the target's feature forward of each batch.
`decode`: the first --num_prompts of each task, greedy: plain decoding, transformers' prompt lookup (10 n-gram
drafts) and speculative chains of --num_drafts drafts; tau, tokens/s, speedups, outputs equal to plain, and the
target's step cost t(k) of a cached k-token forward, with the cost model tau * t(1) / (draft + t(k+1)).
Times are medians over --repeats (and --rounds). On cpu torch runs 1 thread unless --threads says
otherwise: on a shared 2-core machine a 2-thread op waits at an OpenMP barrier for a descheduled thread.
"""
import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, Gemma4UnifiedTextConfig, Qwen3Config

import evaluate
import kernels
from configurator import atomic_path, configure, script_defaults
from model_dspark import DSpark
from prompts import load_task, messages_of
from target import DTYPES, Target, load, load_target, new_drafter, tiny_tokenizer

GEOMETRY = {  # N rows (tokens), hidden H, vocab V, Markov rank r
    "cpu": dict(N=448, H=576, V=49152, r=256, dtype="float32"),  # SmolLM2-135M
    "cuda": dict(N=3584, H=2560, V=151936, r=256, dtype="bfloat16"),  # Qwen3-4B
}
TREE_PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a hash map works.",
                "List five fruits and their colors.", "What causes the seasons on Earth?"]

# -----------------------------------------------------------------------------
# naive references: full [N, V] softmaxes, autograd does the backward. What kernels.py's fused losses compute
# (tests/test_kernels.py checks them against these) and the baseline `bench.py loss` measures them against.


def _naive_logits(h_draft, h_target, W, weights, bias=None, softcap=None):
    def cap(z):  # Gemma's final-logit soft cap c tanh(z / c), before the bias
        return softcap * torch.tanh(z / softcap) if softcap else z
    zd = cap((h_draft @ W.T).float())  # (N, V)
    if bias is not None:  # low-rank Markov bias A @ Bm.T
        A, Bm = bias
        zd = zd + (A @ Bm.T).float()
    keep = torch.ones(zd.shape[0], dtype=torch.bool, device=zd.device) if weights is None else weights != 0
    return zd, cap((h_target @ W.T).float()), keep


def naive_dspark_loss(h_draft, h_target, labels, W, bias=None, weights=None, return_argmax=False, softcap=None):
    zd, zt, keep = _naive_logits(h_draft, h_target, W, weights, bias, softcap)
    logp_d = torch.log_softmax(zd, -1)
    p_d, p_t = logp_d.exp(), torch.softmax(zt, -1)
    ce = -logp_d.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    ce = torch.where(keep & (labels >= 0), ce, 0.0)
    l1 = torch.where(keep, (p_d - p_t).abs().sum(-1), 0.0)
    c_star = (1 - l1.detach() / 2).clamp(0, 1)
    if not return_argmax:
        return ce, l1, c_star
    return ce, l1, c_star, torch.where(keep, zd.argmax(-1), -1), torch.where(keep, zt.argmax(-1), -1)


def naive_soft_ce(h_draft, h_target, W, weights=None, return_stats=False, softcap=None):
    zd, zt, keep = _naive_logits(h_draft, h_target, W, weights, softcap=softcap)
    logp_d, p_t = torch.log_softmax(zd, -1), torch.softmax(zt, -1)
    loss = torch.where(keep, -(p_t * logp_d).sum(-1), 0.0)
    if not return_stats:
        return loss
    l1 = torch.where(keep, (logp_d.exp() - p_t).abs().sum(-1), 0.0).detach()
    return loss, l1, torch.where(keep, zd.argmax(-1), -1), torch.where(keep, zt.argmax(-1), -1)


# -----------------------------------------------------------------------------
# one variant, run inside a fresh subprocess

def _status_kb(key):  # a field of /proc/self/status, in kB
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def _inputs(loss, N, H, V, r, dtype, device):
    torch.manual_seed(0)
    kw = dict(dtype=getattr(torch, dtype), device=device)
    x = dict(W=torch.randn(V, H, **kw) * (3 / H ** 0.5),  # logits of std ~3
             hd=torch.randn(N, H, **kw).requires_grad_(), ht=torch.randn(N, H, **kw),
             weights=torch.ones(N, device=device))
    if loss == "dspark":
        x["labels"] = torch.randint(0, V, (N,), device=device)
        x["A"] = (torch.randn(N, r, **kw) * 0.1).requires_grad_()
        x["Bm"] = (torch.randn(V, r, **kw) * 0.1).requires_grad_()
    return x


def _step(loss, impl, x):
    """Forward + backward of one loss; gradients are freshly allocated every step."""
    for k in ("hd", "A", "Bm"):
        if k in x:
            x[k].grad = None
    if loss == "soft_ce":
        fn = kernels.fused_soft_ce if impl == "fused" else naive_soft_ce
        out = fn(x["hd"], x["ht"], x["W"], weights=x["weights"]).sum()
    else:  # DSpark's loss terms (the BCE of the confidence head needs no vocabulary)
        fn = kernels.fused_dspark_loss if impl == "fused" else naive_dspark_loss
        ce, l1, _ = fn(x["hd"], x["ht"], x["labels"], x["W"], bias=(x["A"], x["Bm"]), weights=x["weights"])
        out = (0.1 * ce + 0.9 * l1).sum()
    out.backward()


def peak_start(cuda):
    """Open a peak-memory window -> (baseline bytes, method); peak_bytes(...) closes it (module docstring)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (not resettable)"
    return _status_kb("VmRSS") * 1024, method


def peak_bytes(cuda, base, method):
    """Peak memory since peak_start, above its baseline."""
    if cuda:
        return torch.cuda.max_memory_allocated() - base
    if method.startswith("VmHWM"):
        return _status_kb("VmHWM") * 1024 - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def run_variant(loss, impl, device, geo, repeats):
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _step(loss, impl, _inputs(loss, 8, 16, 512, 4, geo["dtype"], device))  # warm-up: library init
    x = _inputs(loss, geo["N"], geo["H"], geo["V"], geo["r"], geo["dtype"], device)
    gc.collect()
    sync()
    base, method = peak_start(cuda)
    t0 = time.perf_counter()
    _step(loss, impl, x)
    sync()
    first_s = time.perf_counter() - t0
    peak = peak_bytes(cuda, base, method)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(loss, impl, x)
        sync()
        times.append(time.perf_counter() - t0)
    return dict(peak_bytes=peak, seconds=statistics.median(times) if times else first_s, first_s=first_s,
                all_s=times, peak_method=method)


# -----------------------------------------------------------------------------
# the loss benchmark: 2 losses x (naive, fused), one subprocess each


def bench_loss(args):
    geo = dict(GEOMETRY[args.device])
    geo.update({k: getattr(args, k) for k in ("N", "H", "V", "r", "dtype") if getattr(args, k) is not None})
    runs = {}  # (loss, impl) -> one dict per round; rounds interleave the variants against drifting load
    for _ in range(args.rounds):
        for loss in ("soft_ce", "dspark"):
            for impl in ("naive", "fused"):
                cmd = [sys.executable, os.path.abspath(__file__), "loss", f"--device={args.device}",
                       f"--variant={loss}:{impl}", f"--repeats={args.repeats}", f"--chunk={args.chunk}"]
                cmd += [f"--{k}={v}" for k, v in geo.items()] + ([f"--threads={args.threads}"] if args.threads else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"bench.py loss: variant {loss}:{impl} failed:\n{proc.stderr[-3000:]}")
                runs.setdefault((loss, impl), []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {}
    for loss in ("soft_ce", "dspark"):
        row = dict(geo) if loss == "dspark" else {k: v for k, v in geo.items() if k != "r"}
        for impl in ("naive", "fused"):
            ms = runs[(loss, impl)]  # medians over rounds of the per-round medians / peaks
            row[f"{impl}_s"] = statistics.median(m["seconds"] for m in ms)
            row[f"{impl}_peak_bytes"] = int(statistics.median(m["peak_bytes"] for m in ms))
            row[f"{impl}_rounds"] = [dict(s=m["seconds"], peak_bytes=m["peak_bytes"], all_s=m["all_s"]) for m in ms]
            row["peak_method"] = ms[0]["peak_method"]
        row["time_ratio"] = row["fused_s"] / row["naive_s"]  # fused / naive, lower is better
        row["mem_ratio"] = row["naive_peak_bytes"] / max(row["fused_peak_bytes"], 1)  # naive / fused, higher is better
        results[loss] = row
    results["vocab_chunk"] = args.chunk or kernels.VOCAB_CHUNK
    results["torch_threads"] = torch.get_num_threads()
    print(f"{'loss':8s} {'N':>5s} {'H':>5s} {'V':>7s} {'dtype':>9s} | {'naive s':>8s} {'fused s':>8s} "
          f"{'fused/naive':>11s} | {'naive MB':>9s} {'fused MB':>9s} {'naive/fused':>11s}")
    for loss in ("soft_ce", "dspark"):
        r = results[loss]
        print(f"{loss:8s} {r['N']:5d} {r['H']:5d} {r['V']:7d} {r['dtype']:>9s} | {r['naive_s']:8.3f} "
              f"{r['fused_s']:8.3f} {r['time_ratio']:10.2f}x | {r['naive_peak_bytes'] / 2**20:9.1f} "
              f"{r['fused_peak_bytes'] / 2**20:9.1f} {r['mem_ratio']:10.1f}x")
    return results


# -----------------------------------------------------------------------------
# the tree benchmark: tree attention (kernel, reference, SDPA) and chain vs tree decoding


def _median_s(fn, device, repeats):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()  # warm-up (Triton compiles here)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_tree_attention(args):
    dev, g, rows = args.device, torch.Generator().manual_seed(0), []
    cases = [(torch.bfloat16 if dev == "cuda" else torch.float32, P, N) for P in args.prefix for N in args.nodes]
    cases += [(torch.float32, args.prefix[0], args.nodes[-1])] if dev == "cuda" else []  # the kernel's fp32 path
    for dt, P, N in cases:
        q = torch.randn(N, 32, 128, generator=g).to(dev, dt).transpose(0, 1)  # [H, N, D], HF's strides
        k, v = (torch.randn(8, P + N, 128, generator=g).to(dev, dt) for _ in range(2))
        anc = evaluate.ancestors([-1] + [int(torch.randint(i, (1,), generator=g)) for i in range(1, N)]).to(dev)
        mask = torch.cat([torch.ones(N, P, dtype=torch.bool, device=dev), anc], 1)  # [N, P+N] visible keys
        fns = {"ref": lambda: kernels.tree_attention_ref(q, k, v, anc, P, 128 ** -0.5),
               "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                   q[None], k[None], v[None], attn_mask=mask, scale=128 ** -0.5, enable_gqa=True)[0]}
        if dev == "cuda":
            fns["triton"] = lambda: kernels.tree_attention(q, k, v, anc, P, 128 ** -0.5)
        ref, row = fns["ref"]().float(), dict(P=P, N=N, dtype=str(dt).split(".")[-1])
        for name, fn in fns.items():
            row[f"{name}_ms"] = 1e3 * _median_s(fn, dev, args.repeats)
            row[f"{name}_max_err"] = (fn().float() - ref).abs().max().item()  # vs fp32 math on the same inputs
        rows.append(row)
        print(f"{row['dtype']:>8s} P {P:5d} N {N:3d} | " + " ".join(
            f"{n} {row[n + '_ms']:8.3f} ms (err {row[n + '_max_err']:.1e})" for n in fns))
    return rows


def bench_tree_decode(args):
    here = os.path.dirname(os.path.abspath(__file__))
    draft = args.checkpoint or os.path.join(here, "out", "demo", "dspark", "step_latest")
    if os.path.exists(os.path.join(draft, "config.json")):
        target, drafter, draft = load(draft, args.target, device=args.device)
    else:
        target, draft = load_target(args.target or "smollm2", device=args.device), "random init (DSpark defaults)"
        torch.manual_seed(0)
        drafter = DSpark.from_target(target).eval()
    K = drafter.proposal_length
    prompts = [target.render_prompt([{"role": "user", "content": p}]) for p in TREE_PROMPTS[:args.num_prompts]]
    base_s, base_n = 0.0, 0
    for ids in prompts:  # plain decoding: the reference tokens/s
        out, sec = evaluate.plain_generate(target, ids, args.max_new_tokens)
        base_s, base_n = base_s + sec, base_n + len(out)
    rows, chain_ids = [], None
    for budget in [0] + [b or K for b in args.budgets]:
        res = [evaluate.speculative_generate(target, drafter, ids, args.max_new_tokens, num_drafts=K,
                                             tree_budget=budget) for ids in prompts]
        rounds = [r for x in res for r in x["rounds"]]
        ids_all = [x["ids"] for x in res]
        chain_ids = chain_ids or ids_all
        row = dict(mode=f"tree {budget}" if budget else f"chain {K}", tree_budget=budget, block_size=K,
                   rounds=len(rounds), tau=sum(r[2] for r in rounds) / len(rounds),
                   new_tokens=sum(len(i) for i in ids_all), seconds=sum(x["total_s"] for x in res),
                   draft_s=sum(x["draft_s"] for x in res), verify_s=sum(x["verify_s"] for x in res),
                   same_output_as_chain=ids_all == chain_ids)
        row["tokens_per_s"] = row["new_tokens"] / row["seconds"]
        row["speedup"] = row["tokens_per_s"] / (base_n / base_s)
        rows.append(row)
        print(f"{row['mode']:>9s} | tau {row['tau']:.3f} over {row['rounds']} rounds | "
              f"{row['tokens_per_s']:7.2f} tok/s (plain {base_n / base_s:.2f}, {row['speedup']:.2f}x) | draft {row['draft_s']:.1f} s verify "
              f"{row['verify_s']:.1f} s | same output as chain: {row['same_output_as_chain']}")
    return dict(target=target.name, drafter=draft, prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                baseline_tokens_per_s=base_n / base_s, rows=rows)


def bench_tree(args):
    attention = bench_tree_attention(args)
    try:
        decode = bench_tree_decode(args)
    except (SystemExit, OSError) as e:  # e.g. no smollm2 wheel on a GPU box: keep the attention numbers
        decode = dict(skipped=str(e))
        print(f"bench.py tree: decoding skipped: {e}")
    return dict(attention=attention, decode=decode, torch_threads=torch.get_num_threads())


# -----------------------------------------------------------------------------
# the training-step benchmark: one optimizer step per drafter on synthetic target features

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN3_4B = dict(num_hidden_layers=36, hidden_size=2560, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
                max_window_layers=36, bos_token_id=151643, eos_token_id=151645)  # Qwen/Qwen3-4B's config.json
GEMMA4_12B = dict(num_hidden_layers=48, hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=1,
                  attention_k_eq_v=True, vocab_size=262144, sliding_window=1024, final_logit_softcapping=30.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8)  # GEMMA4.md s.1 (text config)
RECIPE_KEYS = {"dspark": ("block_size", "num_draft_layers", "num_anchors", "markov_rank", "draft_vocab_size"),
               "dflash": ("block_size", "num_draft_layers", "num_anchors", "draft_vocab_size"),
               "eagle3": ("num_draft_layers", "ttt_length", "draft_vocab_size")}  # reported with each row


def recipe(drafter, device, geometry="qwen3_4b"):
    """What train.py would run with: its defaults, then configs/<drafter>_smollm2.py (cpu: the demo's settings)
    or configs/<drafter>_<geometry>.py (cuda: DeepSpec's recipe)."""
    path = os.path.join(HERE, "configs", f"{drafter}_{'smollm2' if device == 'cpu' else geometry}.py")
    return configure(script_defaults(os.path.join(HERE, "train.py")), [path], verbose=False)


def random_target(device, dtype=torch.bfloat16, geometry="qwen3_4b"):
    """A Target of Qwen3-4B's or Gemma-4-12B's geometry with random weights (no download), built directly on `device`
    ("meta": shapes only, no memory). As target.py's tiny targets: HF config -> from_config, byte tokenizer."""
    gemma = geometry == "gemma4_12b"
    config = Gemma4UnifiedTextConfig(**GEMMA4_12B) if gemma else Qwen3Config(**QWEN3_4B)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    c = recipe("dspark", "cuda", geometry)
    return Target(model, tiny_tokenizer("gemma4" if gemma else "qwen3"), f"random {geometry}",
                  layer_ids=c["target_layer_ids"], mask_token_id=c["mask_token_id"])


def build_drafter(name, target, c, device):
    """train.py's model section for drafter `name` with recipe c, built on `device` (from the bare config when
    the target lives on the meta device: random frozen embedding/head, same shapes)."""
    c = {**c, "target_name": target.name}
    if c["draft_vocab_size"] >= target.config.vocab_size:
        c["draft_vocab_size"] = 0  # tiny targets: the full vocabulary
    with torch.device(device):  # parameters born on the device: no CPU init of a 1.5B-parameter drafter
        return new_drafter(name, target.config if target.device.type == "meta" else target, c)


def synthetic_batch(target, B, T, device):
    """train.collate's batch with random features: the first quarter of each sequence is the prompt
    (loss_mask 0), the rest the answer. taps [B,T,n*H], last_hidden [B,T,H] fp32, as the data path gives them."""
    g, H, n = torch.Generator().manual_seed(0), target.config.hidden_size, len(target.layer_ids)
    batch = dict(input_ids=torch.randint(target.config.vocab_size, (B, T), generator=g),
                 loss_mask=(torch.arange(T) >= T // 4).long().expand(B, T).contiguous(),
                 taps=torch.randn(B, T, n * H, generator=g), last_hidden=torch.randn(B, T, H, generator=g),
                 sample_id=torch.arange(B), lengths=torch.full((B,), T))
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, optimizer, batch, step, autocast):
    """train.py's optimizer step on one micro-batch: forward + backward under autocast, gradients divided by the
    model's normalizer metrics["weight"] (DSpark/DFlash: the supervised weight; Eagle3: B*T), clipping at 1.0,
    AdamW -> the objective (a float: one sync, as train.py's logging)."""
    dev = batch["input_ids"].device
    gens = [torch.Generator(dev).manual_seed(int(s) * 1_000_003 + step) for s in batch["sample_id"]]
    with autocast:
        loss, metrics = model(batch, gens)
        loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    for p in params:
        p.grad.mul_(1 / metrics["weight"].clamp(min=1e-8))
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach() / metrics["weight"].clamp(min=1e-8))


def bench_train(args):
    dev, cuda = args.device, args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = args.dtype or recipe("dspark", dev)["dtype"]  # the recipe's: cpu float32, cuda bfloat16 autocast
    if cuda and not args.target:  # the GPU geometry; the target itself only exists for --online
        target = random_target(dev if args.online else "meta", DTYPES[dtype], args.geometry)
    else:
        try:
            target = load_target(args.target or "smollm2", dtype=dtype, device=dev)
        except SystemExit as e:
            if args.target:
                raise
            print(f"bench.py train: smollm2 unavailable ({e}); using tiny-qwen3 instead")
            target = load_target("tiny-qwen3", dtype=dtype, device=dev)
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bfloat16")  # fp32 master weights
    tc = target.config
    print(f"bench.py train: target {target.name} (L {tc.num_hidden_layers}, H {tc.hidden_size}, V {tc.vocab_size}, "
          f"taps {target.layer_ids}), {dtype}, {'online target forward timed' if args.online else 'drafter only'}")
    print(f"{'drafter':8s} {'B':>3s} {'T':>5s} {'params':>7s} | {'step s':>7s} {'tok/s':>8s} {'seq/s':>6s} | "
          f"{'peak MB':>8s} {'base MB':>8s} | {'target s':>8s} {'online s':>8s} | loss")
    rows = []
    for name in args.drafters:
        c = recipe(name, dev, args.geometry)
        B, T = args.batch or c["micro_batch_size"], args.seq_len or c["max_len"]
        batch = synthetic_batch(target, B, T, dev)
        torch.manual_seed(0)  # the same drafter init on every run
        model = build_drafter(name, target, c, dev).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c["learning_rate"], betas=(c["beta1"], c["beta2"]),
                                      weight_decay=c["weight_decay"])
        train_step(model, optimizer, batch, 0, autocast)  # warm-up: AdamW state, Triton compiles, allocator
        gc.collect()
        sync()
        if not cuda:  # hand freed heap back to the OS, else the warm-up's memory hides the steps' peak from VmHWM
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
        base, method = peak_start(cuda)
        times, losses = [], []
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            losses.append(train_step(model, optimizer, batch, step, autocast))
            sync()
            times.append(time.perf_counter() - t0)
        row = dict(drafter=name, batch=B, seq_len=T, dtype=dtype, params=sum(p.numel() for p in params),
                   step_s=statistics.median(times), all_s=times, losses=losses,
                   peak_bytes=peak_bytes(cuda, base, method), base_bytes=base, peak_method=method,
                   recipe={k: c[k] for k in RECIPE_KEYS[name]})
        row.update(tokens_per_s=B * T / row["step_s"], sequences_per_s=B / row["step_s"])
        if args.online:  # the frozen target's feature forward for this batch: the cost online training adds
            row["target_forward_s"] = _median_s(lambda: target.features(batch["input_ids"]), dev, args.steps)
            row["online_step_s"] = row["step_s"] + row["target_forward_s"]
        rows.append(row)
        f = lambda k: f"{row[k]:8.3f}" if k in row else f"{'-':>8s}"  # noqa: E731
        print(f"{name:8s} {B:3d} {T:5d} {row['params'] / 1e6:6.1f}M | {row['step_s']:7.3f} {row['tokens_per_s']:8.0f} "
              f"{row['sequences_per_s']:6.2f} | {row['peak_bytes'] / 2**20:8.0f} {base / 2**20:8.0f} | "
              f"{f('target_forward_s')} {f('online_step_s')} | {losses[-1]:.3f}")
        del model, optimizer, batch, params
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print("peak MB: above base MB (drafter, AdamW state, inputs" + (", target" if target.device.type != "meta" else "")
          + f"), measured by {method}")
    return dict(target=target.name, online=args.online, rows=rows, torch_threads=torch.get_num_threads())


# -----------------------------------------------------------------------------
# the decoding benchmark: plain greedy vs transformers' prompt lookup vs speculative chains, same prompts

@torch.no_grad()
def lookup_generate(target, prompt_ids, max_new_tokens):
    """Greedy prompt-lookup decoding of transformers (drafts = n-gram matches copied from the context, 10 per
    round, verified by the target) -> (new ids, seconds); stops at the same end-of-turn tokens as plain decoding."""
    dev = target.device
    t0 = evaluate._clock(dev)
    x = prompt_ids[None].to(dev)
    out = target.model.generate(x, attention_mask=torch.ones_like(x), prompt_lookup_num_tokens=10, do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=sorted(target.eos_token_ids),
                                pad_token_id=target.tokenizer.pad_token_id or min(target.eos_token_ids),
                                temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt_ids):].tolist(), evaluate._clock(dev) - t0


def step_costs(target, ids, sizes, repeats):
    """Median ms of one cached target forward of k tokens after a 200-token prefix, k in sizes: verifying k-1 drafts
    costs t(k), so a chain of k drafts speeds up by about tau * t(1) / (draft time per round + t(k+1))."""
    prefix = ids.repeat(200 // len(ids) + 1)[:200]
    _, _, cache = target.forward(prefix[None])
    out = {}
    for k in sizes:
        x = prefix[:k][None]
        out[k] = 1e3 * _median_s(lambda: (target.forward(x, cache), cache.crop(-k)), target.device.type, repeats)
    return out


def decode_rates(c, ref):
    """Counters of one method -> its row; ref = the plain and prompt-lookup rows of the same prompts."""
    r = dict(method=c["method"], prompts=c["prompts"], new_tokens=c["new_tokens"], seconds=c["seconds"],
             tokens_per_s=c["new_tokens"] / c["seconds"], same_as_plain=c["same"] / c["prompts"])
    if c.get("rounds"):
        r.update(block_size=c["k"], rounds=c["rounds"], tau=c["committed"] / c["rounds"], draft_s=c["draft_s"],
                 verify_s=c["verify_s"])
    for name in ("plain", "lookup"):
        if name in ref:
            r[f"vs_{name}"] = r["tokens_per_s"] / (ref[name]["new_tokens"] / ref[name]["seconds"])
    return r


def bench_decode(args):
    # the evaluate.py default drafter: the demo's DSpark, then drafters/smollm2_dspark
    target, drafter, path = load(args.checkpoint, args.target, dtype=args.dtype, device=args.device)
    K = drafter.proposal_length
    sizes = list(dict.fromkeys(b or K for b in args.num_drafts))  # 0 = K; a repeated size runs once
    if drafter.kind != "eagle3" and max(sizes) > K:
        sys.exit(f"bench.py decode: --num_drafts {max(sizes)} exceeds the drafter's block size {K}")
    prompts = {t: [target.render_prompt(messages_of(turns[0])) for turns in
                   load_task(t, args.data_dir, args.num_prompts)] for t in args.tasks}
    M, first = args.max_new_tokens, next(iter(prompts.values()))[0]
    evaluate.plain_generate(target, first, 4)  # warm-up: lazy inits of all three paths
    lookup_generate(target, first, 4)
    evaluate.speculative_generate(target, drafter, first, 4, num_drafts=K)
    counts = {}  # (task, method) -> additive counters
    for task, rows in prompts.items():
        for ids in rows:  # methods interleaved per prompt: a drifting machine load hits all of them alike
            plain, s = evaluate.plain_generate(target, ids, M)
            runs = [("plain", plain, s, None), ("lookup", *lookup_generate(target, ids, M), None)]
            for k in sizes:
                res = evaluate.speculative_generate(target, drafter, ids, M, num_drafts=k)
                runs.append((f"chain {k}", res["ids"], res["total_s"], dict(res, k=k)))
            for method, out, s, res in runs:
                cnt = counts.setdefault((task, method), dict(method=method, prompts=0, new_tokens=0, seconds=0.0,
                                                             same=0))
                cnt.update(prompts=cnt["prompts"] + 1, new_tokens=cnt["new_tokens"] + len(out),
                           seconds=cnt["seconds"] + s, same=cnt["same"] + (out == plain))
                if res:
                    cnt["k"] = res["k"]
                    for key, v in (("rounds", len(res["rounds"])), ("committed", sum(r[2] for r in res["rounds"])),
                                   ("draft_s", res["draft_s"]), ("verify_s", res["verify_s"])):
                        cnt[key] = cnt.get(key, 0) + v
    steps = sorted({1, 2, 4, 8, 16} | {k + 1 for k in sizes})
    t_ms = step_costs(target, torch.cat([i for rows in prompts.values() for i in rows]), steps, args.repeats)
    results = dict(target=target.name, drafter=path, block_size=K, max_new_tokens=M, step_ms=t_ms, tasks={})
    print(f"bench.py decode: target {target.name}, drafter {type(drafter).__name__} from {path} (block {K}), "
          f"{args.num_prompts} prompt(s) per task, {M} new tokens, greedy, {args.dtype} on {args.device}")
    print(f"{'task':12s} {'method':9s} {'tau':>5s} {'tok/s':>7s} {'vs plain':>8s} {'vs lookup':>9s} {'model':>6s} "
          f"{'draft s':>7s} {'verify s':>8s} {'same as plain':>13s}")
    for task in list(prompts) + ["overall"]:
        cs = [cnt for (t, _), cnt in counts.items() if t == task or task == "overall"]
        pooled = {}  # method -> counters summed over the selected tasks
        for cnt in cs:
            p = pooled.setdefault(cnt["method"], {})
            for key, v in cnt.items():
                p[key] = v if isinstance(v, str) or key == "k" else p.get(key, 0) + v
        rows = [decode_rates(p, pooled) for p in pooled.values()]
        for r in rows:
            if "tau" in r:  # the cost model above, from the measured draft time per round and t(k+1)
                t_draft = 1e3 * r["draft_s"] / r["rounds"]
                r["model_speedup"] = r["tau"] * t_ms[1] / (t_draft + t_ms[r["block_size"] + 1])
            g = lambda k, spec: (spec.format(r[k]) if k in r else "-")  # noqa: E731
            print(f"{task:12s} {r['method']:9s} {g('tau', '{:.2f}'):>5s} {r['tokens_per_s']:7.1f} "
                  f"{g('vs_plain', '{:.2f}x'):>8s} {g('vs_lookup', '{:.2f}x'):>9s} {g('model_speedup', '{:.2f}x'):>6s} "
                  f"{g('draft_s', '{:.2f}'):>7s} {g('verify_s', '{:.2f}'):>8s} "
                  f"{round(r['same_as_plain'] * r['prompts']):>11d}/{r['prompts']}")
        if task == "overall":
            results["overall"] = rows
        else:
            results["tasks"][task] = rows
    print("target step cost (one cached forward after 200 tokens): " + ", ".join(
        f"{k} tok {t_ms[k]:.1f} ms" for k in steps) + "; model = tau * t(1) / (draft ms per round + t(k+1))")
    return results


def machine(device):
    m = dict(host=platform.node(), cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
             torch_threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version())
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name()
    return m


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    for name in ("loss", "tree", "train", "decode"):
        s = sub.add_parser(name)
        s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
        s.add_argument("--out", default=None, help="JSON file to write")
        s.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on cpu, see above)")
        if name == "loss":
            for k in ("N", "H", "V", "r"):
                s.add_argument(f"--{k}", type=int, default=None, help="override the device's default geometry")
            s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
            s.add_argument("--repeats", type=int, default=5, help="timed steps after the measured one")
            s.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the 4 variants (median)")
            s.add_argument("--chunk", type=int, default=0, help="override kernels.VOCAB_CHUNK (PyTorch path)")
            s.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: LOSS:IMPL
        if name == "tree":
            s.add_argument("--prefix", type=int, nargs="+", default=None, help="cached tokens (default by device)")
            s.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32, 64], help="tree tokens")
            s.add_argument("--repeats", type=int, default=20, help="timed attention calls (median)")
            s.add_argument("--target", default="", help="decoding target ('' = the drafter's, else smollm2)")
            s.add_argument("--checkpoint", default="", help="drafter ('' = out/demo/dspark/step_latest or random)")
            s.add_argument("--budgets", type=int, nargs="+", default=[0, 16, 32], help="tree nodes (0 = block size)")
            s.add_argument("--num_prompts", type=int, default=4, help=f"prompts decoded (<= {len(TREE_PROMPTS)})")
            s.add_argument("--max_new_tokens", type=int, default=64)
        if name == "train":
            s.add_argument("--drafters", nargs="+", choices=["dspark", "dflash", "eagle3"],
                           default=["dspark", "dflash", "eagle3"])
            s.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (0 = the recipe's max_len)")
            s.add_argument("--batch", type=int, default=0, help="sequences per step (0 = the recipe's micro batch)")
            s.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (median)")
            s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the recipe's")
            s.add_argument("--online", action="store_true", help="also build the target and time its feature forward")
            s.add_argument("--geometry", choices=["qwen3_4b", "gemma4_12b"], default="qwen3_4b", help="cuda target")
            s.add_argument("--target", default="", help=argparse.SUPPRESS)  # tests: tiny-qwen3
        if name == "decode":
            s.add_argument("--target", default="", help="'' = the target in the drafter's config.json")
            s.add_argument("--checkpoint", default="", help="'' = out/demo/dspark/step_latest, then drafters/smollm2_dspark")
            s.add_argument("--tasks", nargs="+", default=["gsm8k", "humaneval"])
            s.add_argument("--data_dir", default="../shared/eval_datasets", help="folder of <task>.jsonl (evaluate.py)")
            s.add_argument("--num_prompts", type=int, default=4, help="the first N prompts of each task")
            s.add_argument("--max_new_tokens", type=int, default=128)
            s.add_argument("--num_drafts", type=int, nargs="+", default=[0, 2, 3, 4],
                           help="drafts per round (0 = the drafter's)")
            s.add_argument("--repeats", type=int, default=10, help="timed target forwards per step cost (median)")
            s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: --device=cuda but torch sees no GPU; use --device=cpu")
    if getattr(args, "chunk", 0):
        kernels.VOCAB_CHUNK = args.chunk
    if args.bench == "tree" and args.prefix is None:
        args.prefix = [2048, 4096, 8192] if args.device == "cuda" else [512, 2048]
    if args.device == "cpu":
        args.threads = args.threads or 1
        torch.set_num_threads(args.threads)
    if getattr(args, "variant", None):  # subprocess: measure one variant, print one JSON line
        loss, impl = args.variant.split(":")
        geo = dict(N=args.N, H=args.H, V=args.V, r=args.r, dtype=args.dtype)
        print(json.dumps(run_variant(loss, impl, args.device, geo, args.repeats)))
        return
    results = dict(loss=bench_loss, tree=bench_tree, train=bench_train, decode=bench_decode)[args.bench](args)
    record = dict(bench=args.bench, device=args.device, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  machine=machine(args.device), results=results)
    if args.out:
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:  # no half-written report
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
