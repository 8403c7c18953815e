#!/usr/bin/env bash
# Yosinski et al. 2014 at MNIST scale: train network A (ResNet-18, digits 0-4), then copy its bottom n groups into
# networks for digits 5-9, frozen (AnB) or fine-tuned (AnB+), n = 0..4, x 3 seeds.
#   scripts/reproduce_transfer_yosinski.sh [overrides of the grid, e.g. hydra/launcher=parallel]
#   SOURCE=<run folder of A> skips training A; SOURCE_OVERRIDES="..." changes how A is trained (the grid needs the
#   same model.backbone settings).                                               (docs/transfer_yosinski.md)
# Full scale on a GPU: see conf/experiment/transfer_yosinski_full.yaml (A must be trained on the same data).
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
SOURCE=${SOURCE:-$LOG_DIR/mnist_transfer_source/$STAMP}
if [ ! -f "$SOURCE/backbone.pt" ]; then
  start=$(date +%s)
  # shellcheck disable=SC2086  # SOURCE_OVERRIDES is a list of overrides
  "$PY" -m ftlab.train experiment=mnist_transfer_source "paths.log_dir=$LOG_DIR" "hydra.run.dir=$SOURCE" \
    ${SOURCE_OVERRIDES:-}
  echo "network A: $(( $(date +%s) - start )) s ($SOURCE)"
fi
run_sweep transfer_yosinski experiment=transfer_yosinski "model.backbone.checkpoint=$SOURCE" "$@"
report "$SWEEP"
