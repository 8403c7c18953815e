#!/usr/bin/env bash
# SmolLM2-135M-Instruct before/after a short LoRA instruction tuning, on both embedded demonstration sets
# (Rotten Tomatoes review -> fresh/rotten, WNUT-16 tweet -> entity list; docs/instruction_tuning.md).
#   scripts/reproduce_instruct.sh [overrides]          STEPS (default 16, batch 4) and TEST (default 48) size it
#   STEPS=128 TEST=200 scripts/reproduce_instruct.sh   the table of docs/instruction_tuning.md (~55 min, 2 idle cores)
# "before": nothing trains (max_steps=0, no checkpoint), the test stage scores the model as loaded; "after": LoRA
# for STEPS steps of 4 examples (one epoch over STEPS*4 training examples), seeds 1, 2, 3, then the same test slice
# (data.seed=0 fixes the split, the test slice and the training subset; the seeds change the adapters' init and
# the order). CPU budget; on a GPU use experiment=instruct_smollm2 as it is (trainer=gpu).
# Re-running with the STAMP of a run that was cut off finishes the sweeps.
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
STEPS=${STEPS:-16}
TEST=${TEST:-48}
COMMON=(experiment=instruct_smollm2 data=instruct_rotten_tomatoes,instruct_wnut16 data.seed=0 trainer.accelerator=cpu
  trainer.devices=1 "data.max_eval_examples=$TEST" "module.generate_examples=$TEST" data.eval_batch_size=16
  trainer.num_sanity_val_steps=0 callbacks.progress_bar.kind=log logger=csv)
run_sweep instruct_before "${COMMON[@]}" +trainer.max_steps=0 name=instruct_zero_shot "$@"
before=$SWEEP
run_sweep instruct_after "${COMMON[@]}" seed=1,2,3 data.batch_size=4 "data.max_train_examples=$((STEPS * 4))" \
  trainer.max_epochs=1 trainer.limit_val_batches=0 callbacks.early_stopping=null name=instruct_lora "$@"
report "$before" "$SWEEP" --metrics test/exact_match test/f1 test/perplexity test/token_acc
