# Tiny random Qwen3 target and a small DSpark drafter: the whole pipeline in seconds on a CPU (tests).
#   python build_cache.py configs/tiny.py && python train.py configs/tiny.py
target = "tiny-qwen3"            # random 6-layer, 64-wide Qwen3 (target.py): no download
target_layer_ids = [0, 1, 2, 3, 4]  # the Qwen formula needs >= 8 layers; the last layer (5) is never tapped
# drafter: a DSpark (train.py's default) shrunk to the target
num_draft_layers = 1
block_size = 4                   # 4 slots still exercise the Markov head and the per-slot metrics
num_anchors = 8
markov_rank = 16
# data: built-in prompts (build_cache.py's default), a few short answers
num_answers = 24
gen_max_new_tokens = 24
gen_batch_size = 8               # 3 generation batches
max_len = 128
min_supervised = 4               # answers of at most 24 tokens: keep the short ones too (default 14)
cache_dir = "out/tiny/cache"
out_dir = "out/tiny/train"
# optimization: a few steps, 2 micro-steps each (gradient accumulation is exercised)
global_batch_size = 4
micro_batch_size = 2
max_steps = 4
learning_rate = 1e-3
device = "cpu"                   # tests run on CPU even where a GPU is present
log_interval = 1
save_interval = 2                # two checkpoints in 4 steps: resume and keep_last are exercised
max_new_tokens = 24              # evaluate.py and scheduler.py in seconds
