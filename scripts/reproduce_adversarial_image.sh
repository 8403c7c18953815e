#!/usr/bin/env bash
# Madry et al. 2018 at MNIST-5k scale: standard fine-tuning (sweep 1) vs PGD adversarial training (sweep 2) of
# EfficientNet-Lite0 x 3 seeds, then every job's clean test accuracy beside its PGD accuracy at epsilon 0.05 / 0.1.
#   scripts/reproduce_adversarial_image.sh [overrides, e.g. hydra/launcher=parallel]    (docs/robustness.md)
# Full scale on a GPU: scripts/reproduce_adversarial_image.sh experiment=adversarial_image_full
set -euo pipefail
source "$(dirname "$0")/sweep_lib.sh"
# Madry et al.'s training: PGD in L-inf (pixel units), trained on the adversarial loss alone
PGD_TRAINING=(adversarial=pgd adversarial.epsilon=0.1 adversarial.alpha=0.025 adversarial.steps=5
  adversarial.clean_loss=false)

run_sweep adversarial_image experiment=adversarial_image "$@"
standard=$SWEEP
run_sweep adversarial_image_pgd experiment=adversarial_image "${PGD_TRAINING[@]}" "$@"
robust=$SWEEP
for sweep in "$standard" "$robust"; do
  attack_jobs "$sweep" attack=pgd 'attack.epsilon=[0.05,0.1]' attack.steps=10
done
report "$standard" "$robust"
"$PY" -m ftlab.robustness.table "$standard" "$robust"
