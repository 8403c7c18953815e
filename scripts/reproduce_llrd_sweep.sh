#!/usr/bin/env bash
# Sun et al. 2019: layer-wise LR decay xi in {1.0, 0.95, 0.9, 0.85, 0.8} x 3 seeds, MiniLM on Rotten Tomatoes.
#   scripts/reproduce_llrd_sweep.sh [overrides, e.g. hydra/launcher=parallel]      (docs/llrd_sweep.md)
# Full scale on a GPU: scripts/reproduce_llrd_sweep.sh experiment=llrd_sweep_full
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
run_sweep llrd_sweep experiment=llrd_sweep "$@"
report "$SWEEP"
