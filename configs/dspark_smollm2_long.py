# The longer DSpark run for SmolLM2-135M-Instruct behind the shipped drafter drafters/smollm2_dspark
# (~1 hour of one CPU core for the answers, ~1 hour for training; LOG.md has the measured run):
#   python build_cache.py configs/dspark_smollm2_long.py --stage=answers --dtype=bfloat16  # greedy answers
#   python build_cache.py configs/dspark_smollm2_long.py --stage=features                  # fp32 taps, fp8
#   OMP_NUM_THREADS=1 python train.py configs/dspark_smollm2_long.py
#   python evaluate.py --draft=out/long/dspark/step_latest --task=gsm8k,humaneval --num_prompts=10
# Same drafter as configs/dspark_smollm2.py (2 layers, r=64, 8192-token draft head); what differs is
# data and time: 1000 built-in prompts answered greedily (the temperature-0 regime it is shipped for)
# and ~20x the demo's optimizer steps.
target = "smollm2"
drafter = "dspark"
num_draft_layers = 2
block_size = 7
num_anchors = 16
markov_rank = 64
enable_confidence_head = True
draft_vocab_size = 8192
prompts = "builtin"
num_prompts = 1000
gen_max_new_tokens = 192
gen_batch_size = 32
gen_temperature = 0.0
max_len = 512
data_mode = "offline"
cache_dir = "out/long/cache"
out_dir = "out/long/dspark"
global_batch_size = 8
micro_batch_size = 4
max_steps = 2700
learning_rate = 1e-3
dtype = "float32"
device = "cpu"
log_interval = 10
save_interval = 100
save_frozen = False
