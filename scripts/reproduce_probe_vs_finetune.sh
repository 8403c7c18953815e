#!/usr/bin/env bash
# Kornblith et al. 2019: linear probe vs full fine-tuning, from pretrained and from random weights, x 3 seeds:
# MiniLM on Rotten Tomatoes, then EfficientNet-Lite0 on MNIST-5k; one table each.
#   scripts/reproduce_probe_vs_finetune.sh [overrides, e.g. hydra/launcher=parallel]   (docs/probe_vs_finetune.md)
# Full scale on a GPU: FULL=_full scripts/reproduce_probe_vs_finetune.sh
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
FULL=${FULL:-}
run_sweep probe_vs_finetune "experiment=probe_vs_finetune$FULL" "$@"
report "$SWEEP"
run_sweep probe_vs_finetune_image "experiment=[probe_vs_finetune$FULL,probe_vs_finetune_image$FULL]" "$@"
report "$SWEEP"
