"""
Export a drafter for a serving engine: vLLM, SGLang or llama.cpp (SERVING.md has what each loads, field by field).

    python export.py --checkpoint=out/demo/dspark/step_latest --engine=vllm --export_dir=out/export/vllm
    python export.py --checkpoint=drafters/smollm2_dspark --engine=llama.cpp --export_dir=out/export/gguf \
        --llama_cpp=~/.cache/nanospec/llama.cpp

nanospec's checkpoints already are DeepSpec's layout in the engines' conventions (d2t offsets, t2d, a [Vd, H]
reduced head: model_dflash.FORMAT), so an export only does what cannot be native: bf16 weights without the frozen
embedding (every engine shares the target's) and, for a full vocabulary, without the frozen head; the per-engine
config fields; DFlash for engines that only take DSpark; a GGUF through llama.cpp's own converter. It refuses what
the engine cannot run, with the reason, and prints the serve command.
"""
import json
import os
import shutil
import subprocess
import sys

import torch

from configurator import atomic_path, configure
from model_dflash import write_checkpoint
from target import load, smollm2_folder

# --- defaults: --key=value overrides these ------------------------------------------------------------------
checkpoint = ""                  # drafter folder ("" = the demo's DSpark, then the shipped one)
target = ""                      # "" = the target named in the drafter's config.json
engine = "vllm"                  # vllm | sglang | llama.cpp
export_dir = ""                  # where the engine's folder (and the .gguf for llama.cpp) goes; must not exist yet
llama_cpp = ""                   # llama.cpp source tree with convert_hf_to_gguf.py ("" = print the command only)
converter_python = ""            # the python that runs it ("" = this one; it needs the sentencepiece module)


def engine_files(d, engine):
    """A loaded drafter -> (config dict, state dict in bf16) as `engine` loads them, or a refusal (SystemExit)."""
    def refuse(why):
        raise SystemExit(f"export: {engine} cannot serve this drafter: {why}")
    c = {**d.config, "nanospec": {**d.config.get("nanospec", {}), "exported_for": engine}}
    sd = {k: v.detach().cpu() for k, v in d.state_dict().items() if k != "embed_tokens.weight"}
    if d.d2t is None:
        sd.pop("lm_head.weight")  # the full head is the target's: every engine shares it
    head = getattr(d, "head_type", "vanilla") if getattr(d, "markov_head", None) is not None else None
    if d.family == "gemma4" and engine != "llama.cpp":
        refuse("its Gemma-4 DSpark/Eagle3 path is not in the engine (SERVING.md s.0); llama.cpp's is PR #25549")
    if engine in ("vllm", "llama.cpp") and head not in (None, "vanilla"):
        refuse(f"it implements only the vanilla Markov head, this drafter's is {head!r}: serve it with SGLang "
               f"(--engine=sglang) or retrain with markov_head_type=vanilla")
    if engine == "sglang":
        if d.kind == "eagle3":
            refuse("upstream SGLang's EAGLE3 is a Llama layer without q/k norms and 3 taps, and it silently drops "
                   "unknown weights (SERVING.md s.1.3): serve this Eagle3 with vLLM")
        if d.d2t is not None:
            refuse(f"its DSPARK path uses the target's full head (draft_vocab_size={len(d.d2t)} here): retrain with "
                   f"draft_vocab_size=0")
        sd.pop("lm_head.weight", None)
        if d.kind == "dflash":  # SGLang's DSPARK needs markov_rank > 0: a zero rank-1 head adds exactly 0 (untested)
            V = c["vocab_size"]
            sd["markov_head.markov_w1.weight"] = torch.zeros(V, 1)
            sd["markov_head.markov_w2.weight"] = torch.zeros(V, 1)
            c.update(markov_rank=1, markov_head_type="vanilla", enable_confidence_head=False)
    if d.kind == "eagle3" and engine == "vllm":  # DeepSpec's Eagle3 is vLLM's Qwen3 Eagle3 after a config rewrite
        if len(d.layers) > 1:
            refuse(f"its Eagle3 feeds [embed ; hidden] (2H wide) to layer 0 only and the residual stream to later "
                   f"layers (qwen3_eagle3.py); all {len(d.layers)} layers here are 2H wide: retrain with "
                   f"num_draft_layers=1 (DeepSpec's Eagle3)")
        ids = c["target_layer_ids"]
        c.update(architectures=["Eagle3Qwen3ForCausalLM"], eagle_aux_hidden_state_layer_ids=[i + 1 for i in ids],
                 num_aux_layers=len(ids), norm_before_residual=False)  # vLLM takes these ids as hidden_states[i]
    if engine != "llama.cpp" and d.family == "qwen3":
        c["model_type"] = "qwen3"  # the layers are Qwen3's (q/k norms) whatever the target's family
    return c, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}


