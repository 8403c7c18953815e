#!/usr/bin/env bash
# Adversarial fine-tuning of MiniLM on Rotten Tomatoes: none (sweep 1) vs FGM / PGD / FreeLB (sweep 2) x 3 seeds,
# then every job's clean test accuracy beside its accuracy under character noise and embedding-space PGD.
#   scripts/reproduce_adversarial_text.sh [overrides, e.g. hydra/launcher=parallel]     (docs/robustness.md)
# Full scale on a GPU: scripts/reproduce_adversarial_text.sh experiment=adversarial_text_full
# Re-running with the STAMP of a run that was cut off finishes the sweeps and redoes the attacks.
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"

run_sweep adversarial_text experiment=adversarial_text "$@"
plain=$SWEEP
run_sweep adversarial_text_adv experiment=adversarial_text adversarial=fgm,pgd,freelb "$@"
adversarial=$SWEEP
for sweep in "$plain" "$adversarial"; do
  attack_jobs "$sweep" attack=char_noise 'attack.rate=[0.05,0.1]'
  attack_jobs "$sweep" attack=embedding_pgd 'attack.epsilon=[0.1,0.3]' attack.steps=3
done
report "$plain" "$adversarial"
"$PY" -m ftlab.robustness.table "$plain" "$adversarial"
