#!/usr/bin/env bash
# Run the seeds_demo grid (3 seeds x 2 learning rates, tiny BERT, Rotten Tomatoes) and tabulate it.
#   scripts/reproduce_seeds_demo.sh [more overrides, e.g. hydra/launcher=parallel paths.log_dir=/tmp/out]
# Re-running with resume=<the sweep folder printed below> finishes a sweep that was cut off.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOG_DIR=${LOG_DIR:-outputs}
SWEEP=${SWEEP:-$LOG_DIR/multirun/seeds_demo_$(date +%Y-%m-%d_%H-%M-%S)}
start=$(date +%s)
"$PY" -m ftlab.train -m experiment=seeds_demo "paths.log_dir=$LOG_DIR" "hydra.sweep.dir=$SWEEP" "$@"
echo "sweep wall time: $(( $(date +%s) - start )) s ($SWEEP)"
"$PY" -m ftlab.report "$SWEEP"
