# Sourced by scripts/reproduce_*.sh: run a Hydra multirun into a known folder, time it, tabulate it.
#   PYTHON (default .venv/bin/python), LOG_DIR (default outputs), STAMP (default: now) name the sweep folders
#   $LOG_DIR/multirun/<label>_$STAMP. Re-running a script with the STAMP of a run that was cut off finishes it:
#   the folder exists, so resume=true is added and completed jobs are skipped.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
LOG_DIR=${LOG_DIR:-outputs}
STAMP=${STAMP:-$(date +%Y-%m-%d_%H-%M-%S)}
export TOKENIZERS_PARALLELISM=false

# run_sweep <label> <overrides...>: sets SWEEP to the sweep folder.
run_sweep() {
  local label=$1 start resume=()
  shift
  SWEEP=$LOG_DIR/multirun/${label}_$STAMP
  [ -d "$SWEEP" ] && resume=(resume=true)
  start=$(date +%s)
  "$PY" -m ftlab.train -m "paths.log_dir=$LOG_DIR" "hydra.sweep.dir=$SWEEP" "${resume[@]}" "$@"
  echo "$label: sweep wall time $(( $(date +%s) - start )) s ($SWEEP)"
}

# report <sweep folders...>: ftlab-report into the first folder (prints the Markdown table).
report() {
  "$PY" -m ftlab.report "$@"
}

# attack_jobs <sweep> <ftlab-eval overrides...>: one ftlab-eval attack per finished job of the sweep
# (DEVICE: ftlab-eval device=, default auto)
attack_jobs() {
  local sweep=$1 record
  shift
  for record in "$sweep"/*/metrics.json; do
    "$PY" -m ftlab.evaluate "run=$(dirname "$record")" "device=${DEVICE:-auto}" "$@"
  done
}
