"""Build the target cache: prompts -> the target's own answers -> compact target-feature shards.

    python build_cache.py configs/tiny.py                            # CPU, tiny random target, seconds
    python build_cache.py --num_prompts=64 --gen_max_new_tokens=128  # CPU demo: smollm2, builtin prompts
    python build_cache.py configs/tiny.py --dry_run                  # bytes it will write, no forward
    torchrun --nproc_per_node=8 build_cache.py configs/dspark_qwen3_4b.py                   # 8 GPUs
    python build_cache.py configs/dspark_qwen3_4b.py --stage=answers --server_url=http://localhost:8000
    torchrun --nproc_per_node=8 build_cache.py configs/dspark_qwen3_4b.py --stage=features

Stage "answers": the target regenerates every assistant turn (user turns kept) into cache_dir/answers.jsonl, in input
order, appended as rows finish (a killed run resumes), seeded per (seed, sample, turn) so batching, ranks and restarts
never change an answer. Stage "features": one batch-1 target forward per answer; shards rank{r}_shard{k}.bin
(+ .idx.npy) and manifest.json hold the ids, the loss mask (bits), taps [T, n*H] and last_hidden where label_mask = 1,
in bf16 (exact) or fp8 e4m3 with an fp32 scale per (token, layer): bytes_per_token() vs DeepSpec's 6 + 12H.
"""
import glob
import hashlib
import json
import os
import random
import sys
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist

from configurator import configure
from kernels import logits_to_probs
from target import load_target

# --- default config (configs/*.py and --key=value override these) ---------------------------------
target = "smollm2"             # alias, local path or hub id
target_layer_ids = None        # None = the target's default taps
dtype = "float32"              # target compute dtype ("bfloat16" on GPUs, as train.py's online mode)
device = ""                    # "" = cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu
seed = 0
cache_dir = "out/cache"
stage = "all"                  # "all" | "answers" | "features"
# prompts -> answers
prompts = "builtin"            # "builtin" | "open-perfectblend" (hub; untested here, no network) | path to a .jsonl
num_prompts = 256              # 0 = every prompt of the source (builtin: 4096)
gen_max_new_tokens = 256       # answer tokens per turn
gen_temperature = 0.7
gen_top_p = 0.8
gen_top_k = 20
gen_batch_size = 16
server_url = ""                # "" = in-process; else an OpenAI-compatible server (vLLM, SGLang)
server_concurrency = 32
keep_truncated = True          # keep answers cut by gen_max_new_tokens (their end-of-turn is not supervised)
# answers -> features
cache_dtype = "fp8"            # "fp8" (e4m3, one fp32 scale per token and tapped layer) | "bf16" (exact)
max_len = 4096
min_supervised = 14
shard_tokens = 1_000_000
dry_run = False
max_bytes = 0                  # refuse to start when the cache would need more (0 = no limit)

_MAGIC, _VERSION = "nanospec-cache", 1
_FP8_MAX = 448.0               # largest finite float8_e4m3fn
_IDX_FIELDS = ["sample_id", "length", "n_labels", "offset", "nbytes"]  # one int64 row per sample

# --- prompt sources -------------------------------------------------------------------------------

_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
          "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}

