#!/usr/bin/env bash
# Augmentation (issue #15): EDA vs none on Rotten Tomatoes at 500 / 2,000 / all training reviews (MiniLM), then
# none vs MixUp vs CutMix on MNIST-5k (EfficientNet-Lite0), 3 seeds each; one table per grid.
#   scripts/reproduce_augmentation.sh [overrides, e.g. hydra/launcher=parallel]   (docs/robustness.md, "Augmentation")
# Full scale on a GPU: FULL=_full scripts/reproduce_augmentation.sh
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
FULL=${FULL:-}
run_sweep augmentation "experiment=augmentation$FULL" "$@"
report "$SWEEP" --metrics test/acc test/f1 best/val/acc
run_sweep augmentation_image "experiment=augmentation_image$FULL" "$@"
report "$SWEEP" --metrics test/acc test/f1 best/val/acc
