"""
Train a drafter (DSpark, DFlash or Eagle3) for a frozen target, on one CPU or many GPUs.

CPU demo (SmolLM2-135M target, answers from `python build_cache.py configs/dspark_smollm2.py --stage=answers`):
    python train.py configs/dspark_smollm2.py
one GPU:
    python train.py configs/dspark_qwen3_4b.py
8 GPUs on one node (DDP; the drafter is small enough to replicate):
    torchrun --nproc_per_node=8 train.py configs/dspark_qwen3_4b.py
several nodes:
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_endpoint=HOST:29500 train.py configs/dspark_qwen3_4b.py

Data (DESIGN.md): `data_mode=online` runs the frozen target inside the job and trains on its own features
(nothing on disk but the answers, no rounding beyond the compute dtype); `data_mode=offline` reads
build_cache.py shards (bf16 by default, as DeepSpec; fp8 on request). With a bf16 target both give
identical batches.
Loss normalization is DeepSpec's (REFERENCE.md s.4): a DSpark/DFlash micro-step is divided by its supervised
weight summed over all ranks, an Eagle3 micro-step by B*T of its own micro-batch, and the micro-steps of an
optimizer step are averaged. Micro-step m of all ranks reads world x micro_batch_size consecutive samples
of the global stream.
Determinism: sample g of the global stream is fixed by (seed, g); each sample's random anchors come from
a generator seeded by (seed, sample_id, step). So the update depends on the global batch and on the
samples per micro-step over all ranks (world x micro_batch_size), not otherwise on the process count, and
a resume (even on another process count with the same world x micro_batch_size) continues the same stream.
"""
import contextlib
import functools
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from build_cache import CacheReader, make_record, read_answers, render_sample  # the data path
from configurator import NON_NEGATIVE, POSITIVE, Range, atomic_path, check_ranges, configure, cut_log, \
    init_distributed, verify_checksums, write_checksums
from evaluate import measure_tau
from model_dflash import upgrade
from target import check_geometry, load_target, new_drafter

# --- defaults: configs/*.py and --key=value override these ----------------------------------------
# target and data
target = "smollm2"               # hub id, local path or alias (smollm2, tiny-qwen3, tiny-llama)
target_layer_ids = None          # None = default_layer_ids(L) (or the tiny alias's list)
target_geometry = None           # {layers, hidden, heads, kv_heads, head_dim, vocab}: checked at load time
data_mode = "online"             # online | offline
cache_dir = "out/cache"          # answers.jsonl (both modes) and feature shards (offline)
max_len = 4096                   # tokens per training sequence
min_supervised = 14              # samples with fewer supervised tokens are dropped (as build_cache.py does)
keep_truncated = True            # keep answers cut by the generation budget (their end is not supervised)
out_dir = "out/train"
# drafter
drafter = "dspark"               # dspark | dflash | eagle3
block_size = 7
num_draft_layers = 5             # Eagle3 uses 1
mask_token_id = None             # None = the target's (smollm2: a fixed special token)
markov_rank = 256
markov_head_type = "vanilla"     # vanilla | gated | rnn
enable_confidence_head = True
num_anchors = 512                # anchors per sequence (DSpark/DFlash)
loss_decay_gamma = 4.0           # slot weights exp(-k/gamma)
ttt_length = 7                   # Eagle3 training-time-test steps
step_loss_decay = 0.8            # Eagle3 step weights 0.8^k
draft_vocab_size = 0             # 0 = full vocabulary (DeepSpec); >0 = most frequent answer tokens
save_frozen = True               # False: omit embed_tokens/lm_head from checkpoints (re-tied from the target)
# optimization (REFERENCE.md s.7)
global_batch_size = 512          # sequences per optimizer step, all ranks together
micro_batch_size = 1             # sequences per forward on one rank
epochs = 10
max_steps = 0                    # 0 = derived from epochs
learning_rate = 6e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
warmup_frac = 0.04
# system
device = ""                      # "" = cuda if available else cpu
dtype = "float32"                # bfloat16: autocast with fp32 master weights (GPU)
seed = 0
log_interval = 10
save_interval = 1000
keep_last = 3                    # step_<N> checkpoints kept (step_latest always points at the newest)
eval_interval = 0                # every N steps: real speculative-decoding tau on held-out prompts (0 = off)
eval_prompts = 8                 # held-out answers (excluded from training) used for that tau
eval_max_new_tokens = 64
resume = True                    # continue from out_dir/step_latest when it exists
config = configure(globals())
# refused before any work: these values would delete checkpoints, divide by zero or train on nothing
check_ranges("train", config, {
    **dict.fromkeys(("keep_last", "save_interval", "log_interval", "epochs", "global_batch_size", "micro_batch_size",
                     "num_anchors", "block_size"), POSITIVE),
    "max_steps": Range(lambda v: v >= 0, ">= 0 (0 = from epochs)"), "learning_rate": Range(lambda v: v > 0, "> 0"),
    "grad_clip": Range(lambda v: v >= 0, ">= 0 (0 = off)"), "warmup_frac": Range(lambda v: 0 <= v <= 1, "in [0, 1]"),
    **dict.fromkeys(("eval_interval", "draft_vocab_size", "markov_rank"), NON_NEGATIVE),
    "data_mode": Range(lambda v: v in ("online", "offline"), "online or offline"),
    "drafter": Range(lambda v: v in ("dspark", "dflash", "eagle3"), "dspark, dflash or eagle3")})

