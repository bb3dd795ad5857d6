# Tiny random Qwen3 target and a small DSpark drafter: the whole pipeline in seconds on a CPU (tests).
#   python build_cache.py configs/tiny.py && python train.py configs/tiny.py
target = "tiny-qwen3"
target_layer_ids = [0, 1, 2, 3, 4]
drafter = "dspark"
num_draft_layers = 1
block_size = 4
num_anchors = 8
markov_rank = 16
prompts = "builtin"
num_prompts = 24
gen_max_new_tokens = 24
gen_batch_size = 8
max_len = 128
min_supervised = 4
cache_dir = "out/tiny/cache"
out_dir = "out/tiny/train"
global_batch_size = 4
micro_batch_size = 2
max_steps = 4
learning_rate = 1e-3
device = "cpu"
log_interval = 1
save_interval = 2
max_new_tokens = 24