def target_folder(name):
    """The target's HF folder (llama.cpp's converter reads its tokenizer and geometry)."""
    if name == "smollm2":
        return smollm2_folder()
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download  # a hub id (untested here: no network)
    return snapshot_download(name, allow_patterns=["*.json", "*.model", "*.txt"])


def serve_command(d, engine, out, tgt_name, gguf=None):
    n, tgt_name = d.proposal_length, {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}.get(tgt_name, tgt_name)
    if engine == "vllm":
        method = "eagle3" if d.kind == "eagle3" else "dspark"
        return (f"vllm serve {tgt_name} --speculative-config "
                f"'{json.dumps({'method': method, 'model': out, 'num_speculative_tokens': n})}'")
    if engine == "sglang":
        calib = os.path.join(out, "calibration.json")
        return (f"python -m sglang.launch_server --model-path {tgt_name} --speculative-algorithm DSPARK "
                f"--speculative-draft-model-path {out}" +
                (f" --speculative-dspark-confidence-sts-path {calib}" if os.path.exists(calib) else ""))
    kind = "draft-eagle3" if d.kind == "eagle3" else "draft-dspark"  # a DeepSpec DFlash runs as DSpark (rank 0)
    return f"llama-server -m TARGET.gguf -md {gguf} --spec-type {kind} --spec-draft-n-max {n} -nr"


if __name__ == "__main__":
    config = configure(globals())
    if engine not in ("vllm", "sglang", "llama.cpp"):
        raise SystemExit(f"export: --engine={engine!r} is not one of vllm, sglang, llama.cpp")
    if not export_dir or os.path.exists(export_dir):
        raise SystemExit(f"export: pass a new --export_dir (got {export_dir!r}: " +
                         ("it exists; pick another or remove it)" if export_dir else "empty)"))
    converter = os.path.join(os.path.expanduser(llama_cpp or "LLAMA_CPP"), "convert_hf_to_gguf.py")
    if engine == "llama.cpp" and llama_cpp and not os.path.exists(converter):
        raise SystemExit(f"export: no {converter}: pass --llama_cpp=<llama.cpp source tree> (LOG.md, session 7)")
    tgt, d, path = load(checkpoint, target)
    c, sd = engine_files(d, engine)  # refusals come before anything is written
    os.makedirs(export_dir)
    write_checkpoint(export_dir, sd, c)
    calib = os.path.join(path, "calibration.json")
    if engine == "sglang" and os.path.exists(calib):  # SGLang reads the same {"temperatures": [...]} (scheduler.py)
        with atomic_path(os.path.join(export_dir, "calibration.json")) as tmp:
            shutil.copyfile(calib, tmp)
    gguf = None
    if engine == "llama.cpp":
        gguf = os.path.join(export_dir, "drafter.gguf")
        convert = [converter_python or sys.executable, converter, export_dir, "--target-model-dir",
                   target_folder(tgt.name), "--outtype", "bf16", "--outfile", gguf]
        if not llama_cpp:
            print("export: no --llama_cpp given; convert with:\n  " + " ".join(convert))
        elif subprocess.run(convert).returncode:
            raise SystemExit(f"export: llama.cpp's converter failed (its message is above; a missing sentencepiece: "
                             f"pip install sentencepiece, or pass --converter_python); the exported folder {export_dir} "
                             f"is complete: convert it with\n  " + " ".join(convert))
    print(f"export: {d.kind} for {engine} in {export_dir}; serve with:\n  "
          f"{serve_command(d, engine, export_dir, tgt.name, gguf)}")
