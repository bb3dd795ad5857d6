"""train.py: DeepSpec's loss normalization, DDP == one process, exact resume (also on another process count),
online == offline, and every config builds its drafter at the real geometry on the meta device."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(args, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    p = subprocess.run(launcher + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Answers and bf16 feature shards from the tiny target (one build_cache.py run)."""
    d = str(tmp_path_factory.mktemp("cache"))
    run(["build_cache.py", TINY, f"--cache_dir={d}", "--cache_dtype=bf16", "--num_answers=16"])
    return d


def train(cache, out, steps, nproc=1, **kw):
    args = ["train.py", TINY, f"--cache_dir={cache}", f"--out_dir={out}", f"--max_steps={steps}",
            "--save_interval=2", "--learning_rate=1e-2"] + [f"--{k}={v}" for k, v in kw.items()]
    log = run(args, nproc)
    return load_file(os.path.join(out, "step_latest", "model.safetensors")), log


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0 if atol == 0 else 1e-4, atol=atol, msg=k)


def test_ddp_two_ranks_equals_one(cache, tmp_path):
    """torchrun with 2 gloo ranks x 2 sequences per micro-step makes the same updates as one process with 4:
    the same samples share each micro-step's normalizer (the tiny config: global batch 4)."""
    one, _ = train(cache, tmp_path / "one", 3, micro_batch_size=4)
    two, _ = train(cache, tmp_path / "two", 3, nproc=2, micro_batch_size=2)
    assert_same(one, two, atol=1e-5)


def test_resume_is_exact_and_survives_a_new_process_count(cache, tmp_path):
    """Stop at step 2 and resume to 4 (same or different process count, same sequences per micro-step over
    all ranks) == 4 uninterrupted steps."""
    full, _ = train(cache, tmp_path / "full", 4)
    train(cache, tmp_path / "cut", 2)
    resumed, log = train(cache, tmp_path / "cut", 4)
    assert "resumed from" in log
    assert_same(full, resumed)
    train(cache, tmp_path / "cut2", 2)
    resumed2, _ = train(cache, tmp_path / "cut2", 4, nproc=2, micro_batch_size=1)
    assert_same(full, resumed2, atol=1e-5)


