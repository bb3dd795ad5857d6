"""Configuration: literals at the top of a script, then a config file, then the command line.

    python train.py configs/dspark_smollm2.py --max_steps=200 --learning_rate 3e-4

A script declares its defaults as plain assignments and then calls `config = configure(globals())`,
which overrides them in place and returns the effective config as a dict (printed once, stored in
checkpoints and reports). One config file serves every script: a key declared by any nanospec entry
script (SCRIPTS, read with `ast`, never imported) is accepted and ignored where it is unused; a key
no script declares, a wrong type or a malformed value stops with a message naming the key.

Also the plumbing every script shares: `atomic_path` (how every file nanospec writes is written), checksums
(`write_checksums` / `verify_checksums`), `cut_log` (a log resumed from a step) and `init_distributed` (how every
script starts under torchrun).
"""
import ast
import contextlib
import difflib
import json
import os
import re
import sys
import zlib

import torch
import torch.distributed as dist

SCRIPTS = ("build_cache.py", "train.py", "evaluate.py", "scheduler.py", "export.py")
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


def script_defaults(path):
    """Top-level `name = <literal>` assignments of a script, up to its configure() call."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "id", None) == "configure":
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return {k: v for k, v in out.items() if not k.startswith("_")}


# Keys that several scripts declare. Each means the same thing in every script that has it, so a config file
# sets it once for all; any other key belongs to one script (no name may mean two things: test_config checks).
SHARED_KEYS = {"target", "target_layer_ids", "cache_dir", "max_len", "min_supervised", "keep_truncated", "checkpoint",
               "num_drafts", "task", "data_dir", "max_new_tokens", "temperature", "out", "device", "dtype", "seed",
               "conf_threshold"}


def collisions(defaults_by_script):
    """{script: its defaults} -> problems: a key several scripts declare that SHARED_KEYS does not list, and pairs
    of keys one short suffix apart (draft / drafter, prompt / prompts), which are one typo from each other."""
    owners = {}
    for script, keys in defaults_by_script.items():
        for key in keys:
            owners.setdefault(key, []).append(script)
    problems = [f"{k} is declared by {', '.join(v)} but is not in configurator.SHARED_KEYS: rename it in all but one"
                for k, v in owners.items() if len(v) > 1 and k not in SHARED_KEYS]
    for a in owners:
        for b in owners:
            if a != b and b.startswith(a) and len(b) - len(a) <= 2:
                problems.append(f"{a} ({', '.join(owners[a])}) and {b} ({', '.join(owners[b])}) differ by a suffix")
    return problems


def known_keys():
    """Every key any nanospec script declares, with its default (for the type)."""
    paths = [os.path.join(HERE, name) for name in SCRIPTS]
    return {k: v for p in reversed(paths) if os.path.exists(p) for k, v in script_defaults(p).items()}


def check(key, value, known, source):
    """Type-check one override against the key's default; returns the (converted) value."""
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        raise SystemExit(f"config: unknown key '{key}' ({source})" +
                         (f"; did you mean: {', '.join(close)}?" if close else "; see the defaults of train.py, "
                          "evaluate.py and build_cache.py"))
    default = known[key]
    if default is None or value is None:
        return value
    want = type(default)
    if want is float and type(value) is int:      # integers are fine for float keys
        return float(value)
    if want in (list, tuple) and isinstance(value, (list, tuple)):
        return want(value)
    if type(value) is not want:
        raise SystemExit(f"config: key '{key}' expects {want.__name__} (default {default!r}), "
                         f"got {value!r} of type {type(value).__name__} ({source})")
    return value


def parse_value(key, raw, known):
    """Command-line text -> Python value, guided by the key's default type."""
    default = known.get(key)
    if isinstance(default, str):
        return raw
    if isinstance(default, bool) and raw.lower() in ("true", "false", "1", "0"):
        return raw.lower() in ("true", "1")
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if default is None:
            return raw                                  # untyped key: keep the text
        raise SystemExit(f"config: malformed value for '{key}': {raw!r} (expected {type(default).__name__})")


