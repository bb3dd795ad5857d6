# DSpark for SmolLM2-135M-Instruct on a laptop CPU: the demo (`make demo`), minutes on 2 cores.
#   python build_cache.py configs/dspark_smollm2.py --stage=answers   # regenerate answers (online training)
#   python train.py configs/dspark_smollm2.py
#   python evaluate.py configs/dspark_smollm2.py --checkpoint=out/demo/dspark/step_latest --task=gsm8k --num_prompts=5
target = "smollm2"               # 135M, fits a CPU; stated for evaluate.py (its default reads the checkpoint)
# drafter: a small DSpark (block 7, confidence head: train.py's defaults)
num_draft_layers = 2             # CPU-sized; the paper's 2-layer DSpark beats a 5-layer DFlash (REFERENCE.md s.8)
num_anchors = 16                 # CPU step time grows with anchors (LOG.md, session 2: 16 ~2 s/step, 48 ~6 s/step)
markov_rank = 64                 # down from DeepSpec's 256 for a 576-wide target (the shipped drafter's rank too)
draft_vocab_size = 8192          # reduced draft head: the 49k-row lm_head dominates CPU drafting time
# data: the built-in prompts (build_cache.py's default), short answers so regeneration takes minutes
gen_max_new_tokens = 192         # answer tokens per turn (demo.sh passes 128)
max_len = 512                    # a built-in prompt and its answer fit
cache_dir = "out/demo/cache"     # one cache for the three demo drafters
out_dir = "out/demo/dspark"
# optimization: CPU-sized
global_batch_size = 8            # sequences per step (DeepSpec: 512), in 2 micro-batches of 4
micro_batch_size = 4
max_steps = 300                  # ~4 min on 2 cores (LOG.md, session 4)
learning_rate = 3e-3             # with the demo's 300 steps; 150 steps at 1e-3 left tau at ~1.15 (LOG.md, session 4)
device = "cpu"                   # the demo's numbers are CPU numbers, even where a GPU is present
save_interval = 100              # about one checkpoint a minute: a killed run resumes
max_new_tokens = 256             # evaluate.py's default already; only raises scheduler.py's 128
