#!/usr/bin/env bash
# Hu et al. 2021: full / head only / BitFit (sweep 1) and LoRA r in {1, 4, 8} (sweep 2) x 3 seeds, MiniLM on Rotten
# Tomatoes, tabulated together with the trainable-parameter column.
#   scripts/reproduce_peft_table.sh [overrides, e.g. hydra/launcher=parallel]      (docs/peft_table.md)
# Full scale on a GPU: scripts/reproduce_peft_table.sh experiment=peft_table_full
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
run_sweep peft_table experiment=peft_table "$@"
first=$SWEEP
run_sweep peft_table_lora experiment=peft_table finetune=lora finetune.peft.r=1,4,8 "$@"
report "$first" "$SWEEP"
