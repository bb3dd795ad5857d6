"""
Measured performance numbers. One subcommand per measurement; each prints a table and, with --out,
writes one JSON {"bench": name, "device": ..., "date": ..., "machine": {...}, "results": {...}}.

    python bench.py loss --device=cpu --out=out/bench_loss_cpu.json    # fused vs naive vocab losses
    python bench.py loss --device=cpu --rounds=3 --out=...             # 3 interleaved rounds (noisy hosts)
    python bench.py loss --device=cuda --out=out/bench_loss_cuda.json  # 1 GPU, Qwen3-4B geometry, bf16
    python bench.py loss --device=cpu --N=64 --V=4096 --repeats=1      # quick look at a smaller shape
    python bench.py tree --device=cuda --out=out/bench_tree_cuda.json  # tree attention kernel + chain vs tree decoding
    python bench.py tree --device=cpu --out=out/bench_tree_cpu.json    # chain vs tree decoding (smollm2), CPU attention
    python bench.py train | decode                                     # not built yet (exit code 2)

`loss`: forward + backward of soft CE (Eagle3) and DSpark's 0.1 ce + 0.9 l1 with the low-rank Markov
bias, naive (full [N, V] softmaxes) vs fused (kernels.py), each variant in a fresh subprocess. Peak
memory above the baseline once the inputs exist: cuda, max_memory_allocated after a reset; cpu, VmHWM
after writing "5" to /proc/self/clear_refs (resets the peak-RSS counter) minus VmRSS before the step
(fallback ru_maxrss, reported as such). Both include the returned gradients (grad Bm: 50 MB on cpu).
`tree`: tree attention at Qwen3-4B heads (32/8, hd 128) for --prefix x --nodes: the Triton kernel (cuda),
the PyTorch reference and SDPA with a mask, with max errors; then greedy decoding with --target and
--draft (default the demo's DSpark, else a random one): chain vs trees of --budgets nodes (0 = block
size: equal budget), tau, tokens/s, and whether outputs equal the chain's.
Times are medians over --repeats (and --rounds). On cpu torch runs 1 thread unless --threads says
otherwise: on a shared 2-core machine a 2-thread op waits at an OpenMP barrier for a descheduled thread.
"""
import argparse
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

import evaluate
import kernels
from target import load_target

GEOMETRY = {  # N rows (tokens), hidden H, vocab V, Markov rank r
    "cpu": dict(N=448, H=576, V=49152, r=256, dtype="float32"),  # SmolLM2-135M
    "cuda": dict(N=3584, H=2560, V=151936, r=256, dtype="bfloat16"),  # Qwen3-4B
}
NOT_BUILT = {"train": "the train.py issue", "decode": "the evaluate.py issue"}
TREE_PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a hash map works.",
                "List five fruits and their colors.", "What causes the seasons on Earth?"]

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
        fn = kernels.fused_soft_ce if impl == "fused" else kernels.naive_soft_ce
        out = fn(x["hd"], x["ht"], x["W"], weights=x["weights"]).sum()
    else:  # DSpark's loss terms (the BCE of the confidence head needs no vocabulary)
        fn = kernels.fused_dspark_loss if impl == "fused" else kernels.naive_dspark_loss
        ce, l1, _ = fn(x["hd"], x["ht"], x["labels"], x["W"], bias=(x["A"], x["Bm"]), weights=x["weights"])
        out = (0.1 * ce + 0.9 * l1).sum()
    out.backward()


def run_variant(loss, impl, device, geo, repeats):
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _step(loss, impl, _inputs(loss, 8, 16, 512, 4, geo["dtype"], device))  # warm-up: library init
    x = _inputs(loss, geo["N"], geo["H"], geo["V"], geo["r"], geo["dtype"], device)
    gc.collect()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            method = "VmHWM after clear_refs"
        except OSError:
            method = "ru_maxrss (not resettable)"
        base = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    _step(loss, impl, x)
    sync()
    first_s = time.perf_counter() - t0
    if cuda:
        peak, method = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    elif method.startswith("VmHWM"):
        peak = _status_kb("VmHWM") * 1024 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
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
    draft = args.draft or os.path.join(here, "out", "demo", "dspark", "step_latest")
    if os.path.exists(os.path.join(draft, "config.json")):
        path, cfg = evaluate.resolve_draft(draft)
        c = cfg.get("text_config", cfg)
        target = load_target(args.target or evaluate.target_of(cfg), device=args.device,
                             layer_ids=c.get("target_layer_ids"), mask_token_id=cfg.get("mask_token_id"))
        drafter = evaluate.load_drafter(path, target)
    else:
        from model_dspark import DSpark
        target, draft = load_target(args.target or "smollm2", device=args.device), "random init (DSpark defaults)"
        torch.manual_seed(0)
        drafter = DSpark.from_target(target).eval()
    K = evaluate.drafter_block_size(drafter)
    prompts = [target.render_prompt([{"role": "user", "content": p}]) for p in TREE_PROMPTS[:args.prompts]]
    base_s, base_n = 0.0, 0
    for ids in prompts:  # plain decoding: the reference tokens/s
        out, sec = evaluate.plain_generate(target, ids, args.max_new_tokens)
        base_s, base_n = base_s + sec, base_n + len(out)
    rows, chain_ids = [], None
    for budget in [0] + [b or K for b in args.budgets]:
        res = [evaluate.speculative_generate(target, drafter, ids, args.max_new_tokens, block_size=K,
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
        if name == "loss":
            for k in ("N", "H", "V", "r"):
                s.add_argument(f"--{k}", type=int, default=None, help="override the device's default geometry")
            s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
            s.add_argument("--repeats", type=int, default=5, help="timed steps after the measured one")
            s.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the 4 variants (median)")
            s.add_argument("--chunk", type=int, default=0, help="override kernels.VOCAB_CHUNK (PyTorch path)")
            s.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on cpu, see above)")
            s.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: LOSS:IMPL
        if name == "tree":
            s.add_argument("--prefix", type=int, nargs="+", default=None, help="cached tokens (default by device)")
            s.add_argument("--nodes", type=int, nargs="+", default=[8, 16, 32, 64], help="tree tokens")
            s.add_argument("--repeats", type=int, default=20, help="timed attention calls (median)")
            s.add_argument("--target", default="", help="decoding target ('' = the drafter's, else smollm2)")
            s.add_argument("--draft", default="", help="drafter folder ('' = out/demo/dspark/step_latest or random)")
            s.add_argument("--budgets", type=int, nargs="+", default=[0, 16, 32], help="tree nodes (0 = block size)")
            s.add_argument("--prompts", type=int, default=4, help=f"prompts decoded (<= {len(TREE_PROMPTS)})")
            s.add_argument("--max_new_tokens", type=int, default=64)
            s.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on cpu)")
    args = p.parse_args(argv)
    if args.bench in NOT_BUILT:
        print(f"bench.py {args.bench}: not built yet (see {NOT_BUILT[args.bench]})")
        sys.exit(2)
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
    results = bench_tree(args) if args.bench == "tree" else bench_loss(args)
    record = dict(bench=args.bench, device=args.device, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  machine=machine(args.device), results=results)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
