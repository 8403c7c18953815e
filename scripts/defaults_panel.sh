#!/usr/bin/env bash
# The defaults panel (issue #20, docs/defaults.md): on datasets that no preset was tuned for, written in the formats
# a user brings (scripts/defaults_panel_data.py), a run with the defaults only vs the best of a 5-point
# learning-rate sweep with the same epochs; 3 seeds each. The sweep's middle point, the family preset's own rate, is
# the default run itself (setting optimizer.lr to the preset's value changes nothing else), so the sweep runs the
# other four rates and the summary pools the default run in as the fifth point: 15 runs a dataset, not 18.
#   scripts/defaults_panel.sh [dataset ...] [-- overrides, e.g. hydra/launcher=parallel]
#   datasets: mnist5k digits lfw_faces rotten_tomatoes debates_2016 noun_share wnut16 (default: all)
# Then: python scripts/defaults_panel_summary.py outputs/multirun/panel_*_$STAMP  (the table of docs/defaults.md)
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
DATA=${PANEL_DATA:-outputs/panel_data}
[ -d "$DATA/mnist5k" ] || "$PY" scripts/defaults_panel_data.py "$DATA"
DATA=$(cd "$DATA" && pwd)

datasets=() extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  datasets+=("$1"); shift
done
[ ${#datasets[@]} -gt 0 ] || datasets=(mnist5k digits lfw_faces rotten_tomatoes debates_2016 noun_share wnut16)

IMAGE_LRS=1e-4,3e-4,3e-3,1e-2   # around the CNN preset (1e-3: the default run)
TEXT_LRS=1e-5,3e-5,3e-4,1e-3    # around the MiniLM preset (1e-4: the default run)
for name in "${datasets[@]}"; do
  case $name in
    mnist5k|digits|lfw_faces)
      args=(data=image_folder "data.root=$DATA/$name" model=efficientnet_lite0); lrs=$IMAGE_LRS; metric=test/acc ;;
    rotten_tomatoes|debates_2016)
      args=(data=text_files "data.train_file=$DATA/$name.csv"); lrs=$TEXT_LRS; metric=test/acc ;;
    noun_share)  # regression: the task's monitor (val/mse, min) picks the checkpoint; the panel compares test/r2
      args=(data=text_files "data.train_file=$DATA/noun_share.csv" data.label_column=target data.task=regression)
      lrs=$TEXT_LRS; metric=test/r2 ;;
    wnut16)
      args=(data=token_files "data.train_file=$DATA/wnut16.conll"); lrs=$TEXT_LRS; metric=test/f1 ;;
    *) echo "unknown panel dataset: $name" >&2; exit 2 ;;
  esac
  run_sweep "panel_${name}_default" name="panel_${name}_default" "${args[@]}" seed=1,2,3 "${extra[@]}"
  defaults=$SWEEP
  run_sweep "panel_${name}_lr" name="panel_${name}_lr" "${args[@]}" "optimizer.lr=$lrs" seed=1,2,3 "${extra[@]}"
  # the dataset's ftlab-report table (defaults, then each rate; mean ± std over the seeds) into the default sweep
  report "$defaults" "$SWEEP" --metrics "$metric"
done
