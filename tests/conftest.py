"""Shared test setup: the repo root on sys.path, no hub access, few threads (2-core CI machine)."""
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the eval prompts (../shared/eval_datasets beside the clone in CI; tests that need them skip without them)
EVAL_DIR = os.environ.get("NANOSPEC_EVAL_DIR") or next(
    (d for d in (os.path.join(ROOT, "..", "shared", "eval_datasets"), "/work/shared/eval_datasets") if os.path.isdir(d)),
    "")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is several times faster than two fighting.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