# --- out_dir: continue the run it holds (resume, from the newest complete checkpoint), never overwrite it -----
os.makedirs(out_dir, exist_ok=True)
latest, metrics_path = os.path.join(out_dir, "step_latest"), os.path.join(out_dir, "metrics.jsonl")
saved = sorted((int(d[5:]) for d in os.listdir(out_dir) if d[:5] == "step_" and d[5:].isdigit()), reverse=True)


def complete(path):
    return all(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "train_state.pt", "config.json"))


ckpt = next((p for p in [latest] + [os.path.join(out_dir, f"step_{s}") for s in saved] if complete(p)), None)
if not resume and (saved or os.path.lexists(latest) or os.path.exists(metrics_path)):
    raise SystemExit(f"train: {out_dir} holds another run (resume=False would overwrite its checkpoints and mix both "
                     f"runs in metrics.jsonl): pass --resume=True to continue it, or another --out_dir")
if resume and saved and ckpt is None:
    raise SystemExit(f"train: {out_dir} holds no complete checkpoint to resume from (step_<N>/ with model.safetensors, "
                     f"train_state.pt and config.json): move it away or pass another --out_dir")

# --- distributed init: plain torchrun, one process works unchanged ------------------------------
rank, world, device = init_distributed(device)
ddp, master = dist.is_initialized(), rank == 0
if resume and ckpt:  # read and checked before any work: a damaged file or another drafter's run stops in one line
    fix = f"move {os.path.realpath(ckpt)} away to resume from the checkpoint before it, or pass another --out_dir"
    verify_checksums(os.path.realpath(ckpt), fix, "train: ")
    try:  # without checksums.json (older checkpoints) a truncated or garbled file shows here
        was = json.load(open(os.path.join(ckpt, name := "nanospec_config.json")))
        state = torch.load(os.path.join(ckpt, name := "train_state.pt"), map_location=device, weights_only=True)
        weights = load_file(os.path.join(ckpt, name := "model.safetensors"), device=str(device))
    except Exception as e:
        raise SystemExit(f"train: {os.path.realpath(ckpt)}/{name} cannot be read ({type(e).__name__}): {fix}") from None
    shape = ["drafter", "target", "target_layer_ids", "num_draft_layers", "draft_vocab_size"] + {  # what the run is
        "dspark": ["block_size", "markov_rank", "markov_head_type", "enable_confidence_head"], "dflash": ["block_size"],
        "eagle3": []}[drafter]
    diff = [k for k in shape if k in was and was[k] != json.loads(json.dumps(config[k]))]
    if diff:
        raise SystemExit(f"train: {out_dir} holds a {was.get('drafter')} run: " + ", ".join(
            f"{k}={was[k]!r} (asked: {config[k]!r})" for k in diff) + "; pass another --out_dir for a new run, or " +
            " ".join(f"--{k}={was[k]}" for k in diff) + " to continue it")
