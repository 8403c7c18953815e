#!/usr/bin/env bash
# Class imbalance: Rotten Tomatoes with "rotten" cut to 10%, MiniLM; unweighted vs balanced class weights (sweep 1)
# and a class-balanced sampler (sweep 2), 3 seeds each, tabulated together.
#   scripts/reproduce_imbalance.sh [overrides]                                              (docs/imbalance.md)
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
run_sweep imbalance experiment=imbalance "$@"
first=$SWEEP
run_sweep imbalance_sampler experiment=imbalance data.sampler=balanced module.class_weights=null "$@"
report "$first" "$SWEEP" --metrics test/f1 test/acc test/recall best/val/f1
