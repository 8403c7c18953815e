#!/usr/bin/env bash
# Few-shot learning curve on Rotten Tomatoes (docs/few_shot.md, "Learning curve"): head only, full fine-tuning,
# LoRA, SetFit and prompt-based fine-tuning at 8 / 16 / 32 / 64 / 256 reviews per class x 5 seeds, then the two
# zero-shot baselines (nothing trained: no examples per class) x 5 seeds; one table and one plot of test accuracy
# against examples per class (the zero-shot runs as horizontal lines).
#   scripts/reproduce_few_shot_curve.sh [overrides of both sweeps, e.g. hydra/launcher=parallel]
# Full scale on a GPU: FULL=_full scripts/reproduce_few_shot_curve.sh
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
FULL=${FULL:-}
run_sweep "few_shot_curve$FULL" "experiment=few_shot_curve$FULL" "$@"
CURVE=$SWEEP
# the zero-shot runs train nothing: examples_per_class=null (not a number: a horizontal line in the plot)
run_sweep "few_shot_curve_zero_shot$FULL" "experiment=few_shot_curve$FULL" \
  few_shot_method=zero_shot_embedding,zero_shot_llm data.examples_per_class=null "$@"
report "$CURVE" "$SWEEP" --metrics test/acc test/f1