@pytest.mark.parametrize("drafter", ["dspark", "eagle3"])
def test_normalization_is_deepspecs(cache, tmp_path, drafter):
    """The objective and gradient norm train.py logs at step 2 equal a by-hand computation from the step-1
    checkpoint (REFERENCE s.4): DSpark divides each micro-step by its own supervised weight, Eagle3 by B*T of its
    micro-batch, and micro-steps are averaged. The micro-steps (one sequence each) differ in supervised weight,
    so the old rule (one global supervised weight for the whole step) gives another number and would fail."""
    import json
    from build_cache import CacheReader
    from target import load_drafter
    from target import load_target
    out = tmp_path / drafter
    train(cache, out, 2, drafter=drafter, save_interval=1, log_interval=1, keep_last=5, num_anchors=64,
          micro_batch_size=1)
    row = [json.loads(line) for line in open(out / "metrics.jsonl")][1]
    assert row["step"] == 2
    model = load_drafter(str(out / "step_1"), load_target("tiny-qwen3")).train()
    reader = CacheReader(cache)
    N, seed, G, step = len(reader), 0, 4, 1  # tiny config: global batch 4 (here 4 micro-steps); 0-based step 1
    perm = lambda e: torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1_000_003 + e)).tolist()  # noqa
    objective, loss_sums, sup_weights = 0.0, [], []
    for g in range(step * G, (step + 1) * G):
        r = reader[perm(g // N)[g % N]]
        batch = {k: r[k][None] for k in ("input_ids", "loss_mask", "taps", "last_hidden")}
        batch["lengths"] = torch.tensor([len(r["input_ids"])])
        gen = torch.Generator().manual_seed((seed * 1_000_003 + r["sample_id"]) * 1_000_003 + step)
        loss_sum, m = model(batch, [gen])
        den = m["weight"] + 1e-6 if drafter == "dspark" else m["weight"]  # DSpark: DeepSpec's epsilon
        objective = objective + loss_sum / den / G
        loss_sums.append(loss_sum.item())
        sup_weights.append(m["weight"].item() if drafter == "dspark" else
                           sum(0.8 ** k * float(c) for k, c in enumerate(m["slot_count"])))
    objective.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert row["loss"] == pytest.approx(objective.item(), rel=2e-5)
    assert row["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-3)  # 4 accumulated backward passes vs 1
    assert max(sup_weights) > 1.05 * min(sup_weights)  # unequal micro-steps: the rules differ here
    old = sum(loss_sums) / sum(sup_weights)  # the old rule: one global supervised weight (4e-4 away for DSpark here)
    assert abs(old - row["loss"]) > 1e-4 * row["loss"]


@pytest.fixture(scope="module")
def bf16_cache(tmp_path_factory):
    """A bf16 cache of a bf16 target: online mode (no rounding) then computes the very same features."""
    d = str(tmp_path_factory.mktemp("cache16"))
    run(["build_cache.py", TINY, f"--cache_dir={d}", "--num_answers=16", "--dtype=bfloat16"])
    return d


def test_online_equals_offline(bf16_cache, tmp_path):
    """With a bf16 target, online training (the target's own features) and a bf16 cache give the same batches,
    hence the same parameters."""
    off, _ = train(bf16_cache, tmp_path / "off", 2, data_mode="offline", dtype="bfloat16")
    on, _ = train(bf16_cache, tmp_path / "on", 2, data_mode="online", dtype="bfloat16")
    assert_same(off, on)


def test_online_record_equals_cached_record(bf16_cache):
    """make_record (online) and CacheReader (offline) yield identical tensors for the same sample (bf16 target)."""
    from build_cache import CacheReader, make_record, read_answers
    from target import load_target
    t = load_target("tiny-qwen3", dtype="bfloat16")
    reader = CacheReader(bf16_cache)
    answers = {a["sample_id"]: a for a in read_answers(os.path.join(bf16_cache, "answers.jsonl"))}
    for i in range(min(4, len(reader))):
        rec = reader[i]
        a = answers[rec["sample_id"]]
        online = make_record(t, a["messages"], rec["sample_id"], max_len=128,
                             truncated=a.get("finish_reason") == "length")  # a cut answer's end is not supervised
        for k in ("input_ids", "loss_mask", "taps", "last_hidden"):
            assert torch.equal(rec[k], online[k]), k


def test_online_features_are_not_rounded():
    """Online mode trains on the target's own features: an fp32 target's taps and last hidden states reach the
    record unchanged (the old path rounded them to fp8, 0.033 total variation on SmolLM2's distributions)."""
    from build_cache import make_record, render_sample
    from target import load_target
    t = load_target("tiny-qwen3")
    msgs = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5, so 5."}]
    rec = make_record(t, msgs, 0)
    ids, _, hidden_mask = render_sample(t, msgs)
    taps, last = t.features(ids[None])
    assert torch.equal(rec["taps"], taps[0]) and rec["taps"].dtype == torch.float32
    assert torch.equal(rec["last_hidden"][hidden_mask.bool()], last[0][hidden_mask.bool()])
    assert not torch.equal(taps[0].bfloat16().float(), taps[0])  # bf16 rounding would have been visible


def test_metrics_log_and_checkpoint_layout(cache, tmp_path):
    """metrics.jsonl has the loss terms and per-slot acceptance; checkpoints keep the last k."""
    import json
    train(cache, tmp_path / "m", 6, keep_last=2)
    rows = [json.loads(line) for line in open(tmp_path / "m" / "metrics.jsonl")]
    assert rows[-1]["step"] == 6 and len(rows[-1]["slot_accept"]) == 4 and "expected_tau" in rows[-1]
    kept = sorted(d for d in os.listdir(tmp_path / "m") if d.startswith("step_"))
    assert kept == ["step_4", "step_6", "step_latest"]
    assert os.path.realpath(tmp_path / "m" / "step_latest").endswith("step_6")


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_builds_on_meta(path):
    """Each config parses (every key known, right types) and builds its drafter at the recorded target
    geometry on the meta device (no weights, no download), as train.py does (target.new_drafter); the Gemma-4-12B
    configs build DeepSpec's Gemma drafters (GEMMA4.md s.3)."""
    import transformers
    from bench import GEMMA4_12B
    from configurator import configure, script_defaults
    from target import new_drafter
    cfg = script_defaults(os.path.join(ROOT, "train.py"))
    configure(cfg, [path], verbose=False)
    if cfg["target"].startswith("tiny-") or cfg["target"] == "smollm2":
        from target import load_target
        hf = load_target(cfg["target"]).config if cfg["target"] != "smollm2" else \
            transformers.LlamaConfig(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152)
    elif cfg["target"].startswith("google/gemma-4"):
        hf = transformers.Gemma4UnifiedTextConfig(**GEMMA4_12B)
    else:
        g = cfg["target_geometry"]
        hf = transformers.Qwen3Config(num_hidden_layers=g["layers"], hidden_size=g["hidden"], num_attention_heads=g["heads"],
                                      num_key_value_heads=g["kv_heads"], head_dim=g["head_dim"], vocab_size=g["vocab"],
                                      intermediate_size={2560: 9728, 4096: 12288, 5120: 17408}[g["hidden"]])
    if cfg["target_geometry"]:  # the recorded geometry is the one built here
        assert all(hf.to_dict()[k] == cfg["target_geometry"][g] for g, k in
                   (("layers", "num_hidden_layers"), ("hidden", "hidden_size"), ("vocab", "vocab_size")))
    cfg = {**cfg, "target_layer_ids": cfg["target_layer_ids"] or [1, 8, 14, 21, 27],
           "mask_token_id": cfg["mask_token_id"] or 0}
    with torch.device("meta"):
        model = new_drafter(cfg["drafter"], hf, cfg)
    H = hf.hidden_size
    assert model.kind == cfg["drafter"] and type(model).__name__.startswith("Gemma4") == ("gemma4" in path)
    assert model.state_dict()["fc.weight"].shape == (H, len(cfg["target_layer_ids"]) * H)
    assert all(p.device.type == "meta" for p in model.parameters())


# --- nothing lost, nothing silently wrong: each test below fails on the code before the fix -----------------

def refused(args):
    """Run train.py where it must stop -> its one-line message (tqdm's bar may precede and follow it)."""
    p = subprocess.run([sys.executable, "train.py", TINY] + args, cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0, "train.py exited 0:\n" + p.stdout[-2000:] + p.stderr[-2000:]
    return re.findall(r"train: [^\r\n]*", p.stderr)[-1]


@pytest.fixture(scope="module")
def run4(cache, tmp_path_factory):
    """A 4-step run that saves every step and keeps 3: step_2, step_3, step_4, step_latest -> step_4."""
    out = tmp_path_factory.mktemp("run4") / "out"
    train(cache, out, 4, save_interval=1, keep_last=3)
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "out", symlinks=True)
    return tmp_path / "out"


def assert_intact(out, run):
    """out holds run's checkpoints unchanged (finite), step_latest -> step_4, and the same metrics.jsonl."""
    assert sorted(os.listdir(out)) == sorted(os.listdir(run)) and os.readlink(out / "step_latest") == "step_4"
    assert (out / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    for d in ("step_2", "step_3", "step_4"):
        w = load_file(out / d / "model.safetensors")
        assert_same(w, load_file(run / d / "model.safetensors"))
        assert all(v.isfinite().all() for v in w.values())


def nan_taps(cache, dst):
    """A copy of the cache whose taps are all NaN (bf16 0x7fc0), as a target that overflowed would have written
    them: the manifest's checksums are those of the NaN shards, so only the finiteness guard can catch them."""
    import numpy as np
    from build_cache import CacheReader, record_layout
    from configurator import file_crc32
    shutil.copytree(cache, dst)
    r = CacheReader(str(dst))
    for _, T, nl, off, _, k in r.index.tolist():
        start, size = record_layout(T, nl, r.hidden_size, r.n_layers, r.cache_dtype)[0]["taps"]
        shard = np.memmap(os.path.join(dst, r.manifest["shards"][k]["file"]), np.uint8, "r+")
        shard[off + start:off + start + size].view(np.uint16)[:] = 0x7fc0
        shard.flush()
    for s in r.manifest["shards"]:
        s["crc32"] = file_crc32(os.path.join(dst, s["file"]))
    json.dump(r.manifest, open(os.path.join(dst, "manifest.json"), "w"))
    return dst


def test_non_finite_objective_stops_before_the_update(cache, run4, tmp_path):
    """Resuming on a corrupted cache (NaN taps): step 5's objective is NaN, so train.py stops with one line
    naming the step and the fix, before the update and any save. The old code kept stepping, exited 0, made a
    NaN step_8 step_latest and rotated step_2..4 out."""
    out = copy_of(run4, tmp_path)
    line = refused([f"--cache_dir={nan_taps(cache, tmp_path / 'bad')}", "--data_mode=offline", f"--out_dir={out}",
                    "--max_steps=8", "--save_interval=1", "--keep_last=3"])
    assert line.startswith("train: step 5: objective nan") and "learning_rate" in line and "resumes" in line
    assert_intact(out, run4)


def test_non_finite_weights_are_never_saved(run4, tmp_path):
    """save_checkpoint refuses a model with a NaN parameter (an update that overflowed on the last step, where no
    next forward would catch it): nothing is written, step_latest stays on step_4 and, even with keep_last=1,
    nothing is rotated out. The old save_checkpoint wrote it as step_latest and deleted step_2..4. (train.py runs
    on import, so its save_checkpoint is compiled alone against the globals it reads.)"""
    import ast
    import json
    from target import load_drafter
    from target import load_target
    out = copy_of(run4, tmp_path)
    model = load_drafter(str(run4 / "step_4"), load_target("tiny-qwen3"))
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "save_checkpoint")
    env = dict(os=os, json=json, shutil=shutil, torch=torch, raw_model=model, out_dir=str(out), save_frozen=True,
               latest=str(out / "step_latest"), optimizer=torch.optim.AdamW(model.parameters()), config={},
               global_batch_size=4, keep_last=1)
    exec(compile(ast.Module([fn], []), "train.py", "exec"), env)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match=r"train: refusing to save step 5: fc.weight is not finite .*learning_rate"):
        env["save_checkpoint"](5)
    assert_intact(out, run4)


@pytest.mark.parametrize("setting", ["keep_last=-1", "keep_last=0", "save_interval=0", "learning_rate=0.0",
                                     "warmup_frac=1.5", "micro_batch_size=0"])
def test_refused_settings(cache, tmp_path, setting):
    """Settings that would delete every checkpoint (keep_last <= 0: the old code left step_latest dangling),
    divide by zero or train on nothing stop at once, in one line naming the key, before out_dir exists."""
    key = setting.split("=")[0]
    line = refused([f"--cache_dir={cache}", f"--out_dir={tmp_path / 'out'}", f"--{setting}"])
    assert line.startswith(f"train: {key} must be") and f"--{key}" in line
    assert not (tmp_path / "out").exists()


def test_resume_false_refuses_an_out_dir_with_a_run(cache, run4, tmp_path):
    """resume=False into another run's out_dir stops, naming both fixes; the old code overwrote its checkpoints
    and appended a second run to its metrics.jsonl."""
    out = copy_of(run4, tmp_path)
    line = refused([f"--cache_dir={cache}", f"--out_dir={out}", "--resume=False", "--max_steps=4", "--save_interval=1"])
    assert "holds another run" in line and "--resume=True" in line and "--out_dir" in line
    assert_intact(out, run4)


@pytest.mark.parametrize("damage", ["dangling step_latest", "no train_state.pt in step_4"])
def test_resume_falls_back_to_the_newest_complete_checkpoint(cache, run4, tmp_path, damage):
    """A broken step_latest (its folder gone, or its train_state.pt missing) resumes from step_3, says so, and
    continues the same run (step_4 is made again, bit for bit); the old code restarted from step 0 silently."""
    out = copy_of(run4, tmp_path)
    if damage == "dangling step_latest":
        shutil.rmtree(out / "step_4")
    else:
        os.remove(out / "step_4" / "train_state.pt")
    _, log = train(cache, out, 4, save_interval=1, keep_last=3)
    assert f"resumed from {os.path.realpath(out / 'step_3')} at step 3 (step_latest broken)" in log
    assert os.readlink(out / "step_latest") == "step_4" and os.path.exists(out / "step_4" / "train_state.pt")
    assert_same(load_file(out / "step_4" / "model.safetensors"), load_file(run4 / "step_4" / "model.safetensors"))


def test_resume_stops_without_a_complete_checkpoint(cache, run4, tmp_path):
    """No step_<N> is complete: train.py stops with one line instead of restarting from step 0 over them."""
    out = copy_of(run4, tmp_path)
    for d in ("step_2", "step_3", "step_4"):
        os.remove(out / d / "train_state.pt")
    line = refused([f"--cache_dir={cache}", f"--out_dir={out}", "--max_steps=4", "--save_interval=1"])
    assert "no complete checkpoint" in line and "--out_dir" in line
    assert all(os.path.exists(out / d / "model.safetensors") for d in ("step_2", "step_3", "step_4"))


def test_load_drafter_refuses_non_finite_weights(run4, tmp_path):
    """evaluate.load_drafter stops on a drafter with a NaN weight, naming the file and the tensor."""
    from safetensors.torch import save_file
    from target import load_drafter
    from target import load_target
    d = tmp_path / "drafter"
    shutil.copytree(run4 / "step_4", d)
    weights = load_file(d / "model.safetensors")
    weights["fc.weight"][0, 0] = float("nan")
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    os.remove(d / "checksums.json")  # a checkpoint without checksums (DeepSpec's): the NaN check still stops it
    target = load_target("tiny-qwen3")
    load_drafter(str(run4 / "step_4"), target)  # the intact checkpoint loads
    with pytest.raises(SystemExit, match=r"model.safetensors holds NaN/inf in fc.weight; retrain"):
        load_drafter(str(d), target)


def flip_byte(path, offset_from_end=100):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


def test_flipped_bytes_in_a_checkpoint_or_a_shard_are_caught(cache, run4, tmp_path):
    """A byte flipped in a checkpoint's weights stops load_drafter and a resume with one line naming the file
    (without checksums.json the same file loads silently: the check is what catches it); a byte flipped in a
    feature shard stops CacheReader at the first read of that shard, naming it."""
    from build_cache import CacheReader
    from target import load_drafter
    from target import load_target
    out = copy_of(run4, tmp_path)
    flip_byte(out / "step_4" / "model.safetensors")
    target = load_target("tiny-qwen3")
    with pytest.raises(SystemExit, match=r"step_4/model.safetensors is corrupt"):
        load_drafter(str(out / "step_4"), target)
    line = refused([f"--cache_dir={cache}", f"--out_dir={out}", "--max_steps=5", "--save_interval=1"])
    assert "step_4/model.safetensors is corrupt" in line and "move" in line
    os.remove(out / "step_4" / "checksums.json")
    changed = load_drafter(str(out / "step_4"), target)  # power: the flipped weight loads without the check
    intact = load_drafter(str(run4 / "step_4"), target)
    assert any(not torch.equal(a, b) for a, b in zip(changed.state_dict().values(), intact.state_dict().values()))
    d = tmp_path / "cache"
    shutil.copytree(cache, d)
    shard = json.load(open(d / "manifest.json"))["shards"][0]
    assert len(shard["crc32"]) == 8
    flip_byte(d / shard["file"], 7)
    reader = CacheReader(str(d))
    with pytest.raises(SystemExit, match=f"shard {shard['file']} is corrupt.*rm "):
        reader[0]


@pytest.mark.parametrize("damage", ["train_state.pt", "model.safetensors"])
def test_damaged_checkpoint_without_checksums_stops_in_one_line(cache, run4, tmp_path, damage):
    """An older checkpoint (no checksums.json) whose train_state.pt or model.safetensors was cut short stops the
    resume before any work, in one line naming the file and the fixes; nothing is changed. The old code died in
    torch.load / safetensors with a traceback, after loading the target and the data."""
    out = copy_of(run4, tmp_path)
    os.remove(out / "step_4" / "checksums.json")
    os.truncate(out / "step_4" / damage, os.path.getsize(out / "step_4" / damage) // 2)
    line = refused([f"--cache_dir={cache}", f"--out_dir={out}", "--max_steps=5", "--save_interval=1"])
    assert f"{os.path.realpath(out / 'step_4')}/{damage} cannot be read" in line
    assert "move" in line and "the checkpoint before it" in line and "--out_dir" in line
    assert sorted(os.listdir(out)) == sorted(os.listdir(run4)) and os.readlink(out / "step_latest") == "step_4"
    assert (out / "metrics.jsonl").read_text() == (run4 / "metrics.jsonl").read_text()


@pytest.mark.parametrize("change", ["drafter=eagle3", "block_size=5", "markov_head_type=gated"])
def test_resume_refuses_another_drafter(cache, run4, tmp_path, change):
    """Resuming a DSpark run as another drafter, or with another setting that shapes it, stops before any work in one
    line: what the run is, what was asked, and both fixes; the run is intact. The old code died on the state dict
    (eagle3), on the optimizer state (gated), or silently trained a block-4 checkpoint as a block-5 drafter."""
    key = change.split("=")[0]
    was = json.load(open(run4 / "step_4" / "nanospec_config.json"))[key]
    out = copy_of(run4, tmp_path)
    line = refused([f"--cache_dir={cache}", f"--out_dir={out}", "--max_steps=5", "--save_interval=1", f"--{change}"])
    assert line.startswith(f"train: {out} holds a dspark run: {key}={was!r} (asked: ")
    assert "another --out_dir" in line and line.endswith(f"--{key}={was} to continue it")
    assert_intact(out, run4)


def test_resume_logs_each_step_once(cache, run4, tmp_path):
    """metrics.jsonl rows past the resumed step (logged by a run killed before it saved them, and a line cut
    mid-write) are dropped, said in one line, and logged again: resuming from step 2 a log that reached step 4 ends
    with one row per step, equal to the uninterrupted run's; an out_dir with a metrics.jsonl but no checkpoint (a run
    killed before its first save) starts it afresh. The old code appended to the old rows (steps 1, 2, 3, 4, 3, 4)."""
    rows = lambda p: [{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"} for r in open(p)]  # noqa: E731
    out = copy_of(run4, tmp_path)
    for d in ("step_3", "step_4"):
        shutil.rmtree(out / d)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lr": 0.0')
    _, log = train(cache, out, 4, save_interval=1, keep_last=3)
    assert rows(out / "metrics.jsonl") == rows(run4 / "metrics.jsonl")
    assert "at step 2 (step_latest broken)" in log and f"dropped 3 row(s) of {out}/metrics.jsonl after step 2" in log
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(run4 / "metrics.jsonl", fresh)
    _, log = train(cache, fresh, 4, save_interval=1, keep_last=3)
    assert rows(fresh / "metrics.jsonl") == rows(run4 / "metrics.jsonl")
    assert f"dropped 4 row(s) of {fresh}/metrics.jsonl after step 0" in log and "resumed" not in log