if global_batch_size % (world * micro_batch_size):
    raise SystemExit(f"train: global_batch_size {global_batch_size} must be a multiple of world size {world} x "
                     f"micro_batch_size {micro_batch_size}: change either")
accum = global_batch_size // (world * micro_batch_size)  # gradient accumulation derived from the global batch
torch.manual_seed(seed)
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" and "cuda" in device \
    else torch.autocast("cpu", enabled=False)

# --- target and data ------------------------------------------------------------------------------
tgt = load_target(target, dtype=dtype, device=device, layer_ids=target_layer_ids, mask_token_id=mask_token_id)
check_geometry(tgt, target_geometry)
answers_path = os.path.join(cache_dir, "answers.jsonl")
if not os.path.exists(answers_path):
    raise SystemExit(f"train: no answers at {answers_path}; run `python build_cache.py <config> --stage=answers`"
                     f" (online) or `python build_cache.py <config>` (offline) first")
answers = read_answers(answers_path)
held_out = answers[len(answers) - eval_prompts:] if eval_interval else []
if data_mode == "offline":
    reader = CacheReader(cache_dir)
    reader.validate(target_name=target, layer_ids=tgt.layer_ids, hidden_size=tgt.config.hidden_size)
    held = {a["sample_id"] for a in held_out}
    pool = [i for i in range(len(reader)) if reader.sample_id(i) not in held]
    get_record = lambda i: reader[i]  # noqa: E731
else:  # online: the same samples build_cache.py keeps: truncation policy and minimum supervision, decided by rendering
    cut = lambda a: a.get("finish_reason") == "length"  # noqa: E731
    train_answers = [a for a in answers[:len(answers) - len(held_out)] if keep_truncated or not cut(a)]
    train_answers = [a for a in train_answers
                     if int(render_sample(tgt, a["messages"], max_len, cut(a))[1].sum()) >= min_supervised]
    pool = list(range(len(train_answers)))
    get_record = lambda i: make_record(tgt, train_answers[i]["messages"], train_answers[i]["sample_id"],  # noqa: E731
                                       max_len, truncated=cut(train_answers[i]))
N = len(pool)
if N == 0:
    raise SystemExit(f"train: no training samples in {cache_dir}")
steps_per_epoch = max(1, N // global_batch_size)
max_steps = max_steps or epochs * steps_per_epoch


@functools.lru_cache(maxsize=2)
def epoch_permutation(epoch):
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def stream_index(g):
    """Global sample index g -> index into the pool: a fresh permutation per epoch, fixed by (seed, epoch)."""
    epoch, i = divmod(g, N)
    return pool[epoch_permutation(epoch)[i]]


def answer_tokens(i):
    """(input_ids, loss_mask) of pool sample i, without running the target (online: rendering only)."""
    if data_mode == "offline":
        r = reader[i]
        return r["input_ids"], r["loss_mask"]
    return render_sample(tgt, train_answers[i]["messages"], max_len, cut(train_answers[i]))[:2]


def collate(records):
    """Right-pad a list of records into the training batch of DESIGN.md (padding has loss_mask 0)."""
    T = max(len(r["input_ids"]) for r in records)
    pad = lambda x, n: torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1) + [0, n])  # noqa: E731
    batch = {k: torch.stack([pad(r[k], T - len(r["input_ids"])) for r in records]).to(device)
             for k in ("input_ids", "loss_mask", "taps", "last_hidden")}
    batch["sample_id"] = torch.tensor([r["sample_id"] for r in records], device=device)
    batch["lengths"] = torch.tensor([len(r["input_ids"]) for r in records], device=device)
    return batch


def sample_generators(sample_ids, step):
    """One generator per sample, seeded by (seed, sample_id, step): anchors never depend on the batch."""
    return [torch.Generator(device=device).manual_seed((seed * 1_000_003 + int(s)) * 1_000_003 + step)
            for s in sample_ids]


