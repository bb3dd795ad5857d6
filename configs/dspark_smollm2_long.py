# The longer DSpark run for SmolLM2-135M-Instruct behind the shipped drafter drafters/smollm2_dspark (phase 1 of 3).
#   python build_cache.py configs/dspark_smollm2_long.py --stage=answers --dtype=bfloat16  # greedy answers, ~30 min
#   python build_cache.py configs/dspark_smollm2_long.py --stage=features                  # fp32 target forward
#   OMP_NUM_THREADS=1 python train.py configs/dspark_smollm2_long.py                       # ~1 h on one core
#   python bench.py decode --checkpoint=out/long/dspark/step_latest --num_prompts=8 --num_drafts 2 3 7
# Phases 2 and 3 (commands, numbers): LOG.md, "configs/dspark_smollm2_long.py: the runs behind the shipped drafter".
target = "smollm2"               # stated for evaluate.py (its default reads the checkpoint's target)
# drafter: the demo DSpark's shape (configs/dspark_smollm2.py); what differs is data and time
num_draft_layers = 2
num_anchors = 16
markov_rank = 64
draft_vocab_size = 8192
# data: greedy answers to the built-in prompts, the temperature-0 regime the drafter is shipped for
num_answers = 1024               # 4x the default: more data for a longer run
gen_max_new_tokens = 192         # as the demo
gen_batch_size = 32              # bf16 regeneration on 2 threads (LOG.md, session 2: 111 tokens/s)
gen_temperature = 0.0            # greedy (build_cache.py's default 0.7 is DeepSpec's)
max_len = 512                    # as the demo
data_mode = "offline"            # features computed once, reused by every phase
cache_dir = "out/long/cache"
out_dir = "out/long/dspark"
# optimization: the demo's batch, 9x its steps (phase 1)
global_batch_size = 8
micro_batch_size = 4
max_steps = 2700                 # phase 1; phases 2 and 3 raise it on the command line (LOG.md)
learning_rate = 1e-3             # phase 1's; phases 2 and 3 used 1.5e-3 (LOG.md)
device = "cpu"                   # the run behind a CPU-shipped drafter
save_interval = 100              # every ~2 min at 1.36 s/step: a killed run resumes
save_frozen = False              # no frozen embedding/head in checkpoints: the shipped drafter's 23.7 MiB