def normalize_conversation(row):
    """{"conversations": [{role|from, content|value}, ...]} or {"turns": [user turn, ...]} -> [{"role",
    "content"}] with user/assistant/system roles, or None when malformed (no user turn, unknown role...)."""
    if isinstance(row, dict) and isinstance(row.get("turns"), list):
        row = {"conversations": [{"role": "user", "content": t} for t in row["turns"]]}
    turns = row.get("conversations") if isinstance(row, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None
    out = [{"role": _ROLES.get(str(t.get("role", t.get("from"))).lower()), "content": t.get("content", t.get("value"))}
           for t in turns]
    ok = all(m["role"] is not None and isinstance(m["content"], str) for m in out)
    return out if ok and any(m["role"] == "user" and m["content"].strip() for m in out) else None

def _json_or_none(line):
    try:
        return json.loads(line)
    except ValueError:
        return None

def load_prompts(source, n=0, seed=0):
    """source -> up to n conversations (0 = all); malformed rows are skipped and counted."""
    if source == "builtin":
        return builtin_prompts(n or 4096, seed)
    if source == "open-perfectblend":  # the recipe's prompts: 5% held out with seed 42, we take the 95%
        from datasets import load_dataset
        rows = load_dataset("mlabonne/open-perfectblend", split="train").train_test_split(0.05, seed=42)["train"]
    elif source.endswith(".jsonl") and os.path.exists(source):
        rows = (_json_or_none(line) for line in open(source, encoding="utf-8") if line.strip())
    else:
        raise SystemExit(f"prompts: {source!r} is not 'builtin', 'open-perfectblend' or an existing .jsonl file")
    convs, bad = [], 0
    for conv in map(normalize_conversation, rows):
        convs += [conv] if conv else []
        bad += conv is None
        if n and len(convs) == n:
            break
    if bad:
        print(f"prompts: skipped {bad} malformed rows of {source}")
    return convs

# word lists of the builtin prompts ('|'-separated)
_NAMES = "Ava|Ben|Chloe|Dev|Elena|Farid|Grace|Hiro|Ines|Jamal|Kira|Leo|Maya|Nils|Omar|Priya|Rosa|Zoe".split("|")
_ITEMS = "apples|stickers|marbles|pencils|cookies|seashells|postcards|tomatoes".split("|")
_LANGS = "Python|JavaScript|C|Rust|Go|Java|TypeScript|Bash".split("|")
_CODE = ("reverses the words in a sentence|checks for palindromes|merges two sorted lists|counts word frequencies "
         "in a file|returns the n-th Fibonacci number|removes duplicates but keeps the order|computes a median|"
         "flattens a nested list|splits a CSV line respecting quotes|does a binary search|converts Roman numerals to "
         "integers|returns the k most common elements|transposes a matrix|groups anagrams|parses a date").split("|")
_TOPICS = ("photosynthesis|how vaccines work|compound interest|the water cycle|hash tables|why the sky is blue|plate "
           "tectonics|recursion|inflation|how GPS works|weather versus climate|how neural networks learn|supply and "
           "demand|the printing press|black holes|compilers|the greenhouse effect|public-key cryptography|entropy|how "
           "bread rises|TCP and UDP|batteries|Git branches|tides|natural selection|the Doppler effect").split("|")
_AUDIENCES = "a ten-year-old|a busy manager|a first-year student|a complete beginner|a retired engineer".split("|")
_FORMATS = ("in three short paragraphs|in under 100 words|with an everyday analogy|as a few bullet points|and name "
            "one common misconception").split("|")
_STYLES = "more formal|more casual|shorter|more persuasive|friendlier|clearer|more vivid".split("|")
_SENTENCES = ("the meeting got moved because nobody could agree on a time|our product is good and people should buy "
              "it|I can't come tomorrow, sorry, something came up|the results were not what we expected at all|please "
              "send the report asap|this software update fixes some bugs|we need volunteers this weekend").split("|")
_LISTS = ("tips for staying focused at home|ideas for a rainy weekend|healthy breakfasts|questions to ask in a job "
          "interview|ways to save energy at home|names for a friendly robot|habits of effective teams|checks before a "
          "road trip|easy houseplants|ways to practise a language|icebreaker questions|uses for an old jar").split("|")
_WRITING = ("a short story about {}|a poem about {}|a product description for {}|a polite email about {}|a social "
            "media post announcing {}|a short speech about {}").split("|")
_SUBJECTS = ("a lighthouse keeper's message in a bottle|a city where it always rains|a robot learning to cook|a first "
             "day at work|an old bicycle|a lost cat|a solar-powered backpack|a community garden").split("|")
_FOLLOW_UPS = ("Can you make that shorter?|Now explain it another way.|Give me one more example.|What is the most "
               "important point?|Summarize your answer in one sentence.|Why is that?").split("|")

# code completion in HumanEval's prompt format (our own functions): name, typed parameters, return type, doc, example
_FUNCS = [f.split(" | ") for f in """count_vowels | s: str | int | Return the number of vowels in s. | count_vowels('hello') | 2
is_prime | n: int | bool | Return True if n is a prime number. | is_prime(7) | True
running_sum | numbers: List[int] | List[int] | Return the running sums of numbers. | running_sum([1, 2, 3]) | [1, 3, 6]
second_largest | numbers: List[int] | int | Return the second largest distinct value. | second_largest([4, 1, 9, 7]) | 7
capitalize_words | text: str | str | Capitalize the first letter of every word. | capitalize_words('hi there') | 'Hi There'
digit_sum | n: int | int | Return the sum of the decimal digits of n. | digit_sum(1234) | 10
common_elements | a: List[int], b: List[int] | List[int] | Return the sorted values found in both lists. | common_elements([1, 2, 3], [2, 3, 4]) | [2, 3]
rotate_left | items: List[int], k: int | List[int] | Rotate the list k places to the left. | rotate_left([1, 2, 3, 4], 1) | [2, 3, 4, 1]
gcd | a: int, b: int | int | Return the greatest common divisor of a and b. | gcd(12, 18) | 6
is_sorted | numbers: List[int] | bool | Return True if numbers is in non-decreasing order. | is_sorted([1, 2, 2, 5]) | True
longest_word | words: List[str] | str | Return the longest word, the first one on ties. | longest_word(['ab', 'abc', 'x']) | 'abc'
char_histogram | s: str | Dict[str, int] | Count how often each character occurs in s. | char_histogram('aab') | {'a': 2, 'b': 1}
even_squares | n: int | List[int] | Return the squares of the even numbers below n. | even_squares(7) | [0, 4, 16, 36]
remove_vowels | text: str | str | Return text without its vowels. | remove_vowels('banana') | 'bnn'
max_gap | numbers: List[float] | float | Return the largest difference between neighbours. | max_gap([1.0, 4.0, 5.5]) | 3.0
to_binary | n: int | str | Return the binary representation of n without a prefix. | to_binary(10) | '1010'
interleave | a: List[int], b: List[int] | List[int] | Alternate the elements of a and b, then append the rest. | interleave([1, 3], [2, 4, 6]) | [1, 2, 3, 4, 6]
count_upper | s: str | int | Return the number of uppercase letters in s. | count_upper('HeLLo') | 3
chunk | items: List[int], size: int | List[List[int]] | Split items into lists of length size; the last may be shorter. | chunk([1, 2, 3, 4, 5], 2) | [[1, 2], [3, 4], [5]]
valid_brackets | s: str | bool | Return True if every bracket in s is closed in the right order. | valid_brackets('([]{})') | True
is_anagram | a: str, b: str | bool | Return True if a and b use the same letters, ignoring case. | is_anagram('Listen', 'silent') | True
triangle_number | n: int | int | Return the n-th triangular number. | triangle_number(4) | 10
fizzbuzz | n: int | List[str] | Return FizzBuzz from 1 to n as strings. | fizzbuzz(5) | ['1', '2', 'Fizz', '4', 'Buzz']
product_of_odds | numbers: List[int] | int | Return the product of the odd numbers, or 1 if there are none. | product_of_odds([1, 2, 3, 5]) | 15""".split("\n")]


def code_completion(rng):
    """A HumanEval-style prompt: signature, docstring and doctest in a code block (typed 2/3 of the time)."""
    name, params, ret, doc, call, result = rng.choice(_FUNCS)
    typed = rng.random() < 0.67
    head = "from typing import Dict, List\n\n\n" if typed and ("List" in params + ret or "Dict" in ret) else ""
    sig = f"def {name}({params}) -> {ret}:" if typed else f"def {name}({', '.join(a.split(':')[0] for a in params.split(', '))}):"
    ask = rng.choice(["Write a solution to the following problem and make sure that it passes the tests:",
                      "Complete the following Python function:"])
    return f'{ask}\n```python\n{head}{sig}\n    """ {doc}\n    >>> {call}\n    {result}\n    """\n\n```'


def builtin_prompts(n, seed=0):
    """n distinct offline chat prompts from templates and random numbers (math, code completion, code,
    explanations, rewriting, lists, writing; ~15% get a follow-up turn). Deterministic by seed; no eval prompt."""
    rng = random.Random(seed)
    pick = rng.choice

    def math_problem():
        a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
        (name, other), item = rng.sample(_NAMES, 2), pick(_ITEMS)
        return pick([
            f"{name} has {a} {item} and gives {b} to {other}, then buys {c} bags of {b}. How many {item} are left?",
            f"A train covers {a * 10} km in {c} hours. At that speed, how far does it go in {c + b} hours?",
            f"{name} buys {a} {item} at ${c}.{b:02d} each and pays ${(a * c // 50 + 1) * 50}. What is the change?",
            f"What is {b}% of {a * c}?", f"Solve for x: {c}x + {a} = {a + c * b}.",
            f"A garden is {a} m long and {b} m wide. Find its area and its perimeter.",
            f"{name} reads {c * 3} pages a day. How many days does a {a * 10}-page book take?",
            f"{name} and {other} share {a * c} {item} in the ratio {c}:{b % 5 + 1}. How many does each get?"]) + \
            pick(["", " Show your work.", " Give only the final answer.", " Explain briefly.",
                  "\nPlease reason step by step, and put your final answer within \\boxed{}."])

    makers = [math_problem, math_problem,
              lambda: code_completion(rng),
              lambda: f"Write a {pick(_LANGS)} function that {pick(_CODE)}." +
              pick(["", " Include a short example.", " Add comments.", " Keep it under 20 lines."]),
              lambda: f"Explain {pick(_TOPICS)} to {pick(_AUDIENCES)} {pick(_FORMATS)}.",
              lambda: f"Rewrite this to be {pick(_STYLES)}: \"{pick(_SENTENCES)}\"",
              lambda: f"List {rng.randint(3, 10)} {pick(_LISTS)}.",
              lambda: f"Write {pick(_WRITING).format(pick(_SUBJECTS))}.",
              lambda: "What are the main differences between {} and {}?".format(*rng.sample(_TOPICS, 2))]
    convs, seen = [], set()
    for _ in range(50 * n):  # distinct first turns (gives up short of n only for n beyond ~10^5)
        if len(convs) == n:
            break
        text = pick(makers)()
        if text not in seen:
            seen.add(text)
            turns = [text] + ([pick(_FOLLOW_UPS)] if rng.random() < 0.15 else [])
            convs.append([{"role": "user", "content": t} for t in turns])
    return convs

# --- answers: regenerated by the target, in-process (batched, left padded) or through a server ----

_counts = {"gen_tokens": 0}  # generated tokens, for the tokens/s printout

def sample_seed(seed, sample_id, turn=0):
    """A 31-bit seed per (run seed, sample, turn): an answer never depends on its batch or rank."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{sample_id}/{turn}".encode()).digest()[:4], "little") >> 1

def generate_batch(target, prompts, seeds, max_new_tokens=256, temperature=0.7, top_p=0.8, top_k=20):
    """Message lists ending with a user turn -> [(answer, "stop" | "length")] from one batched generate(). Row b
    samples with its own generator seeds[b]: an answer is the same in any batch (up to padding float noise)."""
    from transformers import GenerationConfig, LogitsProcessorList
    ids = [target.render_prompt(m) for m in prompts]  # thinking off
    B, W, dev, eos = len(ids), max(len(x) for x in ids), target.device, sorted(target.eos_token_ids)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else eos[0]
    x, mask = torch.full((B, W), pad, dtype=torch.long), torch.zeros(B, W, dtype=torch.long)
    for b, p in enumerate(ids):  # left padding: every prompt ends at column W-1
        x[b, W - len(p):], mask[b, W - len(p):] = p, 1
    gens = [torch.Generator(dev).manual_seed(s) for s in seeds]

    def sampler(input_ids, scores):  # scores [B, V] -> -inf except at each row's drawn token: greedy emits it
        probs = logits_to_probs(scores, temperature, top_k, top_p)  # one-hot argmax at temperature 0
        tok = torch.cat([torch.multinomial(q, 1, generator=g) for q, g in zip(probs, gens)])
        return torch.full_like(scores, float("-inf")).scatter_(1, tok.view(-1, 1), 0.0)
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out = target.model.generate(input_ids=x.to(dev), attention_mask=mask.to(dev), generation_config=gc,
                                logits_processor=LogitsProcessorList([sampler]))
    answers = []
    for row in out[:, W:].tolist():  # [B, <= max_new_tokens]; padding after a row's end-of-turn
        stop = next((i for i, t in enumerate(row) if t in target.eos_token_ids), None)
        _counts["gen_tokens"] += len(row) if stop is None else stop + 1
        text = target.tokenizer.decode(row[:stop], skip_special_tokens=True).strip()
        answers.append((text, "length" if stop is None else "stop"))
    return answers

def chat_request(server_url, model, messages, seed, max_new_tokens=256, temperature=0.7, top_p=0.8, top_k=20):
    """One OpenAI-compatible /v1/chat/completions call (vLLM, SGLang) -> (answer, "stop" | "length")."""
    body = {"model": model, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "seed": seed, "chat_template_kwargs": {"enable_thinking": False}}
    body.update({"top_k": top_k} if top_k > 0 else {})
    req = urllib.request.Request(server_url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:  # no retry: a failed run resumes where it stopped
        with urllib.request.urlopen(req, timeout=3600) as r:
            out = json.load(r)
        choice = out["choices"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:  # URLError and HTTPError are OSErrors
        raise SystemExit(f"server {server_url}: {e}; start an OpenAI-compatible server there or set server_url=''")
    _counts["gen_tokens"] += (out.get("usage") or {}).get("completion_tokens", 0)
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    return (choice["message"].get("content") or "").strip(), finish

def regenerate(convs, sample_ids, seed, generate_fn):
    """Replace every assistant turn by the target's, turn by turn (user and system turns kept); a turn
    cut by max_new_tokens ends its conversation. generate_fn([(messages, seed)]) -> [(answer, finish)]."""
    rows = [{"sample_id": int(s), "messages": [], "finish_reason": "stop"} for s in sample_ids]
    pos, turn = [0] * len(convs), [0] * len(convs)
    while True:
        todo = []  # conversations whose next user turn awaits an answer
        for i, conv in enumerate(convs):
            while rows[i]["finish_reason"] == "stop" and pos[i] < len(conv):
                m, pos[i] = conv[pos[i]], pos[i] + 1
                if m["role"] != "assistant":  # the source's own answers are dropped
                    rows[i]["messages"].append({"role": m["role"], "content": m["content"]})
                if m["role"] == "user":
                    todo.append(i)
                    break
        if not todo:
            return rows
        outs = generate_fn([(rows[i]["messages"], sample_seed(seed, rows[i]["sample_id"], turn[i])) for i in todo])
        for i, (text, finish) in zip(todo, outs):
            rows[i]["messages"].append({"role": "assistant", "content": text})
            rows[i]["finish_reason"], turn[i] = finish, turn[i] + 1

def read_answers(path, repair=False):
    """answers.jsonl -> rows; a partial last line (killed run) is ignored, and cut from the file if repair."""
    rows, good = [], 0
    for line in open(path, "rb") if os.path.exists(path) else []:
        try:
            rows.append(json.loads(line[:-1] if line.endswith(b"\n") else b"!"))
        except ValueError:
            break
        good += len(line)
    if repair and os.path.exists(path) and good < os.path.getsize(path):
        os.truncate(path, good)
    return rows

def generate_answers(target, convs, sample_ids, path, max_new_tokens=256, temperature=0.7, top_p=0.8, top_k=20,
                     batch_size=16, seed=0, server_url="", concurrency=32):
    """Answer convs (global ids sample_ids) into path in order, after the rows already there, fsynced as they finish.
    Batches are fixed chunks of the list, one cut by a kill is redone whole: a resume writes what a full run would."""
    done = read_answers(path, repair=True)
    if [r.get("sample_id") for r in done] != list(sample_ids[:len(done)]):
        raise SystemExit(f"{path} holds answers of other prompts; delete it or use another --cache_dir")
    k, N = len(done), len(convs)
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    t0, n0, written = time.time(), _counts["gen_tokens"], [k]
    with open(path, "a", encoding="utf-8") as f:
        def write(rows):
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            written[0] += len(rows)
            tps = (_counts["gen_tokens"] - n0) / (time.time() - t0)
            print(f"answers: {written[0]}/{N} samples of {path}, {tps:.0f} generated tokens/s", flush=True)
        if server_url:  # one conversation per request chain, `concurrency` in flight, written in input order
            fn = lambda items: [chat_request(server_url, target.name, m, s, **gen) for m, s in items]
            with ThreadPoolExecutor(concurrency) as pool:
                futs = deque()
                for j in range(k, N):
                    futs.append(pool.submit(lambda j: regenerate([convs[j]], [sample_ids[j]], seed, fn)[0], j))
                    while futs and (len(futs) > 4 * concurrency or j == N - 1):
                        write([futs.popleft().result()])
        else:
            fn = lambda items: generate_batch(target, [m for m, _ in items], [s for _, s in items], **gen)
            for start in range(k - k % batch_size, N, batch_size):
                rows = regenerate(convs[start:start + batch_size], sample_ids[start:start + batch_size], seed, fn)
                write(rows[max(0, k - start):])

# --- features: rendering, rounding (shared with train.py's online mode), shard layout -------------

def render_sample(target, messages, max_len=4096, truncated=False):
    """messages -> input_ids [T], loss_mask [T], label_mask [T] cut to max_len. A truncated answer
    (finish_reason "length") never produced its end-of-turn token: that token is not supervised."""
    ex = target.render(messages)
    loss_mask = ex["loss_mask"].clone()
    last = int(loss_mask.nonzero()[-1]) if loss_mask.any() else 0
    if truncated and int(ex["input_ids"][last]) in target.eos_token_ids:
        loss_mask[last] = 0
    ids, loss_mask = ex["input_ids"][:max_len], loss_mask[:max_len]
    return ids, loss_mask, torch.cat([loss_mask[1:], loss_mask.new_zeros(1)])  # label_mask[t] = loss_mask[t+1]

def encode_features(x, n_layers, cache_dtype):
    """x [T, n*H] float -> (payload [T, n*H] bf16 | float8_e4m3fn, scales [T, n] fp32 | None).
    fp8: s = amax/448 per (token, layer), q = e4m3(x / s). e4m3 keeps 3 mantissa bits: a value in the
    normal range (>= 2^-6) is rounded to within half a step, 2^-4 of itself; below, the step is 2^-9
    (error <= 2^-10). Unscaled: |decode(q) - x| <= 2^-4 |x| + 2^-10 s (so <= 2^-4 amax) per element."""
    if cache_dtype == "bf16":
        return x.to(torch.bfloat16), None
    if cache_dtype != "fp8":
        raise ValueError(f"cache_dtype must be 'bf16' or 'fp8', got {cache_dtype!r}")
    xs = x.float().reshape(x.shape[0], n_layers, -1)  # [T, n, H]
    scales = (xs.abs().amax(-1) / _FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)  # [T, n]
    q = (xs / scales[..., None]).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape[0], -1), scales

def decode_features(payload, scales, n_layers):
    """Inverse of encode_features: -> float32 [T, n*H]."""
    if scales is None:
        return payload.float()
    return (payload.float().reshape(len(payload), n_layers, -1) * scales[..., None]).reshape(len(payload), -1)

def bytes_per_token(hidden_size, n_layers, cache_dtype, supervised_fraction):
    """Bytes/token: 4 (id) + 1/8 (mask) + (n taps + supervised_fraction last_hidden) x (2H bf16 | H fp8 + 4 scale)."""
    e, c = (1, 4) if cache_dtype == "fp8" else (2, 0)
    return 4 + 1 / 8 + (n_layers + supervised_fraction) * (hidden_size * e + c)

def record_layout(T, n_labels, hidden_size, n_layers, cache_dtype):
    """Byte layout of one sample in a shard -> ({section: (offset, size)}, size padded to 16)."""
    e, c = (1, 4) if cache_dtype == "fp8" else (2, 0)
    sections = [("taps", T * n_layers * hidden_size * e), ("last", n_labels * hidden_size * e),
                ("taps_scale", T * n_layers * c), ("last_scale", n_labels * c), ("ids", 4 * T), ("mask", (T + 7) // 8)]
    layout, pos = {}, 0
    for name, size in sections:
        layout[name], pos = (pos, size), pos + size
    return layout, -(-pos // 16) * 16

def _features(target, ids, label_mask, cache_dtype):
    """One forward at batch 1 -> encoded (taps, their scales, last_hidden at label_mask = 1, its scales)."""
    taps, last = target.features(ids[None])  # [1, T, n*H], [1, T, H]
    tp, ts = encode_features(taps[0], len(target.layer_ids), cache_dtype)
    lp, ls = encode_features(last[0][label_mask.bool().to(last.device)], 1, cache_dtype)
    return tp, ts, lp, ls

def _record(ids, loss_mask, label_mask, taps, last_rows, sample_id):
    last = taps.new_zeros(len(ids), last_rows.shape[-1])  # [T, H], zeros where label_mask = 0
    last[label_mask.bool()] = last_rows
    return {"input_ids": ids.long(), "loss_mask": loss_mask.long(), "taps": taps, "last_hidden": last,
            "sample_id": int(sample_id)}

def make_record(target, messages, sample_id, max_len=4096, cache_dtype="fp8", truncated=False, min_supervised=0):
    """The training record of one conversation, identical to CacheReader's (same render, cut, forward
    and rounding), or None below min_supervised supervised tokens. train.py's online mode uses it."""
    ids, loss_mask, label_mask = render_sample(target, messages, max_len, truncated)
    if int(loss_mask.sum()) < min_supervised:
        return None
    tp, ts, lp, ls = _features(target, ids, label_mask, cache_dtype)
    taps = decode_features(tp, ts, len(target.layer_ids)).cpu()
    return _record(ids, loss_mask, label_mask, taps, decode_features(lp, ls, 1).cpu(), sample_id)