# --- model ---------------------------------------------------------------------------------------
model = new_drafter(drafter, tgt, config).to(device)  # the config's drafter keys; each ignores what it does not use
if draft_vocab_size:  # the reduced head keeps the most frequent tokens of the training answers (DESIGN.md);
    # ties (often: tokens never seen in answers) go to tokens of the prompts, then to low ids: BPE merges are
    # numbered roughly by corpus frequency. Measured on SmolLM2: eval-prompt coverage 79% -> 90% at 8192.
    V, samples = tgt.config.vocab_size, list(map(answer_tokens, pool[:2000]))
    answer = torch.bincount(torch.cat([ids[m.bool()] for ids, m in samples]).cpu(), minlength=V)
    every = torch.bincount(torch.cat([ids for ids, _ in samples]).cpu(), minlength=V)
    order = torch.argsort(every, descending=True, stable=True)  # the tie-break first, then the main key:
    order = order[torch.argsort(answer[order], descending=True, stable=True)]  # stable sorts keep the ties' order
    model.set_draft_vocab(order[:draft_vocab_size].sort().values, tgt.lm_head_weight)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay)
if master:
    print(f"train: {drafter} with {sum(p.numel() for p in params) / 1e6:.1f}M trainable parameters; "
          f"{N} samples, {world} rank(s) x {accum} micro-steps x {micro_batch_size} = {global_batch_size} "
          f"sequences/step, {max_steps} steps ({steps_per_epoch} per epoch)")

# --- resume ----------------------------------------------------------------------------------------
step = 0
if resume and ckpt:  # step_latest, or the newest complete step_<N> when step_latest is dangling or incomplete
    model.load_state_dict({**model.state_dict(), **upgrade(weights, tgt.config.vocab_size)})  # format 1 -> 2
    optimizer.load_state_dict(state["optimizer"])
    step = state["step"]
    if master:
        print(f"train: resumed from {os.path.realpath(ckpt)} at step {step}" + (ckpt != latest) * " (step_latest broken)")
raw_model = model
if ddp:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if "cuda" in device else None)


def get_lr(it):
    """Linear warmup over warmup_frac of the steps, then cosine to 0 (REFERENCE.md s.7)."""
    warmup = max(1, int(warmup_frac * max_steps))
    if it < warmup:
        return learning_rate * (it + 1) / warmup
    return learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, max_steps - warmup))))


def save_checkpoint(step):
    """out_dir/step_<N>/ = drafter (DeepSpec layout) + train_state.pt; step_latest -> newest; keep last k."""
    bad = next((k for k, v in raw_model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad is not None:  # a broken update never becomes step_latest nor rotates good checkpoints out
        raise SystemExit(f"train: refusing to save step {step}: {bad} is not finite (the update overflowed): lower "
                         f"learning_rate; a rerun resumes from step_latest, the last good checkpoint")
    path = os.path.join(out_dir, f"step_{step}")
    raw_model.save_pretrained(path, include_frozen=save_frozen)
    with atomic_path(os.path.join(path, "train_state.pt")) as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "samples_seen": step * global_batch_size}, tmp)
    with atomic_path(os.path.join(path, "nanospec_config.json")) as tmp, open(tmp, "w") as f:
        json.dump(config, f, indent=1)
    write_checksums(path, ["model.safetensors", "config.json", "train_state.pt", "nanospec_config.json"])
    with atomic_path(latest) as tmp:  # step_latest is always a complete checkpoint
        os.symlink(f"step_{step}", tmp)
    older = sorted(int(d[5:]) for d in os.listdir(out_dir) if d[:5] == "step_" and d[5:].isdigit() and int(d[5:]) < step)
    for old in older[:max(0, len(older) - keep_last + 1)]:  # never the one just saved nor a newer leftover
        shutil.rmtree(os.path.join(out_dir, f"step_{old}"), ignore_errors=True)


def all_reduce(t):
    """Sum over ranks, in place (a no-op on one process)."""
    if ddp:
        dist.all_reduce(t)
    return t


# --- training loop -----------------------------------------------------------------------------------
if master and (dropped := cut_log(metrics_path, step)):  # rows past the resumed step: a run killed before it saved them
    print(f"train: dropped {dropped} row(s) of {metrics_path} after step {step}: this run logs them again")
