#!/usr/bin/env bash
# Weight averaging on the demo setting (MiniLM, Rotten Tomatoes): none vs EMA vs SWA x 3 seeds, tabulated.
#   scripts/reproduce_weight_averaging.sh [overrides, e.g. hydra/launcher=parallel]     (docs/robustness.md)
# Full scale on a GPU: scripts/reproduce_weight_averaging.sh experiment=weight_averaging_full
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
run_sweep weight_averaging experiment=weight_averaging "$@"
report "$SWEEP"
