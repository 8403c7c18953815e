#!/usr/bin/env bash
# Howard & Ruder 2018: gradual unfreezing x discriminative LR x slanted triangular LR, x 3 seeds, MiniLM on Rotten
# Tomatoes.
#   scripts/reproduce_ulmfit_ablation.sh [overrides, e.g. hydra/launcher=parallel]   (docs/ulmfit_ablation.md)
# Full scale on a GPU: scripts/reproduce_ulmfit_ablation.sh experiment=ulmfit_ablation_full
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
run_sweep ulmfit_ablation experiment=ulmfit_ablation "$@"
report "$SWEEP"
