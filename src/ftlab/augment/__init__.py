"""Training-time augmentation: seeded text perturbations (EDA, character noise) and MixUp/CutMix for images."""
