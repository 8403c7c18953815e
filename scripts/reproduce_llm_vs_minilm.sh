#!/usr/bin/env bash
# SmolLM2-135M + LoRA classifier vs MiniLM full fine-tuning on Rotten Tomatoes (experiment=llm_vs_minilm), 3 seeds
# each, one table (test accuracy, trainable parameters, wall time); each arm's sweep runs in one process (basic
# launcher, jobs in turn), whose peak RSS (the largest job's) is printed with the arm.
#   scripts/reproduce_llm_vs_minilm.sh [overrides]                       (docs/decoder_llms.md)
# Full scale on a GPU: scripts/reproduce_llm_vs_minilm.sh experiment=llm_vs_minilm_full
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
export STAMP PY LOG_DIR  # the same sweep folders when a cut-off run is re-run with its STAMP

# arm <label> <overrides...>: run_sweep, then the sweep process's peak RSS (ru_maxrss of the child, in MiB)
arm() {
  local label=$1
  shift
  "$PY" - "$label" "$@" <<'PY'
import resource, subprocess, sys
label, overrides = sys.argv[1], sys.argv[2:]
code = subprocess.call(["bash", "-c", 'source scripts/sweep_lib.sh; run_sweep "$@"; echo "$SWEEP" > .sweep_dir', "_", label, *overrides])
print(f"{label}: peak RSS of the sweep process {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
sys.exit(code)
PY
  SWEEP=$(cat .sweep_dir) && rm -f .sweep_dir
}

arm llm_vs_minilm_minilm experiment=llm_vs_minilm "$@"
minilm=$SWEEP
arm llm_vs_minilm_smollm2 experiment=llm_vs_minilm model=smollm2 finetune=lora "$@"
report "$minilm" "$SWEEP"