def _bits(t):  # a bf16 / fp8 / fp32 / int32 tensor -> its raw bytes
    t = t.detach().contiguous().cpu()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().tobytes()

def plan_shards(target, rows, max_len=4096, min_supervised=14, shard_tokens=1_000_000, keep_truncated=True):
    """Render every answered row (no forward) -> shards [[(row, T, supervised, labels)]], dropped counts."""
    shards, cur, ntok, dropped = [], [], 0, {"truncated": 0, "short": 0}
    for row in rows:
        truncated = row.get("finish_reason") == "length"
        ids, loss_mask, label_mask = render_sample(target, row["messages"], max_len, truncated)
        why = "truncated" if truncated and not keep_truncated else "short" if loss_mask.sum() < min_supervised else None
        if why:
            dropped[why] += 1
            continue
        cur.append((row, len(ids), int(loss_mask.sum()), int(label_mask.sum())))
        ntok += len(ids)
        if ntok >= shard_tokens:
            shards, cur, ntok = shards + [cur], [], 0
    return shards + ([cur] if cur else []), dropped

def _atomic_write(path, data):
    """bytes (or a function writing to f) into path.tmp, fsync, rename: readers see old or new, never half."""
    with open(path + ".tmp", "wb") as f:
        data(f) if callable(data) else f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

