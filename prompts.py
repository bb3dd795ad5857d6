"""Prompt sources: the nine evaluation tasks (evaluate.py) and build_cache.py's training prompts (chat rows from
files or the hub, and offline generators).

    load_task("gsm8k", num_prompts=8)            # DeepSpec's selection of an eval task, as lists of turns

    load_prompts("builtin", 1024)                # templated chat prompts (math, code, writing...), no eval prompt
    load_prompts("stdlib-code")                  # HumanEval-format prompts from Python's standard library
    load_prompts("stdlib-methods")               # the same from its classes' methods
    load_prompts("heldout:gsm8k")                # an eval task's rows outside DeepSpec's selection
    load_prompts("a.jsonl,stdlib-code", seed=1)  # several sources, shuffled together
"""
import importlib
import inspect
import json
import os
import random
import textwrap

from configurator import atomic_path

# --- eval tasks: DeepSpec's prompt counts and hub sources (REFERENCE.md s.8); files hold {"turns": [...]} rows --

_BOXED = "\nPlease reason step by step, and put your final answer within \\boxed{}."
_LCB = ("You are an expert Python programmer. You will be given a question (problem specification) and will "
        "generate a correct Python program that matches the specification and passes all tests. You will NOT "
        "return anything except for the program\n\n### Question:\n")


def _lcb_turn(r):
    fmt = "Use the following code structure:" if r["starter_code"] else "Write your code in the following format:"
    return (_LCB + r["question_content"] + "\n\n### Format: " + fmt + "\n```python\n" +
            (r["starter_code"] or "# YOUR CODE HERE") + "\n```\n\n### Answer: (use the provided format with backticks)")


def _hub_jsonl(repo, files):  # rows of jsonl files in a hub dataset repo
    from huggingface_hub import hf_hub_download  # optional: only the hub fallback of a task needs it
    return [json.loads(line) for f in files
            for line in open(hf_hub_download(repo, f, repo_type="dataset"), encoding="utf-8") if line.strip()]


def _hf(*args, split):
    from datasets import load_dataset  # optional and slow to import: only the hub fallback of a task needs it
    return load_dataset(*args, split=split)


# name -> (DeepSpec's prompt count, hub fetch returning a list of turn lists); fetch untested here (no network)
TASKS = {
    "gsm8k": (500, lambda: [[r["question"] + _BOXED] for r in _hf("openai/gsm8k", "main", split="test")]),
    "math500": (500, lambda: [[r["problem"] + _BOXED] for r in _hf("HuggingFaceH4/MATH-500", split="test")]),
    "aime25": (30, lambda: [[r["problem"] + _BOXED] for r in _hf("MathArena/aime_2025", split="train")]),
    "humaneval": (164, lambda: [["Write a solution to the following problem and make sure that it passes the "
                                 "tests:\n```python\n" + r["prompt"] + "\n```"]
                                for r in _hf("openai/openai_humaneval", split="test")]),
    "mbpp": (256, lambda: [[r["prompt"]] for r in _hf("google-research-datasets/mbpp", "sanitized", split="test")]),
    "livecodebench": (500, lambda: [[_lcb_turn(r)] for r in _hub_jsonl(
        "livecodebench/code_generation_lite", ["test.jsonl"] + [f"test{i}.jsonl" for i in range(2, 7)])]),
    "mt-bench": (80, lambda: [list(r["prompt"]) for r in _hf("HuggingFaceH4/mt_bench_prompts", split="train")]),
    "alpaca": (500, lambda: [[r["instruction"] + (f"\n\nInput:\n{r['input']}" if r["input"] else "")]
                             for r in _hf("tatsu-lab/alpaca", split="train")]),
    "arena-hard-v2": (500, lambda: [[r["prompt"]] for r in _hub_jsonl(
        "lmarena-ai/arena-hard-auto", ["data/arena-hard-v2.0/question.jsonl"])]),
}


class MissingTask(Exception):
    pass


def task_dirs(data_dir=""):
    return [d for d in (data_dir, os.environ.get("NANOSPEC_DATA_DIR", ""),
                        os.path.join(os.path.expanduser("~"), ".cache", "nanospec", "eval")) if d]


def load_task(name, data_dir="", num_prompts=0, turns=0, heldout=False):
    """-> list of turn lists (strings), DeepSpec's selection: when the file has more rows than the task's
    count, shuffle with random.Random(980406) and take the first rows; then the first num_prompts.
    heldout=True: the rows that selection never uses instead (in-domain training prompts, e.g. gsm8k's 819)."""
    path = next((p for p in (os.path.join(d, f"{name}.jsonl") for d in task_dirs(data_dir)) if os.path.exists(p)), None)
    if path is None:
        if name not in TASKS:
            raise MissingTask(f"task '{name}': no {name}.jsonl in {task_dirs(data_dir)}; "
                              f"known tasks: {', '.join(TASKS)}")
        path = os.path.join(task_dirs()[-1], f"{name}.jsonl")
        try:  # fetch once from the hub and cache in the documented format (untested here: no network)
            rows = TASKS[name][1]()
        except Exception as e:
            raise MissingTask(f"task '{name}': no {name}.jsonl in {task_dirs(data_dir)} and the hub fetch failed "
                              f"({type(e).__name__}); put the file in --data_dir") from None
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"turns": t}, ensure_ascii=False) + "\n" for t in rows)
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                row = _json_or_none(line)
                t = row.get("turns") if isinstance(row, dict) else None
                if not (isinstance(t, list) and t and all(isinstance(s, str) for s in t)):
                    raise SystemExit(f"{path}:{i + 1}: each row must be {{\"turns\": [non-empty list of strings]}}")
                rows.append(t)
    count = TASKS[name][0] if name in TASKS else len(rows)
    if len(rows) > count:  # DeepSpec's rule (its --seed default)
        random.Random(980406).shuffle(rows)
    rows = (rows[count:] if heldout else rows[:count])[:num_prompts or None]
    return [r[:turns] if turns else r for r in rows]