log = open(metrics_path, "a") if master else None
pbar = tqdm(total=max_steps, initial=step, disable=not master, desc=f"train {drafter}", dynamic_ncols=True)
t0, tokens = time.time(), 0
while step < max_steps:
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = {}
    for micro in range(accum):
        first = step * global_batch_size + (micro * world + rank) * micro_batch_size  # micro-step m: all ranks
        batch = collate([get_record(stream_index(g)) for g in range(first, first + micro_batch_size)])
        tokens += int(batch["lengths"].sum())
        sync = not ddp or micro == accum - 1  # all-reduce gradients only on the last micro-step
        with (model.no_sync() if not sync else contextlib.nullcontext()), autocast:
            loss_sum, metrics = model(batch, sample_generators(batch["sample_id"].tolist(), step))
            if raw_model.normalize_over_ranks:  # DSpark/DFlash: / this micro-step's weight on all ranks;
                weight = all_reduce(metrics["weight"].clone())  # x world, as DDP averages gradients over ranks
                loss = loss_sum * world / (weight + 1e-6)
            else:  # Eagle3: / B*T of this rank's micro-batch, DeepSpec's local mean
                loss = loss_sum / metrics["weight"]
            (loss / accum).backward()  # micro-steps averaged
        for k, v in {**metrics, "loss": loss / accum}.items():
            sums[k] = sums.get(k, 0) + v.detach().float()
    sums = {k: all_reduce(v.to(device)) for k, v in sums.items()}  # logged: sums over micro-steps and ranks
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)  # inf: no clipping
    if not (math.isfinite(float(sums["loss"])) and math.isfinite(float(grad_norm))):  # equal on all ranks
        raise SystemExit(f"train: step {step + 1}: objective {float(sums['loss'])}, gradient norm {float(grad_norm)}: "
                         f"not finite, stopped before the update and any save. Lower learning_rate or check the data "
                         f"in {cache_dir}; a rerun resumes from step_latest, the last good checkpoint")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    pbar.update(1)

    if master and (step % log_interval == 0 or step == max_steps):
        W = float(sums["weight"])
        accept = (sums["slot_accept"] / sums["slot_count"].clamp(min=1)).tolist()
        top1 = (sums["slot_top1"] / sums["slot_count"].clamp(min=1)).tolist()
        expected_tau = 1 + sum(math.prod(accept[:k + 1]) for k in range(len(accept)))
        dt = time.time() - t0
        row = dict(step=step, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tokens * world / dt,
                   **{k: float(v) / W for k, v in sums.items() if v.dim() == 0 and k not in ("weight", "loss")},
                   loss=float(sums["loss"]) / world,  # the objective: mean over ranks of the averaged micro-steps
                   slot_accept=accept, slot_top1=top1, expected_tau=expected_tau)
        log.write(json.dumps(row) + "\n")
        log.flush()
        pbar.set_postfix(loss=f"{row['loss']:.3f}", tau_tf=f"{expected_tau:.2f}",
                         tok_s=f"{row['tokens_per_s']:.0f}")
        t0, tokens = time.time(), 0
    if master and eval_interval and (step % eval_interval == 0 or step == max_steps):
        raw_model.eval()
        prompts = [[m["content"] for m in a["messages"] if m["role"] == "user"][:1] for a in held_out]
        res = measure_tau(tgt, raw_model, prompts, max_new_tokens=eval_max_new_tokens, temperature=0.0)
        raw_model.train()
        log.write(json.dumps(dict(step=step, eval_tau=res["tau"],
                                  eval_accept_rate_conditional=res["accept_rate_conditional"])) + "\n")
        log.flush()
        tqdm.write(f"step {step}: speculative tau {res['tau']:.2f} on {len(prompts)} held-out prompts")
    if master and (step % save_interval == 0 or step == max_steps):
        save_checkpoint(step)
    if ddp:
        dist.barrier()  # ranks leave together: nobody reads a half-written checkpoint

# --- cleanup -------------------------------------------------------------------------------------------
pbar.close()
if ddp:
    dist.destroy_process_group()
