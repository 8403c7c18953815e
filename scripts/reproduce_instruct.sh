#!/usr/bin/env bash
# SmolLM2-135M-Instruct before/after a short LoRA instruction tuning, on the embedded demonstration sets
# (docs/instruction_tuning.md). CPU budget: a small test slice and a few optimizer steps; on a GPU use
# experiment=instruct_smollm2 as it is (trainer=gpu). Usage: scripts/reproduce_instruct.sh [data] [steps] [test]
#   data: instruct_rotten_tomatoes (default) or instruct_wnut16; steps: LoRA steps (default 16, batch 4);
#   test: examples in the validation and test slices (default 48).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-instruct_rotten_tomatoes}
STEPS=${2:-16}
TEST=${3:-48}
COMMON=(experiment=instruct_smollm2 "data=$DATA" trainer.accelerator=cpu trainer.devices=1
  "data.max_eval_examples=$TEST" data.max_length=128 "module.generate_examples=$TEST" data.eval_batch_size=16
  trainer.num_sanity_val_steps=0 callbacks.progress_bar.kind=log logger=csv)
# before: nothing trains (max_steps=0, no checkpoint), the test stage scores the model as loaded
.venv/bin/ftlab-train "${COMMON[@]}" +trainer.max_steps=0 "name=instruct_zero_shot_${DATA#instruct_}"
# after: LoRA for STEPS steps of 4 examples (one epoch over STEPS*4 training examples), then the same test slice
.venv/bin/ftlab-train "${COMMON[@]}" data.batch_size=4 "data.max_train_examples=$((STEPS * 4))" \
  trainer.max_epochs=1 trainer.limit_val_batches=0 callbacks.early_stopping=null "name=instruct_lora_${DATA#instruct_}"
