# Eagle3 for SmolLM2-135M-Instruct on a laptop CPU: the demo (`make demo`), minutes on 2 cores.
#   python build_cache.py configs/eagle3_smollm2.py --stage=answers   # regenerate answers (online training)
#   python train.py configs/eagle3_smollm2.py
#   python evaluate.py configs/eagle3_smollm2.py --checkpoint=out/demo/eagle3/step_latest --task=gsm8k --num_prompts=5
target = "smollm2"               # 135M, fits a CPU; stated for evaluate.py (its default reads the checkpoint)
# drafter: Eagle3 (TTT 7: train.py's default)
drafter = "eagle3"               # train.py's default is dspark
num_draft_layers = 1             # DeepSpec's Eagle3 has one layer (REFERENCE.md s.7)
draft_vocab_size = 8192          # reduced draft head: the 49k-row lm_head dominates CPU drafting time
# data: the built-in prompts (build_cache.py's default), short answers so regeneration takes minutes
gen_max_new_tokens = 192         # answer tokens per turn (demo.sh passes 128)
max_len = 512                    # a built-in prompt and its answer fit
cache_dir = "out/demo/cache"     # one cache for the three demo drafters
out_dir = "out/demo/eagle3"
# optimization: CPU-sized. Eagle3 supervises every position at every TTT step (~10x the loss work of 16 DSpark
# anchors per sequence), so on a CPU it takes 2 sequences per step to train in a comparable time
global_batch_size = 2
micro_batch_size = 2
max_steps = 300                  # ~4.5 min on 2 cores (LOG.md, session 4)
learning_rate = 3e-3             # with the demo's 300 steps; 150 steps at 1e-3 left tau at ~1.15 (LOG.md, session 4)
device = "cpu"                   # the demo's numbers are CPU numbers, even where a GPU is present
save_interval = 100              # about one checkpoint a minute: a killed run resumes
max_new_tokens = 256             # evaluate.py's default already; only raises scheduler.py's 128