def build_features(target, rows, cache_dir, rank=0, cache_dtype="fp8", max_len=4096, min_supervised=14,
                   shard_tokens=1_000_000, keep_truncated=True):
    """Write this rank's shards rank{rank}_shard{k}; a shard already on disk with the planned index is
    kept (never recomputed). Returns this rank's manifest part {"rank", "dropped", "shards"}."""
    os.makedirs(cache_dir, exist_ok=True)
    shards, dropped = plan_shards(target, rows, max_len, min_supervised, shard_tokens, keep_truncated)
    H, n = target.config.hidden_size, len(target.layer_ids)
    part, t0, done = {"rank": rank, "dropped": dropped, "shards": []}, time.time(), 0
    for k, shard in enumerate(shards):
        name = os.path.join(cache_dir, f"rank{rank}_shard{k:05d}")
        idx = np.zeros((len(shard), len(_IDX_FIELDS)), np.int64)  # sample_id, length, n_labels, offset, nbytes
        for j, (row, T, ns, nl) in enumerate(shard):
            offset = idx[j - 1, 3] + idx[j - 1, 4] if j else 0
            idx[j] = row["sample_id"], T, nl, offset, record_layout(T, nl, H, n, cache_dtype)[1]
        nbytes = int(idx[:, 4].sum())
        part["shards"].append({"file": os.path.basename(name) + ".bin", "index": os.path.basename(name) + ".idx.npy",
                               "samples": len(shard), "bytes": nbytes, "tokens": int(idx[:, 1].sum()),
                               "supervised_tokens": sum(s[2] for s in shard), "label_tokens": int(idx[:, 2].sum())})
        if os.path.exists(name + ".idx.npy") and os.path.exists(name + ".bin") and \
                os.path.getsize(name + ".bin") == nbytes and np.array_equal(np.load(name + ".idx.npy"), idx):
            continue  # finished by an earlier run

        def write(f):
            for j, (row, T, ns, nl) in enumerate(shard):
                ids, loss_mask, label_mask = render_sample(target, row["messages"], max_len,
                                                           row.get("finish_reason") == "length")
                tp, ts, lp, ls = _features(target, ids, label_mask, cache_dtype)
                rec = b"".join([_bits(tp), _bits(lp)] + ([_bits(ts), _bits(ls)] if ts is not None else []) +
                               [_bits(ids.to(torch.int32)), np.packbits(loss_mask.numpy().astype(np.uint8)).tobytes()])
                f.write(rec + bytes(int(idx[j, 4]) - len(rec)))
        _atomic_write(name + ".bin", write)
        _atomic_write(name + ".idx.npy", lambda f: np.save(f, idx))  # written last: marks the shard done
        done += part["shards"][-1]["tokens"]
        tps = done / (time.time() - t0)
        print(f"features: rank {rank} shard {k + 1}/{len(shards)}, {tps:.0f} tokens/s", flush=True)
    return part