# --- training prompts -------------------------------------------------------------------------

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
    if "," in source:  # several sources, shuffled together
        convs = [c for part in source.split(",") for c in load_prompts(part.strip(), 0, seed)]
        random.Random(seed).shuffle(convs)
        return convs[:n or None]
    if source == "builtin":
        return builtin_prompts(n or 4096, seed)
    if source in ("stdlib-code", "stdlib-methods"):
        return stdlib_code_prompts(methods=source == "stdlib-methods")[:n or None]
    if source.startswith("heldout:"):  # an eval task's rows outside DeepSpec's selection (data: NANOSPEC_DATA_DIR)
        try:
            rows = [{"turns": t} for t in load_task(source[8:], heldout=True)]
        except MissingTask as e:
            raise SystemExit(f"prompts: {e}") from None
        if not rows:
            raise SystemExit(f"prompts: {source}: every row of the task is in the evaluated selection")
    elif source == "open-perfectblend":  # the recipe's prompts: 5% held out with seed 42, we take the 95%
        from datasets import load_dataset  # optional and slow to import: only this hub source needs it
        rows = load_dataset("mlabonne/open-perfectblend", split="train").train_test_split(0.05, seed=42)["train"]
    elif source.endswith(".jsonl") and os.path.exists(source):
        rows = (_json_or_none(line) for line in open(source, encoding="utf-8") if line.strip())
    else:
        raise SystemExit(f"prompts: {source!r} is not 'builtin', 'stdlib-code', 'stdlib-methods', 'heldout:<task>', "
                         f"'open-perfectblend', an existing .jsonl file or a comma-separated list of these")
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


_STDLIB = ("string textwrap posixpath ntpath json json.decoder statistics fractions heapq bisect collections functools "
           "re shlex difflib calendar colorsys glob fnmatch html urllib.parse base64 ipaddress random copy pprint csv "
           "quopri uu gettext locale tokenize keyword operator decimal datetime email.utils mimetypes wave zipfile "
           "tarfile gzip shutil tempfile filecmp fileinput configparser argparse optparse getopt http.cookies "
           "http.client urllib.request inspect dis ast typing dataclasses enum numbers contextlib abc secrets hashlib "
           "hmac uuid plistlib xml.dom.minidom xml.etree.ElementTree imghdr sndhdr sched queue threading logging "
           "warnings traceback linecache codecs unicodedata stringprep encodings.idna smtplib ftplib poplib imaplib "
           "mailbox netrc platform sysconfig site runpy pkgutil zipimport importlib.util py_compile compileall pydoc "
           "doctest unittest.util trace timeit cProfile pstats turtle tkinter.font cmd code codeop pdb bdb subprocess "
           "socketserver selectors asyncio.base_events graphlib zoneinfo tomllib wsgiref.util").split()


def stdlib_code_prompts(methods=False):
    """HumanEval-format prompts from the running Python's own standard library: each public function's
    signature and docstring (first paragraph, first doctest). ~700 on Python 3.11; none are eval tasks.
    methods=True: the public methods of the modules' public classes instead, each inside its class
    (`stdlib-methods`, ~1,000)."""
    def prompt(name, fn, indent=""):
        try:
            doc, sig = inspect.getdoc(fn), str(inspect.signature(fn))
        except (TypeError, ValueError):
            return None
        if not doc or len(doc) < 40 or len(sig) > 120 or " at 0x" in sig:
            return None
        paras = doc.split("\n\n")
        body = "\n".join(([paras[0]] + [p for p in paras[1:] if ">>>" in p][:1])).splitlines()[:12]
        src = f"def {name}{sig}:\n" + textwrap.indent('""" ' + "\n".join(body) + '\n"""', "    ") + "\n"
        return textwrap.indent(src, indent)

    out, seen = [], set()
    for m in _STDLIB:
        try:
            mod = importlib.import_module(m)
        except Exception:  # noqa: BLE001 (a module a platform lacks)
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if not methods and inspect.isfunction(obj):
                srcs = [prompt(name, obj)]
            elif methods and inspect.isclass(obj):
                srcs = [prompt(k, f, "    ") for k, f in sorted(vars(obj).items())
                        if not k.startswith("_") and inspect.isfunction(f)]
                srcs = [f"class {name}:\n{src}" for src in srcs if src]
            else:
                continue
            for src in filter(None, srcs):
                key = tuple(src.splitlines()[:1 + methods])  # the def line (and class): one prompt per signature
                if key not in seen:
                    seen.add(key)
                    out.append(src)
    random.Random(0).shuffle(out)
    what = "method" if methods else "function"
    asks = ["Write a solution to the following problem and make sure that it passes the tests:",
            f"Complete the following Python {what}:"]
    return [[{"role": "user", "content": f"{asks[i % 2]}\n```python\n{src}\n```"}] for i, src in enumerate(out)]


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


def messages_of(p):
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
