#!/usr/bin/env bash
# TAPT (Gururangan et al. 2020) with MiniLM on Rotten Tomatoes: masked-LM adaptation on the corpus's unlabelled
# texts (experiment=tapt_mlm), then classification with 500 and 4,000 labelled reviews from the adapted backbone
# vs from MiniLM itself, x 3 seeds; one table.
#   scripts/reproduce_tapt.sh [overrides of the grid, e.g. hydra/launcher=parallel]     (docs/language_models.md)
#   MLM=<run folder of tapt_mlm> skips step 1; MLM_OVERRIDES="..." changes how it is trained.
# Full scale on a GPU: FULL=_full scripts/reproduce_tapt.sh
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
FULL=${FULL:-}
MLM=${MLM:-$LOG_DIR/tapt_mlm$FULL/$STAMP}
if [ ! -f "$MLM/backbone.pt" ]; then
  start=$(date +%s)
  # shellcheck disable=SC2086  # MLM_OVERRIDES is a list of overrides
  "$PY" -m ftlab.train "experiment=tapt_mlm$FULL" "paths.log_dir=$LOG_DIR" "hydra.run.dir=$MLM" ${MLM_OVERRIDES:-}
  echo "masked-LM adaptation: $(( $(date +%s) - start )) s ($MLM)"
fi
run_sweep "tapt$FULL" "experiment=tapt$FULL" "model.backbone.checkpoint=null,$MLM" "$@"
report "$SWEEP"
