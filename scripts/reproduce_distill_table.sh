#!/usr/bin/env bash
# Knowledge distillation on Rotten Tomatoes (docs/distillation.md): the MiniLM teacher (experiment=
# distill_table_teacher), then students with and without it, x 3 seeds: a 3-layer MiniLM (one layer in two) and
# tiny_bert; one table per student (test accuracy, parameters). The share of the teacher's accuracy kept is
# test/acc over the teacher's (its metrics.json); speed-up: ftlab-export run=<folder> on a teacher and a student.
#   scripts/reproduce_distill_table.sh [overrides of the grids, e.g. hydra/launcher=parallel]
#   TEACHER=<run folder of distill_table_teacher> skips the teacher.
# Full scale on a GPU: FULL=_full scripts/reproduce_distill_table.sh (then train the teacher with the same data).
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
FULL=${FULL:-}
TEACHER=${TEACHER:-$LOG_DIR/distill_table_teacher/$STAMP}
if [ ! -f "$TEACHER/metrics.json" ]; then
  start=$(date +%s)
  "$PY" -m ftlab.train experiment=distill_table_teacher "paths.log_dir=$LOG_DIR" "hydra.run.dir=$TEACHER"
  echo "teacher: $(( $(date +%s) - start )) s ($TEACHER)"
fi
run_sweep "distill_table$FULL" "experiment=distill_table$FULL" "distill.teacher=null,$TEACHER" "$@"
MINILM3=$SWEEP
run_sweep "distill_table_tiny$FULL" "experiment=distill_table$FULL" model=tiny_bert model.backbone.num_layers=null optimizer.lr=1e-3 \
  "distill.teacher=null,$TEACHER" "$@"
report "$MINILM3"
report "$SWEEP"
echo "teacher: $(grep -o '"test/acc": [0-9.]*' "$TEACHER/metrics.json")"
