"""The shipped drafter drafters/smollm2_dspark: small, frozen tensors omitted, loads on SmolLM2, lossless,
and still accepts drafts (a regression guard on the checked-in weights; the measured numbers are in LOG.md)."""
import os

import pytest
import torch
from safetensors import safe_open

import evaluate as E
from prompts import messages_of
from target import find_checkpoint, load_drafter, load_target, target_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "drafters", "smollm2_dspark")
PROMPTS = ["Mia has 12 apples and gives 5 to Sam, then buys 3 bags of 4. How many apples does she have now?\n"
           "Please reason step by step, and put your final answer within \\boxed{}.",
           'Write a solution to the following problem and make sure that it passes the tests:\n```python\n'
           'def count_words(text: str) -> int:\n    """ Return how many words text contains.\n'
           "    >>> count_words('a b  c')\n    3\n    \"\"\"\n\n```"]


def test_shipped_files_are_small_and_omit_the_frozen_target_tensors():
    size = sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED))
    assert size <= 50 * 2 ** 20, f"shipped drafter is {size / 2 ** 20:.1f} MiB > 50"
    with safe_open(os.path.join(SHIPPED, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embed_tokens.weight" not in keys and "lm_head.weight" not in keys and "d2t" in keys


def test_shipped_drafter_is_lossless_and_accepts_drafts(one_thread):
    path, cfg = find_checkpoint(SHIPPED)
    assert target_of(cfg) == "smollm2"
    target = load_target("smollm2", layer_ids=cfg["target_layer_ids"], mask_token_id=cfg.get("mask_token_id"))
    drafter = load_drafter(path, target)
    rounds = tokens = 0
    for text in PROMPTS:
        ids = target.render_prompt(messages_of(text))
        plain, _ = E.plain_generate(target, ids, 48)
        res = E.speculative_generate(target, drafter, ids, 48, num_drafts=3)
        assert res["ids"] == plain  # greedy speculative decoding reproduces the target exactly
        rounds, tokens = rounds + len(res["rounds"]), tokens + sum(r[2] for r in res["rounds"])
    # a randomly initialized drafter commits ~1.0 token per round; the shipped one measured well above 2
    assert tokens / rounds > 1.6, f"tau {tokens / rounds:.2f}: the shipped weights no longer draft well"