def target_fingerprint(target):
    """What a cache depends on: target id, sha256 of its config and of its chat template, tapped layers."""
    cfg = {k: v for k, v in target.config.to_dict().items()
           if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    h = lambda s: hashlib.sha256(s.encode()).hexdigest()[:16]
    return {"target": target.name, "target_config_hash": h(json.dumps(cfg, sort_keys=True, default=str)),
            "chat_template_hash": h(str(target.tokenizer.chat_template)), "layer_ids": list(target.layer_ids)}

def write_manifest(target, cache_dir, parts, settings, command=""):
    """manifest.json: magic, version, target fingerprint, geometry, dtypes, counts and the shard list."""
    shards = [s for p in sorted(parts, key=lambda p: p["rank"]) for s in p["shards"]]
    fp8 = settings["cache_dtype"] == "fp8"
    m = {"magic": _MAGIC, "version": _VERSION, **target_fingerprint(target), "hidden_size": target.config.hidden_size,
         "n_layers": len(target.layer_ids), "num_target_layers": target.config.num_hidden_layers,
         "cache_dtype": settings["cache_dtype"], "payload_dtype": "float8_e4m3fn" if fp8 else "bfloat16",
         "scale_dtype": "float32" if fp8 else None, "compute_dtype": str(target.embed_weight.dtype),
         "max_len": settings["max_len"], "min_supervised": settings["min_supervised"], "world_size": len(parts),
         **{k: sum(s[k] for s in shards) for k in ("samples", "tokens", "supervised_tokens", "label_tokens", "bytes")},
         "dropped": {k: sum(p["dropped"][k] for p in parts) for k in parts[0]["dropped"]}, "command": command,
         "index_fields": _IDX_FIELDS, "record_sections": list(record_layout(1, 1, 1, 1, settings["cache_dtype"])[0]),
         "shards": shards}
    _atomic_write(os.path.join(cache_dir, "manifest.json"), json.dumps(m, indent=1).encode())
    return m

# --- reader (train.py imports it) -----------------------------------------------------------------

class CacheReader:
    """reader[i] -> {input_ids [T] long, loss_mask [T] long, taps [T, n*H] f32, last_hidden [T, H] f32
    (zeros where label_mask = 0), sample_id}, samples ordered by sample id whatever the world size."""

    def __init__(self, cache_dir):
        self.cache_dir, self._maps, idx = cache_dir, {}, []
        try:
            with open(os.path.join(cache_dir, "manifest.json")) as f:
                m = self.manifest = json.load(f)
        except (OSError, ValueError) as e:
            self._fail(f"cannot read manifest.json ({type(e).__name__})")
        if not isinstance(m, dict) or m.get("magic") != _MAGIC or m.get("version") != _VERSION:
            self._fail(f"manifest.json is not a {_MAGIC} version {_VERSION} manifest")
        try:
            for k, s in enumerate(m["shards"]):
                path = os.path.join(cache_dir, s["file"])
                size = os.path.getsize(path) if os.path.exists(path) else None
                if size != s["bytes"]:
                    self._fail(f"shard {s['file']} " + ("is missing" if size is None else
                                                         f"has {size} bytes, not {s['bytes']}"))
                rec = np.load(os.path.join(cache_dir, s["index"]))
                if rec.shape != (s["samples"], len(_IDX_FIELDS)) or rec[:, 4].sum() != s["bytes"]:
                    self._fail(f"index {s['index']} does not match the manifest")
                idx.append(np.column_stack([rec, np.full(len(rec), k)]))
            self.hidden_size, self.n_layers, self.cache_dtype = m["hidden_size"], m["n_layers"], m["cache_dtype"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._fail(f"malformed manifest or index ({type(e).__name__}: {e})")
        idx = np.concatenate(idx) if idx else np.zeros((0, len(_IDX_FIELDS) + 1), np.int64)
        self.index = idx[np.argsort(idx[:, 0], kind="stable")]  # [N, fields + shard], by sample id

    def _fail(self, why, fix=None):
        raise SystemExit(f"cache {self.cache_dir}: {why}. Rebuild it: "
                         f"{fix or f'python build_cache.py <config> --cache_dir={self.cache_dir}'}")

    def validate(self, target_name=None, layer_ids=None, hidden_size=None):
        """Fail (SystemExit with the rebuild command) when the cache was built for another target/taps."""
        m = self.manifest
        wrong = [f"{key} is {m[key]!r}, the config wants {want!r}" for key, want in
                 (("target", target_name), ("layer_ids", None if layer_ids is None else list(layer_ids)),
                  ("hidden_size", hidden_size)) if want is not None and m[key] != want]
        if wrong:  # another target: its answers are another model's too, so start from a new dir
            other = any(w.startswith(("target", "hidden")) for w in wrong)
            self._fail("built with " + "; ".join(wrong), "python build_cache.py <config> --cache_dir=" +
                       (f"<a new dir> (this one holds {m['target']}'s answers)" if other else self.cache_dir))
        return self

    def __len__(self):
        return len(self.index)

    def sample_id(self, i):  # without reading the record
        return int(self.index[i, 0])

    def __getitem__(self, i):
        sid, T, nl, off, size, k = (int(v) for v in self.index[i])
        if k not in self._maps:  # opened lazily: each DataLoader worker maps its own
            self._maps[k] = np.memmap(os.path.join(self.cache_dir, self.manifest["shards"][k]["file"]), np.uint8, "r")
        buf = self._maps[k][off:off + size]
        layout, _ = record_layout(T, nl, self.hidden_size, self.n_layers, self.cache_dtype)
        sec = lambda name, dt: torch.from_numpy(np.frombuffer(buf, dt, layout[name][1] // np.dtype(dt).itemsize,
                                                              layout[name][0]).copy())
        fp8 = self.cache_dtype == "fp8"
        pay, pdt = (np.uint8, torch.float8_e4m3fn) if fp8 else (np.int16, torch.bfloat16)
        tp, lp = sec("taps", pay).view(pdt).view(T, -1), sec("last", pay).view(pdt).view(nl, -1)
        ts, ls = (sec("taps_scale", np.float32).view(T, -1), sec("last_scale", np.float32).view(nl, 1)) if fp8 \
            else (None, None)
        loss_mask = torch.from_numpy(np.unpackbits(sec("mask", np.uint8).numpy())[:T].astype(np.int64))
        label_mask = torch.cat([loss_mask[1:], loss_mask.new_zeros(1)])
        return _record(sec("ids", np.int32), loss_mask, label_mask, decode_features(tp, ts, self.n_layers),
                       decode_features(lp, ls, 1), sid)

# --- dry run: exact bytes for answered samples, an upper bound from gen_max_new_tokens for the rest ---

def estimate_cache(target, rows, pending, cache_dtype="fp8", max_len=4096, min_supervised=14,
                   shard_tokens=1_000_000, keep_truncated=True, max_new_tokens=256):
    """Bytes the feature stage writes (shards + indexes), from rendering only. A pending user turn counts as
    max_new_tokens answer tokens: an upper bound unless an answer re-tokenizes longer (invalid UTF-8, random model)."""
    H, n = target.config.hidden_size, len(target.layer_ids)
    shards, dropped = plan_shards(target, rows, max_len, min_supervised, shard_tokens, keep_truncated)
    recs, bound_tokens = [(T, ns, nl) for shard in shards for _, T, ns, nl in shard], 0
    for conv in pending:
        msgs = [x for m in conv if m["role"] != "assistant"
                for x in ([m, {"role": "assistant", "content": ""}] if m["role"] == "user" else [m])]
        turns = sum(m["role"] == "user" for m in msgs)
        T = min(max_len, len(target.render(msgs)["input_ids"]) + turns * max_new_tokens)
        recs.append((T, min(T, turns * (max_new_tokens + 1)), min(T, turns * (max_new_tokens + 1))))
        bound_tokens += T
    n_index = len(shards) - (-bound_tokens // shard_tokens)  # .idx.npy files: 128-byte header + rows
    tokens, labels = sum(r[0] for r in recs), sum(r[2] for r in recs)
    total = sum(record_layout(T, nl, H, n, cache_dtype)[1] for T, _, nl in recs) + 128 * n_index + \
        8 * len(_IDX_FIELDS) * len(recs)
    return {"samples": len(recs), "tokens": tokens, "supervised_tokens": sum(r[1] for r in recs),
            "label_tokens": labels, "dropped": dropped, "exact": not pending, "cache_dtype": cache_dtype,
            "hidden_size": H, "n_layers": n, "bytes_per_token": total / max(tokens, 1), "total_bytes": total,
            "formula_bytes_per_token": bytes_per_token(H, n, cache_dtype, labels / max(tokens, 1))}

# --- main -----------------------------------------------------------------------------------------

if __name__ == "__main__":
    config = configure(globals())
    if stage not in ("all", "answers", "features") or cache_dtype not in ("bf16", "fp8"):
        raise SystemExit(f"stage must be all|answers|features, cache_dtype bf16|fp8 (got {stage!r}, {cache_dtype!r})")
    ddp, device = int(os.environ.get("WORLD_SIZE", "1")) > 1, device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:  # torchrun: rank r handles the samples i with i % world == r
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if device == "cuda" else device
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    rank, world, barrier = (dist.get_rank(), dist.get_world_size(), dist.barrier) if ddp else (0, 1, lambda: None)
    tgt = load_target(target, dtype=dtype, device=device, layer_ids=target_layer_ids)
    H, n, fp = tgt.config.hidden_size, len(tgt.layer_ids), target_fingerprint(tgt)
    if rank == 0:
        print(f"target {tgt.name}: H={H}, taps {tgt.layer_ids}, {world} rank(s) on {device}; cache {cache_dtype}: "
              f"{bytes_per_token(H, n, cache_dtype, 1.0):.1f} bytes/token when every token is supervised")
    answers_path = os.path.join(cache_dir, "answers.jsonl")
    convs = load_prompts(prompts, num_prompts, seed) if stage in ("all", "answers") else []
    answered = read_answers(answers_path)[:len(convs) or None]  # stage all/answers: the first num_prompts
    pending = convs[len(answered):]
    gen_settings = {**fp, "layer_ids": None, "prompts": prompts, "seed": seed, "gen_max_new_tokens": gen_max_new_tokens,
                    "gen_temperature": gen_temperature, "gen_top_p": gen_top_p, "gen_top_k": gen_top_k}
    spath = os.path.join(cache_dir, "answers.settings.json")
    if os.path.exists(spath):  # answers must be this target's (and, to extend them, made the same way)
        old, new = json.load(open(spath)), json.loads(json.dumps(gen_settings))
        diff = [k for k in (new if pending else ("target_config_hash", "chat_template_hash")) if old.get(k) != new[k]]
        if diff:
            raise SystemExit(f"{answers_path} was made with other {', '.join(diff)} ({old['target']}, "
                             f"{[old.get(k) for k in diff]}): delete it or use another --cache_dir")

    # --- dry run and byte budget: rendering only, no forward ---------------------
    if dry_run or max_bytes:
        est = estimate_cache(tgt, answered, pending, cache_dtype, max_len, min_supervised, shard_tokens,
                             keep_truncated, gen_max_new_tokens)
        if rank == 0 and dry_run:
            print(f"dry run: {est['samples']} samples, {est['tokens']} tokens ({est['label_tokens']} with a label): "
                  f"{'exactly' if est['exact'] else 'at most'} {est['total_bytes'] / 2**30:.3f} GiB, "
                  f"{est['bytes_per_token']:.1f} bytes/token (formula {est['formula_bytes_per_token']:.1f})")
            print(json.dumps(est), flush=True)
        if max_bytes and est["total_bytes"] > max_bytes:
            raise SystemExit(f"the cache needs {est['total_bytes']} bytes > max_bytes={max_bytes}: lower num_prompts, "
                             f"max_len or gen_max_new_tokens, use --cache_dtype=fp8, or raise --max_bytes")
        if dry_run:
            raise SystemExit(0)

    # --- stage 1: answers ----------------------------------------------------------
    os.makedirs(cache_dir, exist_ok=True)
    if pending:
        barrier()
        if rank == 0:
            _atomic_write(spath, json.dumps(gen_settings).encode())
        part_path = lambda r: answers_path if world == 1 else f"{answers_path[:-6]}.rank{r}-of-{world}.jsonl"
        ids = list(range(rank, len(convs), world))
        generate_answers(tgt, [convs[i] for i in ids], ids, part_path(rank), gen_max_new_tokens, gen_temperature,
                         gen_top_p, gen_top_k, gen_batch_size, seed, server_url, server_concurrency)
        barrier()
        if world > 1 and rank == 0:  # merge the rank parts in input order
            rows = sorted((r for q in range(world) for r in read_answers(part_path(q))), key=lambda r: r["sample_id"])
            _atomic_write(answers_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
            [os.remove(part_path(q)) for q in range(world)]
        barrier()

    # --- stage 2: features ---------------------------------------------------------
    if stage in ("all", "features"):
        rows = [r for r in read_answers(answers_path)[:len(convs) or None] if r["sample_id"] % world == rank]
        settings = {**fp, "compute_dtype": str(tgt.embed_weight.dtype), "cache_dtype": cache_dtype, "max_len": max_len,
                    "min_supervised": min_supervised, "shard_tokens": shard_tokens, "keep_truncated": keep_truncated}
        spath = os.path.join(cache_dir, "features.settings.json")
        changed = not os.path.exists(spath) or json.load(open(spath)) != json.loads(json.dumps(settings))
        barrier()
        if rank == 0 and changed:  # shards made with other settings are stale: start this stage over
            [os.remove(f) for p in ("rank*_shard*", "manifest*") for f in glob.glob(os.path.join(cache_dir, p))]
            _atomic_write(spath, json.dumps(settings).encode())
        barrier()
        part = build_features(tgt, rows, cache_dir, rank, cache_dtype, max_len, min_supervised, shard_tokens,
                              keep_truncated)
        _atomic_write(os.path.join(cache_dir, f"manifest.rank{rank}.json"), json.dumps(part).encode())
        barrier()
        if rank == 0:
            parts = [json.load(open(os.path.join(cache_dir, f"manifest.rank{r}.json"))) for r in range(world)]
            m = write_manifest(tgt, cache_dir, parts, settings, "python build_cache.py " + " ".join(sys.argv[1:]))
            print(f"cache {cache_dir}: {m['samples']} samples, {m['tokens']} tokens, {m['bytes'] / 2**20:.1f} MiB "
                  f"({m['bytes'] / max(m['tokens'], 1):.1f} bytes/token), dropped {m['dropped']}")
    if ddp:
        dist.destroy_process_group()
