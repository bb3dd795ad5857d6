# dflash drafter for SmolLM2-135M-Instruct on a laptop CPU (the demo; minutes on 2 cores).
#   python build_cache.py configs/dflash_smollm2.py --stage=answers   # regenerate answers (online training)
#   python train.py configs/dflash_smollm2.py
#   python evaluate.py configs/dflash_smollm2.py --draft=out/demo/dflash/step_latest --task=gsm8k --num_prompts=5
target = "smollm2"
drafter = "dflash"
num_draft_layers = 2
block_size = 7
num_anchors = 16
draft_vocab_size = 8192          # reduced draft head: the 49k-row lm_head dominates CPU drafting time
prompts = "builtin"
gen_max_new_tokens = 192
max_len = 512
data_mode = "online"
cache_dir = "out/demo/cache"
out_dir = "out/demo/dflash"
global_batch_size = 8
micro_batch_size = 4
max_steps = 300
learning_rate = 3e-3              # with the demo's 300 steps; 150 steps at 1e-3 left tau at ~1.15 (LOG.md, session 4)
dtype = "float32"
device = "cpu"
log_interval = 10
save_interval = 100
eval_interval = 0
max_new_tokens = 256