def parse_args(argv, known):
    """argv -> (config file or None, [(key, raw text)]); accepts --k=v, --k v and bare --flag for bools."""
    config_file, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if config_file is not None or not arg.endswith(".py"):
                raise SystemExit(f"config: unexpected argument {arg!r}: give at most one config file "
                                 f"(configs/*.py) and then --key=value overrides")
            config_file = arg
        elif "=" in arg:
            key, raw = arg[2:].split("=", 1)          # values may themselves contain '='
            pairs.append((key, raw))
        else:
            key = arg[2:]
            if isinstance(known.get(key), bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                pairs.append((key, "True"))
            elif i + 1 < len(argv):
                pairs.append((key, argv[i + 1]))
                i += 1
            else:
                raise SystemExit(f"config: --{key} needs a value (--{key}=VALUE)")
        i += 1
    return config_file, pairs


def configure(defaults, argv=None, verbose=True):
    """Apply configs/*.py then --key=value to `defaults` (a script's globals()); return the config dict."""
    argv = sys.argv[1:] if argv is None else argv
    # a script's keys are its literal assignments before configure() (not what it imported, e.g. a dict)
    names = script_defaults(defaults["__file__"]) if "__file__" in defaults else defaults
    own = {k: defaults[k] for k in names
           if k in defaults and not k.startswith("_") and isinstance(defaults[k], CONFIG_TYPES)}
    known = {**known_keys(), **own}
    config_file, pairs = parse_args(argv, known)
    overrides = {}
    if config_file is not None:
        if not os.path.exists(config_file):
            raise SystemExit(f"config: file not found: {config_file}")
        ns = {}
        with open(config_file) as f:
            exec(compile(f.read(), config_file, "exec"), ns)
        for k, v in ns.items():
            if not k.startswith("_") and isinstance(v, CONFIG_TYPES):
                overrides[k] = check(k, v, known, config_file)
    for k, raw in pairs:
        overrides[k] = check(k, parse_value(k, raw, known), known, "command line")
    for k, v in overrides.items():
        if k in own:
            defaults[k] = v
    config = {k: defaults[k] for k in own}
    if verbose and int(os.environ.get("RANK", "0")) == 0:
        print("config: " + " ".join(f"{k}={v!r}" for k, v in config.items()))
    return config


class Range:
    """A key's valid values: a test, and the same in words for the error message."""

    def __init__(self, ok, words):
        self.ok, self.words = ok, words


POSITIVE, NON_NEGATIVE, FRACTION = Range(lambda v: v >= 1, ">= 1"), Range(lambda v: v >= 0, ">= 0"), \
    Range(lambda v: 0 < v <= 1, "in (0, 1]")


def check_ranges(script, config, ranges):
    """ranges {key: Range}: before any work, stop at the first value out of range with one line naming the key
    and the fix (a bad value must never mean something else, e.g. -1 = "all")."""
    for key, r in ranges.items():
        if not r.ok(config[key]):
            raise SystemExit(f"{script}: {key} must be {r.words} (got {config[key]!r}): set --{key} or the config's "
                             f"{key}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name next to `path`; when the block succeeds it replaces `path` in one rename, so a
    reader (or a rerun after a kill) finds the old file or the new one, never half of one.
        with atomic_path("model.safetensors") as tmp: save_file(weights, tmp)"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the data is on disk before the name points at it
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # as open() would create it (safetensors' writer makes 0600 files)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def file_crc32(path):
    """crc32 of a file as 8 hex digits, read in 16 MiB pieces (about 1 GB/s: a check per file, not per read)."""
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_checksums(folder, names):
    """folder/checksums.json: the crc32 of each file `names` (verify_checksums checks them before a load)."""
    with atomic_path(os.path.join(folder, "checksums.json")) as tmp, open(tmp, "w") as f:
        json.dump({name: file_crc32(os.path.join(folder, name)) for name in names}, f, indent=1)


def verify_checksums(folder, fix, script=""):
    """Stop with one line naming the file when a file listed in folder/checksums.json changed since it was written
    (flipped bytes, a partial copy). A folder without checksums.json (DeepSpec's, older nanospec's) passes."""
    path = os.path.join(folder, "checksums.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        recorded = json.load(f)
    for name, crc in recorded.items():
        file = os.path.join(folder, name)
        have = file_crc32(file) if os.path.exists(file) else "missing"
        if have != crc:
            raise SystemExit(f"{script}{file} is corrupt (crc32 {have}, recorded {crc} when it was written): {fix}")


def cut_log(path, step):
    """Cut a jsonl log whose rows start with {"step": N (train.py's metrics.jsonl) before its first row past `step`, or
    a line cut mid-write, in one truncate: what a run killed before its next checkpoint logged, which the run resumed
    from `step` logs again. -> the number of lines cut (0 when path does not exist)."""
    with open(path if os.path.exists(path) else os.devnull, "rb") as f:
        rows = f.readlines()
    past = [i for i, r in enumerate(rows)
            if not r.endswith(b"\n") or (m := re.match(rb'{"step": (\d+)', r)) and int(m[1]) > step] + [len(rows)]
    if past[0] < len(rows):
        os.truncate(path, sum(map(len, rows[:past[0]])))
    return len(rows) - past[0]


def init_distributed(device=""):
    """-> (rank, world, device). Under torchrun (RANK in the environment) join the process group (nccl on GPUs,
    gloo on CPUs) and take the local GPU; otherwise rank 0 of 1. device "" = cuda if available, else cpu."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device
