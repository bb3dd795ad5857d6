# eagle3 drafter for SmolLM2-135M-Instruct on a laptop CPU (the demo; minutes on 2 cores).
#   python build_cache.py configs/eagle3_smollm2.py --stage=answers   # regenerate answers (online training)
#   python train.py configs/eagle3_smollm2.py
#   python evaluate.py configs/eagle3_smollm2.py --draft=out/demo/eagle3/step_latest --task=gsm8k --num_prompts=5
target = "smollm2"
drafter = "eagle3"
num_draft_layers = 1
ttt_length = 7
draft_vocab_size = 8192          # reduced draft head: the 49k-row lm_head dominates CPU drafting time
prompts = "builtin"
gen_max_new_tokens = 192
max_len = 512
data_mode = "online"
cache_dir = "out/demo/cache"
out_dir = "out/demo/eagle3"
# Eagle3 supervises every position at every TTT step (~10x the loss work of 16 DSpark anchors per
# sequence), so on a CPU it takes 2 sequences per step to train in a comparable time
global_batch_size = 2
micro_batch_size = 2
max_steps = 300
learning_rate = 3e-3              # with the demo's 300 steps; 150 steps at 1e-3 left tau at ~1.15 (LOG.md, session 4)
dtype = "float32"
device = "cpu"
log_interval = 10
save_interval = 100
eval_interval = 0
max_new_tokens = 256
